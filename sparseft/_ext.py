"""Loads the native extension ``sparseft._C`` once and remembers why it could not load."""

import functools

import torch  # noqa: F401  (the extension links against libtorch, which must load first)


@functools.lru_cache(maxsize=None)
def load():
    """Returns (module or None, reason string when None)."""
    try:
        from sparseft import _C
    except ImportError as exc:
        return None, (f"sparseft._C is not built ({exc}); reinstall with "
                      "`pip install --no-build-isolation .` and a C++ compiler")
    return _C, ""


def cpu_available():
    module, reason = load()
    return module is not None, reason


def cuda_available():
    module, reason = load()
    if module is None:
        return False, reason
    if not module.cuda_built:
        return False, "sparseft._C was built without CUDA kernels (CPU torch, no nvcc, or SPARSEFT_BUILD_CUDA=0)"
    return True, ""
