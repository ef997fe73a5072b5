"""OwLore: train a few transformer blocks at a time, sampled by their share of outlier weights.

Layerwise Outlier Distribution (OWL, Yin et al. 2024; used by OwLore, Li et al. 2024). For a
targeted Linear weight W [out, in] and calibration inputs X [tokens, in] (every token the
model sees, over all calibration batches, padding included):

    A_ij = |W_ij| · ‖X_:j‖₂

The outlier ratio of a block pools the A entries of all its targeted Linears:

    LOD_ℓ = #{A in block ℓ : A > M · mean(A over block ℓ)} / #{A in block ℓ}

The mean is the block's pooled mean, as OWL's code computes it (it concatenates the metrics of
a block's Linears and compares them with M times the mean of that concatenation). OWL returns
percentages; here ratios are fractions in [0, 1], which leaves the probabilities unchanged.

M defaults to 13 (``DEFAULT_THRESHOLD``): OwLore's only recorded setting, the LOD file it ships
for LLaMA-2-7B (``metric_cache/llama2_7b_ratio_13.txt``: 0.02% to 0.3% per block). OWL's code
defaults to 3 (its pruning scripts use 5 and 6), tuned for layerwise pruning ratios. M matters:
on SmolLM2-135M (1024 tokens of this repository's README) M = 13 gives 0.05% to 0.7% per block, every block
above zero, a 14x spread of probabilities; M = 3 gives 2.9% to 6.2%, a 2x spread.

Sampling. p_ℓ = LOD_ℓ / Σ LOD. Training step t belongs to period ⌊t / interval⌋; at the start of
each period ``gamma`` blocks are drawn without replacement with probabilities p (successive
draws, each proportional to p over the blocks left, as ``numpy.random.choice(replace=False)``).
The block parameters of the other blocks get ``requires_grad=False`` and ``.grad = None``, so no
weight gradient is computed for them; a block's norms go with it, as in the reference, unless
``always_train`` names them. Parameters outside the blocks (embeddings, head, final norm) are
never touched and train as the model has them, as OwLore trains embeddings and head.

Differences from the OwLore reference (pixeli99/OwLore):

- ratios are computed from the model and calibration batches (``outlier_ratios``); the
  reference ships a precomputed file, under a name its code does not open;
- the optimizer state of a deactivated block is freed (the reference keeps all of it), so a
  block drawn again starts from fresh moments;
- the draw of period j is a pure function of (seed, j): a torch.Generator seeded from a hash
  of both, so a run resumed at any step re-derives the same active sets from the step number
  alone, with nothing extra in the checkpoint (the reference draws from numpy's global RNG).
  Draws are reproducible for one torch version.
"""

import hashlib
import itertools
import math
import numbers
from collections.abc import Mapping

import torch

from sparseft.masks.targets import block_index, compile_patterns, is_linear, select_targets

__all__ = ["DEFAULT_THRESHOLD", "OwLoreSampler", "block_parameters", "outlier_ratios"]

DEFAULT_THRESHOLD = 13.0


# ----------------------------------------------------------------------------- blocks
def block_parameters(model):
    """{block index: [(name, param)]} for the parameters named ``layers.N.`` / ``h.N.`` /
    ``blocks.N.``, in the model's order; ValueError when there are none."""
    blocks = {}
    for name, param in model.named_parameters():
        block = block_index(name)
        if block is not None:
            blocks.setdefault(block, []).append((name, param))
    if not blocks:
        raise ValueError("model: no transformer blocks found (parameter names with 'layers.N.', 'h.N.' or "
                         "'blocks.N.')")
    return dict(sorted(blocks.items()))


