"""merge(), lines() and merge_deltas(): streaming model merges over the fused per-tensor op."""

import math
import os

import torch

from sparseft.masks._kth_largest import kth_largest_abs_diff
from sparseft.merge import io as mio
from sparseft.merge.lines import LinesSchedule, num_layers as _num_layers, parse_lines
from sparseft.merge.methods import (CONSENSUS_K, CONSENSUS_LAMBDA, check_setting, evaluate_setting, get_method,
                                    layer_t)
from sparseft.ops.merge import merge_tensor, task_seed

# Tensors above this many elements are merged in contiguous chunks (the op's index_offset keeps
# the DARE pattern that of one call), so a backend's temporaries stay bounded too.
CHUNK = 1 << 22


def _dtype(value, argument="dtype"):
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{argument}: expected a floating dtype such as 'bfloat16', got {value!r}")
    return dtype


def _per_model(value, count, argument, default):
    """One setting per model: None -> default for all, a scalar -> shared, a list of len(models)."""
    if value is None:
        return [default] * count
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [check_setting(value, argument)] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{argument}: {len(value)} values for {count} models (give one per model, or one number)")
        return [check_setting(v, f"{argument}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{argument}: expected a number or a list with one value per model, got {value!r}")


def _setting_numbers(setting):
    if isinstance(setting, (int, float)):
        return [setting]
    out = []
    for v in setting:
        out.extend(_setting_numbers(v["value"]) if isinstance(v, dict) else [v])
    return out


def _check_density(densities):
    for i, d in enumerate(densities):
        for v in _setting_numbers(d):
            if not (0 < v <= 1):
                raise ValueError(f"density[{i}]: must lie in (0, 1], got {v!r}")


class _Pairs:
    """Re-iterable (tuned, base) tensor pairs of one task over all merged tensors (for global top-k)."""

    def __init__(self, base, model, names, device):
        self.base, self.model, self.names, self.device = base, model, names, device

    def __iter__(self):
        for name in self.names:
            yield self.model.get(name).to(self.device), self.base.get(name).to(self.device)


class _Plan:
    """Everything merge() checked and resolved before the first tensor is read."""

    def __init__(self, base, models, method, weights, density, lines, dtype, device, backend, seed, normalize,
                 rescale, scale, trim, consensus_lambda, consensus_k, num_layers):
        self.method = get_method(method)
        if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)) or not models:
            raise ValueError("models: expected a non-empty list of models")
        count = len(models)
        self.weights = _per_model(weights, count, "weights", 1.0)
        self.density = _per_model(density, count, "density", 1.0)
        _check_density(self.density)
        self.scale = check_setting(scale, "scale")
        self.normalize = self.method.normalize if normalize is None else bool(normalize)
        self.rescale = self.method.rescale if rescale is None else bool(rescale)
        self.lines = parse_lines(lines)
        if self.lines is not None and self.method.zero_base:
            raise ValueError("lines: LiNeS scales task vectors; method 'linear' has none (use task_arithmetic)")
        if trim not in ("tensor", "global"):
            raise ValueError(f"trim: expected 'tensor' or 'global', got {trim!r}")
        if trim == "global" and self.method.trim != "magnitude":
            raise ValueError(f"trim='global' applies to magnitude trimming (ties), not {self.method.name!r}")
        if trim == "global" and not all(isinstance(d, (int, float)) for d in self.density):
            raise ValueError("density: trim='global' needs one number per model, not per-layer lists")
        self.trim = trim
        if isinstance(consensus_lambda, bool) or not isinstance(consensus_lambda, (int, float)) \
                or not math.isfinite(consensus_lambda) or consensus_lambda < 0:
            raise ValueError(f"consensus_lambda: expected a finite number >= 0, got {consensus_lambda!r}")
        if isinstance(consensus_k, bool) or not isinstance(consensus_k, int) or not 1 <= consensus_k:
            raise ValueError(f"consensus_k: expected an integer >= 1, got {consensus_k!r}")
        self.consensus = (float(consensus_lambda), consensus_k) if self.method.consensus else None
        self.dtype = _dtype(dtype)
        self.device = torch.device(device)
        self.backend, self.seed = backend, int(seed)
        self.num_layers = num_layers
        self._thresholds = {}

    # --- per tensor ----------------------------------------------------------------------------

    def out_dtype(self, name, base):
        dtype = base.meta[name][1]
        return self.dtype if (self.dtype is not None and dtype.is_floating_point) else dtype

    def thresholds(self, name, t, base_t, tuned, densities, numel=None):
        if self.method.trim != "magnitude":
            return None
        if self.trim == "global":
            return self.global_thresholds
        key = name
        if key not in self._thresholds:
            # k over the full tensor (numel: a compact SparseDelta vector stands for a larger tensor
            # whose other entries are 0, so its top-k is the dense one while k < len(vector))
            numel = numel or base_t.numel()
            result = []
            for x, d in zip(tuned, densities):
                k = max(1, int(d * numel))
                trimmed = d < 1 and k < base_t.numel()
                result.append(float(kth_largest_abs_diff([(x, base_t)], k)[0]) if trimmed else None)
            self._thresholds[key] = result
        return self._thresholds[key]

    def merge_one(self, name, base_t, tuned, lines_scale=1.0, out_dtype=None, numel=None):
        t = layer_t(name, self.layers)
        weights = [evaluate_setting(w, name, t) for w in self.weights]
        densities = [evaluate_setting(d, name, t) for d in self.density]
        if any(w is None for w in weights) or any(d is None for d in densities):
            raise ValueError(f"{name!r}: no weight/density condition matches this tensor")
        scale = evaluate_setting(self.scale, name, t)
        if scale is None:
            raise ValueError(f"scale: no condition matches {name!r}")
        keep_probs = seeds = None
        if self.method.trim == "random":
            keep_probs = [min(1.0, d) for d in densities]
            seeds = [task_seed(self.seed, name, i) for i in range(len(tuned))]
            if not self.rescale:  # d_t = w_t k_t τ_t / p_t; w_t·p_t undoes the rescale
                weights = [w * p for w, p in zip(weights, keep_probs)]
        thresholds = self.thresholds(name, t, base_t, tuned, densities, numel)
        if thresholds is not None:  # no trim for a task: threshold 0 (|τ| ≥ 0 keeps everything)
            thresholds = None if all(x is None for x in thresholds) else [0.0 if x is None else x for x in thresholds]
        if keep_probs is not None and all(p >= 1 for p in keep_probs):
            keep_probs = seeds = None
        options = dict(weights=weights, thresholds=thresholds, keep_probs=keep_probs, seeds=seeds,
                       elect_sign=self.method.elect_sign, normalize=self.normalize, consensus=self.consensus,
                       scale=scale * lines_scale, out_dtype=out_dtype or base_t.dtype, backend=self.backend)
        result = torch.empty(base_t.shape, dtype=options["out_dtype"], device=base_t.device)
        flat_out, flat_base = result.view(-1), base_t.reshape(-1)
        flat_tuned = [x.reshape(-1) for x in tuned]
        for start in range(0, base_t.numel(), CHUNK):  # an empty tensor stays empty
            end = min(base_t.numel(), start + CHUNK)
            b = flat_base[start:end]
            merge_tensor(torch.zeros_like(b) if self.method.zero_base else b, [x[start:end] for x in flat_tuned],
                         index_offset=start, out=flat_out[start:end], **options)
        return result


