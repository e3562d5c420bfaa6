"""Gradient transforms: per-example gradients, per-example clipping, DP-SGD noise, accumulation.

All of them work on loss functions of parameter trees, written for a *batch*, e.g.
``loss_fn(trainable, frozen, batch) -> scalar``. Only the argument(s) named by ``argnums``
are differentiated, so with a partition (``trainable, frozen = tree.partition(params, f)``)
gradients exist for the trainable leaves only and autograd never runs through frozen layers
below the lowest trainable one.

:func:`per_example` is ``vmap(grad(loss_fn))`` over the batch. Each example is handed to
``loss_fn`` as a batch of one (its batch dimension kept, size 1), so the very loss used for
training gives the per-example gradients. The batched argument is the last positional one
unless ``in_dims`` says otherwise (``in_dims`` follows :func:`torch.func.vmap`).

A quantized frozen base (:func:`fnllm.io.quantize`: torchao NF4/int8 leaves) works in every
transform here: its leaves reach ``loss_fn`` as they are, as if closed over, because
``torch.func.grad`` would otherwise wrap them in a plain tensor that has lost the quantized type.
They must sit in a frozen, unbatched argument (a named ValueError says so otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from fnllm import _checks, _quant, _tree_ops, tree
from fnllm import random as jr

__all__ = [
    "accumulate",
    "clip_per_example",
    "per_example",
    "per_example_norm",
    "privatize",
]

InDims = int | None | Sequence[Any]
Argnums = int | tuple[int, ...]

_CLIP_EPS = 1e-6  # added to a norm before dividing, as Opacus does


def per_example(
    loss_fn: Callable[..., Any],
    *,
    argnums: Argnums = 0,
    in_dims: InDims | None = None,
    chunk_size: int | None = None,
    has_aux: bool = False,
    keep_batch_dim: bool = True,
) -> Callable[..., Any]:
    """Turn a batch loss into a function returning one gradient per example.

    The result is ``vmap(grad(loss_fn), in_dims)``: every example's gradient is computed
    independently, so a loss that averages over the batch gives, for example ``i``, the gradient
    of the loss on example ``i`` alone. Leaves of the returned tree carry a leading batch
    dimension. With a frozen/trainable partition, pass only ``trainable`` as the differentiated
    argument: frozen leaves get no gradient and cost no backward work.

    The result holds ``B`` times the differentiated parameters. Wrapped in ``torch.compile``
    (it traces with ``fullgraph=True``) it runs close to one batched backward and needs the
    least memory; in eager mode, ``chunk_size`` bounds the memory of the intermediates.

    Example:
        >>> import torch
        >>> from fnllm import grads
        >>> def loss_fn(params, x):              # x: [B, 2]; mean over the batch
        ...     return ((x @ params["w"]) ** 2).mean()
        >>> params = {"w": torch.ones(2)}
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> g = grads.per_example(loss_fn)(params, x)
        >>> g["w"]                                # d/dw (x_i . w)^2 = 2 (x_i . w) x_i
        tensor([[2., 0.],
                [0., 8.],
                [4., 4.]])

    Args:
        loss_fn: ``loss_fn(*args) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``), written
            for a batch.
        argnums: which positional argument(s) to differentiate (trees of tensors). A tuple gives
            a tuple of gradient trees.
        in_dims: as in :func:`torch.func.vmap`: one entry per positional argument (an int, None,
            or a tree prefix of the argument), saying which dimension holds the batch. Default:
            the last positional argument is batched along dimension 0, all others are shared.
        chunk_size: compute at most this many examples at a time, writing each chunk into the
            preallocated result (bounds the memory of the intermediates; same result). None
            processes the whole batch at once.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is returned per example.
        keep_batch_dim: hand each example to ``loss_fn`` as a batch of one (the batch dimension
            kept with size 1). False hands the example without it.

    Returns:
        A function of the same arguments as ``loss_fn`` returning the per-example gradient
        tree(s), each leaf shaped ``[B, *leaf.shape]`` (and the per-example ``aux`` with
        ``has_aux``).

    Raises:
        ValueError: ``in_dims`` has the wrong length, no argument is batched, ``chunk_size`` is
            not positive, or a differentiated argument holds no tensor (e.g. a partition filter
            that matched nothing).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_example: chunk_size must be >= 1, got {chunk_size}")

    def per_ex(*args: Any) -> Any:
        dims = _resolve_in_dims(in_dims, len(args), "per_example")
        _check_differentiated(args, argnums, "per_example")
        args = _hold_quantized(args, dims, argnums, "per_example")

        def single(*example: Any) -> Any:
            if keep_batch_dim:
                example = tuple(_unsqueeze(a, d) for a, d in zip(example, dims))
            return loss_fn(*_release(example))

        batched = torch.func.vmap(
            torch.func.grad(single, argnums=argnums, has_aux=has_aux), in_dims=dims
        )
        size = _batch_size(args, dims, "per_example")
        if chunk_size is None or chunk_size >= size:
            return batched(*args)
        # Chunks write into one preallocated result (vmap's own chunk_size concatenates the
        # chunks at the end, which holds the result twice).
        out: Any = None
        for start in range(0, size, chunk_size):
            n = min(chunk_size, size - start)
            part = batched(*(_narrow(a, d, start, n) for a, d in zip(args, dims)))
            if out is None:
                out = tree.map(lambda r: r.new_empty((size, *r.shape[1:])), part)
            tree.map(lambda o, r, start=start, n=n: o[start : start + n].copy_(r), out, part)
            del part
        return out

    return per_ex


