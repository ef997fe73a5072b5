"""One fine-tuning run of ``sparseft finetune``: SmolLM2-135M-Instruct on generated arithmetic
word problems with one method and one loss, measured before and after, then LiNeS post hoc.

A run is a fresh process (``python -m sparseft.finetune.job``), so its peak memory is its own:
the resident-set high-water mark above the loaded model and data, as ``sparseft bench``
measures it. It writes one JSON row; ``sparseft.finetune.compare`` runs several and reports.
"""

import argparse
import json
import os
import time

import torch

METHODS = ("adamw", "lift", "sara", "random", "half", "lowrank", "owlore", "ramt")
LOSSES = ("plain", "thought-mask", "masked-thought", "meap")
# Per-method learning rates (not tuned here): sparse and low-rank updates move few directions
# and take larger steps than full fine-tuning, as their papers' recipes do.
LEARNING_RATES = {"adamw": 1e-4, "half": 1e-4, "lift": 5e-4, "sara": 5e-4, "random": 5e-4, "lowrank": 1e-3,
                  "owlore": 1e-3, "ramt": 1e-2}
DEFAULT_STEPS, DEFAULT_BATCH = 60, 4  # ~4 s a step on 2 CPU cores: a run in about 6 minutes
METHOD_OPTIONS = {"lift": {"density": 0.05, "rank": 64}, "random": {"density": 0.05},
                  "sara": {"fraction": 0.05}, "lowrank": {"rank": 64, "update_proj_gap": 50},
                  "owlore": {"rank": 64, "update_proj_gap": 50, "gamma": 12, "interval": 20},
                  "half": {"stage_steps": 20}}
LINES_ALPHAS = (0.5, 0.25)  # LiNeS single-task grid: β = 1 − α, so the last block keeps its full update
MASK_FRACTION = {"masked-thought": 0.2, "meap": 0.15}


# ----------------------------------------------------------------------------- data
def collator(loss, tokenizer, seed):
    """The collator of ``loss``: plain trains thought and answer; thought-mask trains the answer
    only (thought weight 0); Masked Thought replaces 20% of the thought's input tokens and MEAP
    15% of all (prompt included) by the pad token, both keeping plain's targets."""
    from sparseft.data import MaskedThoughtCollator, MEAPCollator, ThoughtMaskCollator
    base = ThoughtMaskCollator(tokenizer.pad_token_id, thought_weight=0.0 if loss == "thought-mask" else 1.0)
    if loss == "masked-thought":
        return MaskedThoughtCollator(base, mask_token_id=tokenizer.pad_token_id, p=MASK_FRACTION[loss], seed=seed)
    if loss == "meap":
        return MEAPCollator(base, mask_token_id=tokenizer.pad_token_id, p=MASK_FRACTION[loss], seed=seed)
    return base


def datasets(tokenizer, train_problems, eval_problems, seed):
    """(training examples, held-out problems): disjoint by construction (split "train"/"test")."""
    from sparseft.data.arithmetic import arithmetic_problems, tokenize_problems
    train = tokenize_problems(arithmetic_problems(train_problems, seed=seed, split="train"), tokenizer)
    held_out = arithmetic_problems(eval_problems, seed=seed + 1, split="test")
    return train, held_out


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, held_out, general_ids):
    from sparseft.finetune.evaluate import answer_accuracy, perplexity
    start = time.perf_counter()
    accuracy, _ = answer_accuracy(model, tokenizer, held_out)
    return {"accuracy": accuracy, "perplexity": perplexity(model, general_ids),
            "eval_s": time.perf_counter() - start}


def _plain_state(model, keys):
    """The model's tensors under the base checkpoint's names (a sparsified layer's weight holds
    its trained values; its values and indices are left out)."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in keys}


def lines_grid(model, base_state, tokenizer, held_out, general_ids):
    """Each LiNeS point of the grid applied to the fine-tune's task vector, re-evaluated."""
    from sparseft.merge import lines
    tuned = _plain_state(model, base_state)
    points = []
    for alpha in LINES_ALPHAS:
        scaled = lines(base=base_state, model=tuned, alpha=alpha, beta=1.0 - alpha)
        model.load_state_dict(scaled, strict=False)
        points.append({"alpha": alpha, "beta": 1.0 - alpha, **evaluate(model, tokenizer, held_out, general_ids)})
    model.load_state_dict(tuned, strict=False)
    return points


# ----------------------------------------------------------------------------- training
def _trainer(model, optimizer, callbacks, method, data, collate, steps, batch_size, seed, out_dir, progress):
    import transformers

    from sparseft.integrations import FusedLossTrainer
    from sparseft.integrations.recipes import RAMTTrainer
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        disable_tqdm=not progress, remove_unused_columns=False, lr_scheduler_type="constant")
    trainer_class = RAMTTrainer if method == "ramt" else FusedLossTrainer
    return trainer_class(model=model, args=args, train_dataset=data, data_collator=collate,
                         optimizers=(optimizer, None), callbacks=callbacks)


