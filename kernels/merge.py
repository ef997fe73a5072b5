"""Triton kernel of the fused per-tensor model merge (contract: sparseft/ops/merge.py).

One program per BLOCK elements reads the base block once, then loops over the T tuned tensors
(T a runtime value: one compiled kernel serves every T). The tuned tensors are reached through
a small device table of their addresses and dtype codes, so they may have different dtypes:

* all tuned tensors of one dtype (the usual case): that dtype is a constexpr of the kernel;
* mixed dtypes: each task's load branches on its dtype code (a uniform scalar branch), and
  every branch converts to float32. No tensor is converted or copied on the host.

Where every tuned address is 16-byte aligned the loads are hinted as such (vector loads).

Passes over the tasks inside a program (re-reading the tuned block, from L1/L2 after the
first pass; DRAM traffic stays one read of base and each tuned tensor and one write of out):
  1. elect_sign only: S = Σ d_t;
  2. always: M = Σ m_t·d_t and D = Σ w_t·m_t, then the normalisation;
  3. consensus_k > 0 only: the count of c_t, then the gate.
The DARE keep bits of the first 64 tasks are hashed in the first pass and kept in a 64-bit
mask per element for the later ones (later tasks are hashed again in each pass).
"""

import torch
import triton
import triton.language as tl

from .sparse_adamw import _round_to

BLOCK = 1024
NUM_WARPS = 4
CACHED_KEEP_TASKS = 64  # DARE keep decisions kept as bits between passes
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MIXED = 3  # the TUNED constexpr when the tuned tensors' dtypes differ


