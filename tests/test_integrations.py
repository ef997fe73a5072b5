"""Hugging Face integration: fused_causal_lm_loss and FusedLossTrainer on config-built tiny
models (CPU, float32, no downloads).

The fused loss equals the model's own loss and gradients without weights, and a float64
hand computation with weights; the Trainer learns on ThoughtMaskCollator batches, its first
update is the same with gradient accumulation 2 as with one batch twice the size, and
evaluation runs on the loss-only outputs.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparseft  # noqa: E402
from sparseft.data import ThoughtMaskCollator  # noqa: E402
from sparseft.integrations import FusedLossTrainer, apply_fused_cross_entropy, fused_causal_lm_loss  # noqa: E402
from tests.conftest import available_backends  # noqa: E402

VOCAB = 128
PAD_ID = 0
_CYCLE = torch.tensor([5, 9, 23, 41, 77, 100, 3, 64])


def _llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, **overrides)
    return transformers.LlamaForCausalLM(config)


def _batch(seed=1):
    """Three rows, one right-padded, with ignored labels at the start and on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 8:] = 0
    labels = torch.where(attention_mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, :4] = -100
    weights = torch.rand(ids.shape, generator=g) * (labels != -100)
    return {"input_ids": ids, "attention_mask": attention_mask}, labels, weights


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", available_backends())
def test_unweighted_loss_and_grads_equal_the_models_own(backend):
    model = _llama()
    inputs, labels, _ = _batch()
    reference = model(**inputs, labels=labels).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    given = {**inputs, "labels": labels}
    loss = fused_causal_lm_loss(model, given, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert set(given) == {"input_ids", "attention_mask", "labels"}  # the caller's dict is untouched

    with torch.no_grad():  # num_items_in_batch replaces the divisor, as in the model's own loss
        torch.testing.assert_close(fused_causal_lm_loss(model, given, num_items_in_batch=50),
                                   model(**inputs, labels=labels, num_items_in_batch=50).loss, rtol=1e-6, atol=1e-6)


def test_wrapped_model_runs_through_its_wrapper_and_bare_decoder_path_agrees(monkeypatch):
    model = _llama()
    inputs, labels, weights = _batch()
    given = {**inputs, "labels": labels, "loss_weights": weights}
    wrapper = torch.nn.DataParallel(model)  # no GPU: a plain `.module` wrapper
    calls = []
    wrapper.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        through_wrapper = fused_causal_lm_loss(wrapper, given)
        assert calls == [1]  # DDP / FSDP / autocast wrappers must see the forward
        # A forward without logits_to_keep: the unwrapped decoder runs alone.
        monkeypatch.setattr("sparseft.integrations.transformers._KEEP_KEYWORDS", ())
        bare = fused_causal_lm_loss(wrapper, given)
    assert calls == [1]
    torch.testing.assert_close(bare, through_wrapper, rtol=1e-6, atol=1e-6)


def test_head_runs_in_the_autocast_dtype():
    model = _llama()
    inputs, labels, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_causal_lm_loss(model, {**inputs, "labels": labels})
        own = model(**inputs, labels=labels).loss
        hidden = model.model(**inputs).last_hidden_state
    assert hidden.dtype == torch.float32  # the residual stream stays float32 under autocast
    with torch.no_grad():
        in_bf16 = sparseft.linear_cross_entropy(hidden.bfloat16(), model.lm_head.weight.bfloat16(), labels,
                                                shift=True)
    torch.testing.assert_close(loss, in_bf16, rtol=0, atol=0)
    torch.testing.assert_close(loss, own, rtol=1e-3, atol=1e-3)


def test_softcap_follows_the_config():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, initializer_range=0.5,
                                       final_logit_softcapping=2.0)
    model = transformers.Gemma2ForCausalLM(config)
    inputs, labels, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fused_causal_lm_loss(model, {**inputs, "labels": labels}),
                                   model(**inputs, labels=labels).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-2, 0.1)])
