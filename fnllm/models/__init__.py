"""Model configs: :class:`GPT` (GPT-2) and :class:`BERT`, each with ``init`` and ``apply``.

A model is a frozen dataclass of hyper-parameters; its parameters are a plain nested tree
that ``init(key)`` creates and ``apply(params, ...)`` consumes. :func:`from_config` rebuilds
either model from the dict that ``to_config()`` writes (checkpoint metadata uses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnllm.models.bert import BERT, BertOutput, BertPretrainOutput
from fnllm.models.gpt import GPT, GPTOutput

__all__ = ["BERT", "GPT", "BertOutput", "BertPretrainOutput", "GPTOutput", "from_config"]

_TYPES: dict[str, Any] = {"gpt": GPT, "bert": BERT}


def from_config(config: Mapping[str, Any]) -> GPT | BERT:
    """Rebuild a model config from a ``to_config()`` dict, dispatching on its ``"type"``.

    Example:
        >>> from fnllm import models
        >>> models.from_config({"type": "gpt", "n_layer": 2}) == models.GPT(n_layer=2)
        True
        >>> type(models.from_config({"type": "bert", "n_layer": 2})).__name__
        'BERT'

    Args:
        config: a mapping with ``"type"`` (``"gpt"`` or ``"bert"``) and config fields.

    Returns:
        The :class:`GPT` or :class:`BERT` config.

    Raises:
        ValueError: a missing or unknown ``"type"``, or unknown fields.
    """
    kind = config.get("type")
    if kind not in _TYPES:
        raise ValueError(f"models.from_config: type must be one of {sorted(_TYPES)}, got {kind!r}")
    return _TYPES[kind].from_config(config)
