"""The parts of :func:`fnllm.train.fit` (private): argument checks, the checkpoint folder,
resuming, the compile choice, the per-step record, and :class:`Runner`, the one place where
the loop meets its process(es) (``fnllm.distributed.fit`` plugs a process group in there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnllm import _checks, io, tree
from fnllm._deprecation import deprecated
from fnllm.train.checkpoint import (
    Checkpointing,
    _list_checkpoints,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

AUTOCAST = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_LEGACY = ("checkpoint_dir", "checkpoint_every", "keep")

# compile="auto": the fewest steps a run must take for compiling to pay off, per device type
# (docs/performance.md, "Compile or not"); "auto" compiles regionally. The CPU is absent: on the
# 2-core AVX2 machine there, quiet, full size, the regional compiled step took 1.24x fnllm's
# eager step (MiniLM, dropout 0.1), 0.95x without dropout, 1.01x on GPT-2 small: matrix
# products are ~4/5 of a step either way, so a compile is never repaid. H100: a whole step
# saves 8-18 ms (GPT tiny, GPT-2 small), repaying a ~40 s compile after 2,200-5,100 steps.
AUTO_COMPILE_MIN_STEPS = {"cuda": 2000}


class Runner:
    """How the fit loop meets its process(es): the hooks ``fnllm.train.fit.fit_loop`` calls.

    This one is a single process: the loss and data as given, the optimizer state initialised
    here, checkpoints written by this process. ``fnllm.distributed.fit`` subclasses it for a
    process group (gradient all-reduce in the loss, each rank's slice of the batch, rank-0
    progress and checkpoints); the loop itself is the same.
    """

    #: whether this process shows progress and prints (rank 0 of a group)
    is_main = True

    def prepare(self, loss_fn: Any, batch_of: Callable[[int], Any]) -> tuple[Any, Any]:
        """The loss and the ``step -> batch`` function the steps run."""
        return loss_fn, batch_of

    def start(
        self, trainable: Any, frozen: Any, opt_state: Any, optimizer: Any
    ) -> tuple[Any, Any, Any]:
        """``(trainable, frozen, opt_state)`` to start from (before any resume)."""
        if opt_state is None:
            opt_state = optimizer.init(trainable)
        return trainable, frozen, opt_state

    def open_folder(self, ckpt: Checkpointing | None, resume: bool) -> None:
        """Tidy the checkpoint folder and refuse another run's (see :func:`open_folder`)."""
        open_folder(ckpt, resume)

    def resume(
        self,
        ckpt: Checkpointing | None,
        resume: bool,
        *,
        trainable: Any,
        opt_state: Any,
        key: torch.Tensor,
        model: Any,
    ) -> tuple[Any, Any, int]:
        """``(trainable, opt_state, start step)``: from the newest checkpoint, or as given."""
        return resume_from(
            ckpt, resume, trainable=trainable, opt_state=opt_state, key=key, model=model
        )

    def save(self, ckpt: Checkpointing, step: int, **state: Any) -> None:
        """Write the train state of ``step`` (``trainable``, ``opt_state``, ``key``, ``model``,
        ``meta``) and prune older checkpoints."""
        save(ckpt, step, **state)


def checkpointing(
    checkpoint: Checkpointing | str | os.PathLike | None, legacy: Mapping[str, Any]
) -> Checkpointing | None:
    """The run's :class:`Checkpointing` from ``checkpoint=`` or the old keyword arguments."""
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"fit() got unexpected keyword arguments {unknown}")
    if legacy:  # user -> fit -> here
        deprecated(
            "fit(checkpoint_dir=, checkpoint_every=, keep=)",
            "fit(checkpoint=train.Checkpointing(directory, every=..., keep=...))",
            stacklevel=3,
        )
    defaults = {"checkpoint_dir": None, "checkpoint_every": 0, "keep": 2}
    legacy = {k: v for k, v in legacy.items() if v != defaults[k]}  # defaults say nothing
    if legacy and checkpoint is not None:
        raise ValueError(
            f"fit: give either checkpoint= or the older {sorted(legacy)}, not both "
            "(checkpoint=train.Checkpointing(directory, every=..., keep=...))"
        )
    if isinstance(checkpoint, Checkpointing):
        return checkpoint
    if checkpoint is not None:
        # Checkpointing converts any str / PathLike (and names `directory` on anything else)
        return Checkpointing(checkpoint)  # type: ignore[arg-type]
    directory = legacy.get("checkpoint_dir")
    if directory is None:
        given = [k for k in ("checkpoint_every", "keep") if k in legacy]
        if given:
            raise ValueError(
                f"fit: {given[0]}={legacy[given[0]]!r} has no effect without a checkpoint "
                "folder: pass checkpoint=train.Checkpointing(directory, ...)"
            )
        return None
    return Checkpointing(
        directory, every=legacy.get("checkpoint_every", 0), keep=legacy.get("keep", 2)
    )


