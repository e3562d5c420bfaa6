"""Parameter trees: plain nested ``dict`` / ``list`` / ``tuple`` containers with tensor leaves.

Every leaf has a *path*: the keys and list indexes from the root, joined with dots
(``"blocks.3.attn.qkv.weight"``). Filters select leaves by path in one glob dialect
(:func:`glob_match`, checked by :func:`check_globs`), so freezing, weight-decay masks, LoRA
targets and checkpoint keys all speak the same language.

A partition is just two sparse trees: unselected dict entries are dropped and unselected
list/tuple slots hold an empty tuple ``()``, so both halves are ordinary trees that
``torch.func.grad``, ``vmap`` and ``torch.compile`` accept as they are.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import optree
import torch

from fnllm import _quant
from fnllm import _tree_ops as _ops

Tree: TypeAlias = Any
Predicate: TypeAlias = Callable[[str, Any], bool]
Filter: TypeAlias = str | Sequence[str] | Predicate
TreeSpec: TypeAlias = optree.PyTreeSpec

__all__ = [
    "Filter",
    "Tree",
    "TreeSpec",
    "cast",
    "check_globs",
    "combine",
    "count",
    "filter_fn",
    "flatten",
    "flatten_spec",
    "glob_match",
    "leaves",
    "map",
    "partition",
    "paths",
    "spec_paths",
    "structure_equal",
    "unflatten",
    "unflatten_spec",
]


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
        The leaves, in path order. While ``torch.compile`` traces, plain recursion gives
        them, so a sparse tree (a partition half holding empty containers) traces without a
        graph break.
    """
    if torch.compiler.is_compiling():
        return _ops.leaves(tree, [])
    return optree.tree_leaves(tree, none_is_leaf=False)


def flatten_spec(tree: Tree) -> tuple[list[Any], TreeSpec]:
    """Split a tree into its leaves and its structure (a spec), as ``jax.tree_util.tree_flatten``.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> leaves, spec = tree.flatten_spec({"b": torch.ones(1), "a": [torch.zeros(1)]})
        >>> tree.unflatten_spec(spec, [x + 1 for x in leaves])
        {'b': tensor([2.]), 'a': [tensor([1.])]}

    Args:
        tree: a nested dict/list/tuple of leaves (``None`` is an empty subtree).

    Returns:
        ``(leaves, spec)``: the leaves in :func:`paths` order and a hashable structure that
        :func:`unflatten_spec` fills again.
    """
    return optree.tree_flatten(tree, none_is_leaf=False)


def unflatten_spec(spec: TreeSpec, leaves: Sequence[Any]) -> Tree:
    """Build a tree of structure ``spec`` (from :func:`flatten_spec`) holding ``leaves``.

    Example:
        >>> from fnllm import tree
        >>> _, spec = tree.flatten_spec({"w": 0, "b": [1, 2]})
        >>> tree.unflatten_spec(spec, [10, 20, 30])
        {'w': 30, 'b': [10, 20]}

    Args:
        spec: a tree structure.
        leaves: as many leaves as ``spec`` has, in :func:`paths` order.

    Returns:
        The new tree.
    """
    return optree.tree_unflatten(spec, list(leaves))


def spec_paths(spec: TreeSpec) -> list[str]:
    """List the dotted paths of the leaves of a structure (see :func:`flatten_spec`).

    Example:
        >>> from fnllm import tree
        >>> tree.spec_paths(tree.flatten_spec({"w": 0, "b": [1, 2]})[1])
        ['b.0', 'b.1', 'w']

    Args:
        spec: a tree structure.

    Returns:
        One path a leaf, in leaf order.
    """
    return paths(optree.tree_unflatten(spec, [0] * spec.num_leaves))


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
        path = ".".join(str(p) for p in parts)
        if path in out:  # {1: a, "1": b}: two keys, one path
            raise ValueError(f"tree: two keys give the path {path!r} (an int and a str key?)")
        out[path] = leaf
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
    return _ops.listify(root, "")


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
            _ops.check_same_structure(tree, other)
    return _ops.map_leaves(fn, tree, rest, "" if with_path else None)


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


