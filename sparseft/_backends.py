"""Backend registry: which implementation of an op runs for a given tensor.

Every fused op ships up to four implementations of one contract:

  torch   plain PyTorch; the reference and the fallback, any device
  cpu     C++ kernels from sparseft._C, CPU tensors
  triton  Triton kernels, CUDA tensors (CPU tensors under TRITON_INTERPRET=1)
  cuda    CUDA kernels from sparseft._C, CUDA tensors

The choice is, in order: the op's ``backend=`` keyword, the ``SPARSEFT_BACKEND``
environment variable, then the default for the device. A backend asked for explicitly
that cannot run raises with the reason; the automatic choice falls back quietly.
"""

import importlib
import os

import torch

from sparseft import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
_DEFAULT_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


_triton_status = None


def _triton_importable():
    """Both triton and every kernel module must import: a backend whose kernels cannot load
    is reported unavailable with the reason, not found missing at the first call."""
    global _triton_status
    if _triton_status is None:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # a broken triton install raises more than ImportError
            _triton_status = (False, f"triton is not importable ({exc})")
            return _triton_status
        try:
            import sparseft.kernels.cross_entropy  # noqa: F401
            import sparseft.kernels.sampled_grad  # noqa: F401
            import sparseft.kernels.sparse_adamw  # noqa: F401
            _triton_status = (True, "")
        except Exception as exc:
            _triton_status = (False, f"sparseft's Triton kernels do not import ({type(exc).__name__}: {exc})")
    return _triton_status


def availability(backend, device_type):
    """(available, reason) for running ``backend`` on tensors of ``device_type``."""
    if backend == "torch":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device_type}"
        return _ext.cpu_available()
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, not {device_type}"
        return _ext.cuda_available()
    if backend == "triton":
        ok, reason = _triton_importable()
        if not ok:
            return ok, reason
        if device_type == "cuda":
            return True, ""
        if device_type == "cpu" and triton_interpreting():
            return True, ""
        return False, f"triton runs on CUDA tensors ({device_type} needs TRITON_INTERPRET=1 and runs slowly)"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(device, implemented, requested=None):
    """Name of the backend to run an op on ``device``.

    ``implemented`` lists the backends the op has; ``requested`` is the op's ``backend=``
    keyword. Explicit requests (keyword or SPARSEFT_BACKEND) raise when they cannot run.
    """
    explicit = requested if requested is not None else os.environ.get("SPARSEFT_BACKEND") or None
    device_type = torch.device(device).type
    if explicit is not None:
        if explicit not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {explicit!r}")
        if explicit not in implemented:
            raise ValueError(f"this op has no {explicit!r} backend (it has {tuple(implemented)})")
        ok, reason = availability(explicit, device_type)
        if not ok:
            raise RuntimeError(f"backend {explicit!r} was requested but cannot run: {reason}")
        return explicit
    for name in _DEFAULT_ORDER.get(device_type, ("torch",)):
        if name in implemented and availability(name, device_type)[0]:
            return name
    return "torch"


def kernel_status(name, native_op=None, triton_module=None):
    """(available, reason) of one op's own kernel on a backend the registry allows: the built
    extension may predate the op (``native_op``, a torch.ops.sparseft_C name) and its Triton
    module (``triton_module``) may not import."""
    if name in ("cpu", "cuda") and native_op is not None:
        _ext.load()
        if not hasattr(torch.ops.sparseft_C, native_op):
            return False, f"sparseft._C predates {native_op}; rebuild the extension"
    if name == "triton" and triton_module is not None:
        try:
            importlib.import_module(triton_module)
        except Exception as exc:
            return False, f"{triton_module} does not import ({type(exc).__name__}: {exc})"
    return True, ""


def resolve_checked(device, implemented, requested, op_kernel_status):
    """``resolve``, then the op's own kernel check ``op_kernel_status(name)`` (e.g. a
    ``kernel_status`` call): an explicit request (keyword or SPARSEFT_BACKEND) that cannot run
    raises; the automatic choice falls back quietly to the next backend."""
    explicit = requested is not None or bool(os.environ.get("SPARSEFT_BACKEND"))
    candidates = list(implemented)
    while True:
        name = resolve(device, candidates, requested)
        ok, reason = op_kernel_status(name)
        if ok:
            return name
        if explicit:
            raise RuntimeError(f"backend {name!r} was requested but cannot run: {reason}")
        candidates.remove(name)


class OpKernels:
    """One op's kernels by backend, for an op whose backends share one signature: ``reference``
    on torch, ``torch.ops.sparseft_C.<native_op>`` on cpu and cuda, and
    ``<triton_module>.<triton_function>`` on triton (imported when first called)."""

    def __init__(self, reference, native_op, triton_module, triton_function, implemented=BACKENDS):
        self.reference, self.native_op = reference, native_op
        self.triton_module, self.triton_function = triton_module, triton_function
        self.implemented = tuple(implemented)

    def status(self, name):
        """(available, reason) of this op's own kernel on backend ``name``: see kernel_status."""
        return kernel_status(name, native_op=self.native_op, triton_module=self.triton_module)

    def resolve(self, device, requested):
        return resolve_checked(device, self.implemented, requested, self.status)

    def __getitem__(self, name):
        if name == "torch":
            return self.reference
        if name in ("cpu", "cuda"):
            return getattr(torch.ops.sparseft_C, self.native_op)
        return getattr(importlib.import_module(self.triton_module), self.triton_function)


def report():
    """Rows of (backend, device type, available, reason) for `sparseft info`."""
    rows = []
    for backend in BACKENDS:
        for device_type in ("cpu", "cuda"):
            ok, reason = availability(backend, device_type)
            rows.append((backend, device_type, ok, reason))
    return rows
