"""Streaming checkpoint I/O for merges: lazy tensor sources and an atomic sharded writer.

Sources (`open_source`) read one tensor at a time from a Hugging Face model directory
(config.json + *.safetensors, sharded with model.safetensors.index.json or not), a single
.safetensors file, a sparseft SparseDelta file (read as base + delta), a state dict or an
nn.Module. Paths are local only: nothing here ever touches the network, relative or absolute.

The writer (`AtomicOutput` + `ShardWriter`) streams each tensor's bytes straight into its
shard file (the safetensors header is written first, from the planned names, shapes and
dtypes), so memory stays at the tensor being written. The output appears only when complete:
everything goes to a temporary sibling directory which is fsynced and renamed; on any failure
(including KeyboardInterrupt) the temporary directory is removed and nothing is left.
"""

import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping

import torch
from safetensors import safe_open
from torch import nn

from sparseft.delta import FORMAT as DELTA_FORMAT
from sparseft.delta import SparseDelta

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files of the base's directory copied beside the merged weights.
_COPY = re.compile(r"^(?!model\.safetensors\.index\.json$)[^.].*\.(json|txt|model|jinja|tiktoken)$")

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}


def parse_size(size):
    """'5GB' / '500MB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    unit = (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * factor)


# --------------------------------------------------------------------------------------------
# sources


class Source:
    """Lazy {name: tensor}: `names` (in file order), `meta[name] = (shape, dtype)`, `get(name)`."""

    label = "input"
    directory = None  # a local directory holding config.json etc., if any
    config = None

    def get(self, name):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self):
        pass


class _TensorDict(Source):
    def __init__(self, tensors, label):
        self.label = label
        self._tensors = tensors
        self.names = list(tensors)
        self.meta = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label}: {name!r} is a {type(t).__name__}, expected a tensor")
            self.meta[name] = (tuple(t.shape), t.dtype)

    def get(self, name):
        return self._tensors[name].detach()


def _read_header(path, label):
    """{name: (shape, dtype, begin, end)} (absolute byte offsets, in file order) of a safetensors file,
    checked against the file's size: a truncated file is refused before any tensor is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{label}: {path} is truncated or not a safetensors file ({size} bytes)")
        length = struct.unpack("<Q", head)[0]
        if length > size - 8 or length > 100_000_000:
            raise ValueError(f"{label}: {path} is truncated or not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{label}: {path} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label}: {path} is not a safetensors file")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _FROM_ST.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{label}: {path}: malformed header entry for {name!r}") from None
        if dtype is None:
            raise ValueError(f"{label}: {name!r} in {path} has unsupported dtype {info['dtype']}")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{label}: {path}: {name!r} has inconsistent data offsets")
        if 8 + length + end > size:
            raise ValueError(f"{label}: {path} is truncated ({size} bytes; {name!r} ends at byte {8 + length + end})")
        entries.append((name, shape, dtype, 8 + length + begin, 8 + length + end))
    entries.sort(key=lambda e: e[3])
    return entries


class _SafetensorsFiles(Source):
    """Tensors read with plain positioned reads into fresh buffers, not memory maps: the file
    pages stay in the page cache instead of the process's resident set, so RSS stays at the
    tensors being merged whatever the checkpoint's size."""

    def __init__(self, files, label, directory=None, expected=None):
        """files: ordered paths; expected: {name: file} from an index (checked against the files)."""
        self.label, self.directory = label, directory
        self._files, self._where, self.meta, self.names = [], {}, {}, []
        try:
            for path in files:
                if not os.path.isfile(path):
                    raise ValueError(f"{label}: missing safetensors file {path}")
                entries = _read_header(path, label)
                handle = open(path, "rb")
                self._files.append(handle)
                for name, shape, dtype, begin, end in entries:
                    if name in self._where:
                        raise ValueError(f"{label}: tensor {name!r} appears in two files")
                    self._where[name] = (handle, begin, end)
                    self.meta[name] = (shape, dtype)
                    self.names.append(name)
            if expected is not None:
                for name, file in expected.items():
                    if name not in self._where:
                        raise ValueError(f"{label}: the index lists {name!r} in {file}, which does not hold it")
        except BaseException:
            self.close()
            raise
        config_path = os.path.join(directory, "config.json") if directory else None
        if config_path and os.path.isfile(config_path):
            with open(config_path) as f:
                self.config = json.load(f)

    def get(self, name):
        handle, begin, end = self._where[name]
        shape, dtype = self.meta[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            handle.seek(begin)
            if handle.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"{self.label}: cannot read tensor {name!r}: the file is truncated")
        return buffer.view(dtype).view(shape)

    def close(self):
        for handle in self._files:
            handle.close()
        self._files.clear()


