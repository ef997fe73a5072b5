"""One-line Hugging Face Trainer setup for the fine-tuning methods of this package::

    optimizer, callbacks = create_optimizer(model, "lift", density=0.05, refresh_every=100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(optimizer, None), callbacks=callbacks)

R-AMT needs two backward passes per micro-batch: build ``RAMTTrainer`` with the same arguments
instead of ``transformers.Trainer``. ``create_optimizer`` changes the model in place as the method
needs (sparsify, freeze, wrap). The Trainer builds the LR scheduler over the optimizer's own
learning rates (the ``lr`` option), not ``TrainingArguments.learning_rate``.

Checkpoints. Everything a method changes during training is restored by the Trainer's resume,
bit for bit: masks live in the model (a sparsified layer's ``weight_indices`` buffer, in the model
checkpoint, which re-indexes the layer on load) and in SparseAdamW's state (its ``indices``);
SaRA's nuclear-norm state (call count, base values) rides in the optimizer's state dict under
``"sparseft_nuclear_norm"``; which HFT half or OwLore blocks train is a pure function of the step,
re-derived by the callbacks; R-AMT's gradient-dropout draws come from torch's global RNG, which the
Trainer checkpoints.
"""

import numbers

import torch
import transformers

import sparseft
from sparseft import masks as selectors
from sparseft.integrations.transformers import FusedLossTrainer, OwLoreCallback
from sparseft.masks.targets import block_index, compile_patterns
from sparseft.ops import cross_entropy
from sparseft.optim import (LowRankAdamW, NuclearNormPenalty, OwLoreSampler, SparseAdamW, lowrank_param_groups,
                            outlier_ratios, sara_reselect)
from sparseft.ramt import ramt, ramt_backward, ramt_kl, ramt_penalty, ramt_unmasked
from sparseft.sparse_linear import SparseLinear

__all__ = ["HalfFineTuningCallback", "MaskRefreshCallback", "NuclearNormCallback", "RAMTObjective", "RAMTTrainer",
           "create_optimizer"]

NUCLEAR_NORM_KEY = "sparseft_nuclear_norm"


class _Required:
    """The default of an option a method cannot do without; says what to pass."""

    def __init__(self, hint):
        self.hint = hint

    def __repr__(self):
        return f"<required: {self.hint}>"


_ADAMW = {"lr": 5e-5, "weight_decay": 0.0, "betas": (0.9, 0.999)}
_SPARSE = {**_ADAMW, "train": None}
_LOWRANK = {**_ADAMW, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
            "projector": "randomized", "moments": "project", "layerwise": False, "accumulation_steps": 1,
            "max_grad_norm": None}


