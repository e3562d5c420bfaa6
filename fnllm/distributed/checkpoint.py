"""Sharded train-state checkpoints with ``torch.distributed.checkpoint`` (DCP).

Why DCP and not "gather to rank 0 into one safetensors file": sharding exists because the
whole train state (params plus two AdamW moments) may not fit one process. With DCP every
rank writes only its own shards, in parallel, and no rank ever holds the whole tree; the
checkpoint records each tensor's global shape and the pieces it was cut into, so it loads
under any other world size (or in one process, without a process group) by reading exactly
the byte ranges each new shard needs. A checkpoint is a directory ``step_<N>.dcp`` holding
DCP's files and ``fnllm.json`` (step, key, world size, user metadata); it is written under a
temporary name and renamed once complete, so a crash never leaves a half-written checkpoint
that looks finished. Replicated (data-parallel) training uses
:func:`fnllm.train.save_checkpoint` instead: rank 0 writes the usual single file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from fnllm import tree
from fnllm.distributed.collectives import barrier, is_main, world_size
from fnllm.train import Checkpoint, checkpoint_path

__all__ = ["latest_sharded", "load_sharded", "save_sharded", "sharded_checkpoint_path"]

_INFO = "fnllm.json"
_NAME = re.compile(r"^step_(\d+)\.dcp$")
_FORMAT = "fnllm-dcp-1"


def sharded_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The folder for step ``step``: :func:`fnllm.train.checkpoint_path` with a ``.dcp`` suffix.

    Example:
        >>> from fnllm import distributed
        >>> distributed.sharded_checkpoint_path("ckpt", 7).name
        'step_00000007.dcp'

    Args:
        directory: where the run keeps its checkpoints.
        step: how many steps the saved state has taken.

    Returns:
        A ``Path``; sorted by name, a run's folders are in step order.
    """
    return checkpoint_path(directory, step).with_suffix(".dcp")


