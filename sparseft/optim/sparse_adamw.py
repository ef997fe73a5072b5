"""SparseAdamW: AdamW over the masked entries of each parameter, with compact state.

Two kinds of parameters:

(a) a dense parameter with a mask (sorted unique flat indices into ``param.view(-1)``): its
    dense ``.grad`` is gathered at the indices inside the fused kernel. A trainable parameter
    given no mask (a norm that ``sparsify(..., train=)`` keeps trainable) is plain AdamW: its
    mask is every entry, so it shares the state, checkpoints and ``update_masks`` of the rest;
(b) the ``weight_values`` parameter of a module made by ``sparseft.sparsify`` (it carries
    ``_sparseft_module``): its ``.grad`` is already compact; the update goes to the values
    and, in the same kernel, into ``module.weight.view(-1)[module.weight_indices]``. The
    module owns the mask, so its masks entry must be None.

State per parameter: ``indices`` (the mask, so a checkpoint is self-contained), and after
the first step ``exp_avg``/``exp_avg_sq`` (float32, [nnz]) and ``step`` (int32, [nnz]).
Step counts are per entry: bias correction uses each entry's own count, so entries that
join at ``update_masks`` start from zero moments with exactly the bias correction of a
fresh AdamW, while surviving entries keep their moments and counts. Entries outside the
masks are never written (weight decay included). ``state_dict`` holds only tensors and
plain values (``torch.load(weights_only=True)`` reads it) and resume is bit-exact.

Distributed. Under DDP every rank steps the same all-reduced gradients, as torch's AdamW does.
Under FSDP2 (build the optimizer after ``fully_shard``) a parameter is a DTensor sharded on
dim 0; masks stay in full-tensor coordinates and each rank keeps, in local coordinates, the
entries in its rows (see sparseft.distributed), with their moments: state and step work per
rank fall with the world size. Compact ``weight_values`` sharded by FSDP2 are stepped shard by
shard and reach the weight in the forward (see sparseft.sparse_linear). With torch.distributed
initialised, construction is collective: every rank checks its masks, all raise if any fails,
and masks that differ between ranks are an error (three numbers per mask are all-gathered).
``state_dict()`` is then collective too and holds the state in full-tensor coordinates,
gathered from the shards (so it equals a single-process checkpoint and loads at any world
size, e.g. through torch.distributed.checkpoint); each rank holds the gathered compact state
of one parameter at a time while building it.
"""

import torch

from sparseft import _backends
from sparseft import distributed as _dist
from sparseft.masks._validate import mask_dtype, validate_mask
from sparseft.optim._hyper import check_adamw_hyper
from sparseft.optim._sparse_adamw_backends import sparse_adamw_step
from sparseft.sparse_linear import module_of_values

_STATE_KEYS = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "step": torch.int32}


_module_of = module_of_values  # the sparse module a compact ``weight_values`` parameter belongs to, else None


