"""Train-state checkpoints: trainable params, optimizer state, step and key in one safetensors file.

A checkpoint is written with :func:`fnllm.io.save`, which writes a temporary file and renames
it over the target, so a crash or a kill during a save never damages a checkpoint that was
already complete: the directory holds either the old file or the new one, never half of one.
Files are named ``step_00000010.safetensors``; :func:`latest_checkpoint` ignores anything else
(such as an interrupted save's temporary file).

Restoring needs *templates*: the trainable tree and the optimizer state of the run being
resumed (e.g. fresh from ``model.init`` and ``optimizer.init``). The checkpoint must hold
exactly their leaves with the same shapes and dtypes; otherwise it is from another model or
another partition and :func:`load_checkpoint` says which paths differ.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fnllm import _checks, io, tree

__all__ = [
    "Checkpoint",
    "Checkpointing",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

FORMAT = "fnllm.train.checkpoint/1"
_META_KEY = "train"
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")


class Checkpoint(NamedTuple):
    """A restored train state (see :func:`load_checkpoint`).

    Example:
        >>> import torch
        >>> Checkpoint({"w": torch.zeros(1)}, (), 3, torch.tensor([0, 0]), {}).step
        3

    Args:
        trainable: the trainable params, in the template's structure.
        opt_state: the optimizer state, in the template's structure.
        step: the number of steps taken (the next step to run; also the data position).
        key: the base key of the run (step ``s`` uses ``random.fold_in(key, s)``).
        meta: the user metadata saved with it.
    """

    trainable: Any
    opt_state: Any
    step: int
    key: Any
    meta: dict[str, Any]


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often :func:`~fnllm.train.fit` saves checkpoints: ``fit(checkpoint=...)``.

    A folder holds the checkpoints of one run. ``fit(resume=True)`` (the default) continues the
    run found there; ``fit(resume=False)`` refuses a folder that already holds checkpoints,
    unless ``overwrite=True``, which deletes them before the new run starts.

    Example:
        >>> ck = Checkpointing("runs/a", every=100, keep=3)
        >>> ck.directory, ck.every, ck.keep, ck.overwrite
        (PosixPath('runs/a'), 100, 3, False)
        >>> Checkpointing("runs/a", every=-1)
        Traceback (most recent call last):
        ...
        ValueError: Checkpointing: every: -1 < 0

    Args:
        directory: the run's checkpoint folder (created when the first checkpoint is saved).
        every: save every this many steps (0: only at the end).
        keep: how many of the newest checkpoints to keep (>= 1).
        overwrite: with ``fit(resume=False)``, delete the checkpoints already in ``directory``
            instead of refusing to start.
    """

    directory: Path
    every: int = 0
    keep: int = 2
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(
                f"Checkpointing: directory must be a path, got {type(self.directory).__name__}"
            )
        object.__setattr__(self, "directory", Path(self.directory))
        _checks.check_int("Checkpointing: every", self.every, low=0)
        _checks.check_int("Checkpointing: keep", self.keep, low=1)
        if not isinstance(self.overwrite, bool):
            raise TypeError(f"Checkpointing: overwrite must be a bool, got {self.overwrite!r}")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name a checkpoint of ``step`` gets in ``directory``.

    Example:
        >>> str(checkpoint_path("ckpt", 120))
        'ckpt/step_00000120.safetensors'

    Args:
        directory: the checkpoint directory.
        step: the number of steps taken.

    Returns:
        ``directory / f"step_{step:08d}.safetensors"``.

    Raises:
        TypeError: ``step`` is not an int (numpy integers are accepted) or ``directory`` not
            a path.
        ValueError: ``step`` is negative.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path: directory must be a path, got {directory!r:.60}")
    if hasattr(step, "__index__") and not isinstance(step, (bool, torch.Tensor)):
        step = operator.index(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"checkpoint_path: step must be an int, got {step!r}")
    if step < 0:
        raise ValueError(f"checkpoint_path: step must be >= 0, got {step}")
    return Path(directory) / f"step_{step:08d}.safetensors"


