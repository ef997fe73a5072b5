"""Which tensors a selector considers: name patterns or "all-linear", minus the usual exclusions.

A tensor falls in one of four excluded categories -- "embeddings", "head", "norms",
"biases" -- or in none. Excluded categories are dropped from the targets unless `include`
names them; `include` may also hold regexes naming extra parameters to add.
"""

import re
from collections.abc import Mapping

import torch
from torch import nn

CATEGORIES = ("embeddings", "head", "norms", "biases")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # Llama/Mistral, GPT-2, others

# Used for state dicts, where no module types are known.
_NAME_RULES = (
    ("norms", re.compile(r"(^|[._])(\w*norm\w*|ln(_\w+)?|ln\d*)\.", re.IGNORECASE)),
    ("embeddings", re.compile(r"(^|\.)(\w*embed\w*|wte|wpe)\.", re.IGNORECASE)),
    ("head", re.compile(r"(^|\.)(lm_head|output|head)\.weight$")),
    ("biases", re.compile(r"(^|\.)bias$")),
)


def block_index(name):
    """The transformer block a parameter name lies in (``layers.N.``, ``h.N.`` or ``blocks.N.``), or None."""
    match = _BLOCK.search(name)
    return None if match is None else int(match.group(1))


def compile_patterns(patterns, argument):
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except (TypeError, re.error) as exc:
        raise ValueError(f"{argument}: expected a regex or a list of regexes, got {patterns!r} ({exc})") from None


def _split_include(include):
    if include is None:
        return set(), []
    if isinstance(include, str):
        include = [include]
    categories = {item for item in include if item in CATEGORIES}
    patterns = compile_patterns([item for item in include if item not in CATEGORIES], "include")
    return categories, patterns


def is_linear(module):
    # SparseLinear (sparseft.sparsify) replaces nn.Linear but keeps a dense 2-D `weight`.
    return isinstance(module, nn.Linear) or (
        hasattr(module, "weight_indices") and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    )


def _module_categories(model):
    """{param name: category or None} and the set of Linear weight names, from module types."""
    categories, linear_weights = {}, set()
    input_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            name = prefix + param_name
            if is_norm:  # a norm's bias counts as a norm parameter
                category = "norms"
            elif param_name == "bias":
                category = "biases"
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module is input_embedding:
                category = "embeddings"
            elif module is output_embedding or module_name.split(".")[-1] == "lm_head" or id(param) in embedding_weights:
                category = "head"
            else:
                category = None
            categories[name] = category
            if param_name == "weight" and category is None and is_linear(module):
                linear_weights.add(name)
    return categories, linear_weights


def _name_category(name):
    for category, rule in _NAME_RULES:
        if rule.search(name):
            return category
    return None


def named_tensors(source):
    """{name: tensor} for a module (its parameters, shared ones once) or a state dict."""
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")


def select_targets(source, targets="all-linear", include=None):
    """{name: tensor} of the tensors to build masks for, in the source's order.

    source: an nn.Module (categories from module types; names are parameter names) or a
    state dict (categories guessed from names; "all-linear" then means every 2-D floating
    tensor outside the excluded categories).
    """
    tensors = named_tensors(source)
    if isinstance(source, nn.Module):
        categories, linear = _module_categories(source)
    else:
        categories = {name: _name_category(name) for name in tensors}
        linear = {n for n, t in tensors.items() if categories[n] is None and t.dim() == 2 and t.is_floating_point()}
    included_categories, included_patterns = _split_include(include)
    if isinstance(targets, str) and targets == "all-linear":
        candidates = linear
    else:
        patterns = compile_patterns(targets, "targets")
        candidates = {n for n in tensors if any(p.search(n) for p in patterns)}
    chosen = {
        name
        for name in tensors
        if (name in candidates and categories.get(name) is None)
        or categories.get(name) in included_categories
        or any(p.search(name) for p in included_patterns)
    }
    selected = {name: t for name, t in tensors.items() if name in chosen}
    if not selected:
        raise ValueError(f"targets={targets!r}, include={include!r} selected no tensors")
    for name, t in selected.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"target {name!r} is not a floating-point tensor")
    return selected
