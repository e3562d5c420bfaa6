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

import importlib as _importlib

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
    "generate",
    "grads",
    "instruct",
    "interop",
    "io",
    "losses",
    "memory",
    "models",
    "nn",
    "optim",
    "plot",
    "preference",
    "prompts",
    "random",
    "remat",
    "train",
    "tree",
]


# imported on first use: distributed loads DTensor and DCP (~1 s), plot loads matplotlib, and
# the others pull in the generation and tokenizer stack; ``fnllm.generate`` works either way
_ON_DEMAND = ("distributed", "generate", "instruct", "plot", "preference", "prompts")


def __getattr__(name: str) -> object:
    """Import the submodules of ``_ON_DEMAND`` on first use (``fnllm.generate.sample``)."""
    if name in _ON_DEMAND:
        return _importlib.import_module(f"fnllm.{name}")
    raise AttributeError(f"module 'fnllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_DEMAND})
