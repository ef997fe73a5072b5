"""Compiles every Triton kernel of sparseft for an H100 (sm_90) ahead of time, without a GPU.

The variants are not listed here: the Triton launchers of sparseft.ops and sparseft.optim (or
of sparseft.kernels, where the op adds no choice of its own) run on small CPU tensors with
every kernel swapped for a recorder, once per combination of the inputs that select code
(dtypes, optional tensors, need-flags, each scalar option at zero and non-zero). Each
recorded launch, times each config of an autotuned kernel, becomes one triton.compile of the
kernel's AST for GPUTarget("cuda", 90, 32), specialised as the JIT would: argument types from
the values, 16-byte-aligned pointers, integers as --ints says.
Left out: integers equal to 1 (the JIT makes them constants) and block sizes given by hand
to the kernels' launchers (tests and benchmarks do; the ops never do).

Registers and spills come from the -v log of the ptxas run inside triton.compile (the bundled
ptxas, sm_90a), shared memory from the compiled metadata. Exits non-zero on a compile error,
on shared memory above the H100 per-block maximum, on a kernel in kernels/ that no launch
reaches, and when a launcher's parameters no longer match the calls below.
"""

import argparse
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations, product
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

import sparseft.kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 232448  # bytes per block (227 KiB, the opt-in maximum triton asks for)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
BOOLS = (False, True)
OFF_ON = (0.0, 0.1)  # a scalar option left at zero, and set
INT_TYPES = ("i32", "i64", "u64")  # what the JIT makes of a Python int
DIVISIBLE = [["tt.divisibility", 16]]


# ----------------------------------------------------------------------------- recording launches

class _Recorder:
    """Stands in for a plain or autotuned kernel while the launchers run: records each launch
    (with the autotuner's configs) and runs nothing."""

    def __init__(self, kernel, launches):
        self.configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
        self.best_config = self.configs[0]  # launchers read it after an autotuned launch
        self.fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        if not isinstance(self.fn, JITFunction):
            sys.exit(f"{self.fn}: only @triton.jit kernels, autotuned or not, are supported")
        self._launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launches.append((self.fn, self.configs, args, kwargs))


@contextlib.contextmanager
def _recording(modules):
    launches = []
    saved = [(module, name, value) for module in modules for name, value in vars(module).items()
             if isinstance(value, (JITFunction, Autotuner))]
    for module, name, value in saved:
        setattr(module, name, _Recorder(value, launches))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def _tf32(allowed):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _expect_params(fn, names):
    """The calls below give every parameter of fn its code-selecting values: a new one needs
    its values added there."""
    got = tuple(inspect.signature(fn).parameters)
    if got != tuple(names.split()):
        sys.exit(f"{fn.__module__}.{fn.__qualname__} takes {got}, the launches in {__file__} pass "
                 f"{tuple(names.split())}: add the values of the new parameters there")


