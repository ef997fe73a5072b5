"""SaRA's nuclear-norm penalty on sparsified modules: the subgradient against autograd in float64,
the randomized mode against the exact one, its effect in training, the per-step draw, masks that
change under it (SparseAdamW.update_masks, sara_reselect), bad input, bfloat16 values."""

import io
import math

import pytest
import torch
from torch import nn

import sparseft
from sparseft.optim import NuclearNormPenalty, SparseAdamW, sara_reselect


def _mask(numel, density, generator):
    return torch.randperm(numel, generator=generator)[:round(density * numel)].sort().values.to(torch.int32)


def _model(shapes, density=0.7, dtype=torch.float64, seed=0):
    """A ModuleList of bias-free Linears [out, in] = shapes, sparsified at random masks."""
    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleList(nn.Linear(n, m, bias=False, dtype=dtype) for m, n in shapes)
    masks = {f"{i}.weight": _mask(m * n, density, g) for i, (m, n) in enumerate(shapes)}
    return sparseft.sparsify(model, masks)


@torch.no_grad()
def _shift(module, delta_values):
    """Moves the trainable values (and the weight, as an optimizer does) by ``delta_values``."""
    module.weight_values.add_(delta_values.to(module.weight_values.dtype))
    module.weight.view(-1)[module.weight_indices] = module.weight_values


def _shift_all(model, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for module in model:
        _shift(module, scale * torch.randn(module.weight_values.shape, generator=g, dtype=torch.float64))


def _delta(module, base_values):
    delta = torch.zeros(module.weight.numel(), dtype=base_values.dtype)
    delta[module.weight_indices.long()] = module.weight_values.detach().to(base_values.dtype) - base_values
    return delta.view(module.weight.shape)


def _autograd_subgradient(module, base_values, weight):
    """d/dvalues of weight·‖ΔW(values)‖_* in float64 by autograd."""
    values = module.weight_values.detach().double().requires_grad_(True)
    delta = torch.zeros(module.weight.numel(), dtype=torch.float64).index_put((module.weight_indices.long(),),
                                                                              values - base_values.double())
    penalty = weight * torch.linalg.matrix_norm(delta.view(module.weight.shape), "nuc")
    (grad,) = torch.autograd.grad(penalty, values)
    return grad, penalty.detach()


# ----------------------------------------------------------------------------- (1) exact mode
def test_exact_subgradient_matches_autograd_float64():
    shapes = [(5, 7), (8, 4), (6, 6)]
    model = _model(shapes)
    base = [m.weight_values.detach().clone() for m in model]
    penalty = NuclearNormPenalty(model, weight=0.3, per_step="all")
    _shift_all(model)
    existing = [torch.randn_like(m.weight_values) for m in model]
    for m, g in zip(model, existing):
        m.weight_values.grad = g.clone()
    values = penalty.add_to_grad()
    for i, (m, b, g) in enumerate(zip(model, base, existing)):
        assert torch.linalg.matrix_rank(_delta(m, b)) == min(shapes[i])  # full rank: the gradient is unique
        expected, expected_value = _autograd_subgradient(m, b, 0.3)
        torch.testing.assert_close(m.weight_values.grad - g, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[str(i)].double(), expected_value, rtol=1e-5, atol=0)


def test_zero_delta_and_zero_weight_add_nothing():
    model = _model([(5, 7), (4, 6)])
    penalty = NuclearNormPenalty(model, weight=0.3, per_step="all")
    assert all(float(v) == 0 for v in penalty.add_to_grad().values())  # ΔW = 0 at the start
    assert all(m.weight_values.grad is None for m in model)
    _shift_all(model)
    idle = NuclearNormPenalty(model, weight=0.0, per_step="all")
    _shift_all(model, seed=2)
    assert all(float(v) == 0 for v in idle.add_to_grad().values())
    assert all(m.weight_values.grad is None for m in model)


# ----------------------------------------------------------------------------- (2) randomized mode
def _low_rank_case(singular_values, shape=(12, 9), seed=0):
    """A full-mask float32 module whose ΔW has the given singular values."""
    g = torch.Generator().manual_seed(seed)
    model = _model([shape], density=1.0, dtype=torch.float32, seed=seed)
    u = torch.linalg.qr(torch.randn(shape[0], len(singular_values), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], len(singular_values), generator=g, dtype=torch.float64)).Q
    delta = u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T
    return model, delta


