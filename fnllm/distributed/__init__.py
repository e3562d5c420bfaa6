"""Beyond one machine: data-parallel and sharded training on ``torch.distributed``.

Built on PyTorch's own distributed engine (process groups, ``torchrun``, DTensor,
``torch.distributed.checkpoint``): gloo on CPU, NCCL on GPU.

- Collectives on trees: :func:`init`, :func:`launched_world_size`, :func:`rank`,
  :func:`world_size`, :func:`is_main`, :func:`barrier`, bucketed :func:`all_reduce_mean` /
  :func:`all_reduce_sum`, :func:`broadcast`, :func:`check_same_structure`.
- Data parallel: :func:`data_parallel` (a loss whose gradient is averaged over ranks, for
  :func:`fnllm.train.make_step`), :func:`shard_batch` / :func:`shard_data` (each rank's slice of
  the global batch), :func:`privatize` (DP-SGD with the noise added once).
- Sharded parameters: :func:`make_mesh`, :func:`shard` (DTensor ``Shard(0)`` leaves),
  :func:`unshard`, :func:`sharded` (gather before the forward, reduce-scatter the gradient).
- Checkpoints of sharded trees: :func:`save_sharded`, :func:`load_sharded`,
  :func:`latest_sharded` (DCP; they reload under another world size).
- :func:`fit`: the loop with rank-0 progress, logging (:func:`log`) and checkpoints.
"""

from fnllm.distributed.checkpoint import (
    latest_sharded,
    load_sharded,
    save_sharded,
    sharded_checkpoint_path,
)
from fnllm.distributed.collectives import (
    CollectiveError,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast,
    check_same_structure,
    init,
    is_main,
    launched_world_size,
    rank,
    world_size,
)
from fnllm.distributed.loop import fit, log
from fnllm.distributed.parallel import data_parallel, privatize, shard_batch, shard_data
from fnllm.distributed.sharding import is_sharded, make_mesh, shard, sharded, unshard

__all__ = [
    "CollectiveError",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "check_same_structure",
    "data_parallel",
    "fit",
    "init",
    "is_main",
    "is_sharded",
    "latest_sharded",
    "launched_world_size",
    "load_sharded",
    "log",
    "make_mesh",
    "privatize",
    "rank",
    "save_sharded",
    "shard",
    "shard_batch",
    "shard_data",
    "sharded",
    "sharded_checkpoint_path",
    "unshard",
    "world_size",
]
