"""Tree assertions whose failure messages name the path, the index and the values."""

from __future__ import annotations

import struct
from typing import Any, NoReturn

import torch

from fnllm import _tree_ops, tree

# Per-dtype defaults (rtol, atol), the same as ``torch.testing.assert_close``.
_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def assert_same_structure(
    actual: Any, expected: Any, *, shapes: bool = True, ordered: bool = False
) -> None:
    """Assert two trees have the same containers and keys (and leaf shapes and dtypes).

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> testing.assert_same_structure({"w": torch.zeros(2)}, {"w": torch.ones(2)})
        >>> testing.assert_same_structure({"w": torch.zeros(2)}, {"w": torch.ones(3)})
        Traceback (most recent call last):
        AssertionError: trees differ at w: shape (2,) vs (3,)

    Args:
        actual: the tree under test.
        expected: the reference tree.
        shapes: also compare tensor shapes and dtypes.
        ordered: also require every dict's keys in the same order (it fixes
            :func:`fnllm.tree.flatten` order, hence file and optimizer-state layouts).

    Raises:
        AssertionError: naming the first path where the trees differ.
    """
    _walk(actual, expected, "", shapes=shapes, leaf_check=None, ordered=ordered)


def assert_trees_equal(
    actual: Any, expected: Any, *, bitwise: bool = False, ordered: bool = False
) -> None:
    """Assert two trees are equal: same structure, shapes, dtypes and values (NaN equals NaN).

    With ``bitwise=True`` tensor elements must have the same bits (``-0.0`` differs from
    ``0.0``, NaN payloads count) and plain leaves the same type and value (``True`` differs
    from ``1``, ``-0.0`` from ``0.0``), as a checkpoint round trip should give.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> testing.assert_trees_equal({"a": [torch.tensor([1.0, 2.0])]},
        ...                            {"a": [torch.tensor([1.0, 2.0])]})
        >>> testing.assert_trees_equal({"a": [torch.tensor([1.0, 2.0])]},
        ...                            {"a": [torch.tensor([1.0, 2.5])]})
        Traceback (most recent call last):
        AssertionError: trees differ at a.0: 1 of 2 elements differ; first at [1]: 2.0 vs 2.5

    Args:
        actual: the tree under test.
        expected: the reference tree.
        bitwise: compare the bits of tensor elements rather than their values.
        ordered: also require every dict's keys in the same order.

    Raises:
        AssertionError: naming the path, the first differing index and both values.
    """

    def check(path: str, a: Any, e: Any) -> None:
        _equal_leaf(path, a, e, bitwise=bitwise)

    _walk(actual, expected, "", shapes=True, leaf_check=check, ordered=ordered)


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    ordered: bool = False,
) -> None:
    """Assert two trees are close: ``|a - e| <= atol + rtol * |e|`` elementwise at every leaf.

    Without ``rtol``/``atol`` each leaf uses its dtype's default (as ``torch.testing``:
    float32 ``1.3e-6``/``1e-5``, float16 ``1e-3``/``1e-5``, bfloat16 ``1.6e-2``/``1e-5``,
    float64 ``1e-7``/``1e-7``); integer and bool leaves must be equal.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> testing.assert_trees_close({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0001])},
        ...                            rtol=1e-3)
        >>> testing.assert_trees_close({"w": torch.tensor([1.0, 2.0])},
        ...                            {"w": torch.tensor([1.0, 2.1])}, rtol=0, atol=0.05)
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        AssertionError: trees differ at w: 1 of 2 elements not close (rtol=0, atol=0.05);
            worst at [1]: 2.0 vs 2.1 (abs diff 0.1)

    Args:
        actual: the tree under test.
        expected: the reference tree.
        rtol: relative tolerance for every floating leaf (default: per dtype).
        atol: absolute tolerance for every floating leaf (default: per dtype).
        ordered: also require every dict's keys in the same order.

    Raises:
        AssertionError: naming the path, the worst index, both values and the tolerances.
    """

    def check(path: str, a: Any, e: Any) -> None:
        _close_leaf(path, a, e, rtol, atol)

    _walk(actual, expected, "", shapes=True, leaf_check=check, ordered=ordered)


def assert_frozen_unchanged(
    before: Any, after: Any, trainable: tree.Filter, *, trainable_changed: bool = False
) -> None:
    """Assert the leaves a filter leaves out (the frozen ones) are bit-identical after a step.

    ``trainable`` is the filter you pass to :func:`fnllm.tree.partition`: leaves it selects
    may change, every other leaf must keep its exact values.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> before = {"body": torch.ones(2), "head": torch.ones(2)}
        >>> testing.assert_frozen_unchanged(before, {"body": torch.ones(2), "head": torch.zeros(2)},
        ...                                 "head", trainable_changed=True)
        >>> testing.assert_frozen_unchanged(before, {"body": torch.zeros(2), "head": torch.ones(2)},
        ...                                 "head")
        Traceback (most recent call last):
        AssertionError: frozen leaf body changed: 2 of 2 elements differ; first at [0]: 0.0 vs 1.0

    Args:
        before: the tree before the step.
        after: the tree after it (same structure).
        trainable: glob, list of globs or predicate selecting the trainable leaves.
        trainable_changed: also require every trainable leaf to have changed somewhere.

    Raises:
        AssertionError: naming the frozen leaf that changed (or the trainable one that did not).
    """
    assert_same_structure(after, before)
    selected = tree.filter_fn(trainable)
    flat_before = tree.flatten(before)
    for path, new in tree.flatten(after).items():
        old = flat_before[path]
        if not selected(path, old):
            problem = _difference(new, old)
            if problem:
                raise AssertionError(f"frozen leaf {path} changed: {problem}")
        elif trainable_changed and not _difference(new, old):
            raise AssertionError(
                f"trainable leaf {path} did not change ({_kind(old)}, all elements equal)"
            )