def test_weighted_loss_equals_float64_hand_computation(z_loss, label_smoothing):
    model = _llama()
    inputs, labels, weights = _batch()
    loss = fused_causal_lm_loss(model, {**inputs, "labels": labels, "loss_weights": weights},
                                z_loss=z_loss, label_smoothing=label_smoothing)

    reference_model = copy.deepcopy(model).double()
    with torch.no_grad():
        hidden = reference_model.model(**inputs).last_hidden_state[:, :-1]
        logp = torch.log_softmax(hidden @ reference_model.lm_head.weight.T, dim=-1)
        lse = torch.logsumexp(hidden @ reference_model.lm_head.weight.T, dim=-1)
    target, w = labels[:, 1:], weights[:, 1:].double()
    nll = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    per_token = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1) + z_loss * lse ** 2
    expected = (w * per_token).sum() / w.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: transformers.LlamaModel(_llama().config), id="no-head"),
    pytest.param(lambda: torch.nn.Linear(4, 4), id="not-a-causal-lm"),
    pytest.param(lambda: _llama(logit_scale=0.5), id="logit-scale"),
])
def test_unsupported_model_raises(model):
    inputs, labels, _ = _batch()
    with pytest.raises(TypeError, match="fused_causal_lm_loss"):
        fused_causal_lm_loss(model(), {**inputs, "labels": labels})


def test_missing_labels_raise():
    inputs, _, _ = _batch()
    with pytest.raises(ValueError, match="labels"):
        fused_causal_lm_loss(_llama(), inputs)


# ----------------------------------------------------------------------------- Trainer

def _example(i):
    """Thought and answer segments walking an 8-token cycle (the next token is a function of
    the current one, so the loss can fall far below ln(vocab)); even examples start with a
    prompt, odd ones train their first token. Lengths vary."""
    phase, length = i % len(_CYCLE), 10 + 3 * (i % 4)
    ids = _CYCLE[(phase + torch.arange(length)) % len(_CYCLE)].tolist()
    prompt = 3 if i % 2 == 0 else 0
    thought = prompt + length // 2
    segments = [("thought", ids[prompt:thought]), ("answer", ids[thought:])]
    return {"segments": ([("prompt", ids[:prompt])] if prompt else []) + segments}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, count):
        self.items = [_example(i) for i in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _unweighted(collator):
    """The collator's batch without loss_weights (the labels alone say what is trained)."""
    def collate(examples):
        batch = collator(examples)
        del batch["loss_weights"]
        return batch
    return collate


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to=[], remove_unused_columns=False, use_cpu=True,
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def test_trainer_with_thought_mask_collator_learns(tmp_path):
    model = _llama()
    collator = ThoughtMaskCollator(PAD_ID, thought_weight=0.3)
    dataset = _Examples(16)
    probe = collator([dataset[i] for i in range(len(dataset))])

    def probe_loss():
        with torch.no_grad():
            return fused_causal_lm_loss(model, probe, z_loss=1e-4).item()

    before = probe_loss()
    trainer = FusedLossTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4, max_steps=12,
                                                       learning_rate=1e-2, per_device_eval_batch_size=16),
                               train_dataset=dataset, eval_dataset=dataset, data_collator=collator,
                               fused_loss_kwargs={"z_loss": 1e-4})
    trainer.train()
    after = probe_loss()
    assert after < 0.7 * before, (before, after)
    # One evaluation batch holding the whole data set: its normaliser is the probe's.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True], ids=["labels", "loss_weights"])
def test_gradient_accumulation_gives_the_same_first_update(tmp_path, weighted):
    collator = ThoughtMaskCollator(PAD_ID, thought_weight=0.5)
    if not weighted:
        collator = _unweighted(collator)
    dataset = _Examples(4)  # lengths differ, so the micro-batches hold different token weights
    updates = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = _llama()
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        args = _args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                     max_grad_norm=0.0, lr_scheduler_type="constant")
        FusedLossTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
        updates.append({name: p.detach() - start[name] for name, p in model.named_parameters()})
    single, accumulated = updates
    assert any(u.abs().max() > 0 for u in single.values())
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_rejects_unknown_fused_loss_kwargs(tmp_path):
    with pytest.raises(TypeError, match="fused_loss_kwargs"):
        FusedLossTrainer(model=_llama(), args=_args(tmp_path), fused_loss_kwargs={"softcap": 3.0})


