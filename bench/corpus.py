"""Real text batches for the training benchmarks, with nothing to download.

The text is the Python documentation that every CPython ships for ``help()`` (the
``pydoc_data.topics`` module: 79 topics, about 465 000 characters of English prose and
code), tokenized with SmolLM2's own tokenizer and cut into sequences.
"""

import torch


def tokenizer():
    from transformers import AutoTokenizer

    from sparseft.finetune.model import checkpoint_dir
    return AutoTokenizer.from_pretrained(checkpoint_dir())


def token_ids():
    """The whole corpus as one 1-D int64 tensor of token ids, topics in sorted order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(tokenizer()(text)["input_ids"], dtype=torch.int64)


def batches(batch, seq, count):
    """``count`` batches [batch, seq] of consecutive sequences; the corpus repeats when used up."""
    ids = token_ids()
    per_batch = batch * seq
    needed = per_batch * count
    ids = ids.repeat(-(-needed // ids.numel()))[:needed]
    return list(ids.view(count, batch, seq))
