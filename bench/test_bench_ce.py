"""pytest-benchmark suite for the fused cross-entropy (CPU, small enough for a laptop):

  python -m pytest bench/test_bench_ce.py --benchmark-only --benchmark-group-by=param:tokens

The full comparison with peak memory is `sparseft bench ce`."""

import pytest
import torch

from sparseft.bench.ce import LOSSES, _inputs

CASES = ["torch-eager", "torch-linear_ce", "sparseft", "sparseft-torch"]


@pytest.mark.parametrize("tokens", [256, 1024])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(benchmark, case, tokens):
    hidden, weight, labels, _ = _inputs(tokens, 576, 49152, torch.float32, "cpu", masked=0.0)
    loss_fn = LOSSES[case]

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels, None).backward()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
