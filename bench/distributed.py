"""`sparseft bench sparse --ddp N` / `--fsdp N`: SmolLM2-135M training steps on N gloo CPU
processes, per-rank peak memory and step time, against one process and against full AdamW
under the same wrapper; and the bytes LowRankAdamW's projector refresh all-reduces under FSDP2.

Variants (the optimizers of bench/sparse.py and bench/lowrank.py):
  full_adamw         every parameter trains, torch.optim.AdamW(foreach)
  lift_sparse        sparseft.sparsify at LIFT-5% masks + SparseAdamW (embeddings, head, norms frozen)
  lowrank            LowRankAdamW over lowrank_param_groups(rank 64), plain mode
  lowrank_layerwise  the same, layerwise; under DDP through optimizer.register_ddp(ddp_model)
Wrappers: plain (one process, no wrapper: the baseline), ddp (DistributedDataParallel), fsdp
(fully_shard on every decoder layer, then on the root). Every rank trains its own batch of
--batch x --seq tokens; the loss (sparseft.linear_cross_entropy on the final hidden states) is
computed inside the wrapped module's forward, so FSDP2 unshards the tied embedding/head for it.

The runner prepares the inputs once: it loads SmolLM2 through bench/sparse.py's load_model
(the checkpoint `sparseft finetune` converts once), saves it as a state dict for the cases to load quickly, and selects
the LIFT masks into a MaskSet file (unless --masks names one). Each case then runs in fresh
processes spawned by torch.multiprocessing (N gloo ranks, or one plain process, with
bench/measure.py's CHILD_ENV malloc settings), so each peak is its own. Ranks share the
machine's cores: each takes cores / N threads, one process all of them, so N ranks on N× the
tokens take about N× as long per step on the same cores.

Memory per rank, from VmHWM after the warm-up step (bench/measure.py): ``peak_bytes`` is above
the loaded (unsharded) model, as in bench/sparse.py, so FSDP2's sharding of the weights themselves
shows as memory given back; ``peak_with_model_bytes`` is above the rank before it loaded the
model, i.e. the model's share included. The max over ranks is reported.

Refresh traffic: under FSDP2 every all-reduce of LowRankAdamW's refresh goes through
sparseft.distributed.RowShard.all_reduce; the fsdp lowrank case wraps it and counts the bytes
of the tensors it sums, per refresh (one weight each), at the default power_iters=2 (the
warm-up step's refresh) and at power_iters=1 (a second optimizer stepped once after timing).
These are payload bytes; a ring all-reduce sends 2·(N-1)/N of them per rank.

  python -m sparseft.bench.sparse --ddp 2 --fsdp 2 [--tiny] [--batch 4 --seq 128] [--json out.json]
"""

import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparseft.bench.measure import CHILD_ENV, PeakMemory, _rss_kib, device_name, time_and_memory

VARIANTS = ("full_adamw", "lift_sparse", "lowrank", "lowrank_layerwise")
LOWRANK_RANK = 64
DENSITY = 0.05
LR = 1e-5
TINY = {"lift_rank": 4, "lowrank_rank": 8}
TARGETS = {"fsdp_lift_peak_vs_one_process": 0.6, "refresh_bytes_vs_two_sketches": 1.0}
CASE_TIMEOUT_S = 1500
WEIGHTS = "weights.pt"


# ----------------------------------------------------------------------------- inputs
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def prepare(tiny, lift_rank, model_dir, masks_out):
    """Saves the model (SmolLM2 via load_model, or a tiny Llama) to model_dir as a config and a
    state dict that every case loads alike and, when masks_out is given, its
    LIFT masks; returns the selection's facts."""
    from sparseft.bench.sparse import load_model
    from sparseft.masks import lift
    model = _tiny_llama() if tiny else load_model("cpu", torch.float32)
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), os.path.join(model_dir, WEIGHTS))
    if not masks_out:
        return {"masks": "given"}
    start = time.perf_counter()
    masks = lift(model, rank=lift_rank, density=DENSITY)
    seconds = time.perf_counter() - start
    masks.save(masks_out)
    return {"select_s": seconds, "tensors": len(masks), "nnz": sum(m.numel() for m in masks.values())}


