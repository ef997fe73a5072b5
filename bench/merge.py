"""`sparseft bench merge`: sparseft's streaming merge against mergekit (ratios in one run, CPU).

Inputs are built here, offline, in a temporary directory: a random Llama (~0.5B parameters,
bf16; `--tiny`: a few million) and three "fine-tunes" = base + dense random deltas
(N(0,1)·DELTA·rms(tensor), i.e. ~1e-3 on the 0.02-std weights; a different seed each), all
bf16 HF directories. `--smollm2`: SmolLM2-135M (the offline GGUF of bench/sparse.py) as the base
instead, its directory written by hand as tests/test_merge.py does.

Merges (3 models, out_dtype bfloat16, mergekit computing in float32):
  ties                   TIES, density 0.2 (per-tensor top-k), weights 1, normalize (the default)
  task_arithmetic_lines  task arithmetic + LiNeS λ(ℓ) = α + β·(ℓ−1)/(L−1), α=0.25, β=0.5: sparseft
                         with a `lines:` block, mergekit with per-layer weight lists [α, α+β]
                         (its list interpolation at t = ℓ/(L−1), t = 0 outside the blocks, gives
                         the same λ for every tensor)
  linear                 mean of the three fine-tunes

Each merge runs as `mergekit-yaml CONFIG OUT --no-cuda --lazy-unpickle --no-copy-tokenizer
--quiet`, as `python -m sparseft.cli merge CONFIG OUT --quiet`, and as the I/O floor (this module
with --case io_floor: every input tensor read from its safetensors file into memory once, one
output of the output's size written once and fsynced), each in its own process. Wall time is
the child's from spawn to exit (interpreter start and imports included: what a user waits for);
peak RSS is the child's ru_maxrss from os.wait4 (the kernel's resident high-water mark of that
process, mapped file pages it touched included). All cases read inputs from a warm page cache
(the build just wrote them). Then the outputs are compared tensor by tensor, against each other
and against a float64 reference computed here from the inputs: errors in bf16 ulps of the
reference value (ulp = 2^(e−8) for |x| = m·2^e, m ∈ [0.5, 1)). For TIES the reference keeps
|τ_t| ≥ the k-th largest |τ_t| (all entries tied at the threshold); mergekit's argsort keeps
exactly k, so where several |τ_t| equal the threshold it drops some of them: those entries are
counted, and any mismatch outside them is counted as unexplained.

  python -m sparseft.bench.merge [--tiny] [--smollm2] [--json out.json] [--png bars.png] [--keep]
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

MERGES = ("ties", "task_arithmetic_lines", "linear")
DENSITY = 0.2
LINES_ALPHA, LINES_BETA = 0.25, 0.5
DELTA = 0.05  # fine-tune delta std relative to the tensor's rms: 1e-3 on Llama's 0.02-std init
TUNES = 3
# hidden 1024, 24 blocks, MLP 4096, vocab 48000 untied: 24·16.78M + 2·49.15M = 0.501B parameters
FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=48000)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=8000)
TARGETS = {
    "ties": {"time_vs_mergekit": 0.15, "rss_vs_mergekit": 0.5, "sparseft_vs_float64_over_tolerance": 0},
    "task_arithmetic_lines": {"time_vs_mergekit": 0.3, "rss_vs_mergekit": 0.5},
    "any": {"time_vs_io_floor": 3.0},
}
TIMEOUT = 3 * 3600


def _stamp(message):
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ----------------------------------------------------------------------------- inputs
def _write_dir(directory, tensors, config):
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)


def _tune(base, seed):
    """base + N(0,1)·DELTA·rms(tensor), rounded to bf16 (dense; a different seed per fine-tune)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        f = t.float()
        rms = float(f.pow(2).mean().sqrt()) or 1.0
        out[name] = (f + (DELTA * rms) * torch.randn(t.shape, generator=generator)).to(torch.bfloat16)
    return out


