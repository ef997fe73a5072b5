import os

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparseft import _backends  # noqa: E402


def available_backends(device="cpu"):
    return [name for name in _backends.BACKENDS if _backends.availability(name, device)[0]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