def _load(model_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.load_state_dict(torch.load(os.path.join(model_dir, WEIGHTS), weights_only=True))  # copies: ties kept
    model.config.use_cache = False
    return model.train()


class _LossModel(nn.Module):
    """The causal LM and its loss in one forward: the module DDP and FSDP2 wrap."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        from sparseft import linear_cross_entropy
        hidden = self.lm.model(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, self.lm.lm_head.weight, ids, shift=True)


# ----------------------------------------------------------------------------- wrappers and variants
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _wrap(wrapper, module):
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    if wrapper == "fsdp":
        fully_shard = _fully_shard()
        for layer in module.lm.model.layers:
            fully_shard(layer)
        fully_shard(module)
    return module


def _lowrank(lm, rank, layerwise=False, **group_options):
    from sparseft.optim import LowRankAdamW, lowrank_param_groups
    return LowRankAdamW(lowrank_param_groups(lm, rank=rank, **group_options), lr=LR, layerwise=layerwise)


def _build(variant, wrapper, lm, masks_path, rank):
    """(wrapped module, optimizer, optimizer name). Sparsifying comes before wrapping and the
    optimizer after it: the order DDP and FSDP2 support."""
    if variant == "full_adamw":
        wrapped = _wrap(wrapper, _LossModel(lm))
        return wrapped, torch.optim.AdamW(lm.parameters(), lr=LR, foreach=True), "torch.AdamW(foreach)"
    if variant == "lift_sparse":
        import sparseft
        from sparseft.masks import MaskSet
        from sparseft.optim import SparseAdamW
        sparseft.sparsify(lm, MaskSet.load(masks_path))
        wrapped = _wrap(wrapper, _LossModel(lm))
        return wrapped, SparseAdamW([p for p in lm.parameters() if p.requires_grad], lr=LR), "SparseAdamW(compact)"
    layerwise = variant == "lowrank_layerwise"
    wrapped = _wrap(wrapper, _LossModel(lm))
    optimizer = _lowrank(lm, rank, layerwise=layerwise)
    if layerwise and wrapper == "ddp":
        optimizer.register_ddp(wrapped)
    return wrapped, optimizer, f"LowRankAdamW(r={rank}{', layerwise' if layerwise else ''})"


def _local_bytes(tensors):
    from sparseft.distributed import local
    return sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------- refresh traffic
class RefreshTraffic:
    """Counts the bytes RowShard.all_reduce sums inside each LowRankAdamW._refresh call."""

    def __init__(self):
        self.refreshes = []
        self._current = None

    def install(self):
        from sparseft.distributed import RowShard
        from sparseft.optim.lowrank_adamw import LowRankAdamW
        all_reduce, refresh = RowShard.all_reduce, LowRankAdamW._refresh
        traffic = self

        def counting_all_reduce(shard, tensor):
            if traffic._current is not None:
                traffic._current["all_reduces"].append([list(tensor.shape), tensor.numel() * tensor.element_size()])
            return all_reduce(shard, tensor)

        def counting_refresh(optimizer, group, position, state, grad, shard=None):
            traffic._current = {"position": position, "power_iters": group["power_iters"], "all_reduces": []}
            try:
                return refresh(optimizer, group, position, state, grad, shard)
            finally:
                traffic.refreshes.append(traffic._current)
                traffic._current = None

        RowShard.all_reduce = counting_all_reduce
        LowRankAdamW._refresh = counting_refresh
        return self

    def take(self, optimizer):
        """The refreshes counted since the last take, each with its weight's name, shape, the
        sketch width k and the bytes measured beside the formula's."""
        from sparseft.optim.lowrank_adamw import default_oversample
        params = [(name, p, group) for group in optimizer.param_groups
                  for name, p in zip(group["param_names"], group["params"])]
        rows = []
        for event in self.refreshes:
            name, p, group = params[event["position"]]
            n = p.shape[1]  # FSDP2 shards rows, so the projector is on the right: n columns
            oversample = default_oversample(group["rank"]) if group["oversample"] is None else group["oversample"]
            k = min(group["rank"] + oversample, n)
            rows.append({"weight": name, "shape": list(p.shape), "n": n, "k": k, "power_iters": event["power_iters"],
                         "all_reduces": event["all_reduces"],
                         "measured_bytes": sum(b for _, b in event["all_reduces"]),
                         "expected_bytes": (event["power_iters"] + 1) * n * k * 4,
                         "limit_bytes": 2 * n * k * 4})
        self.refreshes = []
        return rows


# ----------------------------------------------------------------------------- one rank
def _ids(vocab, batch, seq, rank):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(rank))


