"""LowRankAdamW: galore-torch's weights in exact mode, the randomized projector's overlap,
refresh schedule and moment rules, plain-AdamW params, checkpoints, bad input."""

import io
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch
from torch import nn

from sparseft.linalg import subspace_overlap, truncated_svd
from sparseft.optim import LowRankAdamW, lowrank_param_groups
from sparseft.optim import lowrank_adamw as lowrank_module

RANK = 8


def _decaying(m, n, seed, decay=0.7):
    """A gradient-like matrix with singular values decay**i."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    return (u * decay ** torch.arange(min(m, n), dtype=torch.float64) @ v.T).float()


class Regression(nn.Module):
    """A linear layer fitted to a fixed target: gradients that depend on the weights."""

    def __init__(self, m, n, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(n, m)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(m, n, generator=g) * 0.1)
            self.proj.bias.copy_(torch.randn(m, generator=g) * 0.1)
        self.x = torch.randn(32, n, generator=g)
        self.y = self.x @ _decaying(m, n, seed + 1).T * 10

    def loss(self):
        return (self.proj(self.x) - self.y).square().mean()


def _train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model.loss().backward()
        opt.step()


def _groups(model, **options):
    return [{"params": [model.proj.weight], "rank": RANK, **options}, {"params": [model.proj.bias]}]


# ----------------------------------------------------------------------------- galore-torch
@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["right-side", "left-side"])
def test_exact_mode_matches_galore_torch(shape):
    galore = pytest.importorskip("galore_torch")
    ours, theirs = Regression(*shape), Regression(*shape)
    options = dict(update_proj_gap=4, scale=0.25, proj_type="std")
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)  # the settings where the two agree
    opt = LowRankAdamW(_groups(ours, **options), projector="exact", moments="keep", **hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = galore.GaLoreAdamW(_groups(theirs, **options), no_deprecation_warning=True, **hyper)
    _train(ours, opt, 10)  # refreshes at steps 0, 4 and 8
    _train(theirs, ref, 10)
    assert opt.state[ours.proj.weight]["refreshes"] == 3
    assert opt.state[ours.proj.weight]["side"] == ("right" if shape[0] >= shape[1] else "left")
    for a, b in ((ours.proj.weight, theirs.proj.weight), (ours.proj.bias, theirs.proj.bias)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ours.proj.weight, Regression(*shape).proj.weight)  # it did train


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_available_backend_steps_as_the_torch_reference(backend):
    from sparseft import _backends
    from sparseft.ops.lowrank_adam import _kernel_status

    for op in ("direction", "update"):
        ok, reason = _backends.availability(backend, "cpu")
        if ok:
            ok, reason = _kernel_status(backend, op)
        if not ok:
            pytest.skip(reason)
    models = [Regression(40, 24) for _ in range(2)]
    # moments="project": the step after the refresh does not depend on the signs and rotation the
    # factorisation gives the new basis, which rounding-level differences can change
    for model, name in zip(models, ("torch", backend)):
        opt = LowRankAdamW(_groups(model, update_proj_gap=2, moments="project"), lr=0.01, weight_decay=0.1,
                           backend=name)
        _train(model, opt, 3)
    torch.testing.assert_close(models[1].proj.weight, models[0].proj.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(models[1].proj.bias, models[0].proj.bias, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- randomized projector
@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_randomized_projector_overlaps_the_exact_one(shape):
    w = nn.Parameter(torch.zeros(shape))
    opt = LowRankAdamW([{"params": [w], "rank": RANK}], update_proj_gap=2)
    side = "right" if shape[0] >= shape[1] else "left"
    for step, seed in enumerate((1, 2, 3)):  # cold at step 0, warm-started at step 2
        w.grad = _decaying(*shape, seed=seed)
        opt.step()
        u, _, v = truncated_svd(w.grad, RANK, exact=True)
        if step % 2 == 0:
            assert subspace_overlap(v if side == "right" else u, opt.state[w]["projector"]) >= 0.99


def test_projector_refreshes_at_step_zero_and_every_gap():
    w = nn.Parameter(torch.zeros(20, 12))
    opt = LowRankAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3}])
    changed = []
    previous = None
    for step in range(7):
        w.grad = torch.randn(20, 12)
        opt.step()
        projector = opt.state[w]["projector"]
        changed.append(previous is None or not torch.equal(projector, previous))
        previous = projector.clone()
    assert changed == [True, False, False, True, False, False, True]
    assert opt.state[w]["refreshes"] == 3 and opt.state[w]["step"] == 7


# ----------------------------------------------------------------------------- moments at a refresh
def _two_steps(moments, side_shape=(24, 16)):
    """One step, then a refresh step on a gradient of another basis; the state between and after."""
    w = nn.Parameter(torch.zeros(side_shape))
    opt = LowRankAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], projector="exact", moments=moments)
    w.grad = _decaying(*side_shape, seed=1)
    opt.step()
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].items()}
    w.grad = _decaying(*side_shape, seed=2)
    opt.step()
    return w.grad, before, opt.state[w]


def test_keep_moments_carries_them_unchanged_into_the_new_basis():
    grad, before, after = _two_steps("keep")
    projected = grad @ after["projector"]
    torch.testing.assert_close(after["exp_avg"], 0.9 * before["exp_avg"] + 0.1 * projected)
    assert after["moment_step"] == 2


def test_reset_moments_restarts_adam_in_the_new_basis():
    grad, _, after = _two_steps("reset")
    projected = grad @ after["projector"]
    torch.testing.assert_close(after["exp_avg"], 0.1 * projected)
    torch.testing.assert_close(after["exp_avg_sq"], 0.001 * projected.square())
    assert after["moment_step"] == 1


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_project_moments_rotates_them_into_the_new_basis(shape):
    grad, before, after = _two_steps("project", shape)
    old, new = before["projector"], after["projector"]
    turn = old.T @ new
    if after["side"] == "right":
        projected = grad @ new
        exp_avg, exp_avg_sq = before["exp_avg"] @ turn, before["exp_avg_sq"] @ turn.square()
    else:
        projected = new.T @ grad
        exp_avg, exp_avg_sq = turn.T @ before["exp_avg"], turn.square().T @ before["exp_avg_sq"]
    torch.testing.assert_close(after["exp_avg"], 0.9 * exp_avg + 0.1 * projected)
    torch.testing.assert_close(after["exp_avg_sq"], 0.999 * exp_avg_sq + 0.001 * projected.square())
    assert (after["exp_avg_sq"] >= 0).all() and after["moment_step"] == 2


def test_project_moments_preserve_the_full_space_moment_within_one_subspace():
    """Two bases of the same subspace: the rotated first moment M·Pᵀ is unchanged, and Σ V too."""
    w = nn.Parameter(torch.zeros(24, 16))
    opt = LowRankAdamW([{"params": [w], "rank": 4}], projector="exact", moments="project")
    w.grad = _decaying(24, 16, seed=1)
    opt.step()
    state = opt.state[w]
    old = state["projector"].clone()
    rotation = torch.linalg.qr(torch.randn(4, 4)).Q
    new = old @ rotation
    full_moment, total_v = state["exp_avg"] @ old.T, state["exp_avg_sq"].sum()
    opt._carry_moments("project", state, old, new)
    torch.testing.assert_close(state["exp_avg"] @ new.T, full_moment, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["exp_avg_sq"].sum(), total_v, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- robustness of a refresh
def test_non_finite_gradient_keeps_the_projector_and_warns_once():
    w = nn.Parameter(torch.zeros(20, 12))
    opt = LowRankAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], lr=0.0)
    w.grad = _decaying(20, 12, seed=1)
    opt.step()
    kept = opt.state[w]["projector"].clone()
    bad = _decaying(20, 12, seed=2)
    bad[3, 4] = float("nan")
    w.grad = bad
    with pytest.warns(RuntimeWarning, match="kept the previous projector"):
        opt.step()
    assert torch.equal(opt.state[w]["projector"], kept) and opt.state[w]["failed_refreshes"] == 1
    w.grad = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # counted again, not warned again
    assert opt.state[w]["failed_refreshes"] == 2


def test_failed_factorisation_keeps_the_projector(monkeypatch):
    w = nn.Parameter(torch.zeros(20, 12))
    opt = LowRankAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}])
    w.grad = _decaying(20, 12, seed=1)
    opt.step()
    kept = opt.state[w]["projector"].clone()

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(lowrank_module, "right_singular_vectors", fail)
    w.grad = _decaying(20, 12, seed=2)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(opt.state[w]["projector"], kept) and opt.state[w]["failed_refreshes"] == 1
    assert torch.isfinite(w).all()


def test_unusable_first_gradient_gets_a_random_orthonormal_projector():
    w = nn.Parameter(torch.zeros(20, 12))
    opt = LowRankAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.full((20, 12), float("inf"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    projector = opt.state[w]["projector"]
    torch.testing.assert_close(projector.T @ projector, torch.eye(4), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- plain AdamW params
@pytest.mark.parametrize("backend", ["torch", None])
def test_params_without_rank_step_as_torch_adamw(backend):
    params = [nn.Parameter(torch.randn(30, 20)), nn.Parameter(torch.randn(20))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    # the matrix in a group without rank, the vector in a group with one: both plain
    opt = LowRankAdamW([{"params": [params[0]]}, {"params": [params[1]], "rank": 4}], backend=backend, **hyper)
    ref = torch.optim.AdamW(twins, foreach=False, **hyper)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, twin in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g)
            twin.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_rounded_once_from_float32_math(dtype):
    w32 = nn.Parameter(torch.randn(24, 16))
    w16 = nn.Parameter(w32.detach().to(dtype))
    w32.data.copy_(w16.detach().float())
    opts = [LowRankAdamW([{"params": [w], "rank": 4}], lr=0.1, weight_decay=0.1) for w in (w32, w16)]
    grad = _decaying(24, 16, seed=3).to(dtype)
    w32.grad, w16.grad = grad.float(), grad
    for opt in opts:
        opt.step()
    assert opts[1].state[w16]["exp_avg"].dtype == torch.float32
    assert torch.equal(w16, w32.detach().to(dtype))


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint_run(steps, save_at=None, state_dict=None, model_state=None):
    model = Regression(40, 24)
    groups = _groups(model, update_proj_gap=3, moments="project")
    opt = LowRankAdamW(groups, lr=0.01, weight_decay=0.01)
    if state_dict is not None:
        model.load_state_dict(model_state)
        opt.load_state_dict(state_dict)
    saved = None
    for step in range(steps):
        _train(model, opt, 1)
        if step + 1 == save_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            saved = buffer.getvalue()
    return model, opt, saved


def test_resume_is_bit_exact_including_refreshes():
    straight, _, saved = _checkpoint_run(8, save_at=4)
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    resumed, opt, _ = _checkpoint_run(4, state_dict=checkpoint["opt"], model_state=checkpoint["model"])
    assert opt.state[resumed.proj.weight]["refreshes"] == 3  # steps 0, 3 and 6: one after the resume
    assert torch.equal(resumed.proj.weight, straight.proj.weight)
    assert torch.equal(resumed.proj.bias, straight.proj.bias)


def test_state_dict_keeps_float32_state_for_low_precision_params():
    w = nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    opt = LowRankAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn(24, 16, dtype=torch.bfloat16)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    again = LowRankAdamW([{"params": [w], "rank": 4}])
    again.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    state = again.state[w]
    assert state["projector"].dtype == state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["projector"], opt.state[w]["projector"])


def test_loading_a_different_rank_or_shape_raises_before_any_change():
    w = nn.Parameter(torch.randn(24, 16))
    opt = LowRankAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn(24, 16)
    opt.step()
    saved = opt.state_dict()
    other_rank = LowRankAdamW([{"params": [w], "rank": 6}])
    with pytest.raises(ValueError, match="rank 4.*rank 6"):
        other_rank.load_state_dict(saved)
    assert not other_rank.state
    wider = nn.Parameter(torch.randn(24, 20))
    other_shape = LowRankAdamW([{"params": [wider], "rank": 4}])
    with pytest.raises(ValueError, match="projector of shape"):
        other_shape.load_state_dict(saved)
    assert not other_shape.state and other_shape.param_groups[0]["params"][0] is wider


# ----------------------------------------------------------------------------- param groups
class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(self.down(torch.relu(self.up(self.embed_tokens(ids))))))


def test_lowrank_param_groups_project_the_linear_weights_only():
    model = TinyLM()
    groups = lowrank_param_groups(model, rank=4, update_proj_gap=5, scale=1.0)
    assert groups[0]["param_names"] == ["up.weight", "down.weight"]
    assert groups[0]["rank"] == 4 and groups[0]["update_proj_gap"] == 5 and groups[0]["scale"] == 1.0
    assert "rank" not in groups[1]
    assert set(groups[1]["param_names"]) == {"embed_tokens.weight", "up.bias", "norm.weight", "norm.bias",
                                             "lm_head.weight"}
    regex = lowrank_param_groups(model, rank=4, targets=r"\.weight$", include=["head"])
    assert regex[0]["param_names"] == ["up.weight", "down.weight", "lm_head.weight"]
    opt = LowRankAdamW(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ids = torch.randint(0, 50, (4, 8))
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert set(opt.state[model.up.weight]) >= {"projector", "exp_avg"}
    assert "projector" not in opt.state[model.embed_tokens.weight]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("group, message", [
    (dict(rank=0), "rank: expected a positive int"),
    (dict(rank=17), "rank 17 exceeds min"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, proj_type="full"), "proj_type"),
    (dict(rank=4, projector="svd"), "projector"),
    (dict(rank=4, moments="rotate"), "moments"),
    (dict(rank=4, oversample=-1), "oversample"),
    (dict(rank=4, scale=float("nan")), "scale"),
])
def test_bad_group_options_name_the_argument(group, message):
    w = nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=message):
        LowRankAdamW([{"params": [w], **group}])


@pytest.mark.parametrize("kwargs, message", [
    (dict(update_proj_gap=-1), "update_proj_gap"), (dict(proj_type="reverse_std"), "proj_type"),
    (dict(projector=None), "projector"), (dict(moments="zero"), "moments"), (dict(lr=-1.0), "lr"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_constructor_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankAdamW([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_params_are_refused():
    with pytest.raises(TypeError, match="complex"):
        LowRankAdamW([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="int64"):
        LowRankAdamW([nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)])
    with pytest.raises(ValueError, match="must be 2-D"):
        LowRankAdamW([{"params": [nn.Parameter(torch.randn(4, 4, 3))], "rank": 2}])
    mixed = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4, device="meta"))]
    with pytest.raises(ValueError, match="one device"):
        LowRankAdamW([{"params": mixed}])


def test_bad_gradients_raise_before_any_state_changes():
    first, second = nn.Parameter(torch.randn(24, 16)), nn.Parameter(torch.randn(24, 16))
    opt = LowRankAdamW([{"params": [first, second], "rank": 4}])
    first.grad = torch.randn(24, 16)
    second.grad = torch.randn(24, 16).to_sparse()
    untouched = first.detach().clone()
    with pytest.raises(TypeError, match=r"params\[1\]: sparse gradients"):
        opt.step()
    assert not opt.state[first] and torch.equal(first, untouched)

    second.grad = torch.randn(24, 16)
    opt.step()
    first.data = torch.randn(30, 16)  # a projected parameter whose shape changed under the optimizer
    first.grad = torch.randn(30, 16)
    second.grad = torch.randn(24, 16)
    kept = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[second].items()}
    with pytest.raises(ValueError, match=r"params\[0\]: the parameter's shape changed"):
        opt.step()
    assert opt.state[second]["step"] == kept["step"] and torch.equal(opt.state[second]["exp_avg"], kept["exp_avg"])


def test_a_plain_parameter_whose_shape_changed_raises_before_any_change():
    vector, matrix = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(24, 16))
    opt = LowRankAdamW([{"params": [matrix, vector], "rank": 4}])
    vector.grad, matrix.grad = torch.randn(8), torch.randn(24, 16)
    opt.step()
    vector.data, vector.grad, matrix.grad = torch.randn(9), torch.randn(9), torch.randn(24, 16)
    with pytest.raises(ValueError, match=r"params\[1\]: the parameter's shape changed"):
        opt.step()
    assert opt.state[matrix]["step"] == 1


# ----------------------------------------------------------------------------- layerwise mode
class TwoLayer(nn.Module):
    """Two projected weights (one per side) and plain biases, regressed on batches the test picks."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 20)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.x = torch.randn(6, 32, 24, generator=g)
        self.y = torch.randn(6, 32, 20, generator=g)

    def loss(self, batch):
        return (self.down(torch.tanh(self.up(self.x[batch]))) - self.y[batch]).square().mean()

    def groups(self):
        return [{"params": [self.up.weight, self.down.weight], "rank": 6},
                {"params": [self.up.bias, self.down.bias]}]


