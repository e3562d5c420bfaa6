"""Hypothesis strategies for keys, tensors, parameter trees and tree filters."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from hypothesis import assume
from hypothesis import strategies as st

from fnllm import random, tree

ShapeLike = Sequence[int] | st.SearchStrategy
DtypeLike = torch.dtype | Sequence[torch.dtype] | st.SearchStrategy

# Dict keys of drawn trees: identifiers without dots (a dot would make paths ambiguous), never
# digits (they would read like list indexes), drawn as a permutation (distinct, no retries).
_KEY_POOL = ("w", "b", "weight", "bias", "embed", "blocks", "attn", "mlp", "ln_f", "head", "qkv")
_WIDTH: dict[torch.dtype, Literal[16, 32, 64]] = {
    torch.float16: 16,
    torch.float32: 32,
    torch.float64: 64,
    torch.bfloat16: 32,
}


def keys() -> st.SearchStrategy[torch.Tensor]:
    """Draw ``fnllm.random`` keys (from any 32-bit seed; shrinks towards ``key(0)``).

    Example:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from fnllm import random, testing
        >>> @settings(max_examples=5)
        ... @given(testing.keys(), testing.keys())
        ... def test_split_is_a_function_of_the_key(a, b):
        ...     assert random.split(a).shape == (2, 2)
        ...     assert torch.equal(random.split(a), random.split(b)) == torch.equal(a, b)
        >>> test_split_is_a_function_of_the_key()

    Returns:
        A strategy of int64 keys of shape ``(2,)``.
    """
    return st.integers(0, 2**32 - 1).map(random.key)


def shapes(
    *, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4
) -> st.SearchStrategy[tuple[int, ...]]:
    """Draw tensor shapes.

    Example:
        >>> from hypothesis import find
        >>> from fnllm import testing
        >>> find(testing.shapes(min_dims=2), lambda s: True)
        (1, 1)

    Args:
        min_dims: fewest dimensions.
        max_dims: most dimensions.
        min_side: smallest size of a dimension (0 allows empty tensors).
        max_side: largest size of a dimension.

    Returns:
        A strategy of shape tuples.
    """
    _check_range("shapes: dims", min_dims, max_dims, low=0)
    _check_range("shapes: side", min_side, max_side, low=0)
    side = st.integers(min_side, max_side)
    return st.lists(side, min_size=min_dims, max_size=max_dims).map(tuple)


def tensors(
    shape: ShapeLike | None = None,
    dtype: DtypeLike = torch.float32,
    *,
    min_value: float = -10.0,
    max_value: float = 10.0,
) -> st.SearchStrategy[torch.Tensor]:
    """Draw tensors of chosen shapes and dtypes whose every element hypothesis picks (and shrinks).

    Floating values are finite and lie in ``[min_value, max_value]``; integer values too (clipped
    to the dtype's range); ``torch.bool`` elements are ``True``/``False``.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from fnllm import testing
        >>> find(testing.tensors((2, 3)), lambda x: bool((x > 1).any()))
        tensor([[0., 0., 0.],
                [0., 0., 2.]])

    Args:
        shape: a shape tuple, a strategy of shapes, or ``None`` for :func:`shapes` defaults.
        dtype: a dtype, a sequence of dtypes to choose from, or a strategy of dtypes.
        min_value: smallest element value.
        max_value: largest element value.

    Returns:
        A strategy of CPU tensors.
    """
    if not min_value <= max_value:
        raise ValueError(f"tensors: min_value {min_value} > max_value {max_value}")
    shape_st = _as_strategy(shapes() if shape is None else shape, "shape")
    dtype_st = _dtype_strategy(dtype)

    @st.composite
    def _draw(draw: st.DrawFn) -> torch.Tensor:
        s = tuple(draw(shape_st))
        dt = draw(dtype_st)
        n = math.prod(s)
        values = draw(st.lists(_elements(dt, min_value, max_value), min_size=n, max_size=n))
        return (
            torch.tensor(values, dtype=torch.float64 if dt.is_floating_point else None)
            .to(dt)
            .reshape(s)
        )

    return _draw()


def trees(
    leaves: st.SearchStrategy | None = None,
    *,
    max_leaves: int = 8,
    min_leaves: int = 1,
    tuples: bool = False,
    root: str = "dict",
    empty: bool = False,
    names: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[Any]:
    """Draw parameter trees: a dict at the root, nested dicts and lists, tensor leaves.

    The tree is built around exactly the drawn leaves (no rejection sampling), so it shrinks
    towards fewer leaves and shallower nesting. Dict keys are parameter-like names (no dots,
    never digits), so every leaf has an unambiguous dotted path as in
    :func:`fnllm.tree.paths`. A tree with no leaves is an empty dict.

    For code that must take any tree (a checkpoint writer, a tree utility), ``root="any"``
    also draws a bare leaf or a list/tuple at the root, ``empty=True`` adds empty dicts,
    lists (and tuples) as subtrees, and ``names`` draws the dict keys (say, with digits).

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing, tree
        >>> @settings(max_examples=10)
        ... @given(testing.trees(testing.tensors(dtype=[torch.float32, torch.int64])))
        ... def test_flatten_round_trips(params):
        ...     assert tree.paths(tree.unflatten(tree.flatten(params))) == tree.paths(params)
        >>> test_flatten_round_trips()

    Args:
        leaves: strategy of leaves; default small float32 :func:`tensors`.
        max_leaves: most leaves in a tree.
        min_leaves: fewest leaves.
        tuples: also draw tuple containers.
        root: ``"dict"`` (a dict at the root) or ``"any"`` (also a list, a tuple or a leaf).
        empty: also draw empty containers as subtrees (and as the root of a leafless tree).
        names: strategy of dict keys; default parameter-like names. Keys of one dict are
            distinct; a strategy with fewer than 3 distinct values fails to draw.

    Returns:
        A strategy of trees.
    """
    _check_range("trees: leaves", min_leaves, max_leaves, low=0)
    if root not in ("dict", "any"):
        raise ValueError(f"trees: root {root!r} is not 'dict' or 'any'")
    if names is not None and not isinstance(names, st.SearchStrategy):
        raise TypeError(f"trees: names must be a strategy of str, got {names!r}")
    leaf = tensors() if leaves is None else leaves
    kinds = ["dict", "list", "tuple"] if tuples else ["dict", "list"]
    shape = _Shape(kinds, root == "any", empty, names)

    @st.composite
    def _draw(draw: st.DrawFn) -> Any:
        n = draw(st.integers(min_leaves, max_leaves))
        drawn = draw(st.lists(leaf, min_size=n, max_size=n))
        return _nest(draw, drawn, shape, root=True)

    return _draw()


def trees_like(
    template: Any, *, min_value: float = -10.0, max_value: float = 10.0
) -> st.SearchStrategy[Any]:
    """Draw trees with the structure, shapes and dtypes of ``template`` and new values.

    Handy for gradients or updates shaped like a model's parameters.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from fnllm import testing
        >>> find(testing.trees_like({"w": torch.ones(2), "n": [torch.ones(1, dtype=torch.int64)]}),
        ...      lambda t: True)
        {'w': tensor([0., 0.]), 'n': [tensor([0])]}

    Args:
        template: a tree with tensor leaves.
        min_value: smallest element value.
        max_value: largest element value.

    Returns:
        A strategy of trees.
    """
    flat = tree.flatten(template)
    for path, leaf in flat.items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"trees_like: leaf {path} is {type(leaf).__name__}, not a tensor")
    parts = {
        path: tensors(tuple(x.shape), x.dtype, min_value=min_value, max_value=max_value)
        for path, x in flat.items()
    }
    return st.fixed_dictionaries(parts).map(
        lambda drawn: tree.map(lambda path, _: drawn[path], template, with_path=True)
    )


def filters(params: Any, *, kind: str = "any", proper: bool = False) -> st.SearchStrategy[Any]:
    """Draw a filter (a list of globs or a predicate) that selects at least one leaf of ``params``.

    Globs are built from real paths (a prefix, possibly with one part replaced by ``*``), so
    they look like the filters people write (``"blocks.*.attn"``). Use with ``st.data()`` or
    ``flatmap`` to pair a drawn tree with its filter.

    Example:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from fnllm import testing, tree
        >>> params = {"blocks": [{"w": torch.ones(2)}, {"w": torch.ones(2)}], "head": torch.ones(1)}
        >>> @settings(max_examples=20)
        ... @given(testing.filters(params, proper=True))
        ... def test_partition_splits(f):
        ...     trainable, frozen = tree.partition(params, f)
        ...     assert 0 < tree.count(trainable) < tree.count(params)
        >>> test_partition_splits()

    Args:
        params: the tree the filter is for; it needs at least one leaf (two if ``proper``).
        kind: ``"globs"``, ``"predicate"`` or ``"any"`` (either).
        proper: also leave at least one leaf unselected.

    Returns:
        A strategy of filters accepted by :func:`fnllm.tree.partition`.
    """
    if kind not in ("any", "globs", "predicate"):
        raise ValueError(f"filters: kind {kind!r} is not 'any', 'globs' or 'predicate'")
    paths = tree.paths(params)
    if len(paths) < (2 if proper else 1):
        raise ValueError(
            f"filters: params has {len(paths)} leaves, need {'2 for proper=True' if proper else 1}"
        )

    @st.composite
    def _draw(draw: st.DrawFn) -> Any:
        left_out = draw(st.sampled_from(paths)) if proper else None
        candidates = [p for p in paths if p != left_out]
        chosen = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
        style = draw(st.sampled_from(["globs", "predicate"])) if kind == "any" else kind
        if style == "predicate":
            return _PathSet(chosen)
        globs = []
        for p in chosen:
            g = draw(_glob_for(p))
            # a proper filter must miss ``left_out``: fall back to the exact path if g hits it
            globs.append(p if left_out and tree.filter_fn(g)(left_out, None) else g)
        return globs

    def _leaves_something_out(f: Any) -> Any:
        keep = tree.filter_fn(f)
        assume(not all(keep(p, x) for p, x in tree.flatten(params).items()))
        return f

    return _draw().map(_leaves_something_out) if proper else _draw()


# ----------------------------------------------------------------------------- helpers


class _PathSet:
    """A predicate ``(path, leaf) -> bool`` selecting a fixed set of paths (readable repr)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = frozenset(paths)

    def __call__(self, path: str, leaf: Any) -> bool:
        del leaf
        return path in self.paths

    def __repr__(self) -> str:
        return f"lambda path, leaf: path in {sorted(self.paths)!r}"


class _Shape:
    """How :func:`trees` nests its leaves: container kinds, root kind, empties, key names."""

    def __init__(
        self, kinds: list[str], any_root: bool, empty: bool, names: st.SearchStrategy | None
    ) -> None:
        self.kinds, self.any_root, self.empty, self.names = kinds, any_root, empty, names

    def empty_container(self, draw: st.DrawFn) -> Any:
        return {"dict": {}, "list": [], "tuple": ()}[draw(st.sampled_from(self.kinds))]

    def keys(self, draw: st.DrawFn, n: int) -> list[str]:
        if self.names is None:
            return list(draw(st.permutations(_KEY_POOL)))[:n]
        return draw(st.lists(self.names, min_size=n, max_size=n, unique=True))


def _nest(
    draw: st.DrawFn, leaves: list[Any], shape: _Shape, *, root: bool = False, depth: int = 0
) -> Any:
    """Arrange ``leaves`` (in order) into a random nesting of dicts, lists and tuples."""
    if len(leaves) == 1 and (not root or shape.any_root) and (depth >= 4 or draw(st.booleans())):
        return leaves[0]
    if not leaves:
        if root and shape.any_root and shape.empty:
            return shape.empty_container(draw)
        return {}
    kind = "dict" if root and not shape.any_root else draw(st.sampled_from(shape.kinds))
    # below depth 2 a container splits its leaves, so nesting ends
    fewest = 2 if depth >= 2 and len(leaves) > 1 else 1
    k = draw(st.integers(fewest, min(len(leaves), 3)))
    cuts: list[int] = []
    if k > 1:
        between = st.integers(1, len(leaves) - 1)
        cuts = sorted(draw(st.sets(between, min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, len(leaves)]
    children = [
        _nest(draw, leaves[a:b], shape, depth=depth + 1) for a, b in itertools.pairwise(bounds)
    ]
    if shape.empty and depth < 4 and draw(st.booleans()):
        children.insert(draw(st.integers(0, len(children))), shape.empty_container(draw))
    if kind == "dict":
        return dict(zip(shape.keys(draw, len(children)), children))
    return children if kind == "list" else tuple(children)


def _glob_for(path: str) -> st.SearchStrategy[str]:
    """Globs matching ``path``: one of its dotted prefixes, maybe with one part as ``*``."""
    parts = path.split(".")

    @st.composite
    def _draw(draw: st.DrawFn) -> str:
        n = draw(st.integers(1, len(parts)))
        prefix = list(parts[:n])
        if draw(st.booleans()):
            prefix[draw(st.integers(0, n - 1))] = "*"
        return ".".join(prefix)

    return _draw()


def _elements(dtype: torch.dtype, lo: float, hi: float) -> st.SearchStrategy:
    if dtype == torch.bool:
        return st.booleans()
    if dtype.is_floating_point:
        width = _WIDTH.get(dtype)
        if width is None:
            raise TypeError(f"tensors: unsupported floating dtype {dtype}")
        if width < 64:  # bounds must be representable at that width
            lo, hi = float(torch.tensor(lo, dtype=dtype)), float(torch.tensor(hi, dtype=dtype))
            lo, hi = min(lo, hi), max(lo, hi)
        return st.floats(lo, hi, width=width, allow_nan=False, allow_infinity=False)
    if dtype.is_complex:
        raise TypeError(f"tensors: unsupported dtype {dtype}")
    info = torch.iinfo(dtype)
    return st.integers(max(info.min, math.ceil(lo)), min(info.max, math.floor(hi)))


def _as_strategy(value: Any, name: str) -> st.SearchStrategy:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and v >= 0 for v in value):
        return st.just(tuple(value))
    raise TypeError(f"tensors: {name} must be a tuple of ints >= 0 or a strategy, got {value!r}")


def _dtype_strategy(dtype: DtypeLike) -> st.SearchStrategy:
    if isinstance(dtype, st.SearchStrategy):
        return dtype
    if isinstance(dtype, torch.dtype):
        return st.just(dtype)
    options = list(dtype)
    if not options or not all(isinstance(d, torch.dtype) for d in options):
        raise TypeError(
            f"tensors: dtype must be a torch.dtype, a list of them or a strategy, got {dtype!r}"
        )
    return st.sampled_from(options)


def _check_range(name: str, low_value: int, high_value: int, *, low: int) -> None:
    if not low <= low_value <= high_value:
        raise ValueError(f"{name}: need {low} <= min {low_value} <= max {high_value}")
