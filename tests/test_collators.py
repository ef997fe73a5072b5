"""sparseft.data collators: exact batches, masking counts and randomness, argument checks,
Trainer / DataLoader use, and the weighted loss they feed."""

import numpy as np
import pytest
import torch

import sparseft
from sparseft.data import (ANSWER, PAD, PROMPT, THOUGHT, MaskedThoughtCollator, MEAPCollator,
                           ThoughtMaskCollator, masked_count)

IGN = -100
MASK = 99

# prompt 11 12 | thought 21 22 23 | answer 31 32      and    prompt 13 | answer 33
EXAMPLES = [
    {"segments": [("prompt", [11, 12]), ("thought", [21, 22, 23]), ("answer", [31, 32])]},
    {"segments": [("prompt", [13]), ("answer", [33])]},
]


def _long_examples(count=6, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        n_prompt, n_thought, n_answer = rng.integers(1, 12, size=3)
        examples.append({"segments": [("prompt", rng.integers(1, 90, n_prompt).tolist()),
                                      ("thought", rng.integers(1, 90, n_thought).tolist()),
                                      ("answer", rng.integers(1, 90, n_answer).tolist())]})
    return examples


def _tensor(rows, dtype=torch.int64):
    return torch.tensor(rows, dtype=dtype)


# ----------------------------------------------------------------------------- thought masks

def test_thought_mask_exact_right_padding():
    batch = ThoughtMaskCollator(0, thought_weight=0.5)(EXAMPLES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_weights"}
    assert torch.equal(batch["input_ids"], _tensor([[11, 12, 21, 22, 23, 31, 32], [13, 33, 0, 0, 0, 0, 0]]))
    assert torch.equal(batch["attention_mask"], _tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]]))
    assert torch.equal(batch["labels"], _tensor([[IGN, IGN, 21, 22, 23, 31, 32], [IGN, 33] + [IGN] * 5]))
    assert batch["loss_weights"].dtype == torch.float32
    assert torch.equal(batch["loss_weights"], _tensor([[0, 0, .5, .5, .5, 1, 1], [0, 1, 0, 0, 0, 0, 0]],
                                                      torch.float32))


def test_thought_weight_zero_ignores_thought_labels():
    batch = ThoughtMaskCollator(0, thought_weight=0.0, ignore_index=-1)(EXAMPLES)
    assert torch.equal(batch["labels"][0], _tensor([-1, -1, -1, -1, -1, 31, 32]))
    assert torch.equal(batch["loss_weights"][0], _tensor([0, 0, 0, 0, 0, 1, 1], torch.float32))
    assert torch.equal(batch["labels"] == -1, batch["loss_weights"] == 0)


def test_left_padding_and_multiple_of():
    batch = ThoughtMaskCollator(7, padding_side="left", pad_to_multiple_of=4)(EXAMPLES)
    assert torch.equal(batch["input_ids"], _tensor([[7, 11, 12, 21, 22, 23, 31, 32], [7] * 6 + [13, 33]]))
    assert torch.equal(batch["attention_mask"], _tensor([[0] + [1] * 7, [0] * 6 + [1, 1]]))
    assert torch.equal(batch["labels"], _tensor([[IGN, IGN, IGN, 21, 22, 23, 31, 32], [IGN] * 7 + [33]]))
    assert torch.equal(batch["loss_weights"], _tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 7 + [1]], torch.float32))


@pytest.mark.parametrize("side, kept", [("right", [11, 12, 21, 22]), ("left", [22, 23, 31, 32])])
def test_max_length_truncation(side, kept):
    batch = ThoughtMaskCollator(0, max_length=4, truncation_side=side)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][0].tolist() == kept
    assert batch["input_ids"][1].tolist() == [13, 33, 0, 0]


def test_example_forms_agree():
    ids = [11, 12, 21, 22, 23, 31, 32]
    names = ["prompt"] * 2 + ["thought"] * 3 + ["answer"] * 2
    codes = [PROMPT] * 2 + [THOUGHT] * 3 + [ANSWER] * 2
    forms = [
        EXAMPLES[0],
        {"segments": [{"role": r, "input_ids": i} for r, i in EXAMPLES[0]["segments"]]},
        {"input_ids": ids, "roles": names, "extra_column": "ignored"},
        {"input_ids": torch.tensor(ids, dtype=torch.int32), "roles": torch.tensor(codes)},
        {"input_ids": np.array(ids), "roles": np.array(names)},
        {"segments": [("answer", [])] + EXAMPLES[0]["segments"] + [("thought", [])]},
    ]
    collator = ThoughtMaskCollator(0, thought_weight=0.25)
    expected = collator(forms[:1])
    for form in forms[1:]:
        got = collator([form])
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_plain_input_ids_are_answers_and_inputs_untouched():
    ids = torch.tensor([5, 6, 7])
    batch = MEAPCollator(ThoughtMaskCollator(0), mask_token_id=MASK, p=1.0)([{"input_ids": ids}])
    assert batch["input_ids"].tolist() == [[MASK] * 3]
    assert batch["labels"].tolist() == [[5, 6, 7]]
    assert batch["loss_weights"].tolist() == [[1.0, 1.0, 1.0]]
    assert ids.tolist() == [5, 6, 7]


