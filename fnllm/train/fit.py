"""The fit loop: run train steps with a progress bar, evaluation, a NaN guard and checkpoints.

:func:`fit` is the one training loop: ``fit_loop`` runs it, with a ``Runner``
(``fnllm.train._run``) that says how it meets its process(es); ``fnllm.distributed.fit`` runs
the same loop on a process group.

Determinism contract (what makes resuming bit-identical): the key of step ``s`` is
``random.fold_in(key, s)`` and its batch is ``data(s)``, so both are pure functions of the step
number. A checkpoint stores the trainable params, the optimizer state, the number of steps taken
and the base key; resuming from it re-enters the loop at that step with the same state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from fnllm import optim, tree
from fnllm import random as jr
from fnllm.train import _run
from fnllm.train.checkpoint import Checkpointing
from fnllm.train.step import check_trainable, make_step

__all__ = ["FitResult", "NonFiniteError", "fit"]

OnNonFinite = Literal["skip", "stop", "raise"]


class NonFiniteError(FloatingPointError):
    """A train step produced a NaN or infinite loss or gradient (``on_nonfinite="raise"``).

    Example:
        >>> issubclass(NonFiniteError, ArithmeticError)
        True
    """


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Example:
        >>> r = FitResult({}, (), 0, [], [], [], None)
        >>> r.step, r.stopped
        (0, None)

    Args:
        trainable: the trained params (the trainable half).
        opt_state: the final optimizer state.
        step: the number of steps taken, counting those before a resume.
        history: one dict per step run: ``step`` (1-based count), ``loss``, ``grad_norm``,
            ``finite``, ``seconds``, ``tokens_per_s``.
        evals: one dict per evaluation: ``step`` and the values ``eval_fn`` returned.
        skipped: the (0-based) steps whose update was skipped as non-finite.
        stopped: why the loop stopped early (``on_nonfinite="stop"``), else None.
    """

    trainable: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    skipped: list[int]
    stopped: str | None


