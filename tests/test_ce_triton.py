"""Triton cross-entropy backend (sparseft.ops._ce_triton) against float64 references of the
same contract, run on CPU tensors under the Triton interpreter with small shapes."""

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton")

import sparseft
from sparseft.kernels import cross_entropy as kernels
from sparseft.ops import _ce_torch, _ce_triton

OPTIONS = {  # (label_smoothing, z_loss, softcap)
    "plain": (0.0, 0.0, 0.0),
    "smoothing": (0.1, 0.0, 0.0),
    "z_loss": (0.0, 1e-3, 0.0),
    "softcap": (0.0, 0.0, 5.0),
    "combined": (0.1, 1e-3, 5.0),
}
DTYPES = (torch.float32, torch.bfloat16)


def _scale(n, pattern, gen):
    scale = torch.rand(n, generator=gen) + 0.5
    if pattern == "partial":
        scale[::3] = 0.0
    elif pattern == "inactive":
        scale.zero_()
    return scale


def _labels(n, vocab, scale, gen):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return torch.where(scale == 0, torch.full_like(labels, -100), labels)  # inactive: anything


def _linear_inputs(n, d, vocab, dtype, with_bias, pattern="partial", seed=0, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * magnitude).to(dtype)
    weight = (torch.randn(vocab, d, generator=gen) / d ** 0.5).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    scale = _scale(n, pattern, gen)
    return hidden, weight, bias, _labels(n, vocab, scale, gen), scale


def _linear_reference(hidden, weight, bias, labels, scale, options, needs):
    """float64 results of the contract on the (already rounded) inputs."""
    safe_labels = torch.where(scale == 0, torch.zeros_like(labels), labels)
    return _ce_torch.linear_ce(hidden.double(), weight.double(), None if bias is None else bias.double(),
                               safe_labels, scale.double(), *options, *needs)


def _tolerance(dtype, reference):
    """Absolute tolerance: fp32 runs IEEE dots; bf16 rounds the gradient tile and the output."""
    size = reference.abs().max().item() if reference.numel() else 0.0
    return (1e-5 + 1e-5 * size) if dtype == torch.float32 else (1e-3 + 2e-2 * size)