# ----------------------------------------------------------------------------- maskers

@pytest.mark.parametrize("p, n, k", [(0.0, 9, 0), (1.0, 9, 9), (0.5, 3, 2), (0.25, 2, 1), (0.15, 10, 2),
                                     (0.1, 4, 0), (0.3, 0, 0)])
def test_masked_count_rounds_half_up(p, n, k):
    assert masked_count(p, n) == k


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_masked_thought_masks_exactly_thought_tokens(p, padding_side):
    examples = _long_examples()
    base = ThoughtMaskCollator(0, thought_weight=0.5, padding_side=padding_side)
    reference, roles = base.collate_with_roles(examples)
    batch = MaskedThoughtCollator(base, mask_token_id=MASK, p=p, seed=3)(examples)
    changed = batch["input_ids"] != reference["input_ids"]
    assert torch.all(batch["input_ids"][changed] == MASK)
    assert not changed[roles != THOUGHT].any()  # prompt, answer, padding untouched
    for row in range(len(examples)):
        assert int(changed[row].sum()) == masked_count(p, int((roles[row] == THOUGHT).sum()))
    for key in ("attention_mask", "labels", "loss_weights"):
        assert torch.equal(batch[key], reference[key]), key


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_meap_counts_and_never_masks_padding(mask_prompt):
    examples = _long_examples(seed=1)
    base = ThoughtMaskCollator(0, pad_to_multiple_of=8)
    reference, roles = base.collate_with_roles(examples)
    batch = MEAPCollator(base, mask_token_id=MASK, p=0.3, seed=5, mask_prompt=mask_prompt)(examples)
    changed = batch["input_ids"] != reference["input_ids"]
    eligible = (roles != PAD) & (mask_prompt | (roles != PROMPT))
    assert not changed[~eligible].any()
    assert torch.all(batch["input_ids"][changed] == MASK)
    for row in range(len(examples)):
        assert int(changed[row].sum()) == masked_count(0.3, int(eligible[row].sum()))
    assert torch.equal(batch["labels"], reference["labels"])


def test_maskers_stack_over_thought_weights():
    base = ThoughtMaskCollator(0, thought_weight=0.5)
    stacked = MEAPCollator(MaskedThoughtCollator(base, mask_token_id=MASK, p=1.0), mask_token_id=98, p=1.0,
                           mask_prompt=False)
    batch = stacked(EXAMPLES)
    assert batch["input_ids"].tolist() == [[11, 12, 98, 98, 98, 98, 98], [13, 98, 0, 0, 0, 0, 0]]
    assert torch.equal(batch["loss_weights"], base(EXAMPLES)["loss_weights"])


def _masks(collator, examples, calls):
    return [collator(examples)["input_ids"] for _ in range(calls)]