# ----------------------------------------------------------------------------- outlier ratios
def outlier_ratios(model, batches, threshold=DEFAULT_THRESHOLD, targets="all-linear", include=None):
    """{block index: LOD} -- the share of the block's A = |W|·‖X‖₂ entries above ``threshold``
    times their mean (see the module docstring), over the targeted Linear weights.

    batches: an iterable of model inputs; a Mapping is called as model(**batch), anything else
    (e.g. a tensor of input_ids) as model(batch). The model runs in eval mode under no_grad; the
    squared input norms accumulate in float32 from forward hooks, removed afterwards.
    targets, include: as sparseft.masks.select_targets; every target must be the weight of a
    Linear (nn.Linear or SparseLinear) inside a block, and every block needs one.
    """
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not threshold > 0:
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")
    blocks = block_parameters(model)
    linears = _block_linears(model, blocks, targets, include)
    batches = _nonempty(batches)
    input_norms = _squared_input_norms(model, linears, batches)
    return {block: _outlier_ratio([(module.weight, input_norms[name]) for name, module in members], threshold)
            for block, members in linears.items()}


def _block_linears(model, blocks, targets, include):
    """{block: [(module name, Linear)]} for the targeted weights; every block must have one."""
    linears, misplaced = {}, []
    for name in select_targets(model, targets, include):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else None
        block = block_index(name)
        if leaf != "weight" or not is_linear(module) or block is None:
            misplaced.append(name)
        else:
            linears.setdefault(block, []).append((module_name, module))
    if misplaced:
        raise ValueError(f"targets: {misplaced[:5]} are not Linear weights inside a transformer block; "
                         "outlier ratios need each target's input")
    missing = sorted(set(blocks) - set(linears))
    if missing:
        raise ValueError(f"targets: blocks {missing} have no targeted Linear weight, so no outlier ratio")
    return dict(sorted(linears.items()))


def _nonempty(batches):
    """An iterator over ``batches``, checked to yield at least one (peeked, not consumed)."""
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("batches: expected at least one calibration batch, got none")
    return itertools.chain([first], iterator)


def _squared_input_norms(model, linears, batches):
    """{module name: Σ over tokens of x_j² [in]} (float32) for every Linear in ``linears``."""
    sums, hooks = {}, []

    def accumulate(name):
        def hook(module, inputs):
            x = inputs[0].detach()
            sums[name].add_(x.reshape(-1, x.shape[-1]).float().square().sum(0))
        return hook

    was_training = model.training
    try:
        for members in linears.values():
            for name, module in members:
                sums[name] = torch.zeros(module.weight.shape[1], dtype=torch.float32, device=module.weight.device)
                hooks.append(module.register_forward_pre_hook(accumulate(name)))
        model.eval()  # no dropout: the norms are those of the model's deterministic forward
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return sums


def _outlier_ratio(weights_and_norms, threshold):
    """The share of the pooled A = |W|·√(squared norms) above threshold · mean(A)."""
    total, count = 0.0, 0
    for weight, squared in weights_and_norms:  # Σ_ij |W_ij|·n_j = Σ_j n_j·Σ_i |W_ij|: no A needed
        column_sums = weight.detach().abs().sum(0, dtype=torch.float64)
        total += float((column_sums * squared.double().sqrt()).sum())
        count += weight.numel()
    cut = threshold * total / count
    above = sum(int(((weight.detach().float().abs() * squared.sqrt()) > cut).sum()) for weight, squared
                in weights_and_norms)
    return above / count