def build_llama(root, dims, progress=_stamp, seed=0):
    """A random Llama (config from `dims`, weights N(0, 0.02), norms 1) and TUNES fine-tunes, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    count = sum(s.numel() for s in shapes.values())
    progress(f"random Llama: {count / 1e6:.1f}M parameters ({dims}), {count * 2 / 2**30:.2f} GiB in bf16 per model")
    generator = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[name] = (config.initializer_range * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    return _write_all(root, base, config, count, seed, progress)


def build_smollm2(root, progress=_stamp, seed=0):
    """SmolLM2-135M (offline GGUF) as the base, its directory written by hand (tied embedding once)."""
    from sparseft.bench.sparse import load_model
    model = load_model("cpu", torch.float32).to(torch.bfloat16)
    base = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    config = model.config
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    del model
    count = sum(t.numel() for t in base.values())
    progress(f"SmolLM2-135M: {count / 1e6:.1f}M parameters")
    return _write_all(root, base, config, count, seed, progress)


def _write_all(root, base, config, count, seed, progress):
    paths = {"base": os.path.join(root, "base"), "models": []}
    _write_dir(paths["base"], base, config)
    progress("base written")
    for i in range(TUNES):
        path = os.path.join(root, f"ft_{i}")
        _write_dir(path, _tune(base, seed + 1 + i), config)
        paths["models"].append(path)
        progress(f"fine-tune {i} written")
    paths["parameters"], paths["layers"] = count, config.num_hidden_layers
    return paths


# ----------------------------------------------------------------------------- configs
def configs(merge, paths):
    """(mergekit YAML, sparseft YAML) of one merge; absolute paths (mergekit fails offline on relative ones)."""
    base, models = paths["base"], paths["models"]
    head = [f"merge_method: {'task_arithmetic' if merge == 'task_arithmetic_lines' else merge}"]
    if merge != "linear":
        head.append(f"base_model: {base}")
    tail = ["dtype: float32", "out_dtype: bfloat16"]

    def body(params):
        lines = ["models:"]
        for m in models:
            lines += [f"  - model: {m}", f"    parameters: {json.dumps(params)}"]
        return lines

    if merge == "ties":
        both = head + body({"weight": 1.0, "density": DENSITY}) + tail
        return "\n".join(both) + "\n", "\n".join(both) + "\n"
    if merge == "linear":
        both = head + body({"weight": 1.0}) + tail
        return "\n".join(both) + "\n", "\n".join(both) + "\n"
    mergekit = head + body({"weight": [LINES_ALPHA, LINES_ALPHA + LINES_BETA]}) + tail
    ours = head + body({"weight": 1.0}) + tail + ["lines:", f"  alpha: {LINES_ALPHA}", f"  beta: {LINES_BETA}"]
    return "\n".join(mergekit) + "\n", "\n".join(ours) + "\n"


# ----------------------------------------------------------------------------- measured processes
# Runs the command given after the result path, and writes its wall time and rusage there. A small
# stdlib-only interpreter starts it: Linux carries the RSS high-water mark of the forking process
# into the exec'd child's ru_maxrss, so the launcher must be smaller than anything measured.
_LAUNCHER = """
import json, os, signal, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[3:])
signal.signal(signal.SIGALRM, lambda *_: proc.kill())
signal.alarm(int(sys.argv[2]))
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
proc.returncode = code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": wall, "maxrss_kib": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "returncode": code}, f)
"""


def measure(command, log_path, timeout=TIMEOUT, env=None):
    """Runs `command` in its own process: wall seconds (spawn to exit), peak RSS bytes (ru_maxrss
    of that process from os.wait4 in a small launcher), CPU seconds (user + system), exit code."""
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result_path = log_path + ".rusage.json"
    with open(log_path, "w") as log:
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, result_path, str(int(timeout)), *command],
                           stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            pass
    try:
        with open(result_path) as f:
            r = json.load(f)
    except (OSError, ValueError):
        r = {"seconds": float("nan"), "maxrss_kib": 0, "cpu_seconds": float("nan"), "returncode": -1}
    row = {"seconds": r["seconds"], "peak_rss_bytes": r["maxrss_kib"] * 1024, "cpu_seconds": r["cpu_seconds"],
           "returncode": r["returncode"]}
    if row["returncode"] != 0:
        with open(log_path) as log:
            row["error"] = log.read().strip().splitlines()[-3:] or [f"failed (timeout {timeout} s?)"]
    return row


def _mergekit_command(config_path, out):
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    exe = exe if os.path.exists(exe) else shutil.which("mergekit-yaml") or "mergekit-yaml"
    return [exe, config_path, out, "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]


def _sparseft_command(config_path, out):
    return [sys.executable, "-m", "sparseft.cli", "merge", config_path, out, "--quiet"]


def _floor_command(inputs, out):
    return [sys.executable, "-m", "sparseft.bench.merge", "--case", "io_floor", "--inputs", ",".join(inputs),
            "--out", out]


def _files(directory):
    """{tensor name: safetensors file} of an HF directory (sharded or not)."""
    index = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            for name in f.keys():
                index[name] = path
    return index


def io_floor(inputs, out):
    """Reads every tensor of every input into memory once (one input held at a time) and writes
    the first input's tensors (the output's names, shapes and dtypes) as one safetensors file, fsynced."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    kept = None
    for directory in inputs:
        loaded = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    loaded[name] = f.get_tensor(name).clone()  # clone: the bytes are read, not just mapped
        if kept is None:
            kept = loaded
        del loaded
    os.makedirs(out)
    path = os.path.join(out, "model.safetensors")
    save_file(kept, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- agreement
def _ulp(x):
    """bf16 ulp at |x| (x float64): 2^(e−8) for |x| = m·2^e, m ∈ [0.5, 1); the smallest normal's below it."""
    _, e = torch.frexp(x.abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(x), e - 8)


# Tolerance of an output entry against the float64 reference: one bf16 ulp of the result (the
# final rounding) plus float32 arithmetic on the terms summed (a result that nearly cancels, e.g.
# θ₀ + λ·Σ τ close to 0, carries float32 error relative to |θ₀| + Σ|λ τ|, not to itself).
F32_TERMS = 8 * 2.0 ** -24


_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _lines_lambda(name, layers):
    match = _BLOCK.search(name)
    if match is None:
        return LINES_ALPHA
    return LINES_ALPHA + LINES_BETA * (int(match.group(1)) / (layers - 1) if layers > 1 else 1.0)


def ties_thresholds(base, tuned):
    """Per task: the k-th largest |τ_t| of the tensor in float64 (k = max(1, int(ρ·n))), None when k ≥ n."""
    n = base.numel()
    k = max(1, int(DENSITY * n))
    if k >= n:
        return [None] * len(tuned)
    b = base.reshape(-1).double()
    return [float(torch.kthvalue((x.reshape(-1).double() - b).abs(), n - k + 1).values) for x in tuned]


def reference(merge, name, base, tuned, layers, thresholds=None):
    """float64 result of (a chunk of) one tensor, the magnitude of its terms (for the float32 part
    of the tolerance), and for TIES the mask of entries where some |τ_t| equals its threshold.
    Inputs in any dtype; TIES takes the whole tensor's `thresholds` (ties_thresholds)."""
    tuned = [x.double() for x in tuned]
    if merge == "linear":
        return sum(tuned) / len(tuned), sum(x.abs() for x in tuned) / len(tuned), None
    base = base.double()
    taus = [x - base for x in tuned]
    del tuned
    if merge == "task_arithmetic_lines":
        lam = _lines_lambda(name, layers)
        return base + lam * sum(taus), base.abs() + lam * sum(t.abs() for t in taus), None
    kept, tied = [], torch.zeros(base.shape, dtype=torch.bool)
    for tau, threshold in zip(taus, thresholds):  # d_t = w_t·[|τ_t| ≥ k-th largest |τ_t|]·τ_t, w_t = 1
        if threshold is None:
            kept.append(tau)
            continue
        magnitude = tau.abs()
        kept.append(torch.where(magnitude >= threshold, tau, torch.zeros_like(tau)))
        tied |= magnitude == threshold
    del taus
    sign = torch.where(sum(kept) >= 0, 1.0, -1.0).to(base.dtype)  # σ = sign Σ d_t, 0 -> +
    masks = [(torch.sign(d) == sign).to(base.dtype) for d in kept]
    divisor = sum(masks)
    merged = sum(m * d for m, d in zip(masks, kept)) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + merged, base.abs() + sum(d.abs() for d in kept), tied


CHUNK = 1 << 21  # entries per comparison step: the float64 temporaries stay ~0.5 GB


def compare(merge, paths, outputs, progress=_stamp):
    """Tensor by tensor (in chunks): each output against the float64 reference (errors in bf16 ulps,
    entries over the tolerance), and the two outputs against each other (max |difference|, entries
    more than the tolerance apart)."""
    from safetensors import safe_open
    inputs = ([paths["base"]] if merge != "linear" else []) + paths["models"]
    input_files = [_files(d) for d in inputs]
    out_files = {tool: _files(d) for tool, d in outputs.items()}
    names = sorted(input_files[0])
    result = {"tensors": len(names), "entries": 0}
    for tool, files in out_files.items():
        result[f"{tool}_missing"] = sorted(set(names) - set(files))[:5]
        result[f"{tool}_extra"] = sorted(set(files) - set(names))[:5]
    stats = {tool: {"max_ulps": 0.0, "max_abs": 0.0, "over_1ulp": 0, "over_tolerance": 0} for tool in outputs}
    if merge == "ties":
        for s in stats.values():
            s["over_tolerance_at_threshold_ties"] = 0
    pair = {"max_abs_diff": 0.0, "max_abs_diff_tensor": None, "over_tolerance": 0}
    tied_entries = 0

    def get(files, name):
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name).clone()

    for name in names:
        tensors = [get(files, name).reshape(-1) for files in input_files]
        base, tuned = (tensors[0], tensors[1:]) if merge != "linear" else (None, tensors)
        thresholds = ties_thresholds(base, tuned) if merge == "ties" else None
        got = {tool: get(files, name) for tool, files in out_files.items() if name in files}
        for tool, out in got.items():
            if out.numel() != tensors[0].numel():
                raise ValueError(f"{tool}: {name} has shape {tuple(out.shape)}, expected {tensors[0].numel()} entries")
            got[tool] = out.reshape(-1)
        result["entries"] += tensors[0].numel()
        for start in range(0, tensors[0].numel(), CHUNK):
            part = slice(start, start + CHUNK)
            ref, terms, tied = reference(merge, name, None if base is None else base[part], [x[part] for x in tuned],
                                         paths["layers"], thresholds)
            ulp = _ulp(ref)
            tolerance = ulp + F32_TERMS * terms
            del terms
            if tied is not None:
                tied_entries += int(tied.sum())
            outs = {}
            for tool, out in got.items():
                outs[tool] = out[part].double()
                err = (outs[tool] - ref).abs()
                over = err > tolerance
                s = stats[tool]
                if err.numel():
                    s["max_ulps"] = max(s["max_ulps"], float((err / ulp).max()))
                    s["max_abs"] = max(s["max_abs"], float(err.max()))
                s["over_1ulp"] += int((err > ulp).sum())
                s["over_tolerance"] += int(over.sum())
                if tied is not None:
                    s["over_tolerance_at_threshold_ties"] += int((over & tied).sum())
            if len(outs) == 2:
                a, b = outs.values()
                diff = (a - b).abs()
                worst = float(diff.max()) if diff.numel() else 0.0
                if worst > pair["max_abs_diff"]:
                    pair["max_abs_diff"], pair["max_abs_diff_tensor"] = worst, name
                pair["over_tolerance"] += int((diff > tolerance).sum())
    for tool, s in stats.items():
        if merge == "ties":
            s["over_tolerance_unexplained"] = s["over_tolerance"] - s["over_tolerance_at_threshold_ties"]
        result[tool] = s
    result["mergekit_vs_sparseft"] = pair
    if merge == "ties":
        result["entries_tied_at_threshold"] = tied_entries
    return result


