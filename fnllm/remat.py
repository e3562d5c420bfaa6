"""Activation checkpointing as a transform, like ``jax.checkpoint``: :func:`checkpoint` and
:func:`selected`.

``checkpoint(fn)`` is ``fn`` with the same values and gradients, whose intermediate values are
not kept for the backward pass: backward runs ``fn`` again from its inputs (with
``torch.func.vjp``) and differentiates that. Memory for the activations of ``fn`` drops to its
inputs and output; the price is one more forward of ``fn`` in the backward. Randomness is a
function of explicit keys (:mod:`fnllm.random`), so the recomputation draws the identical
dropout masks.

The models take it per call: ``model.apply(params, tokens, checkpoint=...)`` recomputes the
blocks that :func:`selected` picks (``True``: every block; ``k``: every ``k``-th; a set of
indices; ``None``/``False``: none).

How it composes (tested in ``tests/test_remat.py``):

- ``torch.autograd`` (the eager :func:`fnllm.train.make_step`), ``torch.func.grad``,
  ``torch.func.vjp`` and ``vmap`` of ``grad`` (:func:`fnllm.grads.per_example`): the
  transform is a ``torch.autograd.Function`` whose ``forward`` keeps only the inputs and whose
  ``backward`` recomputes; functorch runs it at each level and batches it
  (``generate_vmap_rule``). ``torch.utils.checkpoint`` cannot serve here: its saved-tensor
  hooks are refused inside ``torch.func.grad``.
- ``torch.compile`` of a forward whose backward autograd runs (``make_step(compile=
  {"regional": True})``, or ``torch.compile(loss)`` then ``loss.backward()``): the blocks go
  to ``torch.utils.checkpoint(use_reentrant=False)``, which Dynamo records and AOTAutograd
  honours when it splits forward from backward, so the memory saving holds (a 4-layer GPT:
  19.5 MB saved for backward without, 1.8 MB with ``checkpoint=True`` under inductor; same
  gradients).
- ``torch.compile`` of ``torch.func.grad`` (a whole compiled step, ``make_step(compile=True)``):
  **checkpointing saves no memory there.** torch 2.13 refuses ``torch.utils.checkpoint``
  under ``func.grad`` ("don't yet support saved tensor hooks"), and Dynamo inlines an
  ``autograd.Function``'s ``forward`` as plain code when it sees no input that requires grad
  (which is how ``func.grad``'s inputs look while it traces), so a recomputing ``forward``
  would silently lose its gradients. The blocks are traced as written (exact gradients, no
  graph break) and inductor decides what the one graph keeps alive.
- Quantized (NF4/int8) leaves among the arguments are frozen constants: they are not inputs
  of the ``autograd.Function`` (functorch would wrap them in plain tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch
from torch import Tensor

from fnllm import _quant, tree

__all__ = ["Policy", "checkpoint", "selected"]

F = TypeVar("F", bound=Callable[..., Any])
#: Which blocks to recompute: ``None``/``False`` none, ``True`` all, an int ``k`` every
#: ``k``-th (blocks ``0, k, 2k, ...``), or a collection of block indices.
Policy = bool | int | Collection[int] | None


def checkpoint(fn: F) -> F:
    """``fn`` recomputed in the backward pass instead of keeping its intermediate values.

    Arguments may be trees (dicts, lists, tuples, named tuples) of tensors and other values;
    the gradient reaches every floating tensor among them. ``fn`` must be a pure function of
    its arguments (randomness from keys passed in), and return one tensor.

    Example:
        >>> import torch
        >>> from fnllm import remat
        >>> def block(p, x):
        ...     return torch.tanh(x @ p["w"]) * 2
        >>> p, x = {"w": torch.randn(4, 4)}, torch.randn(3, 4)
        >>> g = torch.func.grad(lambda p: block(p, x).square().sum())(p)
        >>> g_remat = torch.func.grad(lambda p: remat.checkpoint(block)(p, x).square().sum())(p)
        >>> torch.allclose(g["w"], g_remat["w"])
        True

    Args:
        fn: a pure function returning a tensor.

    Returns:
        A function with the same signature, values and gradients.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # see the module docstring
            if torch._C._are_functorch_transforms_active():  # a whole-step compile
                return fn(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        leaves, spec = tree.flatten_spec((args, kwargs))
        # quantized (NF4/int8) leaves are frozen constants: kept out of the function's
        # inputs, where functorch would wrap them in plain tensors and lose their type
        where = [
            i for i, x in enumerate(leaves) if isinstance(x, Tensor) and not _quant.is_quantized(x)
        ]
        tensors = [leaves[i] for i in where]

        def call(*ts: Tensor) -> Tensor:
            full = list(leaves)
            for i, t in zip(where, ts):
                full[i] = t
            a, kw = tree.unflatten_spec(spec, full)
            out = fn(*a, **kw)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"remat.checkpoint: {getattr(fn, '__name__', 'fn')} must return one "
                    f"tensor, got {type(out).__name__}"
                )
            return out

        return _Recompute.apply(call, *tensors)

    return wrapped  # type: ignore[return-value]


