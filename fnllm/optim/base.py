"""The optimizer protocol, ``chain``, ``apply_updates`` and ``step`` (optax-style).

A :class:`GradientTransformation` is a pair of pure functions: ``state = init(params)`` and
``updates, state = update(grads, state, params)``. Neither mutates its inputs; both return
new trees. Optimizer states are plain trees too (dicts of tensors, lists for :func:`chain`),
so they checkpoint, ``torch.compile`` and move between devices like parameters do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnllm import tree
from fnllm._deprecation import deprecated
from fnllm.optim._helpers import Tree, check_shapes, flatten, leaves_like

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "chain",
    "step",
]

State = Any
InitFn = Callable[[Tree], State]
UpdateFn = Callable[..., tuple[Tree, State]]
FusedStepFn = Callable[[Tree, State, Tree, bool], tuple[Tree, State]]


class GradientTransformation(NamedTuple):
    """An optimizer: a pair of pure functions ``init`` and ``update`` (optax-style).

    ``update`` is pure: it returns new trees and leaves ``grads``, ``state`` and ``params``
    untouched, so it runs under ``torch.compile(fullgraph=True)`` (the step count is a tensor in
    the state) and an old state stays valid. ``fused_step`` is an optional fast path used by
    :func:`step`: ``fused_step(grads, state, params, donate) -> (new_params, new_state)``.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> halve = optim.GradientTransformation(
        ...     init=lambda params: {},
        ...     update=lambda g, state, params=None: ({k: v / 2 for k, v in g.items()}, state),
        ... )
        >>> halve.update({"w": torch.tensor(4.0)}, halve.init({}))
        ({'w': tensor(2.)}, {})

    Args:
        init: builds the state for a parameter tree.
        update: maps gradients (or the previous transform's updates) to updates.
        fused_step: optional; computes the new parameters directly (see :func:`step`).

    Returns:
        A named tuple.
    """

    init: InitFn
    update: UpdateFn
    fused_step: FusedStepFn | None = None


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms: each one's updates feed the next; the state is a list, one per step.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
        >>> updates["w"]  # clipped to norm 1, then times -0.1
        tensor([-0.0600, -0.0800])

    Args:
        *transforms: one or more :class:`GradientTransformation`.

    Returns:
        The composed transformation. Its ``fused_step`` exists when the last transform has one.

    Raises:
        ValueError: no transform was given.
        TypeError: an argument is not a transformation.
    """
    if not transforms:
        raise ValueError("optim.chain: needs at least one transform")
    for i, t in enumerate(transforms):
        if not (hasattr(t, "init") and hasattr(t, "update")):
            raise TypeError(
                f"optim.chain: argument {i} is not a GradientTransformation: {type(t).__name__}"
            )
    n = len(transforms)

    def init(params: Tree) -> list[State]:
        return [t.init(params) for t in transforms]

    def update(updates: Tree, state: State, params: Tree | None = None) -> tuple[Tree, State]:
        _check_chain_state(state, n)
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, new_state

    last = transforms[-1]
    last_fused = getattr(last, "fused_step", None)
    if last_fused is None:
        return GradientTransformation(init, update)

    def fused_step(grads: Tree, state: State, params: Tree, donate: bool) -> tuple[Tree, State]:
        _check_chain_state(state, n)
        new_state = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        params, s = last_fused(grads, state[-1], params, donate)
        return params, [*new_state, s]

    return GradientTransformation(init, update, fused_step)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """Add updates to parameters, leaf by leaf: a NEW tree (``params`` is not modified).

    Each result keeps its parameter's dtype (bf16 parameters stay bf16 under float32 updates).

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> params = {"w": torch.ones(2)}
        >>> optim.apply_updates(params, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
        >>> params["w"]
        tensor([1., 1.])

    Args:
        params: a tree of tensors.
        updates: a tree of the same structure (what ``update`` returned).

    Returns:
        ``params + updates``.

    Raises:
        ValueError: the trees differ in structure or leaf shapes (the message names the path).
    """
    pl, spec = flatten(params)
    ul = leaves_like("optim.apply_updates", "updates", updates, spec, params, "params")
    check_shapes("optim.apply_updates", "updates", ul, pl, spec, "params")
    if not pl:
        return tree.unflatten_spec(spec, [])
    if all(p.dtype == u.dtype for p, u in zip(pl, ul)):
        new = list(torch._foreach_add(pl, ul))
    else:
        new = [(p + u).to(p.dtype) for p, u in zip(pl, ul)]
    return tree.unflatten_spec(spec, new)


def apply_gradients(
    optimizer: GradientTransformation,
    grads: Tree,
    state: State,
    params: Tree,
    *,
    donate: bool = False,
) -> tuple[Tree, State]:
    """Apply gradients: ``update`` then ``apply_updates``, through a fused kernel if possible.

    (Called ``step`` before; that name is a deprecated alias, removed in 0.2. Not to be
    confused with ``fnllm.train.TrainStep``, a whole training step, or ``fit(steps=)``.)

    Equal (to rounding) to ``updates, state = optimizer.update(grads, state, params)`` followed
    by ``apply_updates(params, updates)``, but transforms with a ``fused_step`` (``adam``,
    ``adamw`` and chains ending in them) use ``torch._fused_adamw_`` in eager mode, without
    materialising the updates. With ``donate=False`` (the default) the inputs are never
    modified: the kernel runs on fresh copies. With ``donate=True`` you hand ``params`` and
    ``state`` over, like ``donate_argnums`` in ``jax.jit``: their buffers may be updated in place
    and returned, so do not use the old trees afterwards: the same kernel and memory traffic as
    ``torch.optim.AdamW(fused=True)`` (see ``benchmarks/optim.py``). Under ``torch.compile``
    (or ``torch.func``) the pure path is traced and ``donate`` has no effect.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.adamw(0.1, weight_decay=0.0)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> new, state = optim.apply_gradients(opt, {"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> new["w"], params["w"]
        (tensor([0.9000, 1.1000]), tensor([1., 1.]))

    Args:
        optimizer: the transformation.
        grads: gradients, a tree shaped like ``params``.
        state: the optimizer state for ``params``.
        params: the parameters.
        donate: allow reusing the buffers of ``params`` and ``state`` for the results.

    Returns:
        ``(new_params, new_state)``.

    Raises:
        TypeError: ``optimizer`` has no ``update`` (not a :class:`GradientTransformation`).
    """
    if not callable(getattr(optimizer, "update", None)):
        raise TypeError(
            "optim.apply_gradients: optimizer must be a GradientTransformation (with an "
            f"update function), got {type(optimizer).__name__}"
        )
    fused = getattr(optimizer, "fused_step", None)
    if fused is not None:
        return fused(grads, state, params, donate)
    updates, state = optimizer.update(grads, state, params)
    return apply_updates(params, updates), state


def step(*args: Any, **kwargs: Any) -> tuple[Tree, State]:
    """Deprecated (removed in 0.2): the old name of :func:`apply_gradients`.

    Runs :func:`apply_gradients` unchanged; the first call in a process warns with a
    ``DeprecationWarning`` naming the replacement.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.sgd(0.5)
        >>> w = {"w": torch.ones(1)}
        >>> optim.step(opt, w, opt.init(w), w)[0]
        {'w': tensor([0.5000])}

    Args:
        *args: as for :func:`apply_gradients`.
        **kwargs: as for :func:`apply_gradients`.

    Returns:
        ``(new_params, new_state)``, as :func:`apply_gradients`.
    """
    deprecated("optim.step", "optim.apply_gradients (same arguments)")
    return apply_gradients(*args, **kwargs)


# ----------------------------------------------------------------------------- helpers


def _check_chain_state(state: object, n: int) -> None:
    if not isinstance(state, (list, tuple)) or len(state) != n:
        got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__
        raise ValueError(
            f"optim.chain: state must be a list of {n} states (one per transform), got {got}"
        )
