import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import available_backends
from sparseft.ramt import (DEFAULT_INIT, DEFAULT_THRESHOLD, RAMTLinear, gradient_dropout, ramt, ramt_backward,
                           ramt_kl, ramt_mask_counts, ramt_merge, ramt_penalty, ramt_unmasked)

SAMPLED_BACKENDS = [b for b in available_backends() if b in ("torch", "cpu", "triton")]


def _mask(numel, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:count].sort().values.to(torch.int32)


def _spread_scores(layer, seed=0):
    """Scores on both sides of the threshold, so that the mask has zeros and ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.scores.copy_(torch.rand(layer.scores.shape, generator=generator) * 2 * DEFAULT_THRESHOLD)


def _reference(x, weight, bias, indices, scores, threshold):
    """Plain float64 autograd through W ⊙ STE(1[s > threshold]); entries outside ``indices`` keep 1."""
    s = scores.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    mask_at_selection = (s > threshold).double() + s - s.detach()  # straight-through
    mask = torch.ones(weight.numel(), dtype=torch.float64).index_put((indices.long(),), mask_at_selection)
    bias = None if bias is None else bias.detach().double()
    out = F.linear(x64, weight.detach().double() * mask.view(weight.shape), bias)
    return out, s, x64


@pytest.mark.parametrize("backend", SAMPLED_BACKENDS)
@pytest.mark.parametrize("selection", ["sparse", "full"])
@pytest.mark.parametrize("dense_gemm", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_float64_reference(backend, selection, dense_gemm, bias):
    linear = nn.Linear(12, 7, bias=bias)
    indices = _mask(84, 30) if selection == "sparse" else None
    layer = RAMTLinear.from_linear(linear, indices, backend=backend)
    layer.dense_gemm_min_density = 0.0 if dense_gemm else 2.0
    _spread_scores(layer)
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = layer(x)
    expected, s64, x64 = _reference(x, linear.weight, linear.bias, layer.score_indices, layer.scores,
                                    layer.threshold)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    torch.testing.assert_close(layer.scores.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None
    if bias:
        torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)), rtol=1e-5, atol=1e-6)


def test_scores_at_or_below_threshold_zero_the_weight():
    linear = nn.Linear(6, 4)
    indices = _mask(24, 10)
    layer = RAMTLinear.from_linear(linear, indices)
    with torch.no_grad():
        layer.scores[:4] = 1e-3
        layer.scores[4] = DEFAULT_THRESHOLD  # strictly greater is kept, equal is masked
    expected = linear.weight.detach().clone().view(-1)
    expected[indices[:5].long()] = 0
    weight = layer.masked_weight()
    torch.testing.assert_close(weight.view(-1), expected)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, expected.view(4, 6), linear.bias))
    assert ramt_mask_counts(nn.Sequential(layer)) == {"selected": 10, "masked": 5}


def test_initial_scores_keep_every_weight():
    linear = nn.Linear(5, 3)
    layer = RAMTLinear.from_linear(linear)
    assert layer.scores.dtype == torch.float32 and torch.all(layer.scores == DEFAULT_INIT)
    assert layer.scores.shape == (15,) and layer.score_indices.dtype == torch.int32
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), linear(x))


def test_autocast_bf16_matches_float32():
    layer = RAMTLinear.from_linear(nn.Linear(16, 8), _mask(128, 40))
    _spread_scores(layer)
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    reference = layer.scores.grad.clone()
    layer.scores.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.scores.grad.dtype == torch.float32
    torch.testing.assert_close(layer.scores.grad, reference, rtol=0.05, atol=0.05)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(hidden, 2 * hidden),
                                                   "down": nn.Linear(2 * hidden, hidden)}) for _ in range(2))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["down"](torch.relu(layer["up"](h)))
        return self.lm_head(self.norm(h))


def test_ramt_wraps_all_linear_but_the_head_and_freezes_the_rest():
    model = ramt(TinyLM())
    wrapped = {name for name, m in model.named_modules() if isinstance(m, RAMTLinear)}
    assert wrapped == {"layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.scores" for n in wrapped}
    assert "layers.0.up.weight" in model.state_dict()


def test_ramt_with_masks_and_targets():
    model = TinyLM()
    ramt(model, masks={"layers.1.down.weight": _mask(128, 9)})
    assert isinstance(model.layers[1]["down"], RAMTLinear) and model.layers[1]["down"].scores.numel() == 9
    assert not isinstance(model.layers[0]["down"], RAMTLinear)
    model = ramt(TinyLM(), targets=r"\.up\.", init=0.02, threshold=0.01)
    layer = model.layers[0]["up"]
    assert isinstance(layer, RAMTLinear) and not isinstance(model.layers[0]["down"], RAMTLinear)
    assert layer.threshold == 0.01 and torch.all(layer.scores == 0.02)


def test_unmasked_is_the_frozen_model():
    original = TinyLM()
    model = ramt(TinyLM())
    model.load_state_dict(original.state_dict(), strict=False)
    for module in model.modules():
        if isinstance(module, RAMTLinear):
            _spread_scores(module)
    ids = torch.randint(0, 11, (2, 5))
    assert not torch.allclose(model(ids), original(ids))
    with torch.no_grad(), ramt_unmasked(model):
        torch.testing.assert_close(model(ids), original(ids))
    assert all(m.masking for m in model.modules() if isinstance(m, RAMTLinear))


def test_merge_equals_masked_forward_and_leaves_weights_alone():
    model = ramt(TinyLM(), masks={"layers.0.up.weight": _mask(128, 50), "layers.1.down.weight": _mask(128, 60, 1)})
    for module in model.modules():
        if isinstance(module, RAMTLinear):
            _spread_scores(module)
    old_weight = model.layers[0]["up"].weight
    old_values = old_weight.detach().clone()
    ids = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        expected = model(ids)
    ramt_merge(model)
    assert not any(isinstance(m, RAMTLinear) for m in model.modules())
    assert type(model.layers[0]["up"]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)
    assert (model.layers[0]["up"].weight == 0).any()
    assert model.layers[0]["up"].weight is not old_weight and torch.equal(old_weight, old_values)
    with pytest.raises(ValueError, match="ramt_merge"):
        ramt_merge(RAMTLinear.from_linear(nn.Linear(2, 2)))


def test_state_dict_round_trip():
    model = ramt(TinyLM(), masks={"layers.0.up.weight": _mask(128, 50)})
    _spread_scores(model.layers[0]["up"])
    other = ramt(TinyLM(), masks={"layers.0.up.weight": _mask(128, 50)})
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 11, (2, 3))
    torch.testing.assert_close(other(ids), model(ids))


def test_penalty_value_and_gradient():
    model = ramt(TinyLM(), targets=r"\.up\.")
    for module in model.modules():
        if isinstance(module, RAMTLinear):
            _spread_scores(module)
    layers = [model.layers[0]["up"], model.layers[1]["up"]]
    penalty = ramt_penalty(model, 0.5)
    expected = 0.5 * sum(math.sqrt(float(layer.scores.detach().double().square().sum())) for layer in layers)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for layer in layers:
        s = layer.scores.detach().double()
        torch.testing.assert_close(layer.scores.grad.double(), 0.5 * s / s.norm(), rtol=1e-5, atol=1e-8)


def test_gradient_dropout_statistics():
    n = 200_000
    task = torch.full((n,), 3.0)
    conflicting = torch.full((n,), -1.0)  # P = |a| / (|a| + |b|) = 0.75
    out = gradient_dropout(task, conflicting, generator=torch.Generator().manual_seed(0))
    kept = (out == 3.0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.01)
    assert torch.all((out == 0) | (out == 3.0))
    agreeing = gradient_dropout(task, torch.full((n,), 2.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(agreeing, task)
    half = gradient_dropout(task, conflicting, strength=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(half, torch.where(out == 3.0, 3.0, 1.5))  # same draw, dropped half-way
    assert torch.equal(gradient_dropout(task, conflicting, strength=0.0), task)


def test_gradient_dropout_is_deterministic_with_a_generator():
    a, b = torch.randn(1000), torch.randn(1000)
    first = gradient_dropout(a, b, generator=torch.Generator().manual_seed(5))
    again = gradient_dropout(a, b, generator=torch.Generator().manual_seed(5))
    other = gradient_dropout(a, b, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_kl_matches_torch_and_vanishes_at_the_teacher():
    student = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 11)
    for t in (1.0, 2.0):
        expected = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                            reduction="none").sum(-1).mean() * t * t
        torch.testing.assert_close(ramt_kl(student, teacher, temperature=t), expected)
    assert ramt_kl(student, student.clone()).abs().item() < 1e-6
    weights = torch.zeros(2, 5)
    weights[0, 1] = 1.0
    one = F.kl_div(F.log_softmax(student[0, 1], -1), F.log_softmax(teacher[0, 1], -1), log_target=True,
                   reduction="sum")
    torch.testing.assert_close(ramt_kl(student, lambda: teacher, weights=weights), one)


def _regularized_losses(model, ids):
    logits = model(ids)

    def teacher():
        with ramt_unmasked(model):
            return model(ids)
    task = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)) + ramt_penalty(model)
    return task, ramt_kl(logits, teacher)


def test_ramt_backward_applies_gradient_dropout_to_each_score_tensor():
    torch.manual_seed(1)
    model = ramt(TinyLM())
    for module in model.modules():
        if isinstance(module, RAMTLinear):
            _spread_scores(module)
    ids = torch.randint(0, 11, (4, 6))
    params = [p for p in model.parameters() if p.requires_grad]
    task, kl = _regularized_losses(model, ids)
    task_grads = torch.autograd.grad(task, params, retain_graph=True)
    kl_grads = torch.autograd.grad(kl, params)
    assert all(g.abs().sum() > 0 for g in kl_grads)  # the masks moved the model off the teacher

    generator = torch.Generator().manual_seed(3)
    expected = [gradient_dropout(a, b, generator=generator) for a, b in zip(task_grads, kl_grads)]
    task, kl = _regularized_losses(model, ids)
    ramt_backward(model, task, kl, generator=torch.Generator().manual_seed(3))
    for param, grad in zip(params, expected):
        torch.testing.assert_close(param.grad, grad)
    dropped = sum(int(((p.grad == 0) & (a != 0)).sum()) for p, a in zip(params, task_grads))
    assert dropped > 0

    task, kl = _regularized_losses(model, ids)
    ramt_backward(model, task, kl, generator=torch.Generator().manual_seed(3))
    for param, grad in zip(params, expected):
        torch.testing.assert_close(param.grad, 2 * grad)  # accumulates like backward()


def test_training_switches_entries_off():
    model = ramt(TinyLM(), targets=r"layers\.0\.up")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 11, (4, 6))
    for _ in range(20):
        optimizer.zero_grad()
        task, kl = _regularized_losses(model, ids)
        ramt_backward(model, task, kl, generator=torch.Generator().manual_seed(0))
        optimizer.step()
    counts = ramt_mask_counts(model)
    assert counts["selected"] == 128 and 0 < counts["masked"] < 128


@pytest.mark.parametrize("call, error, match", [
    (lambda: ramt("model"), TypeError, "model"),
    (lambda: ramt(TinyLM(), masks={"layers.0.up.weight": None}, targets="up"), ValueError, "not both"),
    (lambda: ramt(TinyLM(), masks=[1]), TypeError, "masks"),
    (lambda: ramt(TinyLM(), masks={"layers.9.up.weight": _mask(128, 3)}), ValueError, "layers.9.up.weight"),
    (lambda: ramt(TinyLM(), masks={"norm.weight": _mask(8, 3)}), ValueError, "norm.weight"),
    (lambda: ramt(TinyLM(), masks={"layers.0.up.weight": torch.tensor([3, 1], dtype=torch.int32)}),
     ValueError, "layers.0.up.weight"),
    (lambda: ramt(TinyLM(), masks={"layers.0.up.weight": torch.tensor([1, 3])}), TypeError, "layers.0.up.weight"),
    (lambda: ramt(TinyLM(), targets="nothing-matches"), ValueError, "targets"),
    (lambda: ramt(TinyLM(), init=float("nan")), ValueError, "init"),
    (lambda: ramt(TinyLM(), threshold="5e-3"), TypeError, "threshold"),
    (lambda: ramt_penalty(TinyLM()), ValueError, "RAMTLinear"),
    (lambda: ramt_penalty(ramt(TinyLM()), weight=-1.0), ValueError, "weight"),
    (lambda: ramt_kl(torch.randn(2, 5), torch.randn(2, 6)), ValueError, "teacher"),
    (lambda: ramt_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=0), ValueError, "temperature"),
    (lambda: ramt_kl(torch.randn(2, 5), torch.randn(2, 5), weights=torch.ones(3)), ValueError, "weights"),
    (lambda: ramt_kl(torch.randn(2, 5), [1.0]), TypeError, "teacher"),
    (lambda: gradient_dropout(torch.ones(3), torch.ones(4)), ValueError, "kl_grad"),
    (lambda: gradient_dropout(torch.ones(3), torch.ones(3), strength=1.5), ValueError, "strength"),
    (lambda: ramt_backward(TinyLM().requires_grad_(False), torch.ones(()), torch.ones(())), ValueError, "trainable"),
    (lambda: RAMTLinear(torch.ones(3), None, torch.arange(3, dtype=torch.int32)), ValueError, "weight"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_tied_weights_are_refused():
    model = TinyLM()
    model.layers[1]["up"].weight = model.layers[0]["up"].weight
    with pytest.raises(ValueError, match="tied"):
        ramt(model, masks={"layers.0.up.weight": _mask(128, 3)})
    assert not any(isinstance(m, RAMTLinear) for m in model.modules())  # nothing half-done


def test_hugging_face_llama_with_lift_masks():
    transformers = pytest.importorskip("transformers")
    from sparseft.masks import lift
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    ramt(model, masks=lift(model, density=0.1, rank=4))
    layers = [m for m in model.modules() if isinstance(m, RAMTLinear)]
    assert len(layers) == 14 and not isinstance(model.lm_head, RAMTLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # scores start above the threshold
    for layer in layers:
        _spread_scores(layer)
    out = model(ids, labels=ids)

    def teacher():
        with ramt_unmasked(model):
            return model(ids).logits
    ramt_backward(model, out.loss + ramt_penalty(model), ramt_kl(out.logits, teacher),
                  generator=torch.Generator().manual_seed(0))
    assert all(layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0 for layer in layers)
    with torch.no_grad():
        masked = model(ids).logits
    ramt_merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked)
    assert set(model.state_dict()) == set(transformers.LlamaForCausalLM(config).state_dict())
