"""The `sparseft` command: `sparseft info`, `sparseft bench [ce|sparse|lowrank|merge]`,
`sparseft merge CONFIG.yaml OUT`, `sparseft finetune`."""

import argparse
import json
import os
import sys
import time

import torch


def _info(_args):
    import sparseft
    from sparseft import _backends
    print(f"sparseft {sparseft.__version__} from {os.path.dirname(sparseft.__file__)}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}")
    try:
        import triton
        print(f"triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except Exception as exc:
        print(f"triton: not importable ({exc})")
    forced = os.environ.get("SPARSEFT_BACKEND")
    if forced:
        print(f"SPARSEFT_BACKEND={forced} forces that backend")
    print(f"{'backend':8} {'device':6} available")
    for backend, device, ok, reason in _backends.report():
        print(f"{backend:8} {device:6} {'yes' if ok else 'no: ' + reason}")
    for device in ("cpu", "cuda"):
        print(f"default on {device}: {_backends.resolve(device, _backends.BACKENDS) if not forced else forced}")
    return 0


def _progress(message):
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _bench_ce(args, save_partial):
    from sparseft.bench import ce
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    cases = args.cases.split(",") if args.cases else ce.default_cases(args.device)
    rows = ce.run(args.shapes.split(","), [int(t) for t in args.tokens.split(",")], dtype, args.device, cases,
                  masked_fractions=(0.0, 0.5), repeats=args.repeats, progress=_progress, on_rows=save_partial)
    print(ce.table(rows))
    if args.png:
        ce.plot(rows, args.png)
        print(f"plot written to {args.png}")
    return rows


def _bench_sparse(args):
    from sparseft.bench import sparse
    return sparse.main_rows(args, progress=_progress)


def _bench_lowrank(args):
    from sparseft.bench import lowrank
    options = lowrank._parser().parse_args(["--parts", args.parts, "--device", args.device, "--repeats",
                                            str(args.repeats), "--batch", str(args.batch), "--seq", str(args.seq)])
    rows = lowrank.main_rows(options, progress=_progress)
    if args.png and args.what == "lowrank" and "curves" in options.parts.split(","):
        lowrank.plot(rows, args.png)
        print(f"plot written to {args.png}")
    return rows


def _bench_merge(args, save_partial):
    from sparseft.bench import merge
    argv = ["--merges", args.merges] + [flag for flag, on in (("--tiny", args.tiny), ("--smollm2", args.smollm2),
                                                             ("--keep", args.keep)) if on]
    options = merge._parser().parse_args(argv)
    options.on_rows = save_partial
    rows = merge.main_rows(options, progress=_progress)
    if args.png:
        merge.plot(rows, args.png)
        print(f"plot written to {args.png}")
    return rows


def _bench(args):
    from sparseft.bench.measure import device_name
    results = {"command": " ".join(["sparseft", *sys.argv[1:]]), "device": device_name(args.device),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def save(key, rows):
        """Writes what is measured so far: a benchmark cut short still leaves its rows."""
        results[key] = rows
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)

    if args.what in ("ce", "all"):
        save("ce", _bench_ce(args, lambda rows: save("ce", rows)))
    if args.what in ("sparse", "all"):
        save("sparse", _bench_sparse(args))
    if args.what in ("lowrank", "all"):
        save("lowrank", _bench_lowrank(args))
    if args.what == "merge":  # not in "all": the full merge bench takes long
        from sparseft.bench.merge import TARGETS
        results["merge_targets"] = TARGETS
        save("merge", _bench_merge(args, lambda rows: save("merge", rows)))
    if args.json:
        print(f"results written to {args.json}")
    return 0


def _merge(args):
    from sparseft.merge.config import ConfigError, merge_from_config
    try:
        out = merge_from_config(args.config, args.out, overwrite=args.force, device=args.device, backend=args.backend,
                                progress=not args.quiet, max_shard_size=args.max_shard_size)
    except (ConfigError, ValueError, FileExistsError, TypeError) as exc:
        print(f"sparseft merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _finetune(args):
    from sparseft.finetune import compare
    runs = None
    if args.runs:
        runs = [tuple(item.split("/", 1)) if "/" in item else (item, "plain") for item in args.runs.split(",")]
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        print(f"sparseft finetune: error: --seeds: expected a comma list of integers, got {args.seeds!r}",
              file=sys.stderr)
        return 2
    try:
        compare.main(args.method, args.loss, args.steps, args.out, batch_size=args.batch_size, force=args.force,
                     compare=args.compare, seeds=seeds, eval_problems=args.eval_problems, quiet=args.quiet,
                     tiny=args.tiny, runs=runs, report_from=args.report_from and args.report_from.split(","))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"sparseft finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _merge_help():
    from sparseft.merge import config
    return ("Merge fine-tuned checkpoints as a mergekit YAML configuration describes (methods linear, "
            "task_arithmetic, ties, dare_linear, dare_ties, consensus; per-layer list parameters; a `lines:` "
            "block for LiNeS). Streams tensor by tensor, never downloads, and writes OUT atomically.\n\n"
            "Example CONFIG.yaml:\n" + config.__doc__.split("\n\n", 1)[1].split("\nErrors")[0])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparseft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available here, and why not").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks against the peers (time and peak memory)")
    bench.add_argument("what", nargs="?", default="all", choices=["ce", "sparse", "lowrank", "merge", "all"],
                       help="all: ce, sparse and lowrank (merge runs only when named)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--shapes", default="smollm2", help="ce: comma list of smollm2,llama3")
    bench.add_argument("--tokens", default="4096", help="ce: comma list of token counts")
    bench.add_argument("--cases", default=None, help="ce: comma list of cases (default: all that run here)")
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--json", default="sparseft-bench.json", help="where to write the results")
    bench.add_argument("--png", default=None, help="ce: time and memory against tokens; lowrank: the loss curves; "
                       "merge: time and RSS bars")
    bench.add_argument("--parts", default="refresh,step,model",
                       help="lowrank: comma list of refresh,step,model,curves (curves: ~1000 CPU training steps)")
    bench.add_argument("--full", action="store_true", help="sparse: both weight shapes at 1, 5 and 20%% density")
    bench.add_argument("--batch", type=int, default=4, help="sparse: SmolLM2 step batch size")
    bench.add_argument("--seq", type=int, default=128, help="sparse: SmolLM2 step sequence length")
    bench.add_argument("--lift-rank", type=int, default=64, help="sparse: rank of the LIFT mask selection")
    bench.add_argument("--grad-checkpointing", action="store_true", help="sparse: SmolLM2 with activation checkpointing")
    bench.add_argument("--skip-model", action="store_true", help="sparse: optimizer step only, no SmolLM2 step")
    bench.add_argument("--lift-step", action="store_true",
                       help="sparse: also the optimizer step over SmolLM2's LIFT-masked matrices beside random masks")
    bench.add_argument("--masks", default=None,
                       help="sparse: saved LIFT masks (a MaskSet file) for --lift-step and the SmolLM2 step, not selected")
    bench.add_argument("--crossover", action="store_true",
                       help="sparse: only the SparseLinear density sweep (sampled values gradient or dense GEMM)")
    bench.add_argument("--ddp", type=int, metavar="N", default=None,
                       help="sparse: instead, SmolLM2 steps under DDP on N gloo CPU processes (bench/distributed.py)")
    bench.add_argument("--fsdp", type=int, metavar="N", default=None,
                       help="sparse: instead, SmolLM2 steps under FSDP2 on N gloo CPU processes")
    bench.add_argument("--tiny", action="store_true",
                       help="merge, sparse --ddp/--fsdp: a small config-built Llama (a smoke run)")
    bench.add_argument("--smollm2", action="store_true",
                       help="merge: SmolLM2-135M-based fine-tunes, not the 0.5B Llama")
    bench.add_argument("--merges", default="ties,task_arithmetic_lines,linear",
                       help="merge: comma list of ties,task_arithmetic_lines,linear")
    bench.add_argument("--keep", action="store_true", help="merge: keep the temporary inputs, configs and logs")
    bench.set_defaults(func=_bench)
    merge = sub.add_parser("merge", help="merge fine-tunes from a mergekit-style YAML config",
                           description=_merge_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("config", help="the YAML configuration (mergekit format, plus lines:)")
    merge.add_argument("out", help="output directory (must not exist unless --force)")
    merge.add_argument("--force", action="store_true", help="replace an existing output directory")
    merge.add_argument("--device", default="cpu", help="where tensors are merged (cpu, cuda)")
    merge.add_argument("--backend", default=None, help="force a merge kernel backend (torch, cpu, triton, cuda)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=_merge)
    finetune = sub.add_parser("finetune", help="fine-tune SmolLM2-135M on generated arithmetic, offline: accuracy, "
                              "forgetting, LiNeS (one method, or --compare)")
    finetune.add_argument("--method", default="lift", help="adamw, lift, sara, random, half, lowrank, owlore, ramt")
    finetune.add_argument("--loss", default="plain", help="plain, thought-mask, masked-thought, meap")
    finetune.add_argument("--steps", type=int, default=60, help="optimizer steps")
    finetune.add_argument("--batch-size", type=int, default=4, help="problems per step")
    finetune.add_argument("--compare", action="store_true",
                          help="the table of methods and losses (full FT with each loss, LIFT, OwLore + LowRankAdamW)")
    finetune.add_argument("--runs", default=None, help="instead of --compare's set: comma list of METHOD[/LOSS]")
    finetune.add_argument("--seeds", default="0", help="comma list; several report the mean ± standard deviation")
    finetune.add_argument("--report-from", default=None, metavar="DIRS",
                          help="comma list of earlier output directories (or their results.json): report their rows "
                               "together in --out, training nothing")
    finetune.add_argument("--eval-problems", type=int, default=40, help="held-out problems for exact-match accuracy")
    finetune.add_argument("--out", default="sparseft-finetune", help="output directory (refused if it exists)")
    finetune.add_argument("--force", action="store_true", help="replace an existing output directory")
    finetune.add_argument("--quiet", action="store_true", help="no progress bars")
    finetune.add_argument("--tiny", action="store_true", help="a random two-block Llama instead of SmolLM2 (smoke run)")
    finetune.set_defaults(func=_finetune)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
