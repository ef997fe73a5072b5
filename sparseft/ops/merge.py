"""One fused pass of a per-tensor model merge: contract, torch reference, argument checks, dispatch.

``merge_tensor(base, tuned, weights=..., ...)`` merges T ≥ 1 fine-tuned versions of one tensor
into its base in a single pass over the elements. The element index of flat position j is
i = index_offset + j, so a caller may merge a huge tensor in contiguous chunks and get the
result of one call. Per element, all float32, the tasks summed in order t = 0..T−1 (each sum
starts from +0):

    b   = f32(base[i]);  τ_t = f32(tuned_t[i]) − b
    k_t = [|τ_t| ≥ θ_t] (1 without thresholds) · [keep_t(i)] (1 without keep_probs)
    d_t = w_t · k_t · τ_t / p_t         computed as  k_t ? (w_t·τ_t) / p_t : 0   (p_t = 1 without
                                        keep_probs, and then no division)
    elect_sign:  S = Σ_t d_t;  σ = +1 if S ≥ 0 else −1;  m_t = [sign(d_t) == σ]  (d_t == 0 gives m_t = 0)
    otherwise:   m_t = 1
    M = Σ_t m_t · d_t
    normalize:   D = Σ_t w_t · m_t;  if |D| < 1e-8: D = 1;  M = M / D          (mergekit's rule)
    consensus (lam, k):  c_t = [|d_t| ≥ lam · |M − d_t|];  M = M · [Σ_t c_t ≥ k]   (TALL-mask consensus
                         on the merged vector: the merge is kept where at least k tasks agree with it)
    out[i] = round_to_out_dtype(b + scale · M)      (scale·M, then the sum; round-to-nearest-even, once)

The scalars w_t, θ_t, p_t, lam and scale enter as float32 (rounded once from the Python floats).

DARE keep decision (``keep_probs`` p_t with ``seeds``): a counter-based hash of (seed_t, i), no
RNG state, identical bit for bit in every backend. In wrapping uint64 arithmetic, ``>>`` the
logical shift:

    x = seed_t XOR (i · 0x9E3779B97F4A7C15)
    x = (x XOR (x >> 30)) · 0xBF58476D1CE4E5B9
    x = (x XOR (x >> 27)) · 0x94D049BB133111EB
    x = x XOR (x >> 31)
    keep_t(i) = (x >> 40) < cutoff_t,   cutoff_t = round(p_t · 2**24)   (host integer; p_t = 1: always kept)

The kept fraction is cutoff_t / 2**24 (within 2**-25 of p_t); kept entries are rescaled by the
float32 p_t itself. ``dare_keep_mask`` is the reference of the mask, ``task_seed`` derives
per-(seed, tensor, task) seeds.

``out`` (optional, contiguous, base's shape, ``out_dtype``) may be ``base`` itself, an in-place
merge: every backend reads an element's base value before it writes that element of out (the
op is elementwise). Any other overlap of out with base or a tuned tensor is refused.

Backends: ``torch`` (this module's reference, stacks the deltas into a [T, n] float32 tensor),
``cpu`` (sparseft._C, csrc/cpu/merge.cpp), ``triton`` (kernels/merge.py), ``cuda``
(csrc/cuda/merge.cu). All three kernels take the kernel-level arguments of
``merge_tensor_torch`` — lists, an empty list meaning "absent" — and form no T×numel
temporary. The cpu backend equals the torch reference bit for bit (the same float32 ops in the
same order, FMA contraction off); the GPU backends may contract b + scale·M into one FMA
(≤ 1 ulp of float32 before the final rounding).
"""

import hashlib
import json
import math
import operator

import torch

from sparseft import _backends

