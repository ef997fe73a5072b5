"""LiNeS (Layer-increasing Network Scaling, Wang et al. 2024): scale a task vector by depth.

    λ(ℓ) = α + β·(ℓ−1)/(L−1)        for the residual blocks ℓ = 1..L   (λ(1) = α, λ(L) = α + β)
    λ    = α                         for parameters outside the blocks (embeddings, final norm, head)

Blocks come from parameter names (``layers.N.``, ``h.N.``, ``blocks.N.``: block ℓ = N + 1;
`sparseft.masks.targets.block_index`), L from the config's ``num_hidden_layers`` (``n_layer``)
or else the largest block index + 1. With L = 1 the only block gets α + β. `overrides`
({regex: λ}, first match wins) set λ for matching names, inside blocks or not.

Single task (`lines(base, model, alpha, beta, out)`): θ = θ₀ + λ(ℓ)·(θ_ft − θ₀); the paper's
grid is α ∈ {1.0, 0.9, …, 0.0} with β = 1 − α, so the last block keeps its full update.
Multi-task (`merge(..., lines=...)`): the merged task vector of any method is scaled by λ(ℓ);
`lines="auto"` sets α = (1/T)·‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ (whole-model L1 norms, one streaming
pass; = 1/T for plain task arithmetic), and β = 1 − α unless given as `("auto", β)`.
"""

import math
import re

from sparseft.masks.targets import block_index


def _check_number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"lines: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def num_layers(config, names):
    """L: the config's num_hidden_layers / n_layer, else the largest block index + 1 (None: no blocks)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config, dict) and isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    blocks = [b for b in (block_index(n) for n in names) if b is not None]
    return max(blocks) + 1 if blocks else None


def depth_fraction(name, layers):
    """(ℓ−1)/(L−1) for a block parameter (1.0 when L = 1), None outside the blocks."""
    b = block_index(name)
    if b is None or not layers:
        return None
    if b >= layers:
        raise ValueError(f"lines: {name!r} lies in block {b}, but the model has {layers} layers")
    return 1.0 if layers == 1 else b / (layers - 1)


class LinesSchedule:
    """λ(name) for given α, β, L and regex overrides."""

    def __init__(self, alpha, beta, layers, overrides=None):
        self.alpha = _check_number(alpha, "alpha")
        self.beta = _check_number(beta, "beta")
        self.layers = layers
        self.overrides = []
        for pattern, value in (overrides or {}).items():
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"lines overrides: bad regex {pattern!r}: {exc}") from None
            self.overrides.append((compiled, _check_number(value, f"override {pattern!r}")))

    def __call__(self, name):
        for pattern, value in self.overrides:
            if pattern.search(name):
                return value
        fraction = depth_fraction(name, self.layers)
        return self.alpha if fraction is None else self.alpha + self.beta * fraction


def parse_lines(lines):
    """None | (α, β) | "auto" | ("auto", β) | {"alpha":…, "beta":…, "overrides":{…}} -> (α|"auto", β|None, overrides)."""
    if lines is None:
        return None
    overrides = None
    if isinstance(lines, dict):
        unknown = set(lines) - {"alpha", "beta", "overrides"}
        if unknown:
            raise ValueError(f"lines: unknown key {sorted(unknown)[0]!r} (expected alpha, beta, overrides)")
        alpha, beta, overrides = lines.get("alpha", "auto"), lines.get("beta"), lines.get("overrides")
    elif isinstance(lines, str):
        if lines != "auto":
            raise ValueError(f"lines: expected (alpha, beta), 'auto' or None, got {lines!r}")
        alpha, beta = "auto", None
    elif isinstance(lines, (tuple, list)) and len(lines) == 2:
        alpha, beta = lines
    else:
        raise ValueError(f"lines: expected (alpha, beta), 'auto' or None, got {lines!r}")
    if alpha != "auto":
        alpha = _check_number(alpha, "alpha")
        if beta is None:
            beta = 1.0 - alpha
    if beta is not None:
        beta = _check_number(beta, "beta")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError("lines: overrides must be a mapping {regex: lambda}")
    return alpha, beta, overrides
