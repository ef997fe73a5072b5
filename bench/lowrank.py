"""`sparseft bench lowrank`: LowRankAdamW against galore-torch and full AdamW (ratios in one run).

1. Projector refresh, 4096x4096, r=128: galore-torch's refresh (its full SVD) against
   sparseft.linalg.right_singular_vectors (what LowRankAdamW runs) at the defaults and with more oversampling, cold and warm-started
   from the previous gradient's basis. The gradient has the singular-value decay measured on real
   SmolLM2-135M layer gradients (a power law fitted to them; --no-model: an assumed exponent),
   and the overlap ‖P_exactᵀP‖²_F / r is also measured on the real gradients themselves.
2. Optimizer step without a refresh, 4096x4096 r=128 and 4096x11008 r=256: galore-torch's
   GaLoreAdamW with its projector in place against LowRankAdamW (same gradient, same rank).
3. One SmolLM2-135M training step (batch 4x128, activation checkpointing, each variant in a
   fresh process): full AdamW, LowRankAdamW r=64 (plain, layerwise, and layerwise with the tied
   embedding projected too) and OwLore (gamma=5 of 30 blocks) + layerwise LowRankAdamW. Peak memory above the loaded model; step time with the
   refresh amortised over update_proj_gap=200 steps (the first step's extra time / 200).
4. --parts ...,curves: 200-step loss curves on real text (bench/corpus.py) for AdamW, LowRankAdamW with
   each ``moments`` rule, and OwLore + LowRankAdamW; PNG with --png.

  python -m sparseft.bench.lowrank [--json out.json] [--png curves.png] [--parts refresh,step,model,curves]
                                   [--no-model]
"""

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import tempfile
import time

import torch

from sparseft.bench import sparse as sparse_bench
from sparseft.bench.measure import device_name, run_in_subprocess

REFRESH_SHAPE, REFRESH_RANK = (4096, 4096), 128
STEP_SHAPES = (((4096, 4096), 128), ((4096, 11008), 256))
MODEL_RANK, GAMMA, OWLORE_INTERVAL, GAP = 64, 5, 50, 200
STEP_VARIANTS = ("full_ft", "lowrank", "lowrank_layerwise", "lowrank_layerwise_embed", "owlore_lowrank")
CURVE_VARIANTS = ("full_ft", "lowrank_keep", "lowrank_reset", "lowrank_project", "owlore_lowrank")
TINY = {"refresh": ((512, 512), 32), "step": ((((256, 256), 16), ((256, 704), 32)),)}  # --tiny: a smoke run
ASSUMED_DECAY = 0.5  # --no-model: σ_i ∝ (i+1)^-0.5
TARGETS = {
    "refresh_time_vs_galore": 0.05, "refresh_overlap": 0.99, "step_time_vs_galore": 0.8,
    "memory_vs_full:lowrank_layerwise": 0.35, "memory_vs_full:lowrank_layerwise_embed": 0.35,
    "memory_vs_full:owlore_lowrank": 0.30,
    "time_vs_full:lowrank_layerwise": 1.3, "final_loss_vs_full": 1.10,
}


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- spectra
def _real_gradients(batch=4, seq=128):
    """Gradients of SmolLM2-135M's linear weights in blocks 0 and 15 on one batch of real text."""
    from sparseft.bench import corpus
    model = sparse_bench.load_model("cpu", torch.float32)
    ids = corpus.batches(batch, seq, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()
            if p.grad is not None and p.dim() == 2 and ".layers." in name
            and any(f".layers.{i}." in name for i in (0, 15))}


