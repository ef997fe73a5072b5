"""Kernels of the low-rank Adam step (kernels/lowrank_adam.py, csrc/cuda/lowrank_adam.cu) against
float64 references written out here: the Triton kernels on CPU tensors under the interpreter,
and on a GPU beside the CUDA kernel of sparseft_C::lowrank_adam_direction."""

import os

import pytest
import torch

pytest.importorskip("triton")

from sparseft import _backends
from sparseft.kernels import lowrank_adam as kernels

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _direction_inputs(numel, step, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen)
    exp_avg = torch.randn(numel, generator=gen) * 0.1
    exp_avg_sq = torch.rand(numel, generator=gen) * 0.01
    exp_avg_sq[::7] = 0.0  # a first step: the direction's denominator is eps alone
    c1, c2 = 1 / (1 - BETA1 ** step), 1 / (1 - BETA2 ** step) ** 0.5
    return [t.to(device) for t in (grad, exp_avg, exp_avg_sq)], dict(beta1=BETA1, beta2=BETA2, c1=c1, c2=c2, eps=EPS)


def _direction_reference(grad, exp_avg, exp_avg_sq, *, beta1, beta2, c1, c2, eps):
    g, m, v = (t.double() for t in (grad, exp_avg, exp_avg_sq))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return m, v, (m * c1) / (v.sqrt() * c2 + eps)


def _assert_float32_close(got, expected, what):
    # A few float32 roundings apart; moments cancel near zero, hence the absolute part.
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-7 * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("numel", (1, 1000, 2 * kernels.DIRECTION_BLOCK + 3))
@pytest.mark.parametrize("step", (1, 50))
def test_adam_direction_matches_float64(numel, step):
    (grad, exp_avg, exp_avg_sq), hyper = _direction_inputs(numel, step)
    m, v, direction = _direction_reference(grad, exp_avg, exp_avg_sq, **hyper)
    out = torch.full_like(grad, float("nan"))
    kernels.adam_direction(grad, exp_avg, exp_avg_sq, out, **hyper)
    _assert_float32_close(exp_avg, m, "exp_avg")
    _assert_float32_close(exp_avg_sq, v, "exp_avg_sq")
    _assert_float32_close(out, direction, "direction")


def _update_inputs(m, n, rank, dtype, side, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen).to(dtype)
    if side == "right":
        direction, projector = torch.randn(m, rank, generator=gen), torch.randn(n, rank, generator=gen)
    else:
        projector, direction = torch.randn(m, rank, generator=gen), torch.randn(rank, n, generator=gen)
    return weight.to(device), direction.to(device), projector.to(device)


def _update_reference(weight, direction, projector, side, decay, alpha):
    delta = direction.double() @ projector.double().T if side == "right" else projector.double() @ direction.double()
    return decay * weight.double() + alpha * delta


def _ulp(x, dtype):
    """Spacing of dtype's numbers at each float64 value, subnormals included."""
    info = torch.finfo(dtype)
    return torch.ldexp(torch.full_like(x, info.eps / 2), torch.frexp(x)[1]).clamp_min(info.tiny * info.eps)


def _round_once(x, dtype):
    """float64 -> dtype with a single round-to-nearest-even (torch's .to() goes through float32)."""
    ulp = _ulp(x, dtype)
    return (torch.round(x / ulp) * ulp).to(dtype)


def _assert_rounded_once(got, exact, what):
    """got equals exact rounded once to got's dtype but for rare near-ties that the float32
    math rounds the other way, which stay within one unit in the last place."""
    expected = _round_once(exact, got.dtype)
    same = got == expected
    assert same.double().mean() >= 0.999, f"{what}: {int((~same).sum())} of {got.numel()} differ"
    assert ((got.double() - expected.double()).abs() <= _ulp(exact, got.dtype)).all(), f"{what}: more than 1 ulp off"


# Shapes off the interpreter's 16-blocks; rank 21 takes two steps of the rank loop.
SHAPES = ((37, 29, 5), (18, 40, 21))


