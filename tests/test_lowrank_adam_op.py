"""The fused ops of LowRankAdamW (sparseft.ops.lowrank_adam): every available backend against a
float64 reference, argument checks, and dispatch when a backend's kernel is missing."""

import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

from sparseft import _backends, _ext
from sparseft.ops import lowrank_adam
from sparseft.ops.lowrank_adam import bias_corrections, lowrank_adam_direction, lowrank_weight_update


def _kernel_reason(name, op):
    ok, reason = _backends.availability(name, "cpu")
    if ok:
        ok, reason = lowrank_adam._kernel_status(name, op)
    return None if ok else reason


def _backend_params(op):
    params = []
    for name in ("torch", "cpu", "triton"):
        reason = _kernel_reason(name, op)
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return params


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def _direction_reference(grad, exp_avg, exp_avg_sq, beta1, beta2, c1, c2, eps):
    g, m, v = (t.double() for t in (grad, exp_avg, exp_avg_sq))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return m, v, (m * c1) / (v.sqrt() * c2 + eps)


# (shape) small, a ragged vector tail, and more elements than one parallel task takes
@pytest.mark.parametrize("shape", [(8, 48), (37, 5), (96, 512)])
@pytest.mark.parametrize("backend", _backend_params("direction"))
def test_direction_matches_float64_reference(backend, shape):
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g)
    exp_avg = torch.randn(shape, generator=g) * 0.1
    exp_avg_sq = torch.rand(shape, generator=g) * 0.01
    exp_avg_sq.view(-1)[:3] = 0  # √v̂ = 0 where eps alone keeps the division finite
    grad.view(-1)[:3] = 0
    c1, c2 = bias_corrections(HYPER["beta1"], HYPER["beta2"], 3)
    m_ref, v_ref, out_ref = _direction_reference(grad, exp_avg, exp_avg_sq, c1=c1, c2=c2, **HYPER)
    out = torch.full(shape, float("nan"))
    lowrank_adam_direction(grad, exp_avg, exp_avg_sq, out, c1=c1, c2=c2, backend=backend, **HYPER)
    torch.testing.assert_close(exp_avg, m_ref.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, v_ref.float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _backend_params("direction"))
def test_backends_agree_with_the_torch_reference(backend):
    shape = (16, 24)
    grad, m, v = torch.randn(shape), torch.randn(shape), torch.rand(shape)
    outs = []
    for name in ("torch", backend):
        state = [m.clone(), v.clone(), torch.empty(shape)]
        lowrank_adam_direction(grad, *state, c1=1.5, c2=2.0, backend=name, **HYPER)
        outs.append(state)
    for ours, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", _backend_params("direction"))
def test_direction_may_overwrite_the_gradient(backend):
    shape = (33, 40)  # not a multiple of any vector width
    grad, m, v = torch.randn(shape), torch.randn(shape), torch.rand(shape)
    apart = [m.clone(), v.clone(), torch.empty(shape)]
    lowrank_adam_direction(grad, *apart, c1=1.5, c2=2.0, backend=backend, **HYPER)
    in_place = grad.clone()
    moments = [m.clone(), v.clone()]
    lowrank_adam_direction(in_place, *moments, in_place, c1=1.5, c2=2.0, backend=backend, **HYPER)
    for ours, ref in zip([*moments, in_place], apart):
        assert torch.equal(ours, ref)


def test_galore_eps_placement_is_eps_times_c2():
    """galore-torch: lr·√(1−β2^t)/(1−β1^t) · m/(√v + ε) equals ours with eps = ε·c2."""
    grad, m, v = torch.randn(10, 4), torch.randn(10, 4), torch.rand(10, 4)
    beta1, beta2, eps, step = 0.9, 0.999, 1e-3, 4
    m_next = beta1 * m.double() + (1 - beta1) * grad.double()
    v_next = beta2 * v.double() + (1 - beta2) * grad.double() ** 2
    galore = math.sqrt(1 - beta2**step) / (1 - beta1**step) * m_next / (v_next.sqrt() + eps)
    c1, c2 = bias_corrections(beta1, beta2, step)
    out = torch.empty(10, 4)
    lowrank_adam_direction(grad, m, v, out, beta1=beta1, beta2=beta2, c1=c1, c2=c2, eps=eps * c2, backend="torch")
    torch.testing.assert_close(out, galore.float(), rtol=1e-5, atol=1e-7)


def test_bias_corrections_keep_precision_at_the_first_step():
    c1, c2 = bias_corrections(0.9, 0.999, 1)
    assert c1 == pytest.approx(10.0, rel=1e-14)
    assert c2 == pytest.approx(1 / math.sqrt(0.001), rel=1e-12)
    assert bias_corrections(0.0, 0.0, 5) == (1.0, 1.0)


