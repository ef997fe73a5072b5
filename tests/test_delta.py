"""sparseft.SparseDelta: round trip, apply/revert bit-exactness, composition, validation
before writing, file size proportional to nnz, deltas of sparsified models."""

import copy
import os

import pytest
import torch
from torch import nn

from sparseft import masks as M
from sparseft.delta import SparseDelta
from sparseft.masks import MaskSet


def tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).to(dtype)


def train_like(model, seed=1, scale=0.05):
    """A copy of `model` with every parameter moved, standing in for fine-tuning."""
    tuned = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn_like(p))
    return tuned


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_bit_equal(model, state):
    for name, t in model.state_dict().items():
        assert torch.equal(t.view(-1).view(torch.uint8), state[name].view(-1).view(torch.uint8)), name


@pytest.fixture(scope="module")
def models():
    base = tiny_llama()
    return base, train_like(base)


def test_from_models_values_and_round_trip(models, tmp_path):
    base, tuned = models
    masks = M.lottery(tuned, base, density=0.05)
    delta = SparseDelta.from_models(tuned, base, masks, metadata={"task": "demo"})
    assert delta.nnz == sum(i.numel() for i in masks.values())
    assert delta.density == pytest.approx(delta.nnz / sum(torch.Size(s).numel() for s in delta.shapes.values()))
    t, b = tuned.state_dict(), base.state_dict()
    for name, indices in masks.items():
        expected = (t[name].double().view(-1) - b[name].double().view(-1))[indices.long()]
        torch.testing.assert_close(delta.values[name].double(), expected, rtol=1e-6, atol=1e-7)
    path = tmp_path / "delta.safetensors"
    delta.save(path, metadata={"lang": "xx"})
    loaded = SparseDelta.load(path)
    assert list(loaded.shapes) == list(delta.shapes) and loaded.shapes == delta.shapes
    assert loaded.metadata == {"task": "demo", "lang": "xx"}
    for name in delta.indices:
        assert loaded.indices[name].dtype == torch.int32 and torch.equal(loaded.indices[name], delta.indices[name])
        assert loaded.values[name].dtype == torch.float32 and torch.equal(loaded.values[name], delta.values[name])
    assert not os.path.exists(str(path) + ".tmp")


def test_state_dicts_work_like_modules(models):
    base, tuned = models
    masks = M.random(base, 0.1)
    a = SparseDelta.from_models(tuned, base, masks)
    b = SparseDelta.from_models(tuned.state_dict(), base.state_dict(), masks)
    assert all(torch.equal(a.values[n], b.values[n]) for n in a.values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_reaches_tuned_and_revert_is_bit_exact(dtype):
    base = tiny_llama(dtype)
    tuned = train_like(base)
    masks = M.lottery(tuned, base, density=0.1)
    delta = SparseDelta.from_models(tuned, base, masks)
    model = copy.deepcopy(base)
    before = snapshot(model)
    assert delta.apply(model) is model
    t = tuned.state_dict()
    for name, p in model.state_dict().items():
        if name in masks:
            index = masks[name].long()
            if dtype == torch.bfloat16:  # float32 values hold a bf16 difference exactly
                assert torch.equal(p.view(-1)[index], t[name].view(-1)[index])
            else:
                torch.testing.assert_close(p.view(-1)[index], t[name].view(-1)[index], rtol=0, atol=1e-6)
            untouched = torch.ones(p.numel(), dtype=torch.bool)
            untouched[index] = False
            assert torch.equal(p.view(-1)[untouched], before[name].view(-1)[untouched])
        else:
            assert torch.equal(p, before[name])
    delta.revert(model)
    assert_bit_equal(model, before)


def test_scaled_apply_and_revert_of_a_loaded_delta(models, tmp_path):
    base, tuned = models
    delta = SparseDelta.from_models(tuned, base, M.random(base, 0.1))
    model = copy.deepcopy(base)
    before = snapshot(model)
    delta.apply(model, scale=0.5)
    name = next(iter(delta.indices))
    index = delta.indices[name].long()
    expected = before[name].view(-1)[index] + 0.5 * delta.values[name]
    torch.testing.assert_close(model.state_dict()[name].view(-1)[index], expected)
    delta.save(tmp_path / "d.safetensors")
    SparseDelta.load(tmp_path / "d.safetensors").revert(model, scale=0.5)  # no record: by subtraction
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, before[n], rtol=0, atol=1e-6)


def test_composition_equals_applying_both(models):
    base, tuned = models
    language = SparseDelta.from_models(tuned, base, M.random(base, 0.2, seed=1))
    task = SparseDelta.from_models(train_like(base, seed=2), base, M.random(base, 0.2, seed=2))
    both = language + task
    assert both.nnz == sum(
        len(set(language.indices[n].tolist()) | set(task.indices[n].tolist())) for n in language.indices)
    assert torch.equal(SparseDelta.compose(language, task).values[next(iter(both.values))],
                       both.values[next(iter(both.values))])
    one_by_one = task.apply(language.apply(copy.deepcopy(base)))
    at_once = both.apply(copy.deepcopy(base))
    reference = one_by_one.state_dict()
    for name, t in at_once.state_dict().items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=1e-6)
    # LIFO revert of the composition parts restores the base exactly
    before = snapshot(base)
    model = copy.deepcopy(base)
    language.apply(model)
    task.apply(model)
    task.revert(model)
    language.revert(model)
    assert_bit_equal(model, before)


