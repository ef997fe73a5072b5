"""How many rows of [rows, V] float32 logits one chunk holds: one policy for every
chunked backend, so their peak memory is the same and predictable."""

import os

_DEFAULT_CHUNK_BYTES = 128 << 20


def chunk_budget_bytes():
    return int(os.environ.get("SPARSEFT_CHUNK_BYTES", _DEFAULT_CHUNK_BYTES))


def chunk_rows(vocab, budget_bytes=None):
    """Rows per chunk: as many as fit the budget, a multiple of 16 when above 16, at least 1."""
    budget = chunk_budget_bytes() if budget_bytes is None else budget_bytes
    rows = max(1, budget // (4 * max(vocab, 1)))
    return rows if rows < 16 else rows - rows % 16