@triton.jit
def _load_as(addr, pos, live, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return tl.load(p + pos, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _load_tuned(addr, code, pos, live, TUNED: tl.constexpr, ALIGNED: tl.constexpr):
    """A block of one tuned tensor as float32; addr its address (int64), code its dtype code."""
    if TUNED == 0:
        x = _load_as(addr, pos, live, tl.float32, ALIGNED)
    elif TUNED == 1:
        x = _load_as(addr, pos, live, tl.bfloat16, ALIGNED)
    elif TUNED == 2:
        x = _load_as(addr, pos, live, tl.float16, ALIGNED)
    else:  # mixed: a uniform branch on this task's dtype
        if code == 0:
            x = _load_as(addr, pos, live, tl.float32, ALIGNED)
        elif code == 1:
            x = _load_as(addr, pos, live, tl.bfloat16, ALIGNED)
        else:
            x = _load_as(addr, pos, live, tl.float16, ALIGNED)
    return x


@triton.jit
def dare_keep(idx, seed, cutoff):
    """keep_t(i) of the contract: idx and seed uint64 (wrapping products, logical shifts),
    cutoff an integer ≤ 2**24."""
    x = seed ^ (idx * 0x9E3779B97F4A7C15)
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    x = x ^ (x >> 31)
    return (x >> 40).to(tl.int64) < cutoff


@triton.jit
def _delta(b, pos, live, idx, bits, t, T, table_ptr, fparam_ptr, TUNED: tl.constexpr, ALIGNED: tl.constexpr,
           THRESH: tl.constexpr, DARE: tl.constexpr, HASH: tl.constexpr):
    """d_t = w_t·k_t·τ_t / p_t of task t, and the keep bits (updated when HASH: the first pass)."""
    addr = tl.load(table_ptr + t)
    code = tl.load(table_ptr + T + t)
    w = tl.load(fparam_ptr + t)
    tau = _load_tuned(addr, code, pos, live, TUNED, ALIGNED) - b
    keep = live
    if THRESH:
        keep = keep & (tl.abs(tau) >= tl.load(fparam_ptr + T + t))
    if DARE:
        seed = tl.load(table_ptr + 2 * T + t).to(tl.uint64, bitcast=True)
        cutoff = tl.load(table_ptr + 3 * T + t)
        shift = t % 64
        if HASH:
            kept = dare_keep(idx, seed, cutoff)
            if t < 64:
                bits = bits | (kept.to(tl.int64) << shift)
        else:
            if t < 64:
                kept = ((bits >> shift) & 1) != 0
            else:
                kept = dare_keep(idx, seed, cutoff)
        keep = keep & kept
    d = tl.where(keep, w * tau, 0.0)
    p = tl.load(fparam_ptr + 2 * T + t)
    if p != 1.0:
        d = tl.div_rn(d, p)
    return d, bits


@triton.jit
def _merge_kernel(base_ptr, out_ptr, table_ptr, fparam_ptr, T, numel, index_offset, normalize, consensus_lam,
                  consensus_k, scale, TUNED: tl.constexpr, ALIGNED: tl.constexpr, THRESH: tl.constexpr,
                  DARE: tl.constexpr, ELECT: tl.constexpr, CONSENSUS: tl.constexpr, BLOCK: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = pos < numel
    b = tl.load(base_ptr + pos, mask=live, other=0.0).to(tl.float32)
    idx = (pos + index_offset).to(tl.uint64)
    bits = tl.zeros((BLOCK,), dtype=tl.int64)

    if ELECT:  # pass 1: the elected sign
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(T):
            d, bits = _delta(b, pos, live, idx, bits, t, T, table_ptr, fparam_ptr, TUNED, ALIGNED, THRESH, DARE, True)
            s += d
        positive = s >= 0.0

    m_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    if ELECT:  # the weights of the tasks that agree with the elected sign, per element
        w_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    else:  # the weights of all tasks, the same for every element
        w_sum = 0.0
    for t in range(T):  # pass 2: the (sign-masked) sum and its weight
        d, bits = _delta(b, pos, live, idx, bits, t, T, table_ptr, fparam_ptr, TUNED, ALIGNED, THRESH, DARE,
                         not ELECT)
        w = tl.load(fparam_ptr + t)
        if ELECT:
            agree = tl.where(positive, d > 0.0, d < 0.0)
            m_sum += tl.where(agree, d, 0.0)
            w_sum += tl.where(agree, w, 0.0)
        else:
            m_sum += d
            w_sum += w
    if normalize != 0:
        m_sum = tl.div_rn(m_sum, tl.where(tl.abs(w_sum) < 1e-8, 1.0, w_sum))

    if CONSENSUS:  # pass 3: how many tasks agree with the merged delta
        votes = tl.zeros((BLOCK,), dtype=tl.int32)
        for t in range(T):
            d, bits = _delta(b, pos, live, idx, bits, t, T, table_ptr, fparam_ptr, TUNED, ALIGNED, THRESH, DARE,
                             False)
            votes += (tl.abs(d) >= consensus_lam * tl.abs(m_sum - d)).to(tl.int32)
        m_sum = tl.where(votes >= consensus_k, m_sum, 0.0)

    tl.store(out_ptr + pos, _round_to(b + scale * m_sum, out_ptr.dtype.element_ty), mask=live)


def _table(values, dtype, device):
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned, so that the copy is asynchronous
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def merge_tensor_triton(base, tuned, weights, thresholds, keep_probs, cutoffs, seeds, elect_sign, normalize,
                        consensus_lam, consensus_k, scale, index_offset, out):
    """out = the merge of base and the tuned tensors (see the contract); arguments are checked by
    the caller: contiguous tensors of one numel and device, float32/bfloat16/float16, lists of
    length T or empty, out possibly base itself. Under TRITON_INTERPRET=1 the tensors are CPU
    tensors and the address table holds host addresses."""
    T = len(tuned)
    numel = base.numel()
    if numel == 0:
        return out
    codes = [DTYPE_CODES[t.dtype] for t in tuned]
    addrs = [t.data_ptr() for t in tuned]
    table = _table([*addrs, *codes, *(seeds or [0] * T), *(cutoffs or [1 << 24] * T)], torch.int64, base.device)
    fparams = _table([*(float(w) for w in weights), *(float(x) for x in thresholds or [0.0] * T),
                      *(float(p) for p in keep_probs or [1.0] * T)], torch.float32, base.device)
    # With DARE and a later pass, the keep bits held between passes and the element index (two
    # 64-bit values per element) and the hash take a thread of 8 elements to ~150 registers on
    # sm_90 (.ci/compile_triton): 4 elements a thread there (72 registers), 8 otherwise (<= 96).
    block = BLOCK // 2 if cutoffs and (elect_sign or consensus_k > 0) else BLOCK
    _merge_kernel[(triton.cdiv(numel, block),)](
        base, out, table, fparams, T, numel, int(index_offset), int(bool(normalize)), float(consensus_lam),
        int(consensus_k), float(scale),
        TUNED=codes[0] if len(set(codes)) == 1 else MIXED, ALIGNED=all(a % 16 == 0 for a in addrs),
        THRESH=bool(thresholds), DARE=bool(cutoffs), ELECT=bool(elect_sign), CONSENSUS=consensus_k > 0,
        BLOCK=block, num_warps=NUM_WARPS)
    return out