def test_composition_of_disjoint_tensors_and_shape_conflicts():
    a = SparseDelta({"x": torch.tensor([1], dtype=torch.int32)}, {"x": torch.tensor([1.0])}, {"x": (2, 2)})
    b = SparseDelta({"y": torch.tensor([0, 2], dtype=torch.int32)}, {"y": torch.tensor([2.0, 3.0])}, {"y": (3,)})
    c = SparseDelta({"x": torch.tensor([0, 1], dtype=torch.int32)}, {"x": torch.tensor([5.0, 1.0])}, {"x": (2, 2)})
    total = a + b + c
    assert total.nnz == 4 and total.indices["x"].tolist() == [0, 1] and total.values["x"].tolist() == [5.0, 2.0]
    d = SparseDelta({"x": torch.tensor([1], dtype=torch.int32)}, {"x": torch.tensor([1.0])}, {"x": (4,)})
    with pytest.raises(ValueError, match="shape"):
        a + d


def test_bad_delta_leaves_model_untouched(models):
    base, tuned = models
    good = SparseDelta.from_models(tuned, base, M.random(base, 0.1))
    model = copy.deepcopy(base)
    before = snapshot(model)
    missing = good + SparseDelta({"zzz.weight": torch.tensor([0], dtype=torch.int32)},
                                 {"zzz.weight": torch.tensor([1.0])}, {"zzz.weight": (2,)})
    with pytest.raises(ValueError, match="zzz.weight"):
        missing.apply(model)
    name = "model.layers.1.mlp.down_proj.weight"  # the last tensor, so all others would be written first
    assert list(good.shapes)[-1] == name
    wrong_shape = SparseDelta(good.indices, good.values, {**good.shapes, name: (64, 32)})
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.apply(model)
    assert_bit_equal(model, before)


def test_invalid_construction_and_files(tmp_path):
    with pytest.raises(ValueError, match="unsorted"):
        SparseDelta({"x": torch.tensor([1, 0], dtype=torch.int32)}, {"x": torch.zeros(2)}, {"x": (3,)})
    with pytest.raises(ValueError, match="values 'x'"):
        SparseDelta({"x": torch.tensor([0, 1], dtype=torch.int32)}, {"x": torch.zeros(3)}, {"x": (3,)})
    with pytest.raises(ValueError, match="out_of_range"):
        SparseDelta.from_models({"out_of_range": torch.zeros(3)}, {"out_of_range": torch.zeros(3)},
                                {"out_of_range": torch.tensor([3], dtype=torch.int32)})
    MaskSet({"w": torch.tensor([0], dtype=torch.int32)}, shapes={"w": (1,)}).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a sparseft delta file"):
        SparseDelta.load(tmp_path / "m.safetensors")


def test_file_size_is_proportional_to_nnz(tmp_path):
    base = nn.Linear(256, 256, bias=False)
    tuned = train_like(base)
    sizes = {}
    for density in (0.01, 0.1):
        delta = SparseDelta.from_models(tuned, base, M.random(base, density, targets=r"weight"))
        delta.save(tmp_path / f"{density}.safetensors")
        sizes[delta.nnz] = os.path.getsize(tmp_path / f"{density}.safetensors")
    (small, small_size), (large, large_size) = sorted(sizes.items())
    per_entry = 4 + 4  # int32 index + float32 value
    assert abs((large_size - small_size) - per_entry * (large - small)) <= 64
    assert small_size <= per_entry * small + 1024


class FakeSparseLinear(nn.Module):
    """The attributes sparsify() gives a SparseLinear (interface 3), nothing more."""

    def __init__(self, linear, indices):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.register_buffer("weight_indices", indices)
        self.weight_values = nn.Parameter(self.weight.detach().view(-1)[indices.long()].clone())


def test_from_sparsified_and_values_stay_in_sync():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    masks = M.random(base, 0.25)
    model = nn.Sequential(FakeSparseLinear(base[0], masks["0.weight"]), nn.ReLU(),
                          FakeSparseLinear(base[2], masks["2.weight"]))
    with torch.no_grad():  # "training": move the trainable entries in both views
        for module in (model[0], model[2]):
            module.weight_values.add_(0.1)
            module.weight.view(-1)[module.weight_indices.long()] = module.weight_values
    delta = SparseDelta.from_sparsified(model, base)
    assert set(delta.indices) == {"0.weight", "2.weight"}
    for name in delta.values:
        torch.testing.assert_close(delta.values[name], torch.full_like(delta.values[name], 0.1))
    delta.revert(model)  # never applied by this delta: reverted by subtraction
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight, base[i].weight, rtol=0, atol=1e-6)
        assert torch.equal(model[i].weight_values, model[i].weight.view(-1)[model[i].weight_indices.long()])
    with pytest.raises(ValueError, match="no sparsified modules"):
        SparseDelta.from_sparsified(base, base)
