"""The distributed bench's smoke path end to end: `sparseft bench sparse --fsdp 2 --tiny` (a
config-built tiny Llama, 1 repeat, gloo CPU ranks) writes its rows and counts the refresh's
all-reduced bytes exactly as the range finder's formula says. FSDP2 only: every case starts
fresh processes (each importing torch and transformers), and --ddp would add five more."""

import json
import sys

import pytest
import torch.distributed as dist

from sparseft import cli

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def test_tiny_bench_runs_and_counts_refresh_bytes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "dist.json"
    argv = ["sparseft", "bench", "sparse", "--fsdp", "2", "--tiny", "--batch", "1", "--seq", "16",
            "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli.main(argv[1:]) == 0
    rows = json.loads(out.read_text())["sparse"]
    steps = [r for r in rows if r["bench"] == "distributed_step"]
    assert [(r["variant"], r["wrapper"]) for r in steps] == [
        (v, w) for v in ("full_adamw", "lift_sparse", "lowrank") for w in ("plain", "fsdp")]
    for r in steps:
        assert "error" not in r, r
        assert r["step_s"] > 0 and len(r["per_rank"]) == r["world"]
    traffic = next(r for r in steps if r["wrapper"] == "fsdp" and r["variant"] == "lowrank")["refresh_traffic"]
    assert {e["power_iters"] for e in traffic} == {1, 2}
    for event in traffic:  # (power_iters + 1) n×k float32 products, nothing else
        assert event["measured_bytes"] == event["expected_bytes"], event
    summary = rows[-1]
    assert summary["bench"] == "distributed_summary" and "fsdp_lift_peak_bytes_vs_one_process" in summary["verdicts"]
    assert "LowRankAdamW refresh under FSDP2" in capsys.readouterr().out