def _trainable(model, optimizer):
    """Entries the last step trained: mask sizes for sparse layers, else elements that require grad
    (Half Fine-Tuning's current half, OwLore's sampled blocks)."""
    from sparseft.sparse_linear import SparseLinear
    sparse = sum(m.weight_indices.numel() for m in model.modules() if isinstance(m, SparseLinear))
    dense = sum(p.numel() for group in optimizer.param_groups for p in group["params"]
                if p.requires_grad and getattr(p, "_sparseft_module", None) is None)
    return sparse + dense


def run(method, loss, steps, seed=0, batch_size=DEFAULT_BATCH, train_problems=2000, eval_problems=40, out_dir=None,
        progress=True, lines=True, tiny=False):
    """Fine-tune, evaluate, LiNeS: one result row (a dict)."""
    from sparseft.bench.measure import PeakMemory
    from sparseft.finetune.evaluate import general_text_ids
    from sparseft.finetune.model import load_model
    from sparseft.integrations import create_optimizer
    torch.manual_seed(seed)
    model, tokenizer = load_model(tiny=tiny)
    model.config.use_cache = False
    data, held_out = datasets(tokenizer, train_problems, eval_problems, seed)
    general_ids = general_text_ids(tokenizer)
    base_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    options = dict(METHOD_OPTIONS.get(method, {}), lr=LEARNING_RATES[method])
    if method == "owlore":
        options["calibration"] = [torch.tensor(example["input_ids"])[None] for example in _ids_only(data[:16])]
    row = {"method": method, "loss": loss, "steps": steps, "seed": seed, "batch_size": batch_size,
           "options": {k: v for k, v in options.items() if k != "calibration"}}
    with PeakMemory("cpu") as peak:
        optimizer, callbacks = create_optimizer(model, method, **options)
        trainer = _trainer(model, optimizer, callbacks, method, data, collator(loss, tokenizer, seed), steps,
                           batch_size, seed, out_dir or os.getcwd(), progress)
        start = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - start
    model.config.use_cache = True
    row.update(peak_bytes=peak.peak_bytes, train_s=train_s, step_s=train_s / steps,
               trainable=_trainable(model, optimizer), final_loss=result.training_loss,
               losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    _plain_model(model, method)
    row["after"] = evaluate(model, tokenizer, held_out, general_ids)
    if lines:
        row["lines"] = lines_grid(model, base_state, tokenizer, held_out, general_ids)
    if out_dir is not None:
        _save_delta(model, base_state, out_dir, method)
    return row


def _ids_only(examples):
    """Token ids of segment examples, concatenated per example (OwLore's calibration batches)."""
    for example in examples:
        yield {"input_ids": [token for _, ids in example["segments"] for token in ids]}


def _plain_model(model, method):
    """Evaluate what the method trained as a plain model: R-AMT's masks are baked into the weights."""
    if method == "ramt":
        from sparseft.ramt import ramt_merge
        ramt_merge(model)


def _save_delta(model, base_state, out_dir, method):
    """The fine-tune's sparse delta (sparse methods) next to the results."""
    from sparseft.delta import SparseDelta
    if any(hasattr(m, "weight_indices") for m in model.modules()):
        SparseDelta.from_sparsified(model, base_state).save(os.path.join(out_dir, f"{method}.delta.safetensors"))


def base_row(eval_problems=40, seed=0, tiny=False):
    """The untuned model's accuracy and perplexity, on the same held-out problems and text."""
    from sparseft.finetune.evaluate import general_text_ids
    from sparseft.finetune.model import load_model
    model, tokenizer = load_model(tiny=tiny)
    _, held_out = datasets(tokenizer, 1, eval_problems, seed)
    return {"method": "base", "loss": None, "seed": seed,
            "after": evaluate(model, tokenizer, held_out, general_text_ids(tokenizer))}


def _main(argv=None):
    parser = argparse.ArgumentParser(description="one sparseft finetune run (see sparseft.finetune.compare)")
    parser.add_argument("--method", choices=("base", *METHODS), required=True)
    parser.add_argument("--loss", choices=LOSSES, default="plain")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--eval-problems", type=int, default=40)
    parser.add_argument("--no-lines", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a random two-block Llama (a smoke run)")
    parser.add_argument("--out", required=True, help="directory: the row goes to <method>-<loss>-<seed>.json")
    args = parser.parse_args(argv)
    if args.method == "base":
        row = base_row(args.eval_problems, args.seed, args.tiny)
        name = f"base-{args.seed}.json"
    else:
        row = run(args.method, args.loss, args.steps, args.seed, args.batch_size, eval_problems=args.eval_problems,
                  out_dir=args.out, progress=not args.quiet, lines=not args.no_lines, tiny=args.tiny)
        name = f"{args.method}-{args.loss}-{args.seed}.json"
    with open(os.path.join(args.out, name), "w") as out:
        json.dump(row, out, indent=1)


if __name__ == "__main__":
    _main()
