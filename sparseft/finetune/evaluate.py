"""What a fine-tune is judged by: exact-match accuracy of greedy answers on held-out problems,
and perplexity on general English text (forgetting).

The general text is the Python documentation CPython ships for ``help()``
(``pydoc_data.topics``): present on every installation, never downloaded, and nothing like
the arithmetic the models are tuned on.
"""

import math

import torch

from sparseft.data.arithmetic import parse_answer


def _generate(model, tokenizer, prompts, max_new_tokens):
    """Greedy continuations of ``prompts`` (left-padded batch), decoded without the prompt."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_accuracy(model, tokenizer, problems, batch_size=16, max_new_tokens=96):
    """(fraction of problems whose greedy answer equals the true value, the generations)."""
    was_training = model.training
    model.eval()
    texts = []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            texts += _generate(model, tokenizer, [p.prompt for p in chunk], max_new_tokens)
    finally:
        model.train(was_training)
    correct = sum(parse_answer(text) == p.value for text, p in zip(texts, problems))
    return correct / len(problems), texts


def general_text_ids(tokenizer, tokens=4096, seq=256):
    """[tokens // seq, seq] token ids of pydoc's topics (sorted by name), from the start."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text[: tokens * 8])["input_ids"]  # ~4 characters a token: plenty
    if len(ids) < tokens:
        raise ValueError(f"pydoc topics gave {len(ids)} tokens, fewer than the {tokens} asked for")
    return torch.tensor(ids[:tokens - tokens % seq], dtype=torch.int64).view(-1, seq)


def perplexity(model, ids, batch_size=8):
    """exp(mean next-token NLL) of the model on ``ids`` [sequences, seq]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                chunk = ids[start:start + batch_size]
                loss = model(input_ids=chunk, labels=chunk).loss
                n = chunk.shape[0] * (chunk.shape[1] - 1)
                total += float(loss) * n
                count += n
    finally:
        model.train(was_training)
    return math.exp(total / count)