def run_rank(rank, world, options):
    """One rank's (or the plain process's) case: loads, wraps, times; returns its measurements."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    wrapper, variant = options["wrapper"], options["variant"]
    traffic = RefreshTraffic().install() if wrapper == "fsdp" and variant == "lowrank" else None
    base = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    lm = _load(options["model_dir"])
    load_s = time.perf_counter() - start
    ids = _ids(lm.config.vocab_size, options["batch"], options["seq"], rank)
    with PeakMemory("cpu") as total:
        wrapped, optimizer, name = _build(variant, wrapper, lm, options["masks"], options["lowrank_rank"])
        losses = []

        def step():
            loss = wrapped(ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        seconds, _ = time_and_memory(step, "cpu", options["repeats"], warmup=1)
        with_model = _rss_kib("VmHWM") * 1024 - base  # VmHWM was reset after the warm-up step
    result = {"rank": rank, "optimizer": name, "step_s": seconds, "peak_bytes": total.peak_bytes,
              "peak_with_model_bytes": with_model, "load_s": load_s, "threads": torch.get_num_threads(),
              "param_bytes": _local_bytes(lm.parameters()),
              "state_bytes": _local_bytes(t for s in optimizer.state.values() for t in s.values()),
              "losses": losses}
    if traffic is not None:
        result["refresh_traffic"] = traffic.take(optimizer) + _traffic_at_one_power_iter(
            traffic, wrapped, lm, ids, options["lowrank_rank"])
    return result


def _traffic_at_one_power_iter(traffic, wrapped, lm, ids, rank):
    """One step of a fresh LowRankAdamW(power_iters=1) on the same model: its refreshes' bytes."""
    optimizer = _lowrank(lm, rank, power_iters=1)
    wrapped(ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return traffic.take(optimizer)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_main(rank, world, port, options, out_dir):
    """A spawned process: joins the gloo group when there are several, runs the case, writes its JSON."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_rank(rank, world, options)
    except Exception as exc:  # reported by the parent
        result = {"rank": rank, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if world > 1:
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)


def _spawn(world, options):
    """The case on ``world`` fresh spawned processes (CHILD_ENV's malloc settings in their
    environment, so each peak is its own); the list of what each returned."""
    saved = dict(os.environ)
    os.environ.update(CHILD_ENV)  # spawned processes start with this environment
    try:
        with tempfile.TemporaryDirectory(prefix="sparseft-bench-ranks-") as out_dir:
            context = mp.start_processes(_process_main, args=(world, _free_port(), options, out_dir),
                                         nprocs=world, join=False, start_method="spawn")
            deadline = time.monotonic() + CASE_TIMEOUT_S
            while not context.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:  # a rank left waiting in a collective
                    for process in context.processes:
                        process.kill()
                    return [{"rank": 0, "error": f"still running after {CASE_TIMEOUT_S} s"}]
            results = []
            for rank in range(world):
                with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                    results.append(json.load(f))
            return results
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_case(options):
    """The case on options["world"] fresh processes (gloo ranks when more than one): per-rank
    results, and the max over ranks of step time and peaks."""
    ranks = _spawn(options["world"], options)
    errors = [f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r]
    if errors:
        return {"error": errors}
    combined = {key: max(r[key] for r in ranks) for key in ("step_s", "peak_bytes", "peak_with_model_bytes")}
    combined.update(optimizer=ranks[0]["optimizer"], per_rank=ranks,
                    losses_median=statistics.median(x for r in ranks for x in r["losses"]))
    if "refresh_traffic" in ranks[0]:
        combined["refresh_traffic"] = ranks[0]["refresh_traffic"]
    return combined


# ----------------------------------------------------------------------------- the runner
def _cases(wrappers):
    """(variant, wrapper, world) in run order: each variant on one process, then wrapped."""
    cases = []
    for variant in VARIANTS:
        under = [(w, n) for w, n in wrappers if variant != "lowrank_layerwise" or w == "ddp"]
        if under:
            cases += [(variant, "plain", 1)] + [(variant, w, n) for w, n in under]
    return cases


def _prepare(args, tmp, progress):
    model_dir, masks = os.path.join(tmp, "model"), getattr(args, "masks", None)
    masks_out = None if masks else os.path.join(tmp, "lift.safetensors")
    lift_rank = TINY["lift_rank"] if args.tiny else args.lift_rank
    progress(f"saving the {'tiny Llama' if args.tiny else 'SmolLM2-135M'} model"
             f"{'' if masks else f' and selecting its LIFT masks (rank {lift_rank}, {DENSITY:.0%})'} ...")
    os.makedirs(model_dir)
    facts = prepare(args.tiny, lift_rank, model_dir, masks_out)
    return model_dir, masks or masks_out, dict(facts, lift_rank=lift_rank)


def _case_row(common, variant, wrapper, world, options, progress):
    progress(f"{variant} on {world} process{'es' if world > 1 else ''} ({wrapper}) ...")
    result = run_case(dict(options, variant=variant, wrapper=wrapper, world=world))
    row = dict(common, variant=variant, wrapper=wrapper, world=world, loadavg=os.getloadavg(), **result)
    if "error" in result:
        progress(f"      failed: {result['error']}")
    else:
        progress(f"      {result['step_s']:.2f} s/step, peak/rank +{result['peak_bytes'] / 2**20:.0f} MiB "
                 f"(+{result['peak_with_model_bytes'] / 2**20:.0f} MiB with the model)")
    return row


def _add_ratios(rows):
    ok = {(r["variant"], r["wrapper"]): r for r in rows if "error" not in r}
    for (variant, wrapper), r in ok.items():
        one, full = ok.get((variant, "plain")), ok.get(("full_adamw", wrapper))
        for key in ("peak_bytes", "peak_with_model_bytes", "step_s"):
            if one:
                r[f"{key}_vs_one_process"] = r[key] / one[key] if one[key] > 0 else None
            if full:
                r[f"{key}_vs_full_adamw"] = r[key] / full[key] if full[key] > 0 else None


def _verdicts(rows):
    """The issue's two targets, from whatever was measured."""
    verdicts = {}
    lift = next((r for r in rows if r["variant"] == "lift_sparse" and r["wrapper"] == "fsdp" and "error" not in r),
                None)
    if lift and lift.get("peak_bytes_vs_one_process") is not None:
        limit = TARGETS["fsdp_lift_peak_vs_one_process"]
        for key in ("peak_bytes", "peak_with_model_bytes"):
            ratio = lift[f"{key}_vs_one_process"]
            verdicts[f"fsdp_lift_{key}_vs_one_process"] = {"value": ratio, "limit": limit, "met": ratio <= limit}
    lowrank = next((r for r in rows if r["variant"] == "lowrank" and r["wrapper"] == "fsdp" and "error" not in r),
                   None)
    for power_iters in (1, 2):
        events = [e for e in (lowrank or {}).get("refresh_traffic", []) if e["power_iters"] == power_iters]
        if events:
            worst = max(e["measured_bytes"] / e["limit_bytes"] for e in events)
            verdicts[f"refresh_bytes_vs_2nk4_power_iters_{power_iters}"] = {
                "value": worst, "limit": 1.0, "met": worst <= 1.0, "weights": len(events)}
    return verdicts


def main_rows(args, progress=print):
    """The distributed bench: args as bench/sparse.py's parser gives them (.ddp, .fsdp, .tiny,
    .batch, .seq, .repeats, .lift_rank, .masks). Prints the tables, returns the rows."""
    wrappers = [(w, n) for w, n in (("ddp", getattr(args, "ddp", None)), ("fsdp", getattr(args, "fsdp", None))) if n]
    command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    loadavg_start = os.getloadavg()
    progress(f"load average at start: {loadavg_start}")
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory(prefix="sparseft-bench-dist-") as tmp:
        model_dir, masks, selection = _prepare(args, tmp, progress)
        options = {"model_dir": model_dir, "masks": masks, "batch": args.batch, "seq": args.seq, "repeats": repeats,
                   "lowrank_rank": TINY["lowrank_rank"] if args.tiny else LOWRANK_RANK}
        common = {"bench": "distributed_step", "model": "tiny Llama" if args.tiny else "SmolLM2-135M-Instruct",
                  "batch_per_rank": args.batch, "seq": args.seq, "repeats": repeats, "dtype": "float32",
                  "backend": "gloo", "device_name": device_name("cpu"), "density": DENSITY,
                  "lift_rank": selection["lift_rank"], "lowrank_rank": options["lowrank_rank"]}
        rows = [_case_row(common, variant, wrapper, world, options, progress)
                for variant, wrapper, world in _cases(wrappers)]
    _add_ratios(rows)
    summary = {"bench": "distributed_summary", "command": command, "device_name": device_name("cpu"),
               "cpu_count": os.cpu_count(), "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
               "mask_selection": selection, "verdicts": _verdicts(rows)}
    rows.append(summary)
    progress(f"load average at end: {summary['loadavg_end']}")
    print(table(rows))
    return rows


# ----------------------------------------------------------------------------- tables
def _ratio(value):
    return f"{value:.2f}" if value is not None else "-"


def table(rows):
    steps = [r for r in rows if r.get("bench") == "distributed_step"]
    summary = next(r for r in rows if r.get("bench") == "distributed_summary")
    first = steps[0]
    lines = [f"{first['model']} training step on gloo CPU ranks: {first['batch_per_rank']} x {first['seq']} tokens "
             f"per rank, float32, {first['device_name']} ({summary['cpu_count']} cores shared by the ranks); "
             f"LIFT rank {first['lift_rank']} at {first['density']:.0%}, LowRankAdamW r={first['lowrank_rank']}",
             "peak/rank: VmHWM above the loaded unsharded model (with model: above the rank before loading it); "
             "max over ranks; x 1 proc: against the same variant on one process; x full: against full AdamW "
             "under the same wrapper"]
    header = (f"{'variant':<18} {'wrapper':<8} {'step s':>7} {'x 1 proc':>8} {'x full':>7} {'peak MiB':>9} "
              f"{'x 1 proc':>8} {'x full':>7} {'w/ model':>9} {'x 1 proc':>8} {'load avg':>8}")
    lines += [header, "-" * len(header)]
    for r in steps:
        where = r["wrapper"] if r["world"] == 1 else f"{r['wrapper']} x{r['world']}"
        if "error" in r:
            lines.append(f"{r['variant']:<18} {where:<8} failed: {r['error']}")
            continue
        lines.append(f"{r['variant']:<18} {where:<8} {r['step_s']:>7.2f} {_ratio(r.get('step_s_vs_one_process')):>8} "
                     f"{_ratio(r.get('step_s_vs_full_adamw')):>7} {r['peak_bytes'] / 2**20:>9.0f} "
                     f"{_ratio(r.get('peak_bytes_vs_one_process')):>8} {_ratio(r.get('peak_bytes_vs_full_adamw')):>7} "
                     f"{r['peak_with_model_bytes'] / 2**20:>9.0f} "
                     f"{_ratio(r.get('peak_with_model_bytes_vs_one_process')):>8} {r['loadavg'][0]:>8.2f}")
    traffic = next((r["refresh_traffic"] for r in steps if r.get("refresh_traffic")), None)
    if traffic:
        lines += ["", "LowRankAdamW refresh under FSDP2: bytes all-reduced per refresh per weight "
                  "(RowShard.all_reduce)"]
        header = (f"{'weight shape':<12} {'n':>5} {'k=r+p':>5} {'iters':>5} {'weights':>7} {'measured B':>11} "
                  f"{'(it+1)nk4+4':>11} {'2nk4':>9} {'x 2nk4':>7}")
        lines += [header, "-" * len(header)]
        kinds = {}
        for e in traffic:
            kinds.setdefault((tuple(e["shape"]), e["power_iters"]), []).append(e)
        for (shape, iters), events in sorted(kinds.items(), key=lambda item: (item[0][1], item[0][0])):
            e, measured = events[0], max(x["measured_bytes"] for x in events)
            lines.append(f"{'x'.join(map(str, shape)):<12} {e['n']:>5} {e['k']:>5} {iters:>5} {len(events):>7} "
                         f"{measured:>11,} {e['expected_bytes']:>11,} {e['limit_bytes']:>9,} "
                         f"{measured / e['limit_bytes']:>7.4f}")
    for key, v in summary["verdicts"].items():
        lines.append(f"target {key}: {v['value']:.4f} <= {v['limit']}: {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)
