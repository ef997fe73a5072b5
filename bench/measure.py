"""Timing and peak-memory measurement shared by the benchmarks.

Each case runs in a fresh process so peak memory is its own: on CUDA from the caching
allocator's statistics, on CPU from the kernel's resident-set high-water mark (VmHWM),
reset after the inputs exist and the warm-up is done.
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# Large and small allocations alike go straight back to the OS when freed, so the CPU
# high-water mark sees every buffer a case holds at once (and no allocator cache).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Bytes allocated above the level at entry, at the highest point inside the block."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
            self._base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = _rss_kib("VmHWM") * 1024 - self._base
        return False


def time_and_memory(step, device, repeats, warmup=1, reset=None):
    """Median seconds of step() over `repeats` runs after `warmup` runs, and the peak bytes
    above the starting level. `reset()` runs before each call, outside the timing."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        if reset:
            reset()
        step()
    sync()
    times = []
    if reset:
        reset()
    with PeakMemory(device) as peak:
        for _ in range(repeats):
            if reset:
                reset()
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak.peak_bytes


def run_in_subprocess(module, args, timeout=1800, measures_memory=True):
    """Runs `python -m module *args` in a fresh process and returns the JSON it prints last.
    measures_memory=False leaves malloc as it is (CHILD_ENV costs time in system calls)."""
    env = dict(os.environ, **CHILD_ENV) if measures_memory else dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model}, {torch.get_num_threads()} threads"
