"""SaRA's nuclear-norm term on sparse updates, and its progressive mask re-selection.

SaRA trains the small-magnitude entries of each weight and keeps what they learn low-rank with
a penalty λ‖ΔW‖_* (λ = 5e-4 in its scripts), one randomly drawn weight per step. For a module
made by ``sparseft.sparsify`` (a SparseLinear with mask M, compact trainable values v and the
values b they had when the penalty was built):

    ΔW = the dense m×n matrix holding v − b at M and 0 elsewhere
    ΔW = U Σ Vᵀ (thin SVD)            ∂‖ΔW‖_* = { U_r V_rᵀ + Z : U_rᵀZ = 0, Z V_r = 0, ‖Z‖₂ ≤ 1 }

where U_r, V_r are the singular pairs with σ above max(m, n)·eps(float32)·σ_max (numerically
non-zero). :meth:`NuclearNormPenalty.add_to_grad` adds λ·(U_r V_rᵀ)[M] to ``v.grad``: the
minimum-norm element of the matrix subdifferential (Z = 0: no push along directions where ΔW is
already zero) read at the mask, which is a subgradient of λ‖ΔW(v)‖_* with respect to the
trainable values (not necessarily that set's minimum-norm element). Where ΔW has full rank
min(m, n) the gradient is unique and this is it.

The reference applies the term to the original, frozen weights, so its gradient never reaches
the trainable values and the term has no effect; it also penalises W⊙M, the small pretrained
values included. Here it acts on the trainable values and penalises only the change ΔW, so the
penalty starts at 0 and never pulls the pretrained values.

Modes. ``rank=None`` (exact): the full SVD of ΔW (``sparseft.linalg.truncated_svd(exact=True)``).
``rank=k``: the top-k pairs from the randomized range finder (``truncated_svd``, default
oversampling and power iterations, seeded from (seed, call count, module)). U_k V_kᵀ is the
subgradient of the Ky Fan k-norm Σ_{i≤k} σ_i, a lower bound of ‖ΔW‖_* that equals it when
rank(ΔW) <= k; it shrinks the k leading directions and leaves the rest of ΔW alone, and the
penalty value it reports is λ Σ_{i≤k} σ_i. For a full mask ‖U_rV_rᵀ − U_kV_kᵀ‖_F / ‖U_rV_rᵀ‖_F
= √((r − k)/r), r = rank(ΔW), whatever the spectrum: the approximation is only close where ΔW
is nearly rank k. Measured on SmolLM2-135M-Instruct after 20 SparseAdamW steps (lr 5e-4, the
reference's default at its threshold 2e-3) of 2×128 README tokens on SaRA masks of the 10%
smallest entries, with this penalty (λ = 5e-4, one weight per step): the relative error over the
mask ‖(U_rV_rᵀ − Ũ_kṼ_kᵀ)[M]‖ / ‖(U_rV_rᵀ)[M]‖ of the rank-k subgradient against the exact one,
and in brackets against the exact top-k pairs (the range finder's own share),
``python -m sparseft.optim.sara`` (float32, 2-core EPYC, ~5 min):

    weight (m×n)                     rank(ΔW)   k=16           k=64           k=256
    layers.0.q_proj    576×576         574      0.950 (0.456)  0.837 (0.297)  0.438 (0.105)
    layers.0.o_proj    576×576         576      0.945 (0.513)  0.818 (0.311)  0.423 (0.117)
    layers.0.gate_proj 1536×576        576      0.958 (0.738)  0.848 (0.444)  0.483 (0.183)
    layers.0.down_proj 576×1536        576      0.960 (0.664)  0.855 (0.428)  0.506 (0.177)
    layers.15.q_proj                   576      0.947 (0.533)  0.818 (0.317)  0.419 (0.119)
    layers.15.o_proj                   575      0.951 (0.451)  0.829 (0.285)  0.431 (0.113)
    layers.15.gate_proj                576      0.959 (0.708)  0.850 (0.442)  0.487 (0.180)
    layers.15.down_proj                576      0.960 (0.654)  0.858 (0.418)  0.505 (0.176)

Sparse Adam updates are full-rank with a flat spectrum, so truncation dominates (k=64: 0.82-0.86,
near the full-mask √(1 − 64/576) = 0.94) and the range finder's defaults (8 extra vectors, 2
power iterations) find the top-k pairs only roughly where no spectral gap separates them. Use
``rank=k`` as a cheaper, different regulariser (the Ky Fan k-norm), not as an estimate of the
nuclear-norm subgradient.

Exact-mode cost: one full SVD of an m×n float32 matrix per penalised module (576×576 and
1536×576: ~1 s each on that shared machine; 4096×4096: ~2 min, see sparseft.linalg.range_finder),
which is why SaRA draws one weight per step (``per_step="one"``; ``"all"`` penalises every
module at every call). The dense ΔW and U_rV_rᵀ are float32 temporaries of one module at a time;
the only lasting memory is b, float32 and nnz-sized per module. All math is float32 whatever the values' dtype; the subgradient is
added to the gradient in the gradient's dtype with one rounding. Checking whether ΔW is zero
(then nothing is computed or added) costs one host read per penalised module.

Call order per optimizer step: backward (all micro-batches), then ``penalty.add_to_grad()``
(after ``scaler.unscale_(optimizer)`` under a GradScaler), then ``optimizer.step()``. The draw
of ``per_step="one"`` is a pure function of (seed, call count) and the count is in
``state_dict()`` with the base values, so a resumed run draws the same modules.

Masks that change (``SparseAdamW.update_masks`` re-indexes the modules, e.g. through
:func:`sara_reselect`): surviving entries keep their base, entries that join take their current
value as base (their ΔW starts at 0), and entries that leave take what they learned into the
frozen weight, outside the penalty. The penalty notices a new ``module.weight_indices`` at its
next call, which is exact as long as no optimizer step runs in between; :meth:`sync_masks` does
it at once.
"""

