"""sampled_weight_grad (every backend) and SparseLinear / sparsify / unsparsify."""

import copy
import io
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton runs on CPU tensors

import pytest
import torch
from torch import nn

from sparseft import _backends, sparse_linear
from sparseft.kernels.sampled_grad import sampled_weight_grad_triton
from sparseft.ops.sampled_grad import DENSE_GEMM_MIN_DENSITY, sampled_weight_grad
from sparseft.sparse_linear import SparseLinear, sparsify, unsparsify

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if _backends.availability(b, "cpu")[0]]
HAS_CUDA = torch.cuda.is_available()


def random_mask(out_features, in_features, density, seed=0):
    numel = out_features * in_features
    gen = torch.Generator().manual_seed(seed)
    nnz = int(round(numel * density))
    return torch.randperm(numel, generator=gen)[:nnz].sort().values.to(torch.int32)


def dense_grad_at(grad_output, input, indices):
    dy = grad_output.double().reshape(-1, grad_output.shape[-1])
    x = input.double().reshape(-1, input.shape[-1])
    return (dy.T @ x).reshape(-1)[indices.long()]


def tolerance(dtype, batch):
    # inputs are exact in float64; only float32 accumulation order differs
    return 1e-5 * max(batch, 1) ** 0.5 * (1 if dtype == torch.float32 else 4)


