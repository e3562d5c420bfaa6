"""Checkpoints: parameter trees and models in safetensors files, written atomically.

A tree is stored as one safetensors tensor per leaf, keyed by the leaf's dotted path
(``"blocks.3.attn.qkv.weight"``), so any safetensors reader sees ordinary names. The file's
metadata holds a small JSON description of the containers (dict / list / tuple, key order,
empty containers, ``None`` and plain-number leaves), which makes :func:`load` return exactly
the tree that was saved. Files written by other tools load too: their tree is rebuilt from the
paths with :func:`fnllm.tree.unflatten`.

Saving never leaves a partial file under the final name: the bytes go to a temporary file in
the same directory, which is flushed, ``fsync``-ed and then renamed over the target with
``os.replace`` (atomic on POSIX and Windows). The temp file's name carries the writer's host
and pid; a later save into the same directory removes the temp files of writers that died
mid-save (same host, process gone) or that are older than a day, never one a live process may
still be writing. Nothing is ever unpickled.

Every tensor's CRC-32 is stored in the metadata (``fnllm.crc32``) and checked on load, so a
flipped bit on disk is reported with the tensor's name instead of loading silently
(``verify=False`` skips the check; files without checksums load unchecked).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from fnllm import _quant, _tree_ops
from fnllm import models as _models
from fnllm import tree as _tree
from fnllm.io import _safetensors

__all__ = ["clean_temp_files", "load", "load_meta", "load_model", "save", "save_model"]

PathLike = str | os.PathLike
Device = str | torch.device

# Metadata keys fnllm writes itself; user ``meta`` may not use them.

# safetensors dtype names -> (torch dtype, bytes per element)


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
            leaves are tensors (quantized weights from :func:`fnllm.io.quantize` are stored as
            their inner tensors, ``<path>.<name>``, and rebuilt by :func:`load`); ``None``,
            ``bool``, ``int``, ``float`` and ``str`` leaves are kept in the metadata. Tensors
            may live on any device, be non-contiguous or share storage (tied weights): leaves
            that are the very same tensor load back as one tensor object again.
        meta: extra JSON-serialisable values stored in the file's metadata, one JSON string per
            key. Keys ``"format"`` and ``"fnllm.*"`` are reserved.

    Returns:
        None.

    Raises:
        TypeError: a leaf is neither a tensor nor a plain value, or a ``meta`` value is not JSON.
        ValueError: a dict key is not a string, is empty or contains a dot; or a ``meta`` key is
            reserved.
    """
    _write_tree(path, tree, _safetensors.encode_meta(meta))


