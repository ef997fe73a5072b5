"""Loss-weight collators: thought masks (Progressive Thought Refinement), Masked Thought
and MEAP input masking.

Each collator is a callable ``collator(examples) -> dict`` usable as a Hugging Face
``data_collator`` or a DataLoader ``collate_fn``. Examples are described in
:mod:`sparseft.data._examples`. The batch holds four [batch, length] tensors:

  input_ids       int64; pad_token_id in padding, mask_token_id where a masker replaced a token
  attention_mask  int64; 1 on real tokens, 0 on padding
  labels          int64; the ORIGINAL token ids (never the mask id), ignore_index where untrained
  loss_weights    float32; the weight of the token at the same position as a target

Labels and weights are aligned with input_ids, NOT shifted: the causal shift belongs to
the loss. Hugging Face causal LMs shift internally; with
``sparseft.linear_cross_entropy(hidden, W, labels, loss_weights=w, shift=True)`` the hidden
state at position t is scored against labels[t+1] with weight w[t+1].

Invariant: ``labels == ignore_index`` exactly where ``loss_weights == 0`` (padding, prompt,
and thought tokens when thought_weight == 0), so the labels alone still describe what is
trained for losses that take no weights.

With ``transformers.Trainer`` pass ``remove_unused_columns=False`` (else it drops
"segments"/"roles" before collation) and a loss that consumes ``loss_weights``.
"""

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from sparseft.data._examples import ANSWER, PAD, PROMPT, THOUGHT, parse_example

__all__ = ["ThoughtMaskCollator", "MaskedThoughtCollator", "MEAPCollator", "masked_count"]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name, value, minimum=None, optional=False):
    if optional and value is None:
        return
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_real(name, value, low, high=math.inf):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= value <= high) or math.isinf(value) or math.isnan(value):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")


def _check_side(name, value):
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")


def masked_count(p, eligible):
    """Tokens a masker replaces in one example: round-half-up of p · eligible, i.e.
    floor(p · eligible + 1/2) evaluated in float64 (p=0.5 of 3 tokens masks 2: no banker's
    rounding)."""
    return math.floor(p * eligible + 0.5)


class ThoughtMaskCollator:
    """Pads examples into a batch whose loss weights follow the tokens' roles:
    prompt 0 (label ignore_index), thought ``thought_weight`` (0 also sets the label to
    ignore_index), answer 1, padding 0.

    Examples longer than ``max_length`` lose tokens on ``truncation_side``. The batch is
    padded on ``padding_side`` to its longest example, rounded up to a multiple of
    ``pad_to_multiple_of``.
    """

    def __init__(self, pad_token_id, *, thought_weight=1.0, ignore_index=-100, max_length=None,
                 pad_to_multiple_of=None, padding_side="right", truncation_side="right"):
        _check_int("pad_token_id", pad_token_id, minimum=0)
        _check_real("thought_weight", thought_weight, 0.0)
        _check_int("ignore_index", ignore_index)
        _check_int("max_length", max_length, minimum=1, optional=True)
        _check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        _check_side("padding_side", padding_side)
        _check_side("truncation_side", truncation_side)
        self.pad_token_id = int(pad_token_id)
        self.thought_weight = float(thought_weight)
        self.ignore_index = int(ignore_index)
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    def __call__(self, examples):
        return self.collate_with_roles(examples)[0]

    def _truncate(self, ids, roles):
        if self.max_length is None or ids.numel() <= self.max_length:
            return ids, roles
        keep = slice(None, self.max_length) if self.truncation_side == "right" else slice(-self.max_length, None)
        return ids[keep], roles[keep]

    def collate_with_roles(self, examples):
        """(batch, roles): roles is int8 [batch, length] with the codes of
        :mod:`sparseft.data._examples` (PAD=-1 on padding); maskers select tokens with it."""
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
            raise TypeError(f"examples must be a list of examples, got {type(examples).__name__}")
        if not examples:
            raise ValueError("examples must not be empty")
        parsed = [self._truncate(*parse_example(example, i)) for i, example in enumerate(examples)]
        length = max(ids.numel() for ids, _ in parsed)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = len(parsed)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.int64)
        roles = torch.full((batch, length), PAD, dtype=torch.int8)
        for row, (ids, example_roles) in enumerate(parsed):
            n = ids.numel()
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = ids
            roles[row, span] = example_roles

        loss_weights = torch.zeros((batch, length), dtype=torch.float32)
        loss_weights[roles == THOUGHT] = self.thought_weight
        loss_weights[roles == ANSWER] = 1.0
        labels = torch.where(loss_weights > 0, input_ids, torch.full_like(input_ids, self.ignore_index))
        return {
            "input_ids": input_ids,
            "attention_mask": (roles != PAD).to(torch.int64),
            "labels": labels,
            "loss_weights": loss_weights,
        }, roles


