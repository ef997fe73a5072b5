"""create_optimizer's methods inside the Hugging Face Trainer, on the config-built tiny Llama of
test_trainer.py (CPU, no downloads): each builds and learns, changes only what it may, and
resuming from a mid-run checkpoint equals the uninterrupted run bit for bit (mask refreshes,
HFT stages and OwLore periods on both sides of the checkpoint). Bad input is refused by name."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparseft  # noqa: E402
from sparseft.integrations import RAMTTrainer, create_optimizer  # noqa: E402
from sparseft.integrations.recipes import NUCLEAR_NORM_KEY, HalfFineTuningCallback  # noqa: E402
from sparseft.ramt import RAMTLinear  # noqa: E402
from test_trainer import _Cycle, _assert_only_masked_changed, _loss, _model  # noqa: E402

CALIBRATION = [_Cycle(count=4)[:]["input_ids"]]


def _options(method, refresh=True):
    """Options for the tiny model; ``refresh`` re-selects masks / stages / blocks every 3 steps."""
    every = 3 if refresh else None
    lowrank = dict(lr=1e-2, rank=4, update_proj_gap=3, scale=1.0)
    return {
        "adamw": dict(lr=1e-2, weight_decay=0.01),
        "lift": dict(lr=3e-2, rank=4, refresh_every=every),
        "sara": dict(lr=3e-2, fraction=0.05, nuclear_norm=1e-3, per_step="all", reselect_every=every),
        "lottery": dict(lr=3e-2, tuned=_model(7).state_dict()),
        "half": dict(lr=1e-2, stage_steps=every),
        "random": dict(lr=3e-2, density=0.1),
        "lowrank": lowrank,
        "owlore": dict(lowrank, calibration=CALIBRATION, gamma=1, interval=every or 100, outlier_threshold=3.0),
        "ramt": dict(lr=1e-2),
    }[method]


METHODS = ["adamw", "lift", "sara", "lottery", "half", "random", "lowrank", "owlore", "ramt"]


def _trainer(model, optimizer, callbacks, method, output_dir, max_steps, **overrides):
    args = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                disable_tqdm=True, lr_scheduler_type="constant")
    args.update(overrides)
    trainer_class = RAMTTrainer if method == "ramt" else transformers.Trainer
    return trainer_class(model=model, args=transformers.TrainingArguments(**args), train_dataset=_Cycle(),
                         optimizers=(optimizer, None), callbacks=callbacks)


def _snapshot(model):
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _sparse_masks(model):
    return {name + ".weight": m.weight_indices for name, m in model.named_modules()
            if isinstance(m, sparseft.SparseLinear)}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_in_the_trainer_and_changes_only_what_it_may(method, tmp_path):
    model = _model(0)
    optimizer, callbacks = create_optimizer(model, method, **_options(method, refresh=False))
    before, initial = _snapshot(model), _loss(model)
    _trainer(model, optimizer, callbacks, method, tmp_path, max_steps=12).train()
    after = _snapshot(model)

    if method == "ramt":  # weights frozen; scores learn which entries to switch off
        layers = [m for m in model.modules() if isinstance(m, RAMTLinear)]
        assert layers and all(torch.equal(before[n], after[n]) for n in before if not n.endswith("scores"))
        assert any((~m.binary_mask()).any() for m in layers), "no mask entry switched off"
        return
    assert _loss(model) < 0.9 * initial, (initial, _loss(model))
    if method in ("lift", "sara", "lottery", "random"):
        dense = {n: t for n, t in before.items() if not n.endswith(("weight_values", "weight_indices"))}
        _assert_only_masked_changed(dense, {n: after[n] for n in dense}, _sparse_masks(model))
    if method == "half":
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == trained and trained


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_checkpoint_equals_uninterrupted_run(method, tmp_path):
    n, m = 4, 4  # refreshes, stages and OwLore periods at steps 3 and 6: on both sides of the checkpoint
    common = dict(max_steps=n + m, gradient_accumulation_steps=2, max_grad_norm=0.5, lr_scheduler_type="linear",
                  warmup_steps=2)
    model = _model(0)
    optimizer, callbacks = create_optimizer(model, method, **_options(method))
    _trainer(model, optimizer, callbacks, method, tmp_path / "whole", save_strategy="steps", save_steps=n,
             **common).train()

    # Another seed, so everything the run ends with comes from the checkpoint; OwLore's sampling
    # probabilities come from the pretrained model, so it restarts from that model, as a user would.
    resumed = _model(0 if method == "owlore" else 1)
    resumed_optimizer, resumed_callbacks = create_optimizer(resumed, method, **_options(method))
    trainer = _trainer(resumed, resumed_optimizer, resumed_callbacks, method, tmp_path / "resumed", **common)
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{n}"))
    assert trainer.state.global_step == n + m

    _assert_same(model.state_dict(), resumed.state_dict(), "model")
    _assert_same(optimizer.state_dict(), resumed_optimizer.state_dict(), "optimizer")
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in resumed.parameters()]


def _assert_same(expected, got, where):
    if isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            _assert_same(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), f"{where} differs after resume"
    else:
        assert expected == got, f"{where}: {expected!r} != {got!r}"


def test_lift_refresh_installs_the_masks_of_the_current_weights(tmp_path):
    model = _model(0)
    optimizer, callbacks = create_optimizer(model, "lift", lr=3e-2, rank=4, refresh_every=3)
    initial = {n: i.clone() for n, i in _sparse_masks(model).items()}
    _trainer(model, optimizer, callbacks, "lift", tmp_path, max_steps=3).train()
    current = _sparse_masks(model)
    expected = sparseft.masks.lift(model, rank=4, density=0.05)
    assert all(torch.equal(current[n], expected[n]) for n in expected)
    assert any(not torch.equal(current[n], initial[n]) for n in current), "the refresh kept every mask"
    assert all(optimizer.state[p]["indices"] is p._sparseft_module.weight_indices
               for group in optimizer.param_groups for p in group["params"])


def test_sara_checkpoints_its_nuclear_norm_state():
    model = _model(0)
    optimizer, _ = create_optimizer(model, "sara", fraction=0.05)
    saved = optimizer.state_dict()[NUCLEAR_NORM_KEY]
    assert saved["calls"] == 0 and set(saved["base"]) == {n[:-len(".weight")] for n in _sparse_masks(model)}


# ----------------------------------------------------------------------------- Half Fine-Tuning
def _half_setup(stage_steps=None):
    model = _model(0)
    optimizer, (callback,) = create_optimizer(model, "half", lr=1e-2, stage_steps=stage_steps)
    assert isinstance(callback, HalfFineTuningCallback)
    return model, optimizer, callback


def test_half_frozen_matrices_form_no_gradient_and_trained_ones_are_plain_linear():
    model, optimizer, callback = _half_setup()
    linears = {n + ".weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    trained = {n for n, p in callback.matrices if p.requires_grad}
    frozen = {n for n, p in callback.matrices if not p.requires_grad}
    assert len(trained) == len(frozen) == 7  # 2 blocks x (2 of 4 attention + 1.5 of 3 MLP on average)
    assert not any(isinstance(m, sparseft.SparseLinear) for m in model.modules())
    batch = _Cycle()[:8]
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if name in trained:
            assert type(linears[name]) is torch.nn.Linear and p.grad is not None and p.grad.shape == p.shape
        else:
            assert p.grad is None, f"{name} formed a gradient"
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for _, p in callback.matrices}


def test_half_stage_change_redraws_and_drops_the_state_of_the_frozen_half():
    model, optimizer, callback = _half_setup(stage_steps=2)
    model(**_Cycle()[:8]).loss.backward()
    optimizer.step()
    stage0 = {n for n, p in callback.matrices if p.requires_grad}
    callback.on_step_begin(None, transformers.TrainerState(global_step=2), None)
    stage1 = {n for n, p in callback.matrices if p.requires_grad}
    assert callback.stage == 1 and stage1 != stage0
    expected = sparseft.masks.half(model, seed=0, stage=1)
    assert stage1 == set(expected)
    for name, p in callback.matrices:  # only matrices trained in both stages keep their moments
        assert (p in optimizer.state) == (name in stage0 & stage1), name
        assert p.grad is None or name in stage1


# ----------------------------------------------------------------------------- bad input
def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'lora'.*adamw"):
        create_optimizer(_model(0), "lora")


@pytest.mark.parametrize("method, option", [("adamw", "density"), ("lift", "stage_steps"), ("ramt", "rank")])
def test_options_the_method_does_not_take_are_named(method, option):
    with pytest.raises(TypeError, match=rf"'{method}' does not take \['{option}'\]; it accepts"):
        create_optimizer(_model(0), method, **{option: 1})


@pytest.mark.parametrize("method, option", [("owlore", "calibration"), ("lottery", "tuned")])
def test_required_options_are_named(method, option):
    with pytest.raises(TypeError, match=f"'{method}' needs {option}"):
        create_optimizer(_model(0), method)


def test_ramt_refuses_a_plain_trainer(tmp_path):
    model = _model(0)
    optimizer, callbacks = create_optimizer(model, "ramt")
    with pytest.raises(RuntimeError, match="RAMTTrainer"):
        _trainer(model, optimizer, callbacks, "adamw", tmp_path, max_steps=1).train()
    with pytest.raises(ValueError, match="RAMTObjective"):
        _trainer(model, optimizer, [], "ramt", tmp_path, max_steps=1)


def test_ramt_step_without_penalty_and_dropout_takes_the_task_gradient(tmp_path):
    model = _model(0)
    optimizer, callbacks = create_optimizer(model, "ramt", penalty=0.0, strength=0.0)
    trainer = _trainer(model, optimizer, callbacks, "ramt", tmp_path, max_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    batch = _Cycle()[:8]
    targets = batch["labels"][:, 1:].numel()
    loss = trainer.training_step(model, batch, num_items_in_batch=torch.tensor(targets))
    scores = [p for p in model.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in scores]
    expected = model(**batch).loss
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for g, e in zip(got, torch.autograd.grad(expected, scores)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)
