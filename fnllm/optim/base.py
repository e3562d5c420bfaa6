"""The optimizer protocol, ``chain``, ``apply_updates`` and ``step`` (optax-style).

A :class:`GradientTransformation` is a pair of pure functions: ``state = init(params)`` and
``updates, state = update(grads, state, params)``. Neither mutates its inputs; both return
new trees. Optimizer states are plain trees too (dicts of tensors, lists for :func:`chain`),
so they checkpoint, ``torch.compile`` and move between devices like parameters do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnllm import _checks, tree

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "chain",
    "step",
]

Tree = Any
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


def step(
    optimizer: GradientTransformation,
    grads: Tree,
    state: State,
    params: Tree,
    *,
    donate: bool = False,
) -> tuple[Tree, State]:
    """One optimizer step: ``update`` then ``apply_updates``, through a fused kernel if possible.

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
        >>> new, state = optim.step(opt, {"w": torch.tensor([1.0, -1.0])}, state, params)
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
    """
    fused = getattr(optimizer, "fused_step", None)
    if fused is not None:
        return fused(grads, state, params, donate)
    updates, state = optimizer.update(grads, state, params)
    return apply_updates(params, updates), state


# ----------------------------------------------------------------------------- shared helpers
# Used by the transforms in this package; not part of the public API.


def flatten(t: Tree) -> tuple[list[Any], tree.TreeSpec]:
    """Leaves and structure of a tree (``None`` is an empty subtree, as in ``fnllm.tree``)."""
    return tree.flatten_spec(t)


def leaves_like(
    where: str, name: str, t: Tree, spec: tree.TreeSpec, ref: Tree, ref_name: str
) -> list[Any]:
    """The leaves of ``t``, after checking it has the structure ``spec`` of ``ref``.

    Eagerly this is ``spec.flatten_up_to`` (a fraction of a full flatten's cost); a subtree
    where ``ref`` has a leaf comes back as a non-tensor "leaf", which :func:`check_shapes`
    reports.
    """
    if torch.compiler.is_compiling():
        # Tree specs are not traceable on every torch version; the structure was checked when
        # the call ran eagerly, so here the leaf count (and the shapes) must do.
        out = flatten(t)[0]
        if len(out) != len(flatten(ref)[0]):
            raise ValueError(f"{where}: {name} has {len(out)} leaves, {ref_name} has another count")
        return out
    try:
        return spec.flatten_up_to(t)
    except (ValueError, TypeError):
        raise ValueError(structure_message(where, name, t, ref_name, ref)) from None


def check_shapes(
    where: str,
    name: str,
    got: Sequence[Any],
    ref: Sequence[Any],
    spec: tree.TreeSpec,
    ref_name: str,
) -> None:
    """Raise naming the first leaf whose shape differs from the reference's."""
    if all(isinstance(a, Tensor) and a.shape == b.shape for a, b in zip(got, ref)):
        return
    for i, (a, b) in enumerate(zip(got, ref)):
        if not isinstance(a, Tensor):
            path = _path_at(spec, i)
            raise TypeError(f"{where}: {name} leaf {path!r} is not a tensor: {type(a).__name__}")
        if a.shape != b.shape:
            path = _path_at(spec, i)
            raise ValueError(
                f"{where}: {name} leaf {path!r} has shape {tuple(a.shape)} but {ref_name} has "
                f"{tuple(b.shape)}"
            )


def structure_message(where: str, name: str, got: Tree, ref_name: str, ref: Tree) -> str:
    """A message naming the paths present in one tree and missing in the other."""
    try:
        got_paths, ref_paths = tree.paths(got), tree.paths(ref)
    except ValueError as e:  # a key that can not be written as a dotted path
        return f"{where}: {name} does not have the structure of {ref_name} ({e})"
    got_set, ref_set = set(got_paths), set(ref_paths)
    only_got = [p for p in got_paths if p not in ref_set]
    only_ref = [p for p in ref_paths if p not in got_set]
    if only_got or only_ref:
        return (
            f"{where}: {name} does not match {ref_name}: paths only in {name}: "
            f"{_checks.few(only_got)}; only in {ref_name}: {_checks.few(only_ref)}"
        )
    return (
        f"{where}: {name} has the paths of {ref_name} but different containers "
        f"(e.g. list vs tuple): {flatten(got)[1]} vs {flatten(ref)[1]}"
    )


Mask = Any  # a tree.Filter (glob, list of globs, predicate), a tree of bools, or None
MaskFn = Callable[[Tree, tree.TreeSpec, Sequence[Tensor]], tuple[bool, ...]]


def make_mask(where: str, mask: Mask) -> MaskFn:
    """Turn a mask argument into ``resolve(ref_tree, spec, leaves) -> flags`` (one bool a leaf).

    Filters are evaluated on each leaf's path and on a ``meta`` tensor with the leaf's shape
    and dtype (so a predicate may look at ``leaf.ndim`` but not at values), once per tree
    structure: the result is cached by structure in eager mode and is a trace-time constant
    under ``torch.compile`` (glob matching itself can not be traced).
    """
    if mask is None:
        return lambda ref, spec, leaves: (True,) * len(leaves)
    is_globs = isinstance(mask, (list, tuple)) and all(isinstance(g, str) for g in mask)
    if isinstance(mask, str) or callable(mask) or is_globs:
        pred = tree.filter_fn(mask)

        @torch.compiler.assume_constant_result
        def flags_of(
            paths: tuple[str, ...], metas: tuple[tuple[Any, Any], ...]
        ) -> tuple[bool, ...]:
            return tuple(
                bool(pred(p, torch.empty(shape, dtype=dtype, device="meta")))
                for p, (shape, dtype) in zip(paths, metas)
            )

        by_spec: dict[Any, tuple[bool, ...]] = {}
        by_metas: dict[Any, tuple[bool, ...]] = {}

        def resolve(ref: Tree, spec: tree.TreeSpec, leaves: Sequence[Tensor]) -> tuple[bool, ...]:
            if torch.compiler.is_compiling():
                # Reuse what an eager call (``init`` makes one) resolved for these leaves;
                # computing paths is not traceable on every torch version.
                metas = tuple((tuple(x.shape), x.dtype) for x in leaves)
                if metas in by_metas:
                    return by_metas[metas]
                return flags_of(_paths(ref), metas)
            flags = by_spec.get(spec)
            if flags is None:
                if len(by_spec) > 16:
                    by_spec.clear()
                    by_metas.clear()
                metas = tuple((tuple(x.shape), x.dtype) for x in leaves)
                flags = by_spec[spec] = by_metas[metas] = flags_of(_paths(ref), metas)
            return flags

        return resolve
    mleaves, mspec = flatten(mask)
    for b in mleaves:
        if not isinstance(b, bool):
            raise TypeError(
                f"{where}: mask must be a glob, a list of globs, a predicate (path, leaf) -> bool "
                f"or a tree of Python bools; found a leaf {b!r}"
            )
    flags = tuple(mleaves)

    def resolve_tree(ref: Tree, spec: tree.TreeSpec, leaves: Sequence[Tensor]) -> tuple[bool, ...]:
        if mspec != spec:
            raise ValueError(structure_message(where, "mask", mask, "params", ref))
        return flags

    return resolve_tree


def new_count(leaves: Sequence[Any]) -> Tensor:
    """A fresh step counter: int64 zero on the device of the first tensor leaf."""
    device = next((x.device for x in leaves if isinstance(x, Tensor)), None)
    return torch.zeros((), dtype=torch.int64, device=device)


def check_count(where: str, count: object) -> Tensor:
    if not isinstance(count, Tensor) or count.ndim != 0:
        raise ValueError(f"{where}: state 'count' must be a 0-d tensor, got {count!r}")
    return count


def check_state_keys(where: str, state: object, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(state, dict) or set(state) != set(keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{where}: state must be the dict returned by init with keys {sorted(keys)}, got {got}"
        )
    return state


def _check_chain_state(state: object, n: int) -> None:
    if not isinstance(state, (list, tuple)) or len(state) != n:
        got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__
        raise ValueError(
            f"optim.chain: state must be a list of {n} states (one per transform), got {got}"
        )


def _paths(t: Tree) -> tuple[str, ...]:
    return tuple(tree.paths(t))


def _path_at(spec: tree.TreeSpec, i: int) -> str:
    return tree.spec_paths(spec)[i]
