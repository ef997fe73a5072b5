"""How many rows of [rows, V] float32 logits one chunk holds: one policy for every
chunked backend, so their peak memory is the same and predictable."""

import os

_DEFAULT_CHUNK_BYTES = 128 << 20
# A chunk streams the weight through two GEMMs and its gradient through a third: next to a
# wide head (Llama-3: 2 GiB in float32) a small chunk makes the loop memory-bound, so the
# default budget grows to this fraction of the float32 weight.
_WEIGHT_FRACTION = 8


def chunk_budget_bytes():
    return int(os.environ.get("SPARSEFT_CHUNK_BYTES", _DEFAULT_CHUNK_BYTES))


def chunk_rows(vocab, dim=0):
    """Rows per chunk for a [vocab, dim] head (dim 0: logits given, no weight): as many as
    fit the budget, a multiple of 16 when above 16, at least 1. SPARSEFT_CHUNK_BYTES, when
    set, is the budget exactly."""
    budget = chunk_budget_bytes()
    if "SPARSEFT_CHUNK_BYTES" not in os.environ:
        budget = max(budget, 4 * vocab * dim // _WEIGHT_FRACTION)
    rows = max(1, budget // (4 * max(vocab, 1)))
    return rows if rows < 16 else rows - rows % 16
