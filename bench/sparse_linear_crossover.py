"""SparseLinear against nn.Linear over mask densities: where the sampled weight gradient stops
paying, per backend (``sparseft bench sparse --crossover``).

One layer forward + backward (input, weight or values, and bias gradients) on [tokens, in]
inputs for every density, four ways:
  linear             nn.Linear, dense weight gradient: the baseline of every ratio
  sampled[<b>]       SparseLinear, values gradient from the sampled kernel of backend b
  dense_gemm         SparseLinear, values gradient from a dense GEMM into a temporary [out, in]
                     float32 gradient and a gather (the same for every backend)
  auto[<b>]          SparseLinear as it decides on backend b (DENSE_GEMM_MIN_DENSITY)
All ways of one density are timed in the same rounds, one call each per round; rows give the
median seconds, the median and quartiles of the per-round ratios to nn.Linear, and
temp_bytes, the dense temporary a way allocates beyond what nn.Linear does. The summary gives,
per backend, the lowest density at which dense_gemm beats sampled. A sampled path that has
lost to dense_gemm by 2x is not timed at higher densities (its cost only grows with them).

    python -m sparseft.bench.sparse_linear_crossover [--shape 576x1536] [--tokens 512] [--json out.json]
"""

import argparse
import copy
import json
import math
import statistics

import torch
from torch import nn

from sparseft import _backends
from sparseft.bench.bench_sparse_adamw import _quartiles, _timed_rounds
from sparseft.ops.sampled_grad import DENSE_GEMM_MIN_DENSITY
from sparseft.sparse_linear import SparseLinear

SHAPE = (576, 1536)  # SmolLM2-135M MLP: in_features x out_features of up_proj / gate_proj
TOKENS = 512
DENSITIES = (0.0025, 0.005, 0.01, 0.05, 0.10, 0.20, 0.25, 0.30, 0.40, 0.50, 1.0)


def backends(device):
    """Sampled-gradient backends worth timing on ``device`` (the Triton interpreter is not)."""
    device_type = torch.device(device).type
    names = ("cpu", "torch") if device_type == "cpu" else ("triton", "cuda", "torch")
    return [b for b in names if _backends.availability(b, device_type)[0]]


def _fwd_bwd(layer, x, upstream):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(upstream)
    return step


def _sparse(dense, indices, backend, min_density):
    layer = SparseLinear.from_linear(copy.deepcopy(dense), indices, backend)
    layer.dense_gemm_min_density = min_density
    return layer


def run(shape=SHAPE, tokens=TOKENS, densities=DENSITIES, dtype=torch.float32, device="cpu", repeats=10):
    """(rows, crossover): one row per density and way; crossover maps each backend to the lowest
    density where dense_gemm's median ratio is below sampled's (None: never)."""
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(0)
    dense = nn.Linear(in_features, out_features).to(device=device, dtype=dtype)
    x = torch.randn(tokens, in_features, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    upstream = torch.randn(tokens, out_features, generator=generator).to(device=device, dtype=dtype)
    numel = in_features * out_features
    base = dict(shape=[in_features, out_features], tokens=tokens, dtype=str(dtype).replace("torch.", ""),
                device=str(device))
    rows, lost = [], set()
    for density in densities:
        nnz = max(1, round(numel * density))
        indices = torch.randperm(numel, generator=generator)[:nnz].sort().values.to(torch.int32).to(device)
        temp_bytes = 0 if nnz == numel else numel * 4
        fns = {"linear": _fwd_bwd(dense, x, upstream)}
        ways = {"linear": dict(way="linear", backend="torch", temp_bytes=0)}
        for backend in backends(device):
            if backend not in lost:
                fns[f"sampled[{backend}]"] = _fwd_bwd(_sparse(dense, indices, backend, math.inf), x, upstream)
                ways[f"sampled[{backend}]"] = dict(way="sampled", backend=backend, temp_bytes=0)
        fns["dense_gemm"] = _fwd_bwd(_sparse(dense, indices, None, 0.0), x, upstream)
        ways["dense_gemm"] = dict(way="dense_gemm", backend="torch", temp_bytes=temp_bytes)
        for backend in backends(device):
            layer = _sparse(dense, indices, backend, None)
            fns[f"auto[{backend}]"] = _fwd_bwd(layer, x, upstream)
            chosen = layer.uses_dense_gemm(backend)
            ways[f"auto[{backend}]"] = dict(way="auto", backend=backend, chose="dense_gemm" if chosen else "sampled",
                                           threshold=DENSE_GEMM_MIN_DENSITY[backend],
                                           temp_bytes=temp_bytes if chosen else 0)
        times = _timed_rounds(fns, repeats, device)
        ratio = {}
        for name, way in ways.items():
            ratios = [t / d for t, d in zip(times[name], times["linear"])]
            ratio[name] = statistics.median(ratios)
            rows.append(dict(base, density=density, nnz=nnz, **way, seconds=statistics.median(times[name]),
                             ratio=ratio[name], ratio_quartiles=_quartiles(ratios)))
        lost |= {b for b in backends(device) if ratio.get(f"sampled[{b}]", 0) > 2 * ratio["dense_gemm"]}
    return rows, crossover(rows)


def crossover(rows):
    ratio = {(r["way"], r["backend"], r["density"]): r["ratio"] for r in rows}
    found = {}
    for way, backend, density in sorted(k for k in ratio if k[0] == "sampled"):
        if backend not in found and ratio[("dense_gemm", "torch", density)] < ratio[(way, backend, density)]:
            found[backend] = density
    return {b: found.get(b) for b in sorted({r["backend"] for r in rows if r["way"] == "sampled"})}


def table(rows, found):
    first = rows[0]
    lines = [f"SparseLinear {first['shape'][0]}->{first['shape'][1]}, {first['tokens']} tokens, {first['dtype']}, "
             "forward + backward; ratio = time / nn.Linear's in the same rounds (quartiles)"]
    header = f"{'density':>8} {'way':<11} {'backend':<7} {'chose':<10} {'ms':>8} {'x Linear':>8} {'quartiles':>13} {'temp MiB':>8}"
    lines += [header, "-" * len(header)]
    for r in rows:
        q1, q3 = r["ratio_quartiles"]
        lines.append(f"{r['density']:>8.2%} {r['way']:<11} {r['backend']:<7} {r.get('chose', ''):<10} "
                     f"{r['seconds'] * 1e3:>8.2f} {r['ratio']:>8.3f} {f'{q1:.3f}-{q3:.3f}':>13} "
                     f"{r['temp_bytes'] / 2**20:>8.1f}")
    lines.append("dense GEMM beats the sampled kernel from density: " +
                 ", ".join(f"{b} {'never' if d is None else f'{d:.2%}'}" for b, d in found.items()))
    return "\n".join(lines)


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shape", default="x".join(map(str, SHAPE)), help="in_features x out_features")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the rows and the crossover to this file")
    args = parser.parse_args(argv)
    rows, found = run(tuple(int(n) for n in args.shape.split("x")), args.tokens,
                      [float(d) for d in args.densities.split(",")], getattr(torch, args.dtype), args.device,
                      args.repeats)
    print(table(rows, found))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": rows, "crossover": found}, out, indent=1)


if __name__ == "__main__":
    _main()
