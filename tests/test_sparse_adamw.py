"""SparseAdamW: every available backend against torch.optim.AdamW run in float64 on the masked
entries alone; masks refresh, checkpoints, compact (sparsified) values, bad input."""

import io
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch
from torch import nn

from sparseft import _backends, _ext
from sparseft.optim import SparseAdamW
from sparseft.optim._sparse_adamw_backends import sparse_adamw_step

SHAPE = (24, 40)
NNZ = 300


def _backend_reason(name, device_type="cpu"):
    ok, reason = _backends.availability(name, device_type)
    if ok and name in ("cpu", "cuda"):
        _ext.load()
        if not hasattr(torch.ops.sparseft_C, "sparse_adamw_step"):
            return "sparseft._C predates sparse_adamw_step; rebuild the extension"
    return None if ok else reason


def _backend_params(device_type="cpu"):
    out = []
    for name in ("torch", "cpu", "triton") if device_type == "cpu" else ("torch", "triton", "cuda"):
        reason = _backend_reason(name, device_type)
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return out


BACKENDS = _backend_params()


def _mask(numel, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:nnz].sort().values.to(torch.int32)


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _grads(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


class StandInSparseLinear(nn.Module):
    """The part of interface 3 (sparseft.sparsify's SparseLinear) that SparseAdamW relies on."""

    def __init__(self, weight, indices):
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.register_buffer("weight_indices", indices)
        self.weight_values = nn.Parameter(self.weight.detach().view(-1)[indices.long()].clone())
        self.weight_values._sparseft_module = self

    def reindex_(self, new_indices):
        self.weight_indices = new_indices
        self.weight_values.data = self.weight.detach().view(-1)[new_indices.long()].clone()


def _reference(w0, idx, grads, dtype, lr_per_step, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch.optim.AdamW in float64 on the masked entries, stored back in ``dtype`` each step."""
    leaf = nn.Parameter(w0.reshape(-1)[idx.long()].double())
    opt = torch.optim.AdamW([leaf], lr=lr_per_step[0], betas=betas, eps=eps, weight_decay=weight_decay)
    for g, lr in zip(grads, lr_per_step):
        opt.param_groups[0]["lr"] = lr
        leaf.grad = g.reshape(-1)[idx.long()].double()
        opt.step()
        with torch.no_grad():
            leaf.copy_(leaf.to(dtype).double())
    return leaf.detach(), opt.state[leaf]


def _tolerances(dtype):
    # bfloat16: one rounding ulp (float32 and float64 math may round a value the other way)
    return dict(rtol=8e-3, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("compact", [False, True], ids=["dense_grad", "compact_values"])
def test_matches_float64_adamw_on_masked_entries(backend, dtype, weight_decay, compact):
    w0, idx, grads = _weights(dtype), _mask(SHAPE[0] * SHAPE[1], NNZ, 2), _grads(4, dtype)
    if compact:
        module = StandInSparseLinear(w0, idx)
        param, weight = module.weight_values, module.weight
        opt = SparseAdamW([param], lr=1e-2, weight_decay=weight_decay, backend=backend)
    else:
        param = weight = nn.Parameter(w0.clone())
        opt = SparseAdamW([param], masks=[idx], lr=1e-2, weight_decay=weight_decay, backend=backend)
    for g in grads:
        param.grad = g.view(-1)[idx.long()].clone() if compact else g.clone()
        opt.step()

    ref, ref_state = _reference(w0, idx, grads, dtype, [1e-2] * 4, weight_decay=weight_decay)
    flat, lidx = weight.detach().view(-1), idx.long()
    torch.testing.assert_close(flat[lidx].double(), ref, **_tolerances(dtype))
    state = opt.state[param]
    torch.testing.assert_close(state["exp_avg"].double(), ref_state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"].double(), ref_state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert torch.equal(state["step"], torch.full((NNZ,), 4, dtype=torch.int32))
    outside = torch.ones(flat.numel(), dtype=torch.bool)
    outside[lidx] = False
    assert torch.equal(flat[outside], w0.view(-1)[outside])  # bit-identical, weight decay included
    if compact:
        assert torch.equal(param.detach(), flat[lidx])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("compact", [False, True])
def test_fused_step_matches_torch_reference(backend, dtype, index_dtype, compact):
    w0, idx, grads = _weights(dtype), _mask(SHAPE[0] * SHAPE[1], NNZ, 3).to(index_dtype), _grads(3, dtype)
    runs = []
    for step_fn in ("torch", backend):
        w = w0.clone()
        m, v = torch.zeros(NNZ), torch.zeros(NNZ)
        s, values = torch.zeros(NNZ, dtype=torch.int32), torch.zeros(NNZ, dtype=dtype)
        for g in grads:
            grad = g.view(-1)[idx.long()].clone() if compact else g
            sparse_adamw_step(w, idx, grad, m, v, s, values, lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6,
                              weight_decay=0.05, backend=step_fn)
        runs.append((w, m, v, s, values))
    (w_ref, m_ref, v_ref, s_ref, _), (w, m, v, s, values) = runs
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(w.double(), w_ref.double(), rtol=2 * ulp, atol=1e-6)
    torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-8)
    assert torch.equal(s, s_ref) and torch.equal(values, w.view(-1)[idx.long()])


@pytest.mark.skipif(_backend_reason("cpu") is not None, reason=str(_backend_reason("cpu")))
@pytest.mark.parametrize("compact", [False, True])
def test_native_step_across_threads_and_mixed_step_counts(compact):
    """A mask split between threads, with step counts that change inside a vector of entries
    (entries that joined at a refresh) and a length that is no multiple of the vector width."""
    numel, nnz = 300 * 401, 60_001
    idx = _mask(numel, nnz, 8)
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(300, 401, generator=gen)
    grad = torch.randn(300, 401, generator=gen)
    m0, v0 = torch.rand(nnz, generator=gen), torch.rand(nnz, generator=gen)
    steps = torch.randint(0, 3, (nnz,), generator=gen, dtype=torch.int32).repeat_interleave(5)[:nnz]
    runs = []
    for backend in ("torch", "cpu"):
        w, m, v, s = w0.clone(), m0.clone(), v0.clone(), steps.clone()
        values = w.view(-1)[idx.long()].clone() if compact else None
        g = grad.view(-1)[idx.long()].clone() if compact else grad
        sparse_adamw_step(w, idx, g, m, v, s, values, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, backend=backend)
        runs.append((w, m, v, s))
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_empty_mask_is_a_no_op():
    w = nn.Parameter(_weights(torch.float32))
    before = w.detach().clone()
    opt = SparseAdamW([w], masks=[torch.zeros(0, dtype=torch.int32)])
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_masks_keeps_surviving_moments_and_starts_new_entries_fresh(backend):
    numel = SHAPE[0] * SHAPE[1]
    w0, grads = _weights(torch.float32), _grads(5)
    old, new = _mask(numel, NNZ, 4), _mask(numel, NNZ, 5)
    survivors = old[torch.isin(old, new)]
    joiners = new[~torch.isin(new, old)]
    dropped = old[~torch.isin(old, new)]
    assert len(survivors) and len(joiners) and len(dropped)

    w = nn.Parameter(w0.clone())
    opt = SparseAdamW([w], masks=[old], lr=1e-2, weight_decay=0.1, backend=backend)
    for g in grads[:3]:
        w.grad = g.clone()
        opt.step()
    after_old = w.detach().clone()
    opt.update_masks([new])
    assert torch.equal(opt.state[w]["indices"], new)
    for g in grads[3:]:
        w.grad = g.clone()
        opt.step()

    flat = w.detach().view(-1)
    ref_survivors, _ = _reference(w0, survivors, grads, torch.float32, [1e-2] * 5, weight_decay=0.1)
    torch.testing.assert_close(flat[survivors.long()].double(), ref_survivors, rtol=1e-5, atol=1e-6)
    # joiners: a fresh AdamW from the weights they had when they joined
    ref_joiners, _ = _reference(after_old, joiners, grads[3:], torch.float32, [1e-2] * 2, weight_decay=0.1)
    torch.testing.assert_close(flat[joiners.long()].double(), ref_joiners, rtol=1e-5, atol=1e-6)
    assert torch.equal(flat[dropped.long()], after_old.view(-1)[dropped.long()])
    steps = opt.state[w]["step"]
    assert torch.equal(steps[torch.isin(new, survivors)], torch.full((len(survivors),), 5, dtype=torch.int32))
    assert torch.equal(steps[torch.isin(new, joiners)], torch.full((len(joiners),), 2, dtype=torch.int32))


def test_update_masks_reindexes_sparsified_modules():
    numel = SHAPE[0] * SHAPE[1]
    old, new = _mask(numel, NNZ, 6), _mask(numel, NNZ // 2, 7)
    module = StandInSparseLinear(_weights(torch.float32), old)
    opt = SparseAdamW([module.weight_values], lr=1e-2)
    module.weight_values.grad = torch.randn(NNZ)
    opt.step()
    opt.update_masks({0: new})
    assert torch.equal(module.weight_indices, new) and module.weight_values.grad is None
    assert opt.state[module.weight_values]["indices"] is module.weight_indices
    assert module.weight_values.shape == (NNZ // 2,)
    module.weight_values.grad = torch.randn(NNZ // 2)
    opt.step()
    assert torch.equal(module.weight_values.detach(), module.weight.view(-1)[new.long()])


def _save_load(opt_state):
    buffer = io.BytesIO()
    torch.save(opt_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compact", [False, True], ids=["dense_grad", "compact_values"])
def test_checkpoint_resume_is_bit_exact(dtype, compact):
    numel = SHAPE[0] * SHAPE[1]
    w0, grads = _weights(dtype), _grads(6, dtype)
    first, refreshed = _mask(numel, NNZ, 8), _mask(numel, NNZ, 9)

    def build(weight):
        if compact:
            module = StandInSparseLinear(weight, first)
            return module, module.weight_values, SparseAdamW([module.weight_values], lr=1e-2, weight_decay=0.1)
        p = nn.Parameter(weight.clone())
        return None, p, SparseAdamW([p], masks=[first], lr=1e-2, weight_decay=0.1)

    def run(module, param, opt, steps):
        for g in steps:
            idx = opt.state[param]["indices"].long()
            param.grad = g.view(-1)[idx].clone() if compact else g.clone()
            opt.step()

    def weight_of(module, param):
        return (module.weight if compact else param).detach()

    module, param, opt = build(w0)
    run(module, param, opt, grads[:2])
    opt.update_masks([refreshed])  # the checkpoint's masks differ from the constructor's
    run(module, param, opt, grads[2:3])
    saved_weight, saved = weight_of(module, param).clone(), _save_load(opt.state_dict())
    run(module, param, opt, grads[3:])

    module2, param2, opt2 = build(saved_weight)
    opt2.load_state_dict(saved)
    state2 = opt2.state[param2]
    assert state2["exp_avg"].dtype == torch.float32 and state2["indices"].dtype == torch.int32
    run(module2, param2, opt2, grads[3:])
    assert torch.equal(weight_of(module2, param2), weight_of(module, param))
    for key in ("indices", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[param2][key], opt.state[param][key]), key


def test_lr_scheduler_param_groups_and_named_masks():
    numel = SHAPE[0] * SHAPE[1]
    a, b = nn.Parameter(_weights(torch.float32, 10)), nn.Parameter(_weights(torch.float32, 11))
    ia, ib = _mask(numel, NNZ, 12), _mask(numel, NNZ, 13)
    opt = SparseAdamW([{"params": [("a", a)], "lr": 2e-2}, {"params": [("b", b)], "weight_decay": 0.2}],
                      masks={"a": ia, "b": ib}, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    w0a, w0b, grads = a.detach().clone(), b.detach().clone(), _grads(3)
    for g in grads:
        a.grad, b.grad = g.clone(), -g
        opt.step()
        sched.step()
    lrs = [1.0 / (k + 1) for k in range(3)]
    ref_a, _ = _reference(w0a, ia, grads, torch.float32, [2e-2 * f for f in lrs])
    ref_b, _ = _reference(w0b, ib, [-g for g in grads], torch.float32, [1e-2 * f for f in lrs], weight_decay=0.2)
    torch.testing.assert_close(a.detach().view(-1)[ia.long()].double(), ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().view(-1)[ib.long()].double(), ref_b, rtol=1e-5, atol=1e-6)


def test_tensor_lr_equals_float_lr():
    idx, grads = _mask(960, NNZ, 19), _grads(2)
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        p = nn.Parameter(_weights(torch.float32))
        opt = SparseAdamW([p], masks=[idx], lr=lr)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    assert torch.equal(*results)


def test_closure_and_grad_clipping_over_compact_values():
    numel = SHAPE[0] * SHAPE[1]
    idx = _mask(numel, NNZ, 14)
    module = StandInSparseLinear(_weights(torch.float32), idx)
    w0 = module.weight.detach().clone()
    x = torch.randn(5, SHAPE[1])
    opt = SparseAdamW([module.weight_values], lr=1e-2)

    def closure():
        opt.zero_grad()
        dense = module.weight.detach().view(-1).index_put((idx.long(),), module.weight_values)
        loss = (x @ dense.view(SHAPE).t()).pow(2).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([module.weight_values], max_norm=0.5)
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0
    assert module.weight_values.grad.norm() <= 0.5 + 1e-6
    clipped = module.weight_values.grad.clone().view(-1)
    dense_grad = torch.zeros(numel)
    dense_grad[idx.long()] = clipped
    ref, _ = _reference(w0, idx, [dense_grad], torch.float32, [1e-2])
    torch.testing.assert_close(module.weight.view(-1)[idx.long()].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainable_params_without_mask_step_as_dense_adamw(backend, dtype):
    matrix, vector = nn.Parameter(_weights(dtype)), nn.Parameter(_weights(dtype, seed=5)[0])
    w0, v0 = matrix.detach().clone(), vector.detach().clone()
    opt = SparseAdamW([matrix, vector], lr=1e-2, weight_decay=0.1, backend=backend)
    grads = _grads(3, dtype)
    for g in grads:
        matrix.grad, vector.grad = g.clone(), g[1].clone()
        opt.step()
    for p, start, steps in ((matrix, w0, grads), (vector, v0, [g[1] for g in grads])):
        every = torch.arange(p.numel(), dtype=torch.int32)
        ref, ref_state = _reference(start, every, steps, dtype, [1e-2] * 3, weight_decay=0.1)
        torch.testing.assert_close(p.detach().reshape(-1).double(), ref, **_tolerances(dtype))
        state = opt.state[p]
        assert torch.equal(state["indices"], every) and state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg_sq"].double(), ref_state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_frozen_params_without_mask_are_held_but_not_stepped():
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    w = nn.Parameter(_weights(torch.float32))
    opt = SparseAdamW([frozen, w], masks=[None, _mask(w.numel(), 10, 15)])
    w.grad = torch.ones_like(w)
    opt.step()
    frozen.grad = torch.ones(3)
    with pytest.raises(ValueError, match="params\\[0\\].*no mask"):
        opt.step()


# ------------------------------------------------------------------------------ bad input
def _param():
    return nn.Parameter(_weights(torch.float32))


@pytest.mark.parametrize("mask, error, message", [
    (torch.tensor([0, 5, 960], dtype=torch.int32), ValueError, "range"),
    (torch.tensor([3, 1, 2], dtype=torch.int32), ValueError, "sorted"),
    (torch.tensor([1, 2, 2], dtype=torch.int32), ValueError, "duplicate"),
    (torch.tensor([1, 2, 3], dtype=torch.int64), TypeError, "dtype"),
    (torch.tensor([[1, 2]], dtype=torch.int32), ValueError, "1-D"),
])
def test_invalid_masks_raise_naming_the_param(mask, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW([("layer.weight", _param())], masks={"layer.weight": mask})
    with pytest.raises(error, match="layer.weight"):
        SparseAdamW([("layer.weight", _param())], masks={"layer.weight": mask})


def test_mask_bookkeeping_errors():
    p, idx = _param(), _mask(960, 10, 16)
    with pytest.raises(ValueError, match="not in the optimizer"):
        SparseAdamW([("a", p)], masks={"a": idx, "b": idx})
    with pytest.raises(ValueError, match="named params"):
        SparseAdamW([p], masks={"a": idx})
    with pytest.raises(ValueError, match="aligned"):
        SparseAdamW([p], masks=[idx, idx])
    with pytest.raises(ValueError, match="params\\[0\\].*contiguous"):
        SparseAdamW([nn.Parameter(_weights(torch.float32).t())])
    with pytest.raises(ValueError, match="both"):
        SparseAdamW([{"params": [p], "masks": [idx]}], masks=[idx])
    module = StandInSparseLinear(_weights(torch.float32), idx)
    with pytest.raises(ValueError, match="must be None"):
        SparseAdamW([module.weight_values], masks=[idx])
    with pytest.raises(TypeError, match="masks"):
        SparseAdamW([p], masks=idx)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="fortran"), "backend"),
])
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseAdamW([_param()], masks=[_mask(960, 10, 17)], **kwargs)


def test_bad_gradients_and_state_dicts_raise_before_any_change():
    p = _param()
    opt = SparseAdamW([p], masks=[_mask(960, 10, 18)])
    p.grad = torch.ones_like(p).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    broken = {**saved, "state": {0: {**saved["state"][0], "exp_avg": saved["state"][0]["exp_avg"].double()}}}
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(broken)
    broken = {**saved, "state": {0: {**saved["state"][0], "indices": torch.tensor([5, 4], dtype=torch.int32)}}}
    with pytest.raises(ValueError, match="sorted"):
        opt.load_state_dict(broken)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="mask"):
        opt.update_masks([torch.tensor([2000], dtype=torch.int32)])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


# ------------------------------------------------------------------------------ CUDA
CUDA_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and _backend_reason(b, "cuda") is None]


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a GPU with the triton or cuda backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_gpu_backends_match_torch_reference(dtype, compact):
    torch.manual_seed(0)
    numel, nnz = 4096 * 64, 20000
    idx = torch.randperm(numel, device="cuda")[:nnz].sort().values.int()
    w0 = torch.randn(4096, 64, device="cuda").to(dtype)
    grad = torch.randn(4096, 64, device="cuda").to(dtype)
    g = grad.view(-1)[idx.long()].clone() if compact else grad
    results = {}
    for backend in ["torch"] + CUDA_BACKENDS:
        w = w0.clone()
        state = [torch.zeros(nnz, device="cuda"), torch.zeros(nnz, device="cuda"),
                 torch.zeros(nnz, dtype=torch.int32, device="cuda"), torch.zeros(nnz, dtype=dtype, device="cuda")]
        for _ in range(3):
            sparse_adamw_step(w, idx, g, *state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                              backend=backend)
        results[backend] = (w, *state)
    ref = results.pop("torch")
    for backend, got in results.items():
        torch.testing.assert_close(got[0].double(), ref[0].double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6,
                                   msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-7)
        assert torch.equal(got[3], got[0].view(-1)[idx.long()])
        assert torch.equal(got[0].view(-1)[~torch.isin(torch.arange(numel, device="cuda"), idx)],
                           w0.view(-1)[~torch.isin(torch.arange(numel, device="cuda"), idx)])