def _fitted_decay(gradients):
    """The exponent α of σ_i ≈ σ_0·(i+1)^-α, least squares in log-log over each gradient's
    first 90% of singular values (the rest are rank-deficiency noise), averaged."""
    exponents = []
    for g in gradients.values():
        s = torch.linalg.svdvals(g.double())
        s = s[: int(0.9 * len(s))]
        x, y = torch.log(torch.arange(1, len(s) + 1, dtype=torch.float64)), torch.log(s / s[0])
        exponents.append(float(-((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum()))
    return statistics.mean(exponents)


def _gradient_with_decay(shape, alpha, seed):
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (u * torch.arange(1, k + 1, dtype=torch.float32).pow(-alpha)) @ v.T


# ----------------------------------------------------------------------------- 1. refresh
def _galore_refresh(grad, rank):
    from galore_torch.galore_projector import GaLoreProjector
    return GaLoreProjector(rank, proj_type="right").get_orthogonal_matrix(grad, rank, type="right").T


def _refresh_settings(rank):
    from sparseft.optim.lowrank_adamw import default_oversample
    return {"p=8, q=2": dict(oversample=8, power_iters=2),
            f"default (p={default_oversample(rank)}, q=2)": dict(oversample=default_oversample(rank), power_iters=2)}


def refresh_rows(alpha, real_gradients, repeats, progress, shape=REFRESH_SHAPE, rank=REFRESH_RANK):
    """LowRankAdamW's refresh (sparseft.linalg.right_singular_vectors, the basis it projects on)
    against galore-torch's full SVD: time and overlap with the exact basis."""
    from sparseft.linalg import right_singular_vectors, subspace_overlap, truncated_svd
    rows = []
    grad = _gradient_with_decay(shape, alpha, seed=0)
    previous = grad + 0.3 * _gradient_with_decay(shape, alpha, seed=1)  # the last refresh's gradient
    progress(f"refresh {shape} r={rank}: galore-torch's full SVD (tens of seconds on a CPU) ...")
    start = time.perf_counter()
    exact = _galore_refresh(grad, rank)
    galore_s = time.perf_counter() - start
    warm = right_singular_vectors(previous, rank)
    common = dict(bench="refresh", shape=list(shape), rank=rank, decay_exponent=alpha)
    rows.append(dict(common, method="galore-torch (full SVD)", seconds=galore_s, overlap=1.0))
    for label, kwargs in _refresh_settings(rank).items():
        for start_label, warm_start in (("cold", None), ("warm", warm)):
            basis = right_singular_vectors(grad, rank, warm_start=warm_start, **kwargs)
            seconds = _median_time(lambda: right_singular_vectors(grad, rank, warm_start=warm_start, **kwargs), repeats)
            rows.append(dict(common, method=f"sparseft {label}, {start_label}", seconds=seconds,
                             time_vs_galore=seconds / galore_s, overlap=subspace_overlap(exact, basis)))
            progress(f"      {rows[-1]['method']}: {seconds:.2f} s ({seconds / galore_s:.3f}x), "
                     f"overlap {rows[-1]['overlap']:.4f}")
    for name, g in (real_gradients or {}).items():
        a = g if g.shape[0] >= g.shape[1] else g.T  # the side LowRankAdamW projects on
        reference = truncated_svd(a, rank, exact=True)[2]
        row = dict(bench="refresh_real", matrix=name, shape=list(g.shape), rank=rank)
        for label, kwargs in _refresh_settings(rank).items():
            row[label] = min(subspace_overlap(reference, right_singular_vectors(a, rank, seed=s, **kwargs))
                             for s in range(3))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. step
def _galore_optimizer(weight, rank, projector):
    import warnings

    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt = GaLoreAdamW([{"params": [weight], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25,
                            "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    state = opt.state[weight]
    state["step"] = 1  # its projector is in place: no SVD in the timed steps
    state["projector"] = GaLoreProjector(rank, update_proj_gap=10**9, scale=0.25)
    state["projector"].ortho_matrix = projector.T if weight.shape[0] >= weight.shape[1] else projector
    return opt


def step_rows(repeats, progress, shapes=STEP_SHAPES):
    from sparseft.optim import LowRankAdamW
    rows = []
    for shape, rank in shapes:
        progress(f"step without refresh {shape} r={rank}: galore-torch GaLoreAdamW and LowRankAdamW ...")
        g = torch.Generator().manual_seed(0)
        grad = torch.randn(shape, generator=g)
        side_rows = shape[1] if shape[0] >= shape[1] else shape[0]
        projector = torch.linalg.qr(torch.randn(side_rows, rank, generator=g)).Q
        theirs, ours = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02), None
        ours = torch.nn.Parameter(theirs.detach().clone())
        theirs.grad, ours.grad = grad, grad.clone()
        galore = _galore_optimizer(theirs, rank, projector)
        lowrank = LowRankAdamW([{"params": [ours], "rank": rank}], update_proj_gap=10**9)
        lowrank.step()  # the first step builds the projector; the timed ones do not refresh
        lowrank.state[ours]["projector"].copy_(projector)
        times = {"galore": [], "sparseft": []}
        for _ in range(repeats):  # alternated, so both see the same machine load
            times["galore"].append(_median_time(galore.step, 1))
            times["sparseft"].append(_median_time(lowrank.step, 1))
        galore_s, ours_s = statistics.median(times["galore"]), statistics.median(times["sparseft"])
        rows.append(dict(bench="step", shape=list(shape), rank=rank, galore_s=galore_s, sparseft_s=ours_s,
                         backend=_backend_name(ours), time_vs_galore=ours_s / galore_s))
        progress(f"      galore {galore_s * 1e3:.1f} ms, sparseft {ours_s * 1e3:.1f} ms ({ours_s / galore_s:.2f}x)")
    return rows


def _backend_name(tensor):
    from sparseft.ops.lowrank_adam import _resolve
    return _resolve(tensor.device, None, "direction")


# ----------------------------------------------------------------------------- 3. SmolLM2 step, 4. curves
def _projected_optimizer(model, lr, moments="project", layerwise=False, gap=GAP, include=None):
    from sparseft.optim import LowRankAdamW, lowrank_param_groups
    groups = lowrank_param_groups(model, rank=MODEL_RANK, include=include, update_proj_gap=gap, scale=1.0)
    return LowRankAdamW(groups, lr=lr, moments=moments, layerwise=layerwise)


def _setup(variant, model, _masks, lr=1e-5, ratios=None, gap=GAP):
    """The variants of the step and the curves (see the module docstring); bench/sparse.py's protocol."""
    if variant == "full_ft":
        return sparse_bench._setup(variant, model, None, lr=lr)
    for p in model.parameters():
        p.requires_grad_(True)
    if variant.startswith("lowrank"):
        moments = variant.split("_")[1] if variant.split("_")[-1] in ("keep", "reset", "project") else "project"
        layerwise = variant.startswith("lowrank_layerwise")
        embeddings = variant.endswith("_embed")  # the (tied) embedding projected too, not plain AdamW
        optimizer = _projected_optimizer(model, lr, moments, layerwise, gap, ["embeddings"] if embeddings else None)
        name = (f"LowRankAdamW(r={MODEL_RANK}{', layerwise' if layerwise else ''}{', +embed' if embeddings else ''}, "
                f"{moments})")
        return {"optimizer": optimizer, "name": name, "trainable": sum(p.numel() for p in model.parameters())}
    from sparseft.optim import OwLoreSampler
    optimizer = _projected_optimizer(model, lr, layerwise=True, gap=gap)
    sampler = OwLoreSampler(model, ratios, gamma=GAMMA, interval=OWLORE_INTERVAL, seed=0)
    return {"optimizer": optimizer, "name": f"OwLore(g={GAMMA}/{len(ratios)}) + LowRankAdamW(layerwise)",
            "trainable": sum(p.numel() for p in model.parameters()),
            "before_step": lambda: sampler.step(optimizer)}


def _ratios(model, batch, seq):
    from sparseft.bench import corpus
    from sparseft.optim import outlier_ratios
    calibration = [{"input_ids": ids} for ids in corpus.batches(batch, seq, 4)]
    return outlier_ratios(model, calibration)


def run_ratios_case(out):
    model = sparse_bench.load_model("cpu", torch.float32)
    ratios = _ratios(model, 4, 128)
    with open(out, "w") as f:
        json.dump({str(k): v for k, v in ratios.items()}, f)
    return {"blocks": len(ratios)}


def run_step_case(variant, batch, seq, device, repeats, ratios_path):
    ratios = None
    if ratios_path:
        with open(ratios_path) as f:
            ratios = {int(k): v for k, v in json.load(f).items()}
    result = sparse_bench.run_step_case(variant, batch, seq, torch.float32, device, repeats, 1, None, "lce",
                                        checkpointing=True, setup=functools.partial(_setup, ratios=ratios))
    result["amortised_step_s"] = result["step_s"] + max(result["first_step_s"] - result["step_s"], 0.0) / GAP
    return result


def run_curve_case(variant, steps, batch, seq, lr, gap):
    from sparseft.bench import corpus
    torch.manual_seed(0)
    model = sparse_bench.load_model("cpu", torch.float32)
    ratios = _ratios(model, batch, seq) if variant == "owlore_lowrank" else None
    built = _setup(variant, model, None, lr=lr, ratios=ratios, gap=gap)
    optimizer, before_step = built["optimizer"], built.get("before_step")
    loss_of = sparse_bench._loss_fn("lce")
    losses = []
    start = time.perf_counter()
    for ids in corpus.batches(batch, seq, steps):
        if before_step is not None:
            before_step()
        loss = loss_of(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"variant": variant, "optimizer": built["name"], "losses": losses, "lr": lr, "update_proj_gap": gap,
            "seconds": time.perf_counter() - start}


def model_rows(device, batch, seq, repeats, progress):
    rows = []
    common = dict(bench="smollm2_step", batch=batch, seq=seq, grad_checkpointing=True, rank=MODEL_RANK,
                  update_proj_gap=GAP, device_name=device_name(device))
    with tempfile.TemporaryDirectory(prefix="sparseft-bench-") as tmp:
        ratios_path = os.path.join(tmp, "ratios.json")
        progress("SmolLM2-135M: OwLore outlier ratios ...")
        ratios = run_in_subprocess("sparseft.bench.lowrank", ["--case", "ratios", "--ratios-out", ratios_path])
        for variant in STEP_VARIANTS:
            progress(f"SmolLM2-135M step: {variant}, batch {batch} x seq {seq}, activation checkpointing ...")
            if variant == "owlore_lowrank" and "error" in ratios:
                rows.append(dict(common, variant=variant, error=ratios["error"]))
                continue
            result = run_in_subprocess("sparseft.bench.lowrank", [
                "--case", variant, "--device", str(device), "--batch", str(batch), "--seq", str(seq),
                "--repeats", str(repeats), "--ratios", ratios_path])
            rows.append({**common, "variant": variant, "loadavg": os.getloadavg(), **result})
            if "error" not in result:
                progress(f"      {result['step_s']:.2f} s/step (first {result['first_step_s']:.2f} s), "
                         f"peak +{result['peak_bytes'] / 2**20:.0f} MiB")
    full = next((r for r in rows if r["variant"] == "full_ft" and "error" not in r), None)
    for r in rows:
        if full and "error" not in r:
            r["memory_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
            r["time_vs_full"] = r["amortised_step_s"] / full["amortised_step_s"]
    return rows


def curve_rows(variants, steps, batch, seq, lr, gap, progress, jobs=1):
    """One fresh process per variant, ``jobs`` at a time (losses only: the runs need not be alone)."""
    def run(variant):
        progress(f"loss curve: {variant}, {steps} steps of batch {batch} x seq {seq}, lr {lr} ...")
        result = run_in_subprocess("sparseft.bench.lowrank", [
            "--case", f"curve:{variant}", "--steps", str(steps), "--curve-batch", str(batch), "--curve-seq", str(seq),
            "--lr", str(lr), "--gap", str(gap)], timeout=4 * 3600, measures_memory=False)
        if "error" not in result:
            progress(f"      {variant}: final loss (mean of the last 10) {statistics.mean(result['losses'][-10:]):.3f}, "
                     f"{result['seconds']:.0f} s")
        return {"bench": "curve", "batch": batch, "seq": seq, "variant": variant, **result}

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(run, variants))
    full = next((r for r in rows if r["variant"] == "full_ft" and "error" not in r), None)
    for r in rows:
        if full and "error" not in r:
            r["final_loss"] = statistics.mean(r["losses"][-10:])
            r["final_loss_vs_full"] = r["final_loss"] / statistics.mean(full["losses"][-10:])
    return rows


# ----------------------------------------------------------------------------- report
def _verdict(value, limit, larger_is_better=False):
    met = value >= limit if larger_is_better else value <= limit
    return f"{value:.3f} ({'>=' if larger_is_better else '<='} {limit}: {'met' if met else 'NOT met'})"


def table(rows):
    lines = []
    refresh = [r for r in rows if r["bench"] == "refresh"]
    if refresh:
        first = refresh[0]
        lines.append(f"projector refresh {first['shape'][0]}x{first['shape'][1]} r={first['rank']}, gradient with "
                     f"σ_i ∝ (i+1)^-{first['decay_exponent']:.2f}")
        lines.append(f"{'method':<34} {'seconds':>8} {'x galore':>18} {'overlap':>22}")
        for r in refresh:
            ratio = _verdict(r["time_vs_galore"], TARGETS["refresh_time_vs_galore"]) if "time_vs_galore" in r else ""
            lines.append(f"{r['method']:<34} {r['seconds']:>8.2f} {ratio:>18} "
                         f"{_verdict(r['overlap'], TARGETS['refresh_overlap'], True):>22}")
    real = [r for r in rows if r["bench"] == "refresh_real"]
    if real:
        labels = [k for k in real[0] if k not in ("bench", "matrix", "shape", "rank")]
        lines.append(f"\noverlap on real SmolLM2-135M gradients, r={real[0]['rank']}, worst of 3 seeds")
        lines.append(f"{'matrix':<44} " + " ".join(f"{label:>20}" for label in labels))
        for r in real:
            lines.append(f"{r['matrix']:<44} " + " ".join(f"{r[label]:>20.4f}" for label in labels))
    step = [r for r in rows if r["bench"] == "step"]
    if step:
        lines.append(f"\nstep without refresh (LowRankAdamW backend {step[0]['backend']})")
        for r in step:
            lines.append(f"{r['shape'][0]}x{r['shape'][1]} r={r['rank']}: galore {r['galore_s'] * 1e3:.1f} ms, "
                         f"sparseft {r['sparseft_s'] * 1e3:.1f} ms, "
                         f"x galore {_verdict(r['time_vs_galore'], TARGETS['step_time_vs_galore'])}")
    model = [r for r in rows if r["bench"] == "smollm2_step"]
    if model:
        lines.append(f"\nSmolLM2-135M step, batch {model[0]['batch']}x{model[0]['seq']}, activation checkpointing, "
                     f"r={model[0]['rank']}, refresh amortised over {model[0]['update_proj_gap']} steps "
                     f"({model[0]['device_name']})")
        lines.append(f"{'variant':<20} {'optimizer':<48} {'step s':>7} {'1st s':>7} {'amort.':>7} {'x full':>20} "
                     f"{'peak MiB':>9} {'x full':>20}")
        for r in model:
            if "error" in r:
                lines.append(f"{r['variant']:<20} failed: {r['error']}")
                continue
            memory_key, time_key = f"memory_vs_full:{r['variant']}", f"time_vs_full:{r['variant']}"
            t = _verdict(r["time_vs_full"], TARGETS[time_key]) if time_key in TARGETS else f"{r['time_vs_full']:.3f}"
            m = (_verdict(r["memory_vs_full"], TARGETS[memory_key]) if memory_key in TARGETS
                 else f"{r['memory_vs_full']:.3f}")
            lines.append(f"{r['variant']:<20} {r['optimizer']:<48} {r['step_s']:>7.2f} {r['first_step_s']:>7.2f} "
                         f"{r['amortised_step_s']:>7.2f} {t:>20} {r['peak_bytes'] / 2**20:>9.0f} {m:>20}")
    curves = [r for r in rows if r["bench"] == "curve"]
    if curves:
        lines.append(f"\nloss curves: {len(curves[0].get('losses', []))} steps, batch {curves[0]['batch']}x"
                     f"{curves[0]['seq']} of real text, final loss = mean of the last 10")
        for r in curves:
            if "error" in r:
                lines.append(f"{r['variant']:<20} failed: {r['error']}")
                continue
            lines.append(f"{r['variant']:<20} {r['optimizer']:<48} first {r['losses'][0]:.3f} final "
                         f"{r['final_loss']:.3f}, x full {_verdict(r['final_loss_vs_full'], TARGETS['final_loss_vs_full'])}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = [r for r in rows if r["bench"] == "curve" and "error" not in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in curves:
        window = 10  # a running mean: single batches of real text differ a lot in difficulty
        losses = torch.tensor(r["losses"])
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        ax.plot(range(window, window + len(smooth)), smooth.tolist(), label=r["optimizer"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {window})")
    ax.set_title(f"SmolLM2-135M, batch {curves[0]['batch']}x{curves[0]['seq']}, lr {curves[0]['lr']}, "
                 f"refresh every {curves[0]['update_proj_gap']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_rows(args, progress=print):
    """Everything `sparseft bench lowrank` runs; returns the rows and prints the table."""
    progress(f"load average at start: {os.getloadavg()}")
    parts = args.parts.split(",")
    sizes = TINY if args.tiny else {}
    rows = []
    if "refresh" in parts:
        real, alpha = None, ASSUMED_DECAY
        if not (args.no_model or args.tiny):
            progress("SmolLM2-135M: real layer gradients for the decay fit and the overlaps ...")
            real = _real_gradients()
            alpha = _fitted_decay(real)
        rows += refresh_rows(alpha, real, args.repeats, progress, *sizes.get("refresh", ()))
    if "step" in parts:
        rows += step_rows(args.repeats, progress, *sizes.get("step", ()))
    if args.tiny:
        parts = []
    if "model" in parts and not args.no_model:
        rows += model_rows(args.device, args.batch, args.seq, args.repeats, progress)
    if "curves" in parts and not args.no_model:
        variants = args.curve_variants.split(",") if args.curve_variants else CURVE_VARIANTS
        rows += curve_rows(variants, args.steps, args.curve_batch, args.curve_seq, args.lr, args.gap, progress,
                           args.curve_jobs)
    progress(f"load average at end: {os.getloadavg()}")
    print(table(rows))
    return rows


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="one case in this process, JSON printed: ratios, a step variant, curve:VARIANT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-model", action="store_true", help="no SmolLM2: refresh and step only")
    parser.add_argument("--tiny", action="store_true", help="small refresh and step shapes, no SmolLM2 (a smoke run)")
    parser.add_argument("--parts", default="refresh,step,model",
                        help="comma list of refresh,step,model,curves (curves: ~1000 training steps, long)")
    parser.add_argument("--curve-variants", help=f"curves: comma list of {','.join(CURVE_VARIANTS)} (default: all)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--curve-jobs", type=int, default=1, help="curves: variants run at once (set OMP_NUM_THREADS "
                        "to cores / jobs)")
    parser.add_argument("--curve-batch", type=int, default=2)
    parser.add_argument("--curve-seq", type=int, default=32, help="curves: short sequences keep the 1000 steps "
                        "under an hour on 2 CPU cores")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--gap", type=int, default=50, help="curves: update_proj_gap (refreshes inside 200 steps)")
    parser.add_argument("--ratios", help="OwLore ratios file of a step case")
    parser.add_argument("--ratios-out", help="ratios case: where to write them")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--png", help="draw the loss curves to this file")
    return parser


def _main(argv=None):
    args = _parser().parse_args(argv)
    if args.case == "ratios":
        print(json.dumps(run_ratios_case(args.ratios_out)))
    elif args.case and args.case.startswith("curve:"):
        print(json.dumps(run_curve_case(args.case.split(":", 1)[1], args.steps, args.curve_batch, args.curve_seq,
                                        args.lr, args.gap)))
    elif args.case:
        print(json.dumps(run_step_case(args.case, args.batch, args.seq, args.device, args.repeats, args.ratios)))
    else:
        rows = main_rows(args)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
            print(f"results written to {args.json}")
        if args.png:
            plot(rows, args.png)
            print(f"plot written to {args.png}")


if __name__ == "__main__":
    _main()
