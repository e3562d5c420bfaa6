"""Checkpoints: parameter trees and models in safetensors files, written atomically.

A tree is stored as one safetensors tensor per leaf, keyed by the leaf's dotted path
(``"blocks.3.attn.qkv.weight"``), so any safetensors reader sees ordinary names. The file's
metadata holds a small JSON description of the containers (dict / list / tuple, key order,
empty containers, ``None`` and plain-number leaves), which makes :func:`load` return exactly
the tree that was saved. Files written by other tools load too: their tree is rebuilt from the
paths with :func:`fnllm.tree.unflatten`.

Saving never leaves a partial file under the final name: the bytes go to a temporary file in
the same directory, which is flushed, ``fsync``-ed and then renamed over the target with
``os.replace`` (atomic on POSIX and Windows). Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
from collections.abc import Callable, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

from fnllm import _checks, _tree_ops
from fnllm import models as _models
from fnllm import tree as _tree

__all__ = ["load", "load_meta", "load_model", "save", "save_model"]

PathLike = str | os.PathLike

# Metadata keys fnllm writes itself; user ``meta`` may not use them.
_FORMAT_KEY = "format"
_STRUCTURE_KEY = "fnllm.structure"
_ALIASES_KEY = "fnllm.aliases"
_CONFIG_KEY = "fnllm.config"
_RESERVED_PREFIX = "fnllm."

# safetensors dtype names -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


def save(path: PathLike, tree: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Save a tree of tensors to a safetensors file, atomically.

    Example:
        >>> import os, tempfile, torch
        >>> from fnllm import io
        >>> params = {"blocks": [{"w": torch.ones(2, 3)}], "step": torch.tensor(7)}
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
        >>> io.save(path, params, meta={"epoch": 1})
        >>> io.load(path)["blocks"][0]["w"].shape
        torch.Size([2, 3])
        >>> io.load_meta(path)
        {'epoch': 1}

    Args:
        path: the file to write. It is replaced only once the new file is complete on disk.
        tree: nested ``dict`` (string keys without dots) / ``list`` / ``tuple`` containers whose
            leaves are tensors; ``None``, ``bool``, ``int``, ``float`` and ``str`` leaves are
            kept in the metadata. Tensors may live on any device, be non-contiguous or share
            storage (tied weights): leaves that are the very same tensor load back as one
            tensor object again.
        meta: extra JSON-serialisable values stored in the file's metadata, one JSON string per
            key. Keys ``"format"`` and ``"fnllm.*"`` are reserved.

    Returns:
        None.

    Raises:
        TypeError: a leaf is neither a tensor nor a plain value, or a ``meta`` value is not JSON.
        ValueError: a dict key is not a string, is empty or contains a dot; or a ``meta`` key is
            reserved.
    """
    metadata = _encode_meta(meta)
    tensors, structure, aliases = _encode_tree(tree)
    metadata[_STRUCTURE_KEY] = json.dumps(structure, separators=(",", ":"))
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    _write_safetensors(path, tensors, metadata)


def load(path: PathLike, *, with_meta: bool = False, device: str | torch.device = "cpu") -> Any:
    """Load a tree saved by :func:`save` (or any safetensors file) from ``path``.

    Example:
        >>> import os, tempfile, torch
        >>> from fnllm import io
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> io.save(path, {"a": [torch.zeros(1), torch.ones(1)], "b": {}}, meta={"note": "hi"})
        >>> io.load(path)
        {'a': [tensor([0.]), tensor([1.])], 'b': {}}
        >>> io.load(path, with_meta=True)[1]
        {'note': 'hi'}

    Args:
        path: a safetensors file.
        with_meta: also return the user metadata (as :func:`load_meta` does).
        device: where to put the tensors.

    Returns:
        The tree, exactly as saved (containers, key order, dtypes, shapes, tied leaves); for a
        file written by another tool, the tree that :func:`fnllm.tree.unflatten` builds from its
        keys. With ``with_meta``, a pair ``(tree, meta)``.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is truncated, corrupt or not a safetensors file (the message
            names the file).
    """
    tensors, metadata = _read_safetensors(path, device=device)
    tree = _decode_tree(path, tensors, metadata)
    if with_meta:
        return tree, _decode_meta(metadata)
    return tree


