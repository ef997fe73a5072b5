"""Merges and LiNeS scaling of SparseDeltas on their compact form (never the dense model).

For each tensor name, the deltas' index sets are united (U entries); each delta becomes a
length-U vector of its values (0 where it has none) and the fused op merges those vectors with
a zero base, so the work and memory are O(U), not O(numel). The result keeps the entries whose
merged value is non-zero.

Equivalences with a dense merge of base + delta_t: task_arithmetic, ties (the TIES threshold is
the top int(ρ·numel) of |τ_t| over the full tensor: entries outside a delta are zeros, so the
compact selection is the dense one) and consensus give the dense result exactly. DARE draws its
drop pattern over the compact positions (seeded per (seed, tensor, task)), an equally valid but
different pattern from a dense DARE's.
"""

import torch

from sparseft.delta import SparseDelta
from sparseft.masks._validate import mask_dtype
from sparseft.masks.targets import block_index
from sparseft.merge.lines import LinesSchedule, parse_lines
from sparseft.merge.methods import CONSENSUS_K, CONSENSUS_LAMBDA


def _layers(names, num_layers):
    if num_layers:
        return num_layers
    blocks = [b for b in (block_index(n) for n in names) if b is not None]
    return max(blocks) + 1 if blocks else None


def _schedule(lines, names, num_layers):
    parsed = parse_lines(lines)
    if parsed is None:
        return None
    alpha, beta, overrides = parsed
    if alpha == "auto":
        raise ValueError("lines: 'auto' is not supported for SparseDeltas; give (alpha, beta)")
    return LinesSchedule(alpha, beta, _layers(names, num_layers), overrides)


def scale_delta(delta, lines, num_layers=None):
    """A new SparseDelta with each tensor's values times LiNeS λ(ℓ) (same indices).

    L: `num_layers`, else the largest block index the delta touches + 1 (pass num_layers
    when the delta may not touch the last block)."""
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta: expected a SparseDelta, got {type(delta).__name__}")
    schedule = _schedule(lines, list(delta.shapes), num_layers)
    if schedule is None:
        raise ValueError("lines: expected (alpha, beta) or {alpha, beta, overrides}")
    values = {n: (v.float() * schedule(n)).to(v.dtype) if v.dtype != torch.float64 else v * schedule(n)
              for n, v in delta.values.items()}
    metadata = {**delta.metadata, "lines": [schedule.alpha, schedule.beta]}
    return SparseDelta(delta.indices, values, delta.shapes, metadata)


def merge_deltas(deltas, method="task_arithmetic", *, weights=None, density=None, lines=None, num_layers=None,
                 scale=1.0, normalize=None, rescale=None, seed=0, consensus_lambda=CONSENSUS_LAMBDA,
                 consensus_k=CONSENSUS_K, device="cpu", backend=None):
    """Merge SparseDeltas (objects or saved files) into one SparseDelta, on their compact form.

    method: task_arithmetic | ties | dare_linear | dare_ties | consensus, with the parameters of
    `sparseft.merge.merge` (TIES trims per tensor). Save the result with `.save(path)`, add it to
    a model with `.apply(model)`, or write a full checkpoint with
    `sparseft.merge.merge(base, [result], out=...)`.
    """
    from sparseft.merge.api import _Plan
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise ValueError("deltas: expected a non-empty list of SparseDeltas or delta files")
    deltas = [d if isinstance(d, SparseDelta) else SparseDelta.load(d) for d in deltas]
    if method == "linear":
        raise ValueError("method: 'linear' averages whole models; SparseDeltas merge with a task-vector method")
    plan = _Plan(None, deltas, method, weights, density, None, None, device, backend, seed, normalize, rescale,
                 scale, "tensor", consensus_lambda, consensus_k, num_layers)
    names = list(dict.fromkeys(n for d in deltas for n in d.shapes))
    plan.layers = _layers(names, num_layers)
    schedule = _schedule(lines, names, num_layers)
    device = plan.device
    indices, values, shapes = {}, {}, {}
    for name in names:
        parts = [d for d in deltas if name in d.shapes]
        shape = parts[0].shapes[name]
        if any(d.shapes[name] != shape for d in parts):
            raise ValueError(f"deltas disagree on the shape of {name!r}")
        union = torch.unique(torch.cat([d.indices[name].to(device).long() for d in parts if name in d.indices]))
        vectors = []
        for i, d in enumerate(deltas):
            v = torch.zeros(union.numel(), dtype=torch.float32, device=device)
            if name in d.shapes:
                v[torch.searchsorted(union, d.indices[name].to(device).long())] = d.values[name].to(device).float()
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"deltas[{i}]: values of {name!r} hold NaN or Inf")
            vectors.append(v)
        numel = torch.Size(shape).numel()
        merged = plan.merge_one(name, torch.zeros_like(vectors[0]), vectors,
                                schedule(name) if schedule else 1.0, torch.float32, numel=numel)
        keep = merged != 0
        indices[name] = union[keep].to(mask_dtype(numel)).cpu()
        values[name] = merged[keep].cpu()
        shapes[name] = shape
    metadata = {"merged": {"method": method, "count": len(deltas)}, "merged_from": [d.metadata for d in deltas]}
    if schedule is not None:
        metadata["lines"] = [schedule.alpha, schedule.beta]
    return SparseDelta(indices, values, shapes, metadata)
