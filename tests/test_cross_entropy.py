"""sparseft.linear_cross_entropy / sparseft.cross_entropy: every available backend against a
float64 reference, the peers, torch.compile and argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

import sparseft
from tests.conftest import available_backends

BACKENDS = available_backends("cpu")
# The Triton interpreter is slow: it gets the small shapes only.
SMALL = {"triton"}


def reference(hidden, weight, labels, bias=None, loss_weights=None, ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, softcap=None, reduction="mean", num_items_in_batch=None, shift=False):
    """Float64 loss of the contract, written densely; gradients come from autograd."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return reference_from_logits(logits, labels, loss_weights, ignore_index, label_smoothing, z_loss, softcap,
                                 reduction, num_items_in_batch, shift)


def reference_from_logits(logits, labels, loss_weights=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                          softcap=None, reduction="mean", num_items_in_batch=None, shift=False):
    logits = logits.double()
    weights = torch.ones(labels.shape, dtype=torch.float64) if loss_weights is None else loss_weights.double()
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
        weights = torch.cat([weights[..., 1:], torch.zeros_like(weights[..., :1])], dim=-1)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    active = labels != ignore_index
    safe = torch.where(active, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[..., None]
    nll = -logp.gather(-1, safe[..., None]).squeeze(-1)
    per_token = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1) + z_loss * lse ** 2
    weights = weights * active
    per_token = per_token * weights
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    denom = weights.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=torch.float64)
    return total / denom if denom > 0 else total * 0


def make_inputs(n, dim, vocab, dtype=torch.float32, bias=False, ignore_frac=0.0, logit_scale=1.0):
    hidden = (torch.randn(n, dim) * logit_scale / math.sqrt(dim)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    if ignore_frac:
        labels[torch.rand(n) < ignore_frac] = -100
    b = (torch.randn(vocab) * 0.1).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, b


def tolerances(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.bfloat16, torch.float16) else {"rtol": 1e-4, "atol": 1e-5}


def grads_of(loss, tensors):
    grad_out = torch.randn_like(loss) if loss.dim() else None
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], grad_out, allow_unused=True), grad_out


def check_against_reference(backend, hidden, weight, labels, bias=None, tol=None, **kw):
    ours = sparseft.linear_cross_entropy(hidden, weight, labels, bias, backend=backend, **kw)
    assert ours.dtype == torch.float32
    tensors = [hidden, weight, bias]
    ours_grads, grad_out = grads_of(ours, tensors)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    ref = reference(ref_inputs[0], ref_inputs[1], labels, ref_inputs[2], **kw)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_inputs if t is not None],
                                    None if grad_out is None else grad_out.double(), allow_unused=True)
    tol = tol or tolerances(hidden.dtype)
    torch.testing.assert_close(ours.double(), ref, **tol)
    for mine, expected, original in zip(ours_grads, ref_grads, [t for t in tensors if t is not None]):
        assert mine.dtype == original.dtype
        scale = expected.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(mine.double() / scale, expected / scale, **tol)


