"""The train step: a pure function from the train state and a batch to the next train state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fnllm import _checks, optim, tree
from fnllm._deprecation import deprecated

__all__ = ["TrainStep", "make_step"]

# The optimizer protocol is fnllm.optim's: any object with init and update, as a
# GradientTransformation has. `Optimizer` stays importable from here as its old name until 0.2.


def __getattr__(name: str) -> Any:
    if name == "Optimizer":
        deprecated("fnllm.train.step.Optimizer", "fnllm.optim.GradientTransformation")
        return optim.GradientTransformation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TrainStep:
    """A train step made by :func:`make_step`; call it like the pure function it wraps.

    ``step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)``.
    Calling it checks the arguments in eager Python (cheap) and runs :attr:`compiled` (or
    :attr:`inner` when built with ``compile=False``). :attr:`inner` is the uncompiled pure
    function, e.g. for ``torch._dynamo.explain``.

    ``step(..., donate=True)`` hands ``trainable`` and ``opt_state`` over, as ``donate_argnums``
    does in ``jax.jit``: the new values are written into their buffers (eagerly by the fused
    optimizer kernel, compiled by :attr:`compiled_donated`) and those trees are returned, with
    the same numbers as the pure step. Do not use the old trees afterwards. :func:`fit`
    donates its own copies.

    Example:
        >>> import torch
        >>> from fnllm import optim, train
        >>> loss_fn = lambda tr, fr, x, key: (tr["w"] * x).sum()
        >>> step = train.make_step(loss_fn, optim.sgd(0.1), compile=False)
        >>> isinstance(step, train.TrainStep), step.guard
        (True, True)

    Args:
        inner: the pure step function.
        compiled: ``torch.compile(inner, fullgraph=True)``, or ``inner`` itself.
        guard: whether non-finite steps are skipped inside the step.
        compiled_donated: the compiled step that writes its results into the donated
            ``trainable`` and ``opt_state`` (None for an eager step, which donates through the
            optimizer's fused kernel).
        check_loss: called with ``(trainable, frozen, batch, key, error)`` when a compiled step
            fails: runs ``loss_fn`` eagerly once and raises an error naming a bad return value
            (a vector or a Python float) instead of the tracing error.
    """

    inner: Callable[..., Any]
    compiled: Callable[..., Any] = field(repr=False)
    guard: bool = True
    compiled_donated: Callable[..., Any] | None = field(default=None, repr=False)
    check_loss: Callable[..., None] | None = field(default=None, repr=False)

    def __call__(
        self,
        trainable: Any,
        frozen: Any,
        opt_state: Any,
        batch: Any,
        key: Any,
        *,
        donate: bool = False,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Run one step; see :func:`make_step`.

        With ``donate=True`` you hand ``trainable`` and ``opt_state`` over, as with
        ``donate_argnums`` in ``jax.jit``: an eager step may update their buffers in place and
        return them (the fused AdamW kernel then works like ``torch.optim.AdamW(fused=True)``,
        without writing fresh copies), so do not use the old trees afterwards. A compiled step
        writes its results into the donated buffers (:attr:`compiled_donated`, compiled on its
        first use) and returns those trees. A skipped (non-finite) step leaves the values as
        they were. Donated leaves must not be views of one another.
        """
        check_trainable(trainable, frozen)
        if self.compiled_donated is None:  # eager: the loss is checked inside the step
            return self.inner(trainable, frozen, opt_state, batch, key, donate=donate)
        try:
            if not donate:
                return self.compiled(trainable, frozen, opt_state, batch, key)
            return self.compiled_donated(trainable, frozen, opt_state, batch, key)
        except Exception as e:  # say what is wrong with the loss, not where tracing failed
            if self.check_loss is not None:
                self.check_loss(trainable, frozen, batch, key, e)
            raise


def make_step(
    loss_fn: Callable[..., Any],
    optimizer: optim.GradientTransformation,
    *,
    compile: bool | Mapping[str, Any] = True,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
    guard: bool = True,
) -> TrainStep:
    """Build the pure train step of a loss and an optimizer (compiled by default).

    The step is ``step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state,
    metrics)``.

    The step differentiates ``loss_fn`` with respect to ``trainable`` only (``frozen`` is
    detached), so no gradient, optimizer state or backward work exists for frozen leaves, and
    autograd stops at the lowest trainable layer. It then clips the gradient to a global norm
    (optional), asks the optimizer for updates and adds them. With ``guard`` (the default) a
    step whose loss or gradient norm is NaN/inf returns the *old* params and optimizer state
    (branch-free, so it compiles) and reports ``metrics["finite"] == False``.

    The step never modifies its inputs, unless called with ``donate=True`` (see
    :class:`TrainStep`), which writes the new ``trainable`` and ``opt_state`` into the old
    buffers, as ``torch.optim`` updates params in place. The key is the step's own key
    (:func:`fit` passes ``random.fold_in(key, step)``); ``loss_fn`` splits it further for
    dropout or masking.

    Example:
        >>> import torch
        >>> from fnllm import optim, train
        >>> def loss_fn(trainable, frozen, batch, key):
        ...     return ((batch @ trainable["w"] + frozen["b"]) ** 2).mean()
        >>> opt = optim.sgd(0.1)
        >>> step = train.make_step(loss_fn, opt, compile=False)
        >>> tr, fr = {"w": torch.ones(2)}, {"b": torch.zeros(())}
        >>> tr2, state, metrics = step(tr, fr, opt.init(tr), torch.eye(2), None)
        >>> tr2["w"], float(metrics["loss"]), bool(metrics["finite"])
        (tensor([0.9000, 0.9000]), 1.0, True)

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch, key)`` returning a scalar loss, or a pair
            ``(loss, aux)``. A dict ``aux`` is merged into the metrics, anything else goes to
            ``metrics["aux"]``.
        optimizer: an optax-style optimizer: ``init(params) -> state`` and
            ``update(grads, state, params) -> (updates, state)`` (e.g. ``fnllm.optim.adamw``).
        compile: compile the step with ``torch.compile(fullgraph=True)``; a dict adds keyword
            arguments for ``torch.compile`` (e.g. ``{"mode": "max-autotune"}`` or
            ``{"backend": "aot_eager"}``). ``{"regional": True}`` compiles only the forward
            (``loss_fn``; AOTAutograd compiles its backward) and runs ``autograd.grad`` and the
            optimizer eagerly, so each block that a model's ``apply_blocks`` runs is one
            nested compile region, traced and compiled once for all layers (a whole-step
            compile traces ``torch.func.grad``, under which torch 2.13 cannot keep regions).
        clip: scale the gradient so its global L2 norm is at most ``clip`` (None: no clipping).
        autocast: run ``loss_fn`` under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); params, gradients and optimizer state keep their dtypes.
        guard: skip updates whose loss or gradient norm is not finite.

    Returns:
        A :class:`TrainStep`. Its metrics are 0-d tensors: ``loss``, ``grad_norm`` (before
        clipping), ``finite`` (bool), plus ``aux``.

    Raises:
        TypeError: ``loss_fn`` is not callable, ``clip`` is not a number, ``autocast`` not a
            floating dtype, or ``compile`` neither a bool nor a dict. When the step runs:
            ``loss_fn`` returned something other than a floating-point tensor.
        ValueError: ``clip`` is not finite and positive, or ``optimizer`` lacks
            ``init``/``update``. When the step runs: the loss is not 0-d (a vector loss, say).
    """
    if not callable(loss_fn):
        raise TypeError(f"make_step: loss_fn must be callable, got {type(loss_fn).__name__}")
    clipper = None
    if clip is not None:
        clip = _checks.check_number("make_step: clip", clip, positive=True)
        clipper = optim.clip_by_global_norm(clip)
    has = [callable(getattr(optimizer, name, None)) for name in ("init", "update")]
    if not all(has):
        raise ValueError(
            f"make_step: optimizer must have init(params) and update(grads, state, params), "
            f"got {type(optimizer).__name__}"
        )
    if autocast is not None and not (
        isinstance(autocast, torch.dtype) and autocast.is_floating_point
    ):
        raise TypeError(f"make_step: autocast must be a floating torch.dtype, got {autocast!r}")
    if not isinstance(compile, (bool, Mapping)):
        raise TypeError(
            f"make_step: compile must be a bool or a dict of torch.compile arguments, "
            f"got {compile!r}"
        )
    if not isinstance(guard, bool):
        raise TypeError(f"make_step: guard must be a bool, got {guard!r}")

    def autocast_ctx(tr: Any) -> Any:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(_device_type(tr), dtype=autocast)

    def check_loss(trainable: Any, frozen: Any, batch: Any, key: Any, error: Exception) -> None:
        """Run ``loss_fn`` eagerly once to name a bad return value (after a failed trace)."""
        try:
            with torch.no_grad(), autocast_ctx(trainable):
                out = loss_fn(trainable, frozen, batch, key)
        except Exception:
            return  # loss_fn fails by itself: its own error is the one to see
        _split_loss(out)

    options = dict(compile) if isinstance(compile, Mapping) else {}
    regional = options.pop("regional", False)
    if not isinstance(regional, bool):
        raise TypeError(f"make_step: compile['regional'] must be a bool, got {regional!r}")
    options = {"fullgraph": True, **options}

    def forward(tr: Any, frozen: Any, batch: Any, key: Any) -> tuple[torch.Tensor, Any]:
        with autocast_ctx(tr):
            out = loss_fn(tr, frozen, batch, key)
        # static checks; under torch.compile a failure stops the trace and the step
        # reruns the check eagerly to raise the error (TrainStep.check_loss)
        return _split_loss(out)

    # regional: only the forward is compiled (its backward by AOTAutograd), so each model
    # block is one nested compile region reused for every layer (models._base.run_block);
    # gradients come from autograd and the update from the eager (fused) optimizer
    loss_call = torch.compile(forward, **options) if compile is not False and regional else forward

    def step(
        trainable: Any, frozen: Any, opt_state: Any, batch: Any, key: Any, donate: bool = False
    ) -> tuple[Any, Any, dict[str, Any]]:
        frozen = tree.map(_detach, frozen)

        def objective(tr: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
            loss, aux = loss_call(tr, frozen, batch, key)
            return loss, (loss.detach(), aux)

        if torch.compiler.is_compiling():
            grads, (loss, aux) = torch.func.grad(objective, has_aux=True)(trainable)
        else:  # eager: plain autograd, ~2.5 ms less per step than func.grad on tiny models
            grads, (loss, aux) = _autograd_grad(objective, trainable)
        grad_norm = optim.global_norm(grads)
        if clipper is not None:  # optim's rule and epsilon: min(1, clip / (norm + 1e-6))
            grads, _ = clipper.update(grads, {})
        finite = torch.isfinite(loss.float()) & torch.isfinite(grad_norm)
        if torch.compiler.is_compiling():  # inductor fuses update and add by itself
            updates, new_state = optimizer.update(grads, opt_state, trainable)
            new_trainable = tree.map(_add, trainable, updates)
            if guard:  # branch-free: fuses into the update
                new_trainable = _select(finite, new_trainable, trainable)
                new_state = _select(finite, new_state, opt_state)
        elif guard and not bool(finite):  # eager: a plain branch, decided before any update
            new_trainable, new_state = trainable, opt_state
        else:  # eager: a fused kernel (torch._fused_adamw_) where the optimizer has one
            new_trainable, new_state = optim.apply_gradients(
                optimizer, grads, opt_state, trainable, donate=donate
            )
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        if isinstance(aux, dict):
            metrics.update(aux)
        else:
            metrics["aux"] = aux
        return new_trainable, new_state, metrics

    def donating_step(
        trainable: Any, frozen: Any, opt_state: Any, batch: Any, key: Any
    ) -> tuple[Any, Any, dict[str, Any]]:
        """The step, writing the new trees into the donated ones (traced by torch.compile)."""
        new_trainable, new_state, metrics = step(trainable, frozen, opt_state, batch, key)
        with torch.no_grad():  # inductor turns these copies into in-place stores
            _copy_into(trainable, new_trainable)
            _copy_into(opt_state, new_state)
        return trainable, opt_state, metrics

    if compile is False or regional:
        return TrainStep(inner=step, compiled=step, guard=guard)
    return TrainStep(
        inner=step,
        compiled=torch.compile(step, **options),
        guard=guard,
        compiled_donated=torch.compile(donating_step, **options),
        check_loss=check_loss,
    )


def check_trainable(trainable: Any, frozen: Any) -> None:
    """Raise a clear error when ``trainable`` holds no floating-point tensor.

    Example:
        >>> import torch
        >>> from fnllm import _checks, optim, tree
        >>> tr, fr = tree.partition({"w": torch.zeros(2)}, "head.*")
        >>> check_trainable(tr, fr)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: trainable: no parameter selected (0 of 1 leaves); the partition filter ...

    Args:
        trainable: the trainable half of a partition.
        frozen: the frozen half (named in the error message).

    Returns:
        None.

    Raises:
        ValueError: ``trainable`` holds no floating-point tensor.
        TypeError: float32 and 16-bit leaves are mixed, and a 16-bit leaf is trainable
            (mixed precision means a 16-bit *frozen* base with float32 trainable leaves).
    """
    leaves = tree.leaves(trainable)
    if any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        _check_precision(trainable, frozen)
        return
    frozen_paths = tree.paths(frozen)
    raise ValueError(
        f"trainable: no parameter selected ({len(leaves)} of {len(leaves) + len(frozen_paths)} "
        "leaves); the partition filter matched nothing, so training would change nothing. "
        f"Frozen paths start with {frozen_paths[:5]}"
    )


# ----------------------------------------------------------------------------- helpers


def _check_precision(trainable: Any, frozen: Any) -> None:
    """A tree mixing float32 and 16-bit leaves trains its float32 leaves only: a 16-bit
    trainable leaf would take updates below its precision while the rest is float32."""
    dtypes = {x.dtype for x in tree.leaves((trainable, frozen)) if isinstance(x, torch.Tensor)}
    if torch.float32 not in dtypes or not dtypes & {torch.bfloat16, torch.float16}:
        return
    flat = tree.flatten(trainable)
    for path, x in flat.items():
        if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
            raise TypeError(
                f"trainable: {path} is {x.dtype} while other leaves are float32; with a "
                "16-bit frozen base keep the trainable leaves in float32 (cast only the frozen "
                "part: fnllm.tree.cast(params, dtype, where) or cast the frozen half of "
                "tree.partition), or cast the whole tree to one dtype"
            )


def _split_loss(out: Any) -> tuple[torch.Tensor, Any]:
    """``loss_fn``'s result as ``(loss, aux)``; errors say what was expected."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(
                f"loss_fn returned a tuple of {len(out)} values; expected a 0-d loss tensor or "
                "a pair (loss, aux)"
            )
        loss, aux = out
    else:
        loss, aux = out, {}
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a 0-d floating-point tensor (or (loss, aux)), got "
            f"{type(loss).__name__} {loss!r}: compute the loss with torch operations on the "
            "params so that it has a gradient"
        )
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn returned a loss of shape {tuple(loss.shape)}; expected a 0-d tensor "
            "(reduce it, e.g. with .mean())"
        )
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn returned a loss of dtype {loss.dtype}; expected floating point")
    return loss, aux


def _autograd_grad(objective: Callable[[Any], Any], trainable: Any) -> tuple[Any, Any]:
    """``torch.func.grad(objective, has_aux=True)(trainable)`` with ``torch.autograd.grad``.

    Same numbers (one autograd engine), less per-op overhead in eager mode; unused leaves get
    zero gradients, as ``torch.func.grad`` gives them.
    """
    leaves, spec = tree.flatten_spec(trainable)
    inputs = [x.detach().requires_grad_() for x in leaves]
    with torch.enable_grad():
        loss, aux = objective(tree.unflatten_spec(spec, inputs))
        raw = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, inputs)]
    return tree.unflatten_spec(spec, grads), tree.map(_detach, aux)


def _copy_into(dst: Any, src: Any) -> None:
    """Copy every tensor leaf of ``src`` into the leaf at the same path of ``dst``."""

    def copy(d: Any, x: Any) -> None:
        if isinstance(d, torch.Tensor) and d is not x:
            d.copy_(x)

    tree.map(copy, dst, src)


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _add(p: Any, u: Any) -> Any:
    return (p + u).to(p.dtype) if isinstance(p, torch.Tensor) else p


def _select(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """Leafwise ``where(cond, new, old)`` over two trees of the same structure."""

    def pick(n: Any, o: Any) -> Any:
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor):
            return torch.where(cond, n, o)
        return n

    return tree.map(pick, new, old)


def _device_type(t: Any) -> str:
    for x in tree.leaves(t):
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"
