"""The CUDA backend of the masked-loss cross-entropy (sparseft/ops/_ce_native.py on CUDA tensors) against the
plain-PyTorch specification (_ce_torch) computed in float64 from the same inputs.

Needs a GPU and sparseft._C built with its CUDA kernels; skipped otherwise. The vocabulary
sizes cover each row-group width of the kernels (a warp, 256 and 1024 threads per row) and
a size whose rows are not 16-byte aligned."""

import pytest
import torch

import sparseft
from sparseft import _backends
from sparseft.ops import _ce_torch

_available, _reason = (_backends.availability("cuda", "cuda") if torch.cuda.is_available()
                       else (False, "no CUDA device"))
pytestmark = pytest.mark.skipif(not _available, reason=f"cuda backend unavailable: {_reason}")

if _available:
    from sparseft.ops import _ce_native as _ce_cuda

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIONS = ((0.0, 0.0, 0.0), (0.1, 1e-3, 30.0))  # (label_smoothing, z_loss, softcap)
# Worst-case error of one rounding to the dtype, relative to the largest reference value.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _rows(n, vocab, device, generator):
    """Labels, and a scale with inactive rows (0) and uneven weights."""
    labels = torch.randint(0, vocab, (n,), generator=generator).to(device)
    scale = torch.rand(n, generator=generator) + 0.5
    scale[torch.rand(n, generator=generator) < 0.3] = 0.0
    scale[0] = 0.0
    return labels, scale.to(device)


def _assert_close(actual, expected, dtype, what):
    expected = expected.double()
    atol = REL_TOL[dtype] * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=REL_TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", (100, 1001, 5000, 40000))
@pytest.mark.parametrize("options", OPTIONS)
def test_forward_and_backward_match_reference(dtype, vocab, options):
    gen = torch.Generator().manual_seed(vocab)
    n = 48
    logits = (torch.randn(n, vocab, generator=gen) * 4).to("cuda", dtype)
    labels, scale = _rows(n, vocab, "cuda", gen)
    before = logits.clone()

    loss, lse = _ce_cuda.ce_forward(logits, labels, scale, *options)
    ref_loss, ref_lse = _ce_torch.ce_forward(logits.double(), labels, scale.double(), *options)
    _assert_close(loss, ref_loss, torch.float32, "loss")
    _assert_close(lse, ref_lse, torch.float32, "lse")
    assert loss.dtype == lse.dtype == torch.float32
    assert torch.all(loss[scale == 0] == 0) and torch.all(lse[scale == 0] == 0)

    grad = _ce_cuda.ce_backward(logits, lse, labels, scale, *options)
    ref_grad = _ce_torch.ce_backward(logits.double(), ref_lse, labels, scale.double(), *options)
    assert grad.dtype == dtype and grad.shape == logits.shape
    _assert_close(grad, ref_grad, dtype, "grad")
    assert torch.all(grad[scale == 0] == 0)
    assert torch.equal(logits, before), "the caller's logits were modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", (1, 3))
def test_strided_and_misaligned_rows(dtype, offset):
    """Rows that start off a 16-byte boundary, with a row stride other than V."""
    gen = torch.Generator().manual_seed(offset)
    n, vocab = 32, 3001
    wide = (torch.randn(n, vocab + 7, generator=gen) * 3).to("cuda", dtype)
    logits = wide[:, offset:offset + vocab]
    labels, scale = _rows(n, vocab, "cuda", gen)
    options = OPTIONS[1]

    loss, lse = _ce_cuda.ce_forward(logits, labels, scale, *options)
    ref_loss, ref_lse = _ce_torch.ce_forward(logits.double(), labels, scale.double(), *options)
    _assert_close(loss, ref_loss, torch.float32, "loss")
    grad = _ce_cuda.ce_backward(logits, lse, labels, scale, *options)
    ref_grad = _ce_torch.ce_backward(logits.double(), ref_lse, labels, scale.double(), *options)
    _assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", (100, 3001, 20000))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("options", OPTIONS)
