"""Process groups and tree collectives: start-up, rank queries, bucketed all-reduce, broadcast.

Everything here runs on ``torch.distributed``'s own collectives (gloo on CPU, NCCL on GPU); a
tree is flattened into a few large contiguous buckets so that a GPT-2 gradient of ~150 leaves
costs a handful of calls, not one per leaf. A failed collective (a rank that died, or a
timeout) is re-raised as :class:`CollectiveError`, which names the operation and the timeout.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fnllm import tree

# The public names are this module's functions and classes without a leading underscore (the
# package re-exports them all; its ``__all__`` lists them).

# Bucket sizes by backend. Measured with gloo on 2 CPU ranks (benchmarks/distributed.py): GPT
# tiny's gradient (52 leaves, 20 MB) all-reduces in 0.4-0.6x the time of one call per leaf;
# GPT-2 small's (148 leaves, 475 MB, most of them MB-sized) gains nothing, and 25 MB buckets
# were the slowest there. NCCL keeps DDP's 25 MB.
BUCKET_MB = {"gloo": 1.0, "nccl": 25.0}


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, or did not answer within the group's timeout.

    Example:
        >>> issubclass(CollectiveError, RuntimeError)
        True
    """


def init(
    backend: str | None = None, *, timeout: float = 300.0, device: str | None = None
) -> tuple[int, int]:
    """Join the default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``).

    Uses ``env://`` rendezvous (``MASTER_ADDR``, ``MASTER_PORT``), as ``torchrun`` sets it. A
    single process started without ``torchrun`` gets a group of one on a free 127.0.0.1 port
    (the environment is left as it is). Calling it again when the group exists returns the
    rank and world size unchanged; ``torch.distributed.destroy_process_group()`` ends it.

    Example:
        >>> from fnllm import distributed
        >>> distributed.init.__name__     # in a torchrun worker: rank, world = distributed.init()
        'init'

    Args:
        backend: ``"gloo"`` or ``"nccl"``; None picks NCCL when CUDA is available (and
            ``device`` is not ``"cpu"``), else gloo.
        timeout: seconds a collective may wait for the other ranks before it fails (keep it
            short in tests, so a dead rank is reported rather than waited for).
        device: ``"cpu"`` or ``"cuda"``; with CUDA each rank uses the GPU ``LOCAL_RANK``.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: ``timeout`` is not positive, or an unknown ``backend``.
    """
    if not timeout > 0:
        raise ValueError(f"init: timeout must be > 0 seconds, got {timeout}")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"init: backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    wait = datetime.timedelta(seconds=timeout)
    if "RANK" in os.environ:  # torchrun (or a launcher that sets the same variables)
        dist.init_process_group(backend, timeout=wait)
    else:  # a plain `python script.py`: a group of one on a free loopback port
        address = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=address, rank=0, world_size=1, timeout=wait)
    return dist.get_rank(), dist.get_world_size()


