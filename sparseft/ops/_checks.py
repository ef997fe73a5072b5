"""When argument *values* (label ranges, weight signs) are checked.

Shape, dtype and device checks are free and always run. Value checks read the data: on
CPU they always run; on an accelerator they cost one host synchronisation, so they run in
eager mode unless SPARSEFT_CHECK_VALUES=0, and never while torch.compile traces (the
kernels themselves never synchronise and treat rows with a zero scale as inactive).
"""

import os

import torch


def _compiling():
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def check_values_enabled(tensor):
    if _compiling():
        return False
    if tensor.device.type == "cpu":
        return True
    return os.environ.get("SPARSEFT_CHECK_VALUES", "1") != "0"
