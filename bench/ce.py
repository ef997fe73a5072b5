"""`sparseft bench ce`: forward+backward of the LM-head cross-entropy, side by side.

Every case is one process (so its peak memory is its own) running the same inputs:
hidden [N, D], weight [V, D], labels [N] (a fraction of tokens zero-weighted when masked).
Peak memory is reported above the inputs and their gradients.

  python -m sparseft.bench.ce --case NAME ...   one case, prints JSON (used by the runner)
"""

import argparse
import json
import math

import torch
import torch.nn.functional as F

from sparseft.bench.measure import device_name, run_in_subprocess, time_and_memory

# (hidden size D, vocabulary V); "tiny" exercises the command lines in a dry run
SHAPES = {"smollm2": (576, 49152), "llama3": (4096, 128256), "tiny": (64, 1000)}


def _inputs(tokens, dim, vocab, dtype, device, masked, seed=0):
    """Made on the device itself: a 525M-entry weight takes seconds to draw on a CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(tokens, dim, generator=gen, device=device) / math.sqrt(dim)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen, device=device) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    loss_weights = None
    if masked:
        loss_weights = (torch.rand(tokens, generator=gen, device=device) >= masked).float()
    return hidden, weight, labels, loss_weights


def _eager(hidden, weight, labels, loss_weights):
    if loss_weights is None:
        return F.cross_entropy(F.linear(hidden, weight).float(), labels)
    per_token = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none")
    return (per_token * loss_weights).sum() / loss_weights.sum()


def _torch_lce(chunked):
    def loss(hidden, weight, labels, loss_weights):
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        if loss_weights is None:
            return F.linear_cross_entropy(hidden, weight, labels, options=options)
        per_token = F.linear_cross_entropy(hidden, weight, labels, reduction="none", options=options)
        return (per_token * loss_weights).sum() / loss_weights.sum()
    return loss


def _sparseft(backend=None):
    def loss(hidden, weight, labels, loss_weights):
        import sparseft
        return sparseft.linear_cross_entropy(hidden, weight, labels, loss_weights=loss_weights, backend=backend)
    return loss


def _liger(hidden, weight, labels, loss_weights):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    if loss_weights is not None:  # Liger has no per-token weights: mask through ignore_index
        labels = torch.where(loss_weights > 0, labels, -100)
    return liger_fused_linear_cross_entropy(hidden, weight, labels)


def _cce(hidden, weight, labels, loss_weights):
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if hidden.is_cuda else "torch_compile"
    if loss_weights is not None:
        labels = torch.where(loss_weights > 0, labels, -100)
    return linear_cross_entropy(hidden, weight, labels, impl=impl, shift=False)


_compiled_eager = None


def _compiled(hidden, weight, labels, loss_weights):
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(_eager)
    return _compiled_eager(hidden, weight, labels, loss_weights)


LOSSES = {
    "torch-eager": _eager,
    "torch-linear_ce": _torch_lce(chunked=False),
    "torch-linear_ce-chunked": _torch_lce(chunked=True),
    "torch-compile": _compiled,
    "liger": _liger,
    "cce": _cce,
    "sparseft": _sparseft(),
    "sparseft-torch": _sparseft("torch"),
    "sparseft-triton": _sparseft("triton"),
    "sparseft-cuda": _sparseft("cuda"),
}


def _gemm_limit_step(hidden, weight):
    """The three GEMMs of a fused forward+backward into preallocated buffers: the floor."""
    h, w = hidden.detach(), weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    grad_hidden, grad_weight = torch.empty_like(h), torch.empty_like(w)

    def step():
        torch.mm(h, w.t(), out=logits)
        torch.mm(logits, w, out=grad_hidden)
        torch.mm(logits.t(), h, out=grad_weight)
    return step


def run_case(case, tokens, dim, vocab, dtype, device, masked, repeats):
    hidden, weight, labels, loss_weights = _inputs(tokens, dim, vocab, dtype, device, masked)
    grad_bytes = 0
    if case == "gemm-limit":
        step, reset = _gemm_limit_step(hidden, weight), None
    else:
        loss_fn = LOSSES[case]
        grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()

        def step():
            loss_fn(hidden, weight, labels, loss_weights).backward()

        def reset():
            hidden.grad = weight.grad = None
    seconds, peak = time_and_memory(step, device, repeats, reset=reset)
    extra = peak - grad_bytes if case != "gemm-limit" else peak
    return {"case": case, "seconds": seconds, "peak_extra_bytes": max(extra, 0)}


def _case_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--masked", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args(argv)
    result = run_case(a.case, a.tokens, a.dim, a.vocab, getattr(torch, a.dtype), a.device, a.masked, a.repeats)
    print(json.dumps(result))


def default_cases(device):
    """sparseft's cases first, so a run cut short has measured them."""
    peers = ["gemm-limit", "torch-eager", "torch-linear_ce", "torch-linear_ce-chunked", "torch-compile"]
    if torch.device(device).type == "cuda":
        # Both GPU backends side by side: the fused sync-free Triton kernel (the default) and
        # the chunked cuBLAS one, against the peers.
        return ["sparseft-triton", "sparseft-cuda"] + peers + ["liger", "cce"]
    return ["sparseft"] + peers