def launched_world_size() -> int:
    """The world size a launcher such as ``torchrun`` set for this process (``WORLD_SIZE``).

    Read before any process group exists, to decide whether to run data parallel: 1 when the
    process was started on its own.

    Example:
        >>> from fnllm import distributed
        >>> distributed.launched_world_size()     # python script.py; under torchrun: N
        1

    Returns:
        The number of processes, an int >= 1.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but is not an integer.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(value))
    except ValueError as err:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {value!r}") from err


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when no process group was started).

    Example:
        >>> from fnllm import distributed
        >>> distributed.rank()      # outside torchrun
        0

    Args:
        group: a process group (None: the default group).

    Returns:
        The rank, an int.

    Raises:
        TypeError: ``group`` is neither None nor a process group.
    """
    _check_group("rank", group)
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (1 when no process group was started).

    Example:
        >>> from fnllm import distributed
        >>> global_batch = 8
        >>> global_batch // distributed.world_size()   # rows per rank (all 8 in one process)
        8

    Args:
        group: a process group (None: the default group).

    Returns:
        The world size, an int.

    Raises:
        TypeError: ``group`` is neither None nor a process group.
    """
    _check_group("world_size", group)
    return dist.get_world_size(group) if dist.is_initialized() else 1


def is_main(group: Any = None) -> bool:
    """True on rank 0 (and in a single process): the rank that prints, logs and writes files.

    Example:
        >>> from fnllm import distributed
        >>> if distributed.is_main():        # e.g. around a file write
        ...     print("rank 0 writes")
        rank 0 writes

    Args:
        group: the group whose first rank reports (None: the default group).

    Returns:
        Whether this is rank 0.
    """
    return rank(group) == 0


def barrier(group: Any = None) -> None:
    """Wait until every rank of ``group`` arrives (nothing to do in a single process).

    Example:
        >>> from fnllm import distributed
        >>> distributed.barrier()     # e.g. until rank 0 has written a file the others read

    Args:
        group: the ranks that wait for each other (None: all of them).

    Returns:
        None.

    Raises:
        CollectiveError: a rank died or the group's timeout passed.
    """
    if world_size(group) > 1:
        _guarded("barrier", lambda: dist.barrier(group=group))


def all_reduce_mean(
    grads: Any,
    group: Any = None,
    *,
    bucket_mb: float | None = None,
    check: bool = True,
) -> Any:
    """Average a tree of tensors over the ranks of ``group``, in a few flat buckets.

    Leaves are packed (per dtype and device) into contiguous buffers of at most ``bucket_mb``
    megabytes (a bigger leaf is sent alone), each buffer is summed with one ``all_reduce`` and
    divided by the world size, and the result is unpacked into a new tree: the input is not
    modified. Non-tensor leaves and empty containers pass through. In a single process it
    returns the tree as it is.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> g = {"w": torch.ones(2), "b": [torch.zeros(())]}
        >>> distributed.all_reduce_mean(g)     # world size 1: the same values
        {'w': tensor([1., 1.]), 'b': [tensor(0.)]}

    Args:
        grads: a tree of tensors with the same structure, shapes and dtypes on every rank.
        group: a process group (None: the default group).
        bucket_mb: the largest bucket, in MB (a leaf larger than that gets its own bucket);
            None: 1 MB with gloo, 25 MB with NCCL (``BUCKET_MB``).
        check: first verify (one small collective) that every rank passed the same tree
            structure, shapes and dtypes.

    Returns:
        A tree of the same structure holding the mean over ranks.

    Raises:
        ValueError: the tree differs across ranks (with ``check``), or ``bucket_mb`` <= 0.
        TypeError: a leaf is not floating point (its mean would not be exact).
        CollectiveError: a rank died or the group's timeout passed.
    """
    return _all_reduce(grads, group, bucket_mb, check, mean=True, who="all_reduce_mean")


def all_reduce_sum(
    grads: Any,
    group: Any = None,
    *,
    bucket_mb: float | None = None,
    check: bool = True,
) -> Any:
    """Sum a tree of tensors over the ranks of ``group``, in a few flat buckets.

    As :func:`all_reduce_mean`, without the division by the world size.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> distributed.all_reduce_sum({"n": torch.tensor(3)})
        {'n': tensor(3)}

    Args:
        grads: a tree of tensors with the same structure, shapes and dtypes on every rank.
        group: a process group (None: the default group).
        bucket_mb: the largest bucket, in MB (None: by backend, as in :func:`all_reduce_mean`).
        check: first verify that every rank passed the same tree structure.

    Returns:
        A tree of the same structure holding the sum over ranks.

    Raises:
        ValueError: the tree differs across ranks (with ``check``), or ``bucket_mb`` <= 0.
        CollectiveError: a rank died or the group's timeout passed.
    """
    return _all_reduce(grads, group, bucket_mb, check, mean=False, who="all_reduce_sum")


def broadcast(t: Any, src: int = 0, group: Any = None, *, check: bool = True) -> Any:
    """Give every rank ``src``'s values of a tree (e.g. the initial params), bucketed.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> distributed.broadcast({"w": torch.ones(2)})
        {'w': tensor([1., 1.])}

    Args:
        t: a tree with the same structure, shapes and dtypes on every rank (the values of the
            other ranks are ignored).
        src: the rank whose values are sent.
        group: a process group (None: the default group).
        check: first verify that every rank passed the same tree structure.

    Returns:
        A new tree holding ``src``'s values (the input is not modified).

    Raises:
        ValueError: the tree differs across ranks (with ``check``) or ``src`` is not a rank.
        CollectiveError: a rank died or the group's timeout passed.
    """
    if isinstance(src, bool) or not isinstance(src, int):
        raise TypeError(f"broadcast: src must be an int rank, got {src!r}")
    _check_leaves(t, "broadcast")
    n = world_size(group)
    if not 0 <= src < n:
        raise ValueError(f"broadcast: src must be a rank in [0, {n}), got {src}")
    if n == 1:
        return t
    if check:
        check_same_structure(t, group, who="broadcast")

    def op(buf: torch.Tensor) -> None:
        dist.broadcast(buf, src=dist.get_global_rank(group, src) if group else src, group=group)

    return _bucketed(t, op, _bucket_mb(None, group), "broadcast", divisor=None)


def check_same_structure(t: Any, group: Any = None, *, who: str = "check_same_structure") -> None:
    """Raise when ranks hold trees of different structure, shapes or dtypes.

    One small all-gather of a fingerprint; only on a mismatch are the full descriptions
    gathered, to name the first differing path.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> distributed.check_same_structure({"w": torch.ones(2)})   # one process: always fine

    Args:
        t: the tree.
        group: a process group (None: the default group).
        who: the name used in the error message.

    Returns:
        None.

    Raises:
        ValueError: the trees differ; the message names the ranks and the first differing path.
        CollectiveError: a rank died or the group's timeout passed.
    """
    n = world_size(group)
    if n == 1:
        return
    desc = _describe(t)
    digest = hashlib.sha256(repr(desc).encode()).digest()[:7]
    mine = _on_backend(torch.tensor([int.from_bytes(digest, "little")]), group)
    everyone = [torch.zeros_like(mine) for _ in range(n)]
    _guarded(who, lambda: dist.all_gather(everyone, mine, group=group))
    if len({int(x) for x in everyone}) == 1:
        return
    descs: list[Any] = [None] * n
    _guarded(who, lambda: dist.all_gather_object(descs, desc, group=group))
    raise ValueError(f"{who}: the tree differs across ranks: {_first_difference(descs)}")


# ----------------------------------------------------------------------------- helpers


def _all_reduce(
    t: Any, group: Any, bucket_mb: float | None, check: bool, *, mean: bool, who: str
) -> Any:
    if bucket_mb is not None and not bucket_mb > 0:
        raise ValueError(f"{who}: bucket_mb must be > 0, got {bucket_mb}")
    _check_leaves(t, who)
    if mean:
        for path, x in tree.flatten(t).items():
            if isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
                raise TypeError(f"{who}: {path!r} is {x.dtype}; a mean needs floating point")
    n = world_size(group)
    if n == 1:
        return t
    if check:
        check_same_structure(t, group, who=who)

    def op(buf: torch.Tensor) -> None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)

    return _bucketed(t, op, _bucket_mb(bucket_mb, group), who, divisor=n if mean else None)


def _check_group(who: str, group: Any) -> None:
    """Refuse a ``group`` that is not a process group (a rank number, a name...)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{who}: group must be None (the default group) or a torch.distributed "
            f"ProcessGroup (dist.new_group), got {group!r:.40}"
        )