def load(
    path: PathLike, *, with_meta: bool = False, device: Device = "cpu", verify: bool = True
) -> Any:
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
        verify: check every tensor against the CRC-32 stored when it was saved (False: skip
            the check, for speed).

    Returns:
        The tree, exactly as saved (containers, key order, dtypes, shapes, tied leaves); for a
        file written by another tool, the tree that :func:`fnllm.tree.unflatten` builds from its
        keys. With ``with_meta``, a pair ``(tree, meta)``.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is truncated, corrupt or not a safetensors file, or a tensor's
            bytes do not match its stored checksum (the message names the file and tensor).
    """
    tensors, metadata = _safetensors.read_safetensors(path, device=device, verify=verify)
    tree = _decode_tree(path, tensors, metadata)
    if with_meta:
        return tree, _safetensors.decode_meta(metadata)
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
    _, metadata = _safetensors.read_header(path)
    return _safetensors.decode_meta(metadata)


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
    _safetensors.check_params(model, _safetensors.flat_tensors(params, "params"), where="params")
    config_entry = {_safetensors.CONFIG_KEY: json.dumps(config, sort_keys=True)}
    _write_tree(path, params, _safetensors.encode_meta(meta), config_entry)


def load_model(
    path: PathLike, *, with_meta: bool = False, device: Device = "cpu", verify: bool = True
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
        verify: check the stored per-tensor checksums (False: skip, for speed).

    Returns:
        ``(model, params)``, or ``(model, params, meta)`` with ``with_meta``.

    Raises:
        ValueError: the file is corrupt (a tensor failing its checksum is named), holds no
            model config, or its config does not match its weights (wrong shapes; the paths
            are named).
        KeyError: the weights lack a leaf the config needs or have one it does not.
    """
    tensors, metadata = _safetensors.read_safetensors(path, device=device, verify=verify)
    if _safetensors.CONFIG_KEY not in metadata:
        raise ValueError(
            f"{os.fspath(path)}: no model config in the metadata (was it written by "
            "fnllm.io.save_model? use fnllm.io.load for a plain tree)"
        )
    try:
        config = json.loads(metadata[_safetensors.CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: model config is not valid JSON: {e}") from None
    try:
        model = _models.from_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: bad model config {config!r}: {e}") from None
    params = _decode_tree(path, tensors, metadata)
    _safetensors.check_params(
        model, _safetensors.flat_tensors(params, "weights"), where=f"{os.fspath(path)}: weights"
    )
    if with_meta:
        return model, params, _safetensors.decode_meta(metadata)
    return model, params


def clean_temp_files(directory: PathLike) -> list[str]:
    """Remove the temp files that saves killed mid-write left in ``directory``.

    :func:`save` (and every fnllm writer) does this itself before each write; call it to tidy a
    folder without saving. A temp file is removed only when its writer (host and pid are in its
    name) is a process on this host that has exited, or when it is more than a day old.

    Example:
        >>> import os, tempfile
        >>> from fnllm import io
        >>> d = tempfile.mkdtemp()
        >>> left = os.path.join(d, ".w.safetensors.oldhost.123.0123abcd.tmp")
        >>> open(left, "wb").close(); os.utime(left, (0, 0))   # a two-day-old leftover
        >>> [os.path.basename(p) for p in io.clean_temp_files(d)]
        ['.w.safetensors.oldhost.123.0123abcd.tmp']

    Args:
        directory: the folder to tidy (need not exist).

    Returns:
        The paths removed.
    """
    return _safetensors.clean_temp_files(directory)


# ----------------------------------------------------------------------------- tree encoding


def _write_tree(
    path: PathLike, tree: Any, metadata: dict[str, str], extra: Mapping[str, str] | None = None
) -> None:
    """Encode ``tree`` and write it with ``metadata``, its structure, aliases and ``extra``."""
    tensors, structure, aliases = _encode_tree(tree)
    metadata[_safetensors.STRUCTURE_KEY] = json.dumps(structure, separators=(",", ":"))
    if aliases:
        metadata[_safetensors.ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    metadata.update(extra or {})
    _safetensors.write_safetensors(path, tensors, metadata)


def _encode_tree(tree: Any) -> tuple[dict[str, torch.Tensor], Any, dict[str, str]]:
    """Split a tree into {path: cpu contiguous tensor}, a JSON structure spec and aliases."""
    prep = _safetensors.TensorStager(dedupe=True)

    def leaf(path: str, x: torch.Tensor) -> Any:
        prep.add(path, x)
        return "T"

    def walk(node: Any, path: str) -> Any:
        if _quant.is_quantized(node):  # NF4/int8 (io.quantize): its inner tensors + metadata
            kind, inner, info = _quant.encode(node)
            for name, x in inner.items():
                prep.add(_tree_ops.join(path, name), x)
            return {"q": [kind, info, list(inner)]}
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


def _decode_tree(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
    """Rebuild the saved tree from tensors and the structure spec (or from paths alone)."""
    name = os.fspath(path)
    if _safetensors.STRUCTURE_KEY not in metadata:
        return _tree.unflatten(tensors) if tensors else {}
    try:
        structure = json.loads(metadata[_safetensors.STRUCTURE_KEY])
        aliases = json.loads(metadata.get(_safetensors.ALIASES_KEY, "{}"))
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
            if tag == "q":
                return quantized(body, p)
        raise ValueError(f"{name}: corrupt fnllm structure metadata at {p or '<root>'!r}")

    def quantized(body: Any, p: str) -> Any:
        try:
            kind, info, names = body
            keys = [_tree_ops.join(p, n) for n in names]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"the file has no tensor {missing[0]!r}")
            used.update(keys)
            return _quant.decode(kind, {n: tensors[k] for n, k in zip(names, keys)}, info)
        except ImportError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{name}: corrupt quantized leaf {p or '<root>'!r}: {e}") from None

    out = walk(structure, "")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{name}: tensors not described by the structure metadata: {extra}")
    return out


# ----------------------------------------------------------------------------- metadata


# ----------------------------------------------------------------------------- file level
