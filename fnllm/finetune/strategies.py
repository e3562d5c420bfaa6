"""Finetuning strategies: which leaves train, as a filter for :func:`fnllm.tree.partition`.

| name | trains |
| --- | --- |
| ``"full"`` | every leaf |
| ``"head"`` | the head only (see below) |
| ``"last:N"`` | the last ``N`` blocks, the final norm (GPT ``ln_f``), BERT's pooler and the head |
| ``"bitfit"`` | every bias (linear and layer norm) and the head |
| ``"lora"`` | the LoRA adapter leaves (``*.lora_a``, ``*.lora_b``) and the head |
| globs | a list of globs (or one glob string with ``*`` or ``.``), as ``tree.partition`` takes |

The head is a classifier's ``head``; on a bare model, what the model names in
``head_paths()`` (GPT: ``ln_f`` and an untied ``head``; BERT: ``pooler``, ``mlm`` and
``sop``). The blocks, the final norm and the pooler are the model's too (``block_paths()``,
``final_norm``, ``pool_first_paths()``): no strategy knows an architecture. No strategy ever
selects an adapter's fixed scale (``lora_scale``): it is a hyper-parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fnllm import nn, tree
from fnllm.finetune.classifier import Classifier
from fnllm.models import ModelConfig

__all__ = ["NAMES", "Strategy", "frozen_prefix", "strategy"]

NAMES = ("full", "head", "last:N", "bitfit", "lora")


@dataclass(frozen=True)
class Strategy:
    """A named set of globs; calling it is the ``(path, leaf) -> bool`` filter.

    A glob matches a leaf as :func:`fnllm.tree.glob_match` says (its path or a dotted
    prefix of it); adapters' fixed scales (``*.lora_scale``) never match.

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
        adapters = {f"*.{leaf}" for leaf in nn.ADAPTER_TRAINED}
        for glob in self.required:
            if any(tree.glob_match(p, glob) for p in paths):
                continue
            if glob in adapters:
                raise ValueError(
                    f"strategy {self.name!r}: the tree has no {glob!r} leaf (no LoRA adapters: "
                    "call fnllm.finetune.lora.init on it first)"
                )
            raise ValueError(
                f"strategy {self.name!r}: glob {glob!r} matches no leaf of the tree (its paths "
                f"look like {', '.join(paths[:3])}); nothing would train"
            )

    def __call__(self, path: str, leaf: Any) -> bool:
        """Whether the leaf at ``path`` trains under this strategy."""
        del leaf
        if path.rsplit(".", 1)[-1] in nn.ADAPTER_FIXED:
            return False
        return tree.glob_match(path, self.globs)


def strategy(name: str | Sequence[str], model: Any) -> Strategy:
    """The filter of a finetuning strategy for ``model`` (a Classifier or a model config).

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
        ValueError: an unknown name, ``last:N`` with ``N`` outside ``[1, n_layer]``,
            ``bitfit`` on a model without biases or ``head`` on one without a head of its
            own. Globs that select no leaf are refused when ``tree.partition`` applies them.
        TypeError: ``model`` is not a Classifier or a model config, or ``name`` is neither a
            string nor a list of globs.
    """
    if isinstance(model, Classifier):
        prefix, base = "base.", model.base
    elif isinstance(model, ModelConfig):
        prefix, base = "", model
    else:
        raise TypeError(
            "strategy: model must be a Classifier, GPT or BERT config (or another fnllm model "
            f"config), got {type(model).__name__}"
        )
    if not isinstance(name, str):
        if not isinstance(name, (list, tuple)):
            raise TypeError(
                f"strategy: name must be a strategy name or a list of globs, got {name!r}"
            )
        globs = tuple(name)
        if not globs or not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"strategy: a glob list must be non-empty strings, got {name!r}")
        return Strategy("globs", globs, globs)
    if ("*" in name or "." in name) and not name.startswith("last:"):
        return Strategy(name, (name,), (name,))
    heads = _heads(model, base, prefix)
    if name == "full":
        return Strategy(name, ("*",))
    if name == "head":
        if not heads:
            raise ValueError(
                f"strategy: 'head' trains the output head, and this {type(base).__name__} has "
                "none of its own (tied to the token embedding); wrap it in "
                "fnllm.finetune.Classifier, or choose another strategy"
            )
        return Strategy(name, heads)
    if name == "bitfit":
        if not any(tree.glob_match(p, "*.bias") for p in base.param_shapes()):
            raise ValueError(
                f"strategy: 'bitfit' trains the biases, and this {type(base).__name__} has "
                "none; choose another strategy (e.g. 'lora' or 'last:N')"
            )
        return Strategy(name, ("*.bias", *heads))
    if name == "lora":
        adapters = tuple(f"*.{leaf}" for leaf in nn.ADAPTER_TRAINED)
        return Strategy(name, (*adapters, *heads), adapters[:1])
    if name.startswith("last:"):
        n = _last_n(name, base.n_layer)
        blocks = tuple(prefix + p for p in base.block_paths()[base.n_layer - n :])
        norm: tuple[str, ...] = (prefix + base.final_norm,) if base.final_norm else ()
        if isinstance(model, Classifier) and model.pooling == "cls":
            norm += tuple(prefix + p for p in base.pool_first_paths())
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
    base = model.base if isinstance(model, Classifier) else model
    n_layer = model.n_layer
    trainable, _ = tree.partition(params, filter)
    blocks = [prefix + p for p in base.block_paths()]
    norm = (base.final_norm,) if base.final_norm else ()
    after = [prefix + p for p in (*norm, *base.pool_first_paths(), *base.head_paths())]
    lowest = n_layer
    for path in tree.paths(trainable):
        if not path.startswith(prefix):
            continue
        for i, b in enumerate(blocks):
            if path.startswith(b + "."):
                lowest = min(lowest, i)
                break
        else:
            if not tree.glob_match(path, after):  # below the blocks: the embeddings
                return 0
    return lowest


def _heads(model: Any, base: ModelConfig, prefix: str) -> tuple[str, ...]:
    if isinstance(model, Classifier):
        return ("head",)
    return base.head_paths()


def _last_n(name: str, n_layer: int) -> int:
    text = name[len("last:") :]
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"strategy: {name!r}: N must be an integer (like 'last:2')") from None
    if not 1 <= n <= n_layer:
        raise ValueError(f"strategy: {name!r}: N must be in [1, {n_layer}] (the model's n_layer)")
    return n