# ----------------------------------------------------------------------------- helpers


def _walk(
    a: Any, e: Any, path: str, *, shapes: bool, leaf_check: Any, ordered: bool = False
) -> None:
    def leaf(where: str, x: Any, y: Any) -> None:
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            raise AssertionError(f"trees differ at {where}: {_kind(x)} vs {_kind(y)}")
        if shapes and isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                raise AssertionError(
                    f"trees differ at {where}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
                )
            if x.dtype != y.dtype:
                raise AssertionError(f"trees differ at {where}: dtype {x.dtype} vs {y.dtype}")
        if leaf_check is not None:
            leaf_check(where, x, y)

    _tree_ops.walk_together(a, e, path, leaf, _trees_differ, sort_keys=True, ordered=ordered)


def _trees_differ(what: str, where: str, a: Any, e: Any) -> NoReturn:
    if what == "keys":
        raise AssertionError(
            f"trees differ at {where}: keys only in actual {a}, only in expected {e}"
        )
    if what == "order":
        raise AssertionError(f"trees differ at {where}: key order {a} vs {e}")
    if what == "length":
        raise AssertionError(f"trees differ at {where}: length {a} vs {e}")
    raise AssertionError(f"trees differ at {where}: {_kind(a)} vs {_kind(e)}")


def _equal_leaf(path: str, a: Any, e: Any, *, bitwise: bool = False) -> None:
    if isinstance(a, torch.Tensor):
        problem = _difference(a, e, bitwise=bitwise)
        if problem:
            raise AssertionError(f"trees differ at {path}: {problem}")
    elif bitwise and (type(a) is not type(e) or _float_bits(a) != _float_bits(e)):
        raise AssertionError(f"trees differ at {path}: {a!r} ({_kind(a)}) vs {e!r} ({_kind(e)})")
    elif not (a == e or (a != a and e != e)):  # plain leaves; NaN equals NaN
        raise AssertionError(f"trees differ at {path}: {a!r} vs {e!r}")


def _close_leaf(path: str, a: Any, e: Any, rtol: float | None, atol: float | None) -> None:
    if not isinstance(a, torch.Tensor) or not (a.is_floating_point() or a.is_complex()):
        _equal_leaf(path, a, e)
        return
    d_rtol, d_atol = _TOLERANCES.get(a.dtype, (1.3e-6, 1e-5))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a64, e64 = a.detach().cpu().double(), e.detach().cpu().double()
    close = torch.isclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return
    excess = ((a64 - e64).abs() - atol - rtol * e64.abs()).nan_to_num(nan=float("inf"))
    excess = torch.where(close, torch.full_like(excess, -float("inf")), excess)
    worst = _unravel(int(excess.reshape(-1).argmax()), a.shape)
    diff = float((a64[worst] - e64[worst]).abs())
    raise AssertionError(
        f"trees differ at {path}: {int((~close).sum())} of {close.numel()} elements not close "
        f"(rtol={rtol:g}, atol={atol:g}); worst at {list(worst)}: "
        f"{_fmt(a[worst])} vs {_fmt(e[worst])} (abs diff {diff:.3g})"
    )


def _difference(a: torch.Tensor, e: torch.Tensor, *, bitwise: bool = False) -> str:
    """Describe how two same-shape tensors differ ('' when equal, NaN equal to NaN)."""
    if a.shape != e.shape or a.dtype != e.dtype:
        return f"{_kind(a)} vs {_kind(e)}"
    a, e = a.detach().cpu(), e.detach().cpu()
    if bitwise and a.dtype != torch.bool:
        as_int = _INT_OF_SIZE[a.element_size()]
        same = a.contiguous().view(as_int) == e.contiguous().view(as_int)
    else:
        same = a == e
    if (a.is_floating_point() or a.is_complex()) and not bitwise:
        same = same | (a.isnan() & e.isnan())
    if bool(same.all()):
        return ""
    first = _unravel(int((~same).reshape(-1).nonzero()[0, 0]), a.shape)
    return (
        f"{int((~same).sum())} of {same.numel()} elements differ; "
        f"first at {list(first)}: {_fmt(a[first])} vs {_fmt(e[first])}"
    )


def _float_bits(x: Any) -> Any:
    """A plain float as its 64 bits (so ``-0.0 != 0.0``); any other value as itself."""
    return struct.pack("<d", x) if isinstance(x, float) else x


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _fmt(x: torch.Tensor) -> str:
    value = x.item()
    if isinstance(value, float) and x.dtype == torch.float32 and value == value:
        # the shortest decimal that rounds back to the same float32 (2.1, not
        # 2.0999999046325684); float16/bfloat16 values print exactly in few digits anyway
        for digits in range(1, 10):
            short = float(f"{value:.{digits}g}")
            if torch.tensor(short, dtype=x.dtype).item() == value:
                return repr(short)
    return repr(value)


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