# ----------------------------------------------------------------------------- the run
def run_merge(merge, paths, work, progress=_stamp):
    mergekit_yaml, sparseft_yaml = configs(merge, paths)
    row = {"merge": merge, "models": TUNES, "parameters": paths["parameters"]}
    inputs = ([paths["base"]] if merge != "linear" else []) + paths["models"]
    outputs = {"mergekit": os.path.join(work, f"{merge}_mergekit"), "sparseft": os.path.join(work, f"{merge}_sparseft")}
    floor_out = os.path.join(work, f"{merge}_floor")
    cases = [("io_floor", _floor_command(inputs, floor_out), None),
             ("mergekit", _mergekit_command, mergekit_yaml), ("sparseft", _sparseft_command, sparseft_yaml)]
    for case, command, yaml_text in cases:
        if yaml_text is not None:
            config_path = os.path.join(work, f"{merge}_{case}.yaml")
            with open(config_path, "w") as f:
                f.write(yaml_text)
            command = command(config_path, outputs[case])
        progress(f"{merge}: {case} ...")
        row[case] = measure(command, os.path.join(work, f"{merge}_{case}.log"))
        r = row[case]
        progress(f"{merge}: {case} {r['seconds']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
                 + (f", FAILED: {r['error']}" if "error" in r else ""))
    shutil.rmtree(floor_out, ignore_errors=True)
    mk, ours, floor = row["mergekit"], row["sparseft"], row["io_floor"]
    if "error" not in mk and "error" not in ours:
        row["time_vs_mergekit"] = ours["seconds"] / mk["seconds"]
        row["rss_vs_mergekit"] = ours["peak_rss_bytes"] / mk["peak_rss_bytes"]
    if "error" not in ours and "error" not in floor:
        row["time_vs_io_floor"] = ours["seconds"] / floor["seconds"]
    if "error" not in mk and "error" not in floor:
        row["mergekit_time_vs_io_floor"] = mk["seconds"] / floor["seconds"]
    done = {tool: path for tool, path in outputs.items() if "error" not in row[tool]}
    if done:
        progress(f"{merge}: comparing outputs tensor by tensor against float64 ...")
        row["agreement"] = compare(merge, paths, done, progress)
    row["targets"] = verdicts(row)
    for path in outputs.values():
        shutil.rmtree(path, ignore_errors=True)
    return row