# ----------------------------------------------------------------------------- the op

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70, 130, 0.1), (16, 64, 64, 1.0), (5, 3, 200, 0.5), (19, 130, 20, 0.02)])
def test_sampled_grad_matches_dense_gather(backend, dtype, shape):
    batch, out_features, in_features, density = shape
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(batch, out_features, generator=gen).to(dtype)
    x = torch.randn(batch, in_features, generator=gen).to(dtype)
    idx = random_mask(out_features, in_features, density)
    got = sampled_weight_grad(dy, x, idx, out_features, backend=backend)
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.double(), dense_grad_at(dy, x, idx), rtol=0, atol=tolerance(dtype, batch))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampled_grad_leading_dims_fp16_and_empty(backend):
    gen = torch.Generator().manual_seed(2)
    dy = torch.randn(2, 3, 5, 24, generator=gen).half()
    x = torch.randn(2, 3, 5, 40, generator=gen).half()
    idx = random_mask(24, 40, 0.3)
    got = sampled_weight_grad(dy, x, idx, 24, backend=backend)
    torch.testing.assert_close(got.double(), dense_grad_at(dy, x, idx), rtol=0, atol=tolerance(torch.half, 30))
    empty = torch.empty(0, dtype=torch.int32)
    assert sampled_weight_grad(dy, x, empty, 24, backend=backend).shape == (0,)
    no_rows = sampled_weight_grad(dy[:, :0], x[:, :0], idx, 24, backend=backend)
    assert torch.equal(no_rows, torch.zeros(idx.numel()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampled_grad_batch_blocks_and_strided_rows(backend):
    """A batch longer than the CPU kernel's block and row-strided (non-contiguous) inputs."""
    if backend == "triton":
        pytest.skip("the interpreter is slow; the Triton kernel's B-loop is covered above")
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(2500, 48, generator=gen)[:, :33]
    x = torch.randn(2500, 70, generator=gen)[:, 5:69]
    idx = random_mask(33, 64, 0.2)
    got = sampled_weight_grad(dy, x, idx, 33, backend=backend)
    torch.testing.assert_close(got.double(), dense_grad_at(dy, x, idx), rtol=0, atol=tolerance(torch.float32, 2500))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not available")
def test_triton_int64_indices():
    gen = torch.Generator().manual_seed(4)
    dy, x = torch.randn(9, 20, generator=gen), torch.randn(9, 70, generator=gen)
    idx = random_mask(20, 70, 0.1).long()
    torch.testing.assert_close(sampled_weight_grad_triton(dy, x, idx).double(), dense_grad_at(dy, x, idx),
                               rtol=0, atol=1e-5)


def test_triton_grid_within_cuda_limits(monkeypatch):
    """More row tiles than grid dimension 1 takes (65535): the launch still covers every tile
    within CUDA's limits. The kernel is a stub and BLOCK_M is 1, so the weight stays small."""
    from sparseft.kernels import sampled_grad as kernels

    grids = []

    class Stub:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "_sampled_grad_tile_kernel", Stub())
    monkeypatch.setattr(kernels, "BLOCK_M", 1)
    out_features, in_features = 70_000, 2 * kernels.BLOCK_N + 1  # 70000 x 3 tiles
    sampled_weight_grad_triton(torch.zeros(1, out_features), torch.zeros(1, in_features),
                               torch.tensor([0], dtype=torch.int32))
    (grid,) = grids
    assert grid[0] < 2**31 and all(size <= 65535 for size in grid[1:])
    assert math.prod(grid) == out_features * 3


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sampled_grad_cuda(backend, dtype):
    if not _backends.availability(backend, "cuda")[0]:
        pytest.skip(_backends.availability(backend, "cuda")[1])
    gen = torch.Generator().manual_seed(5)
    for batch, out_features, in_features, density in [(300, 200, 130, 0.05), (64, 64, 64, 1.0), (7, 3, 500, 0.3)]:
        dy = torch.randn(batch, out_features, generator=gen).to(dtype)
        x = torch.randn(batch, in_features, generator=gen).to(dtype)
        idx = random_mask(out_features, in_features, density)
        got = sampled_weight_grad(dy.cuda(), x.cuda(), idx.cuda(), out_features, backend=backend)
        torch.testing.assert_close(got.cpu().double(), dense_grad_at(dy, x, idx), rtol=0,
                                   atol=tolerance(dtype, batch))


@pytest.mark.parametrize("call, error, match", [
    (lambda dy, x, i: sampled_weight_grad(dy.long(), x, i, 8), TypeError, "grad_output"),
    (lambda dy, x, i: sampled_weight_grad(dy, x.double(), i, 8), TypeError, "input"),
    (lambda dy, x, i: sampled_weight_grad(dy, x.half(), i, 8), TypeError, "same dtype"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, i, 9), ValueError, "out_features"),
    (lambda dy, x, i: sampled_weight_grad(dy, x[:3], i, 8), ValueError, "input"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, i.long(), 8), TypeError, "indices"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, i.flip(0), 8), ValueError, "indices"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, torch.tensor([1, 1], dtype=torch.int32), 8), ValueError, "indices"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, torch.tensor([3, 80], dtype=torch.int32), 8), ValueError, "indices"),
    (lambda dy, x, i: sampled_weight_grad(dy, x, i, 8, backend="nope"), ValueError, "backend"),
])
def test_sampled_grad_bad_input(call, error, match):
    dy, x, idx = torch.randn(4, 8), torch.randn(4, 10), random_mask(8, 10, 0.5)
    with pytest.raises(error, match=match):
        call(dy, x, idx)


# ----------------------------------------------------------------------------- SparseLinear

def make_pair(in_features=12, out_features=9, bias=True, density=0.3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    idx = random_mask(out_features, in_features, density, seed)
    sparse = SparseLinear.from_linear(copy.deepcopy(dense), idx)
    return dense, sparse, idx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear(backend, bias):
    dense, sparse, idx = make_pair(bias=bias)
    sparse.backend = backend
    x = torch.randn(2, 5, 12, dtype=torch.float64).float()
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, y_sparse = dense(x_dense), sparse(x_sparse)
    torch.testing.assert_close(y_sparse, y_dense, rtol=0, atol=0)
    upstream = torch.randn_like(y_dense)
    y_dense.backward(upstream)
    y_sparse.backward(upstream)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad)
    expected = dense_grad_at(upstream, x, idx)
    torch.testing.assert_close(sparse.weight_values.grad.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse.weight_values.grad, dense.weight.grad.view(-1)[idx.long()])
    if bias:
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    assert sparse.weight.grad is None and not sparse.weight.requires_grad


