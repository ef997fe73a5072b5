"""LowRankAdamW inside the Hugging Face Trainer, plain and layerwise, on the config-built tiny
Llama of test_trainer.py: the loss falls, and resuming from a mid-run checkpoint equals the
uninterrupted run bit for bit (projector refreshes on both sides of the checkpoint)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseft.optim import LowRankAdamW, lowrank_param_groups  # noqa: E402
from test_trainer import _Cycle, _loss, _model, _trainer  # noqa: E402

LR = 1e-2


def _setup(seed, layerwise):
    model = _model(seed)
    groups = lowrank_param_groups(model, rank=4, update_proj_gap=3, scale=1.0)
    options = dict(layerwise=True, accumulation_steps=2, max_grad_norm=0.5) if layerwise else {}
    return model, LowRankAdamW(groups, lr=LR, weight_decay=0.01, **options)


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_loss_falls(layerwise, tmp_path):
    model, optimizer = _setup(0, layerwise)
    initial = _loss(model)
    _trainer(model, optimizer, tmp_path, max_steps=30, learning_rate=LR, lr_scheduler_type="constant",
             gradient_accumulation_steps=2 if layerwise else 1).train()
    assert _loss(model) < 0.5 * initial
    assert optimizer.last_grad_norm is not None and float(optimizer.last_grad_norm) > 0


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_resume_from_checkpoint_equals_uninterrupted_run(layerwise, tmp_path):
    n, m = 4, 4  # refreshes at steps 0 and 3 before the checkpoint, 6 after it
    common = dict(max_steps=n + m, gradient_accumulation_steps=2, learning_rate=LR, lr_scheduler_type="linear",
                  warmup_steps=2, max_grad_norm=0.0 if layerwise else 0.5)
    model, optimizer = _setup(0, layerwise)
    _trainer(model, optimizer, tmp_path / "whole", save_strategy="steps", save_steps=n, **common).train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{n}"

    resumed, resumed_optimizer = _setup(1, layerwise)  # another seed: all it ends with comes from the checkpoint
    trainer = _trainer(resumed, resumed_optimizer, tmp_path / "resumed", **common)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == n + m

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    saved, loaded = optimizer.state_dict()["state"], resumed_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for pid, entry in saved.items():
        for key, value in entry.items():
            same = torch.equal(value, loaded[pid][key]) if torch.is_tensor(value) else value == loaded[pid][key]
            assert same, f"optimizer state {pid}.{key} differs"
    assert max(e["refreshes"] for e in saved.values() if "refreshes" in e) == 3