@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_update_matches_float64(side, dtype, shape):
    m, n, rank = shape
    weight, direction, projector = _update_inputs(m, n, rank, dtype, side)
    decay, alpha = 0.99, -0.3
    exact = _update_reference(weight, direction, projector, side, decay, alpha)
    # W inside a larger buffer: stores past its end would show in the guard.
    buffer = torch.full((m * n + 64,), 7.0, dtype=dtype)
    buffer[: m * n] = weight.view(-1)
    inplace = buffer[: m * n].view(m, n)
    kernels.lowrank_update(inplace, direction, projector, side=side, decay=decay, alpha=alpha)
    assert torch.equal(buffer[m * n:], torch.full((64,), 7.0, dtype=dtype))
    if dtype == torch.float32:
        bound = 4 * 2.0 ** -24 * (decay * weight.double().abs() +
                                  abs(alpha) * _update_reference(weight.abs(), direction.abs(), projector.abs(),
                                                                 side, 0.0, rank + 1.0))
        assert ((inplace.double() - exact).abs() <= bound).all()
    else:
        _assert_rounded_once(inplace, exact, f"{side} {dtype}")


def test_lowrank_update_takes_strided_factors():
    weight, direction, projector = _update_inputs(20, 17, 3, torch.float32, "right")
    expected = weight.clone()
    kernels.lowrank_update(expected, direction, projector, side="right", decay=0.5, alpha=2.0)
    kernels.lowrank_update(weight, direction.T.contiguous().T, projector.T.contiguous().T, side="right", decay=0.5,
                           alpha=2.0)
    assert torch.equal(weight, expected)


def test_lowrank_update_rejects_unknown_side_and_strided_weight():
    weight, direction, projector = _update_inputs(4, 4, 2, torch.float32, "right")
    with pytest.raises(ValueError, match="side"):
        kernels.lowrank_update(weight, direction, projector, side="both", decay=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        kernels.lowrank_update(weight.T, direction, projector, side="right", decay=1.0, alpha=1.0)


# ----------------------------------------------------------------------------- on a GPU

_cuda_ok, _cuda_reason = (_backends.availability("cuda", "cuda") if torch.cuda.is_available()
                          else (False, "no CUDA device"))
_triton_ok = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(not _cuda_ok, reason=f"cuda backend unavailable: {_cuda_reason}")
@pytest.mark.parametrize("numel, offset", [(1 << 20, 0), (1000003, 0), (4099, 1)])  # offset 1: not float4-aligned
def test_cuda_adam_direction_matches_triton_and_float64(numel, offset):
    (grad, exp_avg, exp_avg_sq), hyper = _direction_inputs(numel + offset, 10, "cuda")
    grad, exp_avg, exp_avg_sq = (t[offset:] for t in (grad, exp_avg, exp_avg_sq))
    m, v, direction = _direction_reference(grad, exp_avg, exp_avg_sq, **hyper)
    state = exp_avg.clone(), exp_avg_sq.clone()
    out = torch.full_like(grad, float("nan"))
    torch.ops.sparseft_C.lowrank_adam_direction(grad, *state, out, *hyper.values())
    for got, expected, what in zip((*state, out), (m, v, direction), ("exp_avg", "exp_avg_sq", "direction")):
        _assert_float32_close(got, expected, what)
    if _triton_ok:
        triton_state, triton_out = (exp_avg.clone(), exp_avg_sq.clone()), torch.empty_like(grad)
        kernels.adam_direction(grad, *triton_state, triton_out, **hyper)
        for got, expected, what in zip((*triton_state, triton_out), (*state, out), ("exp_avg", "exp_avg_sq", "out")):
            _assert_float32_close(got, expected.double(), f"triton beside cuda: {what}")


@pytest.mark.skipif(not _triton_ok, reason="needs a GPU, Triton compiled (TRITON_INTERPRET unset)")
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_triton_lowrank_update_rounds_once(side, dtype):
    weight, direction, projector = _update_inputs(1000, 777, 64, dtype, side, "cuda")
    exact = _update_reference(weight, direction, projector, side, 0.999, -1e-2)
    kernels.lowrank_update(weight, direction, projector, side=side, decay=0.999, alpha=-1e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(weight.double(), exact, rtol=1e-6, atol=1e-6)
    else:
        _assert_rounded_once(weight, exact, f"{side} {dtype}")