# ----------------------------------------------------------------------------- sampling
def _period_seed(seed, period):
    digest = hashlib.sha256(f"owlore:{seed}:{period}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_int(value, argument, minimum, maximum=None):
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{argument}: expected an int {bound}, got {value!r}")


def _check_ratios(ratios, blocks):
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios: expected a dict of block index -> ratio, got {type(ratios).__name__}")
    unknown = sorted(set(ratios) - set(blocks), key=str)
    if unknown:
        raise ValueError(f"ratios: blocks {unknown} are not in the model, whose blocks are {sorted(blocks)}")
    missing = sorted(set(blocks) - set(ratios))
    if missing:
        raise ValueError(f"ratios: no ratio for blocks {missing}")
    bad = {b: r for b, r in ratios.items()
           if not isinstance(r, numbers.Real) or isinstance(r, bool) or not math.isfinite(r) or r < 0}
    if bad:
        raise ValueError(f"ratios: expected finite non-negative numbers, got {bad}")
    if not any(ratios.values()):
        raise ValueError("ratios: all are zero, so no block can be drawn")


class OwLoreSampler:
    """Every ``interval`` steps, trains ``gamma`` blocks drawn with probabilities ∝ ``ratios``.

    Args:
        model: the model; its blocks are found from parameter names (``layers.N.``, ``h.N.``,
            ``blocks.N.``). Build it, and the optimizer over every parameter that may train,
            before the first ``step``: the sampler toggles only the block parameters that
            require grad when it is constructed, and freezes none until then.
        ratios: {block index: non-negative weight} for every block, e.g. ``outlier_ratios``.
        gamma: blocks trained at a time (OwLore's recipe: 5), at most the blocks whose ratio is
            positive.
        interval: steps between draws (OwLore's recipe: 50).
        always_train: regexes (one or a list, ``re.search``) of block parameter names that train
            in every period, e.g. ``r"norm"`` for the blocks' norms; parameters outside the
            blocks always train anyway.
        seed: the draw of period j depends on (seed, j) only.

    In a plain loop call ``step(optimizer)`` once per optimizer step, before its forward pass;
    to resume at step t, call ``activate(t, optimizer)`` instead, or set ``step_count = t``.
    ``OwLoreCallback`` (sparseft.integrations.transformers) does this for the HF Trainer.

    Given an optimizer, the state of each deactivated parameter is dropped
    (``optimizer.state.pop``): torch's AdamW and LowRankAdamW rebuild it on the parameter's next
    step (LowRankAdamW then refreshes its projector); SparseAdamW keeps the parameter's mask
    (``"indices"``, which a sparsified module shares) and drops its moments and step counts, so
    it restarts them as at its first step.
    """

    def __init__(self, model, ratios, gamma=5, interval=50, always_train=None, seed=0):
        blocks = block_parameters(model)
        _check_ratios(ratios, blocks)
        _check_int(gamma, "gamma", 1, len(blocks))
        positive = sum(1 for r in ratios.values() if r > 0)
        if gamma > positive:
            raise ValueError(f"gamma: {gamma} blocks at a time, but only {positive} have a positive ratio")
        _check_int(interval, "interval", 1)
        _check_int(seed, "seed", 0)
        keep = compile_patterns(always_train, "always_train") if always_train is not None else []
        self.blocks = tuple(blocks)
        self.gamma, self.interval, self.seed = int(gamma), int(interval), int(seed)
        self._weights = torch.tensor([float(ratios[b]) for b in self.blocks], dtype=torch.float64)
        self.probabilities = dict(zip(self.blocks, (self._weights / self._weights.sum()).tolist()))
        self._sampled = {b: [p for name, p in params if p.requires_grad and not any(k.search(name) for k in keep)]
                         for b, params in blocks.items()}
        self.active_blocks = None
        self.step_count = 0
        self._period = None

    def blocks_at(self, step):
        """The sorted tuple of blocks trained at training step ``step`` (a pure function)."""
        _check_int(step, "step", 0)
        generator = torch.Generator().manual_seed(_period_seed(self.seed, step // self.interval))
        drawn = torch.multinomial(self._weights, self.gamma, replacement=False, generator=generator)
        return tuple(sorted(self.blocks[i] for i in drawn.tolist()))

    def activate(self, step, optimizer=None):
        """Make the blocks of training step ``step`` the trainable ones; a no-op within the period
        already active. Deactivated parameters lose their ``.grad`` and, given ``optimizer``,
        their optimizer state."""
        _check_int(step, "step", 0)
        period = step // self.interval
        if period == self._period:
            return
        active = self.blocks_at(step)
        for block, params in self._sampled.items():
            on = block in active
            for p in params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
            if not on and optimizer is not None:
                _release_state(optimizer, params)
        self.active_blocks, self._period = active, period

    def step(self, optimizer=None):
        """``activate(step_count, optimizer)``, then count the step."""
        self.activate(self.step_count, optimizer)
        self.step_count += 1


def _release_state(optimizer, params):
    # accelerate's AcceleratedOptimizer (what the Trainer hands callbacks) wraps the real one.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    release = getattr(optimizer, "release_state", None)  # an optimizer whose state outlives a freeze
    if release is not None:
        release(params)
        return
    for p in params:
        optimizer.state.pop(p, None)
