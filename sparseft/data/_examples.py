"""Turns one training example into (token ids, per-token role codes), checking it.

Accepted forms (any extra keys are ignored):
  {"segments": [("prompt", ids), ("thought", ids), ("answer", ids), ...]}
      segments may also be mappings {"role": ..., "input_ids": ids} (storable in Arrow)
  {"input_ids": ids, "roles": [role per token]}
  {"input_ids": ids}                      every token is an answer token
A role is a name ("prompt", "thought", "answer") or its code (PROMPT, THOUGHT, ANSWER).
"""

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

PAD, PROMPT, THOUGHT, ANSWER = -1, 0, 1, 2
ROLE_CODES = {"prompt": PROMPT, "thought": THOUGHT, "answer": ANSWER}


def _token_ids(ids, name):
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a sequence of integer token ids ({exc})") from None
    if tuple(tensor.shape) == (0,):  # an empty list has no integer dtype
        return tensor.to(torch.int64)
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} must hold token ids >= 0, found {int(tensor.min())}")
    return tensor.to(torch.int64)


def _role_code(role, name):
    if isinstance(role, str):
        if role not in ROLE_CODES:
            raise ValueError(f"{name} must be one of {tuple(ROLE_CODES)}, got {role!r}")
        return ROLE_CODES[role]
    if isinstance(role, numbers.Integral) and not isinstance(role, bool) and role in ROLE_CODES.values():
        return int(role)
    raise ValueError(f"{name} must be one of {tuple(ROLE_CODES)} or a code in "
                     f"{tuple(ROLE_CODES.values())}, got {role!r}")


def _role_codes(roles, length, name):
    if isinstance(roles, (torch.Tensor, np.ndarray)):
        roles = roles.tolist()  # collators run on host data, not in a GPU hot path
    if isinstance(roles, (str, bytes)) or not isinstance(roles, Sequence):
        raise TypeError(f"{name} must be a sequence with one role per token, got {type(roles).__name__}")
    if len(roles) != length:
        raise ValueError(f"{name} must have one role per token ({length}), got {len(roles)}")
    codes = {}
    for role in roles:  # validate each distinct value once
        key = (type(role), role)
        if key not in codes:
            codes[key] = _role_code(role, f"{name} entries")
    return torch.tensor([codes[(type(r), r)] for r in roles], dtype=torch.int8)


def _segment(segment, name):
    if isinstance(segment, Mapping):
        if "role" not in segment or "input_ids" not in segment:
            raise ValueError(f"{name} must have keys 'role' and 'input_ids'")
        role, ids = segment["role"], segment["input_ids"]
    elif isinstance(segment, Sequence) and not isinstance(segment, (str, bytes)) and len(segment) == 2:
        role, ids = segment
    else:
        raise TypeError(f"{name} must be a (role, ids) pair or a mapping with 'role' and 'input_ids'")
    ids = _token_ids(ids, f"{name} ids")
    return ids, torch.full(ids.shape, _role_code(role, f"{name} role"), dtype=torch.int8)


def parse_example(example, index):
    """(ids int64 [n], roles int8 [n]) of ``examples[index]``."""
    name = f"examples[{index}]"
    if not isinstance(example, Mapping):
        raise TypeError(f"{name} must be a mapping (dict), got {type(example).__name__}")
    if "segments" in example:
        segments = example["segments"]
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
            raise TypeError(f"{name}['segments'] must be a list of (role, ids) pairs")
        parts = [_segment(s, f"{name}['segments'][{i}]") for i, s in enumerate(segments)]
        if not parts:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int8)
        ids, roles = zip(*parts)
        return torch.cat(ids), torch.cat(roles)
    if "input_ids" in example:
        ids = _token_ids(example["input_ids"], f"{name}['input_ids']")
        roles = example.get("roles")
        if roles is None:
            return ids, torch.full(ids.shape, ANSWER, dtype=torch.int8)
        return ids, _role_codes(roles, ids.numel(), f"{name}['roles']")
    raise ValueError(f"{name} must have 'segments' or 'input_ids'")
