"""SparseAdamW against dense torch AdamW and a naive masked AdamW: step time and state bytes.

``run(...)`` returns one dict per (shape, density, method); ``sparseft bench sparse`` uses it.
Methods:
  torch_adamw          torch.optim.AdamW on the whole weight (fused=True where supported,
                       else foreach): the baseline of every ratio
  naive_masked_adamw   index_select of the dense grad into a compact copy, AdamW on it,
                       index_copy_ back (what LIFT-style code does)
  sparse_adamw_dense_grad[<backend>]      SparseAdamW, the dense grad gathered in the kernel
  sparse_adamw_compact_grad[<backend>]    SparseAdamW on sparsified values (compact grad,
                                          the sparseft.sparsify path)
state_bytes counts optimizer state (moments, step counts); mask_bytes the indices, which a
sparsified model holds anyway.

    python bench/bench_sparse_adamw.py --device cpu --repeats 10
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn

from sparseft import _backends
from sparseft.optim import SparseAdamW

SHAPES = ((49152, 576), (4096, 4096))
DENSITIES = (0.01, 0.05, 0.20)
_WARMUP = 2


class _CompactValues(nn.Module):
    """A sparsified weight as sparseft.sparsify makes it (interface: weight, weight_indices,
    weight_values carrying _sparseft_module, reindex_), without the linear forward."""

    def __init__(self, weight, indices):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_indices", indices)
        self.weight_values = nn.Parameter(weight.view(-1)[indices.long()].clone())
        self.weight_values._sparseft_module = self

    def reindex_(self, new_indices):
        self.weight_indices = new_indices
        self.weight_values.data = self.weight.detach().view(-1)[new_indices.long()].clone()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats, device):
    for _ in range(_WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tensor_bytes(state, skip=("indices",)):
    return sum(t.numel() * t.element_size() for entry in state.values() for k, t in entry.items()
               if isinstance(t, torch.Tensor) and k not in skip)


def _dense_adamw(param):
    try:
        opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
        opt.step()  # fused support is checked at the first step
        return opt, "fused"
    except RuntimeError:
        return torch.optim.AdamW([param], lr=1e-4, foreach=True), "foreach"


def _random_mask(numel, density, device, generator):
    nnz = max(1, int(round(numel * density)))
    return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(torch.int32).to(device)


def _naive_masked(weight, grad, idx):
    idx = idx.long()  # index_copy_ takes int64 only
    values = nn.Parameter(weight.view(-1).index_select(0, idx))
    opt = torch.optim.AdamW([values], lr=1e-4, foreach=True)
    flat_w, flat_g = weight.view(-1), grad.view(-1)

    def step():
        values.grad = flat_g.index_select(0, idx)
        opt.step()
        flat_w.index_copy_(0, idx, values.detach())

    return step, opt


def sparse_backends(device):
    """SparseAdamW backends worth timing on ``device`` (the Triton interpreter is not)."""
    device_type = torch.device(device).type
    names = ("torch", "cpu") if device_type == "cpu" else ("torch", "triton", "cuda")
    return [b for b in names if _backends.availability(b, device_type)[0]]


def run(shapes=SHAPES, densities=DENSITIES, dtype=torch.float32, device="cpu", repeats=10):
    """Rows of {shape, density, method, backend, step_s, state_bytes, mask_bytes, step_ratio,
    state_ratio} for every shape, density and method; ratios are to torch AdamW."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        numel = shape[0] * shape[1]
        weight = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
        grad = torch.randn(shape, generator=generator).to(dtype=dtype, device=device) * 1e-3
        base = dict(shape=list(shape), dtype=str(dtype).replace("torch.", ""), device=str(device))

        dense = nn.Parameter(weight.clone())
        dense.grad = grad
        opt, flavour = _dense_adamw(dense)
        dense_s = _median_seconds(opt.step, repeats, device)
        dense_bytes = _tensor_bytes(opt.state)
        rows.append(dict(base, density=1.0, method="torch_adamw", backend=flavour, step_s=dense_s,
                         state_bytes=dense_bytes, mask_bytes=0, step_ratio=1.0, state_ratio=1.0))
        del opt, dense

        for density in densities:
            idx = _random_mask(numel, density, device, generator)
            mask_bytes = idx.numel() * idx.element_size()
            candidates = [("naive_masked_adamw", "torch", *_naive_masked(weight.clone(), grad, idx))]
            for backend in sparse_backends(device):
                p = nn.Parameter(weight.clone())
                p.grad = grad
                opt = SparseAdamW([p], masks=[idx], lr=1e-4, backend=backend)
                candidates.append(("sparse_adamw_dense_grad", backend, opt.step, opt))
                module = _CompactValues(weight.clone(), idx)
                module.weight_values.grad = grad.view(-1)[idx.long()].clone()
                opt = SparseAdamW([module.weight_values], lr=1e-4, backend=backend)
                candidates.append(("sparse_adamw_compact_grad", backend, opt.step, opt))
            for method, backend, step, opt in candidates:
                seconds = _median_seconds(step, repeats, device)
                state_bytes = _tensor_bytes(opt.state)
                rows.append(dict(base, density=density, method=method, backend=backend, step_s=seconds,
                                 state_bytes=state_bytes, mask_bytes=mask_bytes, step_ratio=seconds / dense_s,
                                 state_ratio=state_bytes / dense_bytes))
    return rows


def _main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(dtype=getattr(torch, args.dtype), device=args.device, repeats=args.repeats)
    print(f"{'shape':>12} {'density':>7} {'method':<26} {'backend':<8} {'step ms':>9} {'x AdamW':>8} "
          f"{'state MB':>9} {'x AdamW':>8} {'mask MB':>8}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['density']:>7.2f} {r['method']:<26} {r['backend']:<8} "
              f"{r['step_s'] * 1e3:>9.2f} {r['step_ratio']:>8.3f} {r['state_bytes'] / 2**20:>9.1f} "
              f"{r['state_ratio']:>8.3f} {r['mask_bytes'] / 2**20:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    _main()
