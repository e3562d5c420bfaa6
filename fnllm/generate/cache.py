"""The KV cache and the cached forward pass of a GPT: ``init_cache``, ``prefill``, ``decode_step``.

The cache holds a fixed number of slots, so every decode step sees the same shapes and
``torch.compile`` compiles it once. Rows are left-padded: every row writes its next token into
the same slot, a mask over the slots keeps padding out of attention, and positions count real
tokens only, so a padded row decodes exactly as it would alone. The forward pass is built from
the layer functions in :mod:`fnllm.nn` on :class:`~fnllm.models.GPT`'s parameter tree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import nn
from fnllm.models import GPT

__all__ = ["KVCache", "decode_step", "init_cache", "prefill"]

Params = dict[str, Any]


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
        keys: one ``[B, n_head, size, head_dim]`` tensor per layer.
        values: one tensor per layer, shaped like ``keys``.
        mask: bool ``[B, size]``, True where a slot holds a real (not padding) token.
        length: int64 scalar tensor, the number of slots written so far.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor
    length: Tensor


def init_cache(
    model: GPT,
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
        model: the :class:`~fnllm.models.GPT` config.
        batch_size: number of rows.
        size: number of slots (prompt width plus new tokens); at most ``model.max_len``.
        dtype: dtype of keys and values (the params' dtype).
        device: where to allocate.

    Returns:
        A :class:`KVCache` of zeros with no slot written.
    """
    _check_gpt(model)
    for name, value in (("batch_size", batch_size), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if size > model.max_len:
        raise ValueError(f"size: {size} slots > max_len {model.max_len}")
    shape = (batch_size, model.n_head, size, model.d_model // model.n_head)
    zeros = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.n_layer))
    return KVCache(
        keys=zeros,
        values=tuple(torch.zeros_like(z) for z in zeros),
        mask=torch.zeros(batch_size, size, dtype=torch.bool, device=device),
        length=torch.zeros((), dtype=torch.int64, device=device),
    )


def prefill(
    model: GPT,
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
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        cache: a :class:`KVCache` with at least ``T`` free slots.
        tokens: int ids ``[B, T]``; padding must be on the left (see :func:`pad_prompts`).
        attention_mask: ``[B, T]``, 1/True for real tokens (default: all real).

    Returns:
        ``(logits [B, V] for the last position, the updated cache)``.
    """
    _check_gpt(model)
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
        _check_cache(model, cache, tokens.shape[0], tokens.shape[1])
        if not bool(attention_mask[:, -1].all()):
            row = int((~attention_mask[:, -1]).nonzero()[0])
            raise ValueError(f"attention_mask: row {row} ends in padding (pad on the left)")
    x, cache = _forward(model, params, cache, tokens, attention_mask)
    return _logits(model, params, x[:, -1]), cache


def decode_step(
    model: GPT, params: Params, cache: KVCache, tokens: Tensor
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
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        cache: a :class:`KVCache` with a free slot.
        tokens: int ids ``[B]``, the latest token of every row.

    Returns:
        ``(logits [B, V], the updated cache)``.
    """
    if nn.checks_enabled():
        _check_gpt(model)
        tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected shape [B], got {tuple(tokens.shape)}")
        _check_cache(model, cache, tokens.shape[0], 1)
    return _decode(model, params, cache, tokens)


# ----------------------------------------------------------------------------- internals


def _decode(model: GPT, params: Params, cache: KVCache, tokens: Tensor) -> tuple[Tensor, KVCache]:
    """:func:`decode_step` without the checks."""
    x, cache = _forward(model, params, cache, tokens[:, None], torch.ones_like(tokens[:, None]))
    return _logits(model, params, x[:, 0]), cache


def _forward(
    model: GPT, params: Params, cache: KVCache, tokens: Tensor, mask: Tensor, inplace: bool = False
) -> tuple[Tensor, KVCache]:
    """GPT's blocks over ``tokens [B, T]`` written at slots ``length .. length + T - 1``.

    Mirrors ``GPT.apply`` (pre-LN blocks, GELU-tanh MLP, final layer norm), with positions
    counted over real tokens and attention over the cache's real slots up to each query.
    Returns the final hidden states ``[B, T, D]`` (after ``ln_f``) and the new cache. With
    ``inplace=True`` the cache's own tensors are written (``index_copy_``, ``add_``) and
    returned: only for a cache nobody else holds (the one :func:`~fnllm.generate.sample`
    allocates); the public functions always pass ``False``.
    """
    mask = mask.bool()
    T, S = tokens.shape[1], cache.mask.shape[1]
    slots = cache.length + torch.arange(T, device=tokens.device)  # [T]
    seen = cache.mask.sum(-1, keepdim=True)  # real tokens before this block, [B, 1]
    write = Tensor.index_copy_ if inplace else Tensor.index_copy
    real = write(cache.mask, 1, slots, mask)  # [B, S]
    positions = (seen + mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    causal = torch.arange(S, device=tokens.device)[None, :] <= slots[:, None]  # [T, S]
    attend = real[:, None, None, :] & causal  # [B, 1, T, S]
    impl: nn.Impl = (
        "math" if T == 1 else "auto"
    )  # one query: fused by the compiler, no flash set-up
    embed = params["embed"]
    x = nn.embedding(embed["tokens"], tokens) + nn.embedding(embed["positions"], positions)
    keys, values = [], []
    for p, k_cache, v_cache in zip(params["blocks"], cache.keys, cache.values):
        h = nn.layer_norm(p["ln_1"], x, eps=model.ln_eps)
        q, k, v = nn.attention_qkv(p["attn"], h, n_head=model.n_head)
        k_cache = write(k_cache, 2, slots, k.to(k_cache.dtype))
        v_cache = write(v_cache, 2, slots, v.to(v_cache.dtype))
        keys.append(k_cache)
        values.append(v_cache)
        y = nn.dot_product_attention(q, k_cache, v_cache, mask=attend, impl=impl)
        x = x + nn.linear(p["attn"]["proj"], nn.merge_heads(y))
        h = nn.mlp(p["mlp"], nn.layer_norm(p["ln_2"], x, eps=model.ln_eps), approximate="tanh")
        x = x + h
    x = nn.layer_norm(params["ln_f"], x, eps=model.ln_eps)
    length = cache.length.add_(T) if inplace else cache.length + T
    return x, KVCache(tuple(keys), tuple(values), real, length)


def _logits(model: GPT, params: Params, x: Tensor) -> Tensor:
    """The language-model head (tied to the token embedding unless ``tie_head=False``)."""
    head = params["embed"]["tokens"]["weight"] if model.tie_head else params["head"]["weight"]
    return F.linear(x, head)


def _check_gpt(model: Any) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model: expected a fnllm.models.GPT, got {type(model).__name__}")


def _check_cache(model: GPT, cache: Any, batch: int, needed: int) -> None:
    """The cache fits the model and the batch and has ``needed`` free slots (eager only)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
    if len(cache.keys) != model.n_layer or len(cache.values) != model.n_layer:
        raise ValueError(f"cache: {len(cache.keys)} layers, the model has {model.n_layer}")
    want = (batch, model.n_head, cache.mask.shape[-1], model.d_model // model.n_head)
    if tuple(cache.keys[0].shape) != want or cache.mask.shape[0] != batch:
        raise ValueError(
            f"cache: keys of shape {tuple(cache.keys[0].shape)} do not fit a batch of {batch} "
            f"for this model (expected {want})"
        )
    free = cache.mask.shape[-1] - int(cache.length)
    if needed > free:
        raise ValueError(f"cache: {needed} tokens do not fit in the {free} free slots")
