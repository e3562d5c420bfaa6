"""The KV cache value and the bookkeeping that every decoder's cached forward shares.

A decoder's ``apply_cached`` (see :class:`fnllm.models._base.ModelConfig`) runs a block of
tokens written at slots ``length .. length + T - 1`` of a fixed-size cache, so that every
decode step sees the same shapes and ``torch.compile`` compiles it once. Rows are
left-padded: every row writes its next token into the same slot, a mask over the slots keeps
padding out of attention, and positions count real tokens only, so a padded row decodes
exactly as it would alone. What depends on the architecture (how a block turns hidden states
into keys and values, which positions it embeds) is the model's; what does not is here:

1. :func:`begin` once per forward: the slots written, each new token's position, the
   ``[B, 1, T, S]`` attention mask over the cache and the updated slot mask;
2. :func:`write` once per layer: the layer's new keys and values into its cache tensors;
3. :func:`finish` once per forward: the new :class:`KVCache`.

:func:`check` and :func:`check_inputs` are the eager boundary checks of a cached forward
(``apply(..., cache=)`` and ``fnllm.generate`` share them); :func:`apply_checked` is
``apply(..., cache=)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnllm import nn

__all__ = [
    "CacheStep",
    "KVCache",
    "apply_checked",
    "begin",
    "check",
    "check_inputs",
    "empty",
    "finish",
    "write",
]


class KVCache(NamedTuple):
    """Keys and values of every layer for a fixed number of slots, plus which slots are real.

    A plain pytree (a named tuple of tensors), so it passes through ``torch.compile`` and
    ``torch.utils._pytree`` unchanged. Rows are left-padded: slot ``length`` is the next one
    written, for every row at once.

    Example:
        >>> from fnllm import generate
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> cache = generate.init_cache(gpt, batch_size=3, size=10)
        >>> len(cache.keys), cache.keys[0].shape, cache.mask.shape, int(cache.length)
        (2, torch.Size([3, 2, 10, 4]), torch.Size([3, 10]), 0)

    Attributes:
        keys: one ``[B, n_kv_head, size, head_dim]`` tensor per layer (``model.kv_shape()``).
        values: one tensor per layer, shaped like ``keys``.
        mask: bool ``[B, size]``, True where a slot holds a real (not padding) token.
        length: int64 scalar tensor, the number of slots written so far.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor
    length: Tensor


class CacheStep(NamedTuple):
    """What every layer of one cached forward shares (made by :func:`begin`).

    Attributes:
        slots: int64 ``[T]``, the cache slots this forward writes.
        positions: int64 ``[B, T]``, each new token's position counted over real tokens only
            (padding does not advance it), for learned or rotary position embeddings.
        attend: bool ``[B, 1, T, S]``, True where a new token may attend to a slot (a real
            slot at or before its own).
        real: bool ``[B, S]``, the cache's slot mask after this forward.
        inplace: write the cache's own tensors (only for a cache nobody else holds).
    """

    slots: Tensor
    positions: Tensor
    attend: Tensor
    real: Tensor
    inplace: bool


def empty(
    n_layer: int,
    batch_size: int,
    size: int,
    n_kv_head: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """A cache of zeros with ``size`` slots for ``batch_size`` rows, no slot written."""
    shape = (batch_size, n_kv_head, size, head_dim)
    keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer))
    return KVCache(
        keys=keys,
        values=tuple(torch.zeros_like(k) for k in keys),
        mask=torch.zeros(batch_size, size, dtype=torch.bool, device=device),
        length=torch.zeros((), dtype=torch.int64, device=device),
    )