def _update_reference(weight, direction, projector, side, lr, scale, wd):
    w, n, p = weight.double(), direction.double(), projector.double()
    delta = n @ p.T if side == "right" else p @ n
    return w * (1 - lr * wd) - lr * scale * delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("backend", _backend_params("update"))
def test_weight_update_matches_float64_reference_with_one_rounding(backend, side, dtype):
    m, n, r = 40, 24, 6
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(m, n, generator=g).to(dtype)
    projector = torch.linalg.qr(torch.randn(n if side == "right" else m, r, generator=g)).Q
    direction = torch.randn((m, r) if side == "right" else (r, n), generator=g)
    hyper = dict(lr=0.1, scale=0.25, weight_decay=0.3)
    ref = _update_reference(weight, direction, projector, side, hyper["lr"], hyper["scale"], hyper["weight_decay"])
    lowrank_weight_update(weight, direction, projector, side=side, backend=backend, **hyper)
    if dtype == torch.float32:
        torch.testing.assert_close(weight, ref.float(), rtol=1e-6, atol=1e-6)
    else:  # one rounding of the float32 result: at most one unit in the last place from the exact one
        ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((weight.double() - ref).abs() <= ulp).all()


@pytest.mark.parametrize("bad, error, message", [
    (dict(grad=torch.zeros(4, 4, dtype=torch.float64)), TypeError, "grad"),
    (dict(exp_avg=torch.zeros(4, 5)), ValueError, "exp_avg"),
    (dict(exp_avg_sq=torch.zeros(4, 8)[:, ::2]), TypeError, "exp_avg_sq"),
    (dict(out=torch.zeros(16)), ValueError, "out"),
    (dict(beta1=1.0), ValueError, "beta1"),
    (dict(c2=0.5), ValueError, "c2"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_direction_argument_checks(bad, error, message):
    args = dict(grad=torch.zeros(4, 4), exp_avg=torch.zeros(4, 4), exp_avg_sq=torch.zeros(4, 4), out=torch.zeros(4, 4),
                beta1=0.9, beta2=0.999, c1=1.0, c2=1.0, eps=1e-8)
    args.update(bad)
    tensors = [args.pop(k) for k in ("grad", "exp_avg", "exp_avg_sq", "out")]
    with pytest.raises(error, match=message):
        lowrank_adam_direction(*tensors, **args)


@pytest.mark.parametrize("bad, error, message", [
    (dict(side="both"), ValueError, "side"),
    (dict(weight=torch.zeros(8, 6, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.zeros(8)), ValueError, "weight"),
    (dict(projector=torch.zeros(8, 2)), ValueError, "projector"),
    (dict(direction=torch.zeros(8, 3)), ValueError, "direction"),
    (dict(direction=torch.zeros(8, 2, dtype=torch.bfloat16)), TypeError, "direction"),
])
def test_weight_update_argument_checks(bad, error, message):
    args = dict(weight=torch.zeros(8, 6), direction=torch.zeros(8, 2), projector=torch.zeros(6, 2), side="right")
    args.update(bad)
    weight, direction, projector = (args.pop(k) for k in ("weight", "direction", "projector"))
    with pytest.raises(error, match=message):
        lowrank_weight_update(weight, direction, projector, lr=0.1, scale=1.0, weight_decay=0.0, **args)


def test_missing_triton_kernels_fall_back_quietly_and_raise_when_requested(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparseft.kernels.lowrank_adam", None)  # its import now fails
    monkeypatch.delenv("SPARSEFT_BACKEND", raising=False)
    # the automatic choice for CUDA tensors starts with triton; it needs no CUDA device to decide
    monkeypatch.setattr(_backends, "_triton_importable", lambda: (True, ""))
    assert lowrank_adam._resolve(torch.device("cuda"), None, "update") in ("cuda", "torch")
    with pytest.raises(RuntimeError, match="lowrank_adam does not import"):
        lowrank_adam._resolve(torch.device("cpu"), "triton", "update")
    monkeypatch.setenv("SPARSEFT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="lowrank_adam does not import"):
        lowrank_adam._resolve(torch.device("cpu"), None, "direction")


def test_an_extension_without_the_op_is_unavailable(monkeypatch):
    class Namespace:  # a sparseft._C built before lowrank_adam_direction existed
        pass

    monkeypatch.delenv("SPARSEFT_BACKEND", raising=False)
    monkeypatch.setattr(_ext, "cpu_available", lambda: (True, ""))
    monkeypatch.setattr(torch.ops, "sparseft_C", Namespace(), raising=False)
    monkeypatch.setattr(_ext, "load", lambda: (None, ""))
    assert lowrank_adam._resolve(torch.device("cpu"), None, "direction") == "torch"
    with pytest.raises(RuntimeError, match="predates lowrank_adam_direction"):
        lowrank_adam._resolve(torch.device("cpu"), "cpu", "direction")
