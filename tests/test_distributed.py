"""The optimizers and sparse layers under torch.distributed: DDP and FSDP2 on 2 gloo processes
(CPU) against one process on the same global batch.

Agreement is to float32 rounding (1e-6 relative), not bit-exact: DDP averages the two ranks'
gradients of half batches and FSDP2 reduce-scatters them, a different summation order from
one process's full batch. Resuming on the same world size is bit-exact.
"""

import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparseft import sparsify
from sparseft.optim import LowRankAdamW, SparseAdamW

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
STEPS = 4
IN, HIDDEN, OUT, BATCH = 12, 20, 10, 8


# ----------------------------------------------------------------- harness
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, out_dir, options):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = CASES[case](rank, world, **options)
    except Exception as exc:  # reported to the parent, which raises it
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(case, tmp_path, world=WORLD, timeout=180, **options):
    """Run CASES[case] on ``world`` gloo processes; the list of what each rank returned. A rank
    still running after ``timeout`` seconds (a collective left waiting) fails the test."""
    context = mp.start_processes(_worker, args=(world, _free_port(), case, str(tmp_path), options), nprocs=world,
                                 join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{case}: ranks still running after {timeout} s (a hang in a collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _no_errors(results):
    for rank, result in enumerate(results):
        if "error" in result:
            raise AssertionError(f"rank {rank}: {result['error']}\n{result['traceback']}")
    return results


# ----------------------------------------------------------------- models and data
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, OUT))


def _batches(steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, OUT, generator=generator))
            for _ in range(steps)]


def _masks(model, density=0.3):
    generator = torch.Generator().manual_seed(2)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            count = max(1, int(density * p.numel()))
            masks[name] = torch.randperm(p.numel(), generator=generator)[:count].sort().values.to(torch.int32)
    return masks


def _train(model, optimizer, batches, rank=0, world=1):
    """Steps on the batches; with world > 1 each rank takes its contiguous share of each batch."""
    for x, y in batches:
        share = x.shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _full(t):
    from sparseft.distributed import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _trained_weights(model):
    """name -> full trained tensor; a sparsified layer's weight with its values written in."""
    weights = {}
    for name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            weights[f"{name}.{leaf}" if name else leaf] = _full(p)
        if hasattr(module, "weight_indices"):
            weight = weights[f"{name}.weight"]
            weight.view(-1)[module.weight_indices.long()] = weights.pop(f"{name}.weight_values")
    return weights


def _assert_close(got, want, rtol=1e-6, atol=1e-7):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------- wrappers
def _ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def _fsdp(model):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


WRAPPERS = {"ddp": _ddp, "fsdp": _fsdp}


def _sparse_dense_masks(wrap):
    """SparseAdamW over dense parameters with masks (and maskless trained biases)."""
    def run(rank, world):
        model = _model()
        masks = _masks(model)
        wrapped = WRAPPERS[wrap](model)
        named = list(model.named_parameters())
        optimizer = SparseAdamW(named, masks=masks, lr=0.05, weight_decay=0.1)
        _train(wrapped, optimizer, _batches(), rank, world)
        return {"weights": _trained_weights(model)}

    def reference():
        model = _model()
        optimizer = SparseAdamW(list(model.named_parameters()), masks=_masks(model), lr=0.05, weight_decay=0.1)
        _train(model, optimizer, _batches())
        return _trained_weights(model)
    return run, reference


def _sparsified(wrap):
    """sparsify'd layers (compact values) with SparseAdamW."""
    def build():
        model = _model()
        return sparsify(model, _masks(model), train=r"\.bias$")

    def run(rank, world):
        model = build()
        wrapped = WRAPPERS[wrap](model)
        optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
        _train(wrapped, optimizer, _batches(), rank, world)
        return {"weights": _trained_weights(model)}

    def reference():
        model = build()
        optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
        _train(model, optimizer, _batches())
        return _trained_weights(model)
    return run, reference


