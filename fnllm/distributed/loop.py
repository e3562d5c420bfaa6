"""The distributed fit loop: data-parallel or sharded steps, rank-0 progress and checkpoints.

Every rank runs the same loop on its slice of the global batch. The loss is wrapped with
:func:`~fnllm.distributed.data_parallel` (replicated params) or
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
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from fnllm import random as jr
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
from fnllm.train import _run  # fit's argument checks and checkpoint options, shared

__all__ = ["fit", "log"]


def fit(
    loss_fn: Callable[..., Any],
    optimizer: Any,
    trainable: Any,
    frozen: Any,
    data: Callable[[int], Any] | Any,
    *,
    key: torch.Tensor,
    steps: int,
    opt_state: Any = None,
    clip: float | None = None,
    checkpoint: train.Checkpointing | str | os.PathLike | None = None,
    resume: bool = True,
    model: Any = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    **legacy: Any,
) -> train.FitResult:
    """Train on every rank of the default process group, each on its slice of ``data(step)``.

    ``trainable`` either holds plain tensors (data parallel: every rank starts from rank 0's
    ``trainable``, ``frozen`` and ``opt_state``, broadcast once, and gradients are averaged
    over ranks), or DTensor leaves from :func:`~fnllm.distributed.shard` (sharded:
    params, gradients and optimizer state split over the mesh). ``data(step)`` is the *global*
    batch; its size must be a multiple of the world size. The step is eager (the model's
    ``apply`` may be compiled inside ``loss_fn``). A non-finite step is skipped on every rank
    alike (the guard sees the averaged gradient). In a single process this is ``train.fit``'s
    loop on the whole batch.

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
        data: ``data(step) -> global batch`` or a loader with ``.batch(step)``.
        key: the run's base key, the same on every rank.
        steps: the total number of steps to reach.
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
    _run.check_args(
        loss_fn=loss_fn, optimizer=optimizer, key=key, steps=steps, eval_fn=None, eval_every=0,
        ckpt=ckpt, resume=resume, meta=meta, on_nonfinite="skip", progress=progress,
        tokens_per_batch=None, donate=False, compile=False,
    )  # fmt: skip
    if ckpt is not None and ckpt.overwrite:
        raise ValueError(
            "fit: distributed.fit does not delete checkpoints: Checkpointing(overwrite=True) "
            "is for train.fit; clear the folder first or use another one"
        )
    local_data = shard_data(data)
    shards = is_sharded(trainable)
    wrapped = sharded(loss_fn) if shards else data_parallel(loss_fn)
    step_fn = train.make_step(wrapped, optimizer, compile=False, clip=clip)
    if not shards:  # as DDP does: every rank starts from rank 0's values
        trainable, frozen = broadcast((trainable, frozen))
    if opt_state is None:
        opt_state = optimizer.init(trainable)
    elif not shards:
        opt_state = broadcast(opt_state)

    start = 0
    if ckpt is not None and resume:
        if shards:
            found = latest_sharded(ckpt.directory)
            ck = found and load_sharded(found, trainable=trainable, opt_state=opt_state)
        else:
            found = train.latest_checkpoint(ckpt.directory)
            ck = found and train.load_checkpoint(
                found, trainable=trainable, opt_state=opt_state, model=model
            )
        if ck:
            if not torch.equal(torch.as_tensor(ck.key).to(key.device), key):
                raise ValueError(
                    f"fit: {found} was written by a run with another key; start a new "
                    "checkpoint folder"
                )
            trainable, opt_state, start = ck.trainable, ck.opt_state, ck.step

    def save(n: int) -> None:
        assert ckpt is not None
        state = {"trainable": trainable, "opt_state": opt_state, "step": n, "key": key}
        if shards:  # every rank writes its own shards
            save_sharded(sharded_checkpoint_path(ckpt.directory, n), **state, meta=meta)
            if is_main():
                _prune_sharded(ckpt.directory, ckpt.keep)
        elif is_main():  # whole tensors: rank 0 writes train's single file
            os.makedirs(ckpt.directory, exist_ok=True)
            path = train.checkpoint_path(ckpt.directory, n)
            train.save_checkpoint(path, **state, model=model, meta=meta)
            train.prune_checkpoints(ckpt.directory, ckpt.keep)
        barrier()  # nobody runs ahead of a checkpoint that is not yet on disk

    history: list[dict[str, Any]] = []
    skipped: list[int] = []
    done = start
    bar = tqdm(total=steps, initial=min(start, steps), disable=not (progress and is_main()))
    try:
        for s in range(start, steps):
            batch = local_data(s)
            t0 = time.perf_counter()
            trainable, opt_state, metrics = step_fn(
                trainable, frozen, opt_state, batch, jr.fold_in(key, s)
            )
            loss, finite = float(metrics["loss"]), bool(metrics["finite"])
            history.append(
                {
                    "step": s + 1,
                    "loss": loss,
                    "grad_norm": float(metrics["grad_norm"]),
                    "finite": finite,
                    "seconds": time.perf_counter() - t0,
                }
            )
            if not finite:
                skipped.append(s)
                log(f"fit: step {s}: non-finite loss or gradient; update skipped", bar=bar)
            done = s + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if ckpt is not None and ckpt.every and done % ckpt.every == 0:
                save(done)
        if ckpt is not None and done > start and not (ckpt.every and done % ckpt.every == 0):
            save(done)
    finally:
        bar.close()
    return train.FitResult(trainable, opt_state, done, history, [], skipped, None)


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
    """
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