def load_meta(path: PathLike) -> dict[str, Any]:
    """Read only the user metadata of a checkpoint (no tensors are loaded).

    Example:
        >>> import os, tempfile, torch
        >>> from fnllm import io
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> io.save(path, {"w": torch.zeros(2)}, meta={"step": 10, "lr": [0.1, 0.01]})
        >>> io.load_meta(path)  # keys in sorted order
        {'lr': [0.1, 0.01], 'step': 10}

    Args:
        path: a safetensors file.

    Returns:
        The ``meta`` passed to :func:`save`, decoded from JSON. For files written by other
        tools every metadata entry is returned as its raw string.

    Raises:
        ValueError: the file is truncated, corrupt or not a safetensors file.
    """
    _, metadata = _read_header(path)
    return _decode_meta(metadata)


def save_model(
    path: PathLike, model: Any, params: Any, meta: Mapping[str, Any] | None = None
) -> None:
    """Save a model's config and its params in one safetensors file, atomically.

    The config (``model.to_config()``) goes into the metadata, so :func:`load_model` rebuilds
    ``(model, params)`` from the file alone.

    Example:
        >>> import os, tempfile
        >>> from fnllm import io, random
        >>> from fnllm.models.gpt import GPT
        >>> gpt = GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> path = os.path.join(tempfile.mkdtemp(), "gpt.safetensors")
        >>> io.save_model(path, gpt, gpt.init(random.key(0)))
        >>> model, params = io.load_model(path)
        >>> model == gpt, params["blocks"][0]["attn"]["qkv"]["weight"].shape
        (True, torch.Size([24, 8]))

    Args:
        path: the file to write.
        model: a model config (``fnllm.models.gpt.GPT``, ``fnllm.models.bert.BERT``) with
            ``to_config()`` and ``param_shapes()``.
        params: the model's parameter tree; it must match ``model.param_shapes()``.
        meta: extra JSON-serialisable metadata (see :func:`save`).

    Returns:
        None.

    Raises:
        KeyError: ``params`` lacks a leaf the model needs or has one it does not (paths named).
        ValueError: a leaf has the wrong shape (path, shape and expected shape named).
    """
    config = model.to_config()
    _check_params(model, _flat_tensors(params, "params"), where="params")
    metadata = _encode_meta(meta)
    tensors, structure, aliases = _encode_tree(params)
    metadata[_STRUCTURE_KEY] = json.dumps(structure, separators=(",", ":"))
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    metadata[_CONFIG_KEY] = json.dumps(config, sort_keys=True)
    _write_safetensors(path, tensors, metadata)