def _load(source, name, device):
    t = source.get(name)
    mio.check_finite(t, name, source.label)
    return t.to(device)


def _progress(iterable, enabled, total, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="tensor")


def merge(base, models, method="task_arithmetic", *, weights=None, density=None, lines=None, out=None,
          dtype=None, device="cpu", backend=None, seed=0, normalize=None, rescale=None, scale=1.0, trim="tensor",
          consensus_lambda=CONSENSUS_LAMBDA, consensus_k=CONSENSUS_K, num_layers=None, overwrite=False,
          max_shard_size="5GB", progress=False):
    """Merge fine-tunes of `base` into one model, streaming tensor by tensor.

    base, models: HF model directories (config.json + safetensors, sharded or not), .safetensors
        files, state dicts or nn.Modules; a model may also be a SparseDelta (object or file),
        read as base + delta. Local paths only; nothing is downloaded.
    method: linear | task_arithmetic | ties | dare_linear | dare_ties | consensus
        (formulas: `sparseft.merge.METHODS[name].formula`, module docstring of methods.py).
    weights, density: one value for all models or one per model; each value a number, a list
        interpolated across layers (mergekit's gradients) or a list of {filter, value}.
        density ∈ (0, 1]: ties keeps the top int(ρ·n) |τ| per tensor (or per model with
        trim="global"); dare keeps each entry with probability ρ (seeded per (seed, tensor, task)).
    scale: mergekit's `lambda` (a number or per-layer list) multiplying the merged task vector.
    normalize, rescale: override the method's defaults (as mergekit's parameters of those names).
    consensus_lambda, consensus_k: the TALL-mask consensus λ_c and k (method="consensus").
    lines: None | (α, β) | "auto" | ("auto", β) | {"alpha", "beta", "overrides": {regex: λ}}:
        LiNeS λ(ℓ) = α + β·(ℓ−1)/(L−1) multiplies the merged task vector (see merge/lines.py).
    dtype: output dtype of floating tensors; default: each tensor keeps the base's dtype.
        Inputs may have any floating dtypes (mixed too); all math is float32 and rounds once.
    out: output directory (sharded safetensors + index, the base's config/generation
        config/tokenizer files); written atomically; an existing one is refused unless
        overwrite=True. out=None returns {name: tensor} instead (held in memory).
    Returns the output path, or the state dict when out is None.
    """
    plan = _Plan(base, models, method, weights, density, lines, dtype, device, backend, seed, normalize, rescale,
                 scale, trim, consensus_lambda, consensus_k, num_layers)
    if out is not None:
        mio.check_output(out, overwrite, [base, *models])
        mio.AtomicOutput(out, overwrite)  # checks the parent exists
    base_src = mio.open_source(base, "base")
    model_srcs = [mio.open_source(m, f"models[{i}]", base=base_src) for i, m in enumerate(models)]
    mio.check_compatible(base_src, model_srcs)
    plan.layers = num_layers or _num_layers(base_src.config or _first_config(model_srcs), base_src.names)
    merged_names = [n for n in base_src.names if base_src.meta[n][1].is_floating_point]
    device = plan.device

    if plan.method.trim == "magnitude" and plan.trim == "global":
        total = sum(torch.Size(base_src.meta[n][0]).numel() for n in merged_names)
        plan.global_thresholds = []
        for i, m in enumerate(model_srcs):
            k = max(1, int(plan.density[i] * total))
            plan.global_thresholds.append(
                None if plan.density[i] >= 1 or k >= total
                else float(kth_largest_abs_diff(_Pairs(base_src, m, merged_names, device), k)[0]))

    schedule = None
    if plan.lines is not None:
        alpha, beta, overrides = plan.lines
        if alpha == "auto":
            alpha = _auto_alpha(plan, base_src, model_srcs, merged_names)
            if beta is None:
                beta = max(0.0, 1.0 - alpha)
        schedule = LinesSchedule(alpha, beta, plan.layers, overrides)
        plan.lines_alpha, plan.lines_beta = alpha, beta

    def tensors():
        for name in _progress(base_src.names, progress, len(base_src.names), "merge"):
            base_t = _load(base_src, name, device)
            tuned = [_load(m, name, device) for m in model_srcs]
            if name not in merged_names:
                yield name, base_t.cpu()
                continue
            result = plan.merge_one(name, base_t, tuned, schedule(name) if schedule else 1.0,
                                    plan.out_dtype(name, base_src))
            del tuned, base_t
            yield name, result.cpu()

    try:
        if out is None:
            return dict(tensors())
        entries = [(n, base_src.meta[n][0], plan.out_dtype(n, base_src)) for n in base_src.names]
        config_dir = base_src.directory or next((m.directory for m in model_srcs if m.directory), None)
        with mio.AtomicOutput(out, overwrite) as tmp:
            writer = mio.ShardWriter(tmp, entries, mio.parse_size(max_shard_size))
            try:
                for name, tensor in tensors():
                    writer.write(name, tensor)
                writer.close()
            finally:
                writer.abort()
            mio.copy_side_files(config_dir, tmp, str(plan.dtype).removeprefix("torch.") if plan.dtype else None)
        return os.path.abspath(os.fspath(out))
    finally:
        base_src.close()
        for m in model_srcs:
            m.close()


