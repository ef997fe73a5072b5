"""``sparseft finetune``: one run, or ``--compare``'s table of methods and losses, each run in a
fresh process (``sparseft.finetune.job``), with the issue's claims checked on the result.

Output directory: one JSON row per run and seed and the untuned model's, ``results.json`` (all
rows, their means over seeds, the targets and their verdicts, judged on the means),
``accuracy_vs_forgetting.png`` and each sparse run's delta.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys

from sparseft.finetune.job import LOSSES, METHODS

# (method, loss) runs of --compare: the losses on full fine-tuning, then each method with plain.
COMPARE_RUNS = (("adamw", "plain"), ("adamw", "thought-mask"), ("adamw", "masked-thought"), ("lift", "plain"),
                ("owlore", "plain"))


def _job(out, method, loss, steps, batch_size, seed, eval_problems, quiet, tiny, lines=True):
    command = [sys.executable, "-m", "sparseft.finetune.job", "--method", method, "--out", out, "--seed", str(seed),
               "--eval-problems", str(eval_problems)]
    if method != "base":
        command += ["--loss", loss, "--steps", str(steps), "--batch-size", str(batch_size)]
    command += ["--quiet"] * quiet + ["--tiny"] * tiny + ["--no-lines"] * (not lines)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # see bench.measure
    done = subprocess.run(command, env=env)
    name = f"base-{seed}.json" if method == "base" else f"{method}-{loss}-{seed}.json"
    if done.returncode != 0:
        return {"method": method, "loss": loss, "seed": seed, "error": f"exit code {done.returncode}"}
    with open(os.path.join(out, name)) as row:
        return json.load(row)


def _increase(row, base):
    return row["perplexity"] - base["after"]["perplexity"]


def _increases(row, base):
    """Each seed's perplexity increase over the same seed's untuned model."""
    return [p - b for p, b in zip(row["per_seed"]["perplexity"], base["per_seed"]["perplexity"])]


def _sd(values):
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_rows(rows):
    """One row per (method, loss), in first-seen order: the mean over seeds of every reported
    number but ``step_s``, the fastest seed's (other work on the machine only ever slows a step
    down), with ``seeds`` and ``per_seed`` (accuracy, perplexity in seed order). Failed runs are
    left out; a run given twice for one seed is an error."""
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r["loss"]), []).append(r)
    means = []
    for (method, loss), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        seeds = [r.get("seed", 0) for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{method}/{loss}: a seed appears more than once among its runs' seeds {seeds}")
        per_seed = {key: [r["after"][key] for r in runs] for key in ("accuracy", "perplexity")}
        row = {"method": method, "loss": loss, "seeds": seeds, "per_seed": per_seed,
               "after": {key: statistics.fmean(values) for key, values in per_seed.items()}}
        for key, combine in (("peak_bytes", statistics.fmean), ("trainable", statistics.fmean), ("step_s", min)):
            if key in runs[0]:
                row[key] = combine([r[key] for r in runs])
        points = [r.get("lines", []) for r in runs]
        if points and all(len(p) == len(points[0]) for p in points):
            row["lines"] = [{"alpha": grid[0]["alpha"], "beta": grid[0].get("beta"),
                             "accuracy": statistics.fmean([p["accuracy"] for p in grid]),
                             "perplexity": statistics.fmean([p["perplexity"] for p in grid])}
                            for grid in zip(*points)]
        means.append(row)
    return means


def chosen_lines(row, base):
    """The LiNeS point kept: the one recovering most perplexity within 1 accuracy point of the
    fine-tune, else None."""
    after = row["after"]
    eligible = [p for p in row.get("lines", []) if p["accuracy"] >= after["accuracy"] - 0.01]
    return min(eligible, key=lambda p: p["perplexity"], default=None)


def verdicts(rows):
    """The issue's targets, judged on the means over seeds, each with the numbers it was judged on
    (a claim whose runs are missing is left out)."""
    by = {(r["method"], r["loss"]): r for r in mean_rows(rows)}
    base = by.get(("base", None))
    if base is None:
        return {}
    full = by.get(("adamw", "plain"))
    out = {}
    tuned = [r for r in by.values() if r["method"] != "base"]
    out["learns the task (each method ≥ base + 10 points)"] = {
        "met": all(r["after"]["accuracy"] >= base["after"]["accuracy"] + 0.10 for r in tuned),
        "accuracy": {f"{r['method']}/{r['loss']}": r["after"]["accuracy"] for r in tuned},
        "base": base["after"]["accuracy"]}
    lift = by.get(("lift", "plain"))
    if full and lift:
        full_up, lift_up = _increase(full["after"], base), _increase(lift["after"], base)
        out["LIFT forgets less (ppl increase ≤ 0.5× full FT's, accuracy within 3 points)"] = {
            "met": lift_up <= 0.5 * full_up and lift["after"]["accuracy"] >= full["after"]["accuracy"] - 0.03,
            "lift_ppl_increase": lift_up, "full_ppl_increase": full_up,
            "lift_accuracy": lift["after"]["accuracy"], "full_accuracy": full["after"]["accuracy"]}
    if full:
        point = chosen_lines(full, base)
        full_up = _increase(full["after"], base)
        recovered = None if point is None or full_up <= 0 else (full["after"]["perplexity"] - point["perplexity"]) / full_up
        out["LiNeS recovers ≥ 50% of full FT's ppl increase, ≤ 1 point accuracy lost"] = {
            "met": recovered is not None and recovered >= 0.5, "recovered": recovered, "point": point}
    thought = [by[k] for k in (("adamw", "thought-mask"), ("adamw", "masked-thought")) if k in by]
    if full and thought:
        best = max(thought, key=lambda r: r["after"]["accuracy"])
        paired = {r["loss"]: [a - b for a, b in zip(r["per_seed"]["accuracy"], full["per_seed"]["accuracy"])]
                  for r in thought if r["seeds"] == full["seeds"]}
        out["thought masks ≥ plain loss accuracy"] = {
            "met": best["after"]["accuracy"] >= full["after"]["accuracy"],
            "difference": {r["loss"]: r["after"]["accuracy"] - full["after"]["accuracy"] for r in thought},
            "difference_per_seed": paired, "difference_sd": {loss: _sd(d) for loss, d in paired.items()}}
    if full:
        memory = {m: by[(m, "plain")]["peak_bytes"] / full["peak_bytes"]
                  for m in ("owlore", "lift") if (m, "plain") in by}
        if memory:
            out["memory ≤ 0.5× full FT's peak"] = {"met": all(v <= 0.5 for v in memory.values()), "ratio": memory}
    return out


def table(rows):
    """The terminal table: means over seeds, ± the sample standard deviation where several."""
    means = mean_rows(rows)
    base = next((r for r in means if r["method"] == "base"), None)
    lines = [f"{'method':9} {'loss':15} {'seeds':>5} {'accuracy':>13} {'ppl':>8} {'Δppl':>13} "
             f"{'LiNeS (α: acc/ppl)':>30} {'peak MiB':>9} {'s/step':>7} {'trainable':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:9} {str(r['loss']):15} {r.get('seed', 0):>5} failed: {r['error']}")
    for r in means:
        after, spread = r["after"], r["per_seed"]
        accuracy = f"{after['accuracy']:.3f}" + (f"±{_sd(spread['accuracy']):.3f}" if len(r["seeds"]) > 1 else "")
        delta = ""
        if base:
            delta = f"{_increase(after, base):+.2f}"
            if len(r["seeds"]) > 1 and r["seeds"] == base["seeds"]:
                delta += f"±{_sd(_increases(r, base)):.2f}"
        grid = " ".join(f"{p['alpha']}:{p['accuracy']:.2f}/{p['perplexity']:.2f}" for p in r.get("lines", []))
        extra = ("" if r["method"] == "base" else
                 f"{r['peak_bytes'] / 2**20:9.0f} {r['step_s']:7.2f} {round(r['trainable']):11,d}")
        lines.append(f"{r['method']:9} {str(r['loss'] or ''):15} {len(r['seeds']):>5} {accuracy:>13} "
                     f"{after['perplexity']:8.2f} {delta:>13} {grid:>30} {extra}")
    return "\n".join(lines)


def plot(rows, path):
    """Accuracy against perplexity increase, one point per method and loss at the seeds' mean
    (bars: ± one standard deviation over seeds; LiNeS points hollow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    means = mean_rows(rows)
    base = next(r for r in means if r["method"] == "base")
    figure, axes = plt.subplots(figsize=(7, 5))
    for r in means:
        if r["method"] == "base":
            continue
        point = axes.errorbar(_increase(r["after"], base), r["after"]["accuracy"], xerr=_sd(_increases(r, base)),
                              yerr=_sd(r["per_seed"]["accuracy"]), fmt="o", capsize=3,
                              label=f"{r['method']}/{r['loss']}")
        for p in r.get("lines", []):
            axes.scatter(_increase(p, base), p["accuracy"], facecolors="none", edgecolors=point[0].get_color())
    axes.axhline(base["after"]["accuracy"], color="grey", linestyle=":", label="base accuracy")
    axes.set_xlabel("perplexity increase on pydoc text (forgetting)")
    axes.set_ylabel("exact-match accuracy, held-out problems")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def check_args(runs, steps, out, force, seeds):
    for method, loss in runs:
        if method not in METHODS:
            raise ValueError(f"--method: expected one of {METHODS}, got {method!r}")
        if loss not in LOSSES:
            raise ValueError(f"--loss: expected one of {LOSSES}, got {loss!r}")
    if steps <= 0:
        raise ValueError(f"--steps: expected a positive number of steps, got {steps}")
    if not seeds or len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds: expected distinct non-negative seeds, got {list(seeds)}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"--out: {out} exists; pass --force to replace it")