# ----------------------------------------------------------------------------- apply_fused_cross_entropy

def test_applied_fused_loss_and_grads_equal_the_models_own_and_generation_is_unchanged():
    model, reference = _llama(), _llama()
    inputs, labels, _ = _batch()
    prompt = inputs["input_ids"][:1, :5]
    generated = reference.generate(prompt, max_new_tokens=4, do_sample=False)
    expected = reference(**inputs, labels=labels, num_items_in_batch=50)
    expected.loss.backward()

    assert apply_fused_cross_entropy(apply_fused_cross_entropy(model)) is model  # idempotent
    assert model.forward.inner.__func__ is type(model).forward  # one wrapper, around the model's own forward
    output = model(**inputs, labels=labels, num_items_in_batch=50)
    assert output.logits is None  # no [tokens, vocab] logits in training
    output.loss.backward()
    torch.testing.assert_close(output.loss, expected.loss.detach(), rtol=1e-5, atol=1e-5)
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)

    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), generated)
    model.eval()  # evaluation: the model's own forward, logits and loss
    with torch.no_grad():
        own = model(**inputs, labels=labels, num_items_in_batch=50)
    torch.testing.assert_close(own.loss, expected.loss.detach(), rtol=1e-6, atol=1e-6)
    assert own.logits.shape == (*labels.shape, VOCAB)


def test_applied_fused_loss_honours_loss_weights_in_training_and_evaluation():
    model = apply_fused_cross_entropy(_llama(), z_loss=0.0)
    inputs, labels, weights = _batch()
    given = {**inputs, "labels": labels, "loss_weights": weights}
    trained = model(**given).loss
    torch.testing.assert_close(trained, fused_causal_lm_loss(model, given), rtol=0, atol=0)
    assert not torch.allclose(trained, model(**inputs, labels=labels).loss)
    model.eval()
    with torch.no_grad():
        evaluated = model(**given)
    expected = sparseft.cross_entropy(evaluated.logits, labels, loss_weights=weights, shift=True)
    torch.testing.assert_close(evaluated.loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(evaluated.loss, trained.detach(), rtol=1e-5, atol=1e-5)


def test_applied_fused_loss_trains_in_a_plain_trainer_with_loss_weights(tmp_path):
    model = apply_fused_cross_entropy(_llama())
    collator = ThoughtMaskCollator(PAD_ID, thought_weight=0.3)
    dataset = _Examples(16)
    probe = collator([dataset[i] for i in range(len(dataset))])
    head_calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_calls.append(output.shape[1]))

    def probe_loss():
        with torch.no_grad():
            return fused_causal_lm_loss(model, probe).item()

    before = probe_loss()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4, max_steps=12,
                                                           learning_rate=1e-2, per_device_eval_batch_size=16),
                                   train_dataset=dataset, eval_dataset=dataset, data_collator=collator)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch through the forward
    head_calls.clear()
    trainer.train()
    assert head_calls == [1] * 12  # the head ran on the last position only: no full logits
    after = probe_loss()
    assert after < 0.7 * before, (before, after)
    # The plain Trainer divides by its count of target tokens, not by their summed weight.
    targets = (probe["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        expected = fused_causal_lm_loss(model, probe, num_items_in_batch=targets).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: transformers.LlamaModel(_llama().config), id="no-head"),
    pytest.param(lambda: torch.nn.Linear(4, 4), id="not-a-causal-lm"),
])
def test_apply_fused_cross_entropy_names_a_model_without_a_linear_head(model):
    with pytest.raises(TypeError, match=r"apply_fused_cross_entropy: .*(LlamaModel|Linear)"):
        apply_fused_cross_entropy(model())


def test_apply_fused_cross_entropy_rejects_unknown_options():
    with pytest.raises(TypeError, match="softcap"):
        apply_fused_cross_entropy(_llama(), softcap=3.0)