class _MaskLookup:
    """Mask entries given as a list aligned with the params, or a dict keyed by param name
    (named params) or by position; remembers which were used so leftovers can be reported."""

    def __init__(self, masks, what):
        self.what = what
        if masks is not None and not isinstance(masks, (list, tuple, dict)):
            raise TypeError(f"{what}: expected a list aligned with the params or a dict, got {type(masks).__name__}")
        self.masks = masks
        self.used = set()

    def get(self, position, name):
        """(found, mask) for the param at ``position`` (in this lookup's order) named ``name``."""
        if self.masks is None:
            return False, None
        if isinstance(self.masks, dict):
            if name is None and any(isinstance(k, str) for k in self.masks):
                raise ValueError(f"{self.what} is keyed by parameter name: pass named params, such as "
                                 "model.named_parameters(), or key it by position")
            keys = [k for k in (name, position) if k is not None and k in self.masks]
            if not keys:
                return False, None
            self.used.add(keys[0])
            return True, self.masks[keys[0]]
        if position >= len(self.masks):
            raise ValueError(f"{self.what}: {len(self.masks)} entries, fewer than the params; "
                             "a mask list must be aligned with the params (None for sparsified values)")
        self.used.add(position)
        return True, self.masks[position]

    def finish(self, count):
        if self.masks is None:
            return
        if isinstance(self.masks, dict):
            unknown = [k for k in self.masks if k not in self.used]
            if unknown:
                raise ValueError(
                    f"{self.what}: entries for parameters not in the optimizer: {unknown[:5]}"
                    f"{' ...' if len(unknown) > 5 else ''} (keys are names, which need named params such as "
                    "model.named_parameters(), or positions; after sparseft.sparsify the sparse modules carry "
                    "their own masks, so pass masks=None for their weight_values)")
        elif len(self.masks) != count:
            raise ValueError(f"{self.what}: {len(self.masks)} entries for {count} params; "
                             "a mask list must be aligned with the params")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW semantics) on masked entries only.

    Args:
        params: parameters, ``(name, param)`` pairs (e.g. ``model.named_parameters()``) or
            param groups; a group may carry its own ``"masks"`` (list aligned with its params,
            or dict by name).
        masks: one entry per parameter: a list aligned with all params (over all groups, in
            order), or a dict keyed by param name (named params) or position. An entry is a
            mask (sorted unique int32 flat indices; int64 from 2**31 elements) or None for a
            sparsified ``weight_values`` param. A trainable param with neither is stepped as
            torch.optim.AdamW would step it, with float32 state: its mask is every entry, which
            costs 16 bytes of state per element (AdamW: 8 for a float32 weight) and about 5x the
            time of torch's fused AdamW (one CPU core, 49152x576: 0.15 s against 0.027 s),
            nothing for norms, noticeable for an embedding. A frozen param without a mask is
            held but never stepped.
        backend: "torch" | "cpu" | "triton" | "cuda" | None (automatic; see sparseft._backends).
    """

    def __init__(self, params, masks=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 backend=None):
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"backend must be one of {_backends.BACKENDS} or None, got {backend!r}")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay)
        check_adamw_hyper(defaults, "")
        self.backend = backend
        self._shards = {}  # DTensor param -> its RowShard
        self._values_owners = {}  # compact values param -> (its sparsified module, its name)
        self._init_masks = _MaskLookup(masks, "masks")
        self._n_params = 0
        super().__init__(params, defaults)
        self._init_masks.finish(self._n_params)
        del self._init_masks

    # ----------------------------------------------------------------- construction
    def add_param_group(self, param_group):
        param_group = dict(param_group)
        group_lookup = _MaskLookup(param_group.pop("masks", None), f"param_groups[{len(self.param_groups)}]['masks']")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        error = None
        try:
            check_adamw_hyper(group, f"param_groups[{len(self.param_groups) - 1}]: ")
            _dist.check_one_kind(group["params"], f"param_groups[{len(self.param_groups) - 1}]")
            states, full_masks = [], []
            init_lookup = getattr(self, "_init_masks", None)
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                position = self._n_params + i
                name = self._name(group, i, position)
                in_group, mask = group_lookup.get(i, names[i] if names else None)
                if init_lookup is not None:
                    in_init, init_mask = init_lookup.get(position, names[i] if names else None)
                    if in_init and init_mask is not None:
                        if in_group and mask is not None:
                            raise ValueError(f"{name}: a mask is given both in masks and in its param group")
                        mask = init_mask
                states.append(self._initial_state(p, mask, name))
                module = _module_of(p)
                full = module.weight_indices if module is not None else mask
                if full is not None:
                    full_masks.append((name, full))
            group_lookup.finish(len(group["params"]))
        except Exception as exc:
            error = exc
        # Collective when distributed: a rank that failed a check makes every rank raise.
        agreed = _dist.agree_on_error(None if error is None else f"{type(error).__name__}: {error}")
        if agreed is None:
            try:
                _dist.same_on_all_ranks(full_masks)
            except ValueError as exc:
                error = exc
        if error is not None or agreed is not None:
            self.param_groups.pop()
            if error is not None:
                raise error
            raise ValueError(agreed)
        for i, (p, state) in enumerate(zip(group["params"], states)):
            if state is not None:
                self.state[p] = state
            module = _module_of(p)
            if module is not None:
                self._values_owners[p] = (module, self._name(group, i, self._n_params + i))
                module.values_in_forward = _dist.is_sharded(p)
        self._n_params += len(group["params"])

    @staticmethod
    def _name(group, i, position):
        names = group.get("param_names")
        return names[i] if names is not None else f"params[{position}]"

    def _initial_state(self, p, mask, name):
        """The state of ``p`` before its first step: its mask, local to this rank's shard."""
        module = _module_of(p)
        if module is not None:
            if mask is not None:
                raise ValueError(f"{name}: compact weight_values of a sparsified module carry their own mask; "
                                 "its masks entry must be None")
            _check_module(p, module, name)
            validate_mask(module.weight_indices, module.weight.numel(), name)
            if not _dist.is_sharded(p):
                return {"indices": module.weight_indices}
        elif mask is None and not p.requires_grad:
            return None
        else:
            _check_dense_param(p, name)
            if mask is not None:
                validate_mask(mask, p.numel(), name)
        if not _dist.is_sharded(p):  # trainable without a mask: dense AdamW, as a mask of every entry
            return {"indices": (_every_entry(p.numel(), p.numel(), p.device) if mask is None else mask.to(p.device))}
        shard = self._shards[p] = _dist.row_shard(p, name)
        device = _dist.local(p).device
        if module is not None or mask is None:  # a shard of compact values, or every entry of the rows
            return {"indices": _every_entry(_dist.local(p).numel(), p.numel(), device)}
        return {"indices": shard.local_mask(mask.to(device))}

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_modules_hold_values()
        _dist.warn_if_no_gradients(self)
        position = 0
        for group in self.param_groups:
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, torch.Tensor) else lr  # one host read per group and step
            beta1, beta2 = group["betas"]
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    target, grad, values, state = self._prepare(p, lambda: self._name(group, i, position + i))
                    try:
                        sparse_adamw_step(target, state["indices"], grad, state["exp_avg"], state["exp_avg_sq"],
                                          state["step"], values, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                          weight_decay=group["weight_decay"], backend=self.backend)
                    except (TypeError, ValueError) as exc:  # argument checks run before the kernel
                        raise type(exc)(f"{self._name(group, i, position + i)}: {exc}") from None
            position += len(group["params"])
        return loss

    def _check_modules_hold_values(self):
        """Each sparsified module still holds the values Parameter this optimizer steps: a wrapper
        that replaced it (fully_shard after the optimizer) leaves it without gradients for good."""
        for p, (module, name) in self._values_owners.items():
            if module._parameters.get("weight_values") is not p:
                raise ValueError(f"{name}: its module's weight_values is no longer this "
                                 "parameter: a wrapper (fully_shard?) replaced it after the optimizer was built; "
                                 "build the optimizer after sharding: fully_shard(model), then "
                                 "SparseAdamW(model.parameters())")

    def _prepare(self, p, name_of):
        """(target, gradient, values, state) for one step of ``p`` (local shards under FSDP2);
        creates the moments on first use. ``name_of()`` names ``p`` in errors (built only when
        one is raised)."""
        state = self.state.get(p)
        if not state:
            raise ValueError(f"{name_of()} has a gradient but no mask: it was frozen without a mask when the optimizer "
                             "was built; give it a mask through update_masks")
        if p.grad.is_sparse:
            raise TypeError(f"{name_of()}: sparse COO gradients are not supported; SparseAdamW gathers dense or "
                            "compact gradients")
        module = _module_of(p)
        if p in self._shards:
            target, values = _dist.local(p), None  # compact values step shard by shard
        elif module is not None:
            indices = module.weight_indices
            if indices is not state["indices"]:
                if indices.shape != state["indices"].shape:
                    raise ValueError(f"{name_of()}: the module's mask changed outside SparseAdamW.update_masks "
                                     f"({state['indices'].numel()} -> {indices.numel()} entries)")
                state["indices"] = indices  # the same mask, moved (module.to)
            target, values = module.weight, p
        else:
            target, values = p, None
        if _dist.is_sharded(p) and p not in self._shards:
            raise ValueError(f"{name_of()} became a DTensor after the optimizer was built: build the optimizer "
                             "after sharding: fully_shard(model), then SparseAdamW(model.parameters())")
        if state["indices"].device != target.device:
            state["indices"] = state["indices"].to(target.device)
        if "exp_avg" not in state:
            nnz = state["indices"].numel()
            for key, dtype in _STATE_KEYS.items():
                state[key] = torch.zeros(nnz, dtype=dtype, device=target.device)
        elif state["exp_avg"].device != target.device:
            for key in _STATE_KEYS:
                state[key] = state[key].to(target.device)
        return target, _dist.local(p.grad), values, state

    def release_state(self, params):
        """Drop the moments and step counts of ``params`` (e.g. frozen by OwLore), keeping their
        masks: a param that trains again restarts them as at its first step."""
        for p in params:
            state = self.state.get(p)
            if state:
                self.state[p] = {"indices": state["indices"]}

    # ----------------------------------------------------------------- mask refresh
    @torch.no_grad()
    def update_masks(self, new_masks):
        """Replace masks, keeping the moments and step counts of surviving entries.

        ``new_masks``: a list aligned with all params (None keeps a mask), or a dict keyed by
        position or (with named params) by name. New entries start with zero moments and step
        count 0 (so their bias correction is a fresh AdamW's); dropped entries are discarded.
        For sparsified values the module is re-indexed (``module.reindex_``) and the stale
        compact ``.grad`` is cleared. Every mask is validated before anything changes.
        """
        lookup = _MaskLookup(new_masks, "new_masks")
        changes = []
        position = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                name = self._name(group, i, position + i)
                _, mask = lookup.get(position + i, name if "param_names" in group else None)
                if mask is not None:
                    module = _module_of(p)
                    if module is None:
                        _check_dense_param(p, name)
                    elif p in self._shards:
                        raise ValueError(f"{name}: a sparsified layer sharded by FSDP2 keeps its mask (its values "
                                         "are sharded by entry count); re-sparsify before sharding instead")
                    validate_mask(mask, (module.weight if module is not None else p).numel(), name)
                    changes.append((p, module, mask))
            position += len(group["params"])
        lookup.finish(position)
        for p, module, mask in changes:
            device = _dist.local(module.weight if module is not None else p).device
            mask = mask.to(device)
            if p in self._shards:
                mask = self._shards[p].local_mask(mask)
            state = self.state.get(p) or {}
            new_state = {"indices": mask}
            if "exp_avg" in state:
                kept = _remap(state["indices"].to(device), mask, [state[k].to(device) for k in _STATE_KEYS])
                new_state.update(zip(_STATE_KEYS, kept))
            if module is not None:
                module.reindex_(mask)
                new_state["indices"] = module.weight_indices
                p.grad = None
            self.state[p] = new_state

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """torch's state dict, with every masked param's moments and step counts: zeros where
        it has not stepped yet (a fresh state, exactly: each entry's count is 0), so a loader such
        as torch.distributed.checkpoint, which fills the tensors a state dict already holds, finds
        them all. With sharded params (collective then) their state is in full-tensor
        coordinates, gathered from the shards, so it loads at any world size."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            entry = saved["state"].get(index)
            if entry is None:
                continue
            if "exp_avg" not in entry:
                nnz, device = entry["indices"].numel(), entry["indices"].device
                entry = {**entry, **{k: torch.zeros(nnz, dtype=t, device=device) for k, t in _STATE_KEYS.items()}}
            saved["state"][index] = self._gathered(p, entry) if p in self._shards else entry
        return saved

    def _gathered(self, p, entry):
        shard, module = self._shards[p], _module_of(p)
        if module is not None:
            full = {"indices": module.weight_indices}
        else:
            local = entry["indices"]
            full = {"indices": _dist.gather_rows(local + torch.tensor(shard.lo, dtype=local.dtype), shard)}
        full.update((key, _dist.gather_rows(entry[key], shard)) for key in _STATE_KEYS if key in entry)
        return full

    def _localized(self, p, full):
        """A full-coordinate state entry cut to this rank's shard of ``p``."""
        shard, module = self._shards[p], _module_of(p)
        first, last = (shard.start, shard.stop) if module is not None else shard.mask_slice(full["indices"])
        local = {"indices": (_every_entry(last - first, p.numel(), full["indices"].device) if module is not None
                             else full["indices"][first:last] - shard.lo)}
        local.update((key, full[key][first:last].clone()) for key in _STATE_KEYS if key in full)
        return local

    def load_state_dict(self, state_dict):
        """Load a checkpoint; every saved entry is validated before anything changes.

        torch's loader would cast every tensor to the param's dtype (indices and float32
        moments included), so the per-param state is adopted here and torch loads the
        param groups (load hooks see the groups, with the state left out). Saved masks of
        sparsified values re-index their modules when they differ.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        names = [self._name(g, i, None) if "param_names" in g else None
                 for g in self.param_groups for i in range(len(g["params"]))]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict: {len(saved_ids)} saved params for {len(params)} in this optimizer")
        adopted = {}
        for position, (pid, p) in enumerate(zip(saved_ids, params)):
            if pid in state_dict["state"]:
                name = names[position] or f"params[{position}]"
                adopted[p] = _adopt_state(p, state_dict["state"][pid], name)
                if p in self._shards:
                    module = _module_of(p)
                    if module is not None and not torch.equal(adopted[p]["indices"], module.weight_indices):
                        raise ValueError(f"state_dict: {name} was saved with another mask than its sharded "
                                         "layer's; load the model's checkpoint (with its mask) before sharding")
                    adopted[p] = self._localized(p, adopted[p])
        previous = dict(self.state)
        super().load_state_dict({**state_dict, "state": {}})
        for p in params:
            if p in adopted:
                state = adopted[p]
                module = _module_of(p)
                if module is not None and p not in self._shards:
                    current = module.weight_indices
                    if current.shape != state["indices"].shape or not torch.equal(current, state["indices"]):
                        module.reindex_(state["indices"])
                    state["indices"] = module.weight_indices
                self.state[p] = state
            elif previous.get(p):
                self.state[p] = {"indices": previous[p]["indices"]}


def _every_entry(count, numel, device):
    """The mask of every entry of a tensor (or shard) of ``count`` entries, in a tensor of ``numel``."""
    return torch.arange(count, dtype=mask_dtype(numel), device=device)


def _check_module(p, module, name):
    for attr in ("weight", "weight_indices", "reindex_"):
        if not hasattr(module, attr):
            raise TypeError(f"{name}: its _sparseft_module lacks {attr!r} (see sparseft.sparsify)")
    if p.dim() != 1 or p.numel() != module.weight_indices.numel():
        raise ValueError(f"{name}: compact values of shape {tuple(p.shape)} for a mask of "
                         f"{module.weight_indices.numel()} entries")


def _check_dense_param(p, name):
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: SparseAdamW updates float32/bfloat16/float16 weights, got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"{name}: a masked parameter must be contiguous (masks index param.view(-1))")


def _remap(old_indices, new_indices, tensors):
    """Rows of ``tensors`` (aligned with old_indices) at new_indices; zero where new."""
    if old_indices.numel() == 0:
        return [torch.zeros(new_indices.numel(), dtype=t.dtype, device=t.device) for t in tensors]
    pos = torch.searchsorted(old_indices, new_indices).clamp_(max=old_indices.numel() - 1)
    survives = old_indices[pos] == new_indices
    return [torch.where(survives, t[pos], torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors]


def _adopt_state(p, entry, name):
    """A validated copy of one saved state entry on the param's device, dtypes kept."""
    if not isinstance(entry, dict) or "indices" not in entry:
        raise ValueError(f"state_dict: the state of {name} has no 'indices' (not a SparseAdamW checkpoint?)")
    module = _module_of(p)
    target = module.weight if module is not None else p
    validate_mask(entry["indices"], target.numel(), f"state_dict: {name} indices")
    device = _dist.local(target).device
    state = {"indices": entry["indices"].to(device, copy=True)}
    present = [k for k in _STATE_KEYS if k in entry]
    if present and len(present) != len(_STATE_KEYS):
        raise ValueError(f"state_dict: the state of {name} has {present}, expected all of {list(_STATE_KEYS)}")
    nnz = state["indices"].numel()
    for key in present:
        t = entry[key]
        if not isinstance(t, torch.Tensor) or t.dtype != _STATE_KEYS[key] or t.shape != (nnz,):
            raise ValueError(f"state_dict: {name} {key} must be a {_STATE_KEYS[key]} tensor of shape ({nnz},)")
        state[key] = t.to(device, copy=True)
    return state