def save_checkpoint(
    path: str | os.PathLike,
    *,
    trainable: Any,
    opt_state: Any,
    step: int,
    key: Any,
    model: Any = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save a train state to one safetensors file, atomically.

    Example:
        >>> import os, tempfile, torch
        >>> from fnllm import train, random
        >>> path = os.path.join(tempfile.mkdtemp(), "step_00000005.safetensors")
        >>> tr = {"w": torch.ones(2)}
        >>> train.save_checkpoint(path, trainable=tr, opt_state=(), step=5, key=random.key(0))
        >>> train.load_checkpoint(path, trainable=tr, opt_state=()).step
        5

    Args:
        path: the file to write (replaced only once the new file is complete).
        trainable: the trainable params.
        opt_state: the optimizer state.
        step: the number of steps taken so far (the data position of the next batch).
        key: the run's base key (a :mod:`fnllm.random` key tensor).
        model: optional model config with ``to_config()``; stored so that loading into another
            model fails with a clear error.
        meta: extra JSON-serialisable metadata.

    Returns:
        None.

    Raises:
        ValueError: ``step`` is negative or ``meta`` uses the reserved key ``"train"``.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    meta = dict(meta or {})
    if _META_KEY in meta:
        raise ValueError(f"save_checkpoint: meta key {_META_KEY!r} is reserved")
    meta[_META_KEY] = {
        "format": FORMAT,
        "step": int(step),
        "data_position": int(step),
        "model": _model_config(model),
    }
    io.save(path, {"trainable": trainable, "opt_state": opt_state, "key": key}, meta=meta)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    trainable: Any,
    opt_state: Any,
    model: Any = None,
    device: str | torch.device | None = None,
    verify: bool = True,
) -> Checkpoint:
    """Restore a train state saved by :func:`save_checkpoint`, checked against templates.

    Example:
        >>> import os, tempfile, torch
        >>> from fnllm import train, random
        >>> path = os.path.join(tempfile.mkdtemp(), "step_00000001.safetensors")
        >>> train.save_checkpoint(path, trainable={"w": torch.ones(2)}, opt_state=(),
        ...                       step=1, key=random.key(0))
        >>> train.load_checkpoint(path, trainable={"w": torch.zeros(3)}, opt_state=())
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...: checkpoint does not match this model's trainable params: w: (2,) ...

    Args:
        path: the checkpoint file.
        trainable: a template of the trainable params (structure, shapes, dtypes, device).
        opt_state: a template of the optimizer state (e.g. ``optimizer.init(trainable)``).
        model: the model config; when given and the checkpoint recorded one, they must agree.
        device: where to put the tensors (default: the device of each template leaf).
        verify: check each tensor against the checksum stored when it was saved (False: skip,
            for speed); a corrupt tensor is named in the error.

    Returns:
        A :class:`Checkpoint` whose trees have exactly the templates' structure.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not a train checkpoint, is corrupt (a tensor fails its
            checksum), or holds other leaves,
            shapes or dtypes than the templates (the paths are named), or another model.
    """
    name = os.fspath(path)
    loaded, meta = io.load(path, with_meta=True, verify=verify)
    info = meta.pop(_META_KEY, None)
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(loaded, dict):
        raise ValueError(f"{name}: not an fnllm train checkpoint (no {_META_KEY!r} metadata)")
    saved_model = _current_config(info.get("model"), model)
    wanted_model = _model_config(model)
    if saved_model is not None and wanted_model is not None and saved_model != wanted_model:
        raise ValueError(
            f"{name}: checkpoint is from another model: saved {saved_model}, "
            f"resuming {wanted_model}"
        )
    for part in ("trainable", "opt_state", "key"):
        if part not in loaded:
            raise ValueError(f"{name}: checkpoint lacks {part!r}")
    tr = _restore(name, "trainable params", loaded["trainable"], trainable, device)
    st = _restore(name, "optimizer state", loaded["opt_state"], opt_state, device)
    return Checkpoint(tr, st, int(info["step"]), loaded["key"], meta)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """Find the checkpoint with the highest step in ``directory``.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True

    Args:
        directory: a checkpoint directory (it need not exist).

    Returns:
        The path of ``step_<N>.safetensors`` with the largest ``N``, or None when there is none.
        Temporary files of interrupted saves are ignored.
    """
    found = _list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recent checkpoints in ``directory``.

    Example:
        >>> import tempfile
        >>> prune_checkpoints(tempfile.mkdtemp(), keep=2)
        []

    Args:
        directory: a checkpoint directory.
        keep: how many of the newest checkpoints to keep (>= 1).

    Returns:
        The deleted paths.

    Raises:
        ValueError: ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be >= 1, got {keep}")
    found = _list_checkpoints(directory)
    doomed = [p for _, p in found[:-keep]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------- helpers


def _list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, by increasing step."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)))


def _model_config(model: Any) -> Any:
    if model is None:
        return None
    to_config = getattr(model, "to_config", None)
    return to_config() if callable(to_config) else repr(model)


def _current_config(saved: Any, model: Any) -> Any:
    """A saved model config as ``model``'s class writes it today (renamed fields read under
    their new names), so an older checkpoint of the same model still matches."""
    from_config = getattr(type(model), "from_config", None)
    if not isinstance(saved, dict) or from_config is None:
        return saved
    try:
        return from_config(saved).to_config()
    except (ValueError, TypeError):
        return saved  # another kind of model: the comparison names both


def _restore(name: str, what: str, loaded: Any, template: Any, device: Any) -> Any:
    """Put the loaded leaves into the template's structure, checking paths, shapes and dtypes."""
    got = tree.flatten(loaded)
    t_leaves, t_def = tree.flatten_spec(template)
    t_paths = list(tree.flatten(template))
    missing = [p for p in t_paths if p not in got]
    extra = [p for p in got if p not in set(t_paths)]
    problems = []
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    out = []
    for p, t in zip(t_paths, t_leaves):
        if p not in got:
            continue
        x = got[p]
        if isinstance(t, torch.Tensor):
            if not isinstance(x, torch.Tensor):
                problems.append(f"{p}: {type(x).__name__} in the checkpoint, a tensor expected")
                continue
            if x.shape != t.shape or x.dtype != t.dtype:
                problems.append(
                    f"{p}: {tuple(x.shape)} {x.dtype} in the checkpoint, "
                    f"{tuple(t.shape)} {t.dtype} expected"
                )
                continue
            x = x.to(device if device is not None else t.device)
        out.append(x)
    if problems:
        raise ValueError(
            f"{name}: checkpoint does not match this model's {what}: " + "; ".join(problems[:8])
        )
    return tree.unflatten_spec(t_def, out)
