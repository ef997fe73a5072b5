"""Mask selectors. Each returns a MaskSet {parameter name: sorted flat indices}.

Selection runs once, so it is plain torch: per tensor, in float32, on the tensor's device,
with topk (never an argsort of the whole model). Ties are broken arbitrarily by topk.
"""

import hashlib
import re
from collections.abc import Mapping

import torch

from sparseft.linalg import truncated_svd
from sparseft.masks._kth_largest import abs_diff_float32, kth_largest_abs_diff
from sparseft.masks._validate import mask_dtype
from sparseft.masks.maskset import MaskSet
from sparseft.masks.targets import block_index, named_tensors, select_targets


def _check_fraction(value, argument):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument}: expected a number in [0, 1], got {value!r}")


def _count(fraction, numel):
    return min(numel, max(0, round(fraction * numel)))


def _full(numel, device):
    return torch.arange(numel, dtype=mask_dtype(numel), device=device)


def _top(scores, k, largest=True):
    """Sorted flat indices of the k largest (or smallest) entries of `scores`."""
    scores = scores.reshape(-1)
    numel = scores.numel()
    if k >= numel:
        return _full(numel, scores.device)
    chosen = torch.topk(scores, k, largest=largest, sorted=False).indices
    return chosen.sort().values.to(mask_dtype(numel))


def _jsonable(value):
    """Regex objects in targets/include become their pattern strings, so metadata saves as JSON."""
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _maskset(masks, tensors, method, **arguments):
    arguments = {key: _jsonable(value) for key, value in arguments.items()}
    shapes = {name: tuple(tensors[name].shape) for name in masks}
    return MaskSet(masks, shapes=shapes, metadata={"method": method, **arguments})


def _seed_for(*parts):
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def lift(model, rank=128, density=None, budget=None, targets="all-linear", include=None,
         svd="exact", oversample=None, power_iters=8, seed=0):
    """LIFT principal weights: per 2-D target W, the k largest |W'| where W' is W's rank-r
    approximation (r = min(rank, m, n)). This follows the paper; the released LIFT code
    selects the smallest entries instead.

    k: `density` * m * n, or budget="lora" (the default when no density is given):
    k = min((m + n) * r, m * n), the parameter count of a rank-r LoRA adapter.

    svd="exact" (default): W' from the full SVD, as LIFT's code computes it by default.
    Trained weights have flat spectra, so the top-k of |W'| follows any error in W'. Measured on
    SmolLM2-135M (rank 64, density 5%, its 210 linear weights) against a float64 SVD: mask
    overlap 1.000 on average and 0.9998 at worst, in 21.5 s on one CPU core; a 4096 x 4096
    weight takes 32 s there (a GPU is far faster).

    svd="randomized": W' from sparseft.linalg.truncated_svd with r + `oversample` test vectors
    (default oversample 2r) and `power_iters` subspace iterations, seeded per target from `seed`.
    Measured as above: overlap 0.998 on average and 0.987 at worst; 30 s for SmolLM2, whose
    narrow weights gain nothing, and 5.1 s for a 4096 x 4096 weight (6x faster than exact).
    Cheaper settings lose entries: oversample 2r with 6 iterations 0.994 / 0.962 (average /
    worst); LIFT's randomized variant (oversample r, 2 iterations) 0.80 / 0.49.
    """
    if density is not None and budget is not None:
        raise ValueError("lift: pass either density or budget, not both")
    if density is not None:
        _check_fraction(density, "density")
    elif budget not in (None, "lora"):
        raise ValueError(f"budget: expected 'lora', got {budget!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd: expected 'exact' or 'randomized', got {svd!r}")
    tensors = select_targets(model, targets, include)
    masks = {}
    for name, weight in tensors.items():
        if weight.dim() != 2:
            raise ValueError(f"lift: target {name!r} has shape {tuple(weight.shape)}; LIFT needs 2-D weights")
        m, n = weight.shape
        r = min(rank, m, n)
        k = _count(density, m * n) if density is not None else min((m + n) * r, m * n)
        u, s, v = truncated_svd(weight.detach(), r, exact=svd == "exact", power_iters=power_iters,
                                oversample=2 * r if oversample is None else oversample, seed=_seed_for(seed, name))
        masks[name] = _top(((u * s) @ v.T).abs(), k)
    randomized = dict(oversample=oversample, power_iters=power_iters, seed=seed) if svd == "randomized" else {}
    return _maskset(masks, tensors, "lift", rank=rank, density=density, budget="lora" if density is None else None,
                    svd=svd, **randomized, targets=targets, include=include)


