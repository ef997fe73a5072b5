"""`sparseft finetune`: the offline SmolLM2 checkpoint, bad input, and a tiny end-to-end run."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseft.finetune import compare  # noqa: E402


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sparseft.cli", "finetune", *args], capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.parametrize("args, message", [
    (("--method", "sgd"), "--method: expected one of"),
    (("--loss", "focal"), "--loss: expected one of"),
    (("--steps", "0"), "--steps: expected a positive number"),
    (("--runs", "lift/nope"), "--loss: expected one of"),
    (("--seeds", "0,x"), "--seeds: expected a comma list of integers"),
    (("--seeds", "1,1"), "--seeds: expected distinct"),
    (("--report-from", "/nonexistent/run"), "--report-from: /nonexistent/run is neither"),
])
def test_bad_input_is_refused_before_anything_runs(args, message, tmp_path):
    done = _cli(*args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    done = _cli("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--force" in done.stderr
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def _smollm2_or_skip():
    from sparseft.finetune.model import gguf_model_dir
    try:
        gguf_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_converted_checkpoint_is_the_gguf_model_and_trainable():
    """The cached safetensors checkpoint computes the GGUF model's logits, and the Trainer's
    quantized-model refusal does not apply to it."""
    _smollm2_or_skip()
    from sparseft.finetune.model import GGUF_FILE, gguf_model_dir, load_model
    model, tokenizer = load_model()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    gguf = transformers.AutoModelForCausalLM.from_pretrained(gguf_model_dir(), gguf_file=GGUF_FILE,
                                                             dtype=torch.float32)
    ids = tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf(ids).logits)


def test_tiny_compare_writes_rows_targets_plot_and_delta(tmp_path):
    _smollm2_or_skip()  # the tokenizer comes from the same checkpoint
    out = tmp_path / "run"
    done = _cli("--tiny", "--runs", "lift,adamw/thought-mask", "--steps", "2", "--eval-problems", "2", "--quiet",
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["loss"]): r for r in report["rows"]}
    assert set(rows) == {("base", None), ("lift", "plain"), ("adamw", "thought-mask")}
    for key in (("lift", "plain"), ("adamw", "thought-mask")):
        row = rows[key]
        assert "error" not in row and row["steps"] == 2 and len(row["lines"]) == 2
        assert 0.0 <= row["after"]["accuracy"] <= 1.0 and row["after"]["perplexity"] > 1.0
        assert row["peak_bytes"] > 0 and row["trainable"] > 0
    assert rows[("lift", "plain")]["trainable"] < rows[("adamw", "thought-mask")]["trainable"]
    assert (out / "accuracy_vs_forgetting.png").stat().st_size > 0
    assert (out / "lift.delta.safetensors").exists() and not (out / "adamw.delta.safetensors").exists()
    assert "learns the task (each method ≥ base + 10 points)" in report["targets"]
    assert "lift" in done.stdout and "NOT met" in done.stdout  # a random tiny model learns nothing


def test_verdicts_follow_the_rows():
    def row(method, loss, accuracy, ppl, peak=100, lines=()):
        return {"method": method, "loss": loss, "after": {"accuracy": accuracy, "perplexity": ppl},
                "peak_bytes": peak, "lines": list(lines)}
    rows = [row("base", None, 0.0, 10.0), row("adamw", "plain", 0.5, 14.0, 100, [
                {"alpha": 0.5, "accuracy": 0.495, "perplexity": 11.0}]),
            row("lift", "plain", 0.48, 11.5, 40), row("adamw", "thought-mask", 0.55, 13.0)]
    verdict = compare.verdicts(rows)
    assert verdict["learns the task (each method ≥ base + 10 points)"]["met"]
    assert verdict["LIFT forgets less (ppl increase ≤ 0.5× full FT's, accuracy within 3 points)"]["met"]
    lines = verdict["LiNeS recovers ≥ 50% of full FT's ppl increase, ≤ 1 point accuracy lost"]
    assert lines["met"] and lines["recovered"] == pytest.approx(0.75)
    assert verdict["thought masks ≥ plain loss accuracy"]["met"]
    assert verdict["memory ≤ 0.5× full FT's peak"] == {"met": True, "ratio": {"lift": 0.4}}


def _row(method, loss, seed, accuracy, ppl, peak=100, lines=()):
    return {"method": method, "loss": loss, "seed": seed, "after": {"accuracy": accuracy, "perplexity": ppl},
            "peak_bytes": peak, "step_s": 1.0 + seed, "trainable": 10, "lines": list(lines)}


def test_seeds_are_judged_on_their_means_with_paired_spreads():
    rows = []
    for seed, (plain, masked) in enumerate([(0.5, 0.6), (0.3, 0.2), (0.4, 0.55)]):
        rows += [_row("base", None, seed, 0.0, 10.0), _row("adamw", "plain", seed, plain, 12.0 + seed),
                 _row("adamw", "masked-thought", seed, masked, 12.0)]
    means = {(r["method"], r["loss"]): r for r in compare.mean_rows(rows)}
    assert means[("adamw", "plain")]["after"]["perplexity"] == pytest.approx(13.0)
    assert means[("adamw", "plain")]["per_seed"]["accuracy"] == [0.5, 0.3, 0.4]
    assert means[("adamw", "plain")]["step_s"] == 1.0  # the fastest seed's
    verdict = compare.verdicts(rows)["thought masks ≥ plain loss accuracy"]
    assert verdict["met"] and verdict["difference"]["masked-thought"] == pytest.approx(0.05)
    assert verdict["difference_per_seed"]["masked-thought"] == pytest.approx([0.1, -0.1, 0.15])
    assert verdict["difference_sd"]["masked-thought"] == pytest.approx(0.1322876, rel=1e-5)
    printed = compare.table(rows)
    assert "0.400±0.100" in printed and "+3.00±1.00" in printed  # Δppl's spread pairs each seed with its base
    with pytest.raises(ValueError, match="adamw/plain: a seed appears more than once"):
        compare.mean_rows(rows + [_row("adamw", "plain", 1, 0.9, 11.0)])


def test_report_from_earlier_runs_combines_their_seeds(tmp_path):
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        rows = [_row("base", None, seed, 0.0, 10.0), _row("adamw", "plain", seed, 0.2 + 0.2 * seed, 12.0)]
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps({"rows": rows}))
    done = _cli("--report-from", f"{tmp_path / 's0'},{tmp_path / 's1' / 'results.json'}", "--out",
                str(tmp_path / "both"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "both" / "results.json").read_text())
    assert len(report["rows"]) == 4
    full = next(r for r in report["means"] if r["method"] == "adamw")
    assert full["seeds"] == [0, 1] and full["after"]["accuracy"] == pytest.approx(0.3)
    assert (tmp_path / "both" / "accuracy_vs_forgetting.png").stat().st_size > 0


def test_a_seed_reproduces_its_run(tmp_path):
    """Two runs of one seed give the same loss, accuracy and perplexity (so the spread over seeds
    is the seeds', not run-to-run noise); another seed gives another loss. LIFT: its selection
    is a randomized factorisation."""
    _smollm2_or_skip()
    method = "lift"

    def run(seed, name):
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([sys.executable, "-m", "sparseft.finetune.job", "--tiny", "--method", method,
                               "--steps", "3", "--batch-size", "2", "--eval-problems", "2", "--no-lines", "--quiet",
                               "--seed", str(seed), "--out", str(out)], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / f"{method}-plain-{seed}.json").read_text())

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first["final_loss"] == again["final_loss"]
    assert first["after"] == {**again["after"], "eval_s": first["after"]["eval_s"]}
    assert first["final_loss"] != other["final_loss"]