def cast(
    tree: Tree,
    dtype: torch.dtype,
    where: Filter | None = None,
    *,
    floating_only: bool = True,
    allow_integer: bool = False,
) -> Tree:
    """Cast the tensor leaves of a tree to ``dtype`` (a new tree; the input is unchanged).

    With ``where`` only the leaves it selects are cast: a bf16 frozen base with float32
    trainable leaves is ``tree.cast(params, torch.bfloat16, frozen_filter)`` (or cast the
    frozen half of :func:`partition`); the models, ``train.make_step`` and ``fit`` accept
    float32 leaves next to one 16-bit dtype.

    Example:
        >>> import torch
        >>> from fnllm import tree
        >>> t = tree.cast({"w": torch.zeros(2), "ids": torch.arange(2)}, torch.bfloat16)
        >>> t["w"].dtype, t["ids"].dtype
        (torch.bfloat16, torch.int64)
        >>> t = tree.cast({"w": torch.zeros(2), "ln": torch.ones(2)}, torch.bfloat16, "w")
        >>> t["w"].dtype, t["ln"].dtype
        (torch.bfloat16, torch.float32)

    Args:
        tree: a tree of tensors.
        dtype: the target dtype.
        where: which leaves to cast, as :func:`partition` takes it (a glob, a list of globs,
            a predicate); ``None``: every leaf.
        floating_only: leave integer and bool tensors as they are (the default).
        allow_integer: allow an integer or bool ``dtype``, which truncates every weight (most
            to 0); refused unless asked for.

    Returns:
        The cast tree. Leaves that already have ``dtype`` are returned as the same objects, and
        so are quantized weights (``io.quantize``), which keep their packed storage.

    Raises:
        TypeError: ``dtype`` is not a ``torch.dtype``.
        ValueError: ``dtype`` is an integer or bool dtype and ``allow_integer`` is False.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"tree.cast: dtype: expected a torch.dtype, got {dtype!r}")
    if not (dtype.is_floating_point or dtype.is_complex) and not allow_integer:
        raise ValueError(
            f"tree.cast: dtype {dtype} is not floating: casting weights to it truncates them "
            "(most to 0); pass allow_integer=True if that is meant"
        )

    def _cast(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or _quant.is_quantized(x):  # NF4/int8 stay packed
            return x
        if floating_only and not (x.is_floating_point() or x.is_complex()):
            return x
        return x.to(dtype)

    if where is None:
        return map(_cast, tree)
    picked, rest = partition(tree, where)
    return combine(map(_cast, picked), rest)


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
        _ops.check_same_structure(a, b, shapes=shapes)
    except ValueError:
        return False
    return True


def filter_fn(filter: Filter) -> Predicate:
    """Turn a filter (glob, list of globs or predicate) into a predicate ``(path, leaf) -> bool``.

    A glob selects a leaf when it matches the leaf's path or a dotted prefix (:func:`glob_match`).

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
        return filter
    else:
        raise TypeError(
            "tree filter: expected a glob string, a list of glob strings or a callable "
            f"(path, leaf) -> bool, got {type(filter).__name__}: {filter!r}"
        )

    def _match(path: str, leaf: Any) -> bool:
        del leaf
        return glob_match(path, globs)

    return _match


