"""`sparseft bench merge --tiny`: every merge measured for mergekit, sparseft and the I/O floor,
ratios present, outputs agreeing with the float64 reference (no timed assertions)."""

import json
import os
import subprocess
import sys

import pytest

from sparseft.bench import merge as bench


def test_tiny_merge_bench(tmp_path):
    pytest.importorskip("mergekit")
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "sparseft.bench.merge", "--tiny", "--json", str(out),
                           "--tmp", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["merge"]: r for r in result["rows"]}
    assert set(bench.MERGES) <= set(rows)
    for merge in bench.MERGES:
        row = rows[merge]
        for case in ("mergekit", "sparseft", "io_floor"):
            assert "error" not in row[case], (merge, case, row[case])
            assert row[case]["seconds"] > 0 and row[case]["peak_rss_bytes"] > 0, (merge, case, row[case])
        for ratio in ("time_vs_mergekit", "rss_vs_mergekit", "time_vs_io_floor"):
            assert row[ratio] > 0, (merge, ratio)
        assert set(row["targets"]) >= {"time_vs_io_floor"}
        agreement = row["agreement"]
        assert agreement["tensors"] > 0 and agreement["entries"] > 0
        assert not agreement["sparseft_missing"] and not agreement["mergekit_missing"]
        # sparseft: the float64 result rounded to bf16 (plus float32 error of the summed terms)
        assert agreement["sparseft"]["over_tolerance"] == 0, (merge, agreement["sparseft"])
        if merge == "ties":
            assert row["targets"]["sparseft_vs_float64_over_tolerance"]["met"]
            assert agreement["sparseft"]["max_ulps"] <= 1.0
            # mergekit's argsort keeps exactly k where |τ| ties at the threshold: it may differ only there
            assert agreement["mergekit"]["over_tolerance_unexplained"] == 0, agreement["mergekit"]
            assert agreement["mergekit"]["over_tolerance"] <= agreement["entries_tied_at_threshold"]
        else:
            assert agreement["mergekit"]["over_tolerance"] == 0, (merge, agreement["mergekit"])
            assert agreement["mergekit_vs_sparseft"]["over_tolerance"] == 0, (merge, agreement["mergekit_vs_sparseft"])
    assert set(rows["ties"]["targets"]) >= {"time_vs_mergekit", "rss_vs_mergekit"}
    assert set(rows["task_arithmetic_lines"]["targets"]) >= {"time_vs_mergekit", "rss_vs_mergekit"}
    assert "merge" in proc.stdout and "agreement" in proc.stdout  # the table was printed
    # the temporary directory (inputs, outputs) is gone unless --keep
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sparseft-bench-merge-")]