def per_example_norm(grads: Any) -> torch.Tensor:
    """Compute each example's gradient norm over all leaves of a per-example gradient tree.

    Example:
        >>> import torch
        >>> from fnllm import grads
        >>> g = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0, 0.0], [1.0, 0.0]])}
        >>> grads.per_example_norm(g)
        tensor([5., 1.])

    Args:
        grads: a tree whose leaves share a leading batch dimension (as :func:`per_example`
            returns).

    Returns:
        A float32 tensor ``[B]``: the global L2 norm of every example's gradient.

    Raises:
        ValueError: the tree has no tensor leaves or the leading dimensions differ.
    """
    leaves = _tensor_leaves(grads, "per_example_norm")
    sq = [g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in leaves]
    return torch.stack(sq).sum(0).sqrt()


def clip_per_example(grads: Any, max_norm: float) -> Any:
    """Scale each example's gradient so its global norm (over all leaves) is at most ``max_norm``.

    Examples whose norm is already below ``max_norm`` are left unchanged; the others are scaled
    by ``max_norm / (norm + 1e-6)``, as in DP-SGD (Abadi et al. 2016) and Opacus.

    Example:
        >>> import torch
        >>> from fnllm import grads
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}    # norms 5 and 0.5
        >>> grads.per_example_norm(grads.clip_per_example(g, 1.0))
        tensor([1.0000, 0.5000])

    Args:
        grads: a per-example gradient tree (leading batch dimension on every leaf).
        max_norm: the bound, > 0.

    Returns:
        The clipped tree (same structure, shapes and dtypes; the input is not modified).

    Raises:
        TypeError: ``max_norm`` is not a Python number (a tensor, a string, a bool).
        ValueError: ``max_norm`` is not a finite positive number, or the tree is not a
            per-example tree.
    """
    max_norm = _checks.check_number("clip_per_example: max_norm", max_norm, positive=True)
    norms = per_example_norm(grads)
    factor = (max_norm / (norms + _CLIP_EPS)).clamp(max=1.0)

    def _scale(g: Any) -> Any:
        if not isinstance(g, torch.Tensor):
            return g
        f = factor.to(g.dtype).reshape((-1,) + (1,) * (g.dim() - 1))
        return g * f

    return tree.map(_scale, grads)


