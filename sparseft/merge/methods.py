"""Merge methods: each maps its parameters, per tensor, to the options of the fused op.

Notation, per element of a tensor with base θ₀ and fine-tunes θ_t (t = 1..T):
τ_t = θ_t − θ₀ (float32), w_t the model's `weight`, ρ_t its `density`, λ the shared
`lambda` (times LiNeS λ(ℓ) when `lines=` is given). Parameter values may be lists
interpolated across layers, exactly as mergekit does (see `evaluate_setting`).

The op (`sparseft.ops.merge.merge_tensor`) computes, in one pass,
    k_t = [|τ_t| ≥ θ_t]·[keep_t(i)],  d_t = w_t·k_t·τ_t / p_t,
    m_t = [sign d_t = sign Σ_s d_s] (elect_sign) else 1,   M = Σ_t m_t d_t,
    M /= Σ_t w_t m_t (normalize; a |divisor| < 1e-8 counts as 1),
    M *= [#{t : |d_t| ≥ λ_c·|M − d_t|} ≥ k] (consensus),   θ = round(θ₀ + λ·M).
"""

import math
from dataclasses import dataclass

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "consensus")

# TALL-mask consensus (Wang et al. 2024, "Localizing Task Information for Improved Model
# Merging and Compression"): the paper picks each task's λ from {0.2, 0.3, 0.4, 0.5, 0.6} on
# validation data; without validation data the middle of that grid is the default here, and
# k = 2 (keep weights important to at least two tasks) is the paper's consensus default.
CONSENSUS_LAMBDA = 0.4
CONSENSUS_K = 2


@dataclass(frozen=True)
class Method:
    """A merge method: which op options it uses and its default parameters (as mergekit's)."""

    name: str
    formula: str
    trim: str = None            # None | "magnitude" (TIES top-ρ per tensor or global) | "random" (DARE)
    elect_sign: bool = False
    normalize: bool = False     # default of the `normalize` parameter
    rescale: bool = False       # default of the `rescale` parameter (DARE's 1/p)
    consensus: bool = False
    zero_base: bool = False     # linear: θ = Σ w_t θ_t (/ Σ w_t); the base takes no part


METHODS = {
    "linear": Method(
        "linear", "θ = Σ_t w_t θ_t / Σ_t w_t   (normalize=True, the default; else Σ_t w_t θ_t). "
        "The base model only supplies the config and tokenizer.", normalize=True, zero_base=True),
    "task_arithmetic": Method(
        "task_arithmetic", "θ = θ₀ + λ·Σ_t w_t τ_t   (normalize=True divides by Σ_t w_t)"),
    "ties": Method(
        "ties", "k_t = [|τ_t| ≥ ρ_t-quantile of |τ_t|] (top int(ρ_t·n) per tensor, or over the whole "
        "model with trim='global'); d_t = w_t k_t τ_t; σ = sign Σ_t d_t (0 → +); "
        "θ = θ₀ + λ·Σ_t [sign d_t = σ] d_t / Σ_t [sign d_t = σ] w_t",
        trim="magnitude", elect_sign=True, normalize=True),
    "dare_linear": Method(
        "dare_linear", "k_t ~ Bernoulli(ρ_t) (counter hash of (seed, tensor, task, index)); "
        "θ = θ₀ + λ·Σ_t w_t k_t τ_t / ρ_t   (rescale=False drops the 1/ρ_t)",
        trim="random", rescale=True),
    "dare_ties": Method(
        "dare_ties", "d_t = w_t k_t τ_t / ρ_t with k_t ~ Bernoulli(ρ_t); σ = sign Σ_t d_t; "
        "θ = θ₀ + λ·Σ_t [sign d_t = σ] d_t", trim="random", elect_sign=True, rescale=True),
    "consensus": Method(
        "consensus", "TALL-mask consensus over task arithmetic: M = Σ_t w_t τ_t; "
        "mask_t = [|w_t τ_t| ≥ λ_c·|M − w_t τ_t|]; θ = θ₀ + λ·[Σ_t mask_t ≥ k]·M  "
        f"(λ_c = consensus_lambda, default {CONSENSUS_LAMBDA}; k = consensus_k, default {CONSENSUS_K})",
        consensus=True),
}

def get_method(name):
    if name not in METHODS:
        raise ValueError(f"method: unknown merge method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# parameter settings: a number, a list of numbers (interpolated across layers) or a list of
# {filter, value} conditions (first whose filter is a substring of the tensor name, or "*"/None).


def check_setting(setting, argument):
    """Validate a setting's structure; returns it unchanged."""
    if isinstance(setting, bool) or setting is None:
        raise ValueError(f"{argument}: expected a number, a list of numbers or a list of {{filter, value}}, "
                     f"got {setting!r}")
    if isinstance(setting, (int, float)):
        if not math.isfinite(setting):
            raise ValueError(f"{argument}: must be finite, got {setting!r}")
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (list, tuple)) and setting:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            for v in setting:
                check_setting(v, argument)
            return list(setting)
        if all(isinstance(v, dict) for v in setting):
            for cond in setting:
                unknown = set(cond) - {"filter", "value"}
                if unknown or "value" not in cond:
                    raise ValueError(f"{argument}: a condition needs 'value' (and optionally 'filter'), got {cond!r}")
                check_setting(cond["value"], argument)
            return list(setting)
    raise ValueError(f"{argument}: expected a number, a list of numbers or a list of {{filter, value}}, "
                     f"got {setting!r}")


def evaluate_setting(setting, name, t):
    """mergekit's rule: a list [v_0..v_{n-1}] at depth t ∈ [0, 1] is the linear interpolation at
    t·(n−1); conditions pick the first matching filter. None when no condition matches."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(v, (int, float)) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return float((1 - frac) * setting[i0] + frac * setting[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (name and f in name):
            return evaluate_setting(cond["value"], name, t)
    return None


def layer_t(name, layers):
    """mergekit's t: block index / (L − 1) inside blocks (1 when L = 1), 0 outside them."""
    from sparseft.masks.targets import block_index
    b = block_index(name)
    if b is None or not layers:
        return 0.0
    return 1.0 if layers == 1 else b / (layers - 1)