def create_optimizer(model, method, **options):
    """``(optimizer, callbacks)`` for ``transformers.Trainer(model=model, optimizers=(optimizer, None),
    callbacks=callbacks)``, after preparing ``model`` in place for ``method``.

    Every method takes ``lr`` (5e-5, TrainingArguments' default, unless said otherwise),
    ``weight_decay`` (0.0) and ``betas`` ((0.9, 0.999)). Sparse methods (lift, sara, lottery,
    random) sparsify the model at their masks (``sparseft.sparsify``: only the masked entries
    train, through compact values, everything else frozen unless ``train``, regexes, names it)
    and step with ``SparseAdamW``.

    - ``adamw``: full fine-tuning, torch.optim.AdamW over all parameters.
    - ``lift``: LIFT principal weights, ``sparseft.masks.lift(model, rank=128, density=0.05)``
      (rank: masks.lift's default; density: 5% of each matrix). ``refresh_every`` (None:
      never): every N optimizer steps re-select LIFT masks from the current weights and install
      them with ``SparseAdamW.update_masks`` (surviving entries keep their moments).
    - ``sara``: SaRA, the small weights (``masks.sara``, ``threshold`` 2e-3 as SaRA's scripts, or
      ``fraction``), ``lr`` 5e-4 (SaRA's scripts), with its nuclear norm
      ``sparseft.optim.NuclearNormPenalty`` (``nuclear_norm`` λ 5e-4, ``per_step`` "one" and
      ``penalty_rank`` None: exact, SaRA's setting) added to the gradients before each optimizer
      step (after the Trainer's clipping); ``reselect_every`` (None: never): progressive
      re-selection every N steps (``sparseft.optim.sara_reselect``).
    - ``lottery``: LT-SFT (composable-sft), phase two. Phase one fully fine-tunes a copy of the
      model; pass it (or its state dict) as ``tuned`` (required) and the *pretrained* model as
      ``model``: the masks are the ``density`` (0.05) largest |tuned − model| entries
      (``masks.lottery``, ``scope`` "global"), and training starts again from the pretrained
      weights at those entries.
    - ``half``: Half Fine-Tuning, ``masks.half_matrices(model, seed, stage)``: per block, half of the
      ``attention`` and ``mlp`` matrices train as plain dense nn.Linear weights; the other half has
      ``requires_grad=False`` and computes no weight gradient. Everything outside these matrices is
      frozen unless ``train`` names it. torch.optim.AdamW over all of them;
      ``HalfFineTuningCallback`` re-draws the half every ``stage_steps`` steps (None: one stage).
      A matrix that leaves the trained half loses its AdamW moments (memory of the frozen half is
      freed) and restarts as a fresh AdamW parameter when drawn again.
    - ``random``: ``masks.random(model, density=0.05, seed=0)``, the sparse baseline.
    - ``lowrank``: GaLore-style ``LowRankAdamW(lowrank_param_groups(model, rank=128,
      update_proj_gap=200, scale=0.25))`` (GaLore's defaults; ``proj_type``, ``projector``,
      ``moments``: LowRankAdamW's). ``layerwise=True`` steps each weight in its gradient hook:
      then set ``accumulation_steps`` to the Trainer's gradient_accumulation_steps and clip with
      ``max_grad_norm`` here (TrainingArguments(max_grad_norm=0): the Trainer sees no gradients).
    - ``owlore``: the ``lowrank`` optimizer plus OwLore's block sampling:
      ``OwLoreSampler(model, outlier_ratios(model, calibration, threshold=outlier_threshold),
      gamma=5, interval=50)`` (OwLore's recipe, M = 13: see sparseft.optim.owlore) driven by
      ``OwLoreCallback``; ``always_train`` and ``seed`` go to the sampler.
      ``calibration`` (required): a list of input_ids tensors (or model input dicts).
    - ``ramt``: Regularized Mask Tuning, ``sparseft.ramt.ramt(model, masks=None, targets=None,
      init=1e-2, threshold=5e-3)`` (None/None: every entry of every Linear but the head), AdamW over
      the scores at ``lr`` 8e-5 (the authors'), ``penalty`` 1e-4 on the scores' L2 norms, gradient
      dropout ``strength`` 1.0 against the KL (``temperature`` 1.0) to the frozen model's
      predictions (R-AMT's defaults, see sparseft.ramt). Train with ``RAMTTrainer``; its callback
      stops a plain Trainer after one step.

    ValueError for an unknown method; TypeError naming options the method does not take (with the
    ones it does) or a required option left out; values are checked by the functions they reach.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer: model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"create_optimizer: unknown method {method!r}; expected one of {sorted(METHODS)}")
    build, defaults = METHODS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"create_optimizer: method {method!r} does not take {unknown}; "
                        f"it accepts {sorted(defaults)}")
    settings = {**defaults, **options}
    missing = [f"{name} ({value.hint})" for name, value in settings.items() if isinstance(value, _Required)]
    if missing:
        raise TypeError(f"create_optimizer: method {method!r} needs {', '.join(missing)}")
    return build(model, **settings)


# ----------------------------------------------------------------------------- methods
def _adamw(model, lr, weight_decay, betas):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas), []


def _sparse_adamw(model, masks, train, hyper):
    sparseft.sparsify(model, masks, train=train)
    return SparseAdamW([p for p in model.parameters() if p.requires_grad], **hyper)


def _lift(model, rank, density, refresh_every, train, **hyper):
    _check_steps(refresh_every, "refresh_every")

    def select():
        return selectors.lift(model, rank=rank, density=density)

    optimizer = _sparse_adamw(model, select(), train, hyper)
    if refresh_every is None:
        return optimizer, []
    return optimizer, [MaskRefreshCallback(refresh_every, lambda: _install_masks(model, optimizer, select()))]


def _sara(model, threshold, fraction, nuclear_norm, per_step, penalty_rank, reselect_every, train, **hyper):
    _check_steps(reselect_every, "reselect_every")
    if threshold is None and fraction is None:
        threshold = 2e-3
    optimizer = _sparse_adamw(model, selectors.sara(model, threshold=threshold, fraction=fraction), train, hyper)
    penalty = NuclearNormPenalty(model, weight=nuclear_norm, per_step=per_step, rank=penalty_rank)
    _checkpoint_with(optimizer, NUCLEAR_NORM_KEY, penalty)
    callbacks = [NuclearNormCallback(penalty)]
    if reselect_every is not None:
        callbacks.append(MaskRefreshCallback(
            reselect_every, lambda: sara_reselect(model, optimizer, threshold, fraction, penalty)))
    return optimizer, callbacks


def _lottery(model, tuned, density, scope, train, **hyper):
    return _sparse_adamw(model, selectors.lottery(tuned, model, density, scope=scope), train, hyper), []


def _random(model, density, seed, train, **hyper):
    return _sparse_adamw(model, selectors.random(model, density, seed=seed), train, hyper), []


def _half(model, stage_steps, seed, attention, mlp, train, **hyper):
    _check_steps(stage_steps, "stage_steps")
    matrices = _block_matrices(model, set(attention) | set(mlp))
    extra = _named_by(model, train, exclude={id(p) for _, p in matrices})
    model.requires_grad_(False)
    for p in extra:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p in matrices] + extra, **hyper)
    callback = HalfFineTuningCallback(model, optimizer, matrices, stage_steps, seed, attention, mlp)
    callback.enter(0)  # the first half trains from the first step, before any callback runs
    return optimizer, [callback]


def _lowrank(model, rank, lr, weight_decay, betas, layerwise, accumulation_steps, max_grad_norm, **group_options):
    groups = lowrank_param_groups(model, rank=rank, **group_options)
    return LowRankAdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, layerwise=layerwise,
                        accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm), []


def _owlore(model, calibration, gamma, interval, outlier_threshold, always_train, seed, **lowrank):
    ratios = outlier_ratios(model, calibration, threshold=outlier_threshold)
    optimizer, _ = _lowrank(model, **lowrank)
    sampler = OwLoreSampler(model, ratios, gamma=gamma, interval=interval, always_train=always_train, seed=seed)
    return optimizer, [OwLoreCallback(sampler)]


def _ramt(model, masks, targets, init, threshold, penalty, strength, temperature, **hyper):
    ramt(model, masks=masks, targets=targets, init=init, threshold=threshold)
    scores = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(scores, **hyper), [RAMTObjective(penalty, strength, temperature)]


METHODS = {
    "adamw": (_adamw, _ADAMW),
    "lift": (_lift, {**_SPARSE, "rank": 128, "density": 0.05, "refresh_every": None}),
    "sara": (_sara, {**_SPARSE, "lr": 5e-4, "threshold": None, "fraction": None, "nuclear_norm": 5e-4,
                     "per_step": "one", "penalty_rank": None, "reselect_every": None}),
    "lottery": (_lottery, {**_SPARSE, "density": 0.05, "scope": "global",
                           "tuned": _Required("the fine-tuned model of LT-SFT's first phase, or its state dict")}),
    "half": (_half, {**_ADAMW, "stage_steps": None, "seed": 0, "train": None,
                     "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                     "mlp": ("gate_proj", "up_proj", "down_proj")}),
    "random": (_random, {**_SPARSE, "density": 0.05, "seed": 0}),
    "lowrank": (_lowrank, _LOWRANK),
    "owlore": (_owlore, {**_LOWRANK, "calibration": _Required("a list of input_ids tensors for the outlier ratios"),
                         "gamma": 5, "interval": 50, "outlier_threshold": 13.0, "always_train": None, "seed": 0}),
    "ramt": (_ramt, {**_ADAMW, "lr": 8e-5, "masks": None, "targets": None, "init": 1e-2, "threshold": 5e-3,
                     "penalty": 1e-4, "strength": 1.0, "temperature": 1.0}),
}


# ----------------------------------------------------------------------------- helpers
def _check_steps(value, name):
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected a positive int (optimizer steps) or None, got {value!r}")


def _block_matrices(model, leaves):
    """[(name, weight)] of the modules named by ``leaves`` (last name component) inside numbered
    transformer blocks: what ``masks.half_matrices`` draws from."""
    matrices = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in leaves and block_index(name) is not None:
            matrices.append((name, p))
    if not matrices:
        raise ValueError(f"half: no {sorted(leaves)} weights inside numbered transformer blocks")
    return matrices


def _named_by(model, patterns, exclude):
    """The parameters outside ``exclude`` (ids) whose names match a regex of ``patterns`` (None: none)."""
    if patterns is None:
        return []
    compiled = compile_patterns(patterns, "train")
    named = [(name, p) for name, p in model.named_parameters() if id(p) not in exclude]
    for pattern in compiled:
        if not any(pattern.search(name) for name, _ in named):
            raise ValueError(f"train: {pattern.pattern!r} matches no parameter outside the trained matrices")
    return [p for name, p in named if any(pattern.search(name) for pattern in compiled)]


def _install_masks(model, optimizer, masks):
    """``optimizer.update_masks`` with ``masks`` ({"<module>.weight": mask}) for the sparsified
    modules whose values it trains; other parameters keep their masks."""
    names = {id(module): name + ".weight" for name, module in model.named_modules() if isinstance(module, SparseLinear)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.update_masks([masks.get(names.get(id(getattr(p, "_sparseft_module", None)))) for p in params])


def _checkpoint_with(optimizer, key, stateful):
    """Saves ``stateful.state_dict()`` inside the optimizer's state dict under ``key`` and restores
    it on load: the Trainer writes and reads the optimizer with every checkpoint."""
    def save(_, state_dict):
        state_dict[key] = stateful.state_dict()

    def load(_, state_dict):
        if key not in state_dict:
            raise ValueError(f"the optimizer checkpoint has no {key!r}: it was saved by another method")
        stateful.load_state_dict(state_dict[key])

    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load)


# ----------------------------------------------------------------------------- callbacks
class MaskRefreshCallback(transformers.TrainerCallback):
    """Calls ``reselect()`` after every ``every``-th optimizer step (global_step a multiple of it),
    before the Trainer saves that step's checkpoint, so the checkpoint holds the new masks."""

    def __init__(self, every, reselect):
        _check_steps(every, "every")
        self.every, self.reselect = every, reselect

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.reselect()


