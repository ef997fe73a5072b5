"""Hugging Face transformers: the causal-LM loss through sparseft's fused linear
cross-entropy, with the ``loss_weights`` of :mod:`sparseft.data` collators.

``fused_causal_lm_loss(model, inputs)`` scores the decoder's last hidden state against the
output head's weight without materialising the [tokens, vocab] logits.
``apply_fused_cross_entropy(model)`` makes the model's own training forward compute its loss that
way, for a plain ``transformers.Trainer`` (or any loop calling ``model(**batch)``).
``FusedLossTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` uses it; it leaves the
model untouched and normalises by the summed loss weights (below), which a forward alone cannot.
``OwLoreCallback`` drives a ``sparseft.optim.OwLoreSampler`` from the Trainer's step count.

Normalisation in FusedLossTrainer: one optimizer step minimises
``sum_t w_t·ce_t / sum_t w_t`` over the target tokens t (labels != -100, after the causal
shift) of all its accumulated micro-batches, and of all processes when
``average_tokens_across_devices`` is on (the Trainer's default); ``w_t`` is the token's
loss weight, 1 without ``loss_weights``. Each micro-batch returns its share of that sum,
so gradient accumulation and the data-parallel split leave the update unchanged. Without
weights this is the Trainer's own token-count normalisation.
"""

import inspect
from collections.abc import Mapping

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparseft.ops import cross_entropy, linear_cross_entropy

__all__ = ["FusedLossTrainer", "OwLoreCallback", "apply_fused_cross_entropy", "fused_causal_lm_loss"]

IGNORE_INDEX = -100  # the Trainer's token count and linear_cross_entropy's default
_LOSS_OPTIONS = ("z_loss", "label_smoothing", "backend")
# Config fields of models that rescale the logits after the head (Cohere, Granite, ...):
# the fused loss would silently score unscaled logits.
_LOGIT_SCALINGS = ("logit_scale", "logits_scaling")
# Forward keywords that limit the head to the last positions (newer, older transformers).
_KEEP_KEYWORDS = ("logits_to_keep", "num_logits_to_keep")


def _unwrap(model):
    """The PreTrainedModel inside DDP / DeepSpeed (``.module``), torch.compile
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    while not isinstance(model, transformers.PreTrainedModel):
        get_base_model = getattr(model, "get_base_model", None)
        if callable(get_base_model):
            inner = get_base_model()
        else:
            inner = getattr(model, "_orig_mod", None)
            if inner is None:
                inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _parts(model):
    """(unwrapped model, decoder body, head, softcap), or TypeError naming what is missing."""
    core = _unwrap(model)
    name = type(core).__name__
    config = getattr(core, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"fused_causal_lm_loss supports decoder-only causal LMs; {name} is an encoder-decoder model")
    get_decoder = getattr(core, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(core, "model", None)
    get_head = getattr(core, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        head = getattr(core, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(decoder, nn.Module) or decoder is core:
        raise TypeError(f"fused_causal_lm_loss needs a *ForCausalLM model with a separate decoder body "
                        f"(get_decoder() or .model); {name} has none")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise TypeError(f"fused_causal_lm_loss needs a linear output head with a [vocab, hidden] weight "
                        f"(get_output_embeddings() or .lm_head); {name} has {type(head).__name__}")
    for field in _LOGIT_SCALINGS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            raise TypeError(f"{name} scales its logits after the head (config.{field}={value}); "
                            "fused_causal_lm_loss does not support that")
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return core, decoder, head, softcap


def _autocast_dtype(device):
    """The dtype autocast runs matmuls in on ``device`` right now, or None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _hidden_output(output):
    hidden = getattr(output, "last_hidden_state", None)
    return output[0] if hidden is None else hidden


def _last_hidden_state(model, core, decoder, inputs):
    """(decoder output for ``inputs``, the autocast dtype the model ran under or None).

    Where the forward can limit the head to the last position, the whole (possibly
    wrapped) model runs, so DDP, FSDP, DeepSpeed and accelerate's autocast see the forward,
    and a hook takes the decoder's output; otherwise the unwrapped decoder runs alone."""
    params = inspect.signature(core.forward).parameters
    keep = next((k for k in _KEEP_KEYWORDS if k in params), None)
    if keep is None:
        hidden = _hidden_output(decoder(**inputs))
        return hidden, _autocast_dtype(hidden.device)
    captured = []

    def capture(module, args, output):
        hidden = _hidden_output(output)
        captured.append((hidden, _autocast_dtype(hidden.device)))

    handle = decoder.register_forward_hook(capture)
    try:
        model(**{**inputs, keep: 1})  # [batch, 1, vocab] logits, discarded
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the decoder of {type(core).__name__} to run once per forward, "
                           f"it ran {len(captured)} times")
    return captured[0]


