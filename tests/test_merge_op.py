"""The fused per-tensor merge op (sparseft.ops.merge): every option against a float64 reference
written out here from the contract, the cpu kernel bit for bit against the torch reference, the
DARE hash (numpy uint64 here), chunking, in-place merges, argument checks, and the Triton kernel
under the interpreter when sparseft.kernels.merge imports."""

import hashlib
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import numpy as np
import pytest
import torch

from sparseft import _backends
from sparseft.ops import merge as merge_op
from sparseft.ops.merge import dare_keep_mask, merge_tensor, task_seed

WEIGHTS = [0.7, -0.4, 1.3]
SEEDS = [11, 2**62 + 5, 2**63 - 1]


def _backend_reason(name):
    ok, reason = _backends.availability(name, "cpu")
    if ok:
        ok, reason = merge_op.KERNELS.status(name)
    return None if ok else reason


def _backend_params(names=("torch", "cpu")):
    params = []
    for name in names:
        reason = _backend_reason(name)
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return params


# ----------------------------------------------------------------------------- float64 reference
def _hash_np(seed, index):
    """The contract's hash in numpy uint64 (wrapping products, logical shifts)."""
    with np.errstate(over="ignore"):
        x = np.uint64(seed) ^ (index * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keep_np(seed, numel, p, offset=0):
    index = np.arange(offset, offset + numel, dtype=np.uint64)
    return torch.from_numpy((_hash_np(seed, index) >> np.uint64(40)) < np.uint64(round(p * 2**24)))


def _reference(base, tuned, weights, thresholds=None, keep_probs=None, seeds=None, elect_sign=False,
               normalize=False, consensus=None, scale=1.0, index_offset=0):
    """float64 from the module docstring's formula, written independently of merge_tensor_torch."""
    b = base.double().flatten()
    deltas = []
    for t, x in enumerate(tuned):
        tau = x.double().flatten() - b
        kept = torch.ones_like(tau, dtype=torch.bool)
        if thresholds is not None:
            kept &= tau.abs() >= thresholds[t]
        p = 1.0
        if keep_probs is not None:
            p = keep_probs[t]
            kept &= _keep_np(seeds[t], b.numel(), p, index_offset)
        deltas.append(torch.where(kept, weights[t] * tau / p, torch.zeros_like(tau)))
    d = torch.stack(deltas)
    if elect_sign:
        sigma = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
        m = (torch.sign(d) == sigma).double()
    else:
        m = torch.ones_like(d)
    merged = (m * d).sum(0)
    if normalize:
        den = (torch.tensor(weights, dtype=torch.float64)[:, None] * m).sum(0)
        merged = merged / torch.where(den.abs() < 1e-8, torch.ones_like(den), den)
    if consensus is not None:
        lam, k = consensus
        votes = (d.abs() >= lam * (merged - d).abs()).sum(0)
        merged = merged * (votes >= k)
    return (b + scale * merged).view(base.shape)


def _inputs(shape=(3, 1111), T=3, dtypes=None, seed=0, base_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    dtypes = dtypes or [torch.float32] * T
    tuned = [(base + 0.1 * torch.randn(shape, generator=g)).to(dt) for dt in dtypes]
    tuned[0].view(-1)[:50] = base.view(-1)[:50].to(tuned[0].dtype)  # τ = 0 (a float32 first task)
    return base.to(base_dtype), tuned


CASES = {
    "sum": dict(weights=[1.0, 1.0, 1.0]),
    "weights": dict(weights=WEIGHTS),
    "thresholds": dict(weights=WEIGHTS, thresholds=[0.05, 0.0, 0.12]),
    "dare": dict(weights=WEIGHTS, keep_probs=[0.3, 1.0, 0.9], seeds=SEEDS),
    "dare_trim": dict(weights=WEIGHTS, keep_probs=[0.5, 0.5, 0.5], seeds=SEEDS, thresholds=[0.05, 0.05, 0.05]),
    "elect_sign": dict(weights=WEIGHTS, elect_sign=True),
    "ties": dict(weights=WEIGHTS, thresholds=[0.05, 0.08, 0.02], elect_sign=True, normalize=True),
    "normalize": dict(weights=[0.2, 0.3, 0.1], normalize=True),
    "normalize_zero_sum": dict(weights=[0.5, -0.5, 0.0], normalize=True),
    "consensus": dict(weights=WEIGHTS, consensus=(0.5, 2)),
    "scale_offset": dict(weights=WEIGHTS, scale=0.35, index_offset=987_654_321),
    "everything": dict(weights=WEIGHTS, thresholds=[0.02, 0.04, 0.0], keep_probs=[0.6, 0.8, 1.0], seeds=SEEDS,
                       elect_sign=True, normalize=True, consensus=(1.0, 2), scale=0.8, index_offset=4097),
}


def _assert_close_f32(got, expected, what=""):
    expected = expected.to(got.device)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", _backend_params())
def test_matches_float64_reference(backend, case):
    base, tuned = _inputs()
    out = merge_tensor(base, tuned, backend=backend, **CASES[case])
    assert out.dtype == torch.float32 and out.shape == base.shape
    _assert_close_f32(out, _reference(base, tuned, **CASES[case]), case)


def test_options_change_the_result():
    """The cases differ from each other: each option acts on these inputs."""
    base, tuned = _inputs()
    results = {name: merge_tensor(base, tuned, backend="torch", **kw) for name, kw in CASES.items()}
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(results[a], results[b]), (a, b)


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", _backend_params())
def test_out_dtypes_and_mixed_input_dtypes(backend, out_dtype):
    base, tuned = _inputs(dtypes=[torch.bfloat16, torch.float16, torch.float32], base_dtype=torch.bfloat16)
    kw = CASES["everything"]
    out = merge_tensor(base, tuned, out_dtype=out_dtype, backend=backend, **kw)
    assert out.dtype == out_dtype
    expected = _reference(base, tuned, **kw)
    if out_dtype == torch.float32:
        _assert_close_f32(out, expected)
    else:  # one rounding of a float32 value: within one unit in the last place of out_dtype
        torch.testing.assert_close(out, expected.to(out_dtype))
    assert merge_tensor(base, tuned, backend=backend, weights=WEIGHTS).dtype == torch.bfloat16  # base's dtype


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@pytest.mark.skipif(_backend_reason("cpu") is not None, reason=f"cpu backend: {_backend_reason('cpu')}")
@pytest.mark.parametrize("numel", (1, 7, 1024, 1025, 4099))
@pytest.mark.parametrize("T", (1, 2, 5))
def test_cpu_kernel_is_bit_exact_with_the_torch_reference(T, numel):
    """The same float32 ops in the same order: equal bits, every option, every output dtype."""
    g = torch.Generator().manual_seed(T * 10_000 + numel)
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[t % 3] for t in range(T)]
    base = torch.randn(numel, generator=g)
    tuned = [(base + 0.05 * torch.randn(numel, generator=g)).to(dt) for dt in dtypes]
    weights = (torch.rand(T, generator=g) * 2 - 0.5).tolist()
    options = [
        {},
        dict(thresholds=[0.03] * T),
        dict(keep_probs=[0.1 + 0.9 * (t + 1) / T for t in range(T)], seeds=list(range(7, 7 + T))),
        dict(elect_sign=True),
        dict(elect_sign=True, normalize=True),
        dict(normalize=True),
        dict(consensus=(0.7, max(1, T - 1))),
        dict(thresholds=[0.01] * T, keep_probs=[0.7] * T, seeds=list(range(T)), elect_sign=True, normalize=True,
             consensus=(0.5, 1), scale=1.7, index_offset=2**40 + 3),
    ]
    for kw in options:
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = merge_tensor(base, tuned, weights=weights, out_dtype=out_dtype, backend="torch", **kw)
            got = merge_tensor(base, tuned, weights=weights, out_dtype=out_dtype, backend="cpu", **kw)
            assert torch.equal(_bits(got), _bits(ref)), (kw, out_dtype)


@pytest.mark.parametrize("backend", _backend_params())
def test_chunks_with_index_offset_equal_the_whole(backend):
    base, tuned = _inputs(shape=(5000,))
    kw = dict(CASES["everything"], index_offset=0)
    whole = merge_tensor(base, tuned, backend=backend, **kw)
    bounds = [0, 1, 1000, 1027, 3333, 5000]  # not aligned to vectors or blocks
    for lo, hi in zip(bounds, bounds[1:]):
        part = merge_tensor(base[lo:hi], [x[lo:hi] for x in tuned], backend=backend, **dict(kw, index_offset=lo))
        assert torch.equal(_bits(part), _bits(whole[lo:hi])), (lo, hi)


# ----------------------------------------------------------------------------- DARE and seeds
def _splitmix_py(seed, i):
    mask = (1 << 64) - 1
    x = seed ^ (i * 0x9E3779B97F4A7C15 & mask)
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & mask
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & mask
    return x ^ (x >> 31)


def test_dare_hash_matches_python_integers():
    for seed in (0, 1, 2**63 - 1, 0x123456789ABCDEF):
        index = torch.tensor([0, 1, 12345, 2**40 + 7, 2**62 - 1], dtype=torch.int64)
        got = merge_op.dare_hash(seed, index).tolist()
        assert [v % 2**64 for v in got] == [_splitmix_py(seed, i) for i in index.tolist()]
        assert [int(v) for v in _hash_np(seed, index.numpy().astype(np.uint64))] == [v % 2**64 for v in got]


@pytest.mark.parametrize("p", (0.1, 0.5, 0.9, 1.0, 2**-26))
def test_dare_keep_mask_reference_and_statistics(p):
    n, seed = 200_000, task_seed(3, "w", 0)
    mask = dare_keep_mask(seed, n, p, index_offset=17)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert torch.equal(mask, _keep_np(seed, n, p, 17))
    q = round(p * 2**24) / 2**24
    sigma = (n * q * (1 - q)) ** 0.5
    assert abs(mask.sum().item() - n * q) <= 5 * sigma + 1e-9
    if p == 1.0:
        assert mask.all()
    # a chunk of the mask is the mask of the chunk
    assert torch.equal(dare_keep_mask(seed, 1000, p, index_offset=17 + 5000), mask[5000:6000])
    other = dare_keep_mask(seed + 1, n, p, index_offset=17)
    if 0.0 < q < 1.0:
        assert not torch.equal(mask, other)


@pytest.mark.parametrize("backend", _backend_params())
def test_dare_mask_in_the_op_is_the_reference_mask(backend):
    """One task, τ = 1, weight 1: out = 1/p where kept, 0 elsewhere; every backend uses the mask bit for bit."""
    n, p, seed, offset = 3001, 0.37, 2**62 + 12345, 999
    out = merge_tensor(torch.zeros(n), [torch.ones(n)], weights=[1.0], keep_probs=[p], seeds=[seed],
                       index_offset=offset, backend=backend)
    mask = dare_keep_mask(seed, n, p, index_offset=offset)
    assert torch.equal(out != 0, mask)
    assert torch.equal(out[mask], torch.full((int(mask.sum()),), 1 / torch.tensor(p, dtype=torch.float32).item()))


def test_task_seed_is_stable():
    assert task_seed(0, "model.layers.0.mlp.down_proj.weight", 1) == 6526178381543083094  # pinned: never changes
    assert task_seed(42) == 4065376765926183791
    payload = json.dumps([7, "lm_head.weight", 2], separators=(",", ":")).encode()
    expected = int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & (2**63 - 1)
    assert task_seed(7, "lm_head.weight", 2) == expected
    seeds = {task_seed(0, "w", t) for t in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert task_seed(0, "1") != task_seed(0, 1)
    with pytest.raises(TypeError, match="task_seed"):
        task_seed(0, object())


# ----------------------------------------------------------------------------- in place, dispatch
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", _backend_params())
def test_out_is_base_merges_in_place(backend, dtype):
    base, tuned = _inputs(shape=(2000,), base_dtype=dtype)
    expected = merge_tensor(base, tuned, backend=backend, **CASES["everything"])
    result = merge_tensor(base, tuned, out=base, backend=backend, **CASES["everything"])
    assert result is base
    assert torch.equal(_bits(base), _bits(expected))


def test_missing_kernel_falls_back_unless_requested(monkeypatch):
    monkeypatch.delenv("SPARSEFT_BACKEND", raising=False)
    monkeypatch.setattr(merge_op.KERNELS, "status", lambda name: (name == "torch", f"no {name} kernel"))
    base, tuned = _inputs(shape=(10,))
    out = merge_tensor(base, tuned, weights=WEIGHTS)
    _assert_close_f32(out, _reference(base, tuned, weights=WEIGHTS))
    with pytest.raises(RuntimeError, match="no cpu kernel"):
        merge_tensor(base, tuned, weights=WEIGHTS, backend="cpu")


def test_empty_tensor():
    base = torch.empty(0, 4)
    out = merge_tensor(base, [base.clone()], weights=[1.0], keep_probs=[0.5], seeds=[1], backend="cpu"
                       if _backend_reason("cpu") is None else "torch")
    assert out.shape == (0, 4)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    base, tuned = _inputs(shape=(4, 6))
    ok = dict(weights=WEIGHTS)
    return [
        ("tuned empty", dict(tuned=[]), ValueError, r"tuned: expected at least one"),
        ("tuned not a list", dict(tuned=tuned[0]), TypeError, r"tuned: expected a list"),
        ("tuned shape", dict(tuned=[tuned[0], tuned[1][:, :5], tuned[2]]),
         ValueError, r"tuned\[1\]: expected base's shape"),
        ("tuned device", dict(tuned=[tuned[0], tuned[1], tuned[2].to("meta")]), ValueError, r"tuned\[2\] is on meta"),
        ("tuned dtype", dict(tuned=[tuned[0], tuned[1].long(), tuned[2]]), TypeError, r"tuned\[1\]: expected one of"),
        ("base dtype", dict(base=base.double()), TypeError, r"base: expected one of"),
        ("base int", dict(base=base.int()), TypeError, r"base: expected one of"),
        ("weights length", dict(weights=[1.0, 2.0]), ValueError, r"weights: expected 3 entries"),
        ("weights nan", dict(weights=[1.0, float("nan"), 1.0]), ValueError, r"weights\[1\]: expected a finite"),
        ("weights too big", dict(weights=[1.0, 1.0, 1e300]), ValueError, r"weights\[2\]: expected a finite"),
        ("weights string", dict(weights=[1.0, "a", 1.0]), TypeError, r"weights\[1\]: expected a float"),
        ("thresholds length", dict(thresholds=[0.1]), ValueError, r"thresholds: expected 3 entries"),
        ("thresholds negative", dict(thresholds=[-0.1, 0.0, 0.0]),
         ValueError, r"thresholds\[0\]: expected a finite float >= 0"),
        ("thresholds inf", dict(thresholds=[0.0, 0.0, float("inf")]), ValueError, r"thresholds\[2\]"),
        ("keep_probs zero", dict(keep_probs=[0.0, 0.5, 0.5], seeds=[1, 2, 3]),
         ValueError, r"keep_probs\[0\]: expected a float in \(0, 1\]"),
        ("keep_probs above one", dict(keep_probs=[1.0, 1.5, 0.5], seeds=[1, 2, 3]), ValueError, r"keep_probs\[1\]"),
        ("keep_probs length", dict(keep_probs=[0.5, 0.5], seeds=[1, 2, 3]),
         ValueError, r"keep_probs: expected 3 entries"),
        ("seeds missing", dict(keep_probs=[0.5, 0.5, 0.5]), ValueError, r"seeds: keep_probs \(DARE\) needs"),
        ("seeds length", dict(keep_probs=[0.5, 0.5, 0.5], seeds=[1, 2]), ValueError, r"seeds: expected 3 entries"),
        ("seeds negative", dict(keep_probs=[0.5, 0.5, 0.5], seeds=[-1, 2, 3]),
         ValueError, r"seeds\[0\]: expected an int in \[0, 2\*\*63\)"),
        ("seeds too big", dict(keep_probs=[0.5, 0.5, 0.5], seeds=[1, 2**63, 3]), ValueError, r"seeds\[1\]"),
        ("seeds float", dict(keep_probs=[0.5, 0.5, 0.5], seeds=[1, 2, 3.5]), TypeError, r"seeds\[2\]"),
        ("consensus lam", dict(consensus=(-1.0, 1)), ValueError, r"consensus\[0\] \(lam\)"),
        ("consensus k", dict(consensus=(0.5, 0)), ValueError, r"consensus\[1\] \(k\)"),
        ("consensus k float", dict(consensus=(0.5, 1.5)), TypeError, r"consensus\[1\] \(k\)"),
        ("consensus shape", dict(consensus=(0.5,)), TypeError, r"consensus: expected None or a pair"),
        ("scale nan", dict(scale=float("nan")), ValueError, r"scale: expected a finite"),
        ("index_offset negative", dict(index_offset=-1), ValueError, r"index_offset: expected an int >= 0"),
        ("index_offset float", dict(index_offset=1.0), TypeError, r"index_offset"),
        ("out_dtype", dict(out_dtype=torch.int32), TypeError, r"out_dtype: expected one of"),
        ("out shape", dict(out=torch.zeros(4, 5)), ValueError, r"out: expected base's shape"),
        ("out dtype", dict(out=torch.zeros(4, 6, dtype=torch.bfloat16), out_dtype=torch.float32),
         TypeError, r"out: expected dtype"),
        ("out not contiguous", dict(out=torch.zeros(6, 4).t()), ValueError, r"out: expected a contiguous"),
        ("out aliases tuned", dict(out=tuned[1]), ValueError, r"out: overlaps tuned\[1\]"),
        ("backend", dict(backend="nope"), ValueError, r"backend must be one of"),
    ], base, tuned, ok


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])), ids=[c[0] for c in _bad_cases()[0]])
def test_bad_input_names_the_argument_and_writes_nothing(index):
    cases, base, tuned, ok = _bad_cases()
    _, change, exc, match = cases[index]
    args = dict(ok, base=base, tuned=tuned, out=torch.full(base.shape, 123.0))
    args.update(change)
    snapshot = [base.clone(), *(x.clone() for x in tuned)]
    out_before = args["out"].clone() if isinstance(args["out"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        merge_tensor(args.pop("base"), args.pop("tuned"), **args)
    assert torch.equal(snapshot[0], base) and all(torch.equal(a, b) for a, b in zip(snapshot[1:], tuned))
    if out_before is not None:
        assert torch.equal(args["out"], out_before)


def test_out_overlapping_base_partially_is_refused():
    storage = torch.zeros(20)
    base, out = storage[:10], storage[5:15]
    with pytest.raises(ValueError, match=r"out: overlaps base"):
        merge_tensor(base, [torch.ones(10)], weights=[1.0], out=out)
    assert torch.equal(storage, torch.zeros(20))


# ----------------------------------------------------------------------------- Triton
_TRITON_REASON = _backend_reason("triton")


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton merge kernel unavailable: {_TRITON_REASON}")
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("case", ("weights", "dare_trim", "ties", "everything"))
def test_triton_kernel_matches_the_references(case, out_dtype):
    """Under TRITON_INTERPRET=1 on CPU tensors (small shapes: the interpreter is slow). GPU kernels
    may fuse b + scale·M into one FMA: within float32 rounding of the torch reference, and the DARE
    mask itself bit for bit (the dare_trim case's kept pattern)."""
    base, tuned = _inputs(shape=(3, 301), dtypes=[torch.float32, torch.bfloat16, torch.float16])
    kw = CASES[case]
    got = merge_tensor(base, tuned, out_dtype=out_dtype, backend="triton", **kw)
    ref = merge_tensor(base, tuned, out_dtype=out_dtype, backend="torch", **kw)
    if out_dtype == torch.float32:
        _assert_close_f32(got, _reference(base, tuned, **kw), case)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got, ref)
    if "keep_probs" in kw:
        one = merge_tensor(torch.zeros(1000), [torch.ones(1000)], weights=[1.0], keep_probs=[0.4], seeds=[SEEDS[1]],
                           index_offset=77, backend="triton")
        assert torch.equal(one != 0, dare_keep_mask(SEEDS[1], 1000, 0.4, index_offset=77))


# ----------------------------------------------------------------------------- on a GPU
def _gpu_params():
    params = []
    for name in ("cuda", "triton"):
        if not torch.cuda.is_available():
            reason = "no CUDA device"
        elif name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            reason = "TRITON_INTERPRET=1 runs Triton on CPU tensors"
        else:
            ok, reason = _backends.availability(name, "cuda")
            if ok:
                ok, reason = merge_op.KERNELS.status(name)
            reason = None if ok else reason
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")) if reason else name)
    return params


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", _gpu_params())
def test_gpu_backends_match_the_references(backend, case, out_dtype):
    """CUDA tensors: float32 within rounding of the float64 reference and of the torch reference
    (a GPU kernel may fuse b + scale·M into one FMA); the DARE mask bit for bit."""
    base, tuned = _inputs(shape=(7, 4099), dtypes=[torch.float32, torch.bfloat16, torch.float16])
    base, tuned = base.cuda(), [x.cuda() for x in tuned]
    kw = CASES[case]
    got = merge_tensor(base, tuned, out_dtype=out_dtype, backend=backend, **kw)
    ref = merge_tensor(base, tuned, out_dtype=out_dtype, backend="torch", **kw)
    if out_dtype == torch.float32:
        _assert_close_f32(got, _reference(base.cpu(), [x.cpu() for x in tuned], **kw), case)
    torch.testing.assert_close(got, ref, rtol=1e-6 if out_dtype == torch.float32 else None,
                               atol=1e-6 if out_dtype == torch.float32 else None)
    n, p = 100_003, 0.37
    one = merge_tensor(torch.zeros(n, device="cuda"), [torch.ones(n, device="cuda")], weights=[1.0], keep_probs=[p],
                       seeds=[SEEDS[1]], index_offset=2**33, backend=backend)
    assert torch.equal((one != 0).cpu(), dare_keep_mask(SEEDS[1], n, p, index_offset=2**33))
    in_place = base.clone()
    merge_tensor(in_place, tuned, out=in_place, out_dtype=torch.float32, backend=backend, **kw)
    if out_dtype == torch.float32:
        assert torch.equal(in_place, got)
