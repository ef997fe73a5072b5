"""LowRankAdamW: AdamW on a low-rank projection of each weight's gradient (GaLore-style).

For an m×n weight W with gradient G in a group with a ``rank`` r, and an orthonormal projector
P on the side the group's ``proj_type`` picks ("std": right when m >= n, else left):

    right (P [n, r]):  R = G·P  [m, r]        left (P [m, r]):  R = Pᵀ·G  [r, n]
    M = β1·M + (1 − β1)·R,   V = β2·V + (1 − β2)·R²           (float32, r-sized, in state)
    N = M̂ / (√V̂ + ε),        M̂ = M / (1 − β1^t),  V̂ = V / (1 − β2^t)
    right:  W ← W·(1 − lr·wd) − lr·scale·N·Pᵀ      left:  W ← W·(1 − lr·wd) − lr·scale·P·N

t counts the steps the moments have accumulated. P is refreshed from the current gradient
before the step at step 0 and every ``update_proj_gap`` steps: the top-r singular vectors of
G, from the randomized range finder of sparseft.linalg (``projector="randomized"``, with
``oversample`` extra test vectors (default max(8, r/2)) and ``power_iters`` subspace iterations,
warm-started from the previous P and seeded from (the parameter's position over all groups, its refresh count),
so a resumed run draws the same vectors) or from the full SVD (``projector="exact"``). A
gradient with a non-finite entry, or a factorisation that fails, keeps the previous P (the
first refresh then falls back to a seeded random orthonormal basis); ``state["failed_refreshes"]``
counts these and the first one warns. Checking the gradient costs one host synchronisation per
refresh. At a refresh the moments follow ``moments``:

    "keep"     unchanged (galore-torch): coordinates of the old basis are read in the new one,
               so the steps after a refresh depend on the signs and the rotation within
               near-equal singular values that the factorisation happens to give the new basis
               (a rounding-level change of the gradient can flip them; under "reset" and
               "project" a flipped sign cancels, and a rotation nearly does).
    "reset"    zeroed, and t restarts, so the next step is a fresh Adam step in the new basis.
    "project"  rotated into the new basis by T = P_oldᵀ·P_new [r, r]: M ← M·T (left: Tᵀ·M), and
               V ← V·(T∘T) (left: (T∘T)ᵀ·V), t kept. V is a per-coordinate second moment, which a
               rotation does not carry exactly; V·(T∘T) is the second moment of the rotated
               coordinates when the old ones are uncorrelated, is non-negative by construction
               and keeps the total Σ V when both bases span the same subspace.

"project" is the default: on SmolLM2-135M (100 steps of 2×32 tokens of real text, r=64, a
refresh every 25 steps, lr 5e-5; ``sparseft bench lowrank --parts curves``) the final losses were
project 3.460, reset 3.509, keep 3.565 against full AdamW's 3.328 (one seed; the batches are the
same for all three).

Parameters that are not projected -- groups without ``rank`` and every tensor with fewer than
two dimensions -- take plain AdamW steps with torch.optim.AdamW's formula (decoupled weight
decay first, then m̂/(√v̂ + ε)) through the same fused direction op, with float32 moments.

Differences from galore-torch's AdamW (galore_torch 1.0), and how to make the two agree:

- ε: galore adds ε to √V before the bias correction, i.e. N = M̂/(√V̂ + ε/√(1 − β2^t)); here ε
  is added to √V̂ as in torch.optim.AdamW. galore's default ε is 1e-6, ours 1e-8. Agree: ε = 0.
  (With ε = 1e-6 in both, the test's weights differ by 1e-3 relative after 10 steps.)
- weight decay: galore decays after the update, W ← (W − lr·scale·ΔW)·(1 − lr·wd); here W is
  decayed before, as torch.optim.AdamW does (the two differ by lr²·wd·scale·ΔW: 7e-5 relative
  after 10 test steps at lr 0.01, wd 0.1). Agree: wd = 0.
- precision: galore keeps P, R and the moments in the gradient's dtype; here they are float32
  and a bfloat16/float16 weight is rounded once per step. Agree: float32 weights.
- galore always factors with the full SVD (``projector="exact"`` here) and keeps the moments at
  a refresh (``moments="keep"``); its "reverse_std" and "full" proj_types are not offered.
- plain parameters: galore's own AdamW places ε as above; here they follow torch.optim.AdamW.

With float32 weights, wd = 0, ε = 0, ``projector="exact"`` and ``moments="keep"``, the weights
equal galore-torch's to float32 rounding: 5e-7 relative after 10 steps with refreshes at steps
0, 4 and 8, on both sides (tests/test_lowrank_adamw.py asserts 1e-5).

Layerwise mode (``layerwise=True``; galore-torch's layerwise recipe refuses accumulation). Each
param's post-accumulate-grad hook folds its gradient into the step's gradient and frees
``.grad`` at once, so no model-sized gradient exists: a projected param keeps only R (r-sized),
summed over the ``accumulation_steps`` micro-batches -- exact, since projection is linear and P
is fixed within a step. A plain param's ``.grad`` accumulates as usual and is consumed at the
last micro-batch. On the last micro-batch the hook steps the param, unless ``max_grad_norm`` is
set: clipping needs every param's gradient first, so the hooks then hold the step gradients
(r-sized for projected params) and ``step()`` clips and steps them all. ``step()`` and
``zero_grad()`` are called as usual, once per ``accumulation_steps`` backward passes (a Hugging
Face Trainer with the same ``gradient_accumulation_steps`` does), so an LR scheduler steps once;
a ``step()`` after fewer backward passes (the Trainer's partial accumulation at an epoch's end)
steps the sums so far, as the plain optimizer steps whatever ``.grad`` holds.
A refresh takes its projector from the *first* micro-batch's gradient: refreshing from the
summed gradient would hold a dense float32 accumulator for every projected param on refresh
steps, and that peak is what layerwise mode removes; GaLore's own refresh reads one batch.
With ``accumulation_steps=1`` the two modes step identically; with more, they differ only at
refreshes (tests/test_lowrank_adamw.py checks both). A checkpoint between steps holds no
pending gradient.

Gradient norm and clipping, in both modes: ``last_grad_norm`` (a float32 tensor; None before the
first step) is the L2 norm over the step gradients the moments see -- R for projected params,
the dense gradient for plain ones. ‖R‖ ≤ ‖G‖, so this is the norm of what Adam is fed, not of
the dense gradient, which layerwise mode never holds summed. ``max_grad_norm`` scales the step
gradients by min(1, max_grad_norm / (norm + 1e-6)), torch's ``clip_grad_norm_`` rule. In layerwise
mode torch's ``clip_grad_norm_`` (and a Trainer's ``max_grad_norm``) see no gradients: pass
``max_grad_norm`` here.

``state_dict()`` holds tensors and plain values only -- projectors are float32 tensors, the
side a string -- so ``torch.load(weights_only=True)`` reads it, and a resumed run is bit-exact
with an uninterrupted one, refreshes included.
"""