def privatize(
    key: torch.Tensor,
    grads: Any,
    *,
    clip: float,
    noise_multiplier: float,
    reduction: Literal["mean", "sum"] = "mean",
) -> Any:
    """DP-SGD: clip every example's gradient, sum over the batch and add Gaussian noise.

    Computes ``sum_i clip_i(g_i) + N(0, (clip * noise_multiplier)^2)`` independently for every
    scalar of every leaf (one key per leaf, split from ``key``). With ``reduction="mean"`` the
    noisy sum is divided by the batch size ``B`` (the leading dimension), which is what a
    mean-reduced loss expects; with ``"sum"`` it is returned as is. The noise is drawn with
    :func:`fnllm.random.normal` in float32 and cast to each leaf's dtype, so the same key gives
    the same noise. ``noise_multiplier=0`` gives exactly the clipped sum (or mean).

    Example:
        >>> import torch
        >>> from fnllm import grads, random
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> grads.privatize(random.key(0), g, clip=1.0, noise_multiplier=0.0, reduction="sum")
        {'w': tensor([0.9000, 1.2000])}
        >>> noisy = grads.privatize(random.key(0), g, clip=1.0, noise_multiplier=1.0)
        >>> noisy["w"].shape
        torch.Size([2])

    Args:
        key: a :mod:`fnllm.random` key.
        grads: a per-example gradient tree (leading batch dimension on every leaf).
        clip: the per-example L2 bound ``C`` (> 0).
        noise_multiplier: ``sigma``; the noise standard deviation is ``C * sigma`` (>= 0).
        reduction: ``"mean"`` (divide the noisy sum by the batch size) or ``"sum"``.

    Returns:
        A tree of the parameters' shape (no batch dimension): the privatized gradient.

    Raises:
        TypeError: ``clip`` or ``noise_multiplier`` is not a Python number (a tensor, a
            string, a bool): the privacy guarantee rests on them, so they are never guessed.
        ValueError: ``clip`` is not finite and > 0, ``noise_multiplier`` is not finite and
            >= 0 (NaN would add no noise at all), an unknown ``reduction``, or a tree that is
            not a per-example tree.
    """
    clip = _checks.check_number("privatize: clip", clip, positive=True)
    noise_multiplier = _checks.check_number(
        "privatize: noise_multiplier", noise_multiplier, nonnegative=True
    )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"privatize: reduction must be 'mean' or 'sum', got {reduction!r}")
    clipped = clip_per_example(grads, clip)
    batch = _tensor_leaves(clipped, "privatize")[0].shape[0]
    summed = tree.map(lambda g: g.sum(0) if isinstance(g, torch.Tensor) else g, clipped)
    if noise_multiplier > 0:
        summed = _add_noise(key, summed, clip * noise_multiplier)
    if reduction == "mean":
        summed = tree.map(lambda g: g / batch if isinstance(g, torch.Tensor) else g, summed)
    return summed


