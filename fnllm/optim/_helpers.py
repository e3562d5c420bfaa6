"""Helpers shared by the transforms of :mod:`fnllm.optim` (private): flattening with a
structure check, shape checks, weight-decay masks and state checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, tree

Tree = Any


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
        globs = (mask,) if isinstance(mask, str) else tuple(mask) if is_globs else ()

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
                paths = _paths(ref)
                if globs:
                    _check_globs(where, globs, paths)
                flags = by_spec[spec] = by_metas[metas] = flags_of(paths, metas)
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


def _paths(t: Tree) -> tuple[str, ...]:
    return tuple(tree.paths(t))


def _path_at(spec: tree.TreeSpec, i: int) -> str:
    return tree.spec_paths(spec)[i]


def check_lr(where: str, lr: Any) -> Any:
    """Check a learning rate given as a number or a tensor (finite, >= 0); pass schedules on."""
    if callable(lr) and not isinstance(lr, Tensor):
        return lr
    return _checks.check_range(f"{where}: lr", lr, low=0.0)


def check_lr_value(where: str, value: Any, count: Tensor | None) -> Any:
    """Check the learning rate of this step (a schedule's value, or a tensor the user may have
    changed in place): finite and >= 0, read eagerly only (one host sync); returns ``value``.

    A negative rate would move the parameters uphill and a NaN one would poison them, silently.
    """
    if not isinstance(value, Tensor):
        if torch.compiler.is_compiling():  # a traced float cannot be read; eager steps check it
            return value
        if callable(value):
            raise TypeError(f"{where}: lr: the schedule returned a function, not a number")
        # a Python number from a custom schedule: the same rule as for a tensor
        at = "" if count is None or _checks.tracing(count) else f" at step {int(count)}"
        try:
            _checks.check_range(f"{where}: lr{at}", value, low=0.0)
        except ValueError as err:
            raise ValueError(f"{err} (a negative rate would move the parameters uphill)") from None
        return value
    if _checks.tracing(value, count):
        return value
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{where}: lr: the schedule returned a {value.dtype} tensor")
    v = value.detach().double()
    if v.numel() and not bool(((v >= 0) & torch.isfinite(v)).all()):
        bad = v[~((v >= 0) & torch.isfinite(v))].reshape(-1)[0]
        at = "" if count is None else f" at step {int(count)}"
        raise ValueError(
            f"{where}: lr: expected a finite value >= 0, got {float(bad)}{at}"
            " (a negative rate would move the parameters uphill)"
        )
    return value


def check_finite_grads(where: str, name: str, leaves: Sequence[Tensor], spec: Any) -> None:
    """Raise naming the first gradient leaf holding NaN or inf (eagerly: one host sync).

    An update from such a gradient would silently poison the parameters and the moments;
    :func:`fnllm.train.fit` skips those steps itself (``on_nonfinite``), and a compiled
    update cannot read values, so this runs in eager mode only.
    """
    if not leaves or _checks.tracing(*leaves):
        return
    if any(type(x) not in (Tensor, torch.nn.Parameter) for x in leaves):
        return  # a tensor subclass (a DTensor shard): its step's owner guards it (fit's guard)
    if any(x.is_complex() or not x.is_floating_point() for x in leaves):
        return  # the dtype checks elsewhere name those
    # one fused pass (the 2-norm: ~100x faster on CPU than the inf-norm or isfinite per leaf);
    # a flagged leaf is then checked exactly, so a finite leaf whose square overflows passes
    norms = torch.stack([m.float() for m in torch._foreach_norm(list(leaves))])
    flagged = (~torch.isfinite(norms)).nonzero()[:, 0].tolist()
    for i in flagged:
        x = leaves[i]
        if bool(torch.isfinite(x).all()):
            continue
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(
            f"{where}: {name} {_path_at(spec, i)} holds {kind}: the update would poison the "
            "parameters and the optimizer state (fnllm.train.fit skips such steps; outside it, "
            "check the loss or clip first)"
        )


def _check_globs(where: str, globs: Sequence[str], paths: Sequence[str]) -> None:
    """Every glob of a mask selects a leaf: a typo would silently switch weight decay off."""
    tree.check_globs(globs, paths, where=f"{where}: mask")
