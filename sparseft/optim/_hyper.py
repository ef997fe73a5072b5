"""The AdamW hyper-parameter checks every sparseft optimizer runs on its defaults and groups."""

import torch


def check_adamw_hyper(group, where):
    """lr, betas, eps and weight_decay of ``group``; ``where`` prefixes the argument names."""
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
    elif not lr >= 0.0:
        raise ValueError(f"{where}lr: expected >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}betas: expected two floats in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"{where}eps: expected >= 0, got {eps}")
    if not wd >= 0.0:
        raise ValueError(f"{where}weight_decay: expected >= 0, got {wd}")