def test_sparse_linear_layout_and_gradient_accumulation():
    _, sparse, idx = make_pair()
    assert sparse.weight_values._sparseft_module is sparse
    assert torch.equal(sparse.weight_values, sparse.weight.view(-1)[idx.long()])
    assert set(sparse.state_dict()) == {"weight", "bias", "weight_values", "weight_indices"}
    x1, x2 = torch.randn(4, 12), torch.randn(6, 12)
    sparse(x1).square().sum().backward()
    sparse(x2).square().sum().backward()
    accumulated = sparse.weight_values.grad.clone()
    sparse.weight_values.grad = None
    sparse(torch.cat([x1, x2])).square().sum().backward()
    torch.testing.assert_close(accumulated, sparse.weight_values.grad)
    assert sparse.weight.grad is None


def test_sparse_linear_bf16_weights_and_autocast():
    dense, sparse, idx = make_pair(dtype=torch.bfloat16)
    x = torch.randn(3, 12).bfloat16()
    sparse(x).float().sum().backward()
    assert sparse.weight_values.grad.dtype == torch.bfloat16
    dense(x).float().sum().backward()
    torch.testing.assert_close(sparse.weight_values.grad, dense.weight.grad.view(-1)[idx.long()])

    dense, sparse, idx = make_pair()
    x = torch.randn(3, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and sparse.weight_values.grad.dtype == torch.float32
    assert sparse.bias.grad.dtype == torch.float32
    ones = torch.ones(3, 9, dtype=torch.float64)
    expected = dense_grad_at(ones, x.detach().bfloat16(), idx)
    torch.testing.assert_close(sparse.weight_values.grad.double(), expected, rtol=0, atol=1e-5)


def test_reindex_and_state_dict_round_trip():
    _, sparse, idx = make_pair()
    values = sparse.weight_values
    new_idx = random_mask(9, 12, 0.5, seed=7)
    sparse.reindex_(new_idx)
    assert sparse.weight_values is values and values.shape == new_idx.shape
    assert torch.equal(values, sparse.weight.view(-1)[new_idx.long()])
    with torch.no_grad():  # what SparseAdamW does: the values and the weight move together
        sparse.weight_values.add_(1.0)
        sparse.weight.view(-1)[new_idx.long()] += 1.0
    saved = io.BytesIO()
    torch.save(sparse.state_dict(), saved)
    saved.seek(0)
    _, other, _ = make_pair(seed=3)
    other.load_state_dict(torch.load(saved, weights_only=True))
    assert torch.equal(other.weight_indices, new_idx)
    assert torch.equal(other.weight, sparse.weight) and torch.equal(other.weight_values, sparse.weight_values)
    assert other.weight_values._sparseft_module is other
    clone = copy.deepcopy(other)
    assert clone.weight_values._sparseft_module is clone


def test_sparse_linear_torch_compile():
    _, sparse, idx = make_pair()
    eager = copy.deepcopy(sparse)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 12)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x_compiled).square().sum().backward()
    eager(x_eager).square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    torch.testing.assert_close(sparse.weight_values.grad, eager.weight_values.grad)


# ----------------------------------------------------------------------------- the dense-GEMM path

def force_path(sparse, dense_gemm):
    sparse.dense_gemm_min_density = 0.0 if dense_gemm else math.inf
    return sparse


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("dense_gemm", [False, True], ids=["sampled", "dense_gemm"])
def test_both_values_gradient_paths_keep_the_sampled_contract(backend, density, dense_gemm):
    dense, sparse, idx = make_pair(density=density)
    sparse.backend = backend
    force_path(sparse, dense_gemm)
    assert sparse.uses_dense_gemm(backend) == dense_gemm
    x = torch.randn(2, 5, 12, dtype=torch.float64).float()
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(2, 5, 9)
    dense(x_dense).backward(upstream)
    sparse(x_sparse).backward(upstream)
    torch.testing.assert_close(sparse.weight_values.grad.double(), dense_grad_at(upstream, x, idx), rtol=0, atol=1e-5)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    assert sparse.weight.grad is None