IMPLEMENTED = ("torch", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DARE_BITS = 24
NORMALIZE_EPS = 1e-8
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_U64 = 1 << 64
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


# ----------------------------------------------------------------------------- seeds and DARE
def task_seed(seed, *parts):
    """A seed in [0, 2**63) for one (seed, *parts), e.g. (seed, tensor name, task index): the first
    8 bytes (big-endian) of sha256 of the JSON list [seed, *parts], top bit cleared. Stable across
    processes, platforms and versions; parts are ints, strings, floats, bools or None."""
    try:
        payload = json.dumps([seed, *parts], separators=(",", ":"), ensure_ascii=True)
    except TypeError as exc:
        raise TypeError(f"task_seed: seed and parts must be ints, strings, floats, bools or None ({exc})") from None
    digest = hashlib.sha256(payload.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def dare_cutoff(keep_prob):
    """cutoff = round(p · 2**24), an int in [0, 2**24]: keep_t(i) = (hash >> 40) < cutoff."""
    return int(round(float(keep_prob) * (1 << DARE_BITS)))


def _signed(c):
    return c - _U64 if c >= 1 << 63 else c


def _shr(x, s):
    """Logical right shift of int64 tensors holding uint64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def dare_hash(seed, index):
    """The contract's 64-bit hash of int64 ``index`` (a tensor) under ``seed``, as int64 bits."""
    x = index * _signed(_MIX[0])
    x = x ^ _signed(int(seed))
    x = (x ^ _shr(x, 30)) * _signed(_MIX[1])
    x = (x ^ _shr(x, 27)) * _signed(_MIX[2])
    return x ^ _shr(x, 31)


def dare_keep_mask(seed, numel, keep_prob, index_offset=0, device=None):
    """Reference DARE mask: bool [numel], element j kept iff keep(index_offset + j) (see the module
    docstring). Kept fraction ≈ cutoff / 2**24."""
    seed, numel, index_offset = _seed_arg(seed, "seed"), operator.index(numel), operator.index(index_offset)
    if numel < 0 or index_offset < 0:
        raise ValueError(f"numel and index_offset must be >= 0, got {numel} and {index_offset}")
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob: expected a float in (0, 1], got {keep_prob}")
    index = torch.arange(index_offset, index_offset + numel, dtype=torch.int64, device=device)
    return _shr(dare_hash(seed, index), 40) < dare_cutoff(keep_prob)


# ----------------------------------------------------------------------------- torch reference
def merge_tensor_torch(base, tuned, weights, thresholds, keep_probs, cutoffs, seeds, elect_sign, normalize,
                       consensus_lam, consensus_k, scale, index_offset, out):
    """The readable specification, at the kernel level shared by every backend: ``weights`` and
    the other lists have T entries or are empty (absent: no trim, no DARE); ``consensus_k`` 0 is
    no consensus. Writes ``out`` (which may be base) and returns it. Forms [T, n] float32."""
    T = len(tuned)
    b = base.reshape(-1).float()
    zero = torch.zeros((), dtype=torch.float32, device=b.device)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=b.device).view(T, 1)
    tau = torch.stack([x.reshape(-1).float() for x in tuned]) - b
    kept = torch.ones_like(tau, dtype=torch.bool)
    if thresholds:
        theta = torch.tensor([float(x) for x in thresholds], dtype=torch.float32, device=b.device).view(T, 1)
        kept &= tau.abs() >= theta
    d = w * tau
    if cutoffs:
        index = torch.arange(index_offset, index_offset + b.numel(), dtype=torch.int64, device=b.device)
        kept &= torch.stack([_shr(dare_hash(s, index), 40) < c for s, c in zip(seeds, cutoffs)])
        d = d / torch.tensor([float(p) for p in keep_probs], dtype=torch.float32, device=b.device).view(T, 1)
    d = torch.where(kept, d, zero)

    def ordered_sum(rows):  # t = 0..T-1 from +0, as the kernels sum
        acc = torch.zeros_like(b)
        for row in rows:
            acc = acc + row
        return acc

    if elect_sign:
        positive = ordered_sum(d) >= 0
        m = torch.where(positive, d > 0, d < 0)
        merged = ordered_sum(torch.where(m, d, zero))
        if normalize:
            den = ordered_sum(torch.where(m, w, zero))
            merged = merged / torch.where(den.abs() < NORMALIZE_EPS, torch.ones_like(den), den)
    else:
        merged = ordered_sum(d)
        if normalize:  # m_t = 1: D = Σ_t w_t, the same for every element
            den = ordered_sum(w)
            merged = merged / torch.where(den.abs() < NORMALIZE_EPS, torch.ones_like(den), den)
    if consensus_k > 0:
        lam = torch.tensor(float(consensus_lam), dtype=torch.float32, device=b.device)
        votes = (d.abs() >= lam * (merged - d).abs()).sum(0)
        merged = torch.where(votes >= consensus_k, merged, zero)
    delta = merged * torch.tensor(float(scale), dtype=torch.float32, device=b.device)
    out.view(-1).copy_(b + delta)
    return out


# ----------------------------------------------------------------------------- dispatch
KERNELS = _backends.OpKernels(merge_tensor_torch, native_op="merge_tensor",
                              triton_module="sparseft.kernels.merge", triton_function="merge_tensor_triton",
                              implemented=IMPLEMENTED)


# ----------------------------------------------------------------------------- checks
def _seed_arg(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int in [0, 2**63), got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int in [0, 2**63), got {type(value).__name__}") from None
    if not 0 <= value < 1 << 63:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {value}")
    return value


def _float_arg(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got a bool")
    try:
        value = float(value)  # ints, numpy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}") from None
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name}: expected a finite float (float32 range), got {value}")
    return value


def _per_task(values, name, T):
    if isinstance(values, torch.Tensor) and values.dim() == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name}: expected a list of {T} numbers (one per tuned tensor), got {type(values).__name__}")
    values = list(values)
    if len(values) != T:
        raise ValueError(f"{name}: expected {T} entries (one per tuned tensor), got {len(values)}")
    return values


def _overlaps(a, b):
    """Whether the memory of tensors a and b (contiguous or not) may intersect."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.data_ptr()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return lo, lo + (extent + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_args(base, tuned, weights, thresholds, keep_probs, seeds, consensus, scale, index_offset, out_dtype,
                out):
    """Checks the user-level arguments; returns the kernel-level ones (lists, empty = absent)."""
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base: expected a torch.Tensor, got {type(base).__name__}")
    if base.dtype not in FLOAT_DTYPES:
        raise TypeError(f"base: expected one of {FLOAT_DTYPES}, got {base.dtype}")
    if isinstance(tuned, torch.Tensor) or not isinstance(tuned, (list, tuple)):
        raise TypeError(f"tuned: expected a list or tuple of tensors, got {type(tuned).__name__}")
    T = len(tuned)
    if T == 0:
        raise ValueError("tuned: expected at least one tensor, got an empty sequence")
    for j, x in enumerate(tuned):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tuned[{j}]: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"tuned[{j}]: expected one of {FLOAT_DTYPES}, got {x.dtype}")
        if x.shape != base.shape:
            raise ValueError(f"tuned[{j}]: expected base's shape {tuple(base.shape)}, got {tuple(x.shape)}")
        if x.device != base.device:
            raise ValueError(f"tuned[{j}] is on {x.device} but base is on {base.device}")

    weights = [_float_arg(w, f"weights[{t}]") for t, w in enumerate(_per_task(weights, "weights", T))]
    theta = []
    if thresholds is not None:
        theta = [_float_arg(x, f"thresholds[{t}]") for t, x in enumerate(_per_task(thresholds, "thresholds", T))]
        for t, x in enumerate(theta):
            if x < 0:
                raise ValueError(f"thresholds[{t}]: expected a finite float >= 0, got {x}")
    probs, cutoffs, seed_list = [], [], []
    if keep_probs is not None:
        probs = _per_task(keep_probs, "keep_probs", T)
        for t, p in enumerate(probs):
            if isinstance(p, bool):
                raise TypeError(f"keep_probs[{t}]: expected a float in (0, 1], got a bool")
            try:
                p = float(p)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"keep_probs[{t}]: expected a float in (0, 1], got {type(p).__name__}") from None
            if not 0.0 < p <= 1.0:
                raise ValueError(f"keep_probs[{t}]: expected a float in (0, 1], got {p}")
            probs[t] = p
        if seeds is None:
            raise ValueError("seeds: keep_probs (DARE) needs one seed per tuned tensor, got None")
        seed_list = [_seed_arg(s, f"seeds[{t}]") for t, s in enumerate(_per_task(seeds, "seeds", T))]
        cutoffs = [dare_cutoff(p) for p in probs]
    elif seeds is not None:
        for t, s in enumerate(_per_task(seeds, "seeds", T)):  # checked, unused without keep_probs
            _seed_arg(s, f"seeds[{t}]")

    lam, k = 0.0, 0
    if consensus is not None:
        if (isinstance(consensus, (str, bytes, torch.Tensor)) or not hasattr(consensus, "__len__")
                or len(consensus) != 2):
            raise TypeError(f"consensus: expected None or a pair (lam >= 0, k >= 1), got {consensus!r}")
        lam = _float_arg(consensus[0], "consensus[0] (lam)")
        if lam < 0:
            raise ValueError(f"consensus[0] (lam): expected a finite float >= 0, got {lam}")
        if isinstance(consensus[1], bool):
            raise TypeError("consensus[1] (k): expected an int >= 1, got a bool")
        try:
            k = operator.index(consensus[1])
        except TypeError:
            raise TypeError(f"consensus[1] (k): expected an int >= 1, got {type(consensus[1]).__name__}") from None
        if k < 1:
            raise ValueError(f"consensus[1] (k): expected an int >= 1, got {k}")
    scale = _float_arg(scale, "scale")
    if isinstance(index_offset, bool):
        raise TypeError("index_offset: expected an int >= 0, got a bool")
    try:
        index_offset = operator.index(index_offset)
    except TypeError:
        raise TypeError(f"index_offset: expected an int >= 0, got {type(index_offset).__name__}") from None
    if index_offset < 0 or index_offset + base.numel() > (1 << 63) - 1:
        raise ValueError(f"index_offset: expected an int >= 0 (and offset + numel < 2**63), got {index_offset}")

    if out_dtype is None:
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else base.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {FLOAT_DTYPES}, got {out_dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.shape != base.shape:
            raise ValueError(f"out: expected base's shape {tuple(base.shape)}, got {tuple(out.shape)}")
        if out.dtype != out_dtype:
            raise TypeError(f"out: expected dtype {out_dtype} (out_dtype), got {out.dtype}")
        if out.device != base.device:
            raise ValueError(f"out is on {out.device} but base is on {base.device}")
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")
        in_place = out is base or (out.data_ptr() == base.data_ptr() and out.dtype == base.dtype
                                   and base.is_contiguous() and out.shape == base.shape)
        if not in_place and _overlaps(out, base):
            raise ValueError("out: overlaps base without being base itself (only out=base, an in-place merge, "
                             "may share memory)")
        for j, x in enumerate(tuned):
            if _overlaps(out, x):
                raise ValueError(f"out: overlaps tuned[{j}]; out may share memory only with base (in place)")
    return weights, theta, probs, cutoffs, seed_list, lam, k, scale, index_offset, out_dtype


def merge_tensor(base, tuned, *, weights, thresholds=None, keep_probs=None, seeds=None, elect_sign=False,
                 normalize=False, consensus=None, scale=1.0, index_offset=0, out_dtype=None, out=None,
                 backend=None):
    """The merge of ``base`` with the T tensors of ``tuned`` (see the module docstring), rounded
    once to ``out_dtype`` (default: out's dtype when out is given, else base's).

    weights: T floats w_t.  thresholds: None or T floats θ_t ≥ 0 (trim |τ_t| < θ_t).
    keep_probs: None or T floats p_t in (0, 1] (DARE; needs ``seeds``, T ints in [0, 2**63)).
    elect_sign / normalize: TIES sign election / divide by the (elected) weight sum.
    consensus: None or (lam ≥ 0, k ≥ 1).  scale: λ of b + λ·M.  index_offset: position of this
    tensor's first element in the whole (chunked merges).  out: preallocated output, may be base.
    backend: "torch" | "cpu" | "triton" | "cuda" | None (automatic; SPARSEFT_BACKEND forces one).
    Bad arguments raise TypeError/ValueError naming the argument before anything is written.
    """
    weights, theta, probs, cutoffs, seeds, lam, k, scale, index_offset, out_dtype = _check_args(
        base, tuned, weights, thresholds, keep_probs, seeds, consensus, scale, index_offset, out_dtype, out)
    name = KERNELS.resolve(base.device, backend)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    if base.numel() == 0:
        return out
    in_place = out.data_ptr() == base.data_ptr()
    base_c = base if in_place else base.contiguous()
    tuned_c = [x.contiguous() for x in tuned]
    KERNELS[name](base_c, tuned_c, weights, theta, probs, cutoffs, seeds, bool(elect_sign), bool(normalize),
                   lam, k, scale, index_offset, out)
    return out
