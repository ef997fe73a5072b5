"""Layerwise scaled model merges: task arithmetic / TIES / DARE / consensus with LiNeS, streaming.

    from sparseft import merge
    merge.merge(base="base_dir", models=["ft_a", "ft_b"], method="ties", density=0.2,
                lines=(0.1, 0.9), out="merged_dir", dtype="bfloat16")
    merge.lines(base="base_dir", model="ft_dir", alpha=0.5, beta=0.5, out="scaled_dir")
    merge.merge_deltas([delta_a, delta_b], method="ties", density=0.2)   # SparseDelta in, SparseDelta out

Every merge streams: one tensor of each input is read, merged by the fused op
(`sparseft.ops.merge.merge_tensor`), written and freed before the next. The method formulas
are in `METHODS[name].formula` and sparseft/merge/methods.py; LiNeS in sparseft/merge/lines.py.
"""

from sparseft.merge.api import lines, merge
from sparseft.merge.config import load_config, merge_from_config
from sparseft.merge.deltas import merge_deltas, scale_delta
from sparseft.merge.lines import LinesSchedule
from sparseft.merge.methods import CONSENSUS_K, CONSENSUS_LAMBDA, METHOD_NAMES, METHODS

__all__ = ["CONSENSUS_K", "CONSENSUS_LAMBDA", "METHODS", "METHOD_NAMES", "LinesSchedule", "lines", "load_config",
           "merge", "merge_deltas", "merge_from_config", "scale_delta"]