def _assert_close(actual, reference, dtype, name):
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite values"
    err = (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0
    tol = _tolerance(dtype, reference)
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _check_linear(inputs, options, needs=(True, True, True), loss_atol=None):
    hidden, weight, bias, labels, scale = inputs
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    originals = [t.clone() for t in (hidden, weight, labels, scale)]
    result = _ce_triton.linear_ce(hidden, weight, bias, labels, scale, *options, *needs)
    reference = _linear_reference(hidden, weight, bias, labels, scale, options, needs)

    loss = result[0]
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss_tol = loss_atol if loss_atol is not None else 1e-4 * (1 + reference[0].abs().max().item())
    assert (loss.double() - reference[0]).abs().max().item() <= loss_tol
    assert (loss[scale == 0] == 0).all()
    for name, got, want, need, dtype in zip(("grad_hidden", "grad_weight", "grad_bias"), result[1:],
                                            reference[1:], needs, (hidden.dtype, weight.dtype, hidden.dtype)):
        if not need:
            assert got is None, f"{name} was not asked for"
            continue
        _assert_close(got, want, dtype, name)
    assert (result[1] is None) or (result[1][scale == 0] == 0).all()
    for before, after in zip(originals, (hidden, weight, labels, scale)):
        assert torch.equal(before, after), "an input was modified"


# ----------------------------------------------------------------------------- linear_ce

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (17, 64, 130))
@pytest.mark.parametrize("d", (16, 40))
@pytest.mark.parametrize("n", (1, 7, 33))
def test_linear_shapes(n, d, vocab, dtype):
    _check_linear(_linear_inputs(n, d, vocab, dtype, with_bias=False, seed=n * d + vocab), OPTIONS["plain"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("with_bias", (False, True), ids=("no_bias", "bias"))
def test_linear_options(option, with_bias, dtype):
    _check_linear(_linear_inputs(33, 40, 130, dtype, with_bias), OPTIONS[option])


@pytest.mark.parametrize("pattern", ("active", "partial", "inactive"))
def test_linear_masked_rows(pattern):
    _check_linear(_linear_inputs(33, 16, 64, torch.float32, True, pattern=pattern), OPTIONS["combined"])


@pytest.mark.parametrize("needs", ((True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False)), ids=("hidden", "weight", "bias", "none"))
def test_linear_some_grads(needs):
    _check_linear(_linear_inputs(7, 40, 64, torch.float32, True), OPTIONS["combined"], needs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_large_logits(dtype):
    # Hidden scaled up so logits reach about +-1e4: no overflow, loss still exact in fp32.
    inputs = _linear_inputs(33, 40, 130, dtype, True, magnitude=3000.0)
    hidden, weight = inputs[:2]
    assert (hidden.double() @ weight.double().t()).abs().max() > 5e3
    loss_atol = 1e-5 * 2e4 if dtype == torch.float32 else 2.0  # bf16: tile sums of 40 products of 1e3
    _check_linear(inputs, OPTIONS["smoothing"], loss_atol=loss_atol)


def test_linear_explicit_blocks():
    hidden, weight, bias, labels, scale = _linear_inputs(33, 40, 130, torch.float32, True)
    options = OPTIONS["combined"]
    loss, gh, gw, gb = kernels.linear_ce(hidden, weight, bias, labels, scale, *options, True, True, True,
                                         block_m=32, block_v=16, block_k=64)
    reference = _linear_reference(hidden, weight, bias, labels, scale, options, (True, True, True))
    assert (loss.double() - reference[0]).abs().max() < 1e-4
    for got, want, name in zip((gh, gw, gb), reference[1:], ("grad_hidden", "grad_weight", "grad_bias")):
        _assert_close(got, want, torch.float32, name)
    with pytest.raises(ValueError, match="block_m"):
        kernels.linear_ce(hidden, weight, bias, labels, scale, *options, True, True, True, block_m=32)


def test_linear_empty():
    hidden, weight, bias, labels, scale = _linear_inputs(0, 16, 17, torch.float32, True)
    loss, gh, gw, gb = _ce_triton.linear_ce(hidden, weight, bias, labels, scale, *OPTIONS["plain"], True, True, True)
    assert loss.shape == (0,) and gh.shape == (0, 16)
    assert not gw.any() and not gb.any()


# ----------------------------------------------------------------------------- ce_forward / ce_backward

def _logits_inputs(n, vocab, dtype, pattern="partial", seed=0, magnitude=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * magnitude).to(dtype)
    scale = _scale(n, pattern, gen)
    return logits, _labels(n, vocab, scale, gen), scale


def _check_rowwise(logits, labels, scale, options, loss_atol=None):
    original = logits.clone()
    loss, lse = _ce_triton.ce_forward(logits, labels, scale, *options)
    grad = _ce_triton.ce_backward(logits, lse, labels, scale, *options)
    assert torch.equal(logits, original), "the caller's logits were modified"

    safe_labels = torch.where(scale == 0, torch.zeros_like(labels), labels)
    ref_loss, ref_lse = _ce_torch.ce_forward(logits.double(), safe_labels, scale.double(), *options)
    ref_grad = _ce_torch.ce_backward(logits.double(), ref_lse, safe_labels, scale.double(), *options)
    tol = loss_atol if loss_atol is not None else 1e-5 * (1 + ref_loss.abs().max().item())
    assert loss.dtype == lse.dtype == torch.float32
    assert (loss.double() - ref_loss).abs().max() <= tol
    assert (lse.double() - ref_lse).abs().max() <= tol
    assert (loss[scale == 0] == 0).all() and (lse[scale == 0] == 0).all()
    _assert_close(grad, ref_grad, logits.dtype, "grad")
    assert (grad[scale == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (17, 64, 130))
@pytest.mark.parametrize("n", (1, 7, 33))
def test_rowwise_shapes(n, vocab, dtype):
    _check_rowwise(*_logits_inputs(n, vocab, dtype, seed=n + vocab), OPTIONS["plain"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
def test_rowwise_options(option, dtype):
    _check_rowwise(*_logits_inputs(7, 130, dtype), OPTIONS[option])


@pytest.mark.parametrize("pattern", ("active", "inactive"))
def test_rowwise_masked_rows(pattern):
    _check_rowwise(*_logits_inputs(7, 64, torch.float32, pattern=pattern), OPTIONS["combined"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowwise_large_logits(dtype):
    logits, labels, scale = _logits_inputs(7, 130, dtype, magnitude=1e4)
    _check_rowwise(logits, labels, scale, OPTIONS["combined"][:2] + (0.0,), loss_atol=0.5)


def test_rowwise_float16_and_explicit_block():
    logits, labels, scale = _logits_inputs(7, 130, torch.float16)
    loss, lse = kernels.ce_forward(logits, labels, scale, 0.1, 1e-3, 5.0, block_v=64)
    grad = kernels.ce_backward(logits, lse, labels, scale, 0.1, 1e-3, 5.0, block_v=64)
    safe_labels = torch.where(scale == 0, torch.zeros_like(labels), labels)
    ref_loss, ref_lse = _ce_torch.ce_forward(logits.double(), safe_labels, scale.double(), 0.1, 1e-3, 5.0)
    ref_grad = _ce_torch.ce_backward(logits.double(), ref_lse, safe_labels, scale.double(), 0.1, 1e-3, 5.0)
    assert (loss.double() - ref_loss).abs().max() < 1e-4
    assert grad.dtype == torch.float16 and (grad.double() - ref_grad).abs().max() < 1e-3


# ----------------------------------------------------------------------------- public API on triton

@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_public_api_with_triton_backend(reduction):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    labels[0, :2] = -100
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction=reduction)
    out = sparseft.linear_cross_entropy(hidden, weight, labels, backend="triton", **kwargs)
    ref = sparseft.linear_cross_entropy(hidden.double(), weight.double(), labels, backend="torch", **kwargs)
    out.sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.sum().backward()
    assert torch.allclose(out.double(), ref, atol=1e-5)
    for got, want in zip(grads, (hidden.grad, weight.grad)):
        assert torch.allclose(got, want, atol=1e-5)

    logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
    out = sparseft.cross_entropy(logits, labels, backend="triton", **kwargs)
    out.sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    sparseft.cross_entropy(ref_logits, labels, backend="torch", **kwargs).sum().backward()
    assert torch.allclose(logits.grad.double(), ref_logits.grad, atol=1e-6)


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparseft.kernels import cross_entropy as kernels

dtype = sys.argv[1]
types = dict(N="i32", V="i32", D="i32", softcap="fp32", label_smoothing="fp32", z_loss="fp32",
             labels_ptr="*i64", order_ptr="*i64", count_ptr="*i32")
blocks = dict(BM=128, BV=128, BK=64, GROUP_M=8, HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False,
              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
for fn, flags in ((kernels._linear_lse_kernel, dict(HAS_SMOOTHING=True)),
                  (kernels._linear_grad_kernel, dict(NEED_DX=True, NEED_DW=True, NEED_DB=True))):
    constexprs = {**blocks, **flags}
    signature = {name: "constexpr" if name in constexprs else
                 types.get(name, "*" + dtype if name in ("x_ptr", "w_ptr", "b_ptr") else "*fp32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=2))
    assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
def test_linear_kernels_compile_for_hopper(dtype):
    """The interpreter never runs Triton's compiler: build the fused kernels into sm_90 cubins
    (ptxas ships with triton; no GPU needed) in a process without TRITON_INTERPRET, so a kernel
    the GPU cannot build fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER, dtype], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
