"""Regularized Mask Tuning (R-AMT; Zheng et al., "Regularized Mask Tuning: Uncovering Hidden
Knowledge in Pre-trained Vision-Language Models", ICCV 2023) for the Linear layers of any model.

The pretrained weights stay frozen; training learns which of the selected entries to switch off.

Masked weight. Each selected entry k of a weight W gets a real-valued score s_k (init 1e-2, a
float32 Parameter of shape [nnz], so memory follows the selection). The forward uses

    m_k = 1[s_k > threshold]   (threshold 5e-3),      W' = W with W'_k = W_k * m_k,
    y   = x W'^T + b

and the backward passes the mask's gradient straight through the threshold:

    dL/ds_k := dL/dm_k = (dL/dW')_k * W_k = (dy^T x)_k * W_k

computed at the selection only (``sparseft.ops.sampled_grad``, or a dense GEMM and a gather once
the selection is dense enough, as ``SparseLinear`` decides), never as a dense float32 weight
gradient kept beyond the layer's backward. Entries outside the selection keep m = 1.

Regularisers, as in the authors' code (github.com/wuw2019/R-AMT, trainers/masktuning.py):

* :func:`ramt_penalty` -- ``weight * sum_layers ||s_layer||_2`` (the un-squared L2 norm of each
  layer's scores; default weight 1e-4), added to the task loss.
* gradient dropout (:func:`gradient_dropout`, :func:`ramt_backward`). With a = grad of the task
  loss (penalty included) and b = grad of the distillation loss :func:`ramt_kl` to the frozen
  model's predictions, per score entry

      P = (sign(a) * (a + b) / (|a| + |b| + eps) + 1) / 2,      U ~ Uniform[0, 1),  eps = 1e-8
      g = a * ((1 - strength) + strength * 1[P > U])

  So the KL gradient is never applied itself: it decides whether the task gradient survives.
  Where a and b agree in sign P = 1 and a is kept; where they conflict P = |a| / (|a| + |b|), so
  the task gradient is dropped (``strength`` = 1, the default) or scaled by 1 - strength with
  probability |b| / (|a| + |b|): the more a step would move away from the frozen model's
  predictions, the likelier it is dropped.
* :func:`ramt_kl` -- T^2 * KL(softmax(teacher / T) || softmax(student / T)), T = 1 by default,
  averaged over positions; the teacher is the frozen model, i.e. this model with every mask
  at 1 (:func:`ramt_unmasked`), so no second copy of the weights is needed. (The authors' loss is
  the soft cross-entropy, which differs from this KL by the teacher's entropy, a constant: same
  gradient. Their option to mix student logits into the teacher's is left out; its default is off.)

The authors train the scores with Adam at lr 8e-5 and no weight decay: a score then needs
about 60 steps of one sign to cross from 1e-2 to the threshold.

``ramt(model, ...)`` swaps the selected nn.Linear layers for :class:`RAMTLinear` and freezes every
other parameter; ``ramt_merge(model)`` bakes the binary masks into plain nn.Linear weights.
"""

import contextlib
import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from sparseft.masks._validate import mask_dtype, validate_mask
from sparseft.masks.targets import select_targets
from sparseft.ops.sampled_grad import DENSE_GEMM_MIN_DENSITY, resolve_backend, sampled_grad_2d
from sparseft.sparse_linear import _compute_dtype, _gemm_then_gather, _parent_and_child, replace_with_linear

__all__ = ["RAMTLinear", "ramt", "ramt_merge", "ramt_penalty", "ramt_kl", "ramt_unmasked", "gradient_dropout",
           "ramt_backward", "ramt_mask_counts", "DEFAULT_INIT", "DEFAULT_THRESHOLD", "DEFAULT_PENALTY"]

DEFAULT_INIT = 1e-2
DEFAULT_THRESHOLD = 5e-3
DEFAULT_PENALTY = 1e-4


def _masked_weight(weight, indices, keep, dtype):
    """A new [out, in] tensor: ``weight`` in ``dtype`` with the selected entries multiplied by ``keep``."""
    if indices.numel() == weight.numel():  # the whole layer is selected: indices are 0..numel-1
        return weight.to(dtype) * keep.view(weight.shape)
    masked = weight.to(dtype, copy=True)
    flat = masked.view(-1)
    flat[indices] = flat[indices] * keep  # no boolean indexing: it would synchronise with the host
    return masked


