"""Small gradient transformations (clipping, scaling, weight decay, momentum) and ``sgd``.

Each is a :class:`~fnllm.optim.GradientTransformation`; combine them with
:func:`~fnllm.optim.chain`. They compute with torch's multi-tensor ``_foreach_*`` kernels,
return new trees and keep any step count as a tensor in their state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, tree
from fnllm.optim._helpers import (
    Mask,
    Tree,
    check_count,
    check_shapes,
    check_state_keys,
    flatten,
    leaves_like,
    make_mask,
    new_count,
)
from fnllm.optim.base import GradientTransformation, chain

__all__ = [
    "add_decayed_weights",
    "clip_by_global_norm",
    "global_norm",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "sgd",
    "trace",
]

ScalarOrSchedule = float | Callable[[Tensor], Tensor]


def global_norm(t: Tree) -> Tensor:
    """The L2 norm of all the leaves of a tree taken together, in float32.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> optim.global_norm({"a": torch.tensor([3.0]), "b": [torch.tensor([4.0])]})
        tensor(5.)

    Args:
        t: a tree of tensors (works under ``torch.func.vmap``: one norm per example).

    Returns:
        A float32 0-d tensor (0 for a tree without leaves).
    """
    leaves, _ = flatten(t)
    return _global_norm(leaves)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the updates so that their global L2 norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: multiply every leaf by
    ``min(1, max_norm / (norm + 1e-6))`` (a multiply always happens, there is no branch).

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> clip = optim.clip_by_global_norm(1.0)
        >>> g = {"w": torch.tensor([3.0, 4.0])}
        >>> clip.update(g, clip.init(g))[0]
        {'w': tensor([0.6000, 0.8000])}

    Args:
        max_norm: the largest allowed global norm (> 0).

    Returns:
        A stateless transformation (its state is ``{}``).
    """
    max_norm = _checks.check_number("clip_by_global_norm: max_norm", max_norm, positive=True)

    return _stateless_scale(
        lambda leaves: torch.clamp(max_norm / (_global_norm(leaves) + 1e-6), max=1.0)
    )


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by a constant ``factor``.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.scale(-2.0)
        >>> t.update({"w": torch.tensor([1.0])}, t.init({}))[0]
        {'w': tensor([-2.])}

    Args:
        factor: the multiplier.

    Returns:
        A stateless transformation.
    """
    factor = _checks.check_number("scale: factor", factor)

    return _stateless_scale(lambda leaves: factor)


def scale_by_schedule(schedule: Callable[[Tensor], Tensor]) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)``, ``count`` being the number of updates so far.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.scale_by_schedule(optim.linear_warmup(1.0, warmup_steps=2))
        >>> g = {"w": torch.tensor([1.0])}
        >>> state = t.init(g)
        >>> for _ in range(3):
        ...     u, state = t.update(g, state)
        ...     print(u["w"])
        tensor([0.])
        tensor([0.5000])
        tensor([1.])

    Args:
        schedule: a function of the step tensor (see :mod:`fnllm.optim.schedules`).

    Returns:
        A transformation whose state is ``{"count": int64 tensor}``.
    """
    if not callable(schedule):
        raise TypeError(f"scale_by_schedule: schedule must be callable, got {schedule!r}")

    def init(params: Tree) -> dict[str, Any]:
        return {"count": new_count(flatten(params)[0])}

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        del params
        check_state_keys("optim.scale_by_schedule", state, ("count",))
        count = check_count("optim.scale_by_schedule", state["count"])
        leaves, spec = flatten(updates)
        factor = schedule(count)
        new = _scale_leaves(leaves, factor) if leaves else []
        return tree.unflatten_spec(spec, new), {"count": count + 1}

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: ScalarOrSchedule) -> GradientTransformation:
    """Multiply the updates by ``-lr`` (descent), ``lr`` a float or a schedule.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.scale_by_learning_rate(0.5)
        >>> t.update({"w": torch.tensor([2.0])}, t.init({}))[0]
        {'w': tensor([-1.])}

    Args:
        lr: the learning rate: a float, or a function of the step tensor.

    Returns:
        :func:`scale` (float) or :func:`scale_by_schedule` (schedule).
    """
    if callable(lr):
        schedule = lr
        return scale_by_schedule(lambda count: -schedule(count))
    return scale(-_checks.check_number("scale_by_learning_rate: lr", lr, nonnegative=True))


