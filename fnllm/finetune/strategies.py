"""Finetuning strategies: which leaves train, as a filter for :func:`fnllm.tree.partition`.

| name | trains |
| --- | --- |
| ``"full"`` | every leaf |
| ``"head"`` | the head only (see below) |
| ``"last:N"`` | the last ``N`` blocks, the final norm (GPT ``ln_f``), BERT's pooler and the head |
| ``"bitfit"`` | every bias (linear and layer norm) and the head |
| ``"lora"`` | the LoRA adapter leaves (``*.lora_a``, ``*.lora_b``) and the head |
| globs | a list of globs (or one glob string with ``*`` or ``.``), as ``tree.partition`` takes |

The head is a classifier's ``head``; on a bare GPT, ``ln_f`` and an untied ``head``; on a
bare BERT, ``pooler``, ``mlm`` and ``sop``. No strategy ever selects a LoRA ``lora_scale``
leaf: the scale is a fixed hyper-parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fnllm import tree
from fnllm.finetune.classifier import Classifier
from fnllm.models import BERT, GPT

__all__ = ["NAMES", "Strategy", "frozen_prefix", "strategy"]

NAMES = ("full", "head", "last:N", "bitfit", "lora")


@dataclass(frozen=True)
class Strategy:
    """A named set of globs; calling it is the ``(path, leaf) -> bool`` filter.

    A glob matches a leaf's path or any dotted prefix of it (as in :func:`fnllm.tree.filter_fn`);
    ``*.lora_scale`` leaves never match.

    Example:
        >>> from fnllm.finetune import Strategy
        >>> s = Strategy("mine", ("head", "*.bias"))
        >>> s("head.weight", None), s("blocks.0.ln_1.bias", None), s("blocks.0.ln_1.weight", None)
        (True, True, False)

    Args:
        name: the strategy's name (for tables and errors).
        globs: the selected paths.
    """

    name: str
    globs: tuple[str, ...]
    required: tuple[str, ...] = ()

    def check_matches(self, params: Any) -> None:
        """Raise unless every glob of ``required`` selects a leaf of ``params``.

        :func:`fnllm.tree.partition` calls it (eagerly), so ``strategy("lora", model)`` on a
        tree without adapters fails there instead of silently training the head alone.

        Example:
            >>> import torch
            >>> from fnllm.finetune import Strategy
            >>> s = Strategy("lora", ("*.lora_a", "head"), ("*.lora_a",))
            >>> try:
            ...     s.check_matches({"head": {"weight": torch.zeros(1)}})
            ... except ValueError as err:
            ...     print(str(err).split(" (")[0])
            strategy 'lora': the tree has no '*.lora_a' leaf
        """
        paths = tree.paths(params)
        for glob in self.required:
            if not any(self._hit(p, glob) for p in paths):
                raise ValueError(
                    f"strategy {self.name!r}: the tree has no {glob!r} leaf (no LoRA adapters: "
                    "call fnllm.finetune.lora.init on it first)"
                )

    @staticmethod
    def _hit(path: str, glob: str) -> bool:
        parts = path.split(".")
        return any(fnmatchcase(".".join(parts[:i]), glob) for i in range(len(parts), 0, -1))

    def __call__(self, path: str, leaf: Any) -> bool:
        """Whether the leaf at ``path`` trains under this strategy."""
        del leaf
        parts = path.split(".")
        if parts[-1] == "lora_scale":
            return False
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        return any(fnmatchcase(p, g) for g in self.globs for p in prefixes)


def strategy(name: str | Sequence[str], model: Any) -> Strategy:
    """The filter of a finetuning strategy for ``model`` (a Classifier, GPT or BERT config).

    Example:
        >>> from fnllm import random, tree
        >>> from fnllm.finetune import Classifier, strategy
        >>> from fnllm.models import BERT
        >>> clf = Classifier(BERT(vocab_size=20, n_layer=3, n_head=2, d_model=8, d_ff=16,
        ...                       max_len=8, mlm_head=False, pair_head=False))
        >>> strategy("last:1", clf).globs
        ('base.blocks.2', 'base.pooler', 'head')
        >>> trainable, frozen = tree.partition(clf.init(random.key(0)), strategy("head", clf))
        >>> tree.paths(trainable)
        ['head.bias', 'head.weight']

    Args:
        name: ``"full"``, ``"head"``, ``"last:N"``, ``"bitfit"``, ``"lora"``, or globs
            (a list of glob strings, or one string containing ``*`` or ``.``).
        model: the config the parameter tree belongs to.

    Returns:
        A :class:`Strategy`, usable wherever ``tree.partition`` takes a filter.

    Raises:
        ValueError: an unknown name, or ``last:N`` with ``N`` outside ``[1, n_layer]``.
        TypeError: ``model`` is not a Classifier, GPT or BERT config.
    """
    if isinstance(model, Classifier):
        prefix, base = "base.", model.base
    elif isinstance(model, (GPT, BERT)):
        prefix, base = "", model
    else:
        raise TypeError(
            f"strategy: model must be a Classifier, GPT or BERT config, got {type(model).__name__}"
        )
    if not isinstance(name, str):
        globs = tuple(name)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise ValueError(f"strategy: a glob list must be non-empty strings, got {name!r}")
        return Strategy("globs", globs)
    if "*" in name or "." in name:
        return Strategy(name, (name,))
    heads = _heads(model, base, prefix)
    if name == "full":
        return Strategy(name, ("*",))
    if name == "head":
        return Strategy(name, heads)
    if name == "bitfit":
        return Strategy(name, ("*.bias", *heads))
    if name == "lora":
        return Strategy(name, ("*.lora_a", "*.lora_b", *heads), ("*.lora_a",))
    if name.startswith("last:"):
        n = _last_n(name, base.n_layer)
        blocks = tuple(f"{prefix}blocks.{i}" for i in range(base.n_layer - n, base.n_layer))
        norm = (f"{prefix}ln_f",) if isinstance(base, GPT) else ()
        if isinstance(model, Classifier) and model.pooling == "cls" and isinstance(base, BERT):
            norm = ("base.pooler",) if base.pooler else ()
        return Strategy(name, tuple(dict.fromkeys((*blocks, *norm, *heads))))
    raise ValueError(
        f"strategy: unknown name {name!r}; choose one of {list(NAMES)} or a list of globs"
    )


def frozen_prefix(model: Any, params: Any, filter: Any) -> int:
    """How many bottom blocks (with the embeddings) have no trainable leaf under ``filter``.

    Those blocks are a fixed function of the input, so their output can be computed once
    (:meth:`Classifier.prefix`) and reused: ``0`` when the embeddings or block 0 train.

    Example:
        >>> from fnllm import random
        >>> from fnllm.finetune import Classifier, frozen_prefix, strategy
        >>> from fnllm.models import GPT
        >>> clf = Classifier(GPT(vocab_size=20, n_layer=4, n_head=2, d_model=8, max_len=8))
        >>> params = clf.init(random.key(0))
        >>> [frozen_prefix(clf, params, strategy(s, clf)) for s in ("head", "last:1", "full")]
        [4, 3, 0]

    Args:
        model: a Classifier, GPT or BERT config.
        params: its parameter tree (LoRA adapters included, if any).
        filter: the trainable filter (a strategy, globs or predicate).

    Returns:
        The number of frozen bottom blocks, in ``[0, n_layer]``.
    """
    prefix = "base." if isinstance(model, Classifier) else ""
    n_layer = model.n_layer
    trainable, _ = tree.partition(params, filter)
    lowest = n_layer
    for path in tree.paths(trainable):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :].split(".")
        if rest[0] == "embed":
            return 0
        if rest[0] == "blocks":
            lowest = min(lowest, int(rest[1]))
    return lowest


def _heads(model: Any, base: GPT | BERT, prefix: str) -> tuple[str, ...]:
    if isinstance(model, Classifier):
        return ("head",)
    if isinstance(base, GPT):
        return ("ln_f",) if base.tie_head else ("ln_f", "head")
    names = (("pooler", base.pooler), ("mlm", base.mlm_head), ("sop", base.pair_head))
    return tuple(n for n, present in names if present)


def _last_n(name: str, n_layer: int) -> int:
    text = name[len("last:") :]
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"strategy: {name!r}: N must be an integer (like 'last:2')") from None
    if not 1 <= n <= n_layer:
        raise ValueError(f"strategy: {name!r}: N must be in [1, {n_layer}] (the model's n_layer)")
    return n