class _MaskedLinearFunction(torch.autograd.Function):
    """y = x W'^T + b with W' the masked weight; straight-through gradient for the scores.
    W' is rebuilt in the backward instead of saved, so a layer holds no weight copy between passes."""

    @staticmethod
    def forward(ctx, x, weight, scores, bias, indices, threshold, backend, dense_gemm):
        dtype = _compute_dtype(x)
        x_c = x.to(dtype)
        keep = scores.detach() > threshold
        b_c = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x_c, _masked_weight(weight, indices, keep, dtype), b_c)
        ctx.save_for_backward(x_c, weight, keep, indices)
        ctx.x_dtype, ctx.scores_dtype, ctx.backend, ctx.dense_gemm = x.dtype, scores.dtype, backend, dense_gemm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, keep, indices = ctx.saved_tensors
        need_x, _, need_scores, need_bias = ctx.needs_input_grad[:4]
        dy = grad_out.to(x_c.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = grad_scores = grad_bias = None
        if need_x:
            masked = _masked_weight(weight, indices, keep, dy.dtype)
            grad_x = (dy @ masked).reshape(x_c.shape).to(ctx.x_dtype)
        if need_scores:
            x_2d = x_c.reshape(-1, x_c.shape[-1])
            grad_masked = (_gemm_then_gather(dy, x_2d, indices) if ctx.dense_gemm
                           else sampled_grad_2d(dy, x_2d, indices, ctx.backend))
            grad_scores = (grad_masked * weight.view(-1)[indices].float()).to(ctx.scores_dtype)
        if need_bias:
            grad_bias = dy.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_scores, grad_bias, None, None, None, None


def _check_real(name, value, positive=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


class RAMTLinear(nn.Module):
    """An nn.Linear whose frozen ``weight`` is masked at ``score_indices`` by
    ``1[scores > threshold]`` (see the module docstring). ``scores`` (float32 [nnz]) is the only
    trainable tensor; state dict keys are ``weight``, ``bias``, ``score_indices`` and ``scores``.
    ``masking = False`` computes with the unmasked weight, i.e. as the frozen model. ``threshold``
    is a plain attribute (not in the state dict): rebuild with the same ``ramt(...)`` call before
    loading a checkpoint."""

    def __init__(self, weight, bias, indices, init=DEFAULT_INIT, threshold=DEFAULT_THRESHOLD, backend=None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], "
                             f"got {getattr(weight, 'shape', type(weight).__name__)}")
        validate_mask(indices, weight.numel(), "indices")
        _check_real("init", init)
        _check_real("threshold", threshold)
        self.out_features, self.in_features = weight.shape
        self.threshold = float(threshold)
        self.backend = backend
        self.dense_gemm_min_density = None  # None: the backend's DENSE_GEMM_MIN_DENSITY
        self.masking = True
        self._weight_requires_grad = weight.requires_grad
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.register_buffer("score_indices", indices.to(weight.device))
        self.scores = nn.Parameter(torch.full((indices.numel(),), float(init), dtype=torch.float32,
                                              device=weight.device))

    @classmethod
    def from_linear(cls, linear, indices=None, **options):
        """Wraps ``linear``'s own weight and bias Parameters (no copy); ``indices`` None selects
        every entry. ``options``: init, threshold, backend."""
        if indices is None:
            indices = torch.arange(linear.weight.numel(), dtype=mask_dtype(linear.weight.numel()),
                                   device=linear.weight.device)
        return cls(linear.weight, linear.bias, indices, **options)

    def binary_mask(self):
        """bool [nnz]: which selected entries are kept."""
        return self.scores.detach() > self.threshold

    @torch.no_grad()
    def masked_weight(self):
        """The dense weight the forward uses, W ⊙ mask, as a new tensor."""
        return _masked_weight(self.weight, self.score_indices, self.binary_mask(), self.weight.dtype)

    def to_linear(self):
        """An nn.Linear with the masked weight (a new Parameter) and this module's bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.masked_weight(), requires_grad=self._weight_requires_grad)
        linear.bias = self.bias
        return linear

    def uses_dense_gemm(self, backend):
        threshold = self.dense_gemm_min_density
        if threshold is None:
            threshold = DENSE_GEMM_MIN_DENSITY[backend]
        return self.score_indices.numel() >= threshold * self.weight.numel()

    def forward(self, x):
        if not self.masking:
            return F.linear(x, self.weight, self.bias)
        backend = resolve_backend(x.device, self.backend)
        return _MaskedLinearFunction.apply(x, self.weight, self.scores, self.bias, self.score_indices,
                                           self.threshold, backend, self.uses_dense_gemm(backend))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.score_indices.numel()}, threshold={self.threshold}")


def _ramt_layers(model):
    layers = [m for m in model.modules() if isinstance(m, RAMTLinear)]
    if not layers:
        raise ValueError("model has no RAMTLinear layers; call sparseft.ramt.ramt(model) first")
    return layers


def _selection(model, masks, targets):
    """{parameter name: indices or None (every entry)} from ``masks`` or ``targets``."""
    if masks is not None and targets is not None:
        raise ValueError("pass masks (the entries to score) or targets (whole layers), not both")
    if masks is None:
        return dict.fromkeys(select_targets(model, "all-linear" if targets is None else targets))
    if not hasattr(masks, "items"):
        raise TypeError(f"masks must be a dict of parameter name -> indices, got {type(masks).__name__}")
    return dict(masks.items())


def _plan(model, selection):
    """[(module name, nn.Linear, indices)] after checking every name and mask."""
    modules = dict(model.named_modules())
    owners = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)
    problems, plan = [], []
    for name, indices in selection.items():
        module_name, dot, leaf = name.rpartition(".")
        module = modules.get(module_name) if dot else None
        if leaf != "weight" or module is None:
            problems.append(f"{name} (not '<module>.weight' of this model)")
        elif type(module) is not nn.Linear:
            problems.append(f"{name} (a {type(module).__name__}, not a plain nn.Linear)")
        elif len(owners.get(id(module.weight), ())) > 1:
            problems.append(f"{name} (tied with {', '.join(n for n in owners[id(module.weight)] if n != name)})")
        else:
            plan.append((module_name, module, indices))
    if problems:
        raise ValueError(f"masks/targets name weights R-AMT cannot wrap: {problems}")
    for module_name, module, indices in plan:
        if indices is not None:
            validate_mask(indices, module.weight.numel(), module_name + ".weight")
    return plan


def ramt(model, masks=None, targets=None, init=DEFAULT_INIT, threshold=DEFAULT_THRESHOLD, backend=None):
    """Prepares ``model`` in place for Regularized Mask Tuning and returns it.

    Which entries get a score: ``masks`` maps ``"<module>.weight"`` names of nn.Linear layers to
    masks (sorted unique flat indices, e.g. a sparseft.masks.MaskSet, as the paper first picks
    the task-relevant entries), or ``targets`` names whole layers (regexes or "all-linear",
    resolved by sparseft.masks.select_targets; embeddings, head, norms excluded). With neither,
    every entry of every Linear layer but the head is scored.

    Each selected layer becomes a :class:`RAMTLinear` with scores at ``init`` (1e-2) and mask
    threshold ``threshold`` (5e-3); every other parameter is frozen, so
    ``[p for p in model.parameters() if p.requires_grad]`` is the scores. Every name and mask is
    checked before anything changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_real("init", init)
    _check_real("threshold", threshold)
    plan = _plan(model, _selection(model, masks, targets))
    for param in model.parameters():
        param.requires_grad_(False)
    for module_name, module, indices in plan:
        parent, child = _parent_and_child(model, module_name)
        setattr(parent, child, RAMTLinear.from_linear(module, indices, init=init, threshold=threshold,
                                                      backend=backend))
    return model


def ramt_merge(model):
    """Replaces, in place, every :class:`RAMTLinear` by an nn.Linear holding its masked weight
    W ⊙ mask (a new tensor; the original weight is not written) and its bias. Returns ``model``."""
    return replace_with_linear(model, RAMTLinear, "ramt_merge")


def ramt_penalty(model, weight=DEFAULT_PENALTY):
    """``weight * sum over RAMTLinear layers of ||scores||_2`` (float32 scalar), the authors'
    mask regulariser (un-squared L2 norm per layer); add it to the task loss."""
    _check_real("weight", weight)
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    norms = [torch.linalg.vector_norm(layer.scores.float()) for layer in _ramt_layers(model)]
    return weight * torch.stack(norms).sum()


@contextlib.contextmanager
def ramt_unmasked(model):
    """Within the block every RAMTLinear computes with its unmasked weight: ``model`` is then the
    frozen pretrained model, the teacher of :func:`ramt_kl` (call it under ``torch.no_grad()``)."""
    layers = _ramt_layers(model)
    before = [layer.masking for layer in layers]
    for layer in layers:
        layer.masking = False
    try:
        yield model
    finally:
        for layer, masking in zip(layers, before):
            layer.masking = masking


def ramt_kl(student_logits, teacher, temperature=1.0, weights=None):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position, averaged over the
    positions (weighted by ``weights`` [...], e.g. an attention mask, when given), in float32.

    ``teacher``: the frozen model's logits (same shape as ``student_logits`` [..., vocab]) or a
    callable returning them, called under ``torch.no_grad()``, e.g. (no second model needed)::

        def teacher():
            with ramt_unmasked(model):
                return model(**batch).logits

    The teacher is detached. Both log-softmaxes are materialised ([positions, vocab] float32):
    pass the logits of the positions that matter when the vocabulary is large."""
    _check_real("temperature", temperature, positive=True)
    if callable(teacher):
        with torch.no_grad():
            teacher = teacher()
    for name, tensor in (("student_logits", student_logits), ("teacher", teacher)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 1:
            raise TypeError(f"{name} must be a floating-point tensor of logits [..., vocab], "
                            f"got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits must have the student's shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher.shape)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    if weights is None:
        return per_position.mean()
    if not isinstance(weights, torch.Tensor) or weights.shape != per_position.shape:
        raise ValueError(f"weights must be a tensor of shape {tuple(per_position.shape)} (the logits' "
                         f"leading dims), got {getattr(weights, 'shape', type(weights).__name__)}")
    weights = weights.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _check_strength(strength):
    _check_real("strength", strength)
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")


def gradient_dropout(task_grad, kl_grad, strength=1.0, generator=None, eps=1e-8):
    """R-AMT's gradient dropout of one tensor (formula in the module docstring): the task
    gradient where ``1[P > U]`` keeps it, ``(1 - strength)`` times it elsewhere. ``generator``
    (on the gradients' device) makes the draw of U reproducible."""
    _check_strength(strength)
    if not isinstance(task_grad, torch.Tensor) or not isinstance(kl_grad, torch.Tensor):
        raise TypeError("task_grad and kl_grad must be tensors")
    if task_grad.shape != kl_grad.shape:
        raise ValueError(f"kl_grad must have task_grad's shape {tuple(task_grad.shape)}, got {tuple(kl_grad.shape)}")
    a, b = task_grad.float(), kl_grad.float()
    keep_probability = (torch.sign(a) * (a + b) / (a.abs() + b.abs() + eps) + 1) / 2
    uniform = torch.rand(a.shape, generator=generator, device=a.device)
    factor = (1 - strength) + strength * (keep_probability > uniform).float()
    return (a * factor).to(task_grad.dtype)


def ramt_backward(model, task_loss, kl_loss, strength=1.0, generator=None):
    """Backward of R-AMT's regularised objective for every trainable parameter of ``model``: the
    gradients of ``kl_loss`` (:func:`ramt_kl`) and of ``task_loss`` (task loss + :func:`ramt_penalty`)
    are taken separately and combined by :func:`gradient_dropout`; the result is added to
    ``.grad`` (so micro-batches accumulate, each with its own dropout draw). A parameter the KL
    does not reach gets its task gradient unchanged. Call instead of ``task_loss.backward()``."""
    _check_strength(strength)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; call sparseft.ramt.ramt(model) first")
    kl_grads = torch.autograd.grad(kl_loss, params, retain_graph=True, allow_unused=True)
    task_grads = torch.autograd.grad(task_loss, params, allow_unused=True)
    for param, task_grad, kl_grad in zip(params, task_grads, kl_grads):
        if task_grad is None:
            continue
        grad = task_grad if kl_grad is None else gradient_dropout(task_grad, kl_grad, strength, generator)
        param.grad = grad if param.grad is None else param.grad + grad


def ramt_mask_counts(model):
    """{"selected": scored entries, "masked": those whose mask is 0} over all RAMTLinear layers."""
    layers = _ramt_layers(model)
    masked = sum((~layer.binary_mask()).sum() for layer in layers)
    return {"selected": sum(layer.scores.numel() for layer in layers), "masked": int(masked)}
