"""Plain-recursion helpers behind :mod:`fnllm.tree` (private).

Plain Python recursion over dicts, lists and tuples: ``torch.compile``
traces it without graph breaks on any tree, including the sparse halves of a partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    where = prefix or "<root>"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            raise ValueError(f"tree: structures differ at {where}: {kind(a)} vs {kind(b)}")
        if set(a) != set(b):
            missing = sorted(join(prefix, k) for k in set(a) - set(b))
            extra = sorted(join(prefix, k) for k in set(b) - set(a))
            raise ValueError(
                f"tree: keys differ at {where}: only in first {missing}, only in second {extra}"
            )
        for k in a:
            check_same_structure(a[k], b[k], join(prefix, k), shapes)
        return
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            raise ValueError(f"tree: structures differ at {where}: {kind(a)} vs {kind(b)}")
        if len(a) != len(b):
            raise ValueError(f"tree: lengths differ at {where}: {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            check_same_structure(x, y, join(prefix, i), shapes)
        return
    if (a is None) != (b is None):
        raise ValueError(f"tree: structures differ at {where}: {kind(a)} vs {kind(b)}")
    both_tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if shapes and both_tensors and (a.shape != b.shape or a.dtype != b.dtype):
        raise ValueError(
            f"tree: leaf {where} differs: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        )


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