@pytest.mark.parametrize("cls", [MaskedThoughtCollator, MEAPCollator])
def test_seeded_reproducible_and_varying(cls):
    examples = _long_examples(seed=2)
    make = lambda seed: cls(ThoughtMaskCollator(0), mask_token_id=MASK, p=0.4, seed=seed)  # noqa: E731
    first, again, other = _masks(make(7), examples, 3), _masks(make(7), examples, 3), _masks(make(8), examples, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    resumed = make(7)
    resumed.calls = 2
    assert torch.equal(resumed(examples)["input_ids"], first[2])


def test_dataloader_workers_draw_different_masks():
    examples = [{"input_ids": list(range(1, 41))}] * 4
    collator = MEAPCollator(ThoughtMaskCollator(0), mask_token_id=MASK, p=0.5, seed=0)
    loader = torch.utils.data.DataLoader(examples, batch_size=2, num_workers=2, collate_fn=collator)
    first, second = (batch["input_ids"] for batch in loader)  # one batch from each worker
    assert not torch.equal(first, second)


# ----------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(pad_token_id=1.0), TypeError, "pad_token_id"),
    (dict(thought_weight=-0.5), ValueError, "thought_weight"),
    (dict(thought_weight=float("nan")), ValueError, "thought_weight"),
    (dict(thought_weight="1"), TypeError, "thought_weight"),
    (dict(ignore_index=None), TypeError, "ignore_index"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(pad_to_multiple_of=2.0), TypeError, "pad_to_multiple_of"),
    (dict(padding_side="top"), ValueError, "padding_side"),
    (dict(truncation_side="middle"), ValueError, "truncation_side"),
])
def test_collator_argument_checks(kwargs, error, name):
    kwargs = {"pad_token_id": 0, **kwargs}
    with pytest.raises(error, match=name):
        ThoughtMaskCollator(**kwargs)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(base=lambda examples: {}), TypeError, "base"),
    (dict(mask_token_id=-3), ValueError, "mask_token_id"),
    (dict(p=1.5), ValueError, "p"),
    (dict(p=None), TypeError, "p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(mask_prompt=1), TypeError, "mask_prompt"),
])
def test_masker_argument_checks(kwargs, error, name):
    kwargs = {"base": ThoughtMaskCollator(0), "mask_token_id": MASK, "p": 0.1, **kwargs}
    with pytest.raises(error, match=name):
        MEAPCollator(**kwargs)


@pytest.mark.parametrize("examples, error, name", [
    ([], ValueError, "examples"),
    ({"input_ids": [1]}, TypeError, "examples"),
    ([[1, 2]], TypeError, r"examples\[0\]"),
    ([{"text": "hi"}], ValueError, r"examples\[0\]"),
    ([{"input_ids": [1.5, 2.0]}], TypeError, "input_ids"),
    ([{"input_ids": [[1, 2]]}], ValueError, "input_ids"),
    ([{"input_ids": [1, -2]}], ValueError, "input_ids"),
    ([{"input_ids": [1, 2], "roles": ["prompt"]}], ValueError, "roles"),
    ([{"input_ids": [1, 2], "roles": ["prompt", "reply"]}], ValueError, "roles"),
    ([EXAMPLES[0], {"segments": [("thought", [1]), ("answer",)]}], TypeError, r"examples\[1\]\['segments'\]\[1\]"),
    ([{"segments": [("question", [1])]}], ValueError, "role"),
])
def test_example_checks(examples, error, name):
    with pytest.raises(error, match=name):
        ThoughtMaskCollator(0)(examples)


# ----------------------------------------------------------------------------- integration

def test_transformers_trainer_dataloader(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    collator = MaskedThoughtCollator(ThoughtMaskCollator(0, thought_weight=0.5), mask_token_id=MASK, p=0.5)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          remove_unused_columns=False, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args,
                                   train_dataset=EXAMPLES, data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == batch["loss_weights"].shape == (2, 7)
    assert batch["loss_weights"].dtype == torch.float32
    assert int((batch["input_ids"] == MASK).sum()) == masked_count(0.5, 3)


def _reference_loss(hidden, weight, labels, loss_weights):
    """Causal LM loss in the inputs' dtype (float64 here), written out token by token:
    position t predicts labels[t+1] with weight loss_weights[t+1]."""
    logits = hidden @ weight.T
    total, norm = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target, w = int(labels[b, t + 1]), float(loss_weights[b, t + 1])
            if target == IGN:
                continue
            total += w * (torch.logsumexp(logits[b, t], 0) - logits[b, t, target])
            norm += w
    return total / norm


@pytest.mark.parametrize("training", [True, False])
def test_weights_feed_linear_cross_entropy(training):
    examples = _long_examples(count=3, seed=4)
    collator = MEAPCollator(ThoughtMaskCollator(0, thought_weight=0.3, padding_side="left"),
                            mask_token_id=MASK, p=0.2, mask_prompt=False, seed=1)
    batch = collator(examples)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch["labels"].shape, 16, generator=gen).requires_grad_(training)
    weight = torch.randn(100, 16, generator=gen).requires_grad_(training)
    loss = sparseft.linear_cross_entropy(hidden, weight, batch["labels"], loss_weights=batch["loss_weights"],
                                         shift=True, backend="torch")
    hidden64 = hidden.detach().double().requires_grad_(training)
    weight64 = weight.detach().double().requires_grad_(training)
    expected = _reference_loss(hidden64, weight64, batch["labels"], batch["loss_weights"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    if training:
        loss.backward()
        expected.backward()
        torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-4, atol=1e-6)