def _first_config(sources):
    return next((s.config for s in sources if s.config), None)


def _auto_alpha(plan, base_src, model_srcs, names):
    """LiNeS multi-task α = (1/T)·‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ over the whole model (first streaming pass)."""
    sum_norm = merged_norm = 0.0
    for name in names:
        base_t = _load(base_src, name, plan.device)
        tuned = [_load(m, name, plan.device) for m in model_srcs]
        b = base_t.float()
        sum_norm += float(sum(x.float() - b for x in tuned).abs().sum(dtype=torch.float64))
        merged = plan.merge_one(name, base_t, tuned, 1.0, torch.float32)
        merged_norm += float((merged - b).abs().sum(dtype=torch.float64))
    if merged_norm == 0:
        raise ValueError("lines='auto': the merged task vector is zero; give alpha explicitly")
    return sum_norm / (len(model_srcs) * merged_norm)


def lines(base, model, alpha, beta=None, out=None, *, overrides=None, dtype=None, device="cpu", backend=None,
          num_layers=None, overwrite=False, max_shard_size="5GB", progress=False):
    """Single-task LiNeS: θ = θ₀ + λ(ℓ)·(θ_ft − θ₀), λ(ℓ) = α + β·(ℓ−1)/(L−1) (β = 1 − α by default),
    parameters outside the residual blocks get α (or an `overrides` {regex: λ} value)."""
    spec = {"alpha": alpha, "beta": (1.0 - alpha if beta is None and isinstance(alpha, (int, float)) else beta),
            "overrides": overrides}
    return merge(base, [model], "task_arithmetic", lines=spec, out=out, dtype=dtype, device=device,
                 backend=backend, num_layers=num_layers, overwrite=overwrite, max_shard_size=max_shard_size,
                 progress=progress)
