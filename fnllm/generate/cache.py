"""The KV cache of a decoder: ``init_cache``, ``prefill``, ``decode_step`` (and ``KVCache``).

The cache holds a fixed number of slots, so every decode step sees the same shapes and
``torch.compile`` compiles it once. Rows are left-padded: every row writes its next token into
the same slot, a mask over the slots keeps padding out of attention, and positions count real
tokens only, so a padded row decodes exactly as it would alone. The forward pass is the
model's own (``model.apply_cached``: its blocks with a cache slot each, see
:mod:`fnllm.models._cache`), so this works for every decoder (GPT, Llama, ...); an encoder gets
a named ``TypeError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fnllm import nn
from fnllm.models import _cache
from fnllm.models._cache import KVCache

__all__ = ["KVCache", "decode_step", "init_cache", "prefill"]

Params = dict[str, Any]


def init_cache(
    model: Any,
    batch_size: int,
    size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """Allocate an empty cache of ``size`` slots for ``batch_size`` rows.

    Example:
        >>> from fnllm import generate
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=1, n_head=2, d_model=8, max_len=16)
        >>> generate.init_cache(gpt, 2, 16).values[0].shape
        torch.Size([2, 2, 16, 4])

    Args:
        model: a decoder config (:class:`~fnllm.models.GPT`, ...).
        batch_size: number of rows.
        size: number of slots (prompt width plus new tokens); at most ``model.max_len``.
        dtype: dtype of keys and values (the params' dtype).
        device: where to allocate.

    Returns:
        A :class:`KVCache` of zeros with no slot written.

    Raises:
        TypeError: ``model`` is not a decoder, or ``dtype`` is not a floating-point dtype.
        ValueError: a bad size.
    """
    _check_decoder(model, "init_cache")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"init_cache: dtype must be a floating-point torch.dtype (the params' dtype), "
            f"got {dtype!r}"
        )
    return model.init_cache(batch_size, size, dtype=dtype, device=device)


def prefill(
    model: Any,
    params: Params,
    cache: KVCache,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, KVCache]:
    """Run a block of tokens through the model, writing their keys and values to the cache.

    Usually the (left-padded) prompts into an empty cache; a later call continues where the
    cache stops. Only the last position's logits are computed (the next token's).

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> tokens = torch.tensor([[3, 4, 5]])
        >>> logits, cache = generate.prefill(gpt, params, generate.init_cache(gpt, 1, 8), tokens)
        >>> torch.allclose(logits, gpt.apply(params, tokens)[:, -1], atol=1e-5), int(cache.length)
        (True, 3)

    Args:
        model: a decoder config (:class:`~fnllm.models.GPT`, ...).
        params: its parameter tree.
        cache: a :class:`KVCache` with at least ``T`` free slots.
        tokens: int ids ``[B, T]``; padding must be on the left (see :func:`pad_prompts`).
        attention_mask: ``[B, T]``, 1/True for real tokens (default: all real).

    Returns:
        ``(logits [B, V] for the last position, the updated cache)``.
    """
    _check_decoder(model, "prefill")
    tokens, attention_mask = _cache.check_inputs(
        model, params, tokens, attention_mask, cache, "prefill"
    )
    x, cache = model.apply_cached(params, tokens, attention_mask, cache)
    return model.logits(params, x[:, -1]), cache


def decode_step(
    model: Any, params: Params, cache: KVCache, tokens: Tensor
) -> tuple[Tensor, KVCache]:
    """Feed one token per row and get the next-token logits: a pure function, static shapes.

    Every call has the same shapes (the cache does not grow; its ``length`` is a tensor), so
    ``torch.compile(decode_step, fullgraph=True)`` compiles once for all steps. In eager mode
    the ids and the free space are checked first.

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> params, tokens = gpt.init(random.key(0)), torch.tensor([[3, 4, 5, 6]])
        >>> _, cache = generate.prefill(gpt, params, generate.init_cache(gpt, 1, 8), tokens[:, :3])
        >>> logits, cache = generate.decode_step(gpt, params, cache, tokens[:, 3])
        >>> full = gpt.apply(params, tokens)[:, -1]
        >>> torch.allclose(logits, full, atol=1e-5), int(cache.length)
        (True, 4)

    Args:
        model: a decoder config (:class:`~fnllm.models.GPT`, ...).
        params: its parameter tree.
        cache: a :class:`KVCache` with a free slot.
        tokens: int ids ``[B]``, the latest token of every row.

    Returns:
        ``(logits [B, V], the updated cache)``.
    """
    if nn.checks_enabled():
        _check_decoder(model, "decode_step")
        tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected shape [B], got {tuple(tokens.shape)}")
        model.check_params(params)  # as prefill: another model's params would run silently
        _check_cache(model, cache, tokens.shape[0], 1)
    return _decode(model, params, cache, tokens)


# ----------------------------------------------------------------------------- internals


def _decode(model: Any, params: Params, cache: KVCache, tokens: Tensor) -> tuple[Tensor, KVCache]:
    """:func:`decode_step` without the checks."""
    x, cache = model.apply_cached(params, tokens[:, None], torch.ones_like(tokens[:, None]), cache)
    return model.logits(params, x[:, 0]), cache


def _check_decoder(model: Any, where: str) -> None:
    """A model config that is a decoder (the model's own named error for an encoder)."""
    check = getattr(model, "check_decoder", None)
    if check is None:
        raise TypeError(f"{where}: model: expected a model config, got {type(model).__name__}")
    check(where)


def _check_cache(model: Any, cache: Any, batch: int, needed: int) -> None:
    """The cache fits the model (``model.kv_shape()``) and the batch and has ``needed`` free
    slots (eager only)."""
    _cache.check(model, cache, batch, needed)