import math
import numbers
import warnings
import weakref

import torch
import torch.distributed as dist

from sparseft import _backends
from sparseft import distributed as _dist
from sparseft.linalg import right_singular_vectors, truncated_svd
from sparseft.ops.lowrank_adam import bias_corrections, lowrank_adam_direction, lowrank_weight_update
from sparseft.optim._hyper import check_adamw_hyper

PROJ_TYPES = ("std", "left", "right")
PROJECTORS = ("randomized", "exact")
MOMENTS = ("keep", "reset", "project")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COUNTERS = ("step", "moment_step", "refreshes", "failed_refreshes")  # plain ints in a projected state
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _side(proj_type, shape, sharded=False):
    if proj_type == "std":
        if sharded:  # a row-sharded gradient projects on the right with no communication per step
            return "right"
        return "right" if shape[0] >= shape[1] else "left"
    return proj_type


def _is_int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_options(group, where):
    """Group hyper-parameters and projection options; ``where`` prefixes the argument names."""
    check_adamw_hyper(group, where)
    if group.get("rank") is None:
        return
    if not _is_int(group["rank"], 1):
        raise ValueError(f"{where}rank: expected a positive int, got {group['rank']!r}")
    if not _is_int(group["update_proj_gap"], 1):
        raise ValueError(f"{where}update_proj_gap: expected a positive int, got {group['update_proj_gap']!r}")
    for key, value in (("oversample", group["oversample"]), ("power_iters", group["power_iters"])):
        if not _is_int(value, 0) and not (key == "oversample" and value is None):
            raise ValueError(f"{where}{key}: expected an int >= 0, got {value!r}")
    if not isinstance(group["scale"], numbers.Real) or not math.isfinite(group["scale"]):
        raise ValueError(f"{where}scale: expected a finite float, got {group['scale']!r}")
    for key, allowed in (("proj_type", PROJ_TYPES), ("projector", PROJECTORS), ("moments", MOMENTS)):
        if group[key] not in allowed:
            raise ValueError(f"{where}{key}: expected one of {allowed}, got {group[key]!r}")