def fused_causal_lm_loss(model, inputs, num_items_in_batch=None, *, z_loss=0.0, label_smoothing=0.0, backend=None):
    """Causal-LM loss of a Hugging Face ``*ForCausalLM`` model without [tokens, vocab] logits.

    ``inputs`` is a batch as a model takes it plus ``labels`` (unshifted, -100 where
    untrained) and optionally ``loss_weights`` (aligned with labels, as the sparseft.data
    collators make them); every other key (attention_mask, position_ids, ...) goes to the
    model. The loss is ``sparseft.linear_cross_entropy`` of the decoder's last hidden state
    against the head (shift=True, the config's final_logit_softcapping applied), divided
    by the summed weight of the target tokens, or by ``num_items_in_batch`` when given.
    ``model`` may be wrapped (DDP, DeepSpeed, torch.compile, PEFT). ``inputs`` is not
    modified. Raises TypeError for models without a separable decoder and linear head.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of model inputs, got {type(inputs).__name__}")
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    loss_weights = inputs.pop("loss_weights", None)
    if labels is None:
        raise ValueError("inputs must hold 'labels' (token ids, -100 where untrained)")
    if "shift_labels" in inputs:
        raise ValueError("inputs hold 'shift_labels': fused_causal_lm_loss takes unshifted 'labels' and shifts them")
    core, decoder, head, softcap = _parts(model)
    hidden, autocast_dtype = _last_hidden_state(model, core, decoder, inputs)

    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.device)  # a model split over devices ends where its head lives
    # The head's matmul runs in the dtype it would have run in inside the model: autocast's,
    # else the activations'.
    dtype = autocast_dtype or hidden.dtype
    hidden = hidden.to(dtype)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return linear_cross_entropy(
        hidden, weight, labels.to(hidden.device), bias,
        loss_weights=None if loss_weights is None else loss_weights.to(hidden.device),
        shift=True, num_items_in_batch=num_items_in_batch, softcap=softcap,
        z_loss=z_loss, label_smoothing=label_smoothing, backend=backend)



class _FusedLossForward:
    """The forward :func:`apply_fused_cross_entropy` installs on a model instance. A callable
    object rather than a closure, so ``copy.deepcopy`` and pickling rebind it to the copy."""

    def __init__(self, model, inner, options):
        self.model, self.inner, self.options = model, inner, options
        signature = inspect.signature(inner)
        params = list(signature.parameters.values())
        self._positional = [p.name for p in params
                            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if "loss_weights" not in signature.parameters:  # so the Trainer keeps a dataset's loss_weights column
            extra = inspect.Parameter("loss_weights", inspect.Parameter.KEYWORD_ONLY, default=None)
            variadic = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
            params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD] + [extra] + variadic
        self.__signature__ = signature.replace(parameters=params)

    def __call__(self, *args, **kwargs):
        inputs = {**dict(zip(self._positional, args)), **kwargs}
        labels, loss_weights = inputs.get("labels"), inputs.pop("loss_weights", None)
        if labels is None:
            return self.inner(**inputs)
        num_items_in_batch = inputs.pop("num_items_in_batch", None)
        if self.model.training:
            loss = fused_causal_lm_loss(self.model, {**inputs, "loss_weights": loss_weights}, num_items_in_batch,
                                        **self.options)
            return CausalLMOutputWithPast(loss=loss)
        if loss_weights is None:  # evaluation: the model's own forward and loss, unchanged
            return self.inner(**inputs, **({} if num_items_in_batch is None else
                                           {"num_items_in_batch": num_items_in_batch}))
        output = self.inner(**{key: value for key, value in inputs.items() if key != "labels"})
        output.loss = cross_entropy(output.logits, labels.to(output.logits.device), shift=True,
                                    loss_weights=loss_weights.to(output.logits.device),
                                    num_items_in_batch=num_items_in_batch)
        return output


def apply_fused_cross_entropy(model, **loss_options):
    """Makes a Hugging Face causal LM with a linear head compute its *training* loss through
    :func:`fused_causal_lm_loss` (``linear_cross_entropy`` of the last hidden state, no
    [tokens, vocab] logits) and returns ``model``.

    The model instance's forward is replaced; in training mode (``model.train()``) a call with
    ``labels`` returns a ``CausalLMOutputWithPast`` holding only the loss, weighted by
    ``loss_weights`` when given and divided by ``num_items_in_batch`` when given (the plain
    Trainer passes its count of target tokens there; without it, by the summed weight of the
    batch's target tokens). Calls without labels (generation) and calls in eval mode (the
    Trainer's evaluation) run the model's own forward: logits as before, its own loss, or with
    ``loss_weights`` the weighted cross-entropy of those logits (``loss_options`` apply only in
    training). ``loss_options``: z_loss, label_smoothing, backend. Calling it again replaces the
    options and wraps nothing twice. ``model`` may be wrapped (DDP, torch.compile, PEFT): the
    inner ``PreTrainedModel`` is changed. TypeError, naming the model and its head, for a model
    without a separable decoder and linear head.
    """
    unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"apply_fused_cross_entropy accepts {_LOSS_OPTIONS}, got unknown {unknown}")
    try:
        core = _parts(model)[0]
    except TypeError as exc:
        raise TypeError(f"apply_fused_cross_entropy: {exc}") from None
    installed = core.__dict__.get("forward")
    if isinstance(installed, _FusedLossForward):
        installed.options = dict(loss_options)
    else:
        core.forward = _FusedLossForward(core, core.forward, dict(loss_options))
    return model

def _target_weight(batch):
    """Summed weight of a batch's target tokens after the causal shift (their count without weights)."""
    labels = batch["labels"][..., 1:]
    active = labels != IGNORE_INDEX
    weights = batch.get("loss_weights")
    if weights is None:
        return active.sum()
    return (weights[..., 1:].float() * active).sum()


class FusedLossTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` computing the causal-LM loss with
    :func:`fused_causal_lm_loss`, weighted by the batch's ``loss_weights`` when present.

    ``fused_loss_kwargs`` may set ``z_loss``, ``label_smoothing`` (default:
    ``args.label_smoothing_factor``) and ``backend``. The loss is normalised over the whole
    optimizer step (see the module docstring). With ``return_outputs`` the outputs hold only
    the loss: no logits exist, so evaluation metrics on predictions are not available.
    Labels use -100 as the ignored value. Not supported: ``compute_loss_func``,
    DataParallel (several GPUs in one process: launch one process per GPU instead), and
    tensor / context / sequence parallelism.
    """

    def __init__(self, *args, fused_loss_kwargs=None, **kwargs):
        if not hasattr(transformers.Trainer, "_get_num_items_in_batch"):
            raise RuntimeError("FusedLossTrainer needs a transformers version whose Trainer counts target tokens "
                               f"in _get_num_items_in_batch (5.x); found {transformers.__version__}")
        options = dict(fused_loss_kwargs or {})
        unknown = sorted(set(options) - set(_LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"fused_loss_kwargs accepts {_LOSS_OPTIONS}, got unknown {unknown}")
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None:
            raise ValueError("FusedLossTrainer computes the loss itself: do not pass compute_loss_func")
        if self.args.n_gpu > 1:
            raise ValueError("FusedLossTrainer does not support DataParallel (several GPUs in one process); "
                             "launch one process per GPU (torchrun or accelerate launch)")
        for kind in ("tp", "cp", "sp"):
            size = getattr(self, f"get_{kind}_size", lambda: 1)()
            if size > 1:
                raise ValueError(f"FusedLossTrainer does not support {kind} size {size} > 1")
        options.setdefault("label_smoothing", self.args.label_smoothing_factor)
        self.fused_loss_kwargs = options
        self.label_smoother = None  # label smoothing happens inside the fused loss
        # compute_loss takes num_items_in_batch: the Trainer then counts every step's target
        # tokens (see _get_num_items_in_batch) and does not divide the loss again by the
        # accumulation steps.
        self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples, device):
        """The normaliser of one optimizer step: the summed loss weight of all target tokens
        of its micro-batches (their count without weights), over all processes when
        ``average_tokens_across_devices``. Also called per batch in evaluation."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(_target_weight(batch) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.to(device)).sum()
        return total.to(device)

    def _set_signature_columns_if_needed(self):
        # Keeps a dataset's loss_weights column when remove_unused_columns drops what the
        # model's forward does not take.
        super()._set_signature_columns_if_needed()
        if "loss_weights" not in self._signature_columns:
            self._signature_columns.append("loss_weights")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = fused_causal_lm_loss(model, inputs, num_items_in_batch, **self.fused_loss_kwargs)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # The normaliser counts every process's tokens while DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss


class OwLoreCallback(transformers.TrainerCallback):
    """Activates the blocks an OwLoreSampler draws for each optimizer step, from
    ``state.global_step`` (so a resumed Trainer re-derives the active blocks), and frees the
    optimizer state of the blocks it deactivates. Nothing is frozen before the first step, so
    the optimizer the Trainer creates holds every block's parameters."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.sampler.activate(state.global_step, optimizer)
