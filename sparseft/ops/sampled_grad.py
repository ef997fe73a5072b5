"""Sampled weight gradient: the entries of ``grad_output^T @ input`` at a mask, without the
dense [out, in] product.

    g[k] = sum_b grad_output[b, row_k] * input[b, col_k],   indices[k] = row_k * in + col_k

This is the weight gradient of a linear layer trained only at the mask (sparseft.sparse_linear).
Inputs are float32/bfloat16/float16, accumulation and the result are float32. The backends see
2-D inputs and indices already validated; they are registered as one torch custom op so
compiled models treat the op as an opaque node.
"""

import torch
from torch import Tensor

from sparseft import _backends, _ext
from sparseft.ops._chunking import chunk_budget_bytes

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IMPLEMENTED = ("torch", "cpu", "triton", "cuda")

# Mask density from which a layer's values gradient is cheaper as a dense GEMM into a temporary
# [out, in] gradient and a gather than with this op, per backend (SparseLinear decides per layer).
# Measured with `OMP_NUM_THREADS=1 sparseft bench sparse --crossover --repeats 10` on the 2-core
# EPYC (SmolLM2's MLP 576->1536, 512 tokens, float32, forward + backward, median time over
# nn.Linear's; bench/results/cpu-2core-epyc-sparse-linear-crossover-1thread.json); one thread,
# because on the shared machine two-thread timings were dominated by waits for a core.
DENSE_GEMM_MIN_DENSITY = {
    # sampled 0.74-0.87x up to 10%, 1.01x at 20% (GEMM path 1.00x), 1.04x at 30% (1.05x),
    # 1.20x at 40% (1.09x), 1.71x at 100% (0.92x): a tie from 20% to 30%, then the GEMM wins
    "cpu": 0.30,
    # the reference gathers columns: 0.93x at 0.25% (GEMM path 0.90x), 1.30x at 0.5% (1.01x)
    "torch": 0.005,
    # not measured (no GPU lent so far): only full masks, where the GEMM alone is the whole gradient
    "triton": 1.0,
    "cuda": 1.0,
}


def sampled_weight_grad_torch(grad_output, input, indices):
    """Plain-PyTorch reference: gathers the needed columns chunk by chunk over the entries, so
    at most ~SPARSEFT_CHUNK_BYTES of float32 temporaries live at once."""
    batch, in_features = input.shape
    grad = torch.zeros(indices.numel(), dtype=torch.float32, device=input.device)
    if indices.numel() == 0 or batch == 0:
        return grad
    # per entry of a chunk: two gathered columns, their float32 copies and the product
    chunk = max(1, chunk_budget_bytes() // (16 * batch))
    flat = indices.long()
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        rows, cols = part // in_features, part % in_features
        grad[start:start + chunk] = (grad_output[:, rows].float() * input[:, cols].float()).sum(0)
    return grad


def _native(grad_output, input, indices):
    """sparseft._C: the C++ kernel for CPU tensors, the CUDA kernel for CUDA tensors."""
    _ext.load()
    return torch.ops.sparseft_C.sampled_weight_grad(grad_output, input, indices)


def _triton(grad_output, input, indices):
    from sparseft.kernels.sampled_grad import sampled_weight_grad_triton
    return sampled_weight_grad_triton(grad_output, input, indices)


_BACKENDS = {"torch": sampled_weight_grad_torch, "cpu": _native, "triton": _triton, "cuda": _native}


@torch.library.custom_op("sparseft::sampled_weight_grad", mutates_args=())
def _sampled_weight_grad(grad_output: Tensor, input: Tensor, indices: Tensor, backend: str) -> Tensor:
    return _BACKENDS[backend](grad_output, input, indices)


@_sampled_weight_grad.register_fake
def _(grad_output, input, indices, backend):
    return grad_output.new_empty(indices.shape[0], dtype=torch.float32)


def sampled_grad_2d(grad_output, input, indices, backend):
    """The op on checked 2-D inputs and a validated mask (the autograd path of SparseLinear)."""
    return _sampled_weight_grad(grad_output, input, indices, backend)


def resolve_backend(device, backend=None):
    return _backends.resolve(device, _IMPLEMENTED, backend)


def _check_float(name, tensor):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def sampled_weight_grad(grad_output, input, indices, out_features, backend=None):
    """Entries of the weight gradient ``grad_output^T @ input`` of a linear layer at ``indices``.

    grad_output [..., out_features], input [..., in_features] with the same leading dims and
    dtype (float32/bfloat16/float16); indices: a mask for an [out_features, in_features] weight
    (sorted unique flat indices, int32, or int64 from 2**31 elements; see
    sparseft.masks.validate_mask). Returns float32 [nnz], accumulated in float32.
    """
    from sparseft.masks._validate import validate_mask

    _check_float("grad_output", grad_output)
    _check_float("input", input)
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    if grad_output.dim() < 1 or grad_output.shape[-1] != out_features:
        raise ValueError(f"grad_output must have shape [..., {out_features}] (out_features), "
                         f"got {tuple(grad_output.shape)}")
    if input.dim() < 1 or input.shape[:-1] != grad_output.shape[:-1]:
        raise ValueError(f"input must have shape [{', '.join(map(str, grad_output.shape[:-1]))}, in_features] "
                         f"(the leading dims of grad_output), got {tuple(input.shape)}")
    if input.dtype != grad_output.dtype:
        raise TypeError(f"input ({input.dtype}) and grad_output ({grad_output.dtype}) must have the same dtype")
    if input.device != grad_output.device:
        raise ValueError(f"input is on {input.device} but grad_output is on {grad_output.device}")
    if isinstance(indices, Tensor) and indices.device != input.device:
        raise ValueError(f"indices is on {indices.device} but input is on {input.device}")
    validate_mask(indices, out_features * input.shape[-1], "indices")
    chosen = resolve_backend(input.device, backend)
    return sampled_grad_2d(grad_output.reshape(-1, out_features), input.reshape(-1, input.shape[-1]),
                           indices, chosen)