def sara(model, threshold=None, fraction=None, targets="all-linear", include=None):
    """SaRA: the small weights. threshold: entries with |w| < threshold; fraction: the
    `fraction` smallest-magnitude entries of each target."""
    if (threshold is None) == (fraction is None):
        raise ValueError("sara: pass exactly one of threshold or fraction")
    if fraction is not None:
        _check_fraction(fraction, "fraction")
    elif not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold: expected a non-negative number, got {threshold!r}")
    tensors = select_targets(model, targets, include)
    masks = {}
    for name, weight in tensors.items():
        magnitude = weight.detach().float().abs().reshape(-1)
        if fraction is not None:
            masks[name] = _top(magnitude, _count(fraction, magnitude.numel()), largest=False)
        else:
            masks[name] = (magnitude < threshold).nonzero().reshape(-1).to(mask_dtype(magnitude.numel()))
    return _maskset(masks, tensors, "sara", threshold=threshold, fraction=fraction, targets=targets, include=include)


def lottery(tuned, base, density, scope="global", targets="all-linear", include=None):
    """Lottery-ticket masks (LT-SFT): the largest |tuned - base|.

    tuned, base: modules or state dicts with the same names and shapes. scope="tensor":
    the top `density` of each target; scope="global": the top `density` of all targets
    together, from one exact global threshold found by a radix select over float32
    bit patterns (see _kth_largest), so no concatenation of the model is ever built; ties
    at the threshold are filled in target order.
    """
    _check_fraction(density, "density")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope: expected 'global' or 'tensor', got {scope!r}")
    tensors = select_targets(tuned, targets, include)
    base_tensors = named_tensors(base)
    for name, t in tensors.items():
        if name not in base_tensors:
            raise ValueError(f"base: no tensor named {name!r}")
        if base_tensors[name].shape != t.shape:
            raise ValueError(f"base: {name!r} has shape {tuple(base_tensors[name].shape)}, tuned has {tuple(t.shape)}")
    pairs = [(t, base_tensors[name]) for name, t in tensors.items()]
    masks = {}
    if scope == "tensor":
        for name, (t, b) in zip(tensors, pairs):
            masks[name] = _top(abs_diff_float32(t, b.to(t.device)), _count(density, t.numel()))
    else:
        k = _count(density, sum(t.numel() for t in tensors.values()))
        threshold, greater = kth_largest_abs_diff(pairs, k) if k else (None, 0)
        ties_left = k - greater
        for name, (t, b) in zip(tensors, pairs):
            if threshold is None:
                masks[name] = torch.empty(0, dtype=mask_dtype(t.numel()), device=t.device)
                continue
            d = abs_diff_float32(t, b.to(t.device)).reshape(-1)
            ties = (d == threshold).nonzero().reshape(-1)[:ties_left]
            ties_left -= ties.numel()
            chosen = torch.cat([(d > threshold).nonzero().reshape(-1), ties]).sort().values
            masks[name] = chosen.to(mask_dtype(t.numel()))
    return _maskset(masks, tensors, "lottery", density=density, scope=scope, targets=targets, include=include)


def random(model, density, seed=0, targets="all-linear", include=None):
    """A uniformly random `density` of each target's entries, deterministic for (seed, device)."""
    _check_fraction(density, "density")
    tensors = select_targets(model, targets, include)
    masks = {}
    for name, weight in tensors.items():
        generator = torch.Generator(device=weight.device).manual_seed(_seed_for(seed, name))
        scores = torch.rand(weight.numel(), generator=generator, device=weight.device)
        masks[name] = _top(scores, _count(density, weight.numel()))
    return _maskset(masks, tensors, "random", density=density, seed=seed, targets=targets, include=include)