def _launch_everything():
    """Every Triton launch the ops can make, up to values that do not select code."""
    from sparseft.kernels import lowrank_adam, merge, select
    from sparseft.ops import _ce_triton, sampled_grad
    from sparseft.optim import _sparse_adamw_backends as adamw

    _expect_params(_ce_triton.linear_ce, "hidden weight bias labels scale label_smoothing z_loss softcap "
                                         "need_grad_hidden need_grad_weight need_grad_bias")
    _expect_params(_ce_triton.ce_forward, "logits labels scale label_smoothing z_loss softcap")
    _expect_params(_ce_triton.ce_backward, "logits lse labels scale label_smoothing z_loss softcap")
    _expect_params(sampled_grad._triton, "grad_output input indices")
    _expect_params(adamw._triton_step, "target indices grad exp_avg exp_avg_sq step values "
                                       "lr beta1 beta2 eps weight_decay")
    _expect_params(lowrank_adam.adam_direction, "grad exp_avg exp_avg_sq out beta1 beta2 c1 c2 eps")
    _expect_params(lowrank_adam.lowrank_update, "weight direction projector side decay alpha")
    _expect_params(merge.merge_tensor_triton, "base tuned weights thresholds keep_probs cutoffs seeds elect_sign "
                                              "normalize consensus_lam consensus_k scale index_offset out")
    _expect_params(select.abs_diff_histogram_triton, "a b prefix high_shift shift bits counts")

    n, d, vocab = 4, 16, 32
    labels, scale, lse = torch.zeros(n, dtype=torch.int64), torch.ones(n), torch.zeros(n)
    for dtype in FLOATS:
        hidden, weight, logits = (torch.zeros(shape, dtype=dtype) for shape in ((n, d), (vocab, d), (n, vocab)))
        for bias, options in product((None, torch.zeros(vocab, dtype=dtype)), product(OFF_ON, repeat=3)):
            for needs in product(BOOLS, repeat=3):
                if bias is not None or not needs[2]:  # a bias gradient needs a bias
                    _ce_triton.linear_ce(hidden, weight, bias, labels, scale, *options, *needs)
        for options in product(OFF_ON, repeat=3):
            _ce_triton.ce_forward(logits, labels, scale, *options)
            _ce_triton.ce_backward(logits, lse, labels, scale, *options)

    # torch's TF32 switch is an input too: it picks the float32 dot precision.
    for dtype, index_dtype, tf32 in product(FLOATS, INDEX_DTYPES, BOOLS):
        with _tf32(tf32):
            sampled_grad._triton(torch.zeros(n, 8, dtype=dtype), torch.zeros(n, 8, dtype=dtype),
                                 torch.tensor([0, 9], dtype=index_dtype))

    nnz = 4
    for dtype, index_dtype, compact, has_values in product(FLOATS, INDEX_DTYPES, BOOLS, BOOLS):
        target = torch.zeros(4, 4, dtype=dtype)
        grad = torch.zeros(nnz, dtype=dtype) if compact else torch.zeros_like(target)
        values = torch.zeros(nnz, dtype=dtype) if has_values else None
        state = torch.zeros(nnz), torch.zeros(nnz), torch.zeros(nnz, dtype=torch.int32)
        for hyper in product(OFF_ON, repeat=5):
            adamw._triton_step(target, torch.arange(0, 16, 5, dtype=index_dtype), grad, *state, values, *hyper)

    lowrank_adam.adam_direction(*(torch.zeros(64) for _ in range(4)), beta1=0.9, beta2=0.999, c1=1.5, c2=1.5, eps=1e-8)
    m, n, rank = 32, 48, 16
    for dtype, side, tf32 in product(FLOATS, ("right", "left"), BOOLS):
        factors = (torch.zeros(m, rank), torch.zeros(n, rank)) if side == "right" else \
            (torch.zeros(rank, n), torch.zeros(m, rank))
        with _tf32(tf32):
            lowrank_adam.lowrank_update(torch.zeros(m, n, dtype=dtype), *factors, side=side, decay=0.9, alpha=0.1)

    # The merge selects code by the base, out and tuned dtypes (one tuned dtype, or mixed) and by
    # four options (thresholds, DARE, elect_sign, consensus); normalize, the probabilities and T
    # are runtime values. Every dtype combination with the options all off and all on, and every
    # option combination with bfloat16 throughout and with mixed tuned dtypes.
    numel = 64
    tuned_sets = [[torch.zeros(numel, dtype=d)] * 2 for d in FLOATS] + [[torch.zeros(numel, dtype=d) for d in FLOATS]]

    def merge_launch(base_dtype, out_dtype, tuned, options):
        thresh, dare, elect, consensus = options
        T = len(tuned)
        merge.merge_tensor_triton(torch.zeros(numel, dtype=base_dtype), tuned, [0.5] * T, [0.1] * T if thresh else [],
                                  [0.9] * T if dare else [], [15099494] * T if dare else [], [7] * T if dare else [],
                                  elect, True, 0.5, 2 if consensus else 0, 0.7, 4096,
                                  torch.zeros(numel, dtype=out_dtype))

    for base_dtype, out_dtype, tuned, options in product(FLOATS, FLOATS, tuned_sets, ((False,) * 4, (True,) * 4)):
        merge_launch(base_dtype, out_dtype, tuned, options)
    for tuned, options in product(tuned_sets[1:], product(BOOLS, repeat=4)):
        merge_launch(torch.bfloat16, torch.bfloat16, tuned, options)

    # The histogram selects code only by the dtypes of a and b (the digit parameters are runtime
    # values): both passes of the radix select for each pair.
    for a_dtype, b_dtype in product(FLOATS, FLOATS):
        for prefix, high_shift, shift, bits in ((0, 31, 15, 16), (5, 15, 0, 15)):
            select.abs_diff_histogram_triton(torch.zeros(64, dtype=a_dtype), torch.zeros(64, dtype=b_dtype), prefix,
                                             high_shift, shift, bits, torch.zeros(1 << bits, dtype=torch.int64))