def _micro_batches(step, k):
    """Refresh steps (0, 4, 8) see k copies of one batch, so the first micro-batch's gradient
    spans what the summed gradient spans; the other steps see k different batches."""
    return [step % 6] * k if step % 4 == 0 else [(step + j) % 6 for j in range(k)]


def _run_dense(model, opt, steps, k, start):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        for batch in _micro_batches(step, k):
            model.loss(batch).backward()
        opt.step()


def _run_layerwise(model, opt, steps, k, start):
    for step in range(start, start + steps):
        for batch in _micro_batches(step, k):
            model.loss(batch).backward()
            assert all(p.grad is None for p in (model.up.weight, model.down.weight)), "a projected .grad survived"
        assert all(p.grad is None for p in model.parameters()), "a gradient survived the last micro-batch"
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("k", [1, 3])
def test_layerwise_with_accumulation_equals_the_optimizer_on_the_summed_gradient(k, clip):
    options = dict(lr=0.02, weight_decay=0.1, update_proj_gap=4, max_grad_norm=clip)
    dense, layerwise = TwoLayer(), TwoLayer()
    dense_opt = LowRankAdamW(dense.groups(), **options)
    layer_opt = LowRankAdamW(layerwise.groups(), layerwise=True, accumulation_steps=k, **options)
    for start in (0, 5):  # compared mid-run and after refreshes at steps 0, 4 and 8
        _run_dense(dense, dense_opt, 5, k, start)
        _run_layerwise(layerwise, layer_opt, 5, k, start)
        for a, b in zip(dense.parameters(), layerwise.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(layer_opt.last_grad_norm, dense_opt.last_grad_norm, rtol=1e-5, atol=0)
    assert layer_opt.state[layerwise.up.weight]["refreshes"] == 3
    if clip is not None:
        assert float(dense_opt.last_grad_norm) > clip  # the clipping acted


def test_layerwise_refresh_takes_the_first_micro_batch_gradient():
    model = TwoLayer()
    opt = LowRankAdamW(model.groups(), layerwise=True, accumulation_steps=2, projector="exact")
    first = torch.autograd.grad(model.loss(1), model.up.weight)[0]  # up is 40×24: right projector
    model.loss(1).backward()
    model.loss(2).backward()
    opt.step()
    expected = truncated_svd(first, 6, exact=True)[2]
    assert subspace_overlap(expected, opt.state[model.up.weight]["projector"]) > 1 - 1e-5


def test_grad_norm_is_measured_on_the_projected_and_plain_gradients():
    model = TwoLayer()
    opt = LowRankAdamW(model.groups(), update_proj_gap=100)
    model.loss(0).backward()
    opt.step()  # builds the projectors
    opt.zero_grad()
    model.loss(1).backward()
    parts = []
    for p in model.parameters():
        state = opt.state[p]
        if "projector" in state:
            P = state["projector"]
            parts.append(p.grad @ P if state["side"] == "right" else P.T @ p.grad)
        else:
            parts.append(p.grad)
    opt.step()
    expected = torch.cat([t.reshape(-1) for t in parts]).double().norm()
    torch.testing.assert_close(opt.last_grad_norm.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
def test_layerwise_step_after_a_short_accumulation_steps_the_sum_so_far(clip):
    dense, layerwise = TwoLayer(), TwoLayer()
    dense_opt = LowRankAdamW(dense.groups(), max_grad_norm=clip)
    layer_opt = LowRankAdamW(layerwise.groups(), layerwise=True, accumulation_steps=3, max_grad_norm=clip)
    for batches in ([0, 0, 0], [1, 2], [3, 4, 5]):  # the second step is short of its third micro-batch
        dense_opt.zero_grad()
        for batch in batches:
            dense.loss(batch).backward()
            layerwise.loss(batch).backward()
        dense_opt.step()
        layer_opt.step()
        for a, b in zip(dense.parameters(), layerwise.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert not layer_opt._pending and all(p.grad is None for p in layerwise.parameters())


def test_a_param_can_have_one_layerwise_owner():
    model = TwoLayer()
    opt = LowRankAdamW(model.groups(), layerwise=True)
    with pytest.raises(ValueError, match=r"params\[0\]: already has a post-accumulate-grad hook"):
        LowRankAdamW(model.groups(), layerwise=True)
    opt.remove_hooks()
    again = LowRankAdamW(model.groups(), layerwise=True)
    model.loss(0).backward()
    assert again.state[model.up.weight]["step"] == 1 and not opt.state


@pytest.mark.parametrize("kwargs, message", [
    (dict(accumulation_steps=2), "accumulation_steps: only layerwise=True"),
    (dict(layerwise=True, accumulation_steps=0), "accumulation_steps: expected a positive int"),
    (dict(layerwise=1), "layerwise: expected a bool"),
    (dict(max_grad_norm=0.0), "max_grad_norm: expected a positive finite float"),
])
def test_bad_layerwise_options_name_the_argument(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LowRankAdamW(TwoLayer().groups(), **kwargs)
