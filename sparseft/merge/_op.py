"""The one call site of the fused per-tensor merge op (sparseft.ops.merge.merge_tensor).

Until sparseft.ops.merge is present in a checkout this falls back to a plain float32 torch
stand-in of the same contract, so the merge API and its tests run either way.
"""

import hashlib

import torch

try:  # the op layer; the merge API never computes merges itself when it is there
    from sparseft.ops.merge import merge_tensor, task_seed  # noqa: F401
    HAVE_OP = True
except ImportError:  # pragma: no cover - only before sparseft.ops.merge lands
    HAVE_OP = False

    def task_seed(seed, *parts):
        digest = hashlib.blake2b(repr((int(seed), *map(str, parts))).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    def _keep(seed, numel, p, offset, device):
        # splitmix64-style counter hash of (seed, flat index) -> uniform in [0, 1)
        i = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
        x = i * -7046029254386353131 + seed  # wraps like uint64
        x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * -4658895280553007687
        x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * -7723592293110705685
        x = x ^ ((x >> 31) & ((1 << 33) - 1))
        u = ((x >> 40) & ((1 << 24) - 1)).double() / float(1 << 24)
        return u < p

    def merge_tensor(base, tuned, *, weights, thresholds=None, keep_probs=None, seeds=None, elect_sign=False,
                     normalize=False, consensus=None, scale=1.0, index_offset=0, out_dtype=None, out=None,
                     backend=None):
        b = base.float()
        d = []
        for t, x in enumerate(tuned):
            tau = x.float() - b
            k = torch.ones_like(tau, dtype=torch.bool)
            if thresholds is not None and thresholds[t] is not None:
                k &= tau.abs() >= float(thresholds[t])
            p = 1.0
            if keep_probs is not None and keep_probs[t] is not None and keep_probs[t] < 1:
                p = float(keep_probs[t])
                k &= _keep(seeds[t], tau.numel(), p, index_offset, tau.device).view(tau.shape)
            d.append(torch.where(k, weights[t] * tau / p, torch.zeros_like(tau)))
        if elect_sign:
            sigma = torch.where(sum(d) >= 0, 1.0, -1.0)
            m = [(torch.sign(x) == sigma).float() for x in d]
        else:
            m = [torch.ones_like(x) for x in d]
        merged = sum(mi * x for mi, x in zip(m, d))
        if normalize:
            divisor = sum(w * mi for w, mi in zip(weights, m))
            divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
            merged = merged / divisor
        if consensus is not None:
            lam, need = consensus
            votes = sum((x.abs() >= lam * (merged - x).abs()).int() for x in d)
            merged = merged * (votes >= need)
        result = (b + scale * merged).to(out_dtype or base.dtype)
        if out is not None:
            out.copy_(result)
            return out
        return result
