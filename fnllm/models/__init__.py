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

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from fnllm.models._base import ModelConfig
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
    "ModelConfig",
    "from_config",
    "hf_codec",
    "hf_model_types",
]

# The registered model configs, by ``kind`` (their ``to_config()["type"]``): from_config and
# the Hugging Face registry (hf_codec) find every architecture here. Add a new config class
# to this tuple.
_TYPES: dict[str, Any] = {cls.kind: cls for cls in (GPT, BERT, Llama)}


def from_config(config: Mapping[str, Any]) -> Any:
    """Rebuild a model config from a ``to_config()`` dict, dispatching on its ``"type"``.

    Example:
        >>> from fnllm import models
        >>> models.from_config({"type": "gpt", "n_layer": 2}) == models.GPT(n_layer=2)
        True
        >>> type(models.from_config({"type": "bert", "n_layer": 2})).__name__
        'BERT'

    Args:
        config: a mapping with ``"type"`` (a registered kind: ``"gpt"``, ``"bert"``,
            ``"llama"``) and config fields.

    Returns:
        The model config (:class:`GPT`, :class:`BERT` or :class:`Llama`).

    Raises:
        ValueError: a missing or unknown ``"type"``, or unknown fields.
    """
    kind = config.get("type")
    if kind not in _TYPES:
        raise ValueError(f"models.from_config: type must be one of {sorted(_TYPES)}, got {kind!r}")
    return _TYPES[kind].from_config(config)


def hf_model_types() -> tuple[str, ...]:
    """The Hugging Face ``model_type`` values fnllm reads, from every registered config.

    Example:
        >>> from fnllm import models
        >>> {"gpt2", "bert"} <= set(models.hf_model_types())
        True

    Returns:
        Each config class's ``hf_model_types``, in registration order.
    """
    return tuple(t for cls in _TYPES.values() for t in cls.hf_model_types)


def hf_codec(model_type: str) -> ModuleType:
    """The codec module mapping a Hugging Face ``model_type`` to fnllm (``io.from_hf/to_hf``).

    The config class whose ``hf_model_types`` lists ``model_type`` names the module in its
    ``hf_codec_module``; the module's interface is documented in ``fnllm.models._hf``.

    Example:
        >>> from fnllm import models
        >>> codec = models.hf_codec("gpt2")
        >>> codec.default_arch(models.GPT(n_layer=1)), "GPT2Model" in codec.ARCHITECTURES
        ('GPT2LMHeadModel', True)

    Args:
        model_type: ``config.json``'s ``model_type`` (``"gpt2"``, ``"bert"``, ...).

    Returns:
        The codec module.

    Raises:
        ValueError: no registered config reads ``model_type`` (the supported ones listed).
    """
    for cls in _TYPES.values():
        if model_type in cls.hf_model_types and cls.hf_codec_module:
            return importlib.import_module(cls.hf_codec_module)
    raise ValueError(
        f"unsupported Hugging Face model_type {model_type!r} "
        f"(supported: {', '.join(map(repr, hf_model_types()))})"
    )