def _lowrank(wrap, **options):
    """LowRankAdamW, projecting the three weights on the right (FSDP2 shards rows); the last
    step's gradient norm must match too."""
    def groups(model):
        weights = [p for p in model.parameters() if p.dim() == 2]
        others = [p for p in model.parameters() if p.dim() != 2]
        return [{"params": weights, "rank": 4, "update_proj_gap": 2, "proj_type": "right"}, {"params": others}]

    def run(rank, world):
        model = _model()
        wrapped = WRAPPERS[wrap](model)
        optimizer = LowRankAdamW(groups(model), lr=0.05, weight_decay=0.1, **options)
        if wrap == "ddp" and optimizer.layerwise:
            optimizer.register_ddp(wrapped)
        _train(wrapped, optimizer, _batches(), rank, world)
        return {"weights": {**_trained_weights(model), "grad norm": optimizer.last_grad_norm}}

    def reference():
        model = _model()
        optimizer = LowRankAdamW(groups(model), lr=0.05, weight_decay=0.1, **options)
        _train(model, optimizer, _batches())
        return {**_trained_weights(model), "grad norm": optimizer.last_grad_norm}
    return run, reference


EQUIVALENCE = {
    f"{kind}_{wrap}": factory(wrap)
    for wrap in WRAPPERS for kind, factory in (
        ("sparse_dense_masks", _sparse_dense_masks), ("sparsified", _sparsified), ("lowrank", _lowrank),
        ("lowrank_layerwise", lambda wrap: _lowrank(wrap, layerwise=True)),
        ("lowrank_layerwise_clipped", lambda wrap: _lowrank(wrap, layerwise=True, max_grad_norm=0.5)))
}
CASES = {name: run for name, (run, _) in EQUIVALENCE.items()}


@pytest.mark.parametrize("case", sorted(EQUIVALENCE))
def test_two_ranks_equal_one_process(case, tmp_path):
    results = _no_errors(run_ranks(case, tmp_path))
    want = EQUIVALENCE[case][1]()
    for result in results:  # every rank ends with the same full weights, those of one process
        _assert_close(result["weights"], want)