def save_sharded(
    path: str | os.PathLike,
    *,
    trainable: Any,
    opt_state: Any,
    step: int,
    key: torch.Tensor,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save a (sharded) train state to the folder ``path``; every rank writes its own shards.

    Call it on every rank (it is a collective). Leaves may be DTensors (each rank writes its
    shard) or plain tensors (written once). Without a process group it saves in one process.

    Example:
        >>> import tempfile, torch
        >>> from fnllm import distributed, random
        >>> path = distributed.sharded_checkpoint_path(tempfile.mkdtemp(), 3)
        >>> distributed.save_sharded(path, trainable={"w": torch.ones(2)}, opt_state=(),
        ...                          step=3, key=random.key(0))
        >>> distributed.load_sharded(path, trainable={"w": torch.zeros(2)}, opt_state=()).step
        3

    Args:
        path: the checkpoint folder (replaced once the new one is complete).
        trainable: the trainable params.
        opt_state: the optimizer state.
        step: the number of steps taken.
        key: the run's base key.
        meta: extra JSON-serialisable metadata.

    Returns:
        None.

    The folder is written as ``<name>.tmp`` and renamed once complete; a failed save
    removes its ``.tmp`` folder, and the next save to the same path removes what a killed
    writer left (or restores the previous checkpoint if it was caught mid-swap).

    Raises:
        ValueError: ``step`` is negative.
        TypeError: ``step`` is not an int (numpy integers are accepted), ``key`` is not an
            integer tensor, ``meta`` is not a JSON-serialisable dict (the message names the
            first bad entry), or ``path`` is not a path.
        CollectiveError: a rank died during the save.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_sharded: path must be a str or os.PathLike, got {path!r:.60}")
    step = _step(step)
    info = {
        "format": _FORMAT,
        "step": step,
        "key": _key_list(key),
        "world_size": world_size(),
        "meta": _meta(meta),
    }
    text = json.dumps(info)  # checked before anything is written
    final = Path(path)
    tmp, old = _temp_names(final)
    if is_main():
        _sweep(final)
    barrier()
    try:
        with _single_process_quiet():
            dcp.save(_state(trainable, opt_state), checkpoint_id=str(tmp))
        if is_main():
            (tmp / _INFO).write_text(text)
            # the old folder moves aside before the new one takes its name: a crash at any
            # point leaves a complete checkpoint (final or old) that the next save restores
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def load_sharded(path: str | os.PathLike, *, trainable: Any, opt_state: Any) -> Checkpoint:
    """Load a train state saved by :func:`save_sharded` into the layout of the templates.

    The templates give structure, shapes, dtypes and placement: DTensor leaves on a mesh of any
    size get their shards (the checkpoint may come from another world size), plain tensors get
    the whole values (e.g. one process, no process group). The templates are not modified.

    Example:
        >>> import tempfile, torch
        >>> from fnllm import distributed, random
        >>> path = distributed.sharded_checkpoint_path(tempfile.mkdtemp(), 1)
        >>> ones = {"w": torch.ones(2)}
        >>> distributed.save_sharded(path, trainable=ones, opt_state=(), step=1, key=random.key(0))
        >>> distributed.load_sharded(path, trainable={"w": torch.zeros(3)}, opt_state=())
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...: 'trainable/w' has shape [2] in the checkpoint, [3] in the template

    Args:
        path: the checkpoint folder.
        trainable: a template of the trainable params (e.g. the sharded initial params).
        opt_state: a template of the optimizer state (e.g. ``optimizer.init(trainable)``).

    Returns:
        A :class:`fnllm.train.Checkpoint` (trainable, opt_state, step, key, meta).

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: the checkpoint holds other paths or shapes than the templates.
    """
    folder = Path(path)
    if not (folder / _INFO).is_file():
        raise FileNotFoundError(f"{folder}: not a complete sharded checkpoint (no {_INFO})")
    info = json.loads((folder / _INFO).read_text())
    if info.get("format") != _FORMAT:
        raise ValueError(f"{folder}: not an fnllm sharded checkpoint: {info.get('format')!r}")
    fresh = tree.map(_empty_like, (trainable, opt_state))
    state = _state(*fresh)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    _check_against(folder, saved, state)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    key = torch.tensor(info["key"], dtype=torch.int64)
    return Checkpoint(fresh[0], fresh[1], int(info["step"]), key, info["meta"])


def latest_sharded(directory: str | os.PathLike) -> Path | None:
    """The complete sharded checkpoint with the highest step in ``directory``, or None.

    Example:
        >>> import tempfile
        >>> from fnllm import distributed
        >>> distributed.latest_sharded(tempfile.mkdtemp()) is None
        True

    Args:
        directory: a checkpoint directory (it need not exist).

    Returns:
        The folder ``step_<N>.dcp`` with the largest ``N`` that finished writing, or None.

    Raises:
        TypeError: ``directory`` is not a path.
        NotADirectoryError: ``directory`` is a file.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"latest_sharded: directory must be a path, got {directory!r:.40}")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"latest_sharded: {d} is a file, not a checkpoint directory")
    if not d.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in d.iterdir()
        if (m := _NAME.match(p.name)) and (p / _INFO).is_file()
    ]
    return max(found)[1] if found else None


# ----------------------------------------------------------------------------- helpers


def _state(trainable: Any, opt_state: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part, t in (("trainable", trainable), ("opt_state", opt_state)):
        for p, x in tree.flatten(t).items():
            if isinstance(x, torch.Tensor):
                out[f"{part}/{p}"] = x
    return out


def _step(step: Any) -> int:
    if isinstance(step, np.integer):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"save_sharded: step must be an int, got {step!r}")
    if step < 0:
        raise ValueError(f"save_sharded: step must be >= 0, got {step}")
    return step


def _key_list(key: Any) -> Any:
    if not isinstance(key, torch.Tensor) or key.dtype not in (torch.int32, torch.int64):
        got = key.dtype if isinstance(key, torch.Tensor) else type(key).__name__
        raise TypeError(f"save_sharded: key must be a fnllm.random key (int tensor), got {got}")
    return key.tolist()


def _meta(meta: Any) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"save_sharded: meta must be a dict, got {type(meta).__name__}")
    for k, v in meta.items():
        try:
            json.dumps({k: v})
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"save_sharded: meta[{k!r}] is not JSON-serialisable ({type(v).__name__}: {err})"
            ) from None
    return dict(meta)


def _temp_names(final: Path) -> tuple[Path, Path]:
    return final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")


def _sweep(final: Path) -> None:
    """Remove what a save to ``final`` killed mid-way left: its ``.tmp`` folder, and an
    ``.old`` folder (put back as ``final`` when the kill came between the two renames)."""
    tmp, old = _temp_names(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load)")
        yield


def _empty_like(x: Any) -> Any:
    return torch.empty_like(x) if isinstance(x, torch.Tensor) else x


def _check_against(folder: Path, saved: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(state) - set(saved))
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not match the templates: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for name, x in state.items():
        want = list(x.shape)  # a DTensor's shape is its global shape
        have = list(getattr(saved[name], "size", want))
        if have != want:
            raise ValueError(
                f"{folder}: {name!r} has shape {have} in the checkpoint, {want} in the template"
            )