def fit(
    loss_fn: Callable[..., Any],
    optimizer: optim.GradientTransformation,
    trainable: Any,
    frozen: Any,
    data: Callable[[int], Any] | Any,
    *,
    key: torch.Tensor,
    steps: int | None = None,
    epochs: int | None = None,
    opt_state: Any = None,
    compile: bool | Mapping[str, Any] | Literal["auto"] = "auto",
    clip: float | None = None,
    autocast: torch.dtype | str | None = None,
    eval_fn: Callable[[Any, Any], Any] | None = None,
    eval_every: int = 0,
    checkpoint: Checkpointing | str | os.PathLike | None = None,
    resume: bool = True,
    model: Any = None,
    meta: dict[str, Any] | None = None,
    on_nonfinite: OnNonFinite = "skip",
    progress: bool = True,
    tokens_per_batch: int | Callable[[Any], int] | None = None,
    donate: bool = True,
    **legacy: Any,
) -> FitResult:
    """Train ``trainable`` for ``steps`` steps, or ``epochs`` epochs of ``data`` (resuming from
    its checkpoint folder if it has one).

    Step ``s`` (0-based) runs ``make_step(loss_fn, optimizer, ...)`` on the batch ``data(s)``
    with the key ``random.fold_in(key, s)``. A step whose loss or gradient norm is NaN/inf leaves
    params and optimizer state unchanged and then, per ``on_nonfinite``: ``"skip"`` reports it
    and goes on, ``"stop"`` returns the last good state, ``"raise"`` raises
    :class:`NonFiniteError`. With ``checkpoint``, the train state is saved atomically every
    ``checkpoint.every`` steps, and at the end, to ``<directory>/step_<N>.safetensors`` (the
    ``checkpoint.keep`` newest are kept). Re-running the same call after a crash resumes from
    the newest checkpoint and ends with the very same params (bit for bit) as an uninterrupted
    run, given the same software, hardware, thread count (``torch.get_num_threads()``) and
    ``compile`` setting (they decide the kernels and their reduction order).

    A checkpoint folder belongs to one run: with ``resume=False`` a folder that already holds
    checkpoints is refused (``Checkpointing(..., overwrite=True)`` deletes them first), and a
    run that finds newer checkpoints than its own in the folder stops instead of pruning them.
    Temp files of saves killed mid-write are removed when the run starts.

    Compiling: ``compile="auto"`` (the default) compiles the step only where compiling is
    repaid: runs of 2,000 steps or more on a GPU; on the CPU never (measured at full size
    there, a compiled step is no faster than the eager one: matrix products are most of it).
    When it compiles, it compiles regionally (``{"regional": True}`` of :func:`make_step`: the
    forward is compiled with one graph for every transformer block, the backward by
    AOTAutograd, the optimizer update is the eager fused kernel), which compiles in under a
    minute where the whole step takes many, and restarts from the compile caches in seconds
    (``docs/performance.md``, "Compile or not"). ``True``
    compiles the whole step into one graph, a dict of ``torch.compile`` arguments too (add
    ``"regional": True`` for the regional form). The choice depends on ``steps`` and the
    device only, so re-running the same call resumes with the same choice; pass ``compile=``
    explicitly to resume with another ``steps``.

    Example:
        >>> import torch
        >>> from fnllm import optim, random, train
        >>> def loss_fn(tr, fr, batch, key):
        ...     return ((batch @ tr["w"] - 1.0) ** 2).mean()
        >>> data = lambda step: torch.eye(2)          # the batch of step `step`
        >>> out = train.fit(loss_fn, optim.sgd(1.0), {"w": torch.zeros(2)}, {}, data,
        ...                 key=random.key(0), steps=20, compile=False, progress=False)
        >>> out.step, round(out.history[-1]["loss"], 6), out.trainable["w"]
        (20, 0.0, tensor([1., 1.]))

        Labelled batches, reshuffled every epoch (:func:`fnllm.data.epochs`), for 3 epochs:

        >>> from fnllm import data
        >>> batches = [{"x": torch.eye(2)[i : i + 1], "y": torch.ones(1)} for i in range(2)]
        >>> loss_fn = lambda tr, fr, b, key: ((b["x"] @ tr["w"] - b["y"]) ** 2).mean()
        >>> stream = data.epochs(batches, key=random.key(1))
        >>> out = train.fit(loss_fn, optim.sgd(0.25), {"w": torch.zeros(2)}, {}, stream,
        ...                 key=random.key(0), epochs=3, compile=False, progress=False)
        >>> out.step, out.trainable["w"]
        (6, tensor([0.8750, 0.8750]))

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch, key) -> loss`` or ``(loss, aux)``; the
            loss is a 0-d floating-point tensor.
        optimizer: a :class:`fnllm.optim.GradientTransformation` (``init``/``update``), e.g.
            ``fnllm.optim.adamw``.
        trainable: the params to train (a partition's selected half).
        frozen: the params to keep fixed (they are never modified, and get no gradient).
        data: ``data(step) -> batch``, or a loader with ``data.batch(step)`` (such as
            :class:`fnllm.data.Batches` or :class:`fnllm.data.Epochs`); the batch must be a
            pure function of the step for resuming to be exact (e.g. drawn from
            ``(data_key, step)``).
        key: the run's base key (:func:`fnllm.random.key`).
        steps: the total number of steps to reach (not counting from a resume point).
        epochs: instead of ``steps``: this many epochs of ``data``, which must say how many
            steps an epoch has (``data.steps_per_epoch``, as :func:`fnllm.data.epochs` does);
            ``steps = epochs * data.steps_per_epoch``. Give one of ``steps`` and ``epochs``.
        opt_state: the initial optimizer state (default ``optimizer.init(trainable)``).
        compile: ``"auto"`` (see above), ``True``/``False``, or a dict of extra
            ``torch.compile`` arguments (see :func:`~fnllm.train.make_step`).
        clip: clip the global gradient norm to this value (None: no clipping).
        autocast: run the loss under ``torch.autocast`` with this dtype (``torch.bfloat16`` or
            ``"bf16"``, ``"fp16"``).
        eval_fn: ``eval_fn(trainable, frozen)`` returning a number or a dict of numbers.
        eval_every: run ``eval_fn`` every this many steps (needs ``eval_fn``).
        checkpoint: a :class:`~fnllm.train.Checkpointing` (directory, every, keep, overwrite)
            or just a directory (saved at the end only). The older keyword arguments
            ``checkpoint_dir``, ``checkpoint_every`` and ``keep`` still work until 0.2 (they
            warn: deprecated).
        resume: resume from the newest checkpoint in the folder when there is one; False
            starts a new run (refused if the folder holds checkpoints, see above).
        model: the model config, recorded in checkpoints so another model can not resume them
            (unused without ``checkpoint``).
        meta: extra JSON metadata stored in every checkpoint (needs ``checkpoint``).
        on_nonfinite: ``"skip"``, ``"stop"`` or ``"raise"`` (see above).
        progress: show a tqdm progress bar with the loss of the step just finished and
            tokens/s.
        tokens_per_batch: tokens in a batch for the tokens/s figure: an int, a function of the
            batch, or None to count the integer ids of the batch (``input_ids``/``tokens``).
        donate: copy ``trainable`` and ``opt_state`` once, then let every step update those
            copies in place (``TrainStep(..., donate=True)``: no fresh params and optimizer
            state per step, as with ``torch.optim``). The caller's trees are never modified; a
            tree handed to ``eval_fn`` is valid during that call only (copy it to keep it).
            False: every step is pure.
        **legacy: ``checkpoint_dir``, ``checkpoint_every``, ``keep`` (the older spelling of
            ``checkpoint``; deprecated, removed in 0.2).

    Returns:
        A :class:`FitResult` (trainable, opt_state, step, history, evals, skipped, stopped).

    Raises:
        TypeError: an argument of the wrong type (named), neither or both of ``steps`` and
            ``epochs``, or ``loss_fn`` returning something other than a floating-point tensor.
        ValueError: bad arguments (named), more steps than a finite ``data`` stream holds,
            options that cannot take effect (``eval_every`` without ``eval_fn``,
            ``checkpoint_every``/``keep``/``model``/``meta`` without a checkpoint folder), a
            loss that is not 0-d, ``trainable`` holding no parameter, a checkpoint folder of
            another run (another model, partition or key; or
            ``resume=False`` into a folder with checkpoints).
        NonFiniteError: a non-finite step with ``on_nonfinite="raise"``.
    """
    ckpt = _run.checkpointing(checkpoint, legacy)
    steps = _run.total_steps(steps, epochs, data)
    _run.check_args(
        loss_fn=loss_fn, optimizer=optimizer, key=key, steps=steps, eval_fn=eval_fn,
        eval_every=eval_every, ckpt=ckpt, resume=resume, meta=meta,
        on_nonfinite=on_nonfinite, progress=progress, tokens_per_batch=tokens_per_batch,
        donate=donate, compile=compile,
    )  # fmt: skip
    return fit_loop(
        _run.Runner(), loss_fn, optimizer, trainable, frozen, data, key=key, steps=steps,
        opt_state=opt_state, compile=_run.choose_compile(compile, steps, trainable), clip=clip,
        autocast=_run.autocast_dtype(autocast), eval_fn=eval_fn, eval_every=eval_every,
        ckpt=ckpt, resume=resume, model=model, meta=meta, on_nonfinite=on_nonfinite,
        progress=progress, tokens_per_batch=tokens_per_batch, donate=donate,
    )  # fmt: skip


