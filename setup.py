"""Builds the optional native extension ``sparseft._C``.

Switches (environment variables):
  SPARSEFT_NO_EXT=1       build no extension; the package runs on its torch/Triton backends.
  SPARSEFT_BUILD_CUDA=0|1 force the CUDA kernels off / on (default: on when torch is a CUDA
                          build and nvcc is found).
  SPARSEFT_CPU_ARCH=...   value for -march (default "native": a source build targets the
                          machine it is built on; use e.g. "x86-64-v3" for portable wheels).

The .cu kernels include no torch headers; the files named *_binding.cpp wrap them for torch
and are compiled only against a CUDA build of torch.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _say(msg):
    print(f"[sparseft build] {msg}", file=sys.stderr)


def _nvcc_flags():
    """csrc/cuda/nvcc_flags, shared with .ci/compile_cuda so that CI compiles what ships.
    No --use_fast_math: it turns tanhf and expf into approximate hardware instructions
    (softcap would miss float32 tolerances), and these kernels are bandwidth-bound anyway."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cuda", "nvcc_flags")) as flags:
        return flags.read().split()


def _cublas_headers(cuda_home):
    """A toolkit without cuBLAS's headers (some images carry only nvcc and the runtime) gets
    them from the nvidia-cublas wheel that a CUDA torch depends on. -idirafter: that folder
    also holds runtime headers, which must not shadow the toolkit's own."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cublas", "cu12"):
            if os.path.exists(os.path.join(root, sub, "include", "cublas_v2.h")):
                return ["-idirafter", os.path.join(root, sub, "include")]
    return []


def _cublas_if_linkable(cuda_home):
    """The bindings call cuBLAS, which libtorch_cuda loads already; link it explicitly only
    where the toolkit has the unversioned library (pip-installed CUDA often has not)."""
    for lib_dir in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(cuda_home, lib_dir, "libcublas.so")):
            return ["cublas"]
    _say("libcublas.so not found in the CUDA toolkit: cuBLAS resolves through libtorch_cuda")
    return []


def _native_extension():
    if os.environ.get("SPARSEFT_NO_EXT") == "1":
        _say("SPARSEFT_NO_EXT=1: skipping the native extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _say(f"torch is not importable ({exc}); building without the native extension. "
             "Install torch first and build with --no-build-isolation.")
        return [], {}

    arch = os.environ.get("SPARSEFT_CPU_ARCH", "native")
    cxx_flags = ["-O3", "-std=c++17", f"-march={arch}", "-fopenmp"]
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/module.cpp"]

    want_cuda = os.environ.get("SPARSEFT_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    if want_cuda == "1" and not cuda_possible:
        raise RuntimeError(
            "SPARSEFT_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
            "A CUDA build of torch and nvcc are both required.")
    build_cuda = cuda_possible if want_cuda is None else want_cuda == "1"
    if not build_cuda:
        reason = "SPARSEFT_BUILD_CUDA=0" if want_cuda == "0" else (
            "torch is a CPU build" if torch.version.cuda is None else "nvcc not found (CUDA_HOME unset)")
        _say(f"building CPU kernels only ({reason})")
        ext = CppExtension("sparseft._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])
    else:
        _say(f"building CPU and CUDA kernels (CUDA {torch.version.cuda}, {CUDA_HOME})")
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        ext = CUDAExtension(
            "sparseft._C", cpu_sources + cuda_sources,
            define_macros=[("SPARSEFT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + _cublas_headers(CUDA_HOME), "nvcc": _nvcc_flags()},
            libraries=_cublas_if_linkable(CUDA_HOME),
            extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
