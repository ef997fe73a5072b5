"""mergekit-format YAML merge configurations (the subset of the shared methods) plus a `lines:` block.

    merge_method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties | consensus
    base_model: ./base            # local path (relative paths are relative to the working directory)
    models:
      - model: ./ft_a
        parameters: {weight: 1.0, density: 0.2}
      - model: ./ft_b
        parameters:
          weight: [0.5, 1.0]      # a list is interpolated across layers, as mergekit does
          density: 0.2
    parameters:                   # shared: normalize, rescale, lambda, int8_mask (ignored),
      normalize: true             # consensus_lambda, consensus_k; weight/density here are the
      lambda: 1.0                 # defaults of models that do not set them
    dtype: float32                # mergekit's compute dtype; sparseft computes in float32 always
    out_dtype: bfloat16           # output dtype (default: dtype, else the base's)
    lines:                        # sparseft only: LiNeS over the merged task vector
      alpha: 0.5                  # a number or auto
      beta: 0.5
      overrides: {"lm_head": 1.0}
    trim: tensor                  # sparseft only: tensor (mergekit) | global (ties top-k over the model)
    seed: 0                       # sparseft only: DARE's seed

Errors name the key and its line.
"""

import os

from sparseft.merge.methods import METHOD_NAMES

_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "lines",
        "trim", "seed", "name"}
_UNSUPPORTED = {"slices", "modules", "tokenizer", "chat_template"}
_SHARED = {"normalize", "rescale", "lambda", "int8_mask", "consensus_lambda", "consensus_k", "weight", "density"}
_MODEL_PARAMS = {"weight", "density"}


class ConfigError(ValueError):
    pass


class _Map(dict):
    line = 0
    lines = None


class _Seq(list):
    line = 0
    lines = None


def _yaml():
    """PyYAML, imported only to read a configuration (the rest of sparseft does not need it)."""
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a merge configuration needs PyYAML: pip install pyyaml") from None
    return yaml


def _convert(loader, node):
    yaml = _yaml()
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = _Map()
        out.line, out.lines = line, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            out[key] = _convert(loader, value_node)
            out.lines[key] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = _Seq(_convert(loader, v) for v in node.value)
        out.line, out.lines = line, [v.start_mark.line + 1 for v in node.value]
        return out
    return loader.construct_object(node, deep=True)