def _check_param(p, group, name):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(p).__name__}")
    if p.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{name}: LowRankAdamW updates float32/bfloat16/float16 parameters, got {p.dtype}")
    if group.get("rank") is not None and p.dim() > 2:
        raise ValueError(f"{name}: a projected parameter must be 2-D, got shape {tuple(p.shape)}; put it in a "
                         "group without 'rank'")
    if _projected(group, p) and group["rank"] > min(p.shape):
        raise ValueError(f"{name}: rank {group['rank']} exceeds min(m, n) = {min(p.shape)} of its shape "
                         f"{tuple(p.shape)}")


def _check_sharded(p, group, name):
    """What a row-sharded (FSDP2) parameter allows: projection on the right, randomized."""
    if not _projected(group, p):
        return
    if group["proj_type"] == "left":
        raise ValueError(f"{name}: proj_type 'left' on a row-sharded (FSDP2) parameter would all-reduce R = PᵀG "
                         "every step; use 'right' or 'std' (which projects sharded parameters on the right)")
    if group["projector"] == "exact":
        raise ValueError(f"{name}: projector 'exact' needs the whole gradient on one rank; under FSDP2 use "
                         "'randomized', whose range finder all-reduces n×(rank + oversample) products only")


def _projected(group, p):
    return group.get("rank") is not None and p.dim() == 2


def _moment_shape(shape, rank, side):
    return (shape[0], rank) if side == "right" else (rank, shape[1])


