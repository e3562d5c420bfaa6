"""Model configs: :class:`GPT` (GPT-2), :class:`Llama` (Llama, Qwen2, Mistral) and
:class:`BERT`, each with ``init`` and ``apply``.

A model is a frozen dataclass of hyper-parameters; its parameters are a plain nested tree
that ``init(key)`` creates and ``apply(params, ...)`` consumes. :func:`from_config` rebuilds
any model from the dict that ``to_config()`` writes (checkpoint metadata uses it).

What ``apply`` returns, one convention for both: the model's single output as a tensor, and
a named tuple as soon as there is more than one. A decoder has one output, so
``GPT.apply`` returns the logits tensor, and a :class:`GPTOutput` (``logits``,
``hidden_states``) with ``output_hidden_states=True``. An encoder always has two (the hidden
states and the pooled output), so ``BERT.apply`` always returns a :class:`BertOutput`
(``last_hidden_state``, ``pooled``, ``hidden_states``). Fields are named as in Hugging Face's
``transformers`` output classes.

Each model file reads top-down: config, ``init``, ``apply``, one block, heads, config round
trip; what both share (config checks, dropout keys, the parameter layout derived from
``init``, the boundary checks) lives in the private ``fnllm.models._base``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnllm.models.bert import BERT, BertOutput, BertPretrainOutput
from fnllm.models.gpt import GPT, GPTOutput
from fnllm.models.llama import Llama, LlamaOutput

__all__ = [
    "BERT",
    "GPT",
    "BertOutput",
    "BertPretrainOutput",
    "GPTOutput",
    "Llama",
    "LlamaOutput",
    "from_config",
]

_TYPES: dict[str, Any] = {"gpt": GPT, "bert": BERT, "llama": Llama}


def from_config(config: Mapping[str, Any]) -> GPT | BERT | Llama:
    """Rebuild a model config from a ``to_config()`` dict, dispatching on its ``"type"``.

    Example:
        >>> from fnllm import models
        >>> models.from_config({"type": "gpt", "n_layer": 2}) == models.GPT(n_layer=2)
        True
        >>> type(models.from_config({"type": "bert", "n_layer": 2})).__name__
        'BERT'

    Args:
        config: a mapping with ``"type"`` (``"gpt"``, ``"bert"`` or ``"llama"``) and config
            fields.

    Returns:
        The :class:`GPT`, :class:`BERT` or :class:`Llama` config.

    Raises:
        ValueError: a missing or unknown ``"type"``, or unknown fields.
    """
    kind = config.get("type")
    if kind not in _TYPES:
        raise ValueError(f"models.from_config: type must be one of {sorted(_TYPES)}, got {kind!r}")
    return _TYPES[kind].from_config(config)
