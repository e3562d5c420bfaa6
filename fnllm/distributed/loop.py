"""The distributed fit: :func:`fnllm.train.fit`'s loop on a process group.

Every rank runs ``train.fit``'s loop (``fnllm.train.fit.fit_loop``) on its slice of the
global batch; a ``Runner`` (``fnllm.train._run``) for the process group supplies what differs.
The loss is wrapped with :func:`~fnllm.distributed.data_parallel` (replicated params) or
:func:`~fnllm.distributed.sharded` (DTensor params), so all ranks make the same update. Only
rank 0 shows a progress bar and prints; checkpoints are written by rank 0 alone
(:func:`fnllm.train.save_checkpoint`, the same file a single-process :func:`fnllm.train.fit`
writes and resumes) or, for sharded params, by every rank into one DCP folder
(:func:`~fnllm.distributed.save_sharded`). Resuming follows the determinism contract of
:func:`fnllm.train.fit`: step ``s`` uses ``random.fold_in(key, s)`` and global batch ``data(s)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from fnllm import train
from fnllm.distributed.checkpoint import (
    latest_sharded,
    load_sharded,
    save_sharded,
    sharded_checkpoint_path,
)
from fnllm.distributed.collectives import barrier, broadcast, is_main
from fnllm.distributed.parallel import data_parallel, shard_data
from fnllm.distributed.sharding import is_sharded, sharded
from fnllm.train import _run  # fit's argument checks, checkpoint options and Runner, shared
from fnllm.train.fit import OnNonFinite, fit_loop

__all__ = ["fit", "log"]


def fit(
    loss_fn: Callable[..., Any],
    optimizer: Any,
    trainable: Any,
    frozen: Any,
    data: Callable[[int], Any] | Any,
    *,
    key: torch.Tensor,
    steps: int | None = None,
    epochs: int | None = None,
    opt_state: Any = None,
    clip: float | None = None,
    checkpoint: train.Checkpointing | str | os.PathLike | None = None,
    resume: bool = True,
    model: Any = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    eval_fn: Callable[[Any, Any], Any] | None = None,
    eval_every: int = 0,
    on_nonfinite: OnNonFinite = "skip",
    tokens_per_batch: int | Callable[[Any], int] | None = None,
    **legacy: Any,
) -> train.FitResult:
    """Train on every rank of the default process group, each on its slice of ``data(step)``.

    This is :func:`fnllm.train.fit`'s loop (the same steps, keys, non-finite guard, evaluation
    and checkpoint schedule) on a process group. ``trainable`` either holds plain tensors (data
    parallel: every rank starts from rank 0's ``trainable``, ``frozen`` and ``opt_state``,
    broadcast once, and gradients are averaged over ranks), or DTensor leaves from
    :func:`~fnllm.distributed.shard` (sharded: params, gradients and optimizer state split over
    the mesh). ``data(step)`` is the *global* batch; its size must be a multiple of the world
    size. The step is eager (the model's ``apply`` may be compiled inside ``loss_fn``). A
    non-finite step is skipped (or stops the run) on every rank alike: the guard sees the
    averaged gradient. In a single process this is ``train.fit`` on the whole batch.

    Example:
        >>> import torch
        >>> from fnllm import distributed, optim, random
        >>> loss_fn = lambda tr, fr, x, key: ((x @ tr["w"] - 1.0) ** 2).mean()
        >>> out = distributed.fit(loss_fn, optim.sgd(1.0), {"w": torch.zeros(2)}, {},
        ...                       lambda step: torch.eye(2), key=random.key(0), steps=20,
        ...                       progress=False)
        >>> out.step, out.trainable["w"]
        (20, tensor([1., 1.]))

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch, key) -> loss`` or ``(loss, aux)``, for one
            rank's slice of the batch (a mean over it).
        optimizer: an optax-style optimizer, e.g. ``fnllm.optim.adamw``.
        trainable: the params to train, replicated or sharded.
        frozen: the params kept fixed (replicated or sharded).
        data: ``data(step) -> global batch`` or a loader with ``.batch(step)`` (such as
            :func:`fnllm.data.epochs`).
        key: the run's base key, the same on every rank.
        steps: the total number of steps to reach.
        epochs: instead of ``steps``, this many epochs of ``data`` (see :func:`fnllm.train.fit`).
        opt_state: the initial optimizer state (default ``optimizer.init(trainable)``).
        clip: clip the global gradient norm (over all ranks' averaged gradient).
        checkpoint: a :class:`fnllm.train.Checkpointing` (directory, every, keep) or just a
            directory, as for :func:`fnllm.train.fit`; the same path on every rank (a shared
            file system across hosts). ``overwrite=True`` is refused: with ``resume=False``
            the run writes its checkpoints beside those already in the folder.
        resume: resume from the newest checkpoint in the folder.
        model: the model config, recorded in (replicated) checkpoints.
        meta: extra JSON metadata stored in checkpoints (needs ``checkpoint``).
        progress: show a progress bar (on rank 0 only).
        eval_fn: ``eval_fn(trainable, frozen)``, run on every rank (as for ``train.fit``).
        eval_every: run ``eval_fn`` every this many steps.
        on_nonfinite: ``"skip"``, ``"stop"`` or ``"raise"`` (as for ``train.fit``).
        tokens_per_batch: tokens in a rank's batch, for the tokens/s figure.
        **legacy: ``checkpoint_dir``, ``checkpoint_every``, ``keep`` (the older spelling of
            ``checkpoint``; deprecated, removed in 0.2).

    Returns:
        A :class:`fnllm.train.FitResult`; ``history`` holds the mean loss over ranks.

    Raises:
        ValueError: bad arguments, a global batch the world size does not divide, trees that
            differ across ranks, a checkpoint that does not match.
        CollectiveError: another rank died or timed out.
    """
    ckpt = _run.checkpointing(checkpoint, legacy)
    steps = _run.total_steps(steps, epochs, data)
    _run.check_args(
        loss_fn=loss_fn, optimizer=optimizer, key=key, steps=steps, eval_fn=eval_fn,
        eval_every=eval_every, ckpt=ckpt, resume=resume, meta=meta, on_nonfinite=on_nonfinite,
        progress=progress, tokens_per_batch=tokens_per_batch, donate=False, compile=False,
    )  # fmt: skip
    if ckpt is not None and ckpt.overwrite:
        raise ValueError(
            "fit: distributed.fit does not delete checkpoints: Checkpointing(overwrite=True) "
            "is for train.fit; clear the folder first or use another one"
        )
    # eager (the gradient all-reduce hooks do not survive torch.compile) and not donated
    return fit_loop(
        _ProcessGroup(is_sharded(trainable)), loss_fn, optimizer, trainable, frozen, data,
        key=key, steps=steps, opt_state=opt_state, compile=False, clip=clip, autocast=None,
        eval_fn=eval_fn, eval_every=eval_every, ckpt=ckpt, resume=resume, model=model, meta=meta,
        on_nonfinite=on_nonfinite, progress=progress, tokens_per_batch=tokens_per_batch,
        donate=False,
    )  # fmt: skip


class _ProcessGroup(_run.Runner):
    """``train.fit``'s loop on the default process group (see :func:`fit`)."""

    def __init__(self, shards: bool) -> None:
        self.shards = shards
        self.is_main = is_main()

    def prepare(self, loss_fn: Any, batch_of: Callable[[int], Any]) -> tuple[Any, Any]:
        wrapped = sharded(loss_fn) if self.shards else data_parallel(loss_fn)
        return wrapped, shard_data(batch_of)

    def start(
        self, trainable: Any, frozen: Any, opt_state: Any, optimizer: Any
    ) -> tuple[Any, Any, Any]:
        if not self.shards:  # as DDP does: every rank starts from rank 0's values
            trainable, frozen = broadcast((trainable, frozen))
            if opt_state is not None:
                opt_state = broadcast(opt_state)
        return super().start(trainable, frozen, opt_state, optimizer)

    def open_folder(self, ckpt: train.Checkpointing | None, resume: bool) -> None:
        pass  # nothing deleted: a new run writes beside what the folder holds

    def resume(
        self,
        ckpt: train.Checkpointing | None,
        resume: bool,
        *,
        trainable: Any,
        opt_state: Any,
        key: torch.Tensor,
        model: Any,
    ) -> tuple[Any, Any, int]:
        if ckpt is None or not resume:
            return trainable, opt_state, 0
        if self.shards:
            found = latest_sharded(ckpt.directory)
            ck = found and load_sharded(found, trainable=trainable, opt_state=opt_state)
        else:
            found = train.latest_checkpoint(ckpt.directory)
            ck = found and train.load_checkpoint(
                found, trainable=trainable, opt_state=opt_state, model=model
            )
        if not ck:
            return trainable, opt_state, 0
        if not torch.equal(torch.as_tensor(ck.key).to(key.device), key):
            raise ValueError(
                f"fit: {found} was written by a run with another key; start a new checkpoint folder"
            )
        return ck.trainable, ck.opt_state, ck.step

    def save(self, ckpt: train.Checkpointing, step: int, **state: Any) -> None:
        model = state.pop("model")
        if self.shards:  # every rank writes its own shards
            save_sharded(sharded_checkpoint_path(ckpt.directory, step), step=step, **state)
            if self.is_main:
                _prune_sharded(ckpt.directory, ckpt.keep)
        elif self.is_main:  # whole tensors: rank 0 writes train's single file
            os.makedirs(ckpt.directory, exist_ok=True)
            path = train.checkpoint_path(ckpt.directory, step)
            train.save_checkpoint(path, step=step, model=model, **state)
            train.prune_checkpoints(ckpt.directory, ckpt.keep)
        barrier()  # nobody runs ahead of a checkpoint that is not yet on disk


def log(*args: Any, bar: Any = None) -> None:
    """Print on rank 0 only (through ``bar.write`` when a tqdm bar is given).

    Example:
        >>> from fnllm import distributed
        >>> distributed.log("step", 3, "loss", 2.5)
        step 3 loss 2.5

    Args:
        *args: what to print, joined by spaces.
        bar: a tqdm progress bar to print above (optional).

    Returns:
        None.

    Raises:
        TypeError: ``bar`` is given but has no ``write`` method.
    """
    if bar is not None and not callable(getattr(bar, "write", None)):
        raise TypeError(f"log: bar must be a tqdm progress bar (with .write), got {bar!r:.40}")
    if not is_main():
        return
    text = " ".join(str(a) for a in args)
    if bar is not None and not getattr(bar, "disable", True):
        bar.write(text)
    else:
        print(text, flush=True)


# ----------------------------------------------------------------------------- helpers


def _prune_sharded(directory: str | os.PathLike, keep: int) -> None:
    found = [
        sharded_checkpoint_path(directory, 0).with_name(p.name)
        for p in os.scandir(os.fspath(directory))
        if p.is_dir() and p.name.startswith("step_") and p.name.endswith(".dcp")
    ]
    for old in sorted(found)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
