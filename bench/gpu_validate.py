"""Checks every backend of every op against a float64 computation and writes the worst
errors as JSON, rewriting the file after each check so a run cut short keeps its results.
Run by bench/gpu_check.sh on a lent GPU machine, and by its --dry-run on a CPU:

  python -m sparseft.bench.gpu_validate --json out.json                  # CUDA, full shapes
  python -m sparseft.bench.gpu_validate --device cpu --tiny --json x.json  # CPU, Triton interpreted

Backends go cheapest first: the compiled CUDA kernels, then the torch reference, then
Triton, whose first calls compile and autotune every specialisation.
"""

import argparse
import json
import time
import traceback

import torch

import sparseft
from sparseft import _backends

ORDER = ("cuda", "cpu", "torch", "triton")
# Worst error relative to the largest reference value that counts as a pass: float32 kernels
# reorder float32 sums; bfloat16 inputs and outputs carry 8 significant bits.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _rel_err(got, expected):
    got, expected = got.double(), expected.double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _randn(*shape, device, gen):
    return torch.randn(*shape, device=device, generator=gen)


def check_linear_cross_entropy(backend, dtype, device, tokens, dim, vocab, **kw):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (_randn(tokens, dim, device=device, gen=gen) / dim ** 0.5).to(dtype).requires_grad_()
    weight = _randn(vocab, dim, device=device, gen=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    labels[::3] = -100
    loss = sparseft.linear_cross_entropy(hidden, weight, labels, backend=backend, **kw)
    grads = torch.autograd.grad(loss, [hidden, weight])
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = sparseft.linear_cross_entropy(h64, w64, labels, backend="torch", **kw)
    ref_grads = torch.autograd.grad(ref, [h64, w64])
    return {"loss": _rel_err(loss, ref), "grad_hidden": _rel_err(grads[0], ref_grads[0]),
            "grad_weight": _rel_err(grads[1], ref_grads[1])}


def check_cross_entropy(backend, dtype, device, tokens, vocab, **kw):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (_randn(tokens, vocab, device=device, gen=gen) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    loss = sparseft.cross_entropy(logits, labels, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, [logits])
    x64 = logits.detach().double().requires_grad_()
    ref = sparseft.cross_entropy(x64, labels, backend="torch", **kw)
    (ref_grad,) = torch.autograd.grad(ref, [x64])
    return {"loss": _rel_err(loss, ref), "grad": _rel_err(grad, ref_grad)}


def _random_mask(numel, density, device, gen):
    return torch.randperm(numel, device=device, generator=gen)[: max(int(numel * density), 1)].sort().values.int()


def check_sampled_grad(backend, dtype, device, batch, out_features, in_features, density):
    gen = torch.Generator(device=device).manual_seed(0)
    grad_out = _randn(batch, out_features, device=device, gen=gen).to(dtype)
    inputs = _randn(batch, in_features, device=device, gen=gen).to(dtype)
    indices = _random_mask(out_features * in_features, density, device, gen)
    got = sparseft.sampled_weight_grad(grad_out, inputs, indices, out_features, backend=backend)
    expected = (grad_out.double().T @ inputs.double()).reshape(-1)[indices.long()]
    return {"values": _rel_err(got, expected)}


def check_sparse_adamw(backend, dtype, device, rows, cols, density, steps=3):
    from sparseft.optim import SparseAdamW
    gen = torch.Generator(device=device).manual_seed(0)
    numel = rows * cols
    indices = _random_mask(numel, density, device, gen)
    start = _randn(rows, cols, device=device, gen=gen).to(dtype)
    grads = [_randn(rows, cols, device=device, gen=gen).to(dtype) for _ in range(steps)]
    results = {}
    for name in (backend, "torch"):
        weight = torch.nn.Parameter(start.clone())
        optimizer = SparseAdamW([weight], masks=[indices], lr=1e-2, weight_decay=0.1, backend=name)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results[name] = weight.detach()
    untouched = torch.ones(numel, dtype=torch.bool, device=device)
    untouched[indices.long()] = False
    return {"weight": _rel_err(results[backend], results["torch"]),
            "unmasked_identical": bool(torch.equal(results[backend].view(-1)[untouched], start.view(-1)[untouched]))}


def check_lowrank_adam_direction(backend, dtype, device, rows, rank, steps=3):
    """Float32 whatever the weight dtype: the moments and the direction of a projected gradient."""
    from sparseft.ops.lowrank_adam import bias_corrections, lowrank_adam_direction
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [_randn(rows, rank, device=device, gen=gen) for _ in range(steps)]
    state = [torch.zeros(rows, rank, device=device) for _ in range(3)]  # exp_avg, exp_avg_sq, out
    ref = [torch.zeros(rows, rank, device=device, dtype=torch.float64) for _ in range(3)]
    for step, grad in enumerate(grads, 1):
        c1, c2 = bias_corrections(0.9, 0.999, step)
        lowrank_adam_direction(grad, *state, beta1=0.9, beta2=0.999, c1=c1, c2=c2, eps=1e-8, backend=backend)
        ref[0] = 0.9 * ref[0] + 0.1 * grad.double()
        ref[1] = 0.999 * ref[1] + 0.001 * grad.double() ** 2
        ref[2] = ref[0] * c1 / (ref[1].sqrt() * c2 + 1e-8)
    return {name: _rel_err(got, expected) for name, got, expected in zip(("exp_avg", "exp_avg_sq", "direction"),
                                                                           state, ref)}


def check_lowrank_weight_update(backend, dtype, device, rows, cols, rank, side):
    """A step as large as the weight, so that an error in the product is not hidden under it."""
    from sparseft.ops.lowrank_adam import lowrank_weight_update
    gen = torch.Generator(device=device).manual_seed(0)
    weight = _randn(rows, cols, device=device, gen=gen).to(dtype)
    projector = _randn(cols if side == "right" else rows, rank, device=device, gen=gen) / rank ** 0.5
    direction = _randn(*((rows, rank) if side == "right" else (rank, cols)), device=device, gen=gen)
    lr, scale, weight_decay = 0.5, 1.0, 0.1
    delta = direction.double() @ projector.double().T if side == "right" else projector.double() @ direction.double()
    expected = weight.double() * (1 - lr * weight_decay) - lr * scale * delta
    lowrank_weight_update(weight, direction, projector, side=side, lr=lr, scale=scale, weight_decay=weight_decay,
                          backend=backend)
    return {"weight": _rel_err(weight, expected)}


def check_merge(backend, dtype, device, numel, tasks, mixed=False, **options):
    """One fused merge against the torch reference (float32, the same ops in the same order: the
    discrete decisions agree, the GPU kernels may fuse b + scale·M into one FMA), and the DARE
    keep mask of the backend (a merge of ones into zeros) bit for bit against the reference's."""
    from sparseft.ops.merge import dare_keep_mask, merge_tensor
    gen = torch.Generator(device=device).manual_seed(0)
    base = _randn(numel, device=device, gen=gen).to(dtype)
    tuned = [(base.float() + 0.05 * (t + 1) * _randn(numel, device=device, gen=gen))
             .to(torch.float16 if mixed and t % 3 == 1 else dtype) for t in range(tasks)]
    kwargs = dict(weights=[1.0 / (t + 1) for t in range(tasks)], **options)
    if "keep_probs" in options:
        kwargs["seeds"] = [2 ** 62 + 977 * t for t in range(tasks)]
    index_offset = 2 ** 33 + 5
    got = merge_tensor(base, tuned, backend=backend, index_offset=index_offset, **kwargs)
    expected = merge_tensor(base, tuned, backend="torch", index_offset=index_offset, **kwargs)
    result = {"out": _rel_err(got, expected)}
    if "keep_probs" in options:  # kept entries of ones merged into zeros are 1 / 0.5 = 2 exactly
        zeros, ones = torch.zeros(numel, device=device), torch.ones(numel, device=device)
        mask = merge_tensor(zeros, [ones], weights=[1.0], keep_probs=[0.5], seeds=kwargs["seeds"][:1],
                            index_offset=index_offset, backend=backend)
        expected_mask = dare_keep_mask(kwargs["seeds"][0], numel, 0.5, index_offset, device=device)
        result["dare_mask_identical"] = bool(torch.equal(mask == 2.0, expected_mask)) and \
            bool(((mask == 0) | (mask == 2.0)).all())
    return result


# (name, check, full-size arguments, tiny arguments for the interpreter)
CASES = (
    ("linear_ce", check_linear_cross_entropy, dict(tokens=8192, dim=4096, vocab=128256),
     dict(tokens=24, dim=32, vocab=300)),
    ("linear_ce options", check_linear_cross_entropy,
     dict(tokens=333, dim=200, vocab=5003, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
     dict(tokens=13, dim=20, vocab=77, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)),
    ("cross_entropy", check_cross_entropy, dict(tokens=1000, vocab=49152, label_smoothing=0.1),
     dict(tokens=10, vocab=500, label_smoothing=0.1)),
    ("sampled_grad 5%", check_sampled_grad, dict(batch=4096, out_features=1536, in_features=576, density=0.05),
     dict(batch=16, out_features=48, in_features=40, density=0.05)),
    ("sparse_adamw 5%", check_sparse_adamw, dict(rows=4096, cols=4096, density=0.05),
     dict(rows=64, cols=48, density=0.05)),
    ("lowrank_adam_direction", check_lowrank_adam_direction, dict(rows=11008, rank=256), dict(rows=37, rank=5)),
    ("lowrank_weight_update right", check_lowrank_weight_update, dict(rows=4096, cols=4096, rank=128, side="right"),
     dict(rows=37, cols=29, rank=5, side="right")),
    ("lowrank_weight_update left", check_lowrank_weight_update, dict(rows=4096, cols=11008, rank=256, side="left"),
     dict(rows=37, cols=29, rank=5, side="left")),
    ("merge task_arithmetic", check_merge, dict(numel=4096 * 4096, tasks=3, scale=0.5),
     dict(numel=1037, tasks=3, scale=0.5)),
    ("merge dare_ties mixed", check_merge,
     dict(numel=4096 * 4096 + 3, tasks=5, mixed=True, thresholds=[0.01] * 5, keep_probs=[0.7] * 5, elect_sign=True,
          normalize=True),
     dict(numel=1037, tasks=5, mixed=True, thresholds=[0.01] * 5, keep_probs=[0.7] * 5, elect_sign=True,
          normalize=True)),
    ("merge consensus 20 tasks", check_merge,
     dict(numel=1 << 20, tasks=20, keep_probs=[0.5] * 20, elect_sign=True, normalize=True, consensus=(0.5, 2)),
     dict(numel=257, tasks=20, keep_probs=[0.5] * 20, elect_sign=True, normalize=True, consensus=(0.5, 2))),
)


def checks(device, tiny):
    """Yields (label, dtype, zero-argument check), backend by backend, cheapest first."""
    backends = [b for b in ORDER if _backends.availability(b, device)[0]]
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float32):
            for name, check, full, small in CASES:
                kwargs = dict(small if tiny else full)
                if name == "linear_ce" and dtype == torch.float32 and not tiny:
                    kwargs["tokens"] = 1024  # the float32 Llama-3 head: fewer tokens, same kernels
                label = f"{name} {backend} {str(dtype).replace('torch.', '')} " + \
                    " ".join(f"{k}={v}" for k, v in kwargs.items())
                yield label, dtype, (lambda c=check, b=backend, d=dtype, kw=kwargs: c(b, d, device, **kw))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="results file, rewritten after every check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (the Triton interpreter on a CPU)")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "checks": {}}
    failed = 0
    for label, dtype, check in checks(args.device, args.tiny):
        start = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # keep going: one failure must not hide the others
            failed += 1
            result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        else:
            errors = [v for v in result.values() if isinstance(v, float)]
            result["ok"] = all(e <= TOLERANCE[dtype] for e in errors) and \
                all(v for v in result.values() if isinstance(v, bool))  # unmasked_identical, dare_mask_identical
            failed += not result["ok"]
        result["seconds"] = round(time.perf_counter() - start, 3)
        results["checks"][label] = result
        print(label, json.dumps(result)[:300], flush=True)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
    print(f"{len(results['checks'])} checks, {failed} failed or raised")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
