"""SparseAdamW against dense torch AdamW and a naive masked AdamW: step time, bytes moved and
state bytes.

``run(...)`` times one weight per (shape, density) with random masks; ``run_masks(...)`` times
one step over many weights at once (a model's masked matrices, e.g. its LIFT masks) beside
random masks with the same number of entries per matrix. ``sparseft bench sparse`` uses both.
Methods:
  torch_adamw          torch.optim.AdamW on the whole weight (fused=True where supported,
                       else foreach): the baseline of every ratio
  copy                 dst.copy_(src) of COPY_BYTES: the machine's copy bandwidth, same run
  scatter_only         index_copy_ of the compact values into the weight: the scattered
                       stores alone, which every masked step makes (a floor for them)
  naive_masked_adamw   index_select of the dense grad into a compact copy, AdamW on it,
                       index_copy_ back (what LIFT-style code does)
  sparse_adamw_dense_grad[<backend>]      SparseAdamW, the dense grad gathered in the kernel
  sparse_adamw_compact_grad[<backend>]    SparseAdamW on sparsified values (compact grad,
                                          the sparseft.sparsify path)

Every method of one case is timed in the same rounds, each round calling each method once, so
a ratio compares calls made moments apart (on a shared machine single timings vary by several
times); rows give the median over the rounds and the quartiles of the per-round ratios.

bytes_moved is the memory traffic a step cannot avoid: torch AdamW reads and writes the
weight and both moments and reads the gradient (7 element sizes per parameter); SparseAdamW
reads per entry its index and gradient and reads and writes its values, moments and step
count, and moves two 64-byte transfers (read for ownership, write-back) per weight cache line
holding an entry, plus one per line of a dense gradient read at the mask; scatter_only reads
the int64 index and the value and moves the same weight lines; the copy reads and writes
COPY_BYTES. gbps = bytes_moved / step_s. state_bytes counts optimizer state (moments,
step counts); mask_bytes the indices, which a sparsified model holds anyway.

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
COPY_BYTES = 256 * 2**20  # well past the last-level cache
LINE_BYTES = 64
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


def _timed_rounds(fns, repeats, device):
    """{name: [seconds, one per round]}; each round calls every fn once, in order."""
    for fn in fns.values():
        for _ in range(_WARMUP):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _quartiles(values):
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def _tensor_bytes(state, skip=("indices",)):
    return sum(t.numel() * t.element_size() for entry in state.values() for k, t in entry.items()
               if isinstance(t, torch.Tensor) and k not in skip)


def _dense_adamw(params):
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        opt.step()  # fused support is checked at the first step
        return opt, "fused"
    except RuntimeError:
        return torch.optim.AdamW(params, lr=1e-4, foreach=True), "foreach"


def _random_mask(numel, nnz, device, generator):
    return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(torch.int32).to(device)


def lines_touched(t, idx):
    """Distinct 64-byte lines of ``t`` that hold an entry at ``idx`` (sorted)."""
    addresses = t.data_ptr() + idx.long() * t.element_size()
    return torch.unique_consecutive(addresses // LINE_BYTES).numel()


def _adamw_bytes(weights):
    return sum(7 * w.numel() * w.element_size() for w in weights)


def _sparse_bytes(weight, idx, grad=None):
    """Traffic of one SparseAdamW step; grad None: compact gradient and values."""
    state = idx.element_size() + 3 * 2 * 4  # index; moments and step count, read and written
    weight_lines = 2 * LINE_BYTES * lines_touched(weight, idx)  # read for ownership, written back
    if grad is None:  # compact gradient read, values read and written
        return idx.numel() * (state + 3 * weight.element_size()) + weight_lines
    return idx.numel() * state + weight_lines + LINE_BYTES * lines_touched(grad, idx)


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


def _scatter_only(weight, idx):
    target, idx = weight.clone().view(-1), idx.long()  # index_copy_ takes int64 only
    values = target[idx]
    step = lambda: target.index_copy_(0, idx, values)  # noqa: E731
    bytes_moved = idx.numel() * (idx.element_size() + values.element_size()) + 2 * LINE_BYTES * lines_touched(target, idx)
    return step, bytes_moved


def _copy(device):
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    return lambda: dst.copy_(src)


def sparse_backends(device):
    """SparseAdamW backends worth timing on ``device`` (the Triton interpreter is not)."""
    device_type = torch.device(device).type
    names = ("torch", "cpu") if device_type == "cpu" else ("torch", "triton", "cuda")
    return [b for b in names if _backends.availability(b, device_type)[0]]


def _rows(times, cases, base):
    """One row per timed case; ratios are per round to torch_adamw, bandwidths to the copy's."""
    dense, copy = times["torch_adamw"], times["copy"]
    copy_gbps = 2 * COPY_BYTES / statistics.median(copy) / 1e9
    rows = []
    for name, info in cases.items():
        seconds = statistics.median(times[name])
        ratios = [t / d for t, d in zip(times[name], dense)]
        row = dict(base, **info, step_s=seconds, step_ratio=statistics.median(ratios),
                   step_ratio_quartiles=_quartiles(ratios))
        if info.get("bytes_moved"):
            row["gbps"] = info["bytes_moved"] / seconds / 1e9
            row["gbps_vs_copy"] = row["gbps"] / copy_gbps
        rows.append(row)
    return rows