class NuclearNormCallback(transformers.TrainerCallback):
    """Adds SaRA's nuclear-norm subgradient (``NuclearNormPenalty.add_to_grad``) to the gradients
    once per optimizer step, after the Trainer's gradient clipping and before the step."""

    def __init__(self, penalty):
        self.penalty = penalty

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.penalty.add_to_grad()


class HalfFineTuningCallback(transformers.TrainerCallback):
    """Half Fine-Tuning's per-stage re-draw. Stage ``global_step // stage_steps`` (always 0 without
    ``stage_steps``) trains ``masks.half_matrices(model, seed, stage)``: those of ``matrices`` require grad,
    the others do not, lose their ``.grad`` and their optimizer state. The stage is derived from
    the step when each step begins, so a resumed Trainer re-enters the checkpoint's stage."""

    def __init__(self, model, optimizer, matrices, stage_steps, seed, attention, mlp):
        self.model, self.optimizer, self.matrices = model, optimizer, matrices
        self.stage_steps, self.seed, self.attention, self.mlp = stage_steps, seed, tuple(attention), tuple(mlp)
        self.stage = None

    def enter(self, stage):
        if stage == self.stage:
            return
        trained = set(selectors.half_matrices(self.model, self.seed, stage, self.attention, self.mlp))
        for name, p in self.matrices:
            p.requires_grad_(name in trained)
            if name not in trained:
                p.grad = None
                self.optimizer.state.pop(p, None)
        self.stage = stage

    def on_step_begin(self, args, state, control, **kwargs):
        self.enter(0 if self.stage_steps is None else state.global_step // self.stage_steps)


class RAMTObjective(transformers.TrainerCallback):
    """R-AMT's regulariser settings for :class:`RAMTTrainer`, which finds it among its callbacks.
    As a callback it only checks that each optimizer step came from RAMTTrainer's backward: a
    plain Trainer would train the scores on the task loss alone."""

    def __init__(self, penalty, strength, temperature):
        self.penalty, self.strength, self.temperature = penalty, strength, temperature
        self.backward_ran = False

    def kl(self, model, inputs, student_logits):
        """ramt_kl of ``student_logits`` to the frozen model's logits on ``inputs`` (model inputs,
        no labels), over the attention mask's positions."""
        def teacher():
            with ramt_unmasked(model):
                return model(**inputs).logits

        return ramt_kl(student_logits, teacher, self.temperature, weights=inputs.get("attention_mask"))

    def on_step_end(self, args, state, control, **kwargs):
        if not self.backward_ran:
            raise RuntimeError("R-AMT: this optimizer step did not run R-AMT's backward; train with "
                               "sparseft.integrations.RAMTTrainer instead of transformers.Trainer")
        self.backward_ran = False


class RAMTTrainer(FusedLossTrainer):
    """A Trainer for R-AMT: per micro-batch, the task loss plus ``ramt_penalty`` and the KL to the
    frozen model go through ``ramt_backward`` (gradient dropout). Build it as a Trainer with what
    ``create_optimizer(model, "ramt")`` returned::

        RAMTTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                    callbacks=callbacks)

    The task loss is the cross-entropy of the model's logits (R-AMT's KL needs them), weighted by the
    batch's ``loss_weights`` and normalised over the optimizer step as in :class:`FusedLossTrainer`,
    whose ``fused_loss_kwargs`` and evaluation it shares; it is the loss logged. The penalty and the
    KL are per-micro-batch terms, divided by the accumulation steps. One process only:
    ``ramt_backward`` takes gradients with ``torch.autograd.grad``, which DDP does not reduce; no
    fp16 GradScaler (bf16 is fine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        found = [c for c in self.callback_handler.callbacks if isinstance(c, RAMTObjective)]
        if len(found) != 1:
            raise ValueError("RAMTTrainer needs the one RAMTObjective callback that create_optimizer(model, 'ramt') "
                             f"returns (pass callbacks=callbacks); found {len(found)}")
        if self.args.world_size > 1:
            raise ValueError("RAMTTrainer runs in one process (ramt_backward bypasses DDP)")
        if self.args.fp16:
            raise ValueError("RAMTTrainer does not support fp16 loss scaling; use bf16 or float32")
        self.objective = found[0]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "loss_weights")}
        steps = self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            logits = model(**model_inputs).logits
            task = cross_entropy(logits, inputs["labels"].to(logits.device), loss_weights=inputs.get("loss_weights"),
                                 shift=True, num_items_in_batch=num_items_in_batch, **self.fused_loss_kwargs)
            if num_items_in_batch is None:
                task = task / steps  # a per-batch mean, as the Trainer scales it
            kl = self.objective.kl(model, model_inputs, logits)
            penalty = ramt_penalty(model, self.objective.penalty)
        ramt_backward(model, task + penalty / steps, kl / steps, self.objective.strength)
        self.objective.backward_ran = True
        return task.detach()