def _check_leaves(t: Any, who: str) -> None:
    """Refuse a tree with a leaf no collective can reduce (a string or bytes)."""
    if isinstance(t, (str, bytes)):
        raise TypeError(f"{who}: expected a tensor or a tree of tensors, got {t!r:.40}")
    for path, x in tree.flatten(t).items():
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{who}: leaf {path!r} is {x!r:.40}, not a tensor")


def _bucket_mb(bucket_mb: float | None, group: Any) -> float:
    if bucket_mb is not None:
        return bucket_mb
    return BUCKET_MB.get(str(dist.get_backend(group)), BUCKET_MB["nccl"])


def _bucketed(
    t: Any,
    op: Callable[[torch.Tensor], None],
    bucket_mb: float,
    who: str,
    divisor: int | None,
) -> Any:
    """Pack the tensor leaves into buckets, run ``op`` on each in place, unpack a new tree."""
    flat = tree.flatten(t)
    names = [k for k, v in flat.items() if isinstance(v, torch.Tensor)]
    limit = int(bucket_mb * 2**20)
    groups: dict[tuple[torch.dtype, torch.device], list[list[str]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for name in names:
        x = flat[name]
        k = (x.dtype, x.device)
        nbytes = x.numel() * x.element_size()
        if k not in groups or sizes[k] + nbytes > limit:
            groups.setdefault(k, []).append([])
            sizes[k] = 0
        groups[k][-1].append(name)
        sizes[k] += nbytes
    out = dict(flat)
    for buckets in groups.values():
        for bucket in buckets:
            if not bucket:
                continue
            buf = _pack([flat[name].detach() for name in bucket])
            _guarded(who, functools.partial(op, buf))
            if divisor is not None:
                buf.div_(divisor)
            for name, piece in zip(bucket, buf.split([flat[name].numel() for name in bucket])):
                out[name] = piece.view(flat[name].shape)
    return _rebuild(t, out)


def _pack(xs: list[torch.Tensor]) -> torch.Tensor:
    """One flat copy of ``xs`` (measured: plain copies beat ``torch.cat`` on large leaves)."""
    if len(xs) == 1:
        return xs[0].reshape(-1).clone()
    buf = torch.empty(sum(x.numel() for x in xs), dtype=xs[0].dtype, device=xs[0].device)
    offset = 0
    for x in xs:
        buf[offset : offset + x.numel()].copy_(x.reshape(-1))
        offset += x.numel()
    return buf


def _rebuild(like: Any, flat: dict[str, Any]) -> Any:
    """Put the leaves of ``flat`` (``tree.flatten`` order) back into the structure of ``like``."""
    _, spec = tree.flatten_spec(like)
    return tree.unflatten_spec(spec, list(flat.values()))


def _describe(t: Any) -> list[tuple[str, str, tuple[int, ...], str]]:
    out = []
    for path, x in tree.flatten(t).items():
        if isinstance(x, torch.Tensor):
            out.append((path, "tensor", tuple(x.shape), str(x.dtype).replace("torch.", "")))
        else:
            out.append((path, type(x).__name__, (), ""))
    return out


def _first_difference(descs: list[Any]) -> str:
    ref = descs[0]
    for r, d in enumerate(descs[1:], start=1):
        if d == ref:
            continue
        a, b = dict((p, s) for p, *s in ref), dict((p, s) for p, *s in d)
        only0, only_r = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only0 or only_r:
            return (
                f"rank 0 has {len(a)} leaves, rank {r} has {len(b)}; only on rank 0: "
                f"{only0[:5]}, only on rank {r}: {only_r[:5]}"
            )
        for p in a:
            if a[p] != b[p]:
                return f"at {p!r}: rank 0 has {_fmt(a[p])}, rank {r} has {_fmt(b[p])}"
        return f"rank 0 and rank {r} order their leaves differently"
    return "no difference found"  # pragma: no cover (the fingerprints differed)


def _fmt(s: list[Any]) -> str:
    kind, shape, dtype = s
    return f"{dtype}{list(shape)}" if kind == "tensor" else kind


def _on_backend(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Move a small tensor to the device the group's backend needs (CUDA for NCCL)."""
    if dist.get_backend(group) == "nccl":
        return x.cuda()
    return x


def _guarded(who: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:
        if isinstance(e, CollectiveError):
            raise
        raise CollectiveError(
            f"{who}: collective failed on rank {rank()} of {world_size()}: another rank died or "
            f"did not answer within the process group's timeout ({e})"
        ) from e


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