# ----------------------------------------------------------------- OwLore and the fused loss under DDP
class _Blocks(nn.Module):
    """Three residual blocks named ``layers.N.`` (OwLore's block rule) and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(IN, HIDDEN)
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)


def _owlore_train(model, optimizer, wrapped, rank=0, world=1):
    from sparseft.optim.owlore import OwLoreSampler
    sampler = OwLoreSampler(model, {0: 1.0, 1: 2.0, 2: 3.0}, gamma=1, interval=2, seed=3)
    for x, y in _batches(6):
        sampler.step(optimizer)
        share = x.shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        nn.functional.mse_loss(wrapped(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return _trained_weights(model)


def _owlore_groups(model):
    weights = [p for n, p in model.named_parameters() if p.dim() == 2]
    return [{"params": weights, "rank": 4, "update_proj_gap": 2, "proj_type": "right"},
            {"params": [p for p in model.parameters() if p.dim() != 2]}]


def _owlore_ddp(rank, world):
    model = _Blocks()
    # DDP first, over every parameter: it reduces only the params that require grad when it is
    # built; find_unused_parameters lets the blocks the sampler freezes go without gradients.
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = LowRankAdamW(_owlore_groups(model), lr=0.05)
    return {"weights": _owlore_train(model, optimizer, wrapped, rank, world)}


def test_owlore_under_ddp_equals_one_process(tmp_path):
    results = _no_errors(run_ranks("owlore_ddp", tmp_path))
    model = _Blocks()
    want = _owlore_train(model, LowRankAdamW(_owlore_groups(model), lr=0.05), model)
    for result in results:
        _assert_close(result["weights"], want)


VOCAB = 17


def _loss_batch():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2 * WORLD, 5, IN, generator=generator)
    labels = torch.randint(0, VOCAB, (2 * WORLD, 5), generator=generator)
    labels[0, :4] = -100  # rank 0 holds fewer trained tokens than rank 1
    labels[3, 1] = -100
    return x, labels


def _loss_model():
    torch.manual_seed(0)
    return nn.ModuleDict({"body": nn.Linear(IN, HIDDEN), "head": nn.Linear(HIDDEN, VOCAB, bias=False)})


def _fused_loss(model, x, labels, num_items_in_batch=None):
    from sparseft import linear_cross_entropy
    return linear_cross_entropy(model["body"](x), model["head"].weight, labels, num_items_in_batch=num_items_in_batch)


class _LossWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, labels, num_items_in_batch):
        return _fused_loss(self.model, x, labels, num_items_in_batch)


def _loss_ddp(rank, world):
    model = _loss_model()
    wrapped = nn.parallel.DistributedDataParallel(_LossWrapper(model))
    x, labels = _loss_batch()
    rows = slice(rank * 2, rank * 2 + 2)
    # The Trainer's rule: the token count summed over ranks, and the loss times the world size,
    # which DDP's gradient average divides back out.
    count = (labels[rows] != -100).sum()
    dist.all_reduce(count)
    (wrapped(x[rows], labels[rows], count) * world).backward()
    return {"grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


def test_fused_loss_normalised_over_ranks_equals_one_process(tmp_path):
    results = _no_errors(run_ranks("loss_ddp", tmp_path))
    model = _loss_model()
    x, labels = _loss_batch()
    _fused_loss(model, x, labels).backward()
    want = {name: p.grad for name, p in model.named_parameters()}
    for result in results:
        _assert_close(result["grads"], want)


# ----------------------------------------------------------------- bad input fails on every rank
def _bad_mask(rank, world, kind):
    model = _model()
    masks = _masks(model)
    if rank == 1:
        name = "2.weight"
        if kind == "out of range":
            masks[name] = torch.tensor([0, 5, 10_000], dtype=torch.int32)
        else:  # a valid mask, but not rank 0's
            masks[name] = masks[name][1:]
    wrapped = WRAPPERS[options_wrap(kind)](model)
    try:
        SparseAdamW(list(model.named_parameters()), masks=masks)
    except (TypeError, ValueError) as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    del wrapped
    return {"raised": None}


def options_wrap(kind):
    return "fsdp" if kind == "differs" else "ddp"


@pytest.mark.parametrize("kind", ["out of range", "differs"])
def test_a_bad_mask_on_one_rank_fails_on_every_rank(kind, tmp_path):
    results = _no_errors(run_ranks("bad_mask", tmp_path, kind=kind))
    assert all(result["raised"] is not None for result in results), results
    assert all("2.weight" in result["raised"] for result in results), results
    if kind == "differs":
        assert all("differs between ranks" in result["raised"] for result in results)


def _built_before_sharding(rank, world):
    model = sparsify(_model(), _masks(_model()))
    optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad])
    wrapped = _fsdp(model)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(wrapped(x), y).backward()
    try:
        optimizer.step()
    except ValueError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def test_optimizer_built_before_fully_shard_is_refused(tmp_path):
    for result in _no_errors(run_ranks("built_before_sharding", tmp_path)):
        assert result["raised"] is not None and "after sharding" in result["raised"]


CASES.update(owlore_ddp=_owlore_ddp, loss_ddp=_loss_ddp, bad_mask=_bad_mask,
             built_before_sharding=_built_before_sharding)


# ----------------------------------------------------------------- checkpoints (torch.distributed.checkpoint)
def _optimizer(kind, model):
    if kind == "sparse":
        return SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    return LowRankAdamW([{"params": [p for p in model.parameters() if p.dim() == 2], "rank": 4,
                          "update_proj_gap": 3, "proj_type": "right"},
                         {"params": [p for p in model.parameters() if p.dim() != 2]}], lr=0.05)


def _checkpoint_model(kind):
    model = _model()
    return sparsify(model, _masks(model), train=r"\.bias$") if kind == "sparse" else model


def _dcp_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def _dcp_load(model, optimizer, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _checkpoint(rank, world, kind, phase, path):
    """phase "save": 2 steps, a checkpoint, 2 more; "resume": load it, the same 2 more."""
    import torch.distributed.checkpoint as dcp
    model = _checkpoint_model(kind)
    wrapped = _fsdp(model)
    optimizer = _optimizer(kind, model)
    batches = _batches()
    if phase == "save":
        _train(wrapped, optimizer, batches[:2], rank, world)
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=path)
    else:
        _dcp_load(model, optimizer, path)
    _train(wrapped, optimizer, batches[2:], rank, world)
    return {"weights": _trained_weights(model)}


@pytest.mark.parametrize("kind", ["sparse", "lowrank"])
def test_checkpoint_resumes_bit_exactly_and_loads_on_one_process(kind, tmp_path):
    path = str(tmp_path / "checkpoint")
    uninterrupted = _no_errors(run_ranks("checkpoint", tmp_path, kind=kind, phase="save", path=path))
    resumed = _no_errors(run_ranks("checkpoint", tmp_path, kind=kind, phase="resume", path=path))
    for before, after in zip(uninterrupted, resumed):  # same world size: bit-exact
        for name, weight in before["weights"].items():
            assert torch.equal(weight, after["weights"][name]), name

    # Resharded to one process: the state of a single-process run of the same 2 steps.
    single = _checkpoint_model(kind)
    single_optimizer = _optimizer(kind, single)
    _train(single, single_optimizer, _batches()[:2])
    loaded = _checkpoint_model(kind)
    loaded_optimizer = _optimizer(kind, loaded)
    _dcp_load(loaded, loaded_optimizer, path)
    _assert_close(_trained_weights(loaded), _trained_weights(single))
    want, got = single_optimizer.state_dict()["state"], loaded_optimizer.state_dict()["state"]
    assert want.keys() == got.keys()
    for index in want:
        for key, value in want[index].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(got[index][key], value, rtol=1e-5, atol=1e-6, msg=f"{index} {key}")
            elif isinstance(value, torch.Tensor):
                assert torch.equal(got[index][key], value), (index, key)
            else:
                assert got[index][key] == value, (index, key)


CASES.update(checkpoint=_checkpoint)


# ----------------------------------------------------------------- the Hugging Face Trainer under torchrun
@pytest.mark.parametrize("kind", ["sparse", "lowrank"])
def test_trainer_under_torchrun(kind, tmp_path):
    pytest.importorskip("transformers")
    job = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_trainer_job.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(_free_port()), job, kind, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert all(result["world"] == WORLD for result in results)
    for name, weight in results[0]["weights"].items():  # DDP kept the ranks identical
        assert torch.equal(weight, results[1]["weights"][name]), name
    before, after = results[0]["loss"]
    assert after < 0.7 * before, (before, after)


def _nonfinite_refresh(rank, world):
    """A refresh under FSDP2 where one rank's rows hold an Inf: every rank keeps its projector."""
    import warnings
    model = _model()
    wrapped = _fsdp(model)
    weight = model[2].weight
    optimizer = LowRankAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 1}], lr=0.05)
    x, y = _batches(1)[0]
    for step in range(2):
        nn.functional.mse_loss(wrapped(x), y).backward()
        if step == 1 and rank == 1:
            weight.grad.to_local()[0, 0] = float("inf")
        kept = optimizer.state[weight].get("projector")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[weight]
    return {"failed": state["failed_refreshes"], "kept": torch.equal(state["projector"], kept)}


def test_a_non_finite_gradient_on_one_rank_skips_the_refresh_on_every_rank(tmp_path):
    for result in _no_errors(run_ranks("nonfinite_refresh", tmp_path)):
        assert result == {"failed": 1, "kept": True}


CASES.update(nonfinite_refresh=_nonfinite_refresh)


def _dense_built_before_sharding(rank, world):
    import warnings
    model = _model()
    optimizer = LowRankAdamW([{"params": [p for p in model.parameters() if p.dim() == 2], "rank": 4}])
    wrapped = _fsdp(model)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(wrapped(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    return {"warnings": [str(w.message) for w in caught]}


def test_a_dense_optimizer_built_before_fully_shard_warns(tmp_path):
    for result in _no_errors(run_ranks("dense_built_before_sharding", tmp_path)):
        assert any("built before fully_shard" in message for message in result["warnings"]), result


CASES.update(dense_built_before_sharding=_dense_built_before_sharding)
