"""The gradient all-reduce of :func:`~fnllm.distributed.data_parallel`, overlapped with backward.

A hook on each trainable leaf tensor sees the leaf's gradient as soon as autograd has finished
it (last layers first: autograd runs a leaf's gradient sink before any other ready node; a hook
on a view of the leaf would only run at the end of backward). The hook divides it by
the world size into its slot of a flat bucket and, once a bucket and every bucket before it
are full, launches the bucket's ``all_reduce`` asynchronously; backward keeps computing the
earlier layers meanwhile, as DDP does. A callback at the end of backward launches what is left
(slots of leaves that got no gradient hold zeros), waits on every bucket and hands autograd the
bucket views as the gradients.

Buckets are launched in one fixed order on every rank (collectives pair up by order). The
first backward uses the reverse of the tree's leaf order; it records the order in which the
gradients really arrived, and rank 0's order (broadcast once) makes the buckets of every later
step, so each bucket fills as early as backward allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fnllm.distributed.collectives import _guarded

__all__: list[str] = []


@dataclass(frozen=True)
class Plan:
    """Which bucket each leaf of one tree structure goes to, and at which offset."""

    order: tuple[int, ...]  # leaf indices in launch order
    buckets: tuple[tuple[int, ...], ...]  # leaf indices of each bucket, in launch order
    bucket_of: tuple[int, ...]  # leaf index -> bucket index
    offset: tuple[int, ...]  # leaf index -> first element in its bucket
    sizes: tuple[int, ...]  # elements of each bucket (without the count slot)
    learned: bool  # built from an observed backward order (else: reverse leaf order)


def make_plan(
    like: list[tuple[int, int, Any]], order: list[int] | None, bucket_bytes: int, *, learned: bool
) -> Plan:
    """Cut leaves ``(numel, bytes per element, (dtype, device))``, taken in ``order``, into
    buckets of one dtype and device each, of at most ``bucket_bytes`` (a bigger leaf alone)."""
    order = list(range(len(like)))[::-1] if order is None else order
    buckets: list[list[int]] = []
    bucket_of, offset = [0] * len(like), [0] * len(like)
    sizes: list[int] = []
    used, kind = 0, None
    for i in order:
        numel, itemsize, k = like[i]
        nbytes = numel * itemsize
        if not buckets or k != kind or used + nbytes > bucket_bytes:
            buckets.append([])
            sizes.append(0)
            used, kind = 0, k
        bucket_of[i], offset[i] = len(buckets) - 1, sizes[-1]
        buckets[-1].append(i)
        sizes[-1] += numel
        used += nbytes
    return Plan(
        tuple(order),
        tuple(tuple(b) for b in buckets),
        tuple(bucket_of),
        tuple(offset),
        tuple(sizes),
        learned,
    )


class Reducer:
    """One backward's bucketed, overlapped gradient mean (a fresh one per forward)."""

    def __init__(
        self,
        plan: Plan,
        like: list[torch.Tensor],
        group: Any,
        paths: Callable[[], list[str]],
        on_order: Callable[[list[int]], None] | None,
        pool: list[torch.Tensor | None],
    ) -> None:
        self.plan, self.like, self.group, self.paths = plan, like, group, paths
        self.pool = pool  # last step's buffers, reused when nothing refers to them any more
        if len(pool) != len(plan.buckets):
            pool[:] = [None] * len(plan.buckets)
        self.on_order = on_order  # called with the observed order (first step only)
        self.n = dist.get_world_size(group)
        nb = len(plan.buckets)
        self.bufs: list[torch.Tensor | None] = [None] * nb
        self.missing = [len(b) for b in plan.buckets]  # leaves still to come, per bucket
        self.seen = [False] * len(like)
        self.arrived: list[int] = []
        self.works: list[Any] = []
        self.next = 0  # the next bucket to launch
        self.queued = False
        self.handles = [x.register_hook(self.hook(j)) for j, x in enumerate(like)]

    def detach_hooks(self) -> None:
        """Remove the hooks from the leaves (after backward, or when it never ran)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The gradient hook of leaf ``i``: its result is what autograd hands on."""

        def on_grad(g: torch.Tensor) -> torch.Tensor:
            if not self.queued:  # first gradient of this backward
                torch.autograd.Variable._execution_engine.queue_callback(self.finish)
                self.queued = True
            self.seen[i] = True
            self.arrived.append(i)
            b = self.plan.bucket_of[i]
            piece = self._slot(b, i)
            torch.div(g.reshape(-1), self.n, out=piece)
            self.missing[b] -= 1
            while self.next < len(self.bufs) and self.missing[self.next] == 0:
                self._launch(self.next)
            return piece.view(self.like[i].shape)

        return on_grad

    def finish(self) -> None:
        """End of backward: launch the rest (zeros for absent gradients), wait, check."""
        self.detach_hooks()
        for b in range(self.next, len(self.bufs)):
            for i in self.plan.buckets[b]:
                if not self.seen[i]:
                    self._slot(b, i).zero_()
            self._launch(b)
        for w in self.works:
            _guarded("data_parallel: gradient all-reduce", w.wait)
        for b, leaves in enumerate(self.plan.buckets):
            buf = self.bufs[b]
            assert buf is not None
            mine = sum(self.seen[i] for i in leaves)
            total = float(buf[-1])
            if buf.dtype.itemsize < 4 and len(leaves) * self.n > 256:
                continue  # a count a 16-bit float may not hold exactly: not checked
            if total != mine * self.n:
                names = self.paths()
                absent = [names[i] for i in leaves if not self.seen[i]]
                raise ValueError(
                    f"data_parallel: rank {dist.get_rank(self.group)} got gradients for {mine} "
                    f"of {len(leaves)} leaves of a bucket, the other ranks for "
                    f"{total - mine:g} in all (absent here: {absent[:5]}): a leaf is used by "
                    "the loss on some ranks only; use data_parallel(..., overlap=False)"
                )
        if self.on_order is not None:
            rest = [i for i in self.plan.order if not self.seen[i]]
            self.on_order(self.arrived + rest)

    def _slot(self, b: int, i: int) -> torch.Tensor:
        buf = self.bufs[b]
        if buf is None:  # one slot more: how many leaves of the bucket had a gradient
            x = self.like[self.plan.buckets[b][0]]
            size = self.plan.sizes[b] + 1
            old = self.pool[b]
            if old is not None and _unused(old, size, x):
                buf = old  # fresh memory costs page faults: ~0.5 ms a MB here
            else:
                buf = self.pool[b] = torch.empty(size, dtype=x.dtype, device=x.device)
            self.bufs[b] = buf
        start = self.plan.offset[i]
        return buf[start : start + self.like[i].numel()]

    def _launch(self, b: int) -> None:
        buf = self.bufs[b]
        assert buf is not None  # full (from a hook) or zero-filled (from finish)
        buf[-1] = sum(self.seen[i] for i in self.plan.buckets[b])  # summed: the total count
        group = self.group
        self.works.append(
            _guarded(
                "data_parallel: gradient all-reduce",
                lambda: dist.all_reduce(buf, group=group, async_op=True),
            )
        )
        self.next = b + 1


def _unused(buf: torch.Tensor, size: int, like: torch.Tensor) -> bool:
    """Whether ``buf`` fits and no tensor but itself uses its memory (the last step's
    gradients, views of it, are gone), so that writing into it changes nobody's values."""
    if buf.numel() != size or buf.dtype != like.dtype or buf.device != like.device:
        return False
    try:  # 2: ``buf`` itself and the temporary storage object asked
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):  # pragma: no cover (a torch without it)
        return False


def describe(x: torch.Tensor) -> tuple[int, int, Any]:
    """What :func:`make_plan` needs of a leaf."""
    return x.numel(), x.element_size(), (x.dtype, x.device)


def broadcast_order(order: list[int], group: Any) -> list[int]:
    """Rank 0's leaf order, on every rank (every rank must build the same buckets)."""
    t = torch.tensor(order, dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    _guarded("data_parallel: bucket order", lambda: dist.broadcast(t, src=src, group=group))
    return [int(i) for i in t.tolist()]