def total_steps(steps: Any, epochs: Any, data: Any) -> Any:
    """The step count a run reaches: ``steps``, or ``epochs`` times the data's epoch length.

    A stream that knows its end (``num_epochs``, as :func:`fnllm.data.epochs` sets) is checked
    here, before any step runs, rather than failing at its last batch.
    """
    if (steps is None) == (epochs is None):
        raise TypeError(
            "fit: give steps= or epochs=, not both"
            if steps is not None
            else "fit: missing steps= (or epochs= with a data stream that has steps_per_epoch)"
        )
    per_epoch = getattr(data, "steps_per_epoch", None)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"fit: epochs must be an int >= 1, got {epochs!r}")
        if not isinstance(per_epoch, int):
            raise TypeError(
                f"fit: epochs={epochs} needs data with steps_per_epoch (fnllm.data.epochs), "
                f"got {type(data).__name__}; or pass steps="
            )
        steps = epochs * per_epoch
    last = getattr(data, "num_epochs", None)
    if (
        isinstance(per_epoch, int)
        and isinstance(last, int)
        and isinstance(steps, int)
        and steps > last * per_epoch
    ):
        raise ValueError(
            f"fit: steps={steps} is past the end of data ({last} epochs x {per_epoch} "
            "steps); build it with more num_epochs (or None)"
        )
    return steps


def check_args(
    *,
    loss_fn: Any,
    optimizer: Any,
    key: Any,
    steps: Any,
    eval_fn: Any,
    eval_every: Any,
    ckpt: Checkpointing | None,
    resume: Any,
    meta: Any,
    on_nonfinite: Any,
    progress: Any,
    tokens_per_batch: Any,
    donate: Any,
    compile: Any,
) -> None:
    """Refuse arguments that are wrong or that cannot take effect, naming them."""
    if not callable(loss_fn):
        raise TypeError(f"fit: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not all(callable(getattr(optimizer, n, None)) for n in ("init", "update")):
        raise ValueError(
            "fit: optimizer must have init(params) and update(grads, state, params) (a "
            f"fnllm.optim.GradientTransformation), got {type(optimizer).__name__}"
        )
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"fit: key must be a fnllm.random key tensor, got {type(key).__name__}")
    for name, value in (("steps", steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fit: {name} must be an int >= 0, got {value!r}")
    if on_nonfinite not in ("skip", "stop", "raise"):
        raise ValueError(
            f"fit: on_nonfinite must be 'skip', 'stop' or 'raise', got {on_nonfinite!r}"
        )
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"fit: eval_fn must be callable, got {type(eval_fn).__name__}")
    if eval_fn is not None and eval_every == 0:
        raise ValueError("fit: eval_fn given but eval_every is 0")
    if eval_fn is None and eval_every:
        raise ValueError(f"fit: eval_every={eval_every} has no effect without eval_fn")
    for name, value in (("resume", resume), ("progress", progress), ("donate", donate)):
        if not isinstance(value, bool):
            raise TypeError(f"fit: {name} must be a bool, got {value!r}")
    # `model` without a folder is allowed: the same keyword arguments often serve a run with
    # checkpoints and one without; `meta` exists only for checkpoints.
    if ckpt is None and meta is not None:
        raise ValueError(
            "fit: meta is stored only in checkpoints, and no checkpoint folder is given: "
            "pass checkpoint=train.Checkpointing(directory, ...)"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"fit: meta must be a dict, got {type(meta).__name__}")
    if tokens_per_batch is not None and not callable(tokens_per_batch):
        _checks.check_int("fit: tokens_per_batch", tokens_per_batch, low=0)
    if not (compile == "auto" or isinstance(compile, (bool, Mapping))):
        raise TypeError(
            f"fit: compile must be 'auto', a bool or a dict of torch.compile arguments, "
            f"got {compile!r}"
        )


def autocast_dtype(autocast: Any) -> torch.dtype | None:
    if isinstance(autocast, str):
        if autocast not in AUTOCAST:
            raise ValueError(f"fit: autocast must be one of {sorted(AUTOCAST)}, got {autocast!r}")
        return AUTOCAST[autocast]
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"fit: autocast must be torch.bfloat16, torch.float16, one of {sorted(AUTOCAST)} "
            f"or None, got {autocast!r}"
        )
    return autocast