def _projector_shape(group, shape, sharded=False):
    """(shape of P, side) for a projected parameter of ``shape`` (FSDP2-sharded or not)."""
    side = _side(group["proj_type"], shape, sharded)
    return ((shape[1] if side == "right" else shape[0]), group["rank"]), side


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW on low-rank projections of the gradients of 2-D weights (see the module docstring).

    Args:
        params: parameters, ``(name, param)`` pairs or param groups. A group with a ``rank``
            projects its 2-D parameters and may carry its own ``update_proj_gap``, ``scale``,
            ``proj_type``, ``projector``, ``oversample``, ``power_iters`` and ``moments``
            (galore-torch's group keys port unchanged); :func:`lowrank_param_groups` builds them.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        update_proj_gap: steps between projector refreshes (the first is at step 0).
        scale: factor of the back-projected update (galore's ``scale``).
        proj_type: "std" (right projector when m >= n, else left) | "left" | "right".
        projector: "randomized" (range finder, warm-started) | "exact" (full SVD).
        oversample, power_iters: the range finder's extra test vectors (None: max(8, rank // 2),
            see ``default_oversample``) and subspace iterations.
        moments: "keep" | "reset" | "project": what a refresh does to the moments.
        layerwise: step each param from its post-accumulate-grad hook and free its gradient there.
        accumulation_steps: micro-batches per step in layerwise mode (backward passes per step()).
        max_grad_norm: clip the step gradients' global norm (see ``last_grad_norm``); None: no clipping.
        backend: "torch" | "cpu" | "triton" | "cuda" | None (automatic; see sparseft._backends).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, update_proj_gap=200,
                 scale=0.25, proj_type="std", projector="randomized", oversample=None, power_iters=2, moments="project",
                 layerwise=False, accumulation_steps=1, max_grad_norm=None, backend=None):
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"backend: expected one of {_backends.BACKENDS} or None, got {backend!r}")
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise: expected a bool, got {layerwise!r}")
        if not _is_int(accumulation_steps, 1):
            raise ValueError(f"accumulation_steps: expected a positive int, got {accumulation_steps!r}")
        if accumulation_steps > 1 and not layerwise:
            raise ValueError("accumulation_steps: only layerwise=True accumulates inside the optimizer; without it, "
                             "backward accumulates .grad as usual and step() follows the last micro-batch")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, numbers.Real) and max_grad_norm > 0
                                              and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm: expected a positive finite float or None, got {max_grad_norm!r}")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projector=projector, oversample=oversample, power_iters=power_iters, moments=moments)
        _check_options({**defaults, "rank": 1}, "")  # any rank: the projection defaults are checked too
        self.backend = backend
        self.layerwise = layerwise
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm = None
        self._warned_refresh = False
        self._hooks = []
        self._pending = {}  # layerwise: the params with micro-batches not yet stepped (see _accumulate)
        # layerwise without clipping: Σ‖step gradient‖² of the params stepped in hooks, by RowShard (None: whole)
        self._hooked_norm_sq = {}
        self._shards = {}  # FSDP2: DTensor param -> its RowShard
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- construction
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            _check_options(group, f"param_groups[{index}]: ")
            start = sum(len(g["params"]) for g in self.param_groups[:index])
            _dist.check_one_kind(group["params"], f"param_groups[{index}]")
            for i, p in enumerate(group["params"]):
                _check_param(p, group, self._name(group, i, start + i))
                if _dist.is_sharded(p):
                    _check_sharded(p, group, self._name(group, i, start + i))
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(f"param_groups[{index}]: params: all params of a group must be on one device, "
                                 f"got {sorted(map(str, devices))}")
            if self.layerwise:
                for i, p in enumerate(group["params"]):
                    _check_unhooked(p, self._name(group, i, start + i))
        except Exception:
            self.param_groups.pop()
            raise
        for i, p in enumerate(group["params"]):
            if _dist.is_sharded(p):
                self._shards[p] = _dist.row_shard(p, self._name(group, i, start + i))
        if self.layerwise:
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(
                        _layerwise_hook(weakref.ref(self), group, i, start + i)))

    def remove_hooks(self):
        """Detach the layerwise hooks: backward then leaves gradients in ``.grad`` again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def register_ddp(self, ddp_model):
        """Layerwise mode under DistributedDataParallel: call once, after wrapping. Backward's
        post-accumulate-grad hooks would see each rank's own gradient before DDP averages it, so
        they are removed and a DDP communication hook steps the params of each gradient bucket as
        soon as its all-reduce (an average, DDP's default) is done, still during backward. DDP's
        buckets hold a whole gradient, so under DDP layerwise mode saves no gradient memory (FSDP2,
        whose hooks see reduce-scattered shards, does); it keeps stepping inside backward and the
        ``max_grad_norm`` rule. Accumulate micro-batches with DDP's ``no_sync()`` and
        ``accumulation_steps=1``: the hook then fires once per step, on the summed gradient."""
        if not self.layerwise:
            raise ValueError("register_ddp: only layerwise=True needs it; without it DDP's averaged .grad is "
                             "stepped by step() like any optimizer's")
        if self.accumulation_steps != 1:
            raise ValueError("register_ddp: accumulation_steps must be 1 under DDP; accumulate micro-batches with "
                             "ddp_model.no_sync(), so the buckets are reduced once per step")
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_model: expected a DistributedDataParallel, got {type(ddp_model).__name__}")
        self.remove_hooks()
        where = {p: (group, i, position) for group, i, position, p in self._params()}
        ddp_model.register_comm_hook((weakref.ref(self), where, ddp_model.process_group), _ddp_layerwise_hook)

    @staticmethod
    def _name(group, i, position):
        names = group.get("param_names")
        return names[i] if names is not None else f"params[{position}]"

    def _params(self):
        """(group, index in group, position over all groups, param) for every param."""
        position = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                yield group, i, position, p
                position += 1

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            self._finish_layerwise_step()
            return loss
        _dist.warn_if_no_gradients(self)
        work = [(group, i, position, p) for group, i, position, p in self._params() if p.grad is not None]
        for group, i, position, p in work:  # every gradient is checked before any state changes
            self._check_grad(group, p, self._name(group, i, position))
        self._apply_all([(group, p, self._step_gradient(group, position, p, p.grad)) for group, _, position, p in work])
        return loss

    def _step_gradient(self, group, position, p, grad, may_refresh=True):
        """The float32 gradient the Adam update of ``p`` sees: R = the projection of ``grad``
        (refreshing P from ``grad`` first when one is due and allowed) or, for a plain param, ``grad``."""
        grad = _dist.local(grad).float()
        if not _projected(group, p):
            return grad
        state = self.state[p]
        if not state:
            _, side = _projector_shape(group, p.shape, p in self._shards)
            state.update(dict.fromkeys(_COUNTERS, 0), side=side)
        if may_refresh and state["step"] % group["update_proj_gap"] == 0:
            self._refresh(group, position, state, grad, self._shards.get(p))
        projector = state["projector"]
        return grad @ projector if state["side"] == "right" else projector.T @ grad

    def _apply_all(self, work):
        """Adam steps for (group, param, step gradient) triples, clipped to ``max_grad_norm``."""
        if not work:
            self.last_grad_norm = None
            return
        norm = self._global_norm_sq(work).sqrt()
        self.last_grad_norm = norm
        coef = None
        if self.max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_'s rule
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for group, p, grad in work:
            self._apply(group, p, grad if coef is None else grad * coef)

    def _global_norm_sq(self, work):
        """Σ‖step gradient‖² over (group, param, gradient) triples; shards' parts summed over ranks."""
        whole = [g for _, p, g in work if p not in self._shards]
        sharded = [g for _, p, g in work if p in self._shards]
        total = torch.zeros((), dtype=torch.float32, device=work[0][2].device)
        if sharded:
            total = torch.stack([torch.linalg.vector_norm(g).square() for g in sharded]).sum()
            self._shards[next(p for _, p, _ in work if p in self._shards)].all_reduce(total)
        if whole:
            total = total + torch.stack([torch.linalg.vector_norm(g).square() for g in whole]).sum()
        return total

    def _apply(self, group, p, grad):
        """One AdamW step of ``p`` on its float32 step gradient (projected or plain)."""
        lr, beta1, beta2 = self._hyper(group)
        state = self.state[p]
        projected = _projected(group, p)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
            state.setdefault("step", 0)
        state["step"] += 1
        if projected:
            state["moment_step"] += 1
        c1, c2 = bias_corrections(beta1, beta2, state["moment_step" if projected else "step"])
        # The direction overwrites the step gradient where this step owns it (R, a clipped or
        # converted copy, a gradient layerwise mode took): one parameter-sized buffer less.
        borrowed = p.grad is not None and grad.data_ptr() == _dist.local(p.grad).data_ptr()
        p = _dist.local(p)
        direction = torch.empty_like(grad) if borrowed else grad
        lowrank_adam_direction(grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], direction, beta1=beta1,
                               beta2=beta2, c1=c1, c2=c2, eps=group["eps"], backend=self.backend)
        if projected:
            lowrank_weight_update(p, direction, state["projector"], side=state["side"], lr=lr, scale=group["scale"],
                                  weight_decay=group["weight_decay"], backend=self.backend)
            return
        decay = 1.0 - lr * group["weight_decay"]
        if p.dtype == torch.float32:
            p.mul_(decay).add_(direction, alpha=-lr)
        else:  # float32 math, one rounding
            p.copy_(p.float().mul_(decay).add_(direction, alpha=-lr))

    # ----------------------------------------------------------------- layerwise mode
    def _accumulate(self, group, i, position, p, reduced=None):
        """The layerwise hook's work: fold ``p.grad`` into this step's gradient and free it; on
        the last micro-batch, step ``p`` now (or, with clipping, leave it to step()).
        ``_pending[p]`` = [summed step gradient or None, micro-batches seen, group].
        ``reduced``: the all-reduced gradient a DDP bucket hands over (see ``register_ddp``), read
        in place of ``.grad`` and never written (DDP owns the bucket)."""
        grad = p.grad if reduced is None else reduced
        self._check_grad(group, p, self._name(group, i, position), grad)
        pending = self._pending.setdefault(p, [None, 0, group])
        if _projected(group, p):  # the projection of the micro-batch's gradient: exact, P is fixed within a step
            projected = self._step_gradient(group, position, p, grad, may_refresh=pending[1] == 0)
            pending[0] = projected if pending[0] is None else pending[0].add_(projected)
            p.grad = None
        pending[1] += 1
        if pending[1] < self.accumulation_steps:
            return  # a plain param's .grad keeps accumulating in place until the last micro-batch
        if not _projected(group, p):
            grad, p.grad = _dist.local(grad).to(torch.float32, copy=reduced is not None), None
            pending[0] = grad if pending[0] is None else pending[0].add_(grad)
        if self.max_grad_norm is not None:
            return
        del self._pending[p]
        self._apply_counted(group, p, pending[0])

    def _apply_counted(self, group, p, grad):
        """_apply, adding the step gradient's squared norm to this step's (unclipped layerwise mode)."""
        norm_sq = torch.linalg.vector_norm(grad).square()
        key = self._shards.get(p)  # a shard's part is summed over the ranks when step() publishes the norm
        self._hooked_norm_sq[key] = norm_sq + self._hooked_norm_sq.get(key, 0.0)
        self._apply(group, p, grad)

    def _finish_layerwise_step(self):
        """step() in layerwise mode: steps what the hooks left pending -- every param when clipping,
        else those short of ``accumulation_steps`` micro-batches (a Trainer steps after a partial
        accumulation at an epoch's end) -- and publishes the step's gradient norm."""
        work = []
        for p, (grad, _, group) in self._pending.items():
            if grad is None:  # a plain param short of its last micro-batch: .grad holds the sum so far
                grad, p.grad = _dist.local(p.grad).float(), None
            work.append((group, p, grad))
        self._pending.clear()
        if self.max_grad_norm is not None:
            self._apply_all(work)
            return
        for group, p, grad in work:
            self._apply_counted(group, p, grad)
        self.last_grad_norm = self._hooked_norm()
        self._hooked_norm_sq = {}

    def _hooked_norm(self):
        if not self._hooked_norm_sq:
            return None
        total = self._hooked_norm_sq.pop(None, None)
        if self._hooked_norm_sq:  # sharded parts: one all-reduce of their sum
            shards = list(self._hooked_norm_sq)
            sharded = torch.stack([self._hooked_norm_sq[shard] for shard in shards]).sum()
            shards[0].all_reduce(sharded)
            total = sharded if total is None else total + sharded
        return total.sqrt()

    def _check_grad(self, group, p, name, grad=None):
        grad = p.grad if grad is None else grad
        if grad.is_sparse:
            raise TypeError(f"{name}: sparse gradients are not supported; LowRankAdamW projects dense gradients")
        if grad.shape != p.shape or grad.device != p.device:
            raise ValueError(f"{name}: its gradient has shape {tuple(grad.shape)} on {grad.device}, "
                             f"expected the parameter's {tuple(p.shape)} on {p.device}")
        if grad.dtype != p.dtype:
            raise TypeError(f"{name}: gradient dtype {grad.dtype} differs from the parameter's {p.dtype}")
        state = self.state.get(p) or {}
        moments = state.get("exp_avg")
        shape = _dist.local(p).shape  # the moments follow this rank's rows
        if not _projected(group, p):
            if moments is not None and moments.shape != shape:
                raise ValueError(f"{name}: the parameter's shape changed to {tuple(p.shape)} since its moments "
                                 f"{tuple(moments.shape)} were built")
            return
        if group["rank"] > min(p.shape):
            raise ValueError(f"{name}: rank {group['rank']} exceeds min(m, n) = {min(p.shape)} of its shape "
                             f"{tuple(p.shape)}")
        if "projector" in state:
            want, side = _projector_shape(group, p.shape, p in self._shards)
            if (side != state["side"] or tuple(state["projector"].shape) != want
                    or moments is not None and tuple(moments.shape) != _moment_shape(shape, want[1], side)):
                raise ValueError(f"{name}: the parameter's shape changed to {tuple(p.shape)} since its projector "
                                 f"{tuple(state['projector'].shape)} (side {state['side']!r}) was built")

    def _hyper(self, group):
        lr = group["lr"]
        return (float(lr) if isinstance(lr, torch.Tensor) else lr), *group["betas"]

    # ----------------------------------------------------------------- projector refresh
    def _refresh(self, group, position, state, grad, shard=None):
        """A new projector from ``grad`` (this rank's rows of it when ``shard`` is given: every rank
        then computes the same projector from all-reduced n×k products)."""
        previous = state.get("projector")
        seed = position * 2**32 + state["refreshes"]
        state["refreshes"] += 1
        new = None
        # Sharded, every rank must take the same branch (the factorisation is collective), and
        # no rank sees the others' rows: a non-finite entry anywhere makes the all-reduced
        # products, hence the factor, non-finite on every rank alike, which the check below rejects.
        if shard is not None or bool(torch.isfinite(grad).all()):
            try:
                new = _factor(grad, group, state["side"], previous, seed, shard)
            except torch.linalg.LinAlgError:
                new = None
            if new is not None and not bool(torch.isfinite(new).all()):
                new = None
        if new is None:
            state["failed_refreshes"] += 1
            if not self._warned_refresh:
                self._warned_refresh = True
                warnings.warn("LowRankAdamW: a projector refresh met a non-finite gradient or a failed "
                              "factorisation and kept the previous projector (counted in "
                              "state['failed_refreshes']; warned once)", RuntimeWarning, stacklevel=4)
            if previous is not None:
                return
            new = _random_basis(grad, group["rank"], state["side"], seed)
        if previous is not None and "exp_avg" in state:
            self._carry_moments(group["moments"], state, previous, new)
        state["projector"] = new

    @staticmethod
    def _carry_moments(moments, state, previous, new):
        if moments == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"] = 0
        elif moments == "project":
            turn = previous.T @ new  # [r, r]: new coordinates of the old basis vectors
            if state["side"] == "right":
                state["exp_avg"] = state["exp_avg"] @ turn
                state["exp_avg_sq"] = state["exp_avg_sq"] @ turn.square()
            else:
                state["exp_avg"] = turn.T @ state["exp_avg"]
                state["exp_avg_sq"] = turn.square().T @ state["exp_avg_sq"]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """torch's state dict; the moments of FSDP2-sharded params as DTensors sharded like them
        (projectors and counters are the same on every rank), which torch.distributed.checkpoint
        saves and reshards like the params: load at any world size, or on one process."""
        saved = super().state_dict()
        if self._shards:
            params = [p for group in self.param_groups for p in group["params"]]
            for index, p in enumerate(params):
                if p in self._shards and index in saved["state"]:
                    saved["state"][index] = {k: _dist.rows_as_dtensor(v, p) if k in _MOMENTS else v
                                             for k, v in saved["state"][index].items()}
        return saved

    def load_state_dict(self, state_dict):
        """Load a checkpoint; every saved entry is checked against this optimizer's params, ranks
        and shapes before anything changes. torch's loader would cast the float32 state to each
        param's dtype, so the per-param state is adopted here and torch loads the groups."""
        groups = [(group, i, position, p) for group, i, position, p in self._params()]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} param groups for {len(self.param_groups)} here")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict: param_groups[{index}] has {len(saved['params'])} params, "
                                 f"{len(group['params'])} here")
            if saved.get("rank") != group.get("rank"):
                raise ValueError(f"state_dict: param_groups[{index}] was saved with rank {saved.get('rank')!r}, "
                                 f"this optimizer has rank {group.get('rank')!r}")
        saved_ids = [pid for saved in saved_groups for pid in saved["params"]]
        adopted = {}
        for (group, i, position, p), pid in zip(groups, saved_ids):
            if pid in state_dict["state"]:
                adopted[p] = _adopt(state_dict["state"][pid], group, p, self._name(group, i, position))
                if p in self._shards:  # whole or DTensor moments -> this rank's rows
                    adopted[p].update((k, _dist.local_rows(adopted[p][k], self._shards[p]).clone())
                                      for k in _MOMENTS if k in adopted[p])
        super().load_state_dict({**state_dict, "state": {}})
        self.state.clear()
        for p, state in adopted.items():
            self.state[p] = state