class _DeltaOverBase(Source):
    """A SparseDelta file read as a full model: base + delta, one tensor at a time."""

    def __init__(self, delta, base, label):
        self.label, self.delta, self.base = label, delta, base
        self.names, self.meta = base.names, base.meta
        for name, shape in delta.shapes.items():
            if name not in base.meta:
                raise ValueError(f"{label}: the delta touches {name!r}, which the base does not have")
            if tuple(base.meta[name][0]) != tuple(shape):
                raise ValueError(f"{label}: {name!r} has shape {tuple(shape)} in the delta, "
                                 f"{tuple(base.meta[name][0])} in the base")

    def get(self, name):
        t = self.base.get(name)
        if name not in self.delta.shapes:
            return t
        out = t.float().clone() if t.dtype != torch.float64 else t.clone()
        flat = out.view(-1)
        index = self.delta.indices[name].long()
        flat[index] += self.delta.values[name].to(flat.dtype)
        return out


def _is_delta_file(path):
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == DELTA_FORMAT
    except Exception:
        return False


def _untied(items):
    """Tied tensors (same storage, shape and dtype) kept once, under their first name, as
    save_pretrained writes them (e.g. lm_head.weight tied to embed_tokens.weight)."""
    seen, tensors = set(), {}
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            tensors[name] = t
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        tensors[name] = t.detach()
    return tensors


def open_source(obj, label, base=None):
    """A Source for a path (HF directory, .safetensors, SparseDelta file), state dict or module.

    `base` (a Source) is needed only for SparseDelta inputs, which are read as base + delta.
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, nn.Module):
        return _TensorDict(_untied(obj.state_dict(keep_vars=True).items()), label)
    if isinstance(obj, SparseDelta):
        if base is None:
            raise ValueError(f"{label}: a SparseDelta needs a base model")
        return _DeltaOverBase(obj, base, label)
    if isinstance(obj, Mapping):
        return _TensorDict(_untied(obj.items()), label)
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(f"{label}: expected a path, a state dict, an nn.Module or a SparseDelta, "
                        f"got {type(obj).__name__}")
    path = os.path.abspath(os.fspath(obj))
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{label}: {index} has no weight_map")
            files = list(dict.fromkeys(os.path.join(path, v) for v in weight_map.values()))
            return _SafetensorsFiles(files, label, path, expected=weight_map)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{label}: {path} holds no .safetensors files (sparseft reads local safetensors "
                             "checkpoints only and never downloads)")
        return _SafetensorsFiles(files, label, path)
    if os.path.isfile(path):
        if _is_delta_file(path):
            if base is None:
                raise ValueError(f"{label}: {path} is a SparseDelta; it needs a base model")
            return _DeltaOverBase(SparseDelta.load(path), base, label)
        return _SafetensorsFiles([path], label, None)
    raise ValueError(f"{label}: {path} does not exist (sparseft reads local files only and never downloads)")


def check_compatible(base, models):
    """Same tensor names and shapes everywhere; raises naming the first offending tensor."""
    for m in models:
        for name in base.names:
            if name not in m.meta:
                raise ValueError(f"{m.label}: has no tensor {name!r} (in {base.label})")
            if tuple(m.meta[name][0]) != tuple(base.meta[name][0]):
                raise ValueError(f"{m.label}: tensor {name!r} has shape {tuple(m.meta[name][0])}, "
                                 f"{base.label} has {tuple(base.meta[name][0])}")
        for name in m.names:
            if name not in base.meta:
                raise ValueError(f"{m.label}: tensor {name!r} is not in {base.label}")


def check_finite(t, name, label):
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label}: tensor {name!r} holds NaN or Inf")


# --------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicOutput:
    """Context manager: yields a temporary sibling directory of `out`, renamed to `out` on success.

    An existing `out` is refused unless overwrite=True (then it is replaced only once the new
    output is complete). Any exception removes the temporary directory.
    """

    def __init__(self, out, overwrite=False):
        self.out = os.path.abspath(os.fspath(out))
        self.overwrite = overwrite
        check_output(self.out, overwrite)
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise ValueError(f"out: the parent directory {parent} does not exist")
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}.sparseft-tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self):
        os.mkdir(self.tmp)
        return self.tmp

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            for entry in os.listdir(self.tmp):
                path = os.path.join(self.tmp, entry)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(self.tmp)
            trash = None
            if os.path.exists(self.out):
                if not self.overwrite:
                    raise FileExistsError(f"out: {self.out} appeared while merging; pass overwrite=True to replace it")
                trash = self.tmp + "-old"
                os.rename(self.out, trash)
            os.rename(self.tmp, self.out)
            _fsync_dir(os.path.dirname(self.out))
            if trash:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def check_output(out, overwrite, inputs=()):
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"out: {out} exists; pass overwrite=True (--force) to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out} exists and is not a directory")
    for path in inputs:
        if not isinstance(path, (str, os.PathLike)):
            continue
        path = os.path.abspath(os.fspath(path))
        inside_input = os.path.isdir(path) and (out == path or out.startswith(path.rstrip(os.sep) + os.sep))
        if inside_input or out == path or path.startswith(out + os.sep):
            raise ValueError(f"out: {out} is inside (or holds) the input {path}; choose another directory")


def plan_shards(entries, max_shard_size):
    """entries: [(name, shape, dtype)] in write order -> list of shards (lists of entries)."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = torch.Size(entry[1]).numel() * torch.empty((), dtype=entry[2]).element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


