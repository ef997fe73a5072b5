"""MaskSet: the masks of a model, {parameter name: sorted flat indices}, with I/O and a report."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparseft.masks._validate import validate_mask

FORMAT = "sparseft.masks"
FORMAT_VERSION = "1"


class DensityReport(dict):
    """{"tensors": {name: {"nnz", "numel", "density"}}, "total": {...}}; str() is a table."""

    def __str__(self):
        rows = [(name, r["nnz"], r["numel"], r["density"]) for name, r in self["tensors"].items()]
        rows.append(("total", self["total"]["nnz"], self["total"]["numel"], self["total"]["density"]))
        if "model" in self:
            rows.append(("model (all parameters)", self["model"]["nnz"], self["model"]["numel"], self["model"]["density"]))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'tensor':<{width}}  {'nnz':>12}  {'numel':>12}  {'density':>8}"]
        lines += [f"{n:<{width}}  {z:>12}  {t:>12}  {d:>8.4%}" for n, z, t, d in rows]
        return "\n".join(lines)


def _row(nnz, numel):
    return {"nnz": nnz, "numel": numel, "density": nnz / numel if numel else 0.0}


class MaskSet(dict):
    """Masks for a model: {parameter name: sorted unique int32/int64 flat indices}.

    shapes: {name: shape} of the masked tensors (filled by the selectors; needed to check
    ranges and to report density without the model). metadata: JSON-serialisable facts
    about how the masks were chosen (method and its arguments).
    """

    def __init__(self, masks=(), *, shapes=None, metadata=None):
        super().__init__(masks)
        self.shapes = {name: tuple(shape) for name, shape in (shapes or {}).items()}
        self.metadata = dict(metadata or {})

    def validate(self, model=None):
        """Check every mask against its shape (from `model` when given, else `shapes`)."""
        params = dict(model.named_parameters()) if model is not None else {}
        for name, indices in self.items():
            if model is not None:
                if name not in params:
                    raise ValueError(f"mask {name!r}: the model has no parameter of that name")
                numel = params[name].numel()
            elif name in self.shapes:
                numel = _numel(self.shapes[name])
            else:
                raise ValueError(f"mask {name!r}: no shape recorded; pass the model")
            validate_mask(indices, numel, name)
        return self

    def to(self, device):
        return MaskSet({n: i.to(device) for n, i in self.items()}, shapes=self.shapes, metadata=self.metadata)

    def save(self, path):
        missing = [n for n in self if n not in self.shapes]
        if missing:
            raise ValueError(f"MaskSet.save: no shape recorded for {missing}")
        self.validate()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shapes": json.dumps({n: list(self.shapes[n]) for n in self}),
            "metadata": json.dumps(self.metadata),
        }
        save_file({n: i.detach().contiguous().cpu() for n, i in self.items()}, str(path), metadata=header)

    @classmethod
    def load(cls, path, device="cpu"):
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a sparseft mask file (format={header.get('format')!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported mask format version {header.get('format_version')!r}")
        tensors, shapes = load_file(str(path), device=str(device)), json.loads(header["shapes"])
        if set(tensors) != set(shapes):
            raise ValueError(f"{path}: tensors and recorded shapes name different parameters")
        # safetensors sorts names; the shapes header keeps the original order
        masks = cls({n: tensors[n] for n in shapes}, shapes=shapes, metadata=json.loads(header["metadata"]))
        return masks.validate()

    def density_report(self, model=None):
        """Per-tensor and total nnz/numel/density; with `model`, also density over all its parameters."""
        params = dict(model.named_parameters()) if model is not None else {}
        tensors = {}
        for name, indices in self.items():
            if model is not None and name not in params:
                raise ValueError(f"mask {name!r}: the model has no parameter of that name")
            if model is None and name not in self.shapes:
                raise ValueError(f"mask {name!r}: no shape recorded; pass the model")
            numel = params[name].numel() if model is not None else _numel(self.shapes[name])
            tensors[name] = _row(indices.numel(), numel)
        nnz = sum(r["nnz"] for r in tensors.values())
        report = DensityReport(tensors=tensors, total=_row(nnz, sum(r["numel"] for r in tensors.values())))
        if model is not None:
            report["model"] = _row(nnz, sum(p.numel() for p in params.values()))
        return report


def _numel(shape):
    return int(torch.Size(shape).numel())
