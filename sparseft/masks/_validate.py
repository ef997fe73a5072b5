"""The mask contract shared by selectors, optimizers, sparse linears and deltas.

A mask is a sorted, duplicate-free, 1-D tensor of flat indices into ``param.view(-1)``:
int32 while the parameter has fewer than 2**31 elements, int64 from there on.
"""

import torch

from sparseft.ops._checks import check_values_enabled

INT32_LIMIT = 2**31


def mask_dtype(numel):
    """The index dtype a mask for a tensor of ``numel`` elements must have."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def validate_mask(indices, numel, name):
    """Raise TypeError/ValueError naming ``name`` unless ``indices`` is a valid mask.

    Dtype and shape are always checked. Order and range read the data: always on CPU; on an
    accelerator this costs one host synchronisation and is skipped with
    SPARSEFT_CHECK_VALUES=0 (see sparseft.ops._checks).
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"mask {name!r}: expected a torch.Tensor of flat indices, got {type(indices).__name__}")
    expected = mask_dtype(numel)
    if indices.dtype != expected:
        raise TypeError(
            f"mask {name!r}: expected dtype {expected} for a tensor of {numel} elements, got {indices.dtype}"
        )
    if indices.dim() != 1:
        raise ValueError(f"mask {name!r}: expected a 1-D tensor of flat indices, got shape {tuple(indices.shape)}")
    if indices.numel() > numel:
        raise ValueError(f"mask {name!r}: {indices.numel()} indices for a tensor of only {numel} elements")
    if indices.numel() == 0 or not check_values_enabled(indices):
        return
    not_increasing = indices[1:] <= indices[:-1]
    bad = torch.stack([not_increasing.any(), indices[0] < 0, indices[-1] >= numel]).cpu()
    if bad[0]:
        pos = int(not_increasing.nonzero()[0, 0])
        a, b = int(indices[pos]), int(indices[pos + 1])
        kind = "duplicate" if a == b else "unsorted"
        raise ValueError(f"mask {name!r}: indices must be sorted and unique; {kind} entries {a}, {b} at positions {pos}, {pos + 1}")
    if bad[1] or bad[2]:
        lo, hi = int(indices.min()), int(indices.max())
        raise ValueError(f"mask {name!r}: indices must lie in [0, {numel}), got range [{lo}, {hi}]")