class ShardWriter:
    """Writes planned shards tensor by tensor; `write(name, tensor)` in the planned order."""

    def __init__(self, directory, entries, max_shard_size):
        self.directory = directory
        self.shards = plan_shards(entries, max_shard_size)
        count = len(self.shards)
        self.files = ([SINGLE_NAME] if count == 1
                      else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self._position, self._file, self._shard = 0, None, -1
        self.total_size = 0

    def _open_shard(self, s):
        if self._file is not None:
            self._file.close()
        header, offset = {}, 0
        for name, shape, dtype in self.shards[s]:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(os.path.join(self.directory, self.files[s]), "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._shard = s
        self.total_size += offset

    def write(self, name, tensor):
        s, (planned, shape, dtype) = self._order[self._position]
        if name != planned or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"writer: expected {planned!r} {tuple(shape)} {dtype}, got {name!r} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if s != self._shard:
            self._open_shard(s)
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().tobytes())
        self._position += 1

    def close(self):
        if self._position != len(self._order):
            raise RuntimeError(f"writer: {len(self._order) - self._position} planned tensors were not written")
        while self._shard < len(self.shards) - 1:  # empty trailing shards cannot happen; kept for safety
            self._open_shard(self._shard + 1)
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.files) > 1:
            weight_map = {e[0]: self.files[s] for s, e in self._order}
            with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_side_files(source_dir, directory, dtype_name=None):
    """config.json (its dtype entry set to the output dtype), generation config and tokenizer files."""
    if not source_dir:
        return
    for entry in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, entry)
        if not os.path.isfile(path) or not _COPY.match(entry):
            continue
        if entry == "config.json" and dtype_name:
            with open(path) as f:
                config = json.load(f)
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = dtype_name
            if "torch_dtype" not in config and "dtype" not in config:
                config["dtype"] = dtype_name
            with open(os.path.join(directory, entry), "w") as f:
                json.dump(config, f, indent=2)
        else:
            shutil.copyfile(path, os.path.join(directory, entry))
