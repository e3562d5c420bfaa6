"""Training fnllm parameters from JAX with an optax optimizer, and plotting loss curves.

:func:`train_optax` is the worked example of the JAX guide as a function: the parameters live
on the JAX side, the loss is an fnllm loss wrapped with :func:`fnllm.interop.as_jax`, and the
whole step (PyTorch forward and backward through the callback, then the optax update) runs
under one ``jax.jit``. :func:`plot_loss_curves` draws runs side by side with matplotlib
(Agg backend, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from fnllm.interop import _common
from fnllm.interop.arrays import from_jax, to_jax
from fnllm.interop.functions import as_jax

__all__ = ["OptaxRun", "plot_loss_curves", "train_optax"]


class OptaxRun(NamedTuple):
    """What :func:`train_optax` returns: the trained parameters and the loss of every step.

    Example:
        >>> from fnllm.interop import OptaxRun
        >>> OptaxRun(params={}, losses=[2.0, 1.5]).losses
        [2.0, 1.5]
    """

    params: Any  # a tree of tensors (from_jax of the JAX parameters)
    losses: list[float]  # loss before each update, one per batch


def train_optax(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    optimizer: Any,
) -> OptaxRun:
    """Train a tree of tensors with an ``optax`` optimizer, the loss running in PyTorch.

    Each step is ``jax.jit``-compiled once: ``jax.value_and_grad(as_jax(loss_fn))`` then
    ``optimizer.update`` and ``optax.apply_updates``. ``params`` cross to JAX with
    :func:`fnllm.interop.to_jax` (no copy) and are never modified.

    Example:
        >>> import optax, torch
        >>> from fnllm.interop import train_optax
        >>> loss = lambda p, x: ((p["w"] - x) ** 2).sum()
        >>> run = train_optax(loss, {"w": torch.zeros(2)}, [torch.ones(2)] * 3, optax.sgd(0.25))
        >>> run.losses
        [2.0, 0.5, 0.125]
        >>> run.params["w"]
        tensor([0.8750, 0.8750])

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar tensor``, a pure PyTorch function.
        params: the initial tree of tensors.
        batches: an iterable of batches (trees of tensors; token ids as int32 unless
            ``jax_enable_x64`` is on); one optimizer step per batch.
        optimizer: an ``optax.GradientTransformation``.

    Returns:
        An :class:`OptaxRun` with the final parameters as tensors and the per-step losses.

    Raises:
        TypeError: ``optimizer`` is not an optax transformation, ``batches`` not an
            iterable, or a batch holds a leaf that is not a tensor (the batch is named).
        ValueError: no batches.
    """
    jax = _common.jax()
    import optax

    if not callable(getattr(optimizer, "init", None)) or not callable(
        getattr(optimizer, "update", None)
    ):
        raise TypeError(
            "train_optax: optimizer must be an optax GradientTransformation (init/update), "
            f"e.g. optax.adam(1e-3), got {type(optimizer).__name__}"
        )
    if isinstance(batches, (Mapping, str)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"train_optax: batches must be an iterable of batches, got {type(batches).__name__}"
        )
    loss = as_jax(loss_fn)

    @jax.jit
    def step(p: Any, state: Any, batch: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(p, batch)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    p = to_jax(params)
    state = optimizer.init(p)
    losses = []
    for n, batch in enumerate(batches):
        try:
            jbatch = to_jax(batch)
        except TypeError as err:
            raise TypeError(f"train_optax: batch {n}: {err}") from None
        p, state, value = step(p, state, jbatch)
        losses.append(float(value))
    if not losses:
        raise ValueError("train_optax: batches is empty; nothing was trained")
    return OptaxRun(from_jax(p), losses)


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike | None = None,
    *,
    title: str = "Training loss",
) -> Any:
    """Plot loss curves (one line per run) with matplotlib and optionally save the figure.

    Example:
        >>> from fnllm.interop import plot_loss_curves
        >>> fig = plot_loss_curves({"optax": [3.0, 2.0, 1.5], "fnllm": [3.0, 2.0, 1.5]})
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['optax', 'fnllm']

    Args:
        curves: run name -> loss per step. Later runs are drawn dashed over earlier ones, so
            identical curves stay visible.
        path: where to save the figure (format from the suffix, e.g. ``.png``, ``.svg``).
        title: the plot title.

    Returns:
        The ``matplotlib.figure.Figure`` (drawn with the Agg backend, no display needed).

    Raises:
        TypeError: ``curves`` is not a dict.
        ValueError: ``curves`` is empty or a run has no values.
    """
    from matplotlib.figure import Figure

    if not isinstance(curves, Mapping):
        raise TypeError(
            f"curves: expected a {{run name: losses}} dict, got {type(curves).__name__} (one "
            "run? wrap it: {'run': losses})"
        )
    if not curves:
        raise ValueError("curves: no runs to plot")
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (name, values) in enumerate(curves.items()):
        if len(values) == 0:
            raise ValueError(f"curves: run {name!r} has no values")
        steps = range(1, len(values) + 1)
        ax.plot(steps, list(values), styles[i % 4], label=name, linewidth=2.4 - 0.6 * (i % 4))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path))
    return fig