def fit_loop(
    runner: _run.Runner,
    loss_fn: Callable[..., Any],
    optimizer: optim.GradientTransformation,
    trainable: Any,
    frozen: Any,
    data: Callable[[int], Any] | Any,
    *,
    key: torch.Tensor,
    steps: int,
    opt_state: Any,
    compile: bool | Mapping[str, Any],
    clip: float | None,
    autocast: torch.dtype | None,
    eval_fn: Callable[[Any, Any], Any] | None,
    eval_every: int,
    ckpt: Checkpointing | None,
    resume: bool,
    model: Any,
    meta: dict[str, Any] | None,
    on_nonfinite: OnNonFinite,
    progress: bool,
    tokens_per_batch: int | Callable[[Any], int] | None,
    donate: bool,
) -> FitResult:
    """The loop of :func:`fit` on checked arguments, its process(es) given by ``runner``.

    :func:`fit` runs it with ``fnllm.train._run.Runner`` (one process);
    :func:`fnllm.distributed.fit` with a process group's runner. Same arguments as
    :func:`fit`, with ``compile``, ``autocast`` and the checkpoint options already resolved.

    Example:
        >>> import torch
        >>> from fnllm import optim, random
        >>> from fnllm.train import _run
        >>> out = fit_loop(_run.Runner(), lambda tr, fr, b, k: (tr["w"] - b).pow(2).sum(),
        ...                optim.sgd(0.25), {"w": torch.zeros(1)}, {}, lambda s: torch.ones(1),
        ...                key=random.key(0), steps=2, opt_state=None, compile=False, clip=None,
        ...                autocast=None, eval_fn=None, eval_every=0, ckpt=None, resume=True,
        ...                model=None, meta=None, on_nonfinite="skip", progress=False,
        ...                tokens_per_batch=None, donate=False)
        >>> out.step, out.trainable["w"]
        (2, tensor([0.7500]))

    Returns:
        A :class:`FitResult`.
    """
    batch_of = getattr(data, "batch", data)  # a fnllm.data.Batches loader or a function
    if not callable(batch_of):
        raise TypeError(
            f"fit: data must be a function step -> batch or have .batch(step), "
            f"got {type(data).__name__}"
        )
    check_trainable(trainable, frozen)
    loss_fn, batch_of = runner.prepare(loss_fn, batch_of)
    step_fn = make_step(loss_fn, optimizer, compile=compile, clip=clip, autocast=autocast)
    trainable, frozen, opt_state = runner.start(trainable, frozen, opt_state, optimizer)
    runner.open_folder(ckpt, resume)
    trainable, opt_state, start = runner.resume(
        ckpt, resume, trainable=trainable, opt_state=opt_state, key=key, model=model
    )
    if donate:  # the steps update fit's own copies in place; the caller's trees stay as they are
        trainable, opt_state = tree.map(_run.private_copy, (trainable, opt_state))
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    skipped: list[int] = []
    stopped: str | None = None
    done = saved = start
    show = progress and runner.is_main
    bar = tqdm(
        total=steps, initial=min(start, steps), disable=not show, desc="fit", dynamic_ncols=True
    )

    def say(msg: str) -> None:
        if runner.is_main:  # one line per run, not one per rank
            bar.write(msg)

    def save(n: int) -> None:
        assert ckpt is not None
        runner.save(ckpt, n, trainable=trainable, opt_state=opt_state, key=key, model=model,
                    meta=meta)  # fmt: skip

    try:
        for s in range(start, steps):
            batch = batch_of(s)
            t0 = time.perf_counter()
            new_tr, new_state, metrics = step_fn(
                trainable, frozen, opt_state, batch, jr.fold_in(key, s), donate=donate
            )
            record = _run.record(
                s, metrics, time.perf_counter() - t0, _run.count_tokens(batch, tokens_per_batch)
            )
            history.append(record)
            if not record["finite"]:
                msg = (
                    f"fit: step {s}: non-finite loss {record['loss']} or gradient norm "
                    f"{record['grad_norm']}; update skipped"
                )
                skipped.append(s)
                if on_nonfinite == "raise":
                    raise NonFiniteError(msg)
                if on_nonfinite == "stop":
                    stopped = msg
                    say(msg + "; stopping")
                    break
                say(msg)
            trainable, opt_state = new_tr, new_state
            done = s + 1
            # the postfix first, so the bar's refresh shows the loss of the step just finished
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )
            bar.update(1)
            if eval_fn is not None and done % eval_every == 0:
                evals.append({"step": done, **_run.as_numbers(eval_fn(trainable, frozen))})
                say(f"fit: step {done}: eval {evals[-1]}")
            if ckpt is not None and ckpt.every and done % ckpt.every == 0:
                save(done)
                saved = done
        if ckpt is not None and stopped is None and done > saved:
            save(done)
    finally:
        bar.close()
    return FitResult(trainable, opt_state, done, history, evals, skipped, stopped)
