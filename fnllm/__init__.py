"""fnllm: transformer language models in PyTorch, the JAX way.

Models are frozen dataclass configs with ``init(key) -> params`` and a pure
``apply(params, ...)``; params are plain nested dict/list trees of tensors; randomness is an
explicit key (:mod:`fnllm.random`, bit-identical to ``jax.random``); freezing is a partition
of the tree (:func:`fnllm.tree.partition`); everything composes with ``torch.func.grad``,
``torch.func.vmap`` and ``torch.compile``.

Example:
    >>> import torch, fnllm
    >>> from fnllm import random, tree
    >>> gpt = fnllm.GPT(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_len=16)
    >>> params = gpt.init(random.key(0))
    >>> gpt.apply(params, torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 64])
"""

from fnllm import (
    data,
    finetune,
    grads,
    interop,
    io,
    losses,
    memory,
    models,
    nn,
    optim,
    random,
    remat,
    train,
    tree,
)
from fnllm.models import BERT, GPT, Llama

__version__ = "0.1.0"

__all__ = [
    "BERT",
    "GPT",
    "Llama",
    "data",
    "distributed",
    "finetune",
    "grads",
    "interop",
    "io",
    "losses",
    "memory",
    "models",
    "nn",
    "optim",
    "random",
    "remat",
    "train",
    "tree",
]


def __getattr__(name: str) -> object:
    """``fnllm.distributed`` is imported on first use (it loads DTensor and DCP, ~1 s)."""
    if name == "distributed":
        import fnllm.distributed

        return fnllm.distributed
    raise AttributeError(f"module 'fnllm' has no attribute {name!r}")
