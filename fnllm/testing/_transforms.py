"""Assertions about functions: per-example gradients, key determinism, compilation, variants."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from fnllm import grads, random, tree
from fnllm.testing._assert import (
    _difference,
    assert_same_structure,
    assert_trees_close,
    assert_trees_equal,
)


def assert_per_example_grads(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    params: Any,
    batch: Any,
    *,
    per_example_grads: Any = None,
    rtol: float | None = 1e-4,
    atol: float | None = 1e-5,
) -> None:
    """Assert per-example gradients equal a loop of single-example gradients.

    The reference differentiates ``loss_fn(params, example_i)`` for each example alone (every
    tensor leaf of ``batch`` sliced to ``[i : i + 1]``) with ``torch.func.grad``.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> loss_fn = lambda p, x: ((x @ p["w"]) ** 2).mean()
        >>> params, x = {"w": torch.ones(2)}, torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> testing.assert_per_example_grads(loss_fn, params, x)
        >>> testing.assert_per_example_grads(loss_fn, params, x,
        ...                                  per_example_grads={"w": torch.zeros(2, 2)})
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        AssertionError: per-example gradient of example 0: trees differ at w: 1 of 2 elements
            not close (rtol=0.0001, atol=1e-05); worst at [0]: 0.0 vs 2.0 (abs diff 2)

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, averaging over the batch.
        params: the differentiated parameter tree.
        batch: a tree whose tensor leaves share a leading batch dimension.
        per_example_grads: the gradients under test, leaves ``[B, ...]``; default
            :func:`fnllm.grads.per_example` of ``loss_fn``.
        rtol: relative tolerance (``None``: per dtype).
        atol: absolute tolerance (``None``: per dtype).

    Raises:
        AssertionError: naming the example, the parameter path and the values.
    """
    size = _batch_size(batch)
    if per_example_grads is None:
        per_example_grads = grads.per_example(loss_fn)(params, batch)
    stacked_like = tree.map(lambda x: x.expand(size, *x.shape), params)
    try:
        assert_same_structure(per_example_grads, stacked_like)
    except AssertionError as err:
        raise AssertionError(f"per-example gradients vs params with batch {size}: {err}") from None
    single = torch.func.grad(loss_fn)
    for i in range(size):
        example = tree.map(lambda x, i=i: _slice(x, i), batch)
        want = single(params, example)
        got = tree.map(lambda g, i=i: g[i], per_example_grads)
        try:
            assert_trees_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(f"per-example gradient of example {i}: {err}") from None


def assert_deterministic(
    fn: Callable[..., Any], key: torch.Tensor, *args: Any, **kwargs: Any
) -> None:
    """Assert ``fn(key, *args)`` gives the same result twice, and a different one for another key.

    The other key is ``random.fold_in(key, 1)``. A function that ignores its key, or draws from
    torch's global generator, fails.

    Example:
        >>> import torch
        >>> from fnllm import random, testing
        >>> testing.assert_deterministic(lambda k, n: random.normal(k, (n,)), random.key(0), 3)
        >>> testing.assert_deterministic(lambda k, n: torch.zeros(n), random.key(0), 3)
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        AssertionError: result does not change with the key: every leaf is equal for key [0, 0]
            and for key [928981903, 3453687069] (leaves: <root>)

    Args:
        fn: ``fn(key, *args, **kwargs) -> tree``.
        key: a ``fnllm.random`` key.
        *args: further positional arguments.
        **kwargs: keyword arguments.

    Raises:
        AssertionError: naming the leaf that differs between two calls with the same key, or
            saying that no leaf changes with the key.
    """
    first = fn(key, *args, **kwargs)
    second = fn(key.clone(), *args, **kwargs)
    try:
        assert_trees_equal(second, first)
    except AssertionError as err:
        raise AssertionError(f"not deterministic for key {key.tolist()}: {err}") from None
    other_key = random.fold_in(key, 1)
    other = fn(other_key, *args, **kwargs)
    flat_other, flat_first = tree.flatten(other), tree.flatten(first)
    if flat_other.keys() == flat_first.keys() and all(
        not _leaf_differs(flat_other[p], flat_first[p]) for p in flat_first
    ):
        names = ", ".join(flat_first) or "<root>"
        raise AssertionError(
            f"result does not change with the key: every leaf is equal for key {key.tolist()} "
            f"and for key {other_key.tolist()} (leaves: {names})"
        )


def assert_compiles(fn: Callable[..., Any], *calls: Sequence[Any], backend: str = "eager") -> None:
    """Assert ``fn`` compiles with zero graph breaks and does not recompile across calls.

    ``fn`` is traced by TorchDynamo (``torch._dynamo.explain``) on the first argument tuple,
    then compiled once and called on every tuple: calls with the same shapes must reuse the
    first graph. Dynamo's caches are reset first. The default ``"eager"`` backend checks the
    tracing only (fast); pass ``"inductor"`` to also generate code.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> testing.assert_compiles(lambda x: x.sin() * 2, (torch.ones(3),), (torch.zeros(3),))
        >>> def relu_or_not(x):
        ...     return x.relu() if x.sum() > 0 else x   # branches on a tensor's value
        >>> testing.assert_compiles(relu_or_not, (torch.ones(3),))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        AssertionError: relu_or_not: 1 graph break(s): generic_jump TensorVariable() at ...

    Args:
        fn: the function under test.
        *calls: argument tuples, one per call (at least one).
        backend: the ``torch.compile`` backend.

    Raises:
        AssertionError: naming the graph-break reasons, or the call that recompiled.
    """
    if not calls:
        raise ValueError("assert_compiles: give at least one argument tuple")
    name = getattr(fn, "__name__", repr(fn))
    torch._dynamo.reset()  # fresh caches: earlier compiles of fn must not count
    explanation = torch._dynamo.explain(fn)(*calls[0])
    if explanation.graph_break_count:
        reasons = "; ".join(_reason(r) for r in explanation.break_reasons)
        raise AssertionError(f"{name}: {explanation.graph_break_count} graph break(s): {reasons}")
    counter = _CompileCounter(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for i, args in enumerate(calls):
        try:
            compiled(*args)
        except torch._dynamo.exc.Unsupported as err:
            summary = " ".join(str(err).split("Developer debug context")[0].split())
            raise AssertionError(
                f"{name}: does not compile with fullgraph=True on call {i}: {summary}"
            ) from None
        if counter.graphs == 0:
            raise AssertionError(f"{name}: call {i} ran without compiling (recompile limit hit?)")
        if counter.graphs > 1:
            raise AssertionError(
                f"{name}: recompiled on call {i} ({counter.graphs} graphs); shapes "
                f"{_shapes(args)} vs first call {_shapes(calls[0])} "
                "(TORCH_LOGS=recompiles shows the failing guard)"
            )


def assert_transforms_agree(
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "eager",
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert ``fn`` gives the same result eager, compiled, and under ``vmap`` over axis 0.

    ``fn`` must accept a batch (leading axis of every tensor argument) and one example alike,
    as fnllm's ``apply`` functions do: ``vmap(fn)(*args)`` then runs ``fn`` on each example.
    Like chex's variants, one assertion covers the transforms a pure function must survive.

    Example:
        >>> import torch
        >>> from fnllm import testing
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> testing.assert_transforms_agree(lambda x: x.softmax(-1), x)
        >>> testing.assert_transforms_agree(lambda x: x - x.mean(), x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        AssertionError: vmap differs from eager: trees differ at <root>: 6 of 6 elements ...

    Args:
        fn: the function under test, returning a tree of tensors.
        *args: its arguments; tensor leaves are batched along axis 0.
        backend: the ``torch.compile`` backend (``"inductor"`` generates code; slower).
        rtol: relative tolerance (``None``: per dtype).
        atol: absolute tolerance (``None``: per dtype).

    Raises:
        AssertionError: naming the variant, the path and the values.
    """
    eager = fn(*args)
    torch._dynamo.reset()  # fresh caches: no recompile limit reached by earlier calls
    variants = {
        "compiled": lambda: torch.compile(fn, backend=backend, fullgraph=True)(*args),
        "vmap": lambda: torch.func.vmap(fn)(*args),
    }
    for name, run in variants.items():
        try:
            assert_trees_close(run(), eager, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(f"{name} differs from eager: {err}") from None


# ----------------------------------------------------------------------------- helpers


class _CompileCounter:
    """A ``torch.compile`` backend that counts the graphs it is handed, then delegates."""

    def __init__(self, backend: str) -> None:
        self.graphs = 0
        self.backend = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return self.backend(gm, example_inputs)


def _reason(r: Any) -> str:
    stack = getattr(r, "user_stack", None) or []
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    return f"{r.reason}{where}"


def _batch_size(batch: Any) -> int:
    sizes = {
        path: x.shape[0] if x.dim() else None
        for path, x in tree.flatten(batch).items()
        if isinstance(x, torch.Tensor)
    }
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            f"assert_per_example_grads: batch leaves need one shared leading dimension, got "
            f"{ {p: s for p, s in sizes.items()} }"
        )
    return cast(int, next(iter(sizes.values())))  # None refused above


def _slice(x: Any, i: int) -> Any:
    return x[i : i + 1] if isinstance(x, torch.Tensor) else x


def _leaf_differs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return bool(_difference(a, b))
    return a != b


def _shapes(args: Sequence[Any]) -> list[Any]:
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in args]
