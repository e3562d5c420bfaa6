"""Training: a pure compiled train step, a resumable fit loop, and train-state checkpoints.

- :func:`make_step` builds ``step(trainable, frozen, opt_state, batch, key) -> (trainable,
  opt_state, metrics)``: forward, backward for the trainable leaves only, optional global-norm
  clipping, the optimizer update and a non-finite guard, compiled with
  ``torch.compile(fullgraph=True)``.
- :func:`fit` runs steps with a progress bar, periodic evaluation and checkpoints (where and how
  often: a :class:`Checkpointing`); resuming
  from a checkpoint continues bit-identically (the key of step ``s`` is
  ``random.fold_in(key, s)`` and the batch of step ``s`` is ``data(s)``).
- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`latest_checkpoint` store and restore
  the train state (trainable params, optimizer state, step, key) with :mod:`fnllm.io`.
"""

from fnllm.train.checkpoint import (
    Checkpoint,
    Checkpointing,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from fnllm.train.fit import FitResult, NonFiniteError, fit
from fnllm.train.step import TrainStep, make_step

__all__ = [
    "Checkpoint",
    "Checkpointing",
    "FitResult",
    "NonFiniteError",
    "TrainStep",
    "checkpoint_path",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "make_step",
    "prune_checkpoints",
    "save_checkpoint",
]
