"""Data parallelism: every rank holds the whole model and a slice of the global batch.

:func:`data_parallel` turns a loss into one whose gradient is already the mean over ranks, so
:func:`fnllm.train.make_step` (and anything built on ``grad``) becomes a data-parallel step with
no change: clipping, the non-finite guard and the optimizer all see the averaged gradient, and
every rank makes the same update; its all-reduce runs during backward, bucket by bucket
(``_overlap``). :func:`shard_data` gives each rank its slice of the global
batch; :func:`privatize` is DP-SGD across ranks (per-example clipping on each rank, one sum
over ranks, the noise added once).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Literal

import torch

from fnllm import _checks, tree
from fnllm import grads as fgrads
from fnllm.distributed import _overlap
from fnllm.distributed.collectives import (
    _bucket_mb,
    all_reduce_mean,
    all_reduce_sum,
    check_same_structure,
    rank,
    world_size,
)

__all__ = ["data_parallel", "privatize", "shard_batch", "shard_data"]

_NO_COMPILE = (
    "data_parallel: the data-parallel loss runs eagerly (its gradient all-reduce is a backward "
    "hook that torch.compile would drop): build the step with make_step(..., compile=False) "
    "and compile the model call inside loss_fn instead"
)


def data_parallel(
    loss_fn: Callable[..., Any],
    group: Any = None,
    *,
    bucket_mb: float | None = None,
    average_loss: bool = True,
    overlap: bool = True,
) -> Callable[..., Any]:
    """Make ``loss_fn(trainable, frozen, batch, key)`` data-parallel over the ranks of ``group``.

    The returned loss is the same function, except that its gradient with respect to
    ``trainable`` is averaged over the ranks, in flat buckets. Pass it to
    :func:`fnllm.train.make_step` (eager, ``compile=False``; compile ``loss_fn``'s model call
    instead) and each rank's step, given its own slice of the global batch, makes the same
    update as one process on the whole batch (when every rank's loss averages the same number
    of items, as with DDP). The first call with a tree structure checks that all ranks pass the
    same ``trainable`` structure, shapes and dtypes. In a single process it returns ``loss_fn``
    itself.

    Two paths, picked per call:

    - **overlapped** (``overlap=True``, plain autograd: ``make_step``'s eager step,
      ``loss.backward()``): a hook on each leaf copies its gradient into a bucket as soon as
      backward has finished it, and a full bucket's ``all_reduce`` starts asynchronously
      while backward computes the earlier layers, as DDP does. Buckets launch in the same order
      on every rank: the reverse leaf order on the first step, then the gradients' arrival
      order on rank 0's first backward.
    - **after backward** (``overlap=False``, or inside ``torch.func`` transforms such as
      ``grad``/``vmap`` for per-example gradients): one autograd node averages all gradients
      at the end of backward. A leaf that gets a gradient on some ranks only (a loss that
      skips a layer on one rank) needs this path; the overlapped one says so.

    Example:
        >>> import torch
        >>> from fnllm import distributed, optim, train
        >>> loss_fn = lambda tr, fr, x, key: ((x @ tr["w"]) ** 2).mean()
        >>> opt = optim.sgd(0.1)
        >>> step = train.make_step(distributed.data_parallel(loss_fn), opt, compile=False)
        >>> tr = {"w": torch.ones(2)}     # one process: the plain step; under torchrun: DP
        >>> tr, _, m = step(tr, {}, opt.init(tr), torch.eye(2), None)
        >>> tr["w"], float(m["loss"])
        (tensor([0.9000, 0.9000]), 1.0)

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch, key) -> loss`` or ``(loss, aux)``.
        group: a process group (None: the default group).
        bucket_mb: the largest all-reduce bucket, in MB (None: by backend, see
            :func:`all_reduce_mean`).
        average_loss: report the mean loss over ranks (one scalar all-reduce), so the metrics
            and the non-finite guard agree on every rank; the gradient is unaffected.
        overlap: overlap the all-reduce with backward where autograd allows it.

    Returns:
        The data-parallel loss, with the same signature.

    Raises:
        TypeError: ``loss_fn`` is not callable; ``bucket_mb`` is not a number.
        ValueError: ``bucket_mb`` <= 0 or not finite. When it runs: the trees differ across
            ranks, or (on the overlapped path) a leaf got a gradient on some ranks only.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"data_parallel: loss_fn must be a function (trainable, frozen, batch, key) -> "
            f"loss, got {type(loss_fn).__name__}"
        )
    if bucket_mb is not None:
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
            raise TypeError(f"data_parallel: bucket_mb must be a number, got {bucket_mb!r}")
        if not (math.isfinite(bucket_mb) and bucket_mb > 0):
            raise ValueError(f"data_parallel: bucket_mb must be > 0, got {bucket_mb}")
    if world_size(group) == 1:
        return loss_fn
    checked: set[Any] = set()
    plans: dict[Any, _overlap.Plan] = {}
    pools: dict[Any, list[torch.Tensor | None]] = {}  # bucket buffers by structure
    last: list[_overlap.Reducer] = []  # the previous call's, if its backward never ran

    def dp_loss(trainable: Any, frozen: Any, batch: Any, key: Any) -> Any:
        if torch.compiler.is_compiling():
            raise RuntimeError(_NO_COMPILE)
        leaves, spec = tree.flatten_spec(trainable)
        sig = (spec, *(_signature(x) for x in leaves))
        if sig not in checked:  # once per structure, not every step
            check_same_structure(trainable, group, who="data_parallel: trainable")
            checked.add(sig)
        for old in last:
            old.detach_hooks()
        last.clear()
        if overlap and _can_overlap(leaves):
            pool = pools.setdefault(sig, [])
            last.append(_overlapped(leaves, spec, sig, plans, pool, group, bucket_mb))
            tr = trainable
        else:
            tr = tree.unflatten_spec(spec, list(_SyncGrads.apply(group, bucket_mb, *leaves)))
        out = loss_fn(tr, frozen, batch, key)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        if average_loss:
            mean = all_reduce_mean(loss.detach(), group, check=False)
            loss = loss + (mean - loss.detach())  # the value is the mean, the gradient local
        return (loss, aux) if isinstance(out, tuple) else loss

    return dp_loss


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s slice of a global batch: contiguous rows of every tensor's first dim.

    The ``world_size`` slices are disjoint and together hold the batch in order, so every
    example is seen exactly once per global batch. 0-d tensors and non-tensor leaves are
    shared as they are.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> batch = {"tokens": torch.arange(12).reshape(6, 2), "temperature": 0.7}
        >>> distributed.shard_batch(batch, rank=1, world_size=3)
        {'tokens': tensor([[4, 5],
                [6, 7]]), 'temperature': 0.7}

    Args:
        batch: a tree of tensors sharing the leading (batch) dimension.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: the number of ranks; it must divide the batch size.

    Returns:
        The slice, a tree of the same structure (views, no copy).

    Raises:
        ValueError: ``world_size`` does not divide the batch, leaves disagree on the batch
            size, or ``rank`` is out of range.
    """
    world_size, rank = _index("world_size", world_size), _index("rank", rank)
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"shard_batch: world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard_batch: rank must be in [0, {world_size}), got {rank!r}")
    sizes = {
        p: x.shape[0]
        for p, x in tree.flatten(batch).items()
        if isinstance(x, torch.Tensor) and x.dim() > 0
    }
    if not sizes:
        raise ValueError("shard_batch: the batch holds no tensor with a batch dimension")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"shard_batch: leaves disagree on the batch size: {sizes}")
    path, size = next(iter(sizes.items()))
    if size % world_size:
        raise ValueError(
            f"shard_batch: batch size {size} (at {path!r}) is not divisible by world_size "
            f"{world_size}; use a global batch of a multiple of {world_size}"
        )
    n = size // world_size

    def take(x: Any) -> Any:
        return x[rank * n : (rank + 1) * n] if isinstance(x, torch.Tensor) and x.dim() else x

    return tree.map(take, batch)


def shard_data(
    data: Callable[[int], Any] | Any,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: Any = None,
) -> Callable[[int], Any]:
    """Per-rank loader: ``step -> this rank's slice of the global batch data(step)``.

    ``data`` is a function of the step or a loader with ``.batch(step)`` (such as
    :class:`fnllm.data.Batches`), giving the *global* batch; since fnllm's loaders make a batch
    a pure function of ``(key, epoch, step)``, every rank builds the same global batch and keeps
    its own rows (:func:`shard_batch`): every example is seen once per epoch, by one rank, and a
    resumed run continues exactly.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> data = lambda step: torch.arange(4) + 10 * step
        >>> distributed.shard_data(data, rank=1, world_size=2)(3)
        tensor([32, 33])

    Args:
        data: ``data(step) -> global batch`` or an object with ``.batch(step)``.
        rank: this rank (default: from the process group).
        world_size: the number of ranks (default: from the process group).
        group: the process group used for the defaults.

    Returns:
        ``local(step) -> batch slice``.

    Raises:
        TypeError: ``data`` is neither callable nor has ``.batch``.
    """
    batch_of = getattr(data, "batch", data)
    if not callable(batch_of):
        raise TypeError(
            f"shard_data: data must be a function step -> batch or have .batch(step), "
            f"got {type(data).__name__}"
        )
    r = _rank_default(rank, group)
    n = world_size if world_size is not None else _world_default(group)
    try:
        n, r = _index("world_size", n), _index("rank", r)
    except TypeError as err:
        raise TypeError(str(err).replace("shard_batch:", "shard_data:")) from None
    if n < 1 or not 0 <= r < n:
        raise ValueError(f"shard_data: rank must be in [0, world_size {n}), got {r}")

    def local(step: int) -> Any:
        return shard_batch(batch_of(step), r, n)

    return local


def privatize(
    key: torch.Tensor,
    per_example_grads: Any,
    *,
    clip: float,
    noise_multiplier: float,
    reduction: Literal["mean", "sum"] = "mean",
    group: Any = None,
) -> Any:
    """DP-SGD over ranks: clip each local example, sum over all ranks, add the noise once.

    Equal (to float rounding) to :func:`fnllm.grads.privatize` on the global batch with the same
    key: each rank clips its own per-example gradients and sums them, one bucketed all-reduce
    sums over ranks (and counts the examples), then every rank adds the *same* Gaussian noise,
    drawn from ``key`` exactly as :func:`fnllm.grads.privatize` draws it; so the noise enters
    once, not once per rank, and every rank holds the same result. Pass the same ``key`` on all
    ranks.

    Example:
        >>> import torch
        >>> from fnllm import distributed, random
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> distributed.privatize(random.key(0), g, clip=1.0, noise_multiplier=0.0)
        {'w': tensor([0.4500, 0.6000])}

    Args:
        key: a :mod:`fnllm.random` key, the same on every rank.
        per_example_grads: this rank's per-example gradients (leading batch dimension), e.g.
            from :func:`fnllm.grads.per_example` on its slice of the batch.
        clip: the per-example L2 bound ``C`` (> 0).
        noise_multiplier: ``sigma``; the noise standard deviation is ``C * sigma`` (>= 0).
        reduction: ``"mean"`` (divide by the global batch size) or ``"sum"``.
        group: a process group (None: the default group).

    Returns:
        The privatized gradient (no batch dimension), identical on every rank. A NaN or inf
        per-example gradient on any rank makes it non-finite on every rank (as
        :func:`fnllm.grads.privatize`), so that ``fit``'s ``on_nonfinite`` guard sees the
        same bad step everywhere and skips (or stops) it on all ranks alike.

    Raises:
        ValueError: as :func:`fnllm.grads.privatize`; trees that differ across ranks.
    """
    # privacy-relevant numbers: NaN, inf or a negative value would silently drop the noise
    clip = _checks.check_number("privatize: clip", clip, positive=True)
    noise_multiplier = _checks.check_number(
        "privatize: noise_multiplier", noise_multiplier, nonnegative=True
    )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"privatize: reduction must be 'mean' or 'sum', got {reduction!r}")
    local = fgrads.privatize(
        key, per_example_grads, clip=clip, noise_multiplier=0.0, reduction="sum"
    )
    first = next(x for x in tree.leaves(per_example_grads) if isinstance(x, torch.Tensor))
    count = torch.tensor(float(first.shape[0]), dtype=torch.float64, device=first.device)
    total, count = all_reduce_sum((local, count), group, check=True)
    if noise_multiplier > 0:
        total = fgrads._add_noise(key, total, clip * noise_multiplier)
    if reduction == "mean":
        n = int(count.item())
        total = tree.map(lambda g: g / n if isinstance(g, torch.Tensor) else g, total)
    return total


# ----------------------------------------------------------------------------- helpers


class _SyncGrads(torch.autograd.Function):
    """Identity forward; backward averages all incoming gradients over ranks in buckets."""

    @staticmethod
    def forward(group: Any, bucket_mb: float | None, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group, ctx.bucket_mb = inputs[0], inputs[1]
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs[2:]]

    @staticmethod
    def backward(ctx: Any, *gs: torch.Tensor | None) -> tuple[Any, ...]:
        full = [
            torch.zeros(s, dtype=d, device=dev) if g is None else g
            for g, (s, d, dev) in zip(gs, ctx.like)
        ]
        avg = all_reduce_mean(full, ctx.group, bucket_mb=ctx.bucket_mb, check=False)
        return (None, None, *avg)


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad)
    return type(x)


def _can_overlap(leaves: list[Any]) -> bool:
    """Leaf tensors of plain autograd with no ``.grad`` yet (not inside ``torch.func``)."""
    grads = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    return (
        torch.is_grad_enabled()
        and bool(grads)
        and all(x.is_leaf and x.grad is None for x in grads)
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in grads)
    )


def _overlapped(
    leaves: list[Any],
    spec: Any,
    sig: Any,
    plans: dict[Any, _overlap.Plan],
    pool: list[torch.Tensor | None],
    group: Any,
    bucket_mb: float | None,
) -> _overlap.Reducer:
    """A reducer whose hooks sit on the leaves that require grad (see ``_overlap.Reducer``)."""
    idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    like = [leaves[i] for i in idx]
    limit = int(_bucket_mb(bucket_mb, group) * 2**20)
    meta = [_overlap.describe(x) for x in like]
    plan = plans.get(sig)
    if plan is None:
        plan = plans[sig] = _overlap.make_plan(meta, None, limit, learned=False)
    on_order = None
    if not plan.learned:

        def on_order(order: list[int]) -> None:
            agreed = _overlap.broadcast_order(order, group)
            plans[sig] = _overlap.make_plan(meta, agreed, limit, learned=True)

    def paths() -> list[str]:
        names = tree.spec_paths(spec)
        return [names[i] for i in idx]

    return _overlap.Reducer(plan, like, group, paths, on_order, pool)


def _rank_default(r: int | None, group: Any) -> int:
    return rank(group) if r is None else r


def _world_default(group: Any) -> int:
    return world_size(group)


def _index(name: str, value: Any) -> Any:
    """A numpy or 0-d tensor integer as a Python int; a bool, str or float refused by name."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value)
    elif hasattr(value, "__index__") and not isinstance(value, (bool, torch.Tensor)):
        value = operator.index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"shard_batch: {name} must be an int, got {value!r}")
    return value