def _grad_after(model, delta, **options):
    penalty = NuclearNormPenalty(model, per_step="all", **options)
    module = model[0]
    saved = module.weight_values.detach().clone()
    _shift(module, delta.reshape(-1))
    module.weight_values.grad = None
    value = penalty.add_to_grad()["0"]
    grad = module.weight_values.grad.double()
    with torch.no_grad():  # back to the start for the next mode
        module.weight_values.copy_(saved)
        module.weight.view(-1).copy_(saved)
    return grad, value


def test_randomized_with_rank_of_delta_equals_exact():
    model, delta = _low_rank_case([5.0, 2.0, 0.7])
    exact, exact_value = _grad_after(model, delta, weight=0.1)
    approx, approx_value = _grad_after(model, delta, weight=0.1, rank=3)
    capped, _ = _grad_after(model, delta, weight=0.1, rank=50)  # capped at min(m, n)
    torch.testing.assert_close(approx, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(capped, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(approx_value, exact_value, rtol=1e-5, atol=0)
    torch.testing.assert_close(exact_value.double(), torch.tensor(0.1 * 7.7, dtype=torch.float64), rtol=1e-5, atol=0)


def test_randomized_below_rank_is_the_top_k_subgradient():
    """rank=k < rank(ΔW): U_kV_kᵀ of the exact SVD (the Ky Fan k-norm's subgradient) up to the
    range finder, and for a full mask ‖UVᵀ − U_kV_kᵀ‖_F/‖UVᵀ‖_F = √((r − k)/r) (docstring)."""
    model, delta = _low_rank_case([10.0, 8.0, 6.0, 0.5, 0.3, 0.1])
    exact, _ = _grad_after(model, delta, weight=1.0)
    approx, value = _grad_after(model, delta, weight=1.0, rank=3)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    top3 = (u[:, :3] @ vh[:3]).reshape(-1)
    torch.testing.assert_close(approx, top3, rtol=0, atol=1e-4)
    assert float(value) == pytest.approx(24.0, rel=1e-5)
    relative = float((exact - approx).norm() / exact.norm())
    assert relative == pytest.approx(math.sqrt(3 / 6), abs=1e-4)


# ----------------------------------------------------------------------------- (3) training
def _train(weight, steps=200, lr=3e-2):
    """An underdetermined regression (6 samples, 96 trainable entries) whose targets need a
    rank-1 change of the outputs: many sparse updates fit it; the penalty picks a low-rank one."""
    g = torch.Generator().manual_seed(0)
    m, n, samples = 12, 16, 6
    linear = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(0.3 * torch.randn(m, n, generator=g))
    w0 = linear.weight.detach().clone()
    mask = _mask(m * n, 0.5, g)
    x = torch.randn(samples, n, generator=g)
    y = x @ w0.T + torch.randn(samples, 1, generator=g) * torch.randn(1, m, generator=g)
    model = sparseft.sparsify(nn.ModuleList([linear]), {"0.weight": mask})
    optimizer = SparseAdamW([model[0].weight_values], lr=lr)
    penalty = NuclearNormPenalty(model, weight=weight, per_step="all")
    with torch.no_grad():
        start_loss = float(((model[0](x) - y) ** 2).mean())
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ((model[0](x) - y) ** 2).mean().backward()
        penalty.add_to_grad()
        optimizer.step()
    with torch.no_grad():
        loss = float(((model[0](x) - y) ** 2).mean())
        return start_loss, loss, float(torch.linalg.matrix_norm(model[0].weight - w0, "nuc"))


def test_penalty_lowers_the_nuclear_norm_at_similar_loss():
    start, loss_free, nuclear_free = _train(0.0)
    _, loss_penalised, nuclear_penalised = _train(3e-3)
    assert loss_free < 0.05 * start and loss_penalised < 0.05 * start  # both fit
    assert abs(loss_penalised - loss_free) < 0.02 * start
    assert nuclear_penalised < 0.85 * nuclear_free


# ----------------------------------------------------------------------------- (4) the draw
def _draws(penalty, model, calls):
    drawn = []
    for _ in range(calls):
        for m in model:
            m.weight_values.grad = None
        returned = penalty.add_to_grad()
        touched = [str(i) for i, m in enumerate(model) if m.weight_values.grad is not None]
        assert len(touched) == 1 and touched == list(returned)  # exactly one module, the one reported
        drawn += touched
    return drawn


def test_one_module_per_call_reproducible_and_resumable():
    shapes = [(5, 7), (4, 6), (6, 3), (3, 8)]

    def run(seed, calls, state=None):
        model = _model(shapes)  # the same values at every run
        penalty = NuclearNormPenalty(model, weight=0.1, seed=seed)
        if state is not None:
            penalty.load_state_dict(state)
        _shift_all(model)
        return _draws(penalty, model, calls), penalty

    full, penalty = run(7, 12)
    assert penalty.per_step == "one" and penalty.calls == 12
    assert len(set(full)) > 1
    head, interrupted = run(7, 5)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    tail, resumed = run(7, 7, torch.load(buffer, weights_only=True))
    assert head + tail == full and resumed.calls == 12
    assert run(8, 12)[0] != full


# ----------------------------------------------------------------------------- (5) masks that change
def _train_steps(model, optimizer, penalty, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        sum((m(torch.randn(4, m.in_features, generator=g, dtype=m.weight.dtype)) ** 2).mean() for m in model).backward()
        penalty.add_to_grad()
        optimizer.step()


@pytest.mark.parametrize("explicit_sync", [True, False])
def test_update_masks_keeps_surviving_bases_and_moments(explicit_sync):
    model = _model([(6, 8), (5, 4)], density=0.5, dtype=torch.float32)
    optimizer = SparseAdamW([m.weight_values for m in model], lr=1e-2)
    penalty = NuclearNormPenalty(model, weight=0.1, per_step="all")
    _train_steps(model, optimizer, penalty, 3)
    module, values = model[0], model[0].weight_values
    old_indices, old_base = module.weight_indices.clone(), penalty.state_dict()["base"]["0"]
    old_exp_avg = optimizer.state[values]["exp_avg"].clone()
    outside = torch.tensor(sorted(set(range(48)) - set(old_indices.tolist())), dtype=torch.int32)
    new_indices = torch.cat([old_indices[::2], outside[:5]]).sort().values
    optimizer.update_masks([new_indices, None])
    if explicit_sync:
        penalty.sync_masks()
        base = penalty.state_dict()["base"]["0"]
    else:
        values.grad = torch.zeros_like(values)
        penalty.add_to_grad()  # notices the new mask before computing ΔW
        base = penalty._tracked[0].base
    survives = torch.isin(new_indices, old_indices)
    old_position = torch.searchsorted(old_indices, new_indices[survives])
    torch.testing.assert_close(base[survives], old_base[old_position], rtol=0, atol=0)
    torch.testing.assert_close(base[~survives], values.detach()[~survives].float(), rtol=0, atol=0)  # ΔW = 0
    torch.testing.assert_close(optimizer.state[values]["exp_avg"][survives], old_exp_avg[old_position], rtol=0, atol=0)
    assert optimizer.state[values]["exp_avg"][~survives].abs().sum() == 0
    assert penalty._tracked[1].base.numel() == model[1].weight_indices.numel()  # the other module untouched


def test_sara_reselect_replaces_masks_and_syncs_the_penalty():
    model = _model([(6, 8), (5, 4)], density=1.0, dtype=torch.float32)
    optimizer = SparseAdamW([m.weight_values for m in model], lr=5e-2)
    penalty = NuclearNormPenalty(model, weight=0.1, per_step="all")
    _train_steps(model, optimizer, penalty, 3)
    old_bases = penalty.state_dict()["base"]
    old_exp_avgs = [optimizer.state[m.weight_values]["exp_avg"].clone() for m in model]
    masks = sara_reselect(model, optimizer, fraction=0.25, penalty=penalty)
    for i, m in enumerate(model):
        kept = m.weight_indices.long()  # the old masks were full: every new entry survives
        magnitude = m.weight.detach().abs().reshape(-1)
        assert kept.numel() == round(0.25 * m.weight.numel()) and torch.equal(masks[f"{i}.weight"], m.weight_indices)
        assert magnitude[kept].max() <= magnitude.sort().values[kept.numel() - 1]  # the smallest entries
        assert penalty._tracked[i].indices is m.weight_indices  # synced at once
        torch.testing.assert_close(penalty._tracked[i].base, old_bases[str(i)][kept], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[m.weight_values]["exp_avg"], old_exp_avgs[i][kept], rtol=0, atol=0)
    before = model[0].weight_indices.clone()
    threshold = float(model[0].weight.detach().abs().reshape(-1)[before.long()].median())
    sara_reselect(model, optimizer, threshold=threshold)
    assert torch.isin(model[0].weight_indices, before).all()  # untrained entries never join


# ----------------------------------------------------------------------------- (6) bad input
@pytest.mark.parametrize("kwargs, argument", [
    ({"weight": -1e-3}, "weight"), ({"weight": float("nan")}, "weight"), ({"weight": float("inf")}, "weight"),
    ({"weight": True}, "weight"), ({"weight": "5e-4"}, "weight"), ({"per_step": "some"}, "per_step"),
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 1.5}, "rank"), ({"rank": True}, "rank"),
    ({"seed": 0.5}, "seed"),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NuclearNormPenalty(_model([(4, 5)]), **kwargs)


def test_bad_models_and_states():
    with pytest.raises(ValueError, match="model"):
        NuclearNormPenalty(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(TypeError, match="model"):
        NuclearNormPenalty(torch.zeros(3))
    model = _model([(4, 5), (3, 3)], dtype=torch.float32)
    penalty = NuclearNormPenalty(model)
    state = penalty.state_dict()
    for bad in ({**state, "calls": -1}, {**state, "base": {"0": state["base"]["0"]}},
                {**state, "base": {**state["base"], "1": state["base"]["1"].double()}},
                {**state, "indices": {**state["indices"], "0": state["indices"]["0"].flip(0)}}):
        with pytest.raises(ValueError, match="state_dict"):
            penalty.load_state_dict(bad)
    optimizer = SparseAdamW([m.weight_values for m in model])
    masks = [m.weight_indices for m in model]
    with pytest.raises(ValueError, match="exactly one"):
        sara_reselect(model, optimizer, threshold=0.1, fraction=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        sara_reselect(model, torch.optim.SGD([model[0].weight_values]), threshold=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        sara_reselect(nn.ModuleList([nn.Linear(2, 2)]), optimizer, threshold=0.1)
    assert all(m.weight_indices is mask for m, mask in zip(model, masks))  # nothing changed


# ----------------------------------------------------------------------------- (7) bfloat16 values
def test_bfloat16_values_use_float32_math():
    model = _model([(6, 5)], dtype=torch.bfloat16)
    reference = _model([(6, 5)], dtype=torch.float32)
    with torch.no_grad():
        reference[0].weight.copy_(model[0].weight.float())
        reference[0].weight_values.copy_(model[0].weight_values.float())
    penalties = [NuclearNormPenalty(m, weight=0.2, per_step="all") for m in (model, reference)]
    assert penalties[0]._tracked[0].base.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    step = torch.randn(model[0].weight_values.shape, generator=g).to(torch.bfloat16)
    _shift(model[0], step)
    _shift(reference[0], step.float())
    values = [p.add_to_grad()["0"] for p in penalties]
    grad = model[0].weight_values.grad
    assert grad.dtype == torch.bfloat16 and values[0].dtype == torch.float32
    torch.testing.assert_close(values[0], values[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(grad.float(), reference[0].weight_values.grad, rtol=8e-3, atol=1e-4)
