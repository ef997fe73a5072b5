"""SparseDelta: the trained change of a model as flat indices + values per tensor.

Composable sparse fine-tuning: build a delta from (tuned, base, masks) or from a model
sparsified by sparseft.sparsify, save it (safetensors; size proportional to nnz), add it
to a model, take it off again, and sum several deltas (e.g. a language and a task delta).
"""

import json
import os
import weakref
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparseft.masks._validate import mask_dtype, validate_mask

FORMAT = "sparseft.delta"
FORMAT_VERSION = "1"


def _dtype_from_name(name):
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _compute_dtype(*dtypes):
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _model_tensors(model, argument="model"):
    """{name: tensor} a delta may touch: a module's parameters and buffers, or a state dict."""
    if isinstance(model, nn.Module):
        return {**dict(model.named_buffers()), **dict(model.named_parameters())}
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"{argument}: expected an nn.Module or a state dict, got {type(model).__name__}")


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class SparseDelta:
    """{tensor name: (sorted flat indices, values)} plus the full shapes and user metadata.

    values default to float32 (float64 for float64 weights) so that low-precision weights
    lose nothing in the difference; pass dtype= to store them narrower.
    """

    def __init__(self, indices, values, shapes, metadata=None):
        if set(indices) != set(values) or set(indices) != set(shapes):
            raise ValueError("SparseDelta: indices, values and shapes must have the same names")
        self.indices, self.values = dict(indices), dict(values)
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.metadata = dict(metadata or {})
        for name in self.indices:
            numel = torch.Size(self.shapes[name]).numel()
            validate_mask(self.indices[name], numel, name)
            v = self.values[name]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != self.indices[name].shape:
                raise ValueError(f"values {name!r}: expected a floating tensor of shape {tuple(self.indices[name].shape)}")
        self._applied = []  # (weakref to the tensor, name, values it had, values written, scale), newest last

    # construction -------------------------------------------------------------------------

    @classmethod
    def from_models(cls, tuned, base, masks, dtype=None, metadata=None):
        """values[name] = tuned[name] - base[name] at masks[name]; tuned/base: modules or state dicts."""
        tuned_tensors, base_tensors = _model_tensors(tuned, "tuned"), _model_tensors(base, "base")
        indices, values, shapes = {}, {}, {}
        for name, mask in masks.items():
            for label, tensors in (("tuned", tuned_tensors), ("base", base_tensors)):
                if name not in tensors:
                    raise ValueError(f"{label}: no tensor named {name!r}")
            t, b = tuned_tensors[name].detach(), base_tensors[name].detach()
            if t.shape != b.shape:
                raise ValueError(f"{name!r}: tuned shape {tuple(t.shape)} != base shape {tuple(b.shape)}")
            validate_mask(mask, t.numel(), name)
            index = mask.to(t.device).long()
            compute = _compute_dtype(t.dtype, b.dtype)
            diff = t.reshape(-1)[index].to(compute) - b.reshape(-1).to(t.device)[index].to(compute)
            indices[name] = mask.to(t.device)
            values[name] = diff.to(dtype or _compute_dtype(t.dtype))
            shapes[name] = tuple(t.shape)
        return cls(indices, values, shapes, metadata)

    @classmethod
    def from_sparsified(cls, model, base, dtype=None, metadata=None):
        """The delta of every sparsified linear (a module with `weight_indices` and `weight`)
        of `model` against `base` (the model before training, a module or state dict)."""
        masks = {}
        for module_name, module in model.named_modules():
            if hasattr(module, "weight_indices") and isinstance(getattr(module, "weight", None), torch.Tensor):
                masks[(module_name + "." if module_name else "") + "weight"] = module.weight_indices
        if not masks:
            raise ValueError("from_sparsified: the model has no sparsified modules (no `weight_indices`)")
        return cls.from_models(model, base, masks, dtype, metadata)

    # properties ---------------------------------------------------------------------------

    @property
    def nnz(self):
        return sum(i.numel() for i in self.indices.values())

    @property
    def density(self):
        """nnz over the number of elements of the tensors the delta touches."""
        numel = sum(torch.Size(s).numel() for s in self.shapes.values())
        return self.nnz / numel if numel else 0.0

    def __repr__(self):
        return f"SparseDelta(tensors={len(self.indices)}, nnz={self.nnz}, density={self.density:.4%})"

    # I/O ----------------------------------------------------------------------------------

    def save(self, path, metadata=None):
        """safetensors: `<name>.indices`, `<name>.values`; header: format version, dtypes,
        shapes, user metadata (self.metadata updated with `metadata`). Written to a temporary
        file and renamed, so a failed save leaves no partial file."""
        user = {**self.metadata, **(metadata or {})}
        tensors = {}
        for name in self.indices:
            tensors[name + ".indices"] = self.indices[name].detach().contiguous().cpu()
            tensors[name + ".values"] = self.values[name].detach().contiguous().cpu()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtypes": json.dumps({n: str(v.dtype) for n, v in self.values.items()}),
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "metadata": json.dumps(user),
        }
        path = os.fspath(path)
        tmp = path + ".tmp"
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path, device="cpu"):
        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a sparseft delta file (format={header.get('format')!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported delta format version {header.get('format_version')!r}")
        shapes, dtypes = json.loads(header["shapes"]), json.loads(header["dtypes"])
        tensors = load_file(path, device=str(device))
        indices, values = {}, {}
        for name in shapes:
            if name + ".indices" not in tensors or name + ".values" not in tensors:
                raise ValueError(f"{path}: missing indices or values for {name!r}")
            indices[name], values[name] = tensors[name + ".indices"], tensors[name + ".values"]
            if values[name].dtype != _dtype_from_name(dtypes[name]):
                raise ValueError(f"{path}: values of {name!r} are {values[name].dtype}, header says {dtypes[name]}")
        return cls(indices, values, shapes, json.loads(header["metadata"]))

    # applying -----------------------------------------------------------------------------

    def _targets(self, model):
        """Check every name, shape and layout before anything is written."""
        tensors = _model_tensors(model)
        for name, shape in self.shapes.items():
            if name not in tensors:
                raise ValueError(f"model: no tensor named {name!r}")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"model: {name!r} has shape {tuple(t.shape)}, the delta expects {shape}")
            if not t.is_floating_point() or not t.is_contiguous():
                raise ValueError(f"model: {name!r} must be a contiguous floating-point tensor")
        return {name: tensors[name] for name in self.shapes}

    def apply(self, model, scale=1.0):
        """model[name].flat[indices] += scale * values, in place; returns model.

        Names and shapes are all checked first, so a delta that does not fit leaves the
        model untouched. The values written are remembered, so revert() restores the
        original bits exactly unless the entries were changed in between.
        """
        targets = self._targets(model)
        with torch.no_grad():
            for name, tensor in targets.items():
                flat, index = tensor.detach().view(-1), self.indices[name].to(tensor.device).long()
                old = flat[index]
                compute = _compute_dtype(tensor.dtype, self.values[name].dtype)
                new = (old.to(compute) + scale * self.values[name].to(tensor.device, compute)).to(tensor.dtype)
                flat[index] = new
                self._applied.append((weakref.ref(tensor), name, old, new, scale))
                _resync_sparse_linear(model, name)
        return model

    def revert(self, model, scale=None):
        """Undo apply(): entries still holding what apply() wrote get their original bits
        back; others (and models this delta was not applied to in this process) get
        scale * values subtracted, scale defaulting to the one apply() used, else 1.0."""
        targets = self._targets(model)
        with torch.no_grad():
            for name, tensor in targets.items():
                flat, index = tensor.detach().view(-1), self.indices[name].to(tensor.device).long()
                record = self._pop_record(name, tensor)
                step = scale if scale is not None else (record[4] if record else 1.0)
                current = flat[index]
                compute = _compute_dtype(tensor.dtype, self.values[name].dtype)
                restored = (current.to(compute) - step * self.values[name].to(tensor.device, compute)).to(tensor.dtype)
                if record is not None:
                    untouched = _bits(current) == _bits(record[3])
                    restored = torch.where(untouched, record[2], restored)
                flat[index] = restored
                _resync_sparse_linear(model, name)
        return model

    def _pop_record(self, name, tensor):
        self._applied = [r for r in self._applied if r[0]() is not None]
        for position in range(len(self._applied) - 1, -1, -1):
            ref, record_name = self._applied[position][:2]
            if record_name == name and ref() is tensor:
                return self._applied.pop(position)
        return None

    # composition --------------------------------------------------------------------------

    @staticmethod
    def compose(*deltas):
        """One delta equal to the sum of `deltas`: union of indices, values summed."""
        if not deltas or not all(isinstance(d, SparseDelta) for d in deltas):
            raise TypeError("compose: expected one or more SparseDelta objects")
        indices, values, shapes = {}, {}, {}
        for name in dict.fromkeys(n for d in deltas for n in d.shapes):
            parts = [d for d in deltas if name in d.shapes]
            shape = parts[0].shapes[name]
            if any(d.shapes[name] != shape for d in parts):
                raise ValueError(f"compose: deltas disagree on the shape of {name!r}")
            device = parts[0].indices[name].device
            dtype = _compute_dtype(*(d.values[name].dtype for d in parts))
            all_indices = torch.cat([d.indices[name].to(device).long() for d in parts])
            union, position = torch.unique(all_indices, sorted=True, return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=dtype, device=device)
            summed.index_add_(0, position, torch.cat([d.values[name].to(device, dtype) for d in parts]))
            indices[name] = union.to(mask_dtype(torch.Size(shape).numel()))
            values[name], shapes[name] = summed, shape
        return SparseDelta(indices, values, shapes, {"composed_of": [d.metadata for d in deltas]})

    def scaled(self, lines, num_layers=None):
        """A new SparseDelta with LiNeS layer scaling, still sparse: values of a tensor in block ℓ
        times λ(ℓ) = α + β·(ℓ−1)/(L−1), outside the blocks α. lines=(α, β) or {alpha, beta,
        overrides}; L = num_layers, else the largest block index touched + 1 (sparseft.merge.deltas)."""
        from sparseft.merge.deltas import scale_delta
        return scale_delta(self, lines, num_layers)

    def __add__(self, other):
        if not isinstance(other, SparseDelta):
            return NotImplemented
        return SparseDelta.compose(self, other)


def _resync_sparse_linear(model, name):
    """A SparseLinear's `weight_values` mirrors weight.view(-1)[weight_indices]; keep it so."""
    if not isinstance(model, nn.Module) or not name.endswith("weight"):
        return
    module_name = name[: -len("weight")].rstrip(".")
    module = model.get_submodule(module_name)
    values = getattr(module, "weight_values", None)
    if isinstance(values, torch.Tensor) and hasattr(module, "weight_indices"):
        values.data.copy_(module.weight.detach().view(-1)[module.weight_indices.long()])