def unavailable_reason(case, device):
    """Why ``case`` cannot run on ``device`` here, or None: checked up front, so no
    subprocess is spent on a peer that is not installed or an API this torch lacks."""
    from importlib.util import find_spec
    device_type = torch.device(device).type
    if case.startswith("torch-linear_ce"):
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy"
        if case.endswith("chunked") and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no LinearCrossEntropyOptions"
    if case in ("liger", "cce"):
        module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[case]
        if find_spec(module) is None:
            return f"{module} is not installed"
    if case.startswith("sparseft-"):
        from sparseft import _backends
        ok, reason = _backends.availability(case.split("-", 1)[1], device_type)
        return None if ok else reason
    if case not in LOSSES and case != "gemm-limit":
        return f"unknown case (known: gemm-limit, {', '.join(LOSSES)})"
    return None


def run(shapes, token_counts, dtype, device, cases, masked_fractions=(0.0, 0.5), repeats=3, progress=print,
        on_rows=None):
    """Runs every (shape, tokens, masked, case) in its own process; returns result rows.
    ``on_rows(rows)`` sees the rows so far after each case (to save partial results)."""
    rows = []
    skipped = {case: unavailable_reason(case, device) for case in cases}
    for case, reason in skipped.items():
        if reason:
            progress(f"skipping {case}: {reason}")
            rows.append({"case": case, "skipped": reason})
    cases = [case for case in cases if not skipped[case]]
    plan = [(shape, tokens, masked, case) for shape in shapes for tokens in token_counts
            for masked in masked_fractions for case in cases
            if masked == 0.0 or case.startswith("sparseft") or case == "torch-eager"]
    for i, (shape, tokens, masked, case) in enumerate(plan, 1):
        dim, vocab = SHAPES[shape]
        label = f"{shape} N={tokens} masked={masked:.0%} {case}"
        progress(f"[{i}/{len(plan)}] {label} ...")
        result = run_in_subprocess("sparseft.bench.ce", [
            "--case", case, "--tokens", str(tokens), "--dim", str(dim), "--vocab", str(vocab),
            "--dtype", str(dtype).replace("torch.", ""), "--device", str(device), "--masked", str(masked),
            "--repeats", str(repeats)])
        result.update(shape=shape, tokens=tokens, dim=dim, vocab=vocab, masked=masked, case=case,
                      dtype=str(dtype).replace("torch.", ""), device=device_name(device))
        rows.append(result)
        if "error" in result:
            progress(f"      {case} failed: {result['error']}")
        else:
            progress(f"      {result['seconds']:.3f} s, peak +{result['peak_extra_bytes'] / 2**20:.0f} MiB")
        _add_ratios(rows)
        if on_rows:
            on_rows(rows)
    return rows


def _add_ratios(rows):
    """time and memory relative to torch eager of the same shape and tokens, unmasked."""
    measured = [r for r in rows if "seconds" in r]
    base = {(r["shape"], r["tokens"]): r for r in measured if r["case"] == "torch-eager" and r["masked"] == 0.0}
    for r in measured:
        ref = base.get((r["shape"], r["tokens"]))
        if ref:
            r["time_vs_eager"] = r["seconds"] / ref["seconds"]
            if ref["peak_extra_bytes"]:
                r["memory_vs_eager"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]


def table(rows):
    header = f"{'shape':8} {'N':>6} {'masked':>6} {'case':26} {'time s':>8} {'x eager':>8} {'peak MiB':>9} {'x eager':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{'':8} {'':6} {'':6} {r['case']:26} skipped: {r['skipped']}")
            continue
        if "error" in r:
            lines.append(f"{r['shape']:8} {r['tokens']:6d} {r['masked']:6.0%} {r['case']:26} failed: {r['error']}")
            continue
        lines.append(f"{r['shape']:8} {r['tokens']:6d} {r['masked']:6.0%} {r['case']:26} {r['seconds']:8.3f} "
                     f"{r.get('time_vs_eager', float('nan')):8.2f} {r['peak_extra_bytes'] / 2**20:9.0f} "
                     f"{r.get('memory_vs_eager', float('nan')):8.2f}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for case in sorted({r["case"] for r in rows}):
        pts = sorted((r["tokens"], r["seconds"], r["peak_extra_bytes"]) for r in rows
                     if r["case"] == case and "seconds" in r and r["masked"] == 0.0)
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=case)
            ax_m.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=case)
    ax_t.set(xlabel="tokens", ylabel="forward+backward seconds", xscale="log", yscale="log")
    ax_m.set(xlabel="tokens", ylabel="peak MiB above inputs and grads", xscale="log", yscale="log")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    import sys
    _case_main(sys.argv[1:])
