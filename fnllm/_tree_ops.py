"""Plain-recursion helpers behind :mod:`fnllm.tree` (private).

Plain Python recursion over dicts, lists and tuples: ``torch.compile``
traces it without graph breaks on any tree, including the sparse halves of a partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import torch

EMPTY: tuple = ()  # what an unselected list/tuple slot holds after ``partition``


def is_container(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple)) or x is None


def join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def partition(node: Any, pred: Callable[[str, Any], bool], prefix: str) -> tuple[Any, Any]:
    if node is None:
        return None, None
    if isinstance(node, dict):
        sel: dict[Any, Any] = {}
        rest: dict[Any, Any] = {}
        for k, v in node.items():
            if is_container(v):
                sel[k], rest[k] = partition(v, pred, join(prefix, k))
            elif pred(join(prefix, k), v):
                sel[k] = v
            else:
                rest[k] = v
        return sel, rest
    if isinstance(node, (list, tuple)):
        pairs = []
        for i, v in enumerate(node):
            if is_container(v):
                pairs.append(partition(v, pred, join(prefix, i)))
            elif pred(join(prefix, i), v):
                pairs.append((v, EMPTY))
            else:
                pairs.append((EMPTY, v))
        return rebuild(node, [p[0] for p in pairs]), rebuild(node, [p[1] for p in pairs])
    # A bare leaf at the root.
    return (node, None) if pred("", node) else (None, node)


def rebuild(like: list | tuple, items: list[Any]) -> list | tuple:
    if isinstance(like, list):
        return items
    if hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items)
    return type(like)(items)


def is_empty(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and len(x) == 0)


def combine2(a: Any, b: Any, prefix: str) -> Any:
    where = prefix or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = combine2(a[k], v, join(prefix, k)) if k in a else v
        # keep the original key order of whichever tree has it: a's first, then b's new keys
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            raise ValueError(f"tree.combine: lists of length {len(a)} and {len(b)} at {where}")
        return [combine2(x, y, join(prefix, i)) for i, (x, y) in enumerate(zip(a, b))]
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and len(a) > 0:
        return rebuild(a, [combine2(x, y, join(prefix, i)) for i, (x, y) in enumerate(zip(a, b))])
    if is_empty(a):
        return b
    if is_empty(b):
        return a
    if is_container(a) or is_container(b):
        raise ValueError(
            f"tree.combine: structures differ at {where}: {type(a).__name__} vs {type(b).__name__}"
        )
    raise ValueError(f"tree.combine: both trees hold a leaf at {where}")


def map_leaves(fn: Callable[..., Any], node: Any, rest: tuple[Any, ...], path: str | None) -> Any:
    # Plain recursion rather than a C++ tree_map: torch.compile traces it without graph
    # breaks (dynamo breaks on some dict trees in torch 2.13).
    if node is None:
        return None
    if isinstance(node, dict):
        return {
            k: map_leaves(fn, v, tuple(r[k] for r in rest), None if path is None else join(path, k))
            for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        items = [
            map_leaves(fn, v, tuple(r[i] for r in rest), None if path is None else join(path, i))
            for i, v in enumerate(node)
        ]
        return items if isinstance(node, list) else rebuild(node, items)
    return fn(node, *rest) if path is None else fn(path, node, *rest)


def listify(node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
        return node
    keys = list(node)
    is_index = all(k.isdigit() and k == str(int(k)) for k in keys)
    if keys and is_index and sorted(int(k) for k in keys) == list(range(len(keys))):
        return [listify(node[str(i)], join(prefix, i)) for i in range(len(keys))]
    return {k: listify(v, join(prefix, k)) for k, v in node.items()}


def check_same_structure(a: Any, b: Any, prefix: str = "", shapes: bool = False) -> None:
    def leaf(where: str, x: Any, y: Any) -> None:
        if (x is None) != (y is None):
            raise ValueError(f"tree: structures differ at {where}: {kind(x)} vs {kind(y)}")
        if (
            shapes
            and isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and (x.shape != y.shape or x.dtype != y.dtype)
        ):
            raise ValueError(
                f"tree: leaf {where} differs: {tuple(x.shape)} {x.dtype} vs "
                f"{tuple(y.shape)} {y.dtype}"
            )

    walk_together(a, b, prefix, leaf, _structures_differ)


def walk_together(
    a: Any,
    b: Any,
    prefix: str,
    leaf: Callable[[str, Any, Any], None],
    differ: Callable[[str, str, Any, Any], Any],
    sort_keys: bool = False,
    ordered: bool = False,
) -> None:
    """Walk two trees in step, calling ``leaf(path, x, y)`` at every pair of leaves.

    Where the containers differ, ``differ(what, path, x, y)`` is called and must raise:
    ``"kind"`` (``x``, ``y``: the two nodes), ``"keys"`` (the paths only in ``a``, only in
    ``b``), ``"length"`` (the two lengths) or, with ``ordered``, ``"order"`` (the two key
    lists). Dict keys are visited in ``a``'s order, or sorted with ``sort_keys``; the root's
    path is ``"<root>"``.
    """
    where = prefix or "<root>"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            differ("kind", where, a, b)
        if set(a) != set(b):
            only_a = sorted(join(prefix, k) for k in set(a) - set(b))
            differ("keys", where, only_a, sorted(join(prefix, k) for k in set(b) - set(a)))
        if ordered and list(a) != list(b):
            differ("order", where, list(a), list(b))
        for k in sorted(a, key=str) if sort_keys else a:
            walk_together(a[k], b[k], join(prefix, k), leaf, differ, sort_keys, ordered)
    elif isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            differ("kind", where, a, b)
        if len(a) != len(b):
            differ("length", where, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            walk_together(x, y, join(prefix, i), leaf, differ, sort_keys, ordered)
    else:
        leaf(where, a, b)


def _structures_differ(what: str, where: str, x: Any, y: Any) -> NoReturn:
    if what == "keys":
        raise ValueError(f"tree: keys differ at {where}: only in first {x}, only in second {y}")
    if what == "length":
        raise ValueError(f"tree: lengths differ at {where}: {x} vs {y}")
    raise ValueError(f"tree: structures differ at {where}: {kind(x)} vs {kind(y)}")


def kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}"
    return type(x).__name__


def leaves(node: Any, out: list[Any]) -> list[Any]:
    """Append the leaves below ``node`` to ``out`` in flatten order (sorted dict keys)."""
    if node is None:
        return out
    if isinstance(node, dict):
        for k in sorted(node):
            leaves(node[k], out)
    elif isinstance(node, (list, tuple)):
        for v in node:
            leaves(v, out)
    else:
        out.append(node)
    return out