def test_dense_gemm_path_dtypes():
    """As the sampled kernel: float32 accumulation of the compute-dtype operands, stored in the
    values' dtype (bf16 weights; float32 weights under bf16 autocast)."""
    _, sparse, idx = make_pair(dtype=torch.bfloat16)
    x = torch.randn(3, 12).bfloat16()
    force_path(sparse, True)(x).float().sum().backward()
    assert sparse.weight_values.grad.dtype == torch.bfloat16
    expected = dense_grad_at(torch.ones(3, 9), x, idx).to(torch.bfloat16)
    assert torch.equal(sparse.weight_values.grad, expected)  # exact sums of bf16 products, rounded once

    _, sparse, idx = make_pair()
    x = torch.randn(3, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = force_path(sparse, True)(x)
    y.float().sum().backward()
    assert sparse.weight_values.grad.dtype == torch.float32
    expected = dense_grad_at(torch.ones(3, 9, dtype=torch.float64), x.detach().bfloat16(), idx)
    torch.testing.assert_close(sparse.weight_values.grad.double(), expected, rtol=0, atol=1e-5)


def test_dense_gemm_chosen_per_layer_from_density(monkeypatch):
    assert all(0.0 < threshold <= 1.0 for threshold in DENSE_GEMM_MIN_DENSITY.values())  # full masks: GEMM
    for backend in DENSE_GEMM_MIN_DENSITY:
        monkeypatch.setitem(DENSE_GEMM_MIN_DENSITY, backend, 0.5)
    _, below, _ = make_pair(density=0.4)
    _, at, _ = make_pair(density=0.5)
    assert not below.uses_dense_gemm("cpu") and at.uses_dense_gemm("cpu")

    def sampled_op_must_not_run(*args):
        raise AssertionError("the sampled kernel ran for a layer above the crossover")

    monkeypatch.setattr(sparse_linear, "sampled_grad_2d", sampled_op_must_not_run)
    at(torch.randn(4, 12)).sum().backward()
    assert at.weight_values.grad.shape == at.weight_indices.shape
    with pytest.raises(AssertionError, match="sampled kernel ran"):
        force_path(at, False)(torch.randn(4, 12)).sum().backward()


def test_full_mask_takes_the_gemm_and_compiles():
    dense, sparse, idx = make_pair(density=1.0)
    assert all(sparse.uses_dense_gemm(backend) for backend in DENSE_GEMM_MIN_DENSITY)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 12)
    compiled(x).square().sum().backward()
    dense(x).square().sum().backward()
    torch.testing.assert_close(sparse.weight_values.grad, dense.weight.grad.view(-1))


# ----------------------------------------------------------------------------- sparsify

def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def llama_masks(model, density=0.1):
    return {name: random_mask(*p.shape, density, seed=i)
            for i, (name, p) in enumerate(model.named_parameters())
            if name.endswith(("q_proj.weight", "down_proj.weight"))}


