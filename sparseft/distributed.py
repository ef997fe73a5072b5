"""What the optimizers need of torch.distributed: row shards of FSDP2 parameters, masks
translated to them, compact state gathered for checkpoints, and cross-rank checks.

FSDP2 (``fully_shard``) holds each parameter as a DTensor sharded on dim 0 over a 1-D mesh,
torch.chunk style: rank r owns rows [r·c, min((r+1)·c, m)) with c = ceil(m / world), so the
flat entries of a row-major [m, ...] tensor that rank r owns form one contiguous range, and
the entries of a sorted mask that fall in it form one contiguous slice of the mask. A mask
is therefore given in full-tensor coordinates and each rank keeps its slice, shifted to the
local shard; the slices, concatenated in rank order, are the mask again, which is how the
compact state is gathered for a checkpoint and re-sliced on load, whatever the world size.

Nothing here communicates more than the optimizers' own small tensors: no parameter or
gradient is ever all-gathered.
"""

import warnings

import torch
import torch.distributed as dist

if not dist.is_available():  # a torch build without torch.distributed: nothing is ever sharded
    class DTensor:  # noqa: D101 -- a stand-in no tensor is an instance of
        pass

    Shard = None
else:
    try:  # torch >= 2.5
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, Shard

__all__ = ["DTensor", "is_sharded", "local", "RowShard", "row_shard", "gather_rows", "same_on_all_ranks",
           "agree_on_error", "check_one_kind", "rows_as_dtensor", "local_rows", "warn_if_no_gradients"]


def is_sharded(t):
    return isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (a view: in-place writes reach the sharded storage), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_one_kind(params, where):
    """A param group is either all DTensors (FSDP2-sharded) or all plain tensors."""
    if len({is_sharded(p) for p in params}) > 1:
        raise ValueError(f"{where} mixes DTensor (FSDP2-sharded) and plain tensors: shard the whole model (or none "
                         "of it) before building the optimizer")


class RowShard:
    """The rows [start, stop) of a dim-0-sharded [m, ...] tensor that this rank holds, as flat
    offsets [lo, hi) into ``t.view(-1)``, and the process group of its mesh."""

    def __init__(self, start, stop, row_numel, group, rank, world):
        self.start, self.stop = start, stop
        self.lo, self.hi = start * row_numel, stop * row_numel
        self.group, self.rank, self.world = group, rank, world

    def mask_slice(self, mask):
        """(first, last) positions of the sorted full-coordinate ``mask`` entries in this shard."""
        bounds = torch.tensor([self.lo, self.hi], dtype=mask.dtype, device=mask.device)
        first, last = torch.searchsorted(mask, bounds).tolist()
        return first, last

    def local_mask(self, mask):
        first, last = self.mask_slice(mask)
        return mask[first:last] - self.lo

    def all_reduce(self, tensor):
        """Sum ``tensor`` in place over the ranks of this shard's mesh."""
        dist.all_reduce(tensor, group=self.group)


def row_shard(p, name):
    """The RowShard of a DTensor parameter; a clear error for layouts the optimizers do not step."""
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(f"{name}: a DTensor parameter must be sharded on dim 0 over a 1-D mesh (FSDP2's "
                         f"fully_shard default), got placements {placements} on a {p.device_mesh.ndim}-D mesh")
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = p.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    local_rows = p.to_local().shape[0]
    if local_rows != stop - start:
        raise ValueError(f"{name}: its local shard has {local_rows} rows where torch.chunk sharding over {world} "
                         f"ranks gives rows [{start}, {stop}); uneven custom sharding is not supported")
    row_numel = p.numel() // rows if rows else 0
    return RowShard(start, stop, row_numel, mesh.get_group(), rank, world)


def rows_as_dtensor(local_tensor, p):
    """``local_tensor`` (this rank's rows of a tensor row-aligned with the DTensor ``p``, such as
    a moment) as a DTensor laid out like ``p``: checkpoints then save and reshard it as they do
    ``p``, with no gather."""
    shape = (p.shape[0], *local_tensor.shape[1:])
    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def local_rows(t, shard):
    """This rank's rows of ``t``: the local shard of a DTensor, rows [start, stop) of a whole tensor."""
    return t.to_local() if isinstance(t, DTensor) else t[shard.start:shard.stop]


def gather_rows(local_tensor, shard):
    """The rank-order concatenation of every rank's 1-D ``local_tensor`` (lengths may differ)."""
    group = shard.group
    length = torch.tensor([local_tensor.numel()], dtype=torch.int64, device=local_tensor.device)
    lengths = [torch.empty_like(length) for _ in range(shard.world)]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=local_tensor.dtype, device=local_tensor.device)
    padded[:local_tensor.numel()] = local_tensor
    pieces = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, lengths)])


def _fingerprint(mask):
    """Three int64 numbers that differ, in practice, between different sorted masks."""
    m = mask.to(torch.int64)
    weights = torch.arange(1, m.numel() + 1, dtype=torch.int64, device=m.device)
    return torch.stack([torch.tensor(m.numel(), device=m.device), m.sum(), (m * weights).sum()]).cpu()


def same_on_all_ranks(named_masks, group=None):
    """Raise the same ValueError on every rank when any rank holds a different mask for a
    parameter: one all-gather of 3 numbers per mask. Call it on every rank in the same order."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1 or not named_masks:
        return
    mine = torch.stack([_fingerprint(mask) for _, mask in named_masks])
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for position, (name, _) in enumerate(named_masks):
        rows = [t[position] for t in everyone]
        if any(not torch.equal(rows[0], row) for row in rows[1:]):
            differing = [r for r, row in enumerate(rows) if not torch.equal(rows[0], row)]
            raise ValueError(f"{name}: its mask differs between ranks (rank 0 and ranks {differing}); every rank "
                             "must pass the same full-tensor mask (build it from the same weights and seed)")


def agree_on_error(error, group=None):
    """Collective: every rank learns whether any rank failed a local check, so all raise instead
    of some waiting in a collective the failed ones never reach. ``error`` is this rank's
    message or None; returns the first failing rank's message (None when all passed)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return error
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, error, group=group)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return message if error is not None else f"rank {rank}: {message}"


def warn_if_no_gradients(optimizer):
    """Under torch.distributed, warn once when a step finds no gradient on any of the optimizer's
    parameters: the usual cause is an optimizer built before ``fully_shard``, which holds the
    parameters FSDP2 replaced (they never receive gradients again)."""
    if getattr(optimizer, "_warned_no_gradients", False) or not dist.is_available() or not dist.is_initialized():
        return
    if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        return
    optimizer._warned_no_gradients = True
    warnings.warn(f"{type(optimizer).__name__}.step(): none of its parameters has a gradient. Was it built before "
                  "fully_shard? FSDP2 replaces the parameters; build the optimizer after sharding", RuntimeWarning,
                  stacklevel=3)
