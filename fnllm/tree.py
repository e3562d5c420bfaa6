"""Parameter trees: plain nested ``dict`` / ``list`` / ``tuple`` containers with tensor leaves.

Every leaf has a *path*: the keys and list indexes from the root, joined with dots
(``"blocks.3.attn.qkv.weight"``). Filters select leaves by path, so freezing, weight-decay
masks and checkpoint keys all speak the same language.

A partition is just two sparse trees: unselected dict entries are dropped and unselected
list/tuple slots hold an empty tuple ``()``, so both halves are ordinary trees that
``torch.func.grad``, ``vmap`` and ``torch.compile`` accept as they are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import optree
import torch

Tree: TypeAlias = Any
Predicate: TypeAlias = Callable[[str, Any], bool]
Filter: TypeAlias = str | Sequence[str] | Predicate

__all__ = [
    "Filter",
    "Tree",
    "cast",
    "combine",
    "count",
    "filter_fn",
    "flatten",
    "leaves",
    "map",
    "partition",
    "paths",
    "structure_equal",
    "unflatten",
]

_EMPTY: tuple = ()  # what an unselected list/tuple slot holds after ``partition``


def paths(tree: Tree) -> list[str]:
    """List the dotted path of every leaf, in traversal order.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> tree.paths({"b": [torch.zeros(1), torch.ones(2)], "a": {"w": torch.zeros(3)}})
        ['a.w', 'b.0', 'b.1']

    Args:
        tree: a nested dict/list/tuple of leaves.

    Returns:
        The leaf paths, dict keys visited in sorted order (as optree and JAX do).
    """
    return list(flatten(tree))


def leaves(tree: Tree) -> list[Any]:
    """List the leaves of a tree in the same order as :func:`paths`.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> [t.shape for t in tree.leaves({"a": torch.zeros(2), "b": [torch.zeros(3, 1)]})]
        [torch.Size([2]), torch.Size([3, 1])]

    Args:
        tree: a nested dict/list/tuple of leaves.

    Returns:
        The leaves, in path order.
    """
    return optree.tree_leaves(tree, none_is_leaf=False)


def flatten(tree: Tree) -> dict[str, Any]:
    """Flatten a tree to ``{"dotted.path": leaf}``.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> flat = tree.flatten({"blocks": [{"w": torch.zeros(2)}], "ln": {"b": torch.ones(1)}})
        >>> list(flat)
        ['blocks.0.w', 'ln.b']

    Args:
        tree: a nested dict/list/tuple with string dict keys that contain no ``"."``.

    Returns:
        An insertion-ordered dict from path to leaf. :func:`unflatten` inverts it.

    Raises:
        ValueError: a dict key is not a string or contains a dot (the path would be ambiguous).
    """
    accessor_paths, leaves_, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    out: dict[str, Any] = {}
    for parts, leaf in zip(accessor_paths, leaves_):
        for p in parts:
            if not isinstance(p, (str, int)) or (isinstance(p, str) and "." in p):
                raise ValueError(f"tree: key {p!r} can not be part of a dotted path")
        out[".".join(str(p) for p in parts)] = leaf
    return out


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """Rebuild a nested tree from ``{"dotted.path": leaf}``.

    Levels whose keys are exactly ``"0" .. "n-1"`` become lists; all others become dicts.

    Example:
        >>> from fnllm import tree
        >>> tree.unflatten({"blocks.0.w": 1, "blocks.1.w": 2, "ln.b": 3})
        {'blocks': [{'w': 1}, {'w': 2}], 'ln': {'b': 3}}

    Args:
        flat: a mapping from dotted path to leaf, as :func:`flatten` returns.

    Returns:
        The nested tree of dicts and lists.

    Raises:
        ValueError: a path is both a leaf and a prefix of another path.
    """
    root: dict[str, Any] = {}
    for path, leaf in flat.items():
        parts = path.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"tree: {'.'.join(parts[: i + 1])!r} is both a leaf and a node")
            node = child
        if parts[-1] in node:
            raise ValueError(f"tree: path {path!r} is both a leaf and a node")
        node[parts[-1]] = leaf
    return _listify(root, "")


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree, with_path: bool = False) -> Tree:
    """Apply ``fn`` to every leaf, keeping the structure.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> tree.map(lambda x: x * 2, {"a": torch.tensor(1.0), "b": [torch.tensor(2.0)]})
        {'a': tensor(2.), 'b': [tensor(4.)]}
        >>> tree.map(lambda p, x: p, {"a": torch.tensor(1.0)}, with_path=True)
        {'a': 'a'}

    Args:
        fn: called as ``fn(leaf, *rest_leaves)``, or ``fn(path, leaf, *rest_leaves)`` when
            ``with_path`` is true.
        tree: the tree whose structure the result takes.
        *rest: more trees of the same structure; their leaves are passed alongside.
        with_path: pass the dotted path as the first argument.

    Returns:
        A new tree of the same structure holding ``fn``'s results.

    Raises:
        ValueError: a tree in ``rest`` differs in structure (the message names the path).
    """
    if not torch.compiler.is_compiling():  # checked once, eagerly; traced code skips it
        for other in rest:
            _check_same_structure(tree, other)
    return _map(fn, tree, rest, "" if with_path else None)


def count(tree: Tree) -> int:
    """Count the scalar parameters in a tree (the sum of ``numel`` over tensor leaves).

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> tree.count({"w": torch.zeros(3, 4), "b": [torch.zeros(4)]})
        16

    Args:
        tree: a tree of tensors (non-tensor leaves count as zero).

    Returns:
        The number of scalars.
    """
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))


def cast(tree: Tree, dtype: torch.dtype, *, floating_only: bool = True) -> Tree:
    """Cast the tensor leaves of a tree to ``dtype`` (a new tree; the input is unchanged).

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> t = tree.cast({"w": torch.zeros(2), "ids": torch.arange(2)}, torch.bfloat16)
        >>> t["w"].dtype, t["ids"].dtype
        (torch.bfloat16, torch.int64)

    Args:
        tree: a tree of tensors.
        dtype: the target dtype.
        floating_only: leave integer and bool tensors as they are (the default).

    Returns:
        The cast tree. Leaves that already have ``dtype`` are returned as the same objects.
    """

    def _cast(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if floating_only and not (x.is_floating_point() or x.is_complex()):
            return x
        return x.to(dtype)

    return map(_cast, tree)


def structure_equal(a: Tree, b: Tree, *, shapes: bool = False) -> bool:
    """Tell whether two trees have the same containers, keys and list lengths.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> tree.structure_equal({"a": [torch.zeros(1)]}, {"a": [torch.ones(1)]})
        True
        >>> tree.structure_equal({"a": [torch.zeros(1)]}, {"a": torch.ones(1)})
        False

    Args:
        a: a tree.
        b: another tree.
        shapes: also require tensor leaves at the same path to have equal shapes and dtypes.

    Returns:
        True when the structures (and optionally the leaf shapes) agree.
    """
    try:
        _check_same_structure(a, b, shapes=shapes)
    except ValueError:
        return False
    return True


def filter_fn(filter: Filter) -> Predicate:
    """Turn a filter (glob, list of globs or predicate) into a predicate ``(path, leaf) -> bool``.

    A glob matches a leaf when it matches the leaf's path or any dotted prefix of it, so
    ``"head"`` selects everything under ``head`` and ``"blocks.*.attn.*"`` every attention leaf
    (``*`` crosses dots, as in :mod:`fnmatch`).

    Example:
        >>> from fnllm import tree
        >>> f = tree.filter_fn(["head", "blocks.1.*"])
        >>> f("head.weight", None), f("blocks.1.attn.qkv.weight", None), f("blocks.10.x", None)
        (True, True, False)

    Args:
        filter: a glob string, a list/tuple of glob strings, or a callable ``(path, leaf) -> bool``.

    Returns:
        The predicate.

    Raises:
        TypeError: the filter is none of the above.
    """
    if isinstance(filter, str):
        globs: tuple[str, ...] = (filter,)
    elif isinstance(filter, (list, tuple)) and all(isinstance(g, str) for g in filter):
        globs = tuple(filter)
    elif callable(filter):
        return filter  # type: ignore[return-value]
    else:
        raise TypeError(
            "tree filter: expected a glob string, a list of glob strings or a callable "
            f"(path, leaf) -> bool, got {type(filter).__name__}: {filter!r}"
        )

    def _match(path: str, leaf: Any) -> bool:
        del leaf
        parts = path.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        return any(fnmatch.fnmatchcase(p, g) for g in globs for p in prefixes)

    return _match


def partition(tree: Tree, filter: Filter) -> tuple[Tree, Tree]:
    """Split a tree into the leaves a filter selects and the rest.

    Both halves keep the containers: unselected dict entries are dropped, unselected list or
    tuple slots hold ``()``. They are ordinary trees (differentiable with ``torch.func.grad``)
    and :func:`combine` puts them back together exactly.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> params = {"blocks": [{"w": torch.zeros(1)}, {"w": torch.ones(1)}],
        ...           "head": torch.ones(2)}
        >>> trainable, frozen = tree.partition(params, ["blocks.1.*", "head"])
        >>> tree.paths(trainable), tree.paths(frozen)
        (['blocks.1.w', 'head'], ['blocks.0.w'])
        >>> tree.combine(trainable, frozen)["head"] is params["head"]
        True

    Args:
        tree: the tree to split.
        filter: a glob, a list of globs or a predicate ``(path, leaf) -> bool``
            (see :func:`filter_fn`). A filter that matches nothing gives an empty selected
            half (containers only) and the whole tree as the rest; one that matches everything
            gives the reverse.

    Returns:
        ``(selected, rest)``.
    """
    pred = filter_fn(filter)
    return _partition(tree, pred, "")


def combine(*trees: Tree) -> Tree:
    """Merge the halves of :func:`partition` (any number of them) back into one tree.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> a, b = tree.partition({"x": torch.zeros(1), "y": [torch.ones(1)]}, "x")
        >>> tree.paths(tree.combine(a, b))
        ['x', 'y.0']

    Args:
        *trees: trees with the same containers whose leaves are disjoint.

    Returns:
        The merged tree, holding the very leaf objects of the inputs.

    Raises:
        ValueError: the trees differ in structure, or two of them hold a leaf at the same path
            (the message names the path).
    """
    if not trees:
        raise ValueError("tree.combine: needs at least one tree")
    out = trees[0]
    for other in trees[1:]:
        out = _combine2(out, other, "")
    return out


# ----------------------------------------------------------------------------- helpers


def _is_container(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple)) or x is None


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _partition(node: Any, pred: Predicate, prefix: str) -> tuple[Any, Any]:
    if node is None:
        return None, None
    if isinstance(node, dict):
        sel: dict[Any, Any] = {}
        rest: dict[Any, Any] = {}
        for k, v in node.items():
            if _is_container(v):
                sel[k], rest[k] = _partition(v, pred, _join(prefix, k))
            elif pred(_join(prefix, k), v):
                sel[k] = v
            else:
                rest[k] = v
        return sel, rest
    if isinstance(node, (list, tuple)):
        pairs = []
        for i, v in enumerate(node):
            if _is_container(v):
                pairs.append(_partition(v, pred, _join(prefix, i)))
            elif pred(_join(prefix, i), v):
                pairs.append((v, _EMPTY))
            else:
                pairs.append((_EMPTY, v))
        return _rebuild(node, [p[0] for p in pairs]), _rebuild(node, [p[1] for p in pairs])
    # A bare leaf at the root.
    return (node, None) if pred("", node) else (None, node)


def _rebuild(like: list | tuple, items: list[Any]) -> list | tuple:
    if isinstance(like, list):
        return items
    if hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items)
    return type(like)(items)


def _is_empty(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and len(x) == 0)


def _combine2(a: Any, b: Any, prefix: str) -> Any:
    where = prefix or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _combine2(a[k], v, _join(prefix, k)) if k in a else v
        # keep the original key order of whichever tree has it: a's first, then b's new keys
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            raise ValueError(f"tree.combine: lists of length {len(a)} and {len(b)} at {where}")
        return [_combine2(x, y, _join(prefix, i)) for i, (x, y) in enumerate(zip(a, b))]
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and len(a) > 0:
        return _rebuild(
            a, [_combine2(x, y, _join(prefix, i)) for i, (x, y) in enumerate(zip(a, b))]
        )
    if _is_empty(a):
        return b
    if _is_empty(b):
        return a
    if _is_container(a) or _is_container(b):
        raise ValueError(
            f"tree.combine: structures differ at {where}: {type(a).__name__} vs {type(b).__name__}"
        )
    raise ValueError(f"tree.combine: both trees hold a leaf at {where}")


def _map(fn: Callable[..., Any], node: Any, rest: tuple[Any, ...], path: str | None) -> Any:
    # Plain recursion rather than optree.tree_map: torch.compile traces it without graph
    # breaks (dynamo's optree support breaks on some dict trees in torch 2.13).
    if node is None:
        return None
    if isinstance(node, dict):
        return {
            k: _map(fn, v, tuple(r[k] for r in rest), None if path is None else _join(path, k))
            for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        items = [
            _map(fn, v, tuple(r[i] for r in rest), None if path is None else _join(path, i))
            for i, v in enumerate(node)
        ]
        return items if isinstance(node, list) else _rebuild(node, items)
    return fn(node, *rest) if path is None else fn(path, node, *rest)


def _listify(node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
        return node
    keys = list(node)
    is_index = all(k.isdigit() and k == str(int(k)) for k in keys)
    if keys and is_index and sorted(int(k) for k in keys) == list(range(len(keys))):
        return [_listify(node[str(i)], _join(prefix, i)) for i in range(len(keys))]
    return {k: _listify(v, _join(prefix, k)) for k, v in node.items()}


def _check_same_structure(a: Any, b: Any, prefix: str = "", shapes: bool = False) -> None:
    where = prefix or "<root>"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            raise ValueError(f"tree: structures differ at {where}: {_kind(a)} vs {_kind(b)}")
        if set(a) != set(b):
            missing = sorted(_join(prefix, k) for k in set(a) - set(b))
            extra = sorted(_join(prefix, k) for k in set(b) - set(a))
            raise ValueError(
                f"tree: keys differ at {where}: only in first {missing}, only in second {extra}"
            )
        for k in a:
            _check_same_structure(a[k], b[k], _join(prefix, k), shapes)
        return
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            raise ValueError(f"tree: structures differ at {where}: {_kind(a)} vs {_kind(b)}")
        if len(a) != len(b):
            raise ValueError(f"tree: lengths differ at {where}: {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _check_same_structure(x, y, _join(prefix, i), shapes)
        return
    if (a is None) != (b is None):
        raise ValueError(f"tree: structures differ at {where}: {_kind(a)} vs {_kind(b)}")
    both_tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if shapes and both_tensors and (a.shape != b.shape or a.dtype != b.dtype):
        raise ValueError(
            f"tree: leaf {where} differs: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        )


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}"
    return type(x).__name__
