"""Linear layers trained only at a mask, without dense weight gradients.

``sparsify(model, masks)`` swaps each targeted ``nn.Linear`` for a :class:`SparseLinear`:

* ``weight``         the dense nn.Parameter, ``requires_grad=False``, always holding the current
                     values (state_dict keys stay ``<name>.weight``);
* ``weight_indices`` buffer: the mask (sorted unique flat indices into ``weight.view(-1)``);
* ``weight_values``  nn.Parameter [nnz], ``requires_grad=True``, equal to
                     ``weight.view(-1)[weight_indices]``; after backward its ``.grad`` is the
                     compact weight gradient. It carries ``_sparseft_module`` (this module) so
                     ``sparseft.optim.SparseAdamW`` updates the values and scatters them into
                     ``weight`` in one kernel. Any other writer of the values must do the same.

Backward computes grad_input densely and the weight gradient only at the mask: below the
density where it stops paying (measured per backend, ``DENSE_GEMM_MIN_DENSITY``) with the
sampled kernel (``sparseft.ops.sampled_grad``), which forms no dense weight gradient at all;
from there on with a dense GEMM into a temporary [out, in] float32 gradient, freed after a
gather (none for a full mask), so a dense mask costs what a dense layer does. Gradients of
several backward passes accumulate in ``weight_values.grad`` as usual.

Under FSDP2 (``fully_shard`` after ``sparsify``, then the optimizer) both Parameters are sharded
on dim 0 like any other: the frozen ``weight`` rows and the compact ``weight_values`` entries
(``weight_indices`` is a buffer, kept whole on every rank). The sharded ``weight`` then keeps the
weights as they were at sharding, the trained entries live in ``weight_values`` alone, and each
forward and backward writes the all-gathered values into the all-gathered weight before using
it (``values_in_forward``, set by SparseAdamW when it finds the values sharded). So per rank a
layer costs 1/world of the dense weight, of the values and of their optimizer state, plus the
indices; what is all-gathered per use is the weight and the values, and the compact gradient
is reduce-scattered. ``SparseDelta``/``unsparsify`` of the gathered module give the trained
weights.

Dtypes. Without autocast every tensor keeps the layer's dtype. Under ``torch.autocast`` with
dtype ``c`` (e.g. bf16 on CPU): input, weight and bias are cast to ``c`` for the forward GEMM,
the output is ``c``, the saved input is the ``c`` copy (as nn.Linear under autocast);
grad_input is computed in ``c`` and returned in the input's dtype; the values' gradient is
accumulated in float32 from ``c`` operands and stored in the values' dtype; grad_bias is
summed in float32 and stored in the bias dtype.
"""

import weakref

import torch
from torch import nn

from sparseft.masks._validate import validate_mask
from sparseft.masks.targets import compile_patterns
from sparseft.ops.sampled_grad import DENSE_GEMM_MIN_DENSITY, resolve_backend, sampled_grad_2d


def _compute_dtype(x):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _gemm_then_gather(dy, x, indices):
    """The sampled gradient (float32 accumulation and result) through a dense GEMM into a
    temporary [out, in] gradient, gathered at the mask; a full mask is all of it."""
    with torch.autocast(dy.device.type, enabled=False):
        full = torch.mm(dy.t().float(), x.float()).view(-1)
    return full if indices.numel() == full.numel() else full[indices]