def glob_match(path: str, globs: str | Sequence[str]) -> bool:
    """Whether a glob (or any of ``globs``) matches ``path``: fnllm's one glob dialect.

    Every filter in fnllm uses it (:func:`partition`, optimizer masks, ``finetune.strategy``,
    LoRA targets): a glob matches a dotted path (of a leaf, or of a sub-tree such as a linear
    layer) when :func:`fnmatch.fnmatchcase` matches it against the path itself or against a
    prefix of it that ends at a dot boundary (``blocks.0.attn`` of ``blocks.0.attn.qkv.weight``,
    never ``blocks.0.at``). ``*`` matches any characters, dots included; ``?`` one character;
    ``[seq]`` a character class; case counts. So ``"head"`` matches ``head`` and everything
    under it, ``"*.bias"`` every bias, ``"blocks.1.*"`` all of block 1 (not ``blocks.10``).

    Example:
        >>> from fnllm import tree
        >>> tree.glob_match("blocks.1.attn.qkv.weight", "blocks.1")
        True
        >>> tree.glob_match("blocks.10.attn.qkv.weight", ["blocks.1", "blocks.1.*"])
        False
        >>> tree.glob_match("blocks.0.attn.qkv", "*.attn.qkv"), tree.glob_match("head", "hea")
        (True, False)
    """
    globs = (globs,) if isinstance(globs, str) else globs
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(fnmatch.fnmatchcase(p, g) for g in globs for p in prefixes)


def check_globs(
    globs: Sequence[str],
    paths: Sequence[str],
    *,
    where: str,
    what: str = "leaf",
    each: bool = True,
    hint: str = "",
) -> None:
    """The one "glob matches nothing" check: a ``ValueError`` naming a glob that matches
    none of ``paths`` (:func:`glob_match`), since a typo would silently select nothing.

    Example:
        >>> from fnllm import tree
        >>> tree.check_globs(["head"], ["head.weight"], where="demo")  # matches: no error
        >>> try:
        ...     tree.check_globs(["haed"], ["head.weight"], where="demo")
        ... except ValueError as err:
        ...     print(err)
        demo: glob 'haed' matches no leaf (paths: head.weight)

    Args:
        globs: the globs to check.
        paths: the paths they select among.
        where: the caller, first in the message; ``what``: what a path names (``"leaf"``).
        each: every glob must match (default); ``False``: at least one of them.
        hint: appended to the message (what to do instead).
    """
    paths = list(paths)
    shown = ", ".join(paths[:6]) + (" ..." if len(paths) > 6 else "")
    if each:
        for glob in globs:
            if not any(glob_match(p, glob) for p in paths):
                raise ValueError(f"{where}: glob {glob!r} matches no {what} (paths: {shown}){hint}")
    elif not any(glob_match(p, globs) for p in paths):
        raise ValueError(f"{where}: globs {list(globs)} match no {what} (paths: {shown}){hint}")


def partition(tree: Tree, filter: Filter, *, allow_unmatched: bool = False) -> tuple[Tree, Tree]:
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
        allow_unmatched: with a list of globs, every glob must select at least one leaf (a
            typo would otherwise silently freeze what was meant to train); True lifts that.

    Returns:
        ``(selected, rest)``.

    Raises:
        ValueError: a glob of a list matches no leaf (the message names it and a few paths);
            the filter selects a quantized weight (``io.quantize``), which can not train.
    """
    pred = filter_fn(filter)
    # glob matching is not traced: the check runs eagerly
    eager = not torch.compiler.is_compiling()
    if isinstance(filter, (list, tuple)) and not allow_unmatched and eager:
        hint = "; pass allow_unmatched=True if that is meant"
        check_globs(tuple(filter), paths(tree), where="tree.partition", hint=hint)
    check = getattr(filter, "check_matches", None)  # e.g. finetune.Strategy("lora")
    if callable(check) and not allow_unmatched and eager:
        check(tree)
    selected, rest = _ops.partition(tree, pred, "")
    if eager and "torchao" in sys.modules:  # only then can a leaf be quantized
        quantized = [p for p, x in flatten(selected).items() if _quant.is_quantized(x)]
        if quantized:
            raise ValueError(
                f"tree.partition: the filter selects quantized weights, which can not train "
                f"({', '.join(quantized[:4])}{' ...' if len(quantized) > 4 else ''}); "
                "train adapters on top (finetune.strategy('lora', model)) or io.dequantize first"
            )
    return selected, rest


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
        out = _ops.combine2(out, other, "")
    return out
