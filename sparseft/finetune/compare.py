"""``sparseft finetune``: one run, or ``--compare``'s table of methods and losses, each run in a
fresh process (``sparseft.finetune.job``), with the issue's claims checked on the result.

Output directory: one JSON row per run and the untuned model's, ``results.json`` (all rows, the
targets and their verdicts), ``accuracy_vs_forgetting.png`` and each sparse run's delta.
"""

import json
import os
import shutil
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


def chosen_lines(row, base):
    """The LiNeS point kept: the one recovering most perplexity within 1 accuracy point of the
    fine-tune, else None."""
    after = row["after"]
    eligible = [p for p in row.get("lines", []) if p["accuracy"] >= after["accuracy"] - 0.01]
    return min(eligible, key=lambda p: p["perplexity"], default=None)


def verdicts(rows):
    """The issue's targets, each with the numbers it was judged on (None where a run is missing)."""
    by = {(r["method"], r["loss"]): r for r in rows if "error" not in r}
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
        out["thought masks ≥ plain loss accuracy"] = {
            "met": best["after"]["accuracy"] >= full["after"]["accuracy"],
            "difference": {r["loss"]: r["after"]["accuracy"] - full["after"]["accuracy"] for r in thought}}
    if full:
        memory = {m: by[(m, "plain")]["peak_bytes"] / full["peak_bytes"]
                  for m in ("owlore", "lift") if (m, "plain") in by}
        if memory:
            out["memory ≤ 0.5× full FT's peak"] = {"met": all(v <= 0.5 for v in memory.values()), "ratio": memory}
    return out


def table(rows):
    base = next((r for r in rows if r["method"] == "base" and "error" not in r), None)
    lines = [f"{'method':9} {'loss':15} {'accuracy':>9} {'ppl':>8} {'Δppl':>7} {'LiNeS (α: acc/ppl)':>30} "
             f"{'peak MiB':>9} {'s/step':>7} {'trainable':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:9} {str(r['loss']):15} failed: {r['error']}")
            continue
        after = r["after"]
        grid = " ".join(f"{p['alpha']}:{p['accuracy']:.2f}/{p['perplexity']:.2f}" for p in r.get("lines", []))
        delta = f"{_increase(after, base):+7.2f}" if base else ""
        extra = ("" if r["method"] == "base" else
                 f"{r['peak_bytes'] / 2**20:9.0f} {r['step_s']:7.2f} {r['trainable']:11,d}")
        lines.append(f"{r['method']:9} {str(r['loss'] or ''):15} {after['accuracy']:9.3f} {after['perplexity']:8.2f} "
                     f"{delta:>7} {grid:>30} {extra}")
    return "\n".join(lines)


def plot(rows, path):
    """Accuracy against perplexity increase, one point per run (LiNeS points hollow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = next(r for r in rows if r["method"] == "base" and "error" not in r)
    figure, axes = plt.subplots(figsize=(7, 5))
    for r in rows:
        if "error" in r or r["method"] == "base":
            continue
        label = f"{r['method']}/{r['loss']}"
        point = axes.scatter(_increase(r["after"], base), r["after"]["accuracy"], label=label)
        for p in r.get("lines", []):
            axes.scatter(_increase(p, base), p["accuracy"], facecolors="none", edgecolors=point.get_facecolor())
    axes.axhline(base["after"]["accuracy"], color="grey", linestyle=":", label="base accuracy")
    axes.set_xlabel("perplexity increase on pydoc text (forgetting)")
    axes.set_ylabel("exact-match accuracy, held-out problems")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def check_args(runs, steps, out, force):
    for method, loss in runs:
        if method not in METHODS:
            raise ValueError(f"--method: expected one of {METHODS}, got {method!r}")
        if loss not in LOSSES:
            raise ValueError(f"--loss: expected one of {LOSSES}, got {loss!r}")
    if steps <= 0:
        raise ValueError(f"--steps: expected a positive number of steps, got {steps}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"--out: {out} exists; pass --force to replace it")


def main(method, loss, steps, out, *, batch_size=4, force=False, compare=False, seed=0, eval_problems=40,
         quiet=False, tiny=False, runs=None):
    """Run and report; returns the rows. Arguments are checked before anything is written."""
    runs = list(runs or (COMPARE_RUNS if compare else [(method, loss)]))
    check_args(runs, steps, out, force)
    if batch_size <= 0:
        raise ValueError(f"--batch-size: expected a positive number of problems, got {batch_size}")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    rows = [_job(out, "base", None, steps, batch_size, seed, eval_problems, quiet, tiny)]
    for run_method, run_loss in runs:
        rows.append(_job(out, run_method, run_loss, steps, batch_size, seed, eval_problems, quiet, tiny))
    report = {"rows": rows, "targets": verdicts(rows), "command": " ".join(sys.argv)}
    with open(os.path.join(out, "results.json"), "w") as results:
        json.dump(report, results, indent=1)
    print(table(rows))
    for claim, verdict in report["targets"].items():
        print(f"{'met    ' if verdict['met'] else 'NOT met'}  {claim}")
    if any(r["method"] != "base" and "error" not in r for r in rows):
        plot(rows, os.path.join(out, "accuracy_vs_forgetting.png"))
    return rows