def selected(policy: Policy, n: int) -> tuple[bool, ...]:
    """Which of ``n`` blocks a checkpoint policy recomputes.

    Example:
        >>> from fnllm import remat
        >>> remat.selected(True, 4), remat.selected(2, 4), remat.selected({1}, 3)
        ((True, True, True, True), (True, False, True, False), (False, True, False))
        >>> remat.selected(None, 2)
        (False, False)

    Args:
        policy: ``None``/``False`` (none), ``True`` (every block), an int ``k >= 1`` (every
            ``k``-th block: ``0, k, 2k, ...``) or a collection of block indices in ``[0, n)``.
        n: the number of blocks.

    Returns:
        One bool per block.

    Raises:
        TypeError: ``policy`` is none of these. ValueError: ``k < 1`` or an index out of range.
    """
    if policy is None or policy is False:
        return (False,) * n
    if policy is True:
        return (True,) * n
    if isinstance(policy, int):
        if policy < 1:
            raise ValueError(f"checkpoint: every k-th block needs k >= 1, got {policy}")
        return tuple(i % policy == 0 for i in range(n))
    if isinstance(policy, Collection) and not isinstance(policy, (str, bytes, Tensor)):
        picked = set()
        for i in policy:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"checkpoint: block indices must be ints, got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"checkpoint: block index {i} is not in [0, {n})")
            picked.add(i)
        return tuple(i in picked for i in range(n))
    raise TypeError(
        "checkpoint: expected None, a bool, an int k (every k-th block) or a collection of "
        f"block indices, got {policy!r}"
    )


class _Recompute(torch.autograd.Function):
    """``call(*tensors)``, keeping only the inputs; backward recomputes with ``func.vjp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(call: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        return call(*tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        wanted = [
            i
            for i, t in enumerate(saved)
            if ctx.needs_input_grad[i + 1] and (t.is_floating_point() or t.is_complex())
        ]

        def partial(*ts: Tensor) -> Tensor:
            full = list(saved)
            for i, t in zip(wanted, ts):
                full[i] = t
            return ctx.call(*full)

        grads: list[Tensor | None] = [None] * len(saved)
        if not wanted:
            return (None, *grads)
        if torch._C._are_functorch_transforms_active():  # inside func.grad / vmap
            # func.grad runs backward with create_graph=True: recorded, the recomputation
            # would stay alive to the end of the backward. The transform is differentiable
            # once (as torch.utils.checkpoint); func.vjp ignores the outer no_grad.
            with torch.no_grad():
                vjp = torch.func.vjp(partial, *(saved[i] for i in wanted))[1]
                found = vjp(grad)
        else:  # plain autograd: the same recomputation, less overhead
            inputs = [saved[i].detach().requires_grad_() for i in wanted]
            with torch.enable_grad():
                out = partial(*inputs)
            found = torch.autograd.grad(out, inputs, grad, allow_unused=True)
            found = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs))
        for i, g in zip(wanted, found):
            grads[i] = g
        return (None, *grads)