def _factor(grad, group, side, previous, seed, shard=None):
    """The new projector: the leading right (side "right") or left singular vectors of grad
    (of the row-stacked gradient when ``grad`` is this rank's ``shard`` of it)."""
    rank = group["rank"]
    if group["projector"] == "exact":
        u, _, v = truncated_svd(grad, rank, exact=True)
        return (v if side == "right" else u).contiguous()
    matrix = grad if side == "right" else grad.T  # left vectors of G are right vectors of Gᵀ
    oversample = default_oversample(rank) if group["oversample"] is None else group["oversample"]
    return right_singular_vectors(matrix, rank, oversample=oversample, power_iters=group["power_iters"],
                                  warm_start=previous, seed=seed,
                                  all_reduce=None if shard is None else shard.all_reduce).contiguous()


def default_oversample(rank):
    """max(8, rank // 2) extra test vectors: real gradients have no spectral gap at r, and 8
    extra vectors leave 0.96-0.99 of the exact subspace on SmolLM2-135M's gradients at r=128,
    r/2 at least 0.9997 for 1.4x the sketch's cost (``sparseft bench lowrank``)."""
    return max(8, rank // 2)


def _random_basis(grad, rank, side, seed):
    """A seeded random orthonormal basis: the first projector when the first gradient is unusable."""
    rows = grad.shape[1] if side == "right" else grad.shape[0]
    generator = torch.Generator(device=grad.device).manual_seed(seed)
    gaussian = torch.randn(rows, rank, generator=generator, device=grad.device, dtype=torch.float32)
    return torch.linalg.qr(gaussian, mode="reduced").Q.contiguous()


def _adopt(entry, group, p, name):
    """A checked copy of one saved state entry on the param's device, dtypes kept."""
    if not isinstance(entry, dict):
        raise ValueError(f"state_dict: the state of {name} is not a dict")
    if _projected(group, p):
        want, side = _projector_shape(group, p.shape, _dist.is_sharded(p))
        missing = [k for k in (*_COUNTERS, "side", "projector") if k not in entry]
        if missing:
            raise ValueError(f"state_dict: the state of {name} lacks {missing} (not a LowRankAdamW checkpoint of "
                             "a projected parameter?)")
        if entry["side"] != side or tuple(entry["projector"].shape) != want:
            raise ValueError(f"state_dict: {name} was saved with a projector of shape "
                             f"{tuple(entry['projector'].shape)} (side {entry['side']!r}); here it needs {want} "
                             f"(side {side!r}, rank {group['rank']}, parameter shape {tuple(p.shape)})")
        moment_shape = _moment_shape(p.shape, want[1], side)
    else:
        if "projector" in entry:
            raise ValueError(f"state_dict: {name} was saved as a projected parameter; here it takes plain AdamW "
                             "steps (no 'rank' in its group)")
        moment_shape = tuple(p.shape)
    if ("exp_avg" in entry) != ("exp_avg_sq" in entry):
        raise ValueError(f"state_dict: the state of {name} has one of exp_avg / exp_avg_sq but not both")
    for key in ("exp_avg", "exp_avg_sq"):
        if key in entry:
            t = entry[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != tuple(moment_shape):
                raise ValueError(f"state_dict: {name} {key} must be a float32 tensor of shape {tuple(moment_shape)}, "
                                 f"got {getattr(t, 'dtype', type(t).__name__)} of shape "
                                 f"{tuple(getattr(t, 'shape', ()))}")
    return {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


def lowrank_param_groups(model, rank=128, targets="all-linear", include=None, **group_options):
    """Param groups for LowRankAdamW: the 2-D weights that ``targets``/``include`` select (the
    rules of sparseft.masks.select_targets: "all-linear" or regexes, embeddings, head, norms
    and biases excluded unless ``include`` names them) in one group with ``rank`` and
    ``group_options`` (e.g. update_proj_gap, scale, proj_type); every other trainable
    parameter in a plain-AdamW group. Groups carry ``param_names`` for error messages."""
    from sparseft.masks.targets import select_targets

    selected = select_targets(model, targets, include)
    projected, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projected if name in selected and p.dim() == 2 else plain).append((name, p))
    if not projected:
        raise ValueError(f"targets={targets!r}, include={include!r} selected no trainable 2-D weight")
    groups = [{"params": [p for _, p in projected], "param_names": [n for n, _ in projected], "rank": rank,
               **group_options}]
    if plain:
        groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
    return groups


def _check_unhooked(p, name):
    """Layerwise stepping owns a param's post-accumulate-grad hook: a second owner (another
    layerwise optimizer, galore's layerwise recipe) would step it twice or on freed gradients."""
    if getattr(p, "_post_accumulate_grad_hooks", None):
        raise ValueError(f"{name}: already has a post-accumulate-grad hook (another layerwise optimizer?); "
                         "layerwise=True steps each param from its own hook, so a param can have one owner")


def _ddp_layerwise_hook(state, bucket):
    """DDP comm hook of LowRankAdamW.register_ddp: average the bucket, then step its params.
    Synchronous, so the steps run in the backward thread, in the same order on every rank."""
    optimizer_ref, where, process_group = state
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(process_group))
    dist.all_reduce(buffer, group=process_group)
    optimizer = optimizer_ref()
    if optimizer is not None:
        with torch.no_grad():
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                if p in where:
                    optimizer._accumulate(*where[p], p, reduced=grad)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def _layerwise_hook(optimizer_ref, group, i, position):
    def hook(p):
        optimizer = optimizer_ref()
        if optimizer is not None:
            with torch.no_grad():
                optimizer._accumulate(group, i, position, p)
    return hook