import math
import random
import re
from dataclasses import dataclass

import torch
from torch import nn

from sparseft.linalg import truncated_svd
from sparseft.masks import sara, validate_mask
from sparseft.sparse_linear import SparseLinear

PER_STEP = ("one", "all")


@dataclass
class _Tracked:
    """One penalised module: the mask its base values are aligned with, and those values."""
    name: str
    module: SparseLinear
    indices: torch.Tensor
    base: torch.Tensor  # float32 [nnz]


class NuclearNormPenalty:
    """λ‖ΔW‖_* over the SparseLinear modules of ``model``, applied through their gradients.

    Args:
        model: a module holding SparseLinear modules (after ``sparseft.sparsify``); their current
            values become the base, ΔW = 0.
        weight: λ >= 0 (SaRA: 5e-4). 0 computes nothing.
        per_step: "one" (SaRA: one module per call, drawn from ``seed`` and the call count) or
            "all". In "one" mode each module gets its λ-subgradient at 1/L of the calls (L
            modules), as in SaRA, so the term is L times weaker per module than in "all" mode.
        rank: None for the exact subgradient; k for the randomized top-k approximation (capped
            at min(m, n) per module; see the module docstring for its error).
        seed: seeds the draw and the range finder.

    ``weight``, ``per_step``, ``rank`` and ``seed`` are construction arguments and are not saved
    by ``state_dict``, which holds the call count and the base values.
    """

    def __init__(self, model, weight=5e-4, per_step="one", rank=None, seed=0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight: expected a finite number >= 0 (λ), got {weight!r}")
        if per_step not in PER_STEP:
            raise ValueError(f"per_step: expected one of {PER_STEP}, got {per_step!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ValueError(f"rank: expected None (exact) or an int >= 1, got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        modules = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
        if not modules:
            raise ValueError("model: has no SparseLinear modules; call sparseft.sparsify(model, masks) first")
        self.weight, self.per_step, self.rank, self.seed = float(weight), per_step, rank, seed
        self.calls = 0
        self._tracked = [_Tracked(name, m, m.weight_indices, m.weight_values.detach().float().clone())
                         for name, m in modules]

    @property
    def names(self):
        """Names of the penalised modules, in model order (the order of the draw)."""
        return [t.name for t in self._tracked]

    @torch.no_grad()
    def add_to_grad(self):
        """Adds λ·(U_rV_rᵀ)[mask] to ``weight_values.grad`` (creating it where None) of the
        module drawn for this call, or of every module. Returns {module name: λ‖ΔW‖_*} (a float32
        0-dim tensor; the Ky Fan k-norm with ``rank=k``) for the modules penalised."""
        self.sync_masks()
        chosen = self._tracked if self.per_step == "all" else [self._tracked[self._draw(self.calls)]]
        values = {t.name: self._penalise(t) for t in chosen}
        self.calls += 1
        return values

    def _draw(self, call):
        return _rng(self.seed, call).randrange(len(self._tracked))

    def _penalise(self, tracked):
        values = tracked.module.weight_values
        zero = torch.zeros((), dtype=torch.float32, device=values.device)
        if self.weight == 0:
            return zero
        delta_values = values.detach().float() - tracked.base
        if not delta_values.any():  # ΔW = 0: the minimum-norm subgradient is 0
            return zero
        dense = tracked.module.weight
        delta = torch.zeros(dense.numel(), dtype=torch.float32, device=dense.device)
        delta[tracked.indices] = delta_values
        seed = _rng(self.seed, self.calls, tracked.name).getrandbits(63)
        direction, norm = _nuclear_subgradient(delta.view(dense.shape), self.rank, seed)
        step = direction.view(-1)[tracked.indices].mul_(self.weight)
        if values.grad is None:
            values.grad = step.to(values.dtype)
        else:
            values.grad.add_(step)
        return norm * self.weight

    @torch.no_grad()
    def sync_masks(self):
        """Adopts each module's current mask: surviving entries keep their base values, new
        ones take their current value as base. Called by :meth:`add_to_grad`; call it yourself
        when an optimizer step may run between a re-indexing and the next ``add_to_grad``."""
        for t in self._tracked:
            current = t.module.weight_indices
            if current is t.indices:
                continue
            old = t.indices.to(current.device)
            t.base = t.base.to(current.device)
            if not (old.shape == current.shape and torch.equal(old, current)):  # not merely moved
                t.base = _remap_base(old, t.base, current, t.module.weight_values.detach())
            t.indices = current

    def state_dict(self):
        """{"calls": int, "base": {name: float32 [nnz]}, "indices": {name: mask}}: tensors and
        plain values only (``torch.load(weights_only=True)`` reads it)."""
        return {"calls": self.calls,
                "base": {t.name: t.base.clone() for t in self._tracked},
                "indices": {t.name: t.indices.clone() for t in self._tracked}}

    def load_state_dict(self, state_dict):
        """Restores the call count and base values; checked before anything changes. Saved masks
        that differ from the modules' current ones are remapped at the next call."""
        calls = state_dict.get("calls") if isinstance(state_dict, dict) else None
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"state_dict: 'calls' must be an int >= 0, got {calls!r}")
        base, indices = state_dict.get("base"), state_dict.get("indices")
        if not isinstance(base, dict) or not isinstance(indices, dict) or set(base) != set(self.names) \
                or set(indices) != set(self.names):
            raise ValueError(f"state_dict: 'base' and 'indices' must map exactly these modules: {self.names}")
        for t in self._tracked:
            b, i = base[t.name], indices[t.name]
            validate_mask(i, t.module.weight.numel(), f"state_dict: {t.name} indices")
            if not (isinstance(b, torch.Tensor) and b.dtype == torch.float32 and b.shape == i.shape):
                raise ValueError(f"state_dict: {t.name} base must be float32 of shape {tuple(i.shape)}")
        self.calls = calls
        for t in self._tracked:
            device = t.module.weight.device
            t.base = base[t.name].to(device, copy=True)
            t.indices = indices[t.name].to(device, copy=True)


def _rng(*parts):
    """A generator that is a pure function of ``parts`` (str seeding hashes with SHA-512)."""
    return random.Random(":".join(map(str, parts)))


def _nuclear_subgradient(delta, rank, seed):
    """(U_rV_rᵀ, Σσ) over the numerically non-zero singular pairs of ``delta`` (float32 [m, n]);
    with ``rank`` only over its randomized top-``rank`` pairs."""
    m, n = delta.shape
    k = min(m, n) if rank is None else min(rank, m, n)
    u, s, v = truncated_svd(delta, k, exact=rank is None, seed=seed)
    kept = (s > s[0] * max(m, n) * torch.finfo(torch.float32).eps).float()  # σ ≈ 0: Z = 0 there
    return (u * kept) @ v.T, (s * kept).sum()


def _remap_base(old_indices, old_base, new_indices, current_values):
    """Base values aligned with ``new_indices``: the old base where an entry survives, the
    current value (ΔW = 0) where it is new."""
    current = current_values.float()
    if old_indices.numel() == 0:
        return current.clone()
    pos = torch.searchsorted(old_indices, new_indices).clamp_(max=old_indices.numel() - 1)
    return torch.where(old_indices[pos] == new_indices, old_base[pos], current)


def sara_reselect(model, optimizer, threshold=None, fraction=None, penalty=None):
    """SaRA's progressive re-selection: new masks by ``sparseft.masks.sara`` (|w| < threshold, or
    the ``fraction`` smallest entries of each weight) on the *current* weights of the sparsified
    modules that ``optimizer`` (a SparseAdamW) trains, installed through
    ``optimizer.update_masks``, which keeps the moments of surviving entries (the reference
    rebuilds its optimizer, losing them). ``penalty`` (a NuclearNormPenalty) is synced at once.

    The masks replace the old ones, as in the reference (which re-selects once, at step 2501):
    entries that grew past the threshold are frozen with what they learned. Untrained entries
    never change, so with ``threshold`` the new mask is the part of the old one still below it;
    with the ``fraction`` of the first selection the count is kept and freed slots go to the
    smallest frozen entries.
    Returns the new MaskSet."""
    if not hasattr(optimizer, "update_masks"):
        raise TypeError(f"optimizer: expected a SparseAdamW (with update_masks), got {type(optimizer).__name__}")
    module_names = {id(m): name for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    trained = [module_names.get(id(getattr(p, "_sparseft_module", None))) for p in params]
    patterns = [f"^{re.escape(name)}\\.weight$" for name in trained if name is not None]
    if not patterns:
        raise ValueError("optimizer: trains no weight_values of model's SparseLinear modules")
    masks = sara(model, threshold=threshold, fraction=fraction, targets=patterns, include=patterns)
    optimizer.update_masks([None if name is None else masks[name + ".weight"] for name in trained])
    if penalty is not None:
        penalty.sync_masks()
    return masks


def _measure(steps=20, fraction=0.1, lr=5e-4, ranks=(16, 64, 256), layers=(0, 15), batch=2, seq=128):
    """The docstring's table: SmolLM2-135M-Instruct on SaRA masks, ``steps`` SparseAdamW steps on
    the README with the penalty in SaRA's setting; then, per weight, the relative error over the
    mask of the rank-k subgradient against the exact one, and of it against the exact top-k."""
    import os

    import sparseft
    from sparseft.bench.corpus import tokenizer
    from sparseft.bench.sparse import load_model
    from sparseft.optim import SparseAdamW

    model = load_model("cpu", torch.float32)
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        ids = tokenizer()(f.read())["input_ids"]
    sparseft.sparsify(model, sara(model, fraction=fraction))
    optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    penalty = NuclearNormPenalty(model, weight=5e-4, per_step="one")
    for step in range(steps):
        start = (step * batch * seq) % (len(ids) - batch * seq)
        chunk = torch.tensor(ids[start:start + batch * seq]).view(batch, seq)
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=chunk, labels=chunk).loss.backward()
        penalty.add_to_grad()
        optimizer.step()
    rows = {}
    for t in penalty._tracked:
        if not any(t.name.endswith(f"layers.{i}.{part}") for i in layers
                   for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")):
            continue
        shape = t.module.weight.shape
        delta = torch.zeros(shape.numel())
        delta[t.indices] = t.module.weight_values.detach().float() - t.base
        delta = delta.view(shape)
        at_mask = lambda a: a.reshape(-1)[t.indices]  # noqa: E731
        exact, _ = _nuclear_subgradient(delta, None, 0)
        row = {"rank": int(torch.linalg.matrix_rank(delta))}
        for k in ranks:
            approx, _ = _nuclear_subgradient(delta, k, 0)
            u, _, v = truncated_svd(delta, k, exact=True)
            row[k] = (float((at_mask(exact - approx)).norm() / at_mask(exact).norm()),
                      float((at_mask(u @ v.T - approx)).norm() / at_mask(u @ v.T).norm()))
        rows[f"{t.name} {tuple(shape)}"] = row
    return rows


if __name__ == "__main__":
    for name, row in _measure().items():
        print(name, f"rank {row.pop('rank')}", "  ".join(f"k={k}: {a:.3f} ({b:.3f})" for k, (a, b) in row.items()))