def verdicts(row):
    """{target: {"limit", "value", "met"}} of one merge row."""
    out = {}
    wanted = dict(TARGETS.get(row["merge"], {}), **TARGETS["any"])
    for key, limit in wanted.items():
        if key == "sparseft_vs_float64_over_tolerance":
            value = row.get("agreement", {}).get("sparseft", {}).get("over_tolerance")
        else:
            value = row.get(key)
        out[key] = {"limit": limit, "value": value, "met": value is not None and value <= limit}
    return out


def startup_rows(work, progress=_stamp):
    """Interpreter start + imports alone, each tool's (part of every merge's wall time)."""
    exe = _mergekit_command("x", "y")[0]
    row = {"merge": "startup"}
    for tool, command in (("mergekit", [exe, "--help"]),
                          ("sparseft", [sys.executable, "-m", "sparseft.cli", "merge", "--help"])):
        row[tool] = measure(command, os.path.join(work, f"startup_{tool}.log"))
        progress(f"startup: {tool} {row[tool]['seconds']:.2f} s, "
                 f"peak RSS {row[tool]['peak_rss_bytes'] / 2**20:.0f} MiB")
    return row


# ----------------------------------------------------------------------------- report
def _mib(row, tool):
    r = row.get(tool, {})
    return f"{r['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in r else "-"


