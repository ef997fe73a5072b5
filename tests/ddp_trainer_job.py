"""A Hugging Face Trainer run under torchrun (gloo, CPU), launched by test_distributed.py:

    torchrun --nproc_per_node 2 tests/ddp_trainer_job.py {sparse,lowrank} OUT_DIR

The optimizer is built exactly as on one process and handed to the Trainer, which wraps the
model in DDP. Each rank saves its final weights and the loss before and after to OUT_DIR.
"""

import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparseft  # noqa: E402
from sparseft.masks import lift  # noqa: E402
from sparseft.optim import LowRankAdamW, SparseAdamW, lowrank_param_groups  # noqa: E402
from test_trainer import LR, _Cycle, _freeze, _loss, _model  # noqa: E402


def main(kind, out_dir):
    model = _model(0)
    if kind == "sparse":
        model = sparseft.sparsify(_freeze(model), lift(model, rank=4, density=0.05))
        optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    else:
        optimizer = LowRankAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=5), lr=LR)
    before = _loss(model)
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=12, per_device_train_batch_size=4, learning_rate=LR, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, ddp_backend="gloo", lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Cycle(), optimizers=(optimizer, None))
    trainer.train()
    rank = torch.distributed.get_rank()
    torch.save({"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "world": torch.distributed.get_world_size(), "loss": (before, _loss(model))},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