def shapes_for(backend):
    if backend in SMALL:
        return [(1, 16, 17), (7, 16, 130), (33, 40, 64)]
    return [(1, 16, 17), (37, 24, 1001), (130, 32, 49152), (19, 16, 128256)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float64_over_shapes(backend, dtype):
    for n, dim, vocab in shapes_for(backend):
        hidden, weight, labels, _ = make_inputs(n, dim, vocab, dtype, ignore_frac=0.2)
        check_against_reference(backend, hidden, weight, labels)


KEYWORDS = [
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items_in_batch": 11},
    {"num_items_in_batch": torch.tensor(13.0)},
    {"ignore_index": 3},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "reduction": "none"},
    {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0, "num_items_in_batch": 9},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", KEYWORDS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_keywords(backend, kw, with_bias):
    n, dim, vocab = (9, 16, 37) if backend in SMALL else (45, 24, 301)
    hidden, weight, labels, bias = make_inputs(n, dim, vocab, bias=with_bias, ignore_frac=0.2, logit_scale=4.0)
    labels[labels == -100] = kw.get("ignore_index", -100)
    check_against_reference(backend, hidden, weight, labels, bias, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_weights_and_shift(backend, reduction):
    batch, seq, dim, vocab = 3, 6, 16, 29
    hidden = torch.randn(batch, seq, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :2] = -100
    loss_weights = torch.rand(batch, seq)
    loss_weights[1, 3] = 0.0
    for shift in (False, True):
        check_against_reference(backend, hidden, weight, labels, loss_weights=loss_weights, shift=shift,
                                reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["ignored", "zero_weight"])
def test_all_masked_gives_zero_loss_and_grads(backend, how):
    hidden, weight, labels, bias = make_inputs(8, 16, 33, bias=True)
    kw = {}
    if how == "ignored":
        labels.fill_(-100)
    else:
        kw["loss_weights"] = torch.zeros(8)
    for reduction in ("mean", "sum", "none"):
        loss = sparseft.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, backend=backend, **kw)
        assert torch.all(loss == 0)
        grads = torch.autograd.grad(loss.sum(), [hidden, weight, bias])
        assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    hidden, weight, labels, _ = make_inputs(12, 16, 40)
    with torch.no_grad():
        hidden.mul_(1e4 / (hidden @ weight.T).abs().max())  # logits reach about ±1e4
    # float32 logits of magnitude 1e4 carry absolute errors near 1e-3: the tolerance follows.
    check_against_reference(backend, hidden, weight, labels, tol={"rtol": 1e-3, "atol": 1e-3})
    loss = sparseft.linear_cross_entropy(hidden, weight, labels, backend=backend, z_loss=1e-4)
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_skip_compute_but_not_correctness(backend):
    # Half the tokens zero-weighted: the same result as dropping them by hand.
    hidden, weight, labels, _ = make_inputs(20, 16, 50)
    loss_weights = torch.ones(20)
    loss_weights[::2] = 0
    masked = sparseft.linear_cross_entropy(hidden, weight, labels, loss_weights=loss_weights, backend=backend)
    kept = sparseft.linear_cross_entropy(hidden[1::2], weight, labels[1::2], backend=backend)
    torch.testing.assert_close(masked, kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_logits(backend, dtype):
    vocab = 130 if backend in SMALL else 49152
    logits = (torch.randn(2, 9, vocab) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, 9))
    labels[1, 4] = -100
    weights = torch.rand(2, 9)
    original = logits.detach().clone()
    for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}, {"reduction": "none", "shift": True},
               {"loss_weights": weights, "num_items_in_batch": 7}):
        ours = sparseft.cross_entropy(logits, labels, backend=backend, **kw)
        (grad,), grad_out = grads_of(ours, [logits])
        ref_logits = logits.detach().double().requires_grad_()
        ref = reference_from_logits(ref_logits, labels, **kw)
        (ref_grad,) = torch.autograd.grad(ref, ref_logits, None if grad_out is None else grad_out.double())
        torch.testing.assert_close(ours.double(), ref, **tolerances(dtype))
        torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))
        assert grad.dtype == dtype
    assert torch.equal(logits.detach(), original), "the caller's logits were modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_cross_entropy(backend):
    hidden, weight, labels, bias = make_inputs(50, 32, 257, bias=True, ignore_frac=0.3)
    for kw in ({}, {"label_smoothing": 0.1}, {"reduction": "sum"}):
        ours = sparseft.linear_cross_entropy(hidden, weight, labels, bias, backend=backend, **kw)
        theirs = F.cross_entropy(F.linear(hidden, weight, bias), labels, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        g_ours = torch.autograd.grad(ours, [hidden, weight, bias])
        g_theirs = torch.autograd.grad(theirs, [hidden, weight, bias])
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
def test_matches_torch_linear_cross_entropy():
    hidden, weight, labels, _ = make_inputs(64, 32, 500, ignore_frac=0.25)
    ours = sparseft.linear_cross_entropy(hidden, weight, labels)
    theirs = F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3, 2])
    loss_weights = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    kw = dict(loss_weights=loss_weights, label_smoothing=0.1, z_loss=1e-2, softcap=2.0)

    # Per-token losses recompute in the backward, so gradcheck can call it repeatedly.
    assert torch.autograd.gradcheck(
        lambda h, w, b: sparseft.linear_cross_entropy(h, w, labels, b, reduction="none", **kw), (hidden, weight, bias))
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: sparseft.cross_entropy(x, labels, label_smoothing=0.1, softcap=2.0, reduction="none"), (logits,))

    # Reduced losses take their gradients from the forward (one backward per forward):
    # check them against central differences along a random direction.
    def loss_at(h, w, b):
        return sparseft.linear_cross_entropy(h, w, labels, b, **kw)
    grads = torch.autograd.grad(loss_at(hidden, weight, bias), (hidden, weight, bias))
    directions = [torch.randn_like(t) for t in (hidden, weight, bias)]
    eps = 1e-6
    with torch.no_grad():
        plus = loss_at(*(t + eps * d for t, d in zip((hidden, weight, bias), directions)))
        minus = loss_at(*(t - eps * d for t, d in zip((hidden, weight, bias), directions)))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_no_grad_computes_no_gradients(monkeypatch):
    from sparseft.ops import _ce_torch
    seen = []
    original = _ce_torch.linear_ce

    def spy(*args):
        seen.append(args[-3:])
        return original(*args)
    monkeypatch.setattr(_ce_torch, "linear_ce", spy)
    hidden, weight, labels, _ = make_inputs(6, 8, 11)
    with torch.no_grad():
        loss = sparseft.linear_cross_entropy(hidden, weight, labels, backend="torch")
    assert seen == [(False, False, False)]
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), labels).detach())


