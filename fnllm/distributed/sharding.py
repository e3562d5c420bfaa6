"""Sharded parameters: a params tree as DTensor leaves, each split along dim 0 (FSDP2-style).

:func:`shard` places every leaf of a tree on a 1-D device mesh as a ``DTensor`` with placement
``Shard(0)`` (0-d leaves are replicated): each rank stores ``1/world_size`` of every parameter.
Because the optimizer initialises its state with ``zeros_like`` of the params, the optimizer
state is sharded the same way, and ``optim``'s update (the fused AdamW kernel included) runs
on the local shards. :func:`sharded` wraps a loss so that the model sees whole tensors: each
leaf is all-gathered before the forward, and backward reduce-scatters (and averages) its
gradient back to the rank's shard, as FSDP does, so :func:`fnllm.train.make_step` works
unchanged on a sharded tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from fnllm import tree
from fnllm.distributed.collectives import all_reduce_mean, world_size

__all__ = ["is_sharded", "make_mesh", "shard", "sharded", "unshard"]


def make_mesh(shape: int | Sequence[int] | None = None, *, device_type: str | None = None) -> Any:
    """A 1-D device mesh over the ranks of the default process group.

    Example:
        >>> from fnllm import distributed
        >>> distributed.make_mesh.__name__   # under torchrun: mesh = distributed.make_mesh()
        'make_mesh'

    Args:
        shape: the number of ranks in the mesh (default: the world size); it must equal the
            world size. A sequence is accepted for symmetry with ``init_device_mesh`` but must
            have one entry.
        device_type: ``"cpu"`` or ``"cuda"`` (default: ``"cuda"`` with the NCCL backend, else
            ``"cpu"``).

    Returns:
        A ``torch.distributed.device_mesh.DeviceMesh``.

    Raises:
        TypeError: ``shape`` holds something other than ints.
        ValueError: a size < 1, an unknown ``device_type``, no process group, a mesh of more
            than one dimension, or a mesh size that does not equal the world size.
    """
    import torch.distributed as dist

    if shape is not None:
        given = (shape,) if not isinstance(shape, (list, tuple)) else tuple(shape)
        for d in given:
            if isinstance(d, bool) or not isinstance(d, int):
                raise TypeError(f"make_mesh: shape must hold ints, got {shape!r:.40}")
            if d < 1:
                raise ValueError(f"make_mesh: shape must hold sizes >= 1, got {shape!r:.40}")
    if device_type is not None and device_type not in ("cpu", "cuda"):
        raise ValueError(f"make_mesh: device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if not dist.is_initialized():
        raise ValueError(
            "make_mesh: no process group; call fnllm.distributed.init() first (under torchrun)"
        )
    n = dist.get_world_size()
    dims = (n,) if shape is None else (shape,) if isinstance(shape, int) else tuple(shape)
    if len(dims) != 1:
        raise ValueError(f"make_mesh: only 1-D meshes are supported, got shape {dims}")
    if math.prod(dims) != n:
        raise ValueError(
            f"make_mesh: a mesh of shape {dims} holds {math.prod(dims)} ranks but the world size "
            f"is {n}; the mesh must cover every rank"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, dims)


def shard(t: Any, mesh: Any) -> Any:
    """Split every tensor leaf of ``t`` along dim 0 over ``mesh`` (a DTensor with ``Shard(0)``).

    Every rank must pass the same values (e.g. ``model.init`` with the same key); rank 0's are
    scattered. A first dimension that the mesh size does not divide is split unevenly, as
    ``torch.chunk`` splits it. 0-d leaves are replicated; non-tensor leaves pass through.

    Example:
        >>> from fnllm import distributed
        >>> distributed.shard.__name__   # params = distributed.shard(gpt.init(key), mesh)
        'shard'

    Args:
        t: a params (or any) tree of tensors.
        mesh: a 1-D ``DeviceMesh`` (:func:`make_mesh`).

    Returns:
        A tree of the same structure with ``DTensor`` leaves.

    Raises:
        TypeError: ``mesh`` is not a ``DeviceMesh``.
        ValueError: the mesh is not 1-D, or a leaf is already a ``DTensor``.
    """
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"shard: mesh must be a DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"shard: mesh must be 1-D, got {mesh.ndim} dimensions")

    def place(path: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(x, DTensor):
            raise ValueError(f"shard: {path!r} is already a DTensor")
        placement = Shard(0) if x.dim() > 0 else Replicate()
        return distribute_tensor(x.detach(), mesh, [placement])

    return tree.map(place, t, with_path=True)


def unshard(t: Any) -> Any:
    """Gather every ``DTensor`` leaf into an ordinary whole tensor on every rank.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> distributed.unshard({"w": torch.ones(2)})      # plain leaves pass through
        {'w': tensor([1., 1.])}

    Args:
        t: a tree (from :func:`shard`, or an optimizer state built on one).

    Returns:
        The tree with plain tensors (a collective on every rank holding DTensors).
    """
    return tree.map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, t)


def is_sharded(t: Any) -> bool:
    """Whether any leaf of ``t`` is a ``DTensor``.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> distributed.is_sharded({"w": torch.ones(2)})
        False

    Args:
        t: a tree.

    Returns:
        True when some leaf is a ``DTensor``.
    """
    return any(isinstance(x, DTensor) for x in tree.leaves(t))


def sharded(loss_fn: Callable[..., Any], *, average_loss: bool = True) -> Callable[..., Any]:
    """Make ``loss_fn(trainable, frozen, batch, key)`` run on trees of sharded (DTensor) leaves.

    Before the loss, every DTensor leaf of ``trainable`` and ``frozen`` is all-gathered into a
    whole tensor; in backward, the gradient of a trainable leaf is averaged over the ranks and
    each rank keeps its shard (one reduce-scatter per leaf). So with each rank on its slice of
    the global batch (:func:`~fnllm.distributed.shard_data`), ``train.make_step(sharded(loss),
    ...)`` (eager) makes the same update as one process on the whole batch, with params,
    gradients and optimizer state all sharded.

    Example:
        >>> import torch
        >>> from fnllm import distributed
        >>> loss = distributed.sharded(lambda tr, fr, x, key: (tr["w"] * x).sum())
        >>> float(loss({"w": torch.ones(2)}, {}, torch.ones(2), None))   # plain leaves work too
        2.0

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch, key) -> loss`` or ``(loss, aux)``.
        average_loss: report the mean loss over ranks (the gradient is unaffected).

    Returns:
        The loss on sharded trees, with the same signature.

    Raises:
        TypeError: ``loss_fn`` is not callable.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"sharded: loss_fn must be a function (trainable, frozen, batch, key) -> loss, "
            f"got {type(loss_fn).__name__}"
        )

    def gather_trainable(x: Any) -> Any:
        if isinstance(x, DTensor):
            return x.full_tensor(grad_placements=[Partial("avg")])
        return x

    def gather_frozen(x: Any) -> Any:
        return x.full_tensor() if isinstance(x, DTensor) else x

    def sharded_loss(trainable: Any, frozen: Any, batch: Any, key: Any) -> Any:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "sharded: the sharded loss runs eagerly: build the step with "
                "make_step(..., compile=False) and compile the model call inside loss_fn instead"
            )
        out = loss_fn(
            tree.map(gather_trainable, trainable), tree.map(gather_frozen, frozen), batch, key
        )
        loss, aux = out if isinstance(out, tuple) else (out, None)
        if average_loss and world_size() > 1 and is_sharded(trainable):
            mean = all_reduce_mean(loss.detach(), check=False)
            loss = loss + (mean - loss.detach())
        return (loss, aux) if isinstance(out, tuple) else loss

    return sharded_loss