def test_linear_ce_matches_reference(dtype, vocab, with_bias, options, monkeypatch):
    # A small chunk budget makes several chunks out of the active rows.
    monkeypatch.setenv("SPARSEFT_CHUNK_BYTES", str(16 * 4 * vocab))
    gen = torch.Generator().manual_seed(vocab + with_bias)
    n, dim = 80, 72
    hidden = torch.randn(n, dim, generator=gen).to("cuda", dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5).to("cuda", dtype)
    bias = (torch.randn(vocab, generator=gen) * 0.5).to("cuda", dtype) if with_bias else None
    labels, scale = _rows(n, vocab, "cuda", gen)
    inputs = [t.clone() for t in (hidden, weight) + ((bias,) if with_bias else ())]

    loss, gh, gw, gb = _ce_cuda.linear_ce(hidden, weight, bias, labels, scale, *options,
                                           True, True, with_bias)
    ref = _ce_torch.linear_ce(hidden.double(), weight.double(), None if bias is None else bias.double(),
                              labels, scale.double(), *options, True, True, with_bias)
    # Logits come from a float32-accumulated GEMM in every dtype, so the loss is tight.
    _assert_close(loss, ref[0], torch.float32 if dtype == torch.float32 else torch.float16, "loss")
    assert torch.all(loss[scale == 0] == 0)
    _assert_close(gh, ref[1], dtype, "grad_hidden")
    assert torch.all(gh[scale == 0] == 0)
    _assert_close(gw, ref[2], dtype, "grad_weight")
    assert gh.dtype == gw.dtype == dtype
    if with_bias:
        _assert_close(gb, ref[3], dtype, "grad_bias")
        assert gb.dtype == dtype
    else:
        assert gb is None
    for before, after in zip(inputs, (hidden, weight, bias)):
        assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("needs", ((False, False, False), (True, False, False), (False, True, True)))
def test_linear_ce_returns_only_requested_grads(needs):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 32, generator=gen).cuda()
    weight = torch.randn(50, 32, generator=gen).cuda()
    bias = torch.randn(50, generator=gen).cuda()
    labels, scale = _rows(16, 50, "cuda", gen)
    loss, *grads = _ce_cuda.linear_ce(hidden, weight, bias, labels, scale, 0.0, 0.0, 0.0, *needs)
    ref_loss = _ce_torch.linear_ce(hidden.double(), weight.double(), bias.double(), labels, scale.double(),
                                   0.0, 0.0, 0.0, False, False, False)[0]
    _assert_close(loss, ref_loss, torch.float32, "loss")
    assert [g is not None for g in grads] == list(needs)


def test_all_rows_masked_gives_zeros():
    hidden = torch.randn(8, 16, device="cuda")
    weight = torch.randn(40, 16, device="cuda")
    labels = torch.zeros(8, dtype=torch.long, device="cuda")
    scale = torch.zeros(8, device="cuda")
    loss, gh, gw, _ = _ce_cuda.linear_ce(hidden, weight, None, labels, scale, 0.0, 0.0, 0.0, True, True, False)
    assert not loss.any() and not gh.any() and not gw.any()
    logits = torch.randn(8, 40, device="cuda")
    loss, lse = _ce_cuda.ce_forward(logits, labels, scale, 0.0, 0.0, 0.0)
    assert not loss.any() and not lse.any()
    assert not _ce_cuda.ce_backward(logits, lse, labels, scale, 0.0, 0.0, 0.0).any()


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_public_api_on_cuda_backend_matches_torch_backend(reduction):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 12, 32, generator=gen).cuda().requires_grad_()
    weight = torch.randn(300, 32, generator=gen).cuda().requires_grad_()
    labels = torch.randint(0, 300, (2, 12), generator=gen).cuda()
    labels[0, :4] = -100
    results = []
    for backend in ("cuda", "torch"):
        loss = sparseft.linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, reduction=reduction,
                                             backend=backend)
        grads = torch.autograd.grad(loss.sum(), (hidden, weight))
        logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
        plain = sparseft.cross_entropy(logits, labels, z_loss=1e-3, reduction=reduction, backend=backend)
        results.append((loss, *grads, plain, *torch.autograd.grad(plain.sum(), logits)))
    for got, want in zip(*results):
        _assert_close(got, want, torch.float32, "public api")