def add_decayed_weights(weight_decay: float, mask: Mask = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (on the leaves ``mask`` selects).

    Before the learning-rate scaling this is L2 regularisation (``torch.optim.SGD``'s
    ``weight_decay``); after an adaptive scaling it is decoupled weight decay.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.add_decayed_weights(0.5, mask="w")
        >>> params = {"w": torch.tensor([2.0]), "b": torch.tensor([2.0])}
        >>> t.update({"w": torch.zeros(1), "b": torch.zeros(1)}, t.init(params), params)[0]
        {'w': tensor([1.]), 'b': tensor([0.])}

    Args:
        weight_decay: the coefficient (>= 0).
        mask: which leaves decay: ``None`` (all), a glob, a list of globs, a predicate
            ``(path, leaf) -> bool`` (see :func:`fnllm.tree.filter_fn`, :func:`decay_mask`) or a
            tree of bools shaped like the params.

    Returns:
        A stateless transformation; its ``update`` needs ``params``.
    """
    wd = _checks.check_number("add_decayed_weights: weight_decay", weight_decay, nonnegative=True)
    resolve = make_mask("optim.add_decayed_weights", mask)

    def init(params: Tree) -> dict[str, Any]:
        leaves, spec = flatten(params)
        if wd > 0.0 and leaves:
            resolve(params, spec, leaves)  # resolve the mask now, eagerly (see make_mask)
        return {}

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        where = "optim.add_decayed_weights"
        leaves, spec = flatten(updates)
        if wd == 0.0 or not leaves:
            return updates, state
        if params is None:
            raise ValueError(f"{where}: update needs params (the weights to decay)")
        pl = leaves_like(where, "params", params, spec, updates, "updates")
        check_shapes(where, "params", pl, leaves, spec, "updates")
        flags = resolve(params, spec, pl)
        idx = [i for i, f in enumerate(flags) if f]
        new = list(leaves)
        if idx:
            decayed = torch._foreach_add([leaves[i] for i in idx], [pl[i] for i in idx], alpha=wd)
            for i, d in zip(idx, decayed):
                new[i] = d
        return tree.unflatten_spec(spec, new), state

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``buf = decay * buf + updates``; output ``buf`` (or ``updates + decay * buf``).

    The heavy-ball / Nesterov momentum of ``torch.optim.SGD`` (with ``dampening=0``). The
    buffers start at zero, which makes the first output equal the first input, as in PyTorch.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.trace(0.5)
        >>> g = {"w": torch.tensor([1.0])}
        >>> state = t.init(g)
        >>> u, state = t.update(g, state)
        >>> u, state = t.update(g, state)
        >>> u["w"], state["trace"]["w"]
        (tensor([1.5000]), tensor([1.5000]))

    Args:
        decay: the momentum coefficient (>= 0, usually in ``[0, 1)``).
        nesterov: use Nesterov momentum.

    Returns:
        A transformation whose state is ``{"trace": tree of buffers}``.
    """
    decay = _checks.check_number("trace: decay", decay, nonnegative=True)

    def init(params: Tree) -> dict[str, Any]:
        leaves, spec = flatten(params)
        return {"trace": tree.unflatten_spec(spec, [torch.zeros_like(p) for p in leaves])}

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        del params
        where = "optim.trace"
        check_state_keys(where, state, ("trace",))
        bufs, spec = flatten(state["trace"])
        leaves = leaves_like(where, "updates", updates, spec, state["trace"], "the state")
        check_shapes(where, "updates", leaves, bufs, spec, "the state")
        if not leaves:
            return updates, state
        new_buf = torch._foreach_mul(bufs, decay)
        torch._foreach_add_(new_buf, leaves)
        out = torch._foreach_add(leaves, new_buf, alpha=decay) if nesterov else new_buf
        unflat = lambda xs: tree.unflatten_spec(spec, list(xs))
        return unflat(out), {"trace": unflat(new_buf)}

    return GradientTransformation(init, update)


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """Stochastic gradient descent with optional momentum and (L2) weight decay.

    Matches ``torch.optim.SGD(lr, momentum, nesterov=..., weight_decay=...)`` (``dampening=0``):
    ``g += weight_decay * p``; ``buf = momentum * buf + g``; ``g = g + momentum * buf`` if
    Nesterov else ``buf``; ``p -= lr * g``. It is ``chain(add_decayed_weights, trace,
    scale_by_learning_rate)``, leaving out the parts that are off.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update({"w": torch.tensor([1.0])}, state, params)
        ...     params = optim.apply_updates(params, updates)
        >>> params["w"]  # 1 - 0.1 * 1 - 0.1 * 1.9
        tensor([0.7100])

    Args:
        lr: learning rate, a float or a schedule of the step.
        momentum: momentum coefficient (0 disables the buffers).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty coefficient added to the gradient.
        mask: which leaves get weight decay (see :func:`add_decayed_weights`).

    Returns:
        The transformation (a chain; its state is a list).

    Raises:
        ValueError: ``nesterov`` without momentum, or a negative coefficient.
    """
    if nesterov and momentum <= 0:
        raise ValueError("sgd: nesterov=True needs momentum > 0")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    if momentum:
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


# ----------------------------------------------------------------------------- helpers


def _stateless_scale(coef_of: Callable[[list[Tensor]], float | Tensor]) -> GradientTransformation:
    """A stateless transformation multiplying the updates by ``coef_of(leaves)``."""

    def init(params: Tree) -> dict[str, Any]:
        del params
        return {}

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        del params
        leaves, spec = flatten(updates)
        if not leaves:
            return updates, state
        return tree.unflatten_spec(spec, _scale_leaves(leaves, coef_of(leaves))), state

    return GradientTransformation(init, update)


def _global_norm(leaves: Sequence[Tensor]) -> Tensor:
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    if _checks.wrapped(leaves[0]):  # under torch.func: plain per-leaf ops have batching rules
        norms = [torch.linalg.vector_norm(x.float()) for x in leaves]
    else:
        norms = list(torch._foreach_norm(list(leaves), 2, dtype=torch.float32))
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _scale_leaves(leaves: Sequence[Tensor], factor: float | Tensor) -> list[Tensor]:
    if _checks.wrapped(leaves[0]) or (isinstance(factor, Tensor) and _checks.wrapped(factor)):
        return [x * factor for x in leaves]
    return list(torch._foreach_mul(list(leaves), factor))