def test_reduced_loss_refuses_a_second_backward():
    hidden, weight, labels, _ = make_inputs(6, 8, 11)
    loss = sparseft.linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it twice"):
        loss.backward()


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, labels, loss_weights):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        return sparseft.linear_cross_entropy(hidden, self.head.weight, labels, loss_weights=loss_weights, shift=True)


def test_torch_compile_tiny_model():
    model = TinyLM()
    ids = torch.randint(0, 64, (2, 10))
    weights = torch.rand(2, 10)
    eager_loss = model(ids, ids, weights)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(ids, ids, weights)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_liger_agrees():
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    hidden, weight, labels, _ = make_inputs(16, 32, 96, ignore_frac=0.25)
    ours = sparseft.linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
    theirs = liger.liger_fused_linear_cross_entropy(hidden.detach().clone().requires_grad_(), weight.detach().clone(),
                                                    labels, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cut_cross_entropy_agrees():
    cce = pytest.importorskip("cut_cross_entropy")
    hidden, weight, labels, _ = make_inputs(24, 32, 128, ignore_frac=0.25)
    ours = sparseft.linear_cross_entropy(hidden, weight, labels)
    theirs = cce.linear_cross_entropy(hidden, weight, labels, impl="torch_compile", shift=False)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def _bad(**overrides):
    hidden, weight, labels, _ = make_inputs(4, 8, 10)
    args = {"hidden": hidden, "weight": weight, "labels": labels}
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    ({"labels": torch.tensor([0, 1, 10, 2])}, ValueError, "labels must lie in"),
    ({"labels": torch.tensor([0, 1, -5, 2])}, ValueError, "labels must lie in"),
    ({"labels": torch.tensor([0.0, 1.0, 2.0, 3.0])}, TypeError, "labels must be an integer"),
    ({"labels": torch.tensor([0, 1, 2])}, ValueError, "labels must have shape"),
    ({"weight": torch.randn(10, 7)}, ValueError, "weight must have shape"),
    ({"weight": torch.randn(10, 8, dtype=torch.bfloat16)}, ValueError, "weight .* must match hidden"),
    ({"hidden": torch.randint(0, 3, (4, 8))}, TypeError, "hidden must be float32"),
    ({"loss_weights": torch.tensor([1.0, -1.0, 1.0, 1.0])}, ValueError, "loss_weights must be finite and >= 0"),
    ({"loss_weights": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, ValueError, "loss_weights must be finite"),
    ({"loss_weights": torch.ones(3)}, ValueError, "loss_weights must have the shape"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"z_loss": -1.0}, ValueError, "z_loss"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
    ({"bias": torch.randn(9)}, ValueError, "bias must be"),
    ({"backend": "fortran"}, ValueError, "backend must be one of"),
])
def test_bad_input_raises_before_any_kernel(overrides, error, match):
    args = _bad(**overrides)
    hidden, weight = args.pop("hidden"), args.pop("weight")
    labels = args.pop("labels")
    before = (hidden.detach().clone(), weight.detach().clone())
    with pytest.raises(error, match=match):
        sparseft.linear_cross_entropy(hidden, weight, labels, **args)
    assert torch.equal(hidden.detach(), before[0]) and torch.equal(weight.detach(), before[1])


def test_unavailable_backend_raises_with_reason():
    hidden, weight, labels, _ = make_inputs(4, 8, 10)
    with pytest.raises(RuntimeError, match="cuda.*cannot run"):
        sparseft.linear_cross_entropy(hidden, weight, labels, backend="cuda")