def run(shapes=SHAPES, densities=DENSITIES, dtype=torch.float32, device="cpu", repeats=10):
    """Rows of {shape, density, method, backend, step_s, step_ratio, step_ratio_quartiles,
    bytes_moved, gbps, gbps_vs_copy, lines_touched, state_bytes, mask_bytes, state_ratio} for every
    shape, density and method; ratios are to torch AdamW timed in the same rounds."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    copy = _copy(device)
    for shape in shapes:
        numel = shape[0] * shape[1]
        weight = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
        grad = torch.randn(shape, generator=generator).to(dtype=dtype, device=device) * 1e-3
        base = dict(shape=list(shape), dtype=str(dtype).replace("torch.", ""), device=str(device))
        dense = nn.Parameter(weight.clone())
        dense.grad = grad
        dense_opt, flavour = _dense_adamw([dense])
        dense_bytes = _tensor_bytes(dense_opt.state)
        for density in densities:
            idx = _random_mask(numel, max(1, round(numel * density)), device, generator)
            mask_bytes = idx.numel() * idx.element_size()
            touched = lines_touched(weight, idx) / -(-weight.numel() * weight.element_size() // LINE_BYTES)
            fns = {"torch_adamw": dense_opt.step, "copy": copy}
            # every row carries the density of its rounds; the first two are the dense references
            cases = {"torch_adamw": dict(density=density, method="torch_adamw", backend=flavour,
                                         state_bytes=dense_bytes, mask_bytes=0, bytes_moved=_adamw_bytes([weight])),
                     "copy": dict(density=density, method="copy", backend="torch", bytes_moved=2 * COPY_BYTES)}
            fns["scatter"], scatter_bytes = _scatter_only(weight, idx)
            cases["scatter"] = dict(density=density, method="scatter_only", backend="torch", bytes_moved=scatter_bytes,
                                    lines_touched=touched)
            step, opt = _naive_masked(weight.clone(), grad, idx)
            fns["naive"] = step
            cases["naive"] = dict(density=density, method="naive_masked_adamw", backend="torch", opt=opt)
            for backend in sparse_backends(device):
                p = nn.Parameter(weight.clone())
                p.grad = grad
                opt = SparseAdamW([p], masks=[idx], lr=1e-4, backend=backend)
                fns[f"dense_grad[{backend}]"] = opt.step
                cases[f"dense_grad[{backend}]"] = dict(density=density, method="sparse_adamw_dense_grad",
                                                       backend=backend, opt=opt,
                                                       bytes_moved=_sparse_bytes(p, idx, grad))
                module = _CompactValues(weight.clone(), idx)
                module.weight_values.grad = grad.view(-1)[idx.long()].clone()
                opt = SparseAdamW([module.weight_values], lr=1e-4, backend=backend)
                fns[f"compact_grad[{backend}]"] = opt.step
                cases[f"compact_grad[{backend}]"] = dict(density=density, method="sparse_adamw_compact_grad",
                                                         backend=backend, opt=opt,
                                                         bytes_moved=_sparse_bytes(module.weight, idx))
            times = _timed_rounds(fns, repeats, device)
            for name, case in cases.items():
                if name not in ("torch_adamw", "copy"):
                    case["mask"] = "random"
                opt = case.pop("opt", None)
                if opt is not None:
                    case.update(state_bytes=_tensor_bytes(opt.state), mask_bytes=mask_bytes,
                                state_ratio=_tensor_bytes(opt.state) / dense_bytes, lines_touched=touched)
            rows += _rows(times, cases, base)
    return rows


def run_masks(masks, shapes, dtype=torch.float32, device="cpu", repeats=10, label="lift"):
    """One optimizer step over all the weights named in ``masks`` ({name: indices}, weights of
    ``shapes``) at once: torch AdamW on the dense weights, SparseAdamW on compact values with
    these masks (mask=label) and with random masks of the same size per weight (mask="random")."""
    generator = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shapes[n], generator=generator).to(dtype=dtype, device=device) for n in masks}
    grads = {n: torch.randn(shapes[n], generator=generator).to(dtype=dtype, device=device) * 1e-3 for n in masks}
    random_masks = {n: _random_mask(w.numel(), masks[n].numel(), device, generator) for n, w in weights.items()}
    dense = [nn.Parameter(w.clone()) for w in weights.values()]
    for p, g in zip(dense, grads.values()):
        p.grad = g
    dense_opt, flavour = _dense_adamw(dense)
    numel = sum(w.numel() for w in weights.values())
    nnz = sum(m.numel() for m in masks.values())
    base = dict(weights=len(masks), numel=numel, nnz=nnz, density=nnz / numel, dtype=str(dtype).replace("torch.", ""),
                device=str(device))
    fns = {"torch_adamw": dense_opt.step, "copy": _copy(device)}
    cases = {"torch_adamw": dict(mask="dense", method="torch_adamw", backend=flavour,
                                 bytes_moved=_adamw_bytes(weights.values())),
             "copy": dict(mask="none", method="copy", backend="torch", bytes_moved=2 * COPY_BYTES)}
    all_lines = sum(-(-w.numel() * w.element_size() // LINE_BYTES) for w in weights.values())
    for backend in (b for b in sparse_backends(device) if b != "torch"):  # the reference is not timed here
        for mask_name, chosen in ((label, masks), ("random", random_masks)):
            modules = {n: _CompactValues(weights[n].clone(), chosen[n].to(device)) for n in masks}
            for n, module in modules.items():
                module.weight_values.grad = grads[n].view(-1)[module.weight_indices.long()].clone()
            opt = SparseAdamW([m.weight_values for m in modules.values()], lr=1e-4, backend=backend)
            key = f"{mask_name}[{backend}]"
            fns[key] = opt.step
            cases[key] = dict(mask=mask_name, method="sparse_adamw_compact_grad", backend=backend,
                              lines_touched=sum(lines_touched(m.weight, m.weight_indices)
                                                for m in modules.values()) / all_lines,
                              bytes_moved=sum(_sparse_bytes(m.weight, m.weight_indices)
                                              for m in modules.values()))
    return _rows(_timed_rounds(fns, repeats, device), cases, base)


def table(rows):
    """The optimizer-step rows of run() or run_masks() as text."""
    header = (f"{'case':>14} {'density':>7} {'method':<26} {'backend':<8} {'mask':<7} {'step ms':>9} {'x AdamW':>8} "
              f"{'quartiles':>13} {'GB/s':>6} {'x copy':>6} {'lines':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        case = "x".join(map(str, r["shape"])) if "shape" in r else f"{r['weights']} weights"
        q1, q3 = r["step_ratio_quartiles"]
        gbps = f"{r['gbps']:6.1f} {r['gbps_vs_copy']:6.2f}" if "gbps" in r else f"{'':6} {'':6}"
        touched = f"{r['lines_touched']:5.2f}" if "lines_touched" in r else ""
        lines.append(f"{case:>14} {r['density']:>7.3f} {r['method']:<26} {r['backend']:<8} {r.get('mask', ''):<7} "
                     f"{r['step_s'] * 1e3:>9.2f} {r['step_ratio']:>8.3f} {f'{q1:.3f}-{q3:.3f}':>13} {gbps} {touched}")
    return "\n".join(lines)


def _main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(dtype=getattr(torch, args.dtype), device=args.device, repeats=args.repeats)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    _main()