def load_rows(sources):
    """The rows of earlier runs, each source an output directory or its ``results.json``."""
    rows = []
    for source in sources:
        path = os.path.join(source, "results.json") if os.path.isdir(source) else source
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--report-from: {source} is neither a results.json nor a directory holding one")
        with open(path) as results:
            rows += json.load(results)["rows"]
    mean_rows(rows)  # refuses a run given twice for one seed
    return rows


def report(rows, out):
    """Write ``results.json`` (rows, means over seeds, verdicts) and the plot; print the table."""
    summary = {"rows": rows, "means": mean_rows(rows), "targets": verdicts(rows), "command": " ".join(sys.argv)}
    with open(os.path.join(out, "results.json"), "w") as results:
        json.dump(summary, results, indent=1)
    print(table(rows))
    for claim, verdict in summary["targets"].items():
        print(f"{'met    ' if verdict['met'] else 'NOT met'}  {claim}")
    if any(r["method"] != "base" and "error" not in r for r in rows):
        plot(rows, os.path.join(out, "accuracy_vs_forgetting.png"))


def main(method, loss, steps, out, *, batch_size=4, force=False, compare=False, seeds=(0,), eval_problems=40,
         quiet=False, tiny=False, runs=None, report_from=None):
    """Run every (method, loss) for each seed, or report the rows of earlier output directories
    (``report_from``), and return the rows. Arguments are checked before anything is written."""
    runs = list(runs or (COMPARE_RUNS if compare else [(method, loss)]))
    check_args(runs, steps, out, force, seeds)
    if batch_size <= 0:
        raise ValueError(f"--batch-size: expected a positive number of problems, got {batch_size}")
    earlier = load_rows(report_from) if report_from else None
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    if earlier is not None:
        rows = earlier
    else:
        rows = []
        for seed in seeds:
            rows.append(_job(out, "base", None, steps, batch_size, seed, eval_problems, quiet, tiny))
            for run_method, run_loss in runs:
                rows.append(_job(out, run_method, run_loss, steps, batch_size, seed, eval_problems, quiet, tiny))
    report(rows, out)
    return rows
