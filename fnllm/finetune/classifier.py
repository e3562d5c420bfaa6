"""Sequence classification: a model config plus a linear head, in one parameter tree.

The tree is ``{"base": <the base model's params>, "head": {"weight": [C, D], "bias": [C]}}``,
so it partitions, saves and exports like any other (``io.to_hf(model.base, params["base"],
...)`` exports the encoder). A forward can be split at any layer ``k``:
``apply(params, tokens)`` equals ``apply_from(params, prefix(params, tokens, k), k)``, which
lets frozen lower blocks run once per example and be reused (see :func:`prefix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor

from fnllm import _checks, nn, remat, tree
from fnllm import random as jr
from fnllm.models import ModelConfig, _base
from fnllm.nn import mean_pool

__all__ = ["Classifier", "Pooling", "mean_pool"]

Params: TypeAlias = dict[str, Any]
Pooling: TypeAlias = _base.Pooling
_POOLINGS = ("cls", "mean", "last")


@dataclass(frozen=True)
class Classifier:
    """A classification model: a base model config, a pooling and ``n_classes``.

    ``pooling="cls"`` reads the first token (through the base's ``pool_first``: BERT's pooler
    when it has one, as Hugging Face's ``BertForSequenceClassification`` does), ``"mean"``
    averages the real tokens, ``"last"`` takes the last real token (the usual choice for a
    decoder; with ``n_classes=1`` that is a reward model). The hidden states pass the base's
    final norm (``finish``: a GPT's ``ln_f``).

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.finetune import Classifier
        >>> from fnllm.models import BERT
        >>> base = BERT(vocab_size=50, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=16)
        >>> clf = Classifier(base, n_classes=3, pooling="mean")
        >>> params = clf.init(random.key(0))
        >>> clf.apply(params, torch.tensor([[2, 7, 9, 3]])).shape
        torch.Size([1, 3])

    Args:
        base: the model config (:class:`~fnllm.models.GPT`, :class:`~fnllm.models.BERT`, ...).
        n_classes: number of classes (the head's outputs).
        pooling: ``"cls"``, ``"mean"`` or ``"last"``.
        head_std: the standard deviation of the head's initial weights; ``0.0`` starts every
            output at 0 (a reward model whose pairwise loss starts at ``log 2``).
    """

    base: ModelConfig
    n_classes: int = 2
    pooling: Pooling = "cls"
    head_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.base, ModelConfig):
            raise TypeError(
                "Classifier: base must be a model config (GPT, BERT, ...), "
                f"got {type(self.base).__name__}"
            )
        n = self.n_classes
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"Classifier: n_classes must be an int >= 1, got {n!r}")
        if not (isinstance(self.head_std, (int, float)) and 0.0 <= self.head_std < math.inf):
            raise ValueError(
                f"Classifier: head_std must be a finite float >= 0, got {self.head_std!r}"
            )
        if self.pooling not in _POOLINGS:
            raise ValueError(
                f"Classifier: pooling must be one of {list(_POOLINGS)}, got {self.pooling!r}"
            )

    def to_config(self) -> dict[str, Any]:
        """A plain-JSON dict of the config: ``{"type": "classifier", "base": {...}, ...}``.

        Example:
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import GPT
            >>> cfg = Classifier(GPT(n_layer=1), n_classes=3, pooling="last").to_config()
            >>> cfg["type"], cfg["base"]["type"], cfg["n_classes"], cfg["pooling"]
            ('classifier', 'gpt', 3, 'last')

        Returns:
            The classifier's fields, its base's ``to_config()`` under ``"base"``.
        """
        return {
            "type": "classifier",
            "base": self.base.to_config(),
            "n_classes": self.n_classes,
            "pooling": self.pooling,
            "head_std": self.head_std,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Classifier:
        """Rebuild a classifier from :meth:`to_config`'s dict (e.g. an adapter set's manifest).

        Example:
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import BERT
            >>> clf = Classifier(BERT(n_layer=1), n_classes=4, pooling="mean")
            >>> Classifier.from_config(clf.to_config()) == clf
            True

        Args:
            config: ``{"type": "classifier", "base": {...}, "n_classes": ..., ...}``.

        Returns:
            The classifier (a ``ValueError`` names a wrong ``"type"``).
        """
        from fnllm.models import from_config

        fields = dict(config)
        kind = fields.pop("type", "classifier")
        if kind != "classifier" or not isinstance(fields.get("base"), dict):
            raise ValueError(
                f"Classifier.from_config: expected type 'classifier' with a 'base' config, "
                f"got type {kind!r}"
            )
        return cls(from_config(fields.pop("base")), **fields)

    @property
    def n_layer(self) -> int:
        """The base model's number of blocks."""
        return self.base.n_layer

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The base model's default LoRA targets, under ``base.`` (``lora.init(model=clf)``)."""
        return tuple(f"base.{g}" for g in self.base.lora_targets)

    def init(self, key: Tensor, base_params: Params | None = None) -> Params:
        """Make the parameter tree; ``base_params`` (e.g. pretrained) are kept as they are.

        Example:
            >>> from fnllm import random, tree
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import GPT
            >>> gpt = GPT(vocab_size=50, n_layer=1, n_head=2, d_model=8, max_len=8)
            >>> clf = Classifier(gpt, n_classes=1, pooling="last")
            >>> pretrained = gpt.init(random.key(1))
            >>> params = clf.init(random.key(0), base_params=pretrained)
            >>> params["base"] is pretrained, tree.paths(params["head"])
            (True, ['bias', 'weight'])

        Args:
            key: a ``fnllm.random`` key (draws the head, and the base when
                ``base_params`` is ``None``).
            base_params: the base model's parameters, or ``None`` to initialise them.

        Returns:
            ``{"base": ..., "head": {"weight": [n_classes, D], "bias": [n_classes]}}``.
        """
        k_base, k_head = jr.split(key)
        if base_params is None:
            base_params = self.base.init(k_base)
        else:
            self.base.check_params(base_params)
        head = nn.init_linear(k_head, self.base.d_model, self.n_classes, std=self.head_std)
        device = tree.leaves(base_params)[0].device
        return {"base": base_params, "head": {k: v.to(device) for k, v in head.items()}}

    def apply(
        self,
        params: Params,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        *,
        checkpoint: remat.Policy = None,
    ) -> Tensor:
        """Class logits ``[B, n_classes]`` for token ids ``[B, T]``.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import GPT
            >>> clf = Classifier(GPT(vocab_size=50, n_layer=1, n_head=2, d_model=8, max_len=8),
            ...                  n_classes=2, pooling="last")
            >>> params = clf.init(random.key(0))
            >>> tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
            >>> clf.apply(params, tokens, attention_mask=tokens != 0).shape
            torch.Size([2, 2])

        Args:
            params: the tree from :meth:`init` (LoRA adapters in it are applied).
            tokens: int ids ``[B, T]`` with ``T <= base.max_len``.
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; ``None``: no padding.
            key: a ``fnllm.random`` key to enable the base's dropout; ``None`` = eval.
            checkpoint: which of the base's blocks recompute their activations in the
                backward pass instead of keeping them (:func:`fnllm.remat.selected`: ``True``
                every block, ``k`` every ``k``-th, a set of indices, ``None`` none); same
                values and gradients, less memory.

        Returns:
            ``[B, n_classes]`` float logits.
        """
        k1, k2 = (None, None) if key is None else tuple(jr.split(key))
        hidden = self.prefix(params, tokens, 0, attention_mask, key=k1)
        return self.apply_from(params, hidden, 0, attention_mask, key=k2, checkpoint=checkpoint)

    def prefix(
        self,
        params: Params,
        tokens: Tensor,
        layer: int,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
    ) -> Tensor:
        """Hidden states entering block ``layer``: embeddings, then blocks ``0 .. layer-1``.

        With those blocks frozen and no dropout this is a fixed function of the input,
        computed once per example and reused by :meth:`apply_from` across epochs.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import BERT
            >>> clf = Classifier(BERT(vocab_size=50, n_layer=2, n_head=2, d_model=8, d_ff=16,
            ...                       max_len=8))
            >>> params = clf.init(random.key(0))
            >>> tokens = torch.tensor([[2, 5, 3]])
            >>> h = clf.prefix(params, tokens, 1)
            >>> torch.allclose(clf.apply_from(params, h, 1), clf.apply(params, tokens))
            True

        Args:
            params: the classifier's tree.
            tokens: int ids ``[B, T]``.
            layer: how many blocks to run (``0``: embeddings only; ``n_layer``: all).
            attention_mask: ``[B, T]`` keep-mask or ``None``.
            key: a ``fnllm.random`` key for dropout; ``None`` = eval.

        Returns:
            ``[B, T, D]`` hidden states.
        """
        tokens, attention_mask = self._check(params, tokens, attention_mask, layer)
        k_emb, k_blocks = (None, None) if key is None else tuple(jr.split(key))
        base = params["base"]
        x = self.base.embed(base, tokens, key=k_emb)
        return self.base.apply_blocks(
            base, x, attention_mask=attention_mask, stop=layer, key=k_blocks
        )

    def apply_from(
        self,
        params: Params,
        hidden: Tensor,
        layer: int,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        *,
        checkpoint: remat.Policy = None,
    ) -> Tensor:
        """Finish a forward from ``hidden = prefix(params, tokens, layer)``: logits ``[B, C]``.

        The head applied to :meth:`features`, which takes the same arguments and whose example
        shows both.

        Returns:
            ``[B, n_classes]`` logits.
        """
        feats = self.features(params, hidden, layer, attention_mask, key, checkpoint=checkpoint)
        return nn.linear(params["head"], feats)

    def features(
        self,
        params: Params,
        hidden: Tensor,
        layer: int,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        *,
        checkpoint: remat.Policy = None,
    ) -> Tensor:
        """The pooled ``[B, D]`` vector the head reads, from hidden states at ``layer``.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.finetune import Classifier
            >>> from fnllm.models import GPT
            >>> clf = Classifier(GPT(vocab_size=50, n_layer=2, n_head=2, d_model=8, max_len=8),
            ...                  pooling="mean")
            >>> params = clf.init(random.key(0))
            >>> h = clf.prefix(params, torch.tensor([[4, 5, 6]]), 1)   # after block 0
            >>> feats = clf.features(params, h, 1)
            >>> logits = clf.apply_from(params, h, 1)
            >>> feats.shape, logits.shape
            (torch.Size([1, 8]), torch.Size([1, 2]))
            >>> head = params["head"]
            >>> torch.allclose(logits, feats @ head["weight"].T + head["bias"])
            True

        Args:
            params: the classifier's tree.
            hidden: ``[B, T, D]`` hidden states entering block ``layer``.
            layer: the block to resume at (``n_layer``: pool ``hidden`` directly).
            attention_mask: the ``[B, T]`` keep-mask used for the prefix, or ``None``.
            key: a ``fnllm.random`` key for dropout; ``None`` = eval.
            checkpoint: which blocks (counted from block 0) recompute their activations in
                the backward pass (:func:`fnllm.remat.selected`), as in :meth:`apply`.

        Returns:
            ``[B, D]`` pooled features.
        """
        if not 0 <= layer <= self.n_layer:
            raise ValueError(f"layer: {layer} is outside [0, n_layer={self.n_layer}]")
        base = params["base"]
        x = self.base.apply_blocks(
            base, hidden, attention_mask=attention_mask, start=layer, key=key,
            checkpoint=checkpoint,
        )  # fmt: skip
        x = self.base.finish(base, x)
        if self.pooling == "mean":
            if attention_mask is None:
                return x.mean(-2)
            return mean_pool(x, attention_mask)
        if self.pooling == "last":
            if attention_mask is None:
                return x[:, -1]
            T = x.shape[-2]
            pos = torch.arange(T, device=x.device)
            last = (attention_mask.long() * (pos + 1)).argmax(-1)  # last real token per row
            return x[torch.arange(x.shape[0], device=x.device), last]
        return self.base.pool_first(base, x[:, 0])

    def _check(
        self, params: Params, tokens: Any, attention_mask: Any, layer: int
    ) -> tuple[Tensor, Tensor | None]:
        if not isinstance(params, dict) or set(params) != {"base", "head"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise KeyError(f"params: expected keys ['base', 'head'], got {got}")
        if not 0 <= layer <= self.n_layer:
            raise ValueError(f"layer: {layer} is outside [0, n_layer={self.n_layer}]")
        if isinstance(tokens, Tensor) and tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
        if isinstance(tokens, Tensor) and tokens.shape[-1] > self.base.max_len:
            raise ValueError(
                f"tokens: sequence length {tokens.shape[-1]} > max_len {self.base.max_len} "
                "(truncate the texts, e.g. data.encode_texts(max_len=...))"
            )
        # ids, mask and (eagerly) the base's tree, as the base model's own apply checks them
        tokens, mask = _base.check_inputs(self.base, params["base"], tokens, attention_mask)
        eager = _checks.checks_enabled() and not _checks.tracing(mask)
        if mask is not None and mask.ndim == 2 and eager:
            empty = ~mask.any(-1)
            if bool(empty.any()):
                raise ValueError(
                    f"attention_mask: row {int(empty.nonzero()[0])} has no real token, so "
                    f"{self.pooling!r} pooling has nothing to read (drop empty texts)"
                )
        return tokens, mask
