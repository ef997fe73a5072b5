"""SparseAdamW inside the Hugging Face Trainer, on a config-built tiny Llama (CPU, no downloads).

(a) LIFT masks on all linear layers, model sparsified (compact weight gradients): loss falls.
(b) Checkpoint save and resume equals an uninterrupted run, bit for bit.
(c) Dense parameters with masks (no sparsify): unmasked entries stay bit-identical.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparseft  # noqa: E402
from sparseft.masks import lift  # noqa: E402
from sparseft.optim import SparseAdamW  # noqa: E402

DENSITY = 0.05
LR = 3e-2
_CYCLE = torch.tensor([5, 9, 23, 41, 77, 100, 3, 64])


def _config():
    # initializer_range 0.3 (default 0.02): with 5% of the linear entries trainable and the
    # head frozen, the default init caps the logits near 0.6 and the loss can barely move.
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, initializer_range=0.3)


def _model(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config())


class _Cycle(torch.utils.data.Dataset):
    """Sequences walking an 8-token cycle from random phases: the next token is a function of
    the current one, so the loss can fall far below ln(vocab)."""

    def __init__(self, count=64, length=32):
        phase = torch.randint(0, len(_CYCLE), (count, 1), generator=torch.Generator().manual_seed(0))
        self.ids = _CYCLE[(phase + torch.arange(length)) % len(_CYCLE)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def masks():
    """LIFT masks of the seed-0 model, at DENSITY on every linear layer (head excluded)."""
    return lift(_model(0), rank=4, density=DENSITY)


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sparse_setup(seed, masks, weight_decay=0.0):
    """Model sparsified at `masks` (only the compact values train) and SparseAdamW, kind (b)."""
    model = sparseft.sparsify(_freeze(_model(seed)), masks)
    values = [p for p in model.parameters() if p.requires_grad]
    return model, SparseAdamW(values, lr=LR, weight_decay=weight_decay)


def _trainer(model, optimizer, output_dir, max_steps, **overrides):
    args = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=LR,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    args.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=_Cycle(),
                                optimizers=(optimizer, None))


@torch.no_grad()
def _loss(model):
    batch = _Cycle()[:]
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()


def _weights_and_buffers(model):
    """Copies of every dense weight (weight_values excluded: they mirror the weights) and buffer."""
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)
            if name.endswith(".weight")} | {name: b.clone() for name, b in model.named_buffers()}


def _assert_only_masked_changed(before, after, masks):
    for name, old in before.items():
        new = after[name]
        if name not in masks:
            assert torch.equal(old, new), f"{name} is outside the masks but changed"
            continue
        outside = torch.ones(old.numel(), dtype=torch.bool)
        outside[masks[name].long()] = False
        assert torch.equal(old.view(-1)[outside], new.view(-1)[outside]), f"{name}: an unmasked entry changed"
        changed = (old.view(-1)[~outside] != new.view(-1)[~outside]).float().mean().item()
        assert changed > 0.9, f"{name}: only {changed:.0%} of the masked entries moved"


def test_lift_masks_sparsified_model_loss_falls(masks, tmp_path):
    linear = {n + ".weight" for n, m in _model(0).named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(masks) == linear - {"lm_head.weight"}
    model, optimizer = _sparse_setup(0, masks, weight_decay=0.01)
    sparse = [m for m in model.modules() if isinstance(m, sparseft.SparseLinear)]
    assert len(sparse) == len(masks) == 14
    before, initial_loss = _weights_and_buffers(model), _loss(model)

    trainer = _trainer(model, optimizer, tmp_path, max_steps=30, lr_scheduler_type="constant")
    trainer.train()

    final_loss = _loss(model)
    assert final_loss < 0.4 * initial_loss, (initial_loss, final_loss)
    # The Trainer drops gradients after each step: look at those of one more backward pass.
    batch = _Cycle()[:8]
    model(**batch).loss.backward()
    assert all(m.weight.grad is None for m in sparse), "a dense weight gradient was formed"
    assert all(m.weight_values.grad.shape == m.weight_indices.shape for m in sparse)
    for m in sparse:  # the values and the dense weight agree after every fused step
        assert torch.equal(m.weight_values.detach(), m.weight.view(-1)[m.weight_indices.long()])
    _assert_only_masked_changed(before, _weights_and_buffers(model), masks)


def test_resume_from_checkpoint_equals_uninterrupted_run(masks, tmp_path):
    # Mid-epoch checkpoint (4 optimizer steps per epoch), linear decay, weight decay, clipping
    # and gradient accumulation, so every piece of saved state matters.
    n, m = 6, 4
    common = dict(max_steps=n + m, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                  max_grad_norm=0.5, lr_scheduler_type="linear", warmup_steps=2)

    model, optimizer = _sparse_setup(0, masks, weight_decay=0.1)
    _trainer(model, optimizer, tmp_path / "whole", save_strategy="steps", save_steps=n, **common).train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{n}"
    assert checkpoint.is_dir()

    # A fresh model from another seed: everything it ends with must come from the checkpoint.
    resumed, resumed_optimizer = _sparse_setup(1, masks, weight_decay=0.1)
    trainer = _trainer(resumed, resumed_optimizer, tmp_path / "resumed", **common)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == n + m

    expected, got = model.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    saved, loaded = optimizer.state_dict(), resumed_optimizer.state_dict()
    for pid, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, loaded["state"][pid][key]), f"optimizer state {pid}.{key} differs"


def test_dense_params_with_masks_leave_unmasked_entries_bit_identical(masks, tmp_path):
    model = _freeze(_model(0))
    named = [(name, p.requires_grad_(True)) for name, p in model.named_parameters() if name in masks]
    optimizer = SparseAdamW(named, masks=dict(masks), lr=LR, weight_decay=0.1)
    before, initial_loss = _weights_and_buffers(model), _loss(model)

    _trainer(model, optimizer, tmp_path, max_steps=20, lr_scheduler_type="constant").train()

    assert _loss(model) < 0.6 * initial_loss
    _assert_only_masked_changed(before, _weights_and_buffers(model), masks)