def test_sparsify_unsparsify_tiny_llama():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    masks = llama_masks(model)
    ids = torch.randint(0, 128, (2, 10))
    assert sparsify(model, masks) is model
    sparse_modules = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert sparse_modules == {name[:-len(".weight")] for name in masks}
    assert set(reference.state_dict()) <= set(model.state_dict())

    loss = model(input_ids=ids, labels=ids).loss
    ref_loss = reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, idx in masks.items():
        module = model.get_submodule(name[:-len(".weight")])
        assert module.weight.grad is None
        torch.testing.assert_close(module.weight_values.grad, ref_params[name].grad.view(-1)[idx.long()],
                                   rtol=1e-4, atol=1e-6)

    # an SparseAdamW-like step, then a sparsified copy loads the state dict, then unsparsify
    with torch.no_grad():
        for name, idx in masks.items():
            module = model.get_submodule(name[:-len(".weight")])
            module.weight_values.sub_(0.1 * module.weight_values.grad)
            module.weight.view(-1)[idx.long()] = module.weight_values
    other = sparsify(tiny_llama(), llama_masks(tiny_llama(), density=0.3))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)

    trained = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("_values", "_indices"))}
    assert unsparsify(model) is model
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert set(model.state_dict()) == set(trained)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not any(p.requires_grad for p in model.parameters())  # sparsify froze them, the linears too


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_sparsify_trains_only_the_masked_entries_and_train_patterns():
    model = tiny_llama()
    masks = llama_masks(model)
    values = {name[:-len("weight")] + "weight_values" for name in masks}
    sparsify(model, masks)
    assert trainable(model) == values

    norms = {name for name, _ in model.named_parameters() if "norm" in name}
    sparsify(model, {}, train=[r"norm"])  # the modules sparsified before keep training their values
    assert trainable(model) == values | norms

    fresh = tiny_llama()
    sparsify(fresh, masks, train=r"layers\.0\.self_attn\.")  # never the dense weight of a sparse layer
    assert trainable(fresh) == values | {f"model.layers.0.self_attn.{n}_proj.weight" for n in "kvo"}


def test_sparsify_reindexes_sparsified_modules():
    model = tiny_llama()
    masks = llama_masks(model)
    sparsify(model, masks)
    name = next(iter(masks))
    module = model.get_submodule(name[:-len(".weight")])
    values = module.weight_values
    new = random_mask(*module.weight.shape, 0.5, seed=11)
    sparsify(model, {name: new})
    assert model.get_submodule(name[:-len(".weight")]) is module and module.weight_values is values
    assert torch.equal(module.weight_indices, new) and values.numel() == new.numel()


def test_sparsify_bad_input():
    model = tiny_llama()
    good = random_mask(32, 32, 0.1)
    with pytest.raises(ValueError, match="model.layers.0.nope.weight"):
        sparsify(model, {"model.layers.0.nope.weight": good})
    with pytest.raises(ValueError, match="q_proj.bias"):
        sparsify(model, {"model.layers.0.self_attn.q_proj.bias": good})
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        sparsify(model, {"model.layers.0.input_layernorm.weight": torch.tensor([0], dtype=torch.int32)})
    with pytest.raises(ValueError, match="q_proj.weight"):
        sparsify(model, {"model.layers.0.self_attn.q_proj.weight": torch.tensor([5, 3], dtype=torch.int32)})
    with pytest.raises(ValueError, match="q_proj.weight"):
        sparsify(model, {"model.layers.0.self_attn.q_proj.weight": torch.tensor([5, 32 * 32], dtype=torch.int32)})
    with pytest.raises(TypeError, match="q_proj.weight"):
        sparsify(model, {"model.layers.0.self_attn.q_proj.weight": good.long()})
    # a bad mask anywhere leaves the model untouched
    with pytest.raises(ValueError):
        sparsify(model, {"model.layers.0.self_attn.q_proj.weight": good,
                         "model.layers.0.self_attn.k_proj.weight": torch.tensor([2, 2], dtype=torch.int32)})
    assert not any(isinstance(m, SparseLinear) for m in model.modules())

    tied = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        sparsify(tied, {"1.weight": random_mask(8, 4, 0.5)})
    # a pattern that trains nothing is a mistake, reported before anything is frozen
    for train, words in ((r"layers\.0\.self_attn\.q_proj", "matches no parameter"), (r"(", "train"), (3, "train")):
        with pytest.raises(ValueError, match=words):
            sparsify(model, {"model.layers.0.self_attn.q_proj.weight": good}, train=train)
    assert all(p.requires_grad for p in model.parameters())