class Job(NamedTuple):
    """One triton.compile."""
    module: str
    kernel: str
    config: dict  # the autotune config's constexprs ({} for a plain kernel)
    signature: dict
    constexprs: dict  # the config's included
    attrs: dict
    options: dict  # num_warps, num_stages, ...


def _jobs(launches, int_attrs):
    """The distinct compilations of the launches, one per autotune config."""
    jobs = {}
    for fn, configs, args, kwargs in launches:
        for config in configs:
            call = {**kwargs, **(config.all_kwargs() if config else {})}
            options = {k: call.pop(k) for k in list(call) if k not in fn.arg_names}
            bound = inspect.signature(fn.fn).bind(*args, **call)
            bound.apply_defaults()
            signature, constexprs, attrs = {}, {}, {}
            for i, param in enumerate(fn.params):
                value = bound.arguments[param.name]
                if param.is_constexpr:
                    signature[param.name], constexprs[param.name] = "constexpr", value
                    continue
                signature[param.name] = mangle_type(value)
                if signature[param.name].startswith("*") or (int_attrs and signature[param.name] in INT_TYPES):
                    attrs[(i,)] = DIVISIBLE
            job = Job(fn.__module__, fn.__name__, config.kwargs if config else {}, signature, constexprs, attrs, options)
            jobs.setdefault(str(job), job)
    return list(jobs.values())


def _factors(job):
    """What a compilation is made of: argument types, constexprs, and the config as one factor."""
    types = {k: v for k, v in job.signature.items() if v != "constexpr"}
    flags = {k: v for k, v in job.constexprs.items() if k not in job.config}
    return {**types, **flags, "config": str({**job.config, **job.options})}


def _varying(jobs):
    """Per kernel, the factors that differ between its jobs."""
    values = {}
    for job in jobs:
        for k, v in _factors(job).items():
            values.setdefault(job.kernel, {}).setdefault(k, set()).add(str(v))
    return {kernel: {k for k, seen in factors.items() if len(seen) > 1} for kernel, factors in values.items()}


def _pairwise(jobs):
    """A subset in which every kernel, every value of a varying factor (type, flag, config)
    and every pair of values two factors take together somewhere appears at least once: a
    greedy covering array, an eighth of the jobs."""
    varying = _varying(jobs)

    def needs(job):
        values = sorted((k, str(v)) for k, v in _factors(job).items() if k in varying[job.kernel])
        return {(job.kernel, *c) for r in (0, 1, 2) for c in combinations(values, r)}

    covers = [needs(job) for job in jobs]
    uncovered, chosen = set().union(*covers), set()
    while uncovered:
        best = max(range(len(jobs)), key=lambda i: len(covers[i] & uncovered))
        chosen.add(best)
        uncovered -= covers[best]
    return [job for i, job in enumerate(jobs) if i in chosen]


# ----------------------------------------------------------------------------- compiling

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(job):
    fn = getattr(sys.modules[job.module], job.kernel)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # where triton prints the ptxas log (dump_ptxas_log)
            kernel = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs), target=TARGET,
                                    options=job.options)
    except Exception as exc:  # triton raises many types; each one fails the check
        return dict(error=f"{type(exc).__name__}: {exc}".strip())
    registers, spills = _REGISTERS.search(log.getvalue()), _SPILLS.search(log.getvalue())
    if registers is None or spills is None:
        return dict(error=f"no register or spill counts in the ptxas log:\n{log.getvalue()}")
    return dict(registers=int(registers[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]),
                shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                num_stages=kernel.metadata.num_stages, seconds=round(time.perf_counter() - start, 2))


def _compile_all(jobs, processes, name):
    """Results in the order of jobs, one line printed per job as it comes; wall and CPU seconds."""
    results = []
    start = time.perf_counter()
    # A private cache: every job is compiled (so its ptxas log is printed), none read back.
    with tempfile.TemporaryDirectory() as cache:
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            for job, result in zip(jobs, pool.map(_compile, jobs)):
                results.append(result)
                if "error" in result:
                    print(f"FAILED {name(job)} {_config(job)}\n  " + result["error"].replace("\n", "\n  "))
                else:
                    print(f"regs {result['registers']:3d}  spill {result['spill_stores']:5d}  "
                          f"smem {result['shared']:6d}  {name(job)}  {_config(job, result)}", flush=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # the compile processes and their ptxas runs
    return results, time.perf_counter() - start, cpu.ru_utime + cpu.ru_stime


# ----------------------------------------------------------------------------- reporting

def _config(job, result=None):
    options = [] if result is None else [f"warps={result['num_warps']}", f"stages={result['num_stages']}"]
    return " ".join([*(f"{k}={v}" for k, v in job.config.items()), *options])


def _namer(jobs):
    """Names a job by its kernel and the types and flags that vary between that kernel's jobs
    (the rest is the same in every line)."""
    varying = _varying(jobs)

    def name(job):
        types = [f"{k.removesuffix('_ptr')}={v.lstrip('*')}" for k, v in job.signature.items()
                 if k in varying[job.kernel] and v != "constexpr"]
        flags = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in job.constexprs.items()
                 if k in varying[job.kernel]]
        return " ".join([job.kernel, *types, *flags])
    return name