def begin(cache: KVCache, mask: Tensor, *, inplace: bool = False) -> CacheStep:
    """The slots, positions and attention mask of a forward over ``mask.shape[1]`` new tokens.

    Args:
        cache: the cache before this forward.
        mask: ``[B, T]`` keep-mask of the new tokens (True for real, False for left padding).
        inplace: write the cache's own tensors (``index_copy_``) instead of new ones.

    Returns:
        A :class:`CacheStep`.
    """
    mask = mask.bool()
    T, S = mask.shape[1], cache.mask.shape[1]
    device = mask.device
    slots = cache.length + torch.arange(T, device=device)  # [T]
    seen = cache.mask.sum(-1, keepdim=True)  # real tokens before this forward, [B, 1]
    put = Tensor.index_copy_ if inplace else Tensor.index_copy
    real = put(cache.mask, 1, slots, mask)  # [B, S]
    positions = (seen + mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    causal = torch.arange(S, device=device)[None, :] <= slots[:, None]  # [T, S]
    attend = real[:, None, None, :] & causal  # [B, 1, T, S]
    return CacheStep(slots, positions, attend, real, inplace)


def write(
    step: CacheStep, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """One layer's new keys and values ``[B, n_kv_head, T, head_dim]`` into its cache slots."""
    put = Tensor.index_copy_ if step.inplace else Tensor.index_copy
    k_cache = put(k_cache, 2, step.slots, k.to(k_cache.dtype))
    v_cache = put(v_cache, 2, step.slots, v.to(v_cache.dtype))
    return k_cache, v_cache


def finish(cache: KVCache, step: CacheStep, keys: list[Tensor], values: list[Tensor]) -> KVCache:
    """The cache after a forward that wrote ``len(step.slots)`` slots of every layer."""
    T = step.slots.shape[0]
    length = cache.length.add_(T) if step.inplace else cache.length + T
    return KVCache(tuple(keys), tuple(values), step.real, length)


def check(model: Any, cache: Any, batch: int, needed: int) -> None:
    """The cache fits the model (layers, ``model.kv_shape()``) and the batch, and has
    ``needed`` free slots (eager only: it reads ``cache.length``)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
    if len(cache.keys) != model.n_layer or len(cache.values) != model.n_layer:
        raise ValueError(f"cache: {len(cache.keys)} layers, the model has {model.n_layer}")
    want = (batch, *model.kv_shape()[:1], cache.mask.shape[-1], *model.kv_shape()[1:])
    if tuple(cache.keys[0].shape) != want or cache.mask.shape[0] != batch:
        raise ValueError(
            f"cache: keys of shape {tuple(cache.keys[0].shape)} do not fit a batch of {batch} "
            f"for this model (expected {want})"
        )
    free = cache.mask.shape[-1] - int(cache.length)
    if needed > free:
        raise ValueError(f"cache: {needed} tokens do not fit in the {free} free slots")


def check_inputs(
    model: Any, params: Any, tokens: Any, attention_mask: Any, cache: Any, where: str
) -> tuple[Tensor, Tensor]:
    """Check a cached forward's inputs: a decoder, ids ``[B, T]``, a ``[B, T]`` mask with
    padding on the left only (default: all real) and, in eager mode, the parameter tree
    and the cache (:func:`check`). Returns the ids and the bool mask."""
    model.check_decoder(where)
    tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected shape [B, T] with T >= 1, got {tuple(tokens.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens, dtype=torch.bool)
    elif not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask
        raise ValueError(f"attention_mask: expected shape {tuple(tokens.shape)}, got {got}")
    attention_mask = attention_mask.bool()
    if nn.checks_enabled():
        model.check_params(params)
        check(model, cache, tokens.shape[0], tokens.shape[1])
        if not bool(attention_mask[:, -1].all()):
            row = int((~attention_mask[:, -1]).nonzero()[0])
            raise ValueError(f"attention_mask: row {row} ends in padding (pad on the left)")
    return tokens, attention_mask


def apply_checked(
    model: Any, params: Any, tokens: Any, attention_mask: Any, cache: Any
) -> tuple[Tensor, KVCache]:
    """``model.apply(params, tokens, attention_mask=..., cache=cache)``: the checked cached
    forward, logits ``[B, T, V]`` for every new token and the new cache."""
    tokens, attention_mask = check_inputs(model, params, tokens, attention_mask, cache, "apply")
    x, cache = model.apply_cached(params, tokens, attention_mask, cache)
    return model.logits(params, x), cache