def gradient(model, batches, density, loss_fn=None, targets="all-linear", include=None):
    """The top `density` of each target by accumulated |grad| over `batches`.

    A Mapping batch is called as model(**batch), any other as model(batch); the loss is
    loss_fn(output, batch) when given, else output.loss. Only the targets require grad
    during the passes, and each one's gradient is folded into a float32 accumulator as soon
    as it is ready, so at most one dense gradient per target exists at a time. The model's
    requires_grad flags and existing .grad are restored afterwards.
    """
    _check_fraction(density, "density")
    tensors = select_targets(model, targets, include)
    accumulated = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in tensors.items()}
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    hooks = []

    def fold(name):
        def hook(param):
            accumulated[name].add_(param.grad.detach().float().abs())
            param.grad = None
        return hook

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, p in tensors.items():
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(fold(name)))
        with torch.enable_grad():
            for batch in batches:
                output = model(**batch) if isinstance(batch, Mapping) else model(batch)
                loss = loss_fn(output, batch) if loss_fn is not None else output.loss
                loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    masks = {name: _top(acc, _count(density, acc.numel())) for name, acc in accumulated.items()}
    return _maskset(masks, tensors, "gradient", density=density, targets=targets, include=include)


def half_matrices(model, seed=0, stage=0, attention=("q_proj", "k_proj", "v_proj", "o_proj"),
                  mlp=("gate_proj", "up_proj", "down_proj")):
    """Half Fine-Tuning's draw: the names of the weight matrices that train, in parameter order.

    Blocks are found by `.layers.<i>.` / `.h.<i>.` / `.blocks.<i>.` in parameter names.
    Per block and group (attention / mlp, matched by the module's last name component), a
    group of n matrices trains n // 2 of them in a random half of the blocks (len // 2 of
    them) and n - n // 2 in the rest: attention trains exactly 2 of q,k,v,o everywhere; the
    MLP trains 1 of gate/up/down in half of the blocks and 2 in the others. Deterministic for
    (seed, stage); each stage re-draws.
    """
    names = list(named_tensors(model))
    groups = {"attention": {}, "mlp": {}}  # group -> {block index -> [names]}
    for name in names:
        block = block_index(name)
        parts = name.split(".")
        if block is None or parts[-1] != "weight" or len(parts) < 2:
            continue
        for group, members in (("attention", attention), ("mlp", mlp)):
            if parts[-2] in members:
                groups[group].setdefault(block, []).append(name)
    if not any(groups.values()):
        raise ValueError("half: found no attention or MLP matrices inside numbered transformer blocks")
    generator = torch.Generator().manual_seed(_seed_for("half", seed, stage))
    trained = set()
    for group in ("attention", "mlp"):
        blocks = sorted(groups[group])
        fewer = {blocks[i] for i in torch.randperm(len(blocks), generator=generator)[: len(blocks) // 2].tolist()}
        for block in blocks:
            members = groups[group][block]
            count = len(members) // 2 if block in fewer else len(members) - len(members) // 2
            trained.update(members[i] for i in torch.randperm(len(members), generator=generator)[:count].tolist())
    return [name for name in names if name in trained]


def half(model, seed=0, stage=0, attention=("q_proj", "k_proj", "v_proj", "o_proj"),
         mlp=("gate_proj", "up_proj", "down_proj")):
    """Half Fine-Tuning as masks: a full mask on each matrix of :func:`half_matrices`."""
    tensors = named_tensors(model)
    ordered = {name: _full(tensors[name].numel(), tensors[name].device)
               for name in half_matrices(model, seed, stage, attention, mlp)}
    return _maskset(ordered, tensors, "half", seed=seed, stage=stage, attention=list(attention), mlp=list(mlp))
