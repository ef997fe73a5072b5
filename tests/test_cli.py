"""The sparseft command: info, and a tiny benchmark run end to end."""

import json
import subprocess
import sys


def _sparseft(*args):
    return subprocess.run([sys.executable, "-m", "sparseft.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_backends():
    proc = _sparseft("info")
    assert proc.returncode == 0, proc.stderr
    assert "default on cpu:" in proc.stdout and "triton" in proc.stdout


def test_bench_ce_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = _sparseft("bench", "ce", "--tokens", "64", "--cases", "gemm-limit,torch-eager,sparseft", "--repeats", "1",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    rows = {(r["case"], r["masked"]): r for r in results["ce"]}
    assert set(rows) == {("gemm-limit", 0.0), ("torch-eager", 0.0), ("sparseft", 0.0), ("torch-eager", 0.5),
                         ("sparseft", 0.5)}
    assert all("error" not in r and r["seconds"] > 0 for r in rows.values())
    assert "sparseft" in proc.stdout and results["device"]


def test_bench_lowrank_tiny_compares_with_galore(tmp_path):
    out = tmp_path / "lowrank.json"
    proc = subprocess.run([sys.executable, "-m", "sparseft.bench.lowrank", "--tiny", "--repeats", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    refresh = [r for r in rows if r["bench"] == "refresh"]
    assert refresh[0]["method"].startswith("galore-torch") and len(refresh) == 5
    assert all(0.8 < r["overlap"] <= 1 + 1e-6 and r["seconds"] > 0 for r in refresh)
    steps = [r for r in rows if r["bench"] == "step"]
    assert len(steps) == 2 and all(r["galore_s"] > 0 and r["sparseft_s"] > 0 for r in steps)
    assert "x galore" in proc.stdout