class _TokenMasker:
    """Wraps a collator (a ThoughtMaskCollator or another masker) and replaces
    ``masked_count(p, eligible)`` eligible input tokens of each example, chosen uniformly
    without replacement, by ``mask_token_id``. Labels and loss weights are the base's.

    Randomness: call number c of a collator with ``seed`` s draws from
    numpy's SeedSequence([s, worker, c]) (worker = DataLoader worker id, 0 in the main
    process), so a run is reproducible, successive batches differ and DataLoader workers
    do not repeat each other. ``calls`` may be set to resume a run. Stacked maskers draw
    independently, so a token picked by both is masked once.
    """

    def __init__(self, base, *, mask_token_id, p, seed=0):
        if not callable(getattr(base, "collate_with_roles", None)):
            raise TypeError("base must be a ThoughtMaskCollator or another sparseft masking collator, "
                            f"got {type(base).__name__}")
        _check_int("mask_token_id", mask_token_id, minimum=0)
        _check_real("p", p, 0.0, 1.0)
        _check_int("seed", seed, minimum=0)
        self.base = base
        self.mask_token_id = int(mask_token_id)
        self.p = float(p)
        self.seed = int(seed)
        self.calls = 0

    def _eligible(self, roles):
        raise NotImplementedError

    def __call__(self, examples):
        return self.collate_with_roles(examples)[0]

    def collate_with_roles(self, examples):
        batch, roles = self.base.collate_with_roles(examples)
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if worker is None else worker.id, self.calls])
        self.calls += 1
        eligible = self._eligible(roles)
        input_ids = batch["input_ids"]  # built by the base for this call: ours to edit
        for row in range(input_ids.shape[0]):
            positions = eligible[row].nonzero().squeeze(1)
            count = masked_count(self.p, positions.numel())
            if count:
                chosen = rng.choice(positions.numel(), size=count, replace=False)
                input_ids[row, positions[torch.from_numpy(chosen)]] = self.mask_token_id
        return batch, roles


class MaskedThoughtCollator(_TokenMasker):
    """Masked Thought: replaces a fraction ``p`` of each example's thought tokens in
    input_ids by ``mask_token_id``; prompt, answer and padding are never masked."""

    def _eligible(self, roles):
        return roles == THOUGHT


class MEAPCollator(_TokenMasker):
    """MEAP: replaces a fraction ``p`` of each example's real (non-padding) tokens in
    input_ids by ``mask_token_id``; prompt tokens only when ``mask_prompt`` is True."""

    def __init__(self, base, *, mask_token_id, p, seed=0, mask_prompt=True):
        super().__init__(base, mask_token_id=mask_token_id, p=p, seed=seed)
        if not isinstance(mask_prompt, bool):
            raise TypeError(f"mask_prompt must be a bool, got {type(mask_prompt).__name__}")
        self.mask_prompt = mask_prompt

    def _eligible(self, roles):
        eligible = roles != PAD
        return eligible if self.mask_prompt else eligible & (roles != PROMPT)
