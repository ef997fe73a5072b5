"""Checks every GPU backend of every op against a float64 computation, on the GPU, and
writes the worst errors as JSON. Run by bench/gpu_check.sh on a lent machine:

  python -m sparseft.bench.gpu_validate --json out.json
"""

import argparse
import json
import traceback

import torch

import sparseft
from sparseft import _backends


def _rel_err(got, expected):
    got, expected = got.double(), expected.double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _gpu_backends():
    return [b for b in ("triton", "cuda", "torch") if _backends.availability(b, "cuda")[0]]


def check_linear_cross_entropy(backend, dtype, tokens, dim, vocab, **kw):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(tokens, dim, device="cuda", generator=gen) / dim ** 0.5).to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, device="cuda", generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    labels[::3] = -100
    loss = sparseft.linear_cross_entropy(hidden, weight, labels, backend=backend, **kw)
    grads = torch.autograd.grad(loss, [hidden, weight])
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = sparseft.linear_cross_entropy(h64, w64, labels, backend="torch", **kw)
    ref_grads = torch.autograd.grad(ref, [h64, w64])
    return {"loss": _rel_err(loss, ref), "grad_hidden": _rel_err(grads[0], ref_grads[0]),
            "grad_weight": _rel_err(grads[1], ref_grads[1])}


def check_cross_entropy(backend, dtype, tokens, vocab, **kw):
    logits = (torch.randn(tokens, vocab, device="cuda") * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    loss = sparseft.cross_entropy(logits, labels, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, [logits])
    x64 = logits.detach().double().requires_grad_()
    ref = sparseft.cross_entropy(x64, labels, backend="torch", **kw)
    (ref_grad,) = torch.autograd.grad(ref, [x64])
    return {"loss": _rel_err(loss, ref), "grad": _rel_err(grad, ref_grad)}


def check_sampled_grad(backend, dtype, batch, out_features, in_features, density):
    grad_out = torch.randn(batch, out_features, device="cuda").to(dtype)
    inputs = torch.randn(batch, in_features, device="cuda").to(dtype)
    numel = out_features * in_features
    indices = torch.randperm(numel, device="cuda")[: int(numel * density)].sort().values.int()
    got = sparseft.sampled_weight_grad(grad_out, inputs, indices, out_features, backend=backend)
    expected = (grad_out.double().T @ inputs.double()).reshape(-1)[indices.long()]
    return {"values": _rel_err(got, expected)}


def check_sparse_adamw(backend, dtype, rows, cols, density, steps=3):
    from sparseft.optim import SparseAdamW
    numel = rows * cols
    indices = torch.randperm(numel, device="cuda")[: int(numel * density)].sort().values.int()
    start = torch.randn(rows, cols, device="cuda").to(dtype)
    grads = [torch.randn(rows, cols, device="cuda").to(dtype) for _ in range(steps)]
    results = {}
    for name in (backend, "torch"):
        weight = torch.nn.Parameter(start.clone())
        optimizer = SparseAdamW([weight], masks=[indices], lr=1e-2, weight_decay=0.1, backend=name)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results[name] = weight.detach()
    untouched = torch.ones(numel, dtype=torch.bool, device="cuda")
    untouched[indices.long()] = False
    return {"weight": _rel_err(results[backend], results["torch"]),
            "unmasked_identical": bool(torch.equal(results[backend].view(-1)[untouched], start.view(-1)[untouched]))}


def checks():
    for backend in _gpu_backends():
        for dtype in (torch.bfloat16, torch.float32):
            yield (f"linear_ce {backend} {dtype} 8192x4096x128256",
                   lambda b=backend, d=dtype: check_linear_cross_entropy(b, d, 8192 if d == torch.bfloat16 else 1024,
                                                                         4096, 128256))
            yield (f"linear_ce {backend} {dtype} odd 333x200x5003 options",
                   lambda b=backend, d=dtype: check_linear_cross_entropy(b, d, 333, 200, 5003, label_smoothing=0.1,
                                                                         z_loss=1e-4, softcap=30.0))
            yield (f"cross_entropy {backend} {dtype} 1000x49152",
                   lambda b=backend, d=dtype: check_cross_entropy(b, d, 1000, 49152, label_smoothing=0.1))
            yield (f"sampled_grad {backend} {dtype} 4096x(1536x576) 5%",
                   lambda b=backend, d=dtype: check_sampled_grad(b, d, 4096, 1536, 576, 0.05))
            yield (f"sparse_adamw {backend} {dtype} 4096x4096 5%",
                   lambda b=backend, d=dtype: check_sparse_adamw(b, d, 4096, 4096, 0.05))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    for name, check in checks():
        try:
            results["checks"][name] = check()
        except Exception as exc:  # keep going: one failure must not hide the others
            results["checks"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                       "trace": traceback.format_exc()[-1500:]}
        print(name, json.dumps(results["checks"][name])[:300], flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
