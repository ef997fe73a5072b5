"""Masked-loss cross-entropy: ``linear_cross_entropy`` (fused with the LM head, no
[tokens, vocab] logits) and ``cross_entropy`` (on given logits).

This module owns the public signature: argument checks, the causal shift, loss weights
and the reduction. The backends (``_ce_torch`` is their specification) see only 2-D
inputs and a per-row ``scale``; they are registered as torch custom ops so compiled
models treat them as opaque nodes.
"""

import importlib
import numbers
from typing import Optional

import torch
from torch import Tensor

from sparseft import _backends
from sparseft.ops._checks import check_values_enabled

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")


_MODULES = {"torch": "_ce_torch", "cpu": "_ce_native", "cuda": "_ce_native", "triton": "_ce_triton"}


def _implementation(backend):
    """The module with linear_ce / ce_forward / ce_backward for a backend (imported on first use)."""
    return importlib.import_module(f"sparseft.ops.{_MODULES[backend]}")


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("sparseft::linear_cross_entropy_rows", mutates_args=())
def _linear_ce_rows(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    scale: Tensor, label_smoothing: float, z_loss: float, softcap: float,
                    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, gh, gw, gb = _implementation(backend).linear_ce(
        hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
        need_grad_hidden, need_grad_weight, need_grad_bias)
    # Custom ops may not return one tensor twice: each missing gradient gets its own empty.
    return tuple(hidden.new_empty(0) if g is None else g for g in (loss, gh, gw, gb))


@_linear_ce_rows.register_fake
def _(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
      need_grad_hidden, need_grad_weight, need_grad_bias, backend):
    return (hidden.new_empty(hidden.shape[0], dtype=scale.dtype),
            torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_grad_bias else hidden.new_empty(0))


@torch.library.custom_op("sparseft::cross_entropy_forward", mutates_args=())
def _ce_forward(logits: Tensor, labels: Tensor, scale: Tensor, label_smoothing: float,
                z_loss: float, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    return _implementation(backend).ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap)


@_ce_forward.register_fake
def _(logits, labels, scale, label_smoothing, z_loss, softcap, backend):
    rows = logits.new_empty(logits.shape[0], dtype=scale.dtype)
    return rows, torch.empty_like(rows)


@torch.library.custom_op("sparseft::cross_entropy_backward", mutates_args=())
def _ce_backward(logits: Tensor, lse: Tensor, labels: Tensor, scale: Tensor, label_smoothing: float,
                 z_loss: float, softcap: float, backend: str) -> Tensor:
    return _implementation(backend).ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap)


@_ce_backward.register_fake
def _(logits, lse, labels, scale, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits)


# ----------------------------------------------------------------------------- autograd

