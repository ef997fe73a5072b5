"""Loads the native extension ``sparseft._C`` once and remembers why it could not load."""

import torch  # noqa: F401  (the extension links against libtorch, which must load first)

# A plain module-level cache (not functools.lru_cache) so torch.compile traces through it.
_loaded = None


def load():
    """Returns (module or None, reason string when None)."""
    global _loaded
    if _loaded is None:
        try:
            from sparseft import _C
            _loaded = (_C, "")
        except ImportError as exc:
            _loaded = (None, f"sparseft._C is not built ({exc}); reinstall with "
                             "`pip install --no-build-isolation .` and a C++ compiler")
    return _loaded


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