def _sec(row, tool):
    r = row.get(tool, {})
    return "failed" if "error" in r else f"{r['seconds']:.2f}" if "seconds" in r else "-"


def _target(row, key):
    v = row.get("targets", {}).get(key)
    value = row.get(key)
    if value is None:
        return "-"
    if v is None:
        return f"{value:.3f}"
    return f"{value:.3f} (<= {v['limit']}: {'met' if v['met'] else 'NOT met'})"


def table(rows):
    head = next((r for r in rows if "parameters" in r), {})
    lines = [f"merge of {TUNES} fine-tunes, {head.get('parameters', 0) / 1e6:.1f}M parameters each, bf16 "
             f"(wall time incl. interpreter start; peak RSS of the process)",
             f"{'merge':<22} {'mergekit s':>10} {'sparseft s':>10} {'I/O floor s':>11} {'time x mergekit':>28} "
             f"{'time x floor':>26} {'mk MiB':>7} {'sf MiB':>7} {'fl MiB':>7} {'RSS x mergekit':>26}"]
    for r in rows:
        if r["merge"] == "startup":
            continue
        lines.append(f"{r['merge']:<22} {_sec(r, 'mergekit'):>10} {_sec(r, 'sparseft'):>10} {_sec(r, 'io_floor'):>11} "
                     f"{_target(r, 'time_vs_mergekit'):>28} {_target(r, 'time_vs_io_floor'):>26} "
                     f"{_mib(r, 'mergekit'):>7} "
                     f"{_mib(r, 'sparseft'):>7} {_mib(r, 'io_floor'):>7} {_target(r, 'rss_vs_mergekit'):>26}")
    start = next((r for r in rows if r["merge"] == "startup"), None)
    if start:
        lines.append(f"startup alone (imports, --help): mergekit {_sec(start, 'mergekit')} s / "
                     f"{_mib(start, 'mergekit')} "
                     f"MiB, sparseft {_sec(start, 'sparseft')} s / {_mib(start, 'sparseft')} MiB")
    lines.append("\nagreement with the float64 reference: max error in bf16 ulps; entries over the tolerance "
                 "(1 ulp + float32 error of the summed terms)")
    lines.append(f"{'merge':<22} {'entries':>11} {'sf max ulp':>10} {'sf >tol':>8} {'mk max ulp':>10} {'mk >tol':>8} "
                 f"{'mk vs sf max|d|':>15} {'mk vs sf >tol':>13} {'tied at thr':>11} {'mk unexplained':>14}")
    for r in rows:
        a = r.get("agreement")
        if not a:
            continue
        sf, mk, pair = a.get("sparseft", {}), a.get("mergekit", {}), a["mergekit_vs_sparseft"]
        lines.append(f"{r['merge']:<22} {a['entries']:>11} {sf.get('max_ulps', float('nan')):>10.3f} "
                     f"{sf.get('over_tolerance', '-'):>8} {mk.get('max_ulps', float('nan')):>10.3f} "
                     f"{mk.get('over_tolerance', '-'):>8} {pair['max_abs_diff']:>15.3g} {pair['over_tolerance']:>13} "
                     f"{a.get('entries_tied_at_threshold', '-'):>11} {mk.get('over_tolerance_unexplained', '-'):>14}")
    if any(r.get("merge") == "ties" for r in rows):
        lines.append("(ties: mergekit keeps exactly k per tensor by argsort, sparseft and the reference every |τ| "
                     "at the "
                     "threshold; 'mk unexplained' counts mergekit's entries over the tolerance where no |τ_t| is tied "
                     "at its threshold)")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["merge"] != "startup"]
    tools = ("mergekit", "sparseft", "io_floor")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.27
    for ax, key, scale, label in ((axes[0], "seconds", 1.0, "wall time (s)"),
                                  (axes[1], "peak_rss_bytes", 2.0 ** -20, "peak RSS (MiB)")):
        for j, tool in enumerate(tools):
            values = [r.get(tool, {}).get(key, 0) * scale for r in rows]
            bars = ax.bar([i + (j - 1) * width for i in range(len(rows))], values, width, label=tool)
            ax.bar_label(bars, fmt="%.0f" if key != "seconds" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(rows)), [r["merge"] for r in rows])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"merge of {TUNES} bf16 fine-tunes, {rows[0]['parameters'] / 1e6:.0f}M parameters each (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_rows(args, progress=_stamp):
    """Builds the inputs, runs every merge; returns the rows and prints the table."""
    from sparseft.bench.measure import device_name
    progress(f"load average at start: {os.getloadavg()}; {device_name('cpu')}")
    root = tempfile.mkdtemp(prefix="sparseft-bench-merge-", dir=args.tmp)
    rows = []
    try:
        inputs = os.path.join(root, "inputs")
        if args.smollm2:
            paths = build_smollm2(inputs, progress)
        else:
            paths = build_llama(inputs, TINY if args.tiny else FULL, progress)
        work = os.path.join(root, "work")
        os.makedirs(work)
        if not args.tiny:  # a tiny run's merge times are mostly this already
            rows.append(startup_rows(work, progress))
        for merge in args.merges.split(","):
            if merge not in MERGES:
                raise SystemExit(f"unknown merge {merge!r}; expected some of {','.join(MERGES)}")
            rows.append(run_merge(merge, paths, work, progress))
            if args.on_rows:
                args.on_rows(rows)
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    progress(f"load average at end: {os.getloadavg()}")
    print(table(rows))
    return rows


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("io_floor",), help="one case in this process")
    parser.add_argument("--inputs", help="io_floor: comma list of input directories")
    parser.add_argument("--out", help="io_floor: output directory")
    parser.add_argument("--tiny", action="store_true", help="a few-million-parameter Llama (a smoke run)")
    parser.add_argument("--smollm2", action="store_true",
                        help="SmolLM2-135M-based fine-tunes instead of the random Llama")
    parser.add_argument("--merges", default=",".join(MERGES), help=f"comma list of {','.join(MERGES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (inputs, configs, logs)")
    parser.add_argument("--tmp", default=None, help="where the temporary directory goes (default: $TMPDIR)")
    parser.add_argument("--json", help="write the rows and targets to this file")
    parser.add_argument("--png", help="bars of time and peak RSS to this file")
    return parser


def _main(argv=None):
    args = _parser().parse_args(argv)
    if args.case == "io_floor":
        io_floor(args.inputs.split(","), args.out)
        return

    def save(rows):
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "targets": TARGETS, "rows": rows}, out, indent=1)

    args.on_rows = save
    rows = main_rows(args)
    save(rows)
    if args.json:
        print(f"results written to {args.json}")
    if args.png:
        plot(rows, args.png)
        print(f"plot written to {args.png}")


if __name__ == "__main__":
    _main()