def load_model(
    path: PathLike, *, with_meta: bool = False, device: str | torch.device = "cpu"
) -> Any:
    """Rebuild ``(model, params)`` from a file written by :func:`save_model`.

    Example:
        >>> import os, tempfile
        >>> from fnllm import io, random
        >>> from fnllm.models.bert import BERT
        >>> bert = BERT(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
        >>> path = os.path.join(tempfile.mkdtemp(), "bert.safetensors")
        >>> io.save_model(path, bert, bert.init(random.key(0)), meta={"step": 3})
        >>> model, params, meta = io.load_model(path, with_meta=True)
        >>> type(model).__name__, model.n_layer, meta
        ('BERT', 1, {'step': 3})

    Args:
        path: a file written by :func:`save_model`.
        with_meta: also return the user metadata.
        device: where to put the tensors.

    Returns:
        ``(model, params)``, or ``(model, params, meta)`` with ``with_meta``.

    Raises:
        ValueError: the file is corrupt, holds no model config, or its config does not match
            its weights (wrong shapes; the paths are named).
        KeyError: the weights lack a leaf the config needs or have one it does not.
    """
    tensors, metadata = _read_safetensors(path, device=device)
    if _CONFIG_KEY not in metadata:
        raise ValueError(
            f"{os.fspath(path)}: no model config in the metadata (was it written by "
            "fnllm.io.save_model? use fnllm.io.load for a plain tree)"
        )
    try:
        config = json.loads(metadata[_CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: model config is not valid JSON: {e}") from None
    try:
        model = _models.from_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: bad model config {config!r}: {e}") from None
    params = _decode_tree(path, tensors, metadata)
    _check_params(model, _flat_tensors(params, "weights"), where=f"{os.fspath(path)}: weights")
    if with_meta:
        return model, params, _decode_meta(metadata)
    return model, params


# ----------------------------------------------------------------------------- tree encoding


def _encode_tree(tree: Any) -> tuple[dict[str, torch.Tensor], Any, dict[str, str]]:
    """Split a tree into {path: cpu contiguous tensor}, a JSON structure spec and aliases."""
    prep = _TensorPrep(dedupe=True)

    def leaf(path: str, x: torch.Tensor) -> Any:
        prep.add(path, x)
        return "T"

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            return leaf(path, node)
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"v": node}
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                if not isinstance(k, str) or not k or "." in k:
                    raise ValueError(
                        f"save: dict key {k!r} at {path or '<root>'} must be a non-empty string "
                        "without dots (it becomes part of a dotted path)"
                    )
                items.append([k, walk(v, _tree_ops.join(path, k))])
            return {"d": items}
        if type(node) is list:
            return {"l": [walk(v, _tree_ops.join(path, str(i))) for i, v in enumerate(node)]}
        if type(node) is tuple:
            return {"t": [walk(v, _tree_ops.join(path, str(i))) for i, v in enumerate(node)]}
        raise TypeError(
            f"save: leaf {path or '<root>'} has type {type(node).__name__}; expected a tensor, a "
            "dict/list/tuple container, or None/bool/int/float/str"
        )

    structure = walk(tree, "")
    return prep.tensors, structure, prep.aliases


class _TensorPrep:
    """Collect tensors for safetensors: detached, on the CPU, contiguous, sharing no memory.

    With ``dedupe``, a leaf that is exactly the same view as an earlier one (a tied weight) is
    recorded in ``aliases`` instead of being stored twice; otherwise it is copied.
    """

    def __init__(self, *, dedupe: bool) -> None:
        self.dedupe = dedupe
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self._views: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> path
        self._storages: set[tuple] = set()

    def add(self, path: str, x: torch.Tensor) -> None:
        where = path or "<root>"
        if x.layout != torch.strided:
            raise TypeError(f"save: leaf {where} is a {x.layout} tensor (not strided)")
        if x.device.type == "meta":
            raise TypeError(f"save: leaf {where} is a meta tensor (it has no data)")
        x = x.detach()
        shared = False
        if x.numel() > 0:
            storage = (x.device.type, x.device.index, x.untyped_storage().data_ptr())
            view = (*storage, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
            if self.dedupe and view in self._views:
                self.aliases[path] = self._views[view]
                return
            self._views.setdefault(view, path)
            shared = storage in self._storages
            self._storages.add(storage)
        if x.device.type != "cpu":
            x = x.cpu()  # a fresh contiguous copy
        elif shared:
            x = x.clone(memory_format=torch.contiguous_format)
        else:
            x = x.contiguous()
        self.tensors[path] = x


def _decode_tree(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
    """Rebuild the saved tree from tensors and the structure spec (or from paths alone)."""
    name = os.fspath(path)
    if _STRUCTURE_KEY not in metadata:
        return _tree.unflatten(tensors) if tensors else {}
    try:
        structure = json.loads(metadata[_STRUCTURE_KEY])
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: corrupt fnllm structure metadata: {e}") from None
    used: set[str] = set()

    def walk(node: Any, p: str) -> Any:
        if node == "T":
            if p in aliases:
                target = aliases[p]
                if target not in tensors:
                    raise ValueError(f"{name}: leaf {p} aliases missing tensor {target!r}")
                used.add(target)
                return tensors[target]
            if p not in tensors:
                raise ValueError(f"{name}: the file has no tensor for leaf {p or '<root>'!r}")
            used.add(p)
            return tensors[p]
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag == "v":
                return body
            if tag == "d":
                return {k: walk(v, _tree_ops.join(p, k)) for k, v in body}
            if tag == "l":
                return [walk(v, _tree_ops.join(p, str(i))) for i, v in enumerate(body)]
            if tag == "t":
                return tuple(walk(v, _tree_ops.join(p, str(i))) for i, v in enumerate(body))
        raise ValueError(f"{name}: corrupt fnllm structure metadata at {p or '<root>'!r}")

    out = walk(structure, "")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{name}: tensors not described by the structure metadata: {extra}")
    return out


def _flat_tensors(params: Any, what: str) -> dict[str, torch.Tensor]:
    flat = _tree.flatten(params)
    for p, x in flat.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}: leaf {p} is a {type(x).__name__}, not a tensor")
    return flat


def _check_params(model: Any, flat: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Check leaves against ``model.param_shapes()``: KeyError missing/extra, ValueError shape."""
    expected = {p: tuple(s) for p, s in model.param_shapes().items()}
    missing = sorted(set(expected) - set(flat), key=_natural)
    unexpected = sorted(set(flat) - set(expected), key=_natural)
    desc = _describe(model)
    _checks.check_keys(f"{where} do not match {desc}: ", missing, unexpected)
    wrong = [
        f"{p} has shape {tuple(flat[p].shape)}, expected {expected[p]}"
        for p in expected  # model order: embeddings first, then layer by layer
        if tuple(flat[p].shape) != expected[p]
    ]
    if wrong:
        more = f"; ... ({len(wrong)} leaves differ)" if len(wrong) > 6 else ""
        raise ValueError(f"{where} do not match {desc}: " + "; ".join(wrong[:6]) + more)


def _describe(model: Any) -> str:
    try:
        cfg = model.to_config()
        return f"{type(model).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"
    except Exception:  # pragma: no cover - only for odd user objects
        return repr(model)


def _natural(path: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


# ----------------------------------------------------------------------------- metadata


def _encode_meta(meta: Mapping[str, Any] | None) -> dict[str, str]:
    out = {_FORMAT_KEY: "pt"}
    for k, v in (meta or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"save: meta key {k!r} is not a string")
        if k == _FORMAT_KEY or k.startswith(_RESERVED_PREFIX):
            raise ValueError(f"save: meta key {k!r} is reserved ('format' and 'fnllm.*')")
        try:
            out[k] = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"save: meta[{k!r}] is not JSON-serialisable: {e}") from None
    return out


def _decode_meta(metadata: Mapping[str, str]) -> dict[str, Any]:
    # safetensors keeps metadata in a hash map: sort the keys so the result is deterministic
    if _STRUCTURE_KEY not in metadata:  # a foreign file: hand back the raw strings
        return dict(sorted(metadata.items()))
    out = {}
    for k, v in sorted(metadata.items()):
        if k == _FORMAT_KEY or k.startswith(_RESERVED_PREFIX):
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- file level


def _write_safetensors(
    path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a flat dict of CPU contiguous unshared tensors atomically."""
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a fresh temp file next to ``path``, fsync it, rename onto ``path``."""
    final = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(final)
    if os.path.isdir(final):
        raise IsADirectoryError(f"save: {final} is a directory")
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber; default mode 0o666 so the final file gets the usual umask'd mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers such as safetensors may recreate the file as 0o600
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's layout; return ``(tensor entries, metadata)``.

    Checks everything safetensors would otherwise report as an opaque error (or not at all):
    the header length, JSON, dtypes, shapes, offsets, and that the data section is complete.
    """
    name = os.fspath(path)
    size = os.path.getsize(name)  # FileNotFoundError for a missing file
    if os.path.isdir(name):
        raise ValueError(f"{name}: is a directory, not a safetensors file")
    bad = f"{name}: not a valid safetensors file"
    if size < 8:
        raise ValueError(f"{bad} (truncated: {size} bytes, the header length alone needs 8)")
    with open(name, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{bad} (truncated or corrupt: header length {n} but the file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{bad} (corrupt header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (corrupt header: not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{bad} (corrupt header: __metadata__ must map strings to strings)")
    data_len = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
            itemsize = _DTYPES[dtype][1]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{bad} (corrupt header entry for tensor {key!r}: {entry!r})"
            ) from None
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(
                f"{bad} (corrupt header: tensor {key!r} {dtype}{shape} needs "
                f"{math.prod(shape) * itemsize} bytes, offsets give {end - begin})"
            )
        if end > data_len:
            raise ValueError(
                f"{bad} (truncated: tensor {key!r} ends at byte {end} of the data section, "
                f"which has only {data_len} bytes)"
            )
        end_max = max(end_max, end)
    if end_max != data_len:
        raise ValueError(
            f"{bad} (corrupt: the data section has {data_len} bytes, tensors use {end_max})"
        )
    return header, metadata


def _read_safetensors(
    path: PathLike, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a safetensors file after validating it; errors name the file."""
    name = os.fspath(path)
    header, metadata = _read_header(name)
    dev = str(torch.device(device))
    try:
        with safetensors.safe_open(name, framework="pt", device=dev) as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as e:  # safetensors raises its own error types for anything it dislikes
        raise ValueError(f"{name}: could not read the safetensors file: {e}") from None
    return tensors, metadata