def _summary(done):
    """One row per kernel and config."""
    print(f"\n{'kernel':<27}{'config':<38}{'variants':>9}{'max regs':>9}{'spilling':>9}"
          f"{'max spill B':>12}{'max smem B':>11}")
    groups = {}
    for job, result in done:
        groups.setdefault((job.kernel, _config(job, result)), []).append(result)
    for (kernel, config), group in groups.items():
        print(f"{kernel:<27}{config:<38}{len(group):>9}{max(r['registers'] for r in group):>9}"
              f"{sum(r['spill_stores'] > 0 for r in group):>9}{max(r['spill_stores'] for r in group):>12}"
              f"{max(r['shared'] for r in group):>11}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ints", choices=("aligned", "ragged"), default="aligned",
                        help="integer arguments all multiples of 16, as in the usual LLM shapes (default), "
                             "or none; pointers are 16-byte aligned either way")
    parser.add_argument("--pairwise", action="store_true",
                        help="compile a covering subset: every kernel, config, dtype and flag value, and "
                             "every pair of them that occurs, at least once")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes")
    parser.add_argument("--json", help="write every variant and its resource usage to this file")
    args = parser.parse_args()

    modules = [importlib.import_module(f"sparseft.kernels.{m.name}")
               for m in pkgutil.iter_modules(sparseft.kernels.__path__)]
    if any(type(v).__name__ == "InterpretedFunction" for m in modules for v in vars(m).values()):
        sys.exit("the kernels were built for the Triton interpreter: TRITON_INTERPRET was set")
    with _recording(modules) as launches:
        _launch_everything()
    jobs = _jobs(launches, int_attrs=args.ints == "aligned")
    launched = {job.kernel for job in jobs}
    unreached = [f"{m.__name__}.{name}" for m in modules for name, value in vars(m).items()
                 if isinstance(value, JITFunction) and name.endswith("_kernel") and name not in launched]
    if unreached:
        sys.exit(f"no launch reaches {', '.join(unreached)}: add calls of its launcher to {__file__}")

    name = _namer(jobs)
    total = len(jobs)
    if args.pairwise:
        jobs = _pairwise(jobs)
    print(f"compiling {len(jobs)} of {total} variants of {len(launched)} Triton kernels for sm_90 "
          f"({args.ints} integers) with triton {triton.__version__} in {args.jobs} processes", flush=True)
    results, seconds, cpu_seconds = _compile_all(jobs, args.jobs, name)

    done = [(job, result) for job, result in zip(jobs, results) if "error" not in result]
    too_big = [(job, result) for job, result in done if result["shared"] > H100_MAX_SHARED]
    if done:
        _summary(done)
        print(f"\n{len(done)} of {len(jobs)} variants compiled for sm_90 in {seconds:.0f} s ({cpu_seconds:.0f} s "
              f"CPU): max {max(r['registers'] for _, r in done)} registers, "
              f"{sum(r['spill_stores'] > 0 for _, r in done)} spill, "
              f"max shared memory {max(r['shared'] for _, r in done)} B (H100: {H100_MAX_SHARED} B)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(target="cuda:90", triton=triton.__version__, ints=args.ints, pairwise=args.pairwise,
                           seconds=round(seconds, 1), cpu_seconds=round(cpu_seconds, 1),
                           variants=[dict(kernel=job.kernel, config=job.config, signature=job.signature,
                                          constexprs=job.constexprs, options=job.options, **result)
                                     for job, result in zip(jobs, results)]), out, indent=1)
    for job, result in too_big:
        print(f"more shared memory than an H100 block has: {name(job)} {_config(job, result)}")
    if len(done) < len(jobs) or too_big:
        sys.exit(f"{len(jobs) - len(done)} variants failed to compile, {len(too_big)} need too much shared memory")


if __name__ == "__main__":
    main()