def choose_compile(compile: Any, steps: int, trainable: Any) -> bool | Mapping[str, Any]:
    """``compile="auto"``: compile only where the run is long enough to repay it.

    On a GPU, from 2,000 steps, it compiles regionally (``{"regional": True}``): one block graph
    for all layers, a cold compile of about a minute instead of many, and a warm start from the
    compile caches in seconds. On the CPU it stays eager: measured at full size, a compiled step
    is not faster than the eager one there (``docs/performance.md``, "Compile or not").
    """
    if compile != "auto":
        return compile
    device = next(
        (x.device.type for x in tree.leaves(trainable) if isinstance(x, torch.Tensor)), "cpu"
    )
    if steps >= AUTO_COMPILE_MIN_STEPS.get(device, math.inf):
        return {"regional": True}
    return False


def open_folder(ckpt: Checkpointing | None, resume: bool) -> None:
    """Tidy the checkpoint folder and refuse to mix a new run into another run's folder."""
    if ckpt is None:
        return
    io.clean_temp_files(ckpt.directory)  # leftovers of saves killed mid-write
    found = _list_checkpoints(ckpt.directory)
    if not found or resume:
        return
    if not ckpt.overwrite:
        raise ValueError(
            f"fit: {ckpt.directory} already holds {len(found)} checkpoint(s) of another run "
            f"(newest {found[-1][1].name}) and resume=False: resume it (resume=True), use "
            "another folder, or delete them with "
            "checkpoint=train.Checkpointing(directory, ..., overwrite=True)"
        )
    for _, p in found:
        p.unlink(missing_ok=True)


def resume_from(
    ckpt: Checkpointing | None,
    resume: bool,
    *,
    trainable: Any,
    opt_state: Any,
    key: torch.Tensor,
    model: Any,
) -> tuple[Any, Any, int]:
    """``(trainable, opt_state, start step)``: from the newest checkpoint, or as given."""
    if ckpt is None or not resume:
        return trainable, opt_state, 0
    latest = latest_checkpoint(ckpt.directory)
    if latest is None:
        return trainable, opt_state, 0
    ck = load_checkpoint(latest, trainable=trainable, opt_state=opt_state, model=model)
    saved_key = ck.key.to(key.device) if isinstance(ck.key, torch.Tensor) else ck.key
    if not (
        isinstance(saved_key, torch.Tensor)
        and saved_key.shape == key.shape
        and torch.equal(saved_key, key)
    ):
        raise ValueError(
            f"fit: {latest} was written by a run with another key; resuming with a "
            "different key would not continue that run (start a new checkpoint folder)"
        )
    return ck.trainable, ck.opt_state, ck.step


def save(
    ckpt: Checkpointing, step: int, *, trainable: Any, opt_state: Any, key: Any, **kw: Any
) -> None:
    """Save step ``step`` and prune; refuse to go on if a later run writes into the folder."""
    os.makedirs(ckpt.directory, exist_ok=True)
    path = checkpoint_path(ckpt.directory, step)
    save_checkpoint(path, trainable=trainable, opt_state=opt_state, step=step, key=key, **kw)
    newer = [p for s, p in _list_checkpoints(ckpt.directory) if s > step]
    if newer:  # pruning would delete what was just written: another run shares the folder
        raise ValueError(
            f"fit: {ckpt.directory} holds {newer[-1].name}, newer than the checkpoint just "
            f"written ({path.name}): another run is writing into this folder; give each run "
            "its own folder"
        )
    prune_checkpoints(ckpt.directory, ckpt.keep)


def record(s: int, metrics: Mapping[str, Any], seconds: float, tokens: int) -> dict[str, Any]:
    """The history entry of step ``s`` (0-based)."""
    return {
        "step": s + 1,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "finite": bool(metrics["finite"]),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else math.inf,
    }


def count_tokens(batch: Any, spec: int | Callable[[Any], int] | None) -> int:
    if isinstance(spec, int):
        return spec
    if spec is not None:
        return int(spec(batch))
    if isinstance(batch, Mapping):
        for name in ("input_ids", "tokens", "inputs"):
            x = batch.get(name)
            if isinstance(x, torch.Tensor):
                return x.numel()
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool:
            return x.numel()
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return 0


def as_numbers(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): _scalar(v) for k, v in value.items()}
    return {"eval": _scalar(value)}


def private_copy(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v