def _parse_yaml(text, source):
    yaml = _yaml()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{source}: the configuration is empty")
        return _convert(loader, node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_config(config):
    """A YAML file path, YAML text or a dict -> keyword arguments of `sparseft.merge.merge`
    (without `out`). Raises ConfigError naming the key and line of anything wrong."""
    if isinstance(config, dict):
        data, source = config, "config"
        if not isinstance(data, _Map):
            data = _Map(data)
            data.lines = {}
    else:
        source = os.fspath(config)
        if "\n" not in source and os.path.isfile(source):
            with open(source) as f:
                text = f.read()
        elif "\n" in source or ":" in source and not os.path.exists(source):
            text, source = source, "config"
        else:
            raise ConfigError(f"config: {source} does not exist")
        data = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")

    def where(mapping, key):
        lines = getattr(mapping, "lines", None) or {}
        line = lines.get(key) if isinstance(lines, dict) else None
        return f"{source} line {line}" if line else source

    def fail(mapping, key, message):
        raise ConfigError(f"{where(mapping, key)}: key {key!r}: {message}")

    for key in data:
        if key in _UNSUPPORTED:
            fail(data, key, "not supported by sparseft merge (only models: merges of the shared methods)")
        if key not in _TOP:
            fail(data, key, f"unknown key (expected one of {', '.join(sorted(_TOP))})")
    if "merge_method" not in data:
        raise ConfigError(f"{source}: key 'merge_method': missing")
    method = data["merge_method"]
    if method not in METHOD_NAMES:
        fail(data, "merge_method", f"unknown merge method {method!r}; expected one of {', '.join(METHOD_NAMES)}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        if "models" in data:
            fail(data, "models", "expected a non-empty list of {model: path, parameters: {...}}")
        raise ConfigError(f"{source}: key 'models': missing")
    if data.get("tokenizer_source") not in (None, "base"):
        fail(data, "tokenizer_source", "only 'base' is supported (the base's tokenizer files are copied)")

    def parameters(parent, allowed, unknown):
        """parent's "parameters" mapping (empty when absent), every key checked against allowed."""
        params = parent.get("parameters") or _Map()
        if not isinstance(params, dict):
            fail(parent, "parameters", "expected a mapping")
        for key in params:
            if key not in allowed:
                fail(params, key, unknown)
        return params

    shared = parameters(data, _SHARED, f"unknown parameter (expected one of {', '.join(sorted(_SHARED))})")

    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        fail(data, "base_model", "expected a path")
    entries = []
    for i, entry in enumerate(models):
        line = models.lines[i] if getattr(models, "lines", None) else None
        label = f"{source} line {line}" if line else source
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{label}: key 'models[{i}]': expected {{model: path, parameters: {{...}}}}")
        for key in entry:
            if key not in ("model", "parameters"):
                fail(entry, key, f"unknown key in models[{i}] (expected model, parameters)")
        if not isinstance(entry["model"], str):
            fail(entry, "model", "expected a path")
        params = parameters(entry, _MODEL_PARAMS,
                            f"unknown per-model parameter (expected {', '.join(sorted(_MODEL_PARAMS))})")
        if base is not None and entry["model"] == base and method != "linear":
            continue  # mergekit lets the base appear among the models; it is not a task
        entries.append((entry, params))
    if not entries:
        fail(data, "models", "no model besides the base")
    if base is None:
        if method != "linear":
            raise ConfigError(f"{source}: key 'base_model': missing (method {method!r} needs a base)")
        base = entries[0][0]["model"]

    def collect(name, default):
        values = []
        for entry, params in entries:
            if name in params:
                values.append(_plain(params[name]))
            elif name in shared:
                values.append(_plain(shared[name]))
            else:
                values.append(default)
        return values

    kwargs = {"base": base, "models": [e["model"] for e, _ in entries], "method": method,
              "weights": collect("weight", 1.0), "density": collect("density", 1.0)}
    for key, target in (("normalize", "normalize"), ("rescale", "rescale"), ("lambda", "scale"),
                        ("consensus_lambda", "consensus_lambda"), ("consensus_k", "consensus_k")):
        if key in shared:
            kwargs[target] = _plain(shared[key])
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        kwargs["dtype"] = dtype
    if "lines" in data:
        lines = data["lines"]
        if isinstance(lines, dict):
            for key in lines:
                if key not in ("alpha", "beta", "overrides"):
                    fail(lines, key, "unknown key in lines (expected alpha, beta, overrides)")
            kwargs["lines"] = _plain(lines)
        elif lines == "auto" or lines is None:
            kwargs["lines"] = lines
        else:
            fail(data, "lines", "expected auto or a mapping {alpha, beta, overrides}")
    for key in ("trim", "seed"):
        if key in data:
            kwargs[key] = data[key]
    # Validate values now, naming the key: the API's checks raise ValueError naming the argument.
    from sparseft.merge.api import _Plan
    try:
        _Plan(kwargs["base"], kwargs["models"], method, kwargs["weights"], kwargs["density"], kwargs.get("lines"),
              kwargs.get("dtype"), "cpu", None, kwargs.get("seed", 0), kwargs.get("normalize"), kwargs.get("rescale"),
              kwargs.get("scale", 1.0), kwargs.get("trim", "tensor"), kwargs.get("consensus_lambda", 0.4),
              kwargs.get("consensus_k", 2), None)
    except ValueError as exc:
        message = str(exc)
        argument = message.split(":", 1)[0].split("[", 1)[0]
        key = {"weights": "weight", "scale": "lambda", "dtype": "out_dtype" if "out_dtype" in data else "dtype"}.get(
            argument, argument)
        mapping = data
        index = message.split(":", 1)[0].partition("[")[2].rstrip("]")
        candidates = [shared, *(p for _, p in entries)]
        if index.isdigit() and int(index) < len(entries):  # weights[i] / density[i]: model i's, else shared
            candidates = [entries[int(index)][1], shared]
        if isinstance(data.get("lines"), dict):
            candidates.append(data["lines"])
        for candidate in candidates:
            if key in candidate:
                mapping = candidate
                break
        if argument == "lines" and "lines" in data:
            key, mapping = "lines", data
        raise ConfigError(f"{where(mapping, key)}: key {key!r}: {message}") from None
    return kwargs


def merge_from_config(config, out, *, overwrite=False, device="cpu", backend=None, progress=False, **overrides):
    """Run the merge a YAML configuration describes (see this module's docstring)."""
    from sparseft.merge.api import merge
    kwargs = load_config(config)
    kwargs.update(overrides)
    return merge(out=out, overwrite=overwrite, device=device, backend=backend, progress=progress, **kwargs)