class _LinearCrossEntropy(torch.autograd.Function):
    """Reduced losses get their gradients in the forward (6NDV FLOPs, backward only
    scales them); per-token losses recompute in the backward, where the per-token
    upstream gradient is known."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, token_weights, reduce, options, backend, grad_enabled):
        # needs_input_grad ignores torch.no_grad(): evaluation must not pay for gradients.
        needs = tuple(n and grad_enabled and reduce for n in ctx.needs_input_grad[:3])
        loss, gh, gw, gb = _linear_ce_rows(hidden, weight, bias, labels, scale, *options, *needs, backend)
        ctx.reduce = reduce
        if reduce:
            ctx.save_for_backward(gh, gw, gb)
            ctx.scaled = False
            return (scale * loss).sum()
        ctx.options, ctx.backend = options, backend
        ctx.save_for_backward(hidden, weight, bias, labels, token_weights)
        return token_weights * loss

    @staticmethod
    def backward(ctx, grad_loss):
        needs = ctx.needs_input_grad[:3]
        if ctx.reduce:
            # The gradients are this op's own buffers: scaling them in place saves a copy the
            # size of the weight, at the price of a single backward per forward.
            if ctx.scaled:
                raise RuntimeError("linear_cross_entropy computes its gradients in the forward and scales them "
                                   "in place: backward through it twice (retain_graph=True) is not supported")
            ctx.scaled = True
            grads = tuple(g.mul_(grad_loss) if need else None for g, need in zip(ctx.saved_tensors, needs))
        else:
            hidden, weight, bias, labels, token_weights = ctx.saved_tensors
            _, *grads = _linear_ce_rows(hidden, weight, bias, labels, token_weights * grad_loss,
                                        *ctx.options, *needs, ctx.backend)
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        return (*grads, None, None, None, None, None, None, None)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, scale, token_weights, reduce, options, backend):
        loss, lse = _ce_forward(logits, labels, scale, *options, backend)
        ctx.reduce, ctx.options, ctx.backend = reduce, options, backend
        ctx.save_for_backward(logits, lse, labels, scale if reduce else token_weights)
        return (scale * loss).sum() if reduce else token_weights * loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, labels, row_scale = ctx.saved_tensors
        grad = _ce_backward(logits, lse, labels, row_scale * grad_loss, *ctx.options, ctx.backend)
        return grad, None, None, None, None, None, None


# ----------------------------------------------------------------------------- argument checks

def _check_float(name, tensor):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64: torch backend, for "
                        f"gradcheck), got {tensor.dtype}")


def _check_common(labels, loss_weights, rows_shape, device, vocab, ignore_index, label_smoothing,
                  z_loss, softcap, reduction, num_items_in_batch, shift):
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"labels must have shape {tuple(rows_shape)} (the input without its last "
                         f"dimension), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the input is on {device}")
    if loss_weights is not None:
        _check_float("loss_weights", loss_weights)
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_weights must have the shape of labels {tuple(labels.shape)}, "
                             f"got {tuple(loss_weights.shape)}")
        if loss_weights.device != device:
            raise ValueError(f"loss_weights is on {loss_weights.device} but the input is on {device}")
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, numbers.Real) and 0.0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and 0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor, "
                                 f"got shape {tuple(num_items_in_batch.shape)}")
        elif not isinstance(num_items_in_batch, numbers.Real) or isinstance(num_items_in_batch, bool) \
                or not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be a number > 0 or a tensor, got {num_items_in_batch!r}")
    if shift and labels.dim() == 0:
        raise ValueError("shift=True needs labels with a sequence dimension")
    if check_values_enabled(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {first}")
        if loss_weights is not None:
            w = loss_weights.float()
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("loss_weights must be finite and >= 0")


# ----------------------------------------------------------------------------- shared preparation

def _prepare_rows(labels, loss_weights, ignore_index, reduction, num_items_in_batch, shift, device, dtype):
    """Flattens labels and weights (shifted when asked) and returns
    (labels int64 [N], token weights [N], row scale [N]), float32 (float64 for float64 inputs)."""
    if shift:
        pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
        if loss_weights is not None:
            loss_weights = torch.cat([loss_weights[..., 1:], loss_weights.new_zeros(pad.shape)], dim=-1)
    labels = labels.reshape(-1).long()
    active = labels != ignore_index
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = active.to(acc) if loss_weights is None else loss_weights.reshape(-1).to(acc) * active
    labels = torch.where(active, labels, torch.zeros_like(labels))
    if reduction == "mean":
        if num_items_in_batch is None:
            total = weights.sum()
        else:
            total = torch.as_tensor(num_items_in_batch, device=device).to(acc).reshape(())
        # No active token: the loss is 0 with zero gradients, not 0/0.
        scale = weights / torch.where(total > 0, total, torch.ones_like(total))
    else:
        scale = weights
    return labels, weights, scale


def _implemented_for(dtype):
    return ("torch",) if dtype == torch.float64 else _ALL_BACKENDS


def _options(label_smoothing, z_loss, softcap):
    return float(label_smoothing), float(z_loss), float(softcap or 0.0)


# ----------------------------------------------------------------------------- public ops

def linear_cross_entropy(hidden, weight, labels, bias=None, *, loss_weights=None, ignore_index=-100,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         num_items_in_batch=None, shift=False, backend=None):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising
    the [tokens, vocab] logits.

    hidden [..., D], weight [V, D], labels [...] (int), bias [V], loss_weights [...] (float,
    >= 0; 0 masks a token). ``z_loss`` adds z·lse² per token, ``softcap`` applies
    c·tanh(logits/c), ``shift=True`` predicts token t+1 from position t. ``reduction="mean"``
    divides by the summed weight of non-ignored tokens, or by ``num_items_in_batch``.
    Returns a float32 loss (shaped like labels for reduction="none").
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[-1]}] to match hidden [..., D], "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be a [{weight.shape[0]}] tensor of dtype {hidden.dtype} on "
                             f"{hidden.device}, got {tuple(bias.shape)} {bias.dtype} {bias.device}")
    _check_common(labels, loss_weights, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index,
                  label_smoothing, z_loss, softcap, reduction, num_items_in_batch, shift)
    chosen = _backends.resolve(hidden.device, _implemented_for(hidden.dtype), backend)

    rows_labels, token_weights, scale = _prepare_rows(labels, loss_weights, ignore_index, reduction,
                                                      num_items_in_batch, shift, hidden.device, hidden.dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    loss = _LinearCrossEntropy.apply(hidden2d, weight, bias, rows_labels, scale, token_weights,
                                     reduction != "none", _options(label_smoothing, z_loss, softcap), chosen,
                                     torch.is_grad_enabled())
    return loss.reshape(labels.shape) if reduction == "none" else loss


def cross_entropy(logits, labels, *, loss_weights=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  softcap=None, reduction="mean", num_items_in_batch=None, shift=False, backend=None):
    """Cross-entropy of logits [..., V] against labels [...], with the keywords of
    :func:`linear_cross_entropy`. The caller's logits are never overwritten; the backward
    keeps only a float32 log-sum-exp per token beside them."""
    _check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V]")
    _check_common(labels, loss_weights, logits.shape[:-1], logits.device, logits.shape[-1], ignore_index,
                  label_smoothing, z_loss, softcap, reduction, num_items_in_batch, shift)
    chosen = _backends.resolve(logits.device, _implemented_for(logits.dtype), backend)

    rows_labels, token_weights, scale = _prepare_rows(labels, loss_weights, ignore_index, reduction,
                                                      num_items_in_batch, shift, logits.device, logits.dtype)
    logits2d = logits.reshape(-1, logits.shape[-1])
    loss = _CrossEntropy.apply(logits2d, rows_labels, scale, token_weights, reduction != "none",
                               _options(label_smoothing, z_loss, softcap), chosen)
    return loss.reshape(labels.shape) if reduction == "none" else loss