class _SparseLinearFunction(torch.autograd.Function):
    """out = x @ weight^T + bias; gradients for x, the values (compact) and the bias.
    ``values`` enters only so autograd routes its gradient; ``weight`` holds the same numbers.
    ``dense_gemm`` picks how the values' gradient is computed (see SparseLinear.uses_dense_gemm)."""

    @staticmethod
    def forward(ctx, x, weight, values, bias, indices, backend, dense_gemm, values_in_weight):
        if values_in_weight:
            _write_values(weight, values, indices)
        dtype = _compute_dtype(x)
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = nn.functional.linear(x_c, w_c, b_c)
        ctx.save_for_backward(x_c, weight, indices, values if values_in_weight else None)
        ctx.values_in_weight = values_in_weight
        ctx.x_dtype, ctx.values_dtype, ctx.backend, ctx.dense_gemm = x.dtype, values.dtype, backend, dense_gemm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, indices, values = ctx.saved_tensors
        if ctx.values_in_weight:  # FSDP2 gathers the weight afresh for backward
            _write_values(weight, values, indices)
        need_x, _, need_values, need_bias = ctx.needs_input_grad[:4]
        dy = grad_out.to(x_c.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = grad_bias = None
        if need_x:
            grad_x = (dy @ weight.to(dy.dtype)).reshape(x_c.shape).to(ctx.x_dtype)
        if need_values:
            x_2d = x_c.reshape(-1, x_c.shape[-1])
            grad_values = (_gemm_then_gather(dy, x_2d, indices) if ctx.dense_gemm
                           else sampled_grad_2d(dy, x_2d, indices, ctx.backend)).to(ctx.values_dtype)
        if need_bias:
            grad_bias = dy.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_values, grad_bias, None, None, None, None


def _write_values(weight, values, indices):
    with torch.no_grad():
        weight.view(-1).index_copy_(0, indices.long(), values.detach().to(weight.dtype))


_LIVE = weakref.WeakSet()  # every SparseLinear, to find the module of a values Parameter FSDP2 replaced


def module_of_values(param):
    """The SparseLinear whose ``weight_values`` is ``param``, or None. Parameters lose their
    attributes when a wrapper (FSDP2) replaces them; the lookup re-tags them."""
    module = getattr(param, "_sparseft_module", None)
    if module is not None or type(param) is nn.Parameter or not isinstance(param, nn.Parameter):
        return module  # only a wrapper's replacement (a DTensor Parameter) loses the tag
    for candidate in list(_LIVE):
        if candidate._parameters.get("weight_values") is param:
            param._sparseft_module = candidate
            return candidate
    return None


class SparseLinear(nn.Module):
    """An nn.Linear whose weight trains only at ``weight_indices`` (see the module docstring).
    Build it with :meth:`from_linear` or :func:`sparsify`. ``dense_gemm_min_density`` (None: the
    backend's ``DENSE_GEMM_MIN_DENSITY``) is the mask density from which the values' gradient
    takes the dense GEMM instead of the sampled kernel."""

    def __init__(self, weight, bias, indices, backend=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.dense_gemm_min_density = None
        self.values_in_forward = False
        self._weight_requires_grad = weight.requires_grad
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.register_buffer("weight_indices", indices.to(weight.device))
        self.weight_values = nn.Parameter(weight.detach().view(-1)[self.weight_indices].clone())
        self.weight_values._sparseft_module = self
        self.register_load_state_dict_post_hook(SparseLinear._after_load)
        _LIVE.add(self)

    @classmethod
    def from_linear(cls, linear, indices, backend=None):
        """Wraps ``linear``'s own weight and bias Parameters (no copy)."""
        return cls(linear.weight, linear.bias, indices, backend)

    def to_linear(self):
        """An nn.Linear holding this module's weight and bias Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        self.weight.requires_grad_(self._weight_requires_grad)
        return linear

    def uses_dense_gemm(self, backend):
        """Whether the values' gradient takes the dense GEMM on ``backend``: fixed by the mask's
        density (metadata only, no data read), so once per layer and mask."""
        threshold = self.dense_gemm_min_density
        if threshold is None:
            threshold = DENSE_GEMM_MIN_DENSITY[backend]
        return self.weight_indices.numel() >= threshold * self.weight.numel()

    def forward(self, x):
        backend = resolve_backend(x.device, self.backend)
        return _SparseLinearFunction.apply(x, self.weight, self.weight_values, self.bias, self.weight_indices,
                                           backend, self.uses_dense_gemm(backend), self.values_in_forward)

    @torch.no_grad()
    def reindex_(self, new_indices):
        """Moves the mask to ``new_indices``: the buffer is replaced and ``weight_values.data``
        becomes ``weight.view(-1)[new_indices]`` (same Parameter object). A pending gradient of
        the old mask no longer lines up with the values and is dropped."""
        validate_mask(new_indices, self.weight.numel(), "new_indices")
        self.weight_indices = new_indices.to(self.weight.device)
        self.weight_values.data = self.weight.view(-1)[self.weight_indices].clone()
        self.weight_values.grad = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold another mask: adopt it first so the values' shape matches.
        indices = state_dict.get(prefix + "weight_indices")
        if isinstance(indices, torch.Tensor) and not torch.equal(indices.to(self.weight_indices.device),
                                                                 self.weight_indices):
            self.reindex_(indices)
        self._values_loaded = prefix + "weight_values" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _after_load(module, incompatible_keys):
        # Saved values win at the mask: a checkpoint written under FSDP2 holds the trained entries
        # in weight_values only. A plain nn.Linear state dict (no values, no indices) loads too:
        # the values then follow the weight, and the current mask is kept. Sharded (FSDP2), the
        # values and the weight stay apart, as in training.
        if not module.values_in_forward:
            with torch.no_grad():
                if getattr(module, "_values_loaded", False):
                    _write_values(module.weight, module.weight_values, module.weight_indices)
                else:
                    module.weight_values.copy_(module.weight.view(-1)[module.weight_indices])
        module.weight_values._sparseft_module = module  # load_state_dict(assign=True) makes a new Parameter
        derived = {"weight_values", "weight_indices"}
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                             if k.rsplit(".", 1)[-1] not in derived]

    def __setstate__(self, state):
        # deepcopy and pickling rebuild Parameters without their attributes.
        super().__setstate__(state)
        self.__dict__.setdefault("values_in_forward", False)
        self.weight_values._sparseft_module = self
        _LIVE.add(self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.weight_indices.numel()}")


def _parent_and_child(model, module_name):
    parent_name, _, child = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def sparsify(model, masks, backend=None, train=None):
    """Replaces, in place, each ``nn.Linear`` named ``n`` with ``n + ".weight"`` in ``masks``
    by a :class:`SparseLinear` trained at that mask; already sparsified modules are re-indexed.
    ``masks`` maps parameter names to masks (e.g. a sparseft.masks.MaskSet).

    Afterwards only the masked entries train, as in LIFT and SaRA: the ``weight_values`` of every
    SparseLinear in the model require grad and every other parameter (embeddings, head, norms,
    biases, unmasked layers) is frozen, unless its name matches a regex of ``train`` (one or a
    list, matched with ``re.search``): ``train=r"norm"`` also trains the norms densely, which
    ``SparseAdamW`` does for a trainable parameter without a mask. So
    ``[p for p in model.parameters() if p.requires_grad]`` is what the optimizer needs. The dense
    ``weight`` of a SparseLinear never trains. Every name, mask and pattern is checked before
    anything changes. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(masks, "items"):
        raise TypeError(f"masks must be a dict of parameter name -> indices, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    owners = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)
    unknown, not_linear, shared, targets = [], [], [], []
    for name, indices in masks.items():
        module_name, dot, leaf = name.rpartition(".")
        module = modules.get(module_name) if dot else None
        if leaf != "weight" or module is None:
            unknown.append(name)
        elif type(module) not in (nn.Linear, SparseLinear):
            not_linear.append(f"{name} ({type(module).__name__})")
        elif len(owners.get(id(module.weight), ())) > 1:
            shared.append(f"{name} (also {', '.join(n for n in owners[id(module.weight)] if n != name)})")
        else:
            targets.append((module_name, module, indices))
    if unknown:
        raise ValueError(f"masks name parameters that are not '<module>.weight' of this model: {unknown}")
    if not_linear:
        raise ValueError(f"masks name weights of modules that are not plain nn.Linear: {not_linear}")
    if shared:
        raise ValueError(f"masks name tied weights, which cannot be sparsified: {shared}")
    for module_name, module, indices in targets:
        validate_mask(indices, module.weight.numel(), module_name + ".weight")
    kept = _densely_trained(model, train, sparse={id(module) for _, module, _ in targets})
    # Frozen before wrapping, so a weight unsparsify hands back stays frozen like the rest.
    for param in model.parameters():
        param.requires_grad_(id(param) in kept)
    for module_name, module, indices in targets:
        if isinstance(module, SparseLinear):
            module.reindex_(indices)
            if backend is not None:
                module.backend = backend
        else:
            parent, child = _parent_and_child(model, module_name)
            setattr(parent, child, SparseLinear.from_linear(module, indices, backend))
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.weight_values.requires_grad_(True)
    return model


def _densely_trained(model, train, sparse):
    """ids of the parameters whose names match a ``train`` pattern, leaving out the weights and
    values of SparseLinear modules and of the ``sparse`` modules about to become ones."""
    if train is None:
        return set()
    patterns = compile_patterns(train, "train")
    sparse_params = {id(p) for module in model.modules()
                     if isinstance(module, SparseLinear) or id(module) in sparse
                     for p in (module.weight, getattr(module, "weight_values", None)) if p is not None}
    named = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if id(p) not in sparse_params]
    kept = set()
    for pattern in patterns:
        matched = {id(p) for name, p in named if pattern.search(name)}
        if not matched:
            raise ValueError(f"train: {pattern.pattern!r} matches no parameter outside the sparsified weights")
        kept |= matched
    return kept


def unsparsify(model):
    """Replaces, in place, every :class:`SparseLinear` by an nn.Linear holding its current
    weight and bias. Each weight gets back the ``requires_grad`` it had when wrapped, which after
    :func:`sparsify` is False like everything sparsify froze (``model.requires_grad_()`` makes
    the whole model trainable again). Returns ``model``."""
    return replace_with_linear(model, SparseLinear, "unsparsify")


def replace_with_linear(model, kind, caller):
    """Replaces, in place, every ``kind`` module inside ``model`` by its ``to_linear()``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            if not name:
                raise ValueError(f"{caller} needs a model that contains {kind.__name__} modules, not one itself; "
                                 f"use {kind.__name__}.to_linear()")
            parent, child = _parent_and_child(model, name)
            setattr(parent, child, module.to_linear())
    return model