def accumulate(
    loss_fn: Callable[..., Any],
    micro_batches: int,
    *,
    argnums: Argnums = 0,
    in_dims: InDims | None = None,
    has_aux: bool = False,
    weight_fn: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """Compute a batch's loss and gradient in micro-batches, to bound activation memory.

    The batch is split into ``micro_batches`` nearly equal parts along its batch dimension; the
    micro-batch losses and gradients are combined with weights proportional to the number of
    examples in each part. For a loss that is a mean over examples this equals the full-batch
    loss and gradient (up to float rounding). For a loss averaged over something else (e.g. the
    non-padding target tokens), pass ``weight_fn`` returning that count for a micro-batch.

    Example:
        >>> import torch
        >>> from fnllm import grads
        >>> def loss_fn(params, x):
        ...     return ((x @ params["w"]) ** 2).mean()
        >>> params, x = {"w": torch.ones(2)}, torch.arange(8.0).reshape(4, 2)
        >>> loss, g = grads.accumulate(loss_fn, 2)(params, x)
        >>> full = torch.func.grad(loss_fn)(params, x)
        >>> torch.allclose(g["w"], full["w"]), float(loss) == float(loss_fn(params, x))
        (True, True)

    Args:
        loss_fn: ``loss_fn(*args) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
        micro_batches: how many parts to split the batch into (>= 1).
        argnums: which positional argument(s) to differentiate.
        in_dims: which dimension of each argument holds the batch (as in :func:`per_example`;
            default: the last positional argument along dimension 0, all others shared).
            Shared arguments (such as a dropout key) are passed unchanged to every part.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux values of the parts are stacked
            along a new leading dimension.
        weight_fn: ``weight_fn(*micro_args) -> number`` giving each part's weight. Default: its
            number of examples.

    Returns:
        A function of ``loss_fn``'s arguments returning ``(loss, grads)`` (``((loss, aux),
        grads)`` with ``has_aux``), ``grads`` shaped like the differentiated argument(s).

    Raises:
        TypeError: ``micro_batches`` is not an int.
        ValueError: ``micro_batches`` < 1 or larger than the batch, or bad ``in_dims``.
    """
    _checks.check_int("accumulate: micro_batches", micro_batches)
    if micro_batches < 1:
        raise ValueError(f"accumulate: micro_batches must be >= 1, got {micro_batches}")
    grad_fn = torch.func.grad_and_value(
        lambda *a: loss_fn(*_release(a)), argnums=argnums, has_aux=has_aux
    )

    def accumulated(*args: Any) -> Any:
        dims = _resolve_in_dims(in_dims, len(args), "accumulate")
        _check_differentiated(args, argnums, "accumulate")
        args = _hold_quantized(args, dims, argnums, "accumulate")
        size = _batch_size(args, dims, "accumulate")
        if micro_batches > size:
            raise ValueError(
                f"accumulate: micro_batches {micro_batches} > batch size {size}: "
                "every micro-batch needs at least one example"
            )
        parts = [_split(a, d, micro_batches) for a, d in zip(args, dims)]
        total_g: Any = None
        total_loss: Any = None
        total_w: Any = 0
        auxes = []
        for i in range(micro_batches):
            micro = tuple(p[i] for p in parts)
            g, out = grad_fn(*micro)
            loss, aux = out if has_aux else (out, None)
            if weight_fn is None:
                w: Any = _batch_size(micro, dims, "accumulate")
            else:
                w = weight_fn(*micro)
            if total_g is None:
                total_g = tree.map(lambda x, w=w: x * w, g)
                total_loss = loss * w
            else:
                total_g = tree.map(lambda acc, x, w=w: acc + x * w, total_g, g)
                total_loss = total_loss + loss * w
            total_w = total_w + w
            auxes.append(aux)
        grads_out = tree.map(lambda x: x / total_w, total_g)
        loss_out = total_loss / total_w
        if has_aux:
            aux_out = tree.map(lambda *xs: torch.stack(xs), *auxes)
            return (loss_out, aux_out), grads_out
        return loss_out, grads_out

    return accumulated


# ----------------------------------------------------------------------------- helpers


def _add_noise(key: torch.Tensor, summed: Any, std: float) -> Any:
    """Add ``std``-scaled float32 Gaussian noise to every tensor leaf, one split key per leaf.

    The DP-SGD noise of :func:`privatize`, shared with ``fnllm.distributed.privatize``.
    """
    n = sum(isinstance(g, torch.Tensor) for g in tree.leaves(summed))
    keys = iter(jr.split(key, n) if n > 1 else [key])

    def _noise(g: Any) -> Any:
        if not isinstance(g, torch.Tensor):
            return g
        z = jr.normal(next(keys), tuple(g.shape), dtype=torch.float32)
        return g + (z.to(g.device) * std).to(g.dtype)

    return tree.map(_noise, summed)


def _resolve_in_dims(in_dims: InDims | None, n_args: int, who: str) -> tuple[Any, ...]:
    if n_args == 0:
        raise ValueError(f"{who}: the loss function needs at least one argument")
    if in_dims is None:
        return (None,) * (n_args - 1) + (0,)
    if isinstance(in_dims, int):
        return (in_dims,) * n_args
    dims = tuple(in_dims)
    if len(dims) != n_args:
        raise ValueError(
            f"{who}: in_dims has {len(dims)} entries but the function got {n_args} arguments"
        )
    if all(d is None for d in dims):
        raise ValueError(f"{who}: in_dims batches no argument (all entries are None)")
    return dims


def _check_differentiated(args: tuple[Any, ...], argnums: Argnums, who: str) -> None:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for n in nums:
        if n >= len(args) or n < -len(args):
            raise ValueError(f"{who}: argnums {n} but the function got {len(args)} arguments")
        if not any(isinstance(x, torch.Tensor) for x in tree.leaves(args[n])):
            raise ValueError(
                f"{who}: argument {n} (differentiated) holds no tensor; "
                "did the partition filter match no parameter?"
            )


class _Held:
    """A quantized leaf carried past ``torch.func.grad``/``vmap`` as a non-tensor (which they
    leave alone) and put back, unwrapped, inside the transformed function."""

    __slots__ = ("leaf",)

    def __init__(self, leaf: torch.Tensor) -> None:
        self.leaf = leaf


def _hold_quantized(
    args: tuple[Any, ...], dims: tuple[Any, ...], argnums: Argnums, who: str
) -> tuple[Any, ...]:
    """``args`` with each quantized leaf held in a :class:`_Held` (a frozen constant)."""
    if not any(_quant.is_quantized(x) for x in tree.leaves(args)):
        return args
    nums = {n % len(args) for n in ((argnums,) if isinstance(argnums, int) else argnums)}
    for i, (a, d) in enumerate(zip(args, dims)):
        if i in nums and any(_quant.is_quantized(x) for x in tree.leaves(a)):
            raise ValueError(
                f"{who}: argument {i} is differentiated but holds quantized (NF4/int8) "
                "weights, which are frozen and get no gradient: split the tree with "
                "tree.partition(params, finetune.strategy('lora', model)) and pass the "
                "quantized half as a frozen argument, or io.dequantize(params) to train them"
            )
        if any(_quant.is_quantized(x) and dd is not None for x, dd in _leaves_with_dims(a, d)):
            raise ValueError(
                f"{who}: argument {i} holds quantized (NF4/int8) weights but in_dims batches "
                "it: quantized weights are shared by every example, give that argument "
                "in_dims None"
            )
    return tuple(tree.map(lambda x: _Held(x) if _quant.is_quantized(x) else x, a) for a in args)


def _release(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Undo :func:`_hold_quantized` (inside the transforms)."""
    return tuple(tree.map(lambda x: x.leaf if isinstance(x, _Held) else x, a) for a in args)


def _unsqueeze(x: Any, d: Any) -> Any:
    """Re-insert the batch dimension ``d`` (an int or a tree prefix of ints/None) with size 1."""
    if d is None:
        return x
    if isinstance(d, int):
        return tree.map(lambda t: t.unsqueeze(d) if isinstance(t, torch.Tensor) else t, x)
    if isinstance(d, dict):
        return {k: _unsqueeze(v, d[k]) for k, v in x.items()}
    if isinstance(d, (list, tuple)):
        return _tree_ops.rebuild(x, [_unsqueeze(v, dd) for v, dd in zip(x, d)])
    raise TypeError(f"in_dims: expected an int, None or a tree of them, got {d!r}")


def _narrow(x: Any, d: Any, start: int, length: int) -> Any:
    """Examples ``start .. start + length`` of ``x`` along its batch dimension(s) ``d``."""
    if d is None:
        return x
    if isinstance(d, int):
        return tree.map(
            lambda t: t.narrow(d, start, length) if isinstance(t, torch.Tensor) else t, x
        )
    if isinstance(d, dict):
        return {k: _narrow(v, d[k], start, length) for k, v in x.items()}
    return _tree_ops.rebuild(x, [_narrow(v, dd, start, length) for v, dd in zip(x, d)])


def _split(x: Any, d: Any, n: int) -> list[Any]:
    """Split ``x`` into ``n`` parts along its batch dimension(s) ``d`` (None: repeat ``x``)."""
    if d is None:
        return [x] * n
    if isinstance(d, int):
        if isinstance(x, torch.Tensor):
            return list(torch.tensor_split(x, n, dim=d))
        if isinstance(x, dict):
            cols = {k: _split(v, d, n) for k, v in x.items()}
            return [{k: c[i] for k, c in cols.items()} for i in range(n)]
        if isinstance(x, (list, tuple)):
            cols_l = [_split(v, d, n) for v in x]
            return [_tree_ops.rebuild(x, [c[i] for c in cols_l]) for i in range(n)]
        return [x] * n
    if isinstance(d, dict):
        cols = {k: _split(v, d[k], n) for k, v in x.items()}
        return [{k: c[i] for k, c in cols.items()} for i in range(n)]
    cols_l = [_split(v, dd, n) for v, dd in zip(x, d)]
    return [_tree_ops.rebuild(x, [c[i] for c in cols_l]) for i in range(n)]


def _batch_size(args: tuple[Any, ...], dims: tuple[Any, ...], who: str) -> int:
    for a, d in zip(args, dims):
        if d is None:
            continue
        for x, dd in _leaves_with_dims(a, d):
            if isinstance(x, torch.Tensor) and dd is not None:
                return int(x.shape[dd])
    raise ValueError(f"{who}: the batched arguments hold no tensor")


def _leaves_with_dims(x: Any, d: Any) -> list[tuple[Any, Any]]:
    if d is None or isinstance(d, int):
        return [(leaf, d) for leaf in tree.leaves(x)]
    if isinstance(d, dict):
        return [p for k, v in x.items() for p in _leaves_with_dims(v, d[k])]
    return [p for v, dd in zip(x, d) for p in _leaves_with_dims(v, dd)]


def _tensor_leaves(grads: Any, who: str) -> list[torch.Tensor]:
    # tree.leaves traces without graph breaks on sparse trees (partition halves)
    leaves = [g for g in tree.leaves(grads) if isinstance(g, torch.Tensor)]
    if not leaves:
        raise ValueError(f"{who}: the gradient tree holds no tensor")
    if torch.compiler.is_compiling():
        return leaves
    flat = [(p, g) for p, g in tree.flatten(grads).items() if isinstance(g, torch.Tensor)]
    first_path, first = flat[0]
    for path, g in flat:
        if g.dim() == 0 or first.dim() == 0 or g.shape[0] != first.shape[0]:
            raise ValueError(
                f"{who}: leaves {first_path!r} {tuple(first.shape)} and {path!r} "
                f"{tuple(g.shape)} differ in their leading (batch) dimension; every leaf of a "
                "per-example tree needs the same one"
            )
    return leaves
