"""Attention of :mod:`fnllm.nn` (private; see that module): SDPA and math paths, masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import _checks, _cpu16
from fnllm import random as jr
from fnllm._checks import checks_enabled, in_vmap
from fnllm.nn._layers import Impl, Params, dropout, init_linear, linear

_IMPLS = ("auto", "sdpa", "math")

# ------------------------------------------------------------------------------ attention


def init_attention(
    key: Tensor, d_model: int, *, std: float = 0.02, proj_std: float | None = None
) -> Params:
    """Initialise multi-head self-attention: a fused ``qkv`` projection and an output ``proj``.

    Example:
        >>> from fnllm import nn, random
        >>> p = nn.init_attention(random.key(0), 8)
        >>> p["qkv"]["weight"].shape, p["proj"]["weight"].shape
        (torch.Size([24, 8]), torch.Size([8, 8]))

    Args:
        key: a ``fnllm.random`` key.
        d_model: model width (all heads together).
        std: standard deviation of the ``qkv`` weight.
        proj_std: standard deviation of the ``proj`` weight (defaults to ``std``).

    Returns:
        ``{"qkv": linear [3 * d_model, d_model], "proj": linear [d_model, d_model]}``; the
        ``qkv`` rows are ``[q; k; v]``, heads contiguous within each.
    """
    k_qkv, k_proj = jr.split(key)
    return {
        "qkv": init_linear(k_qkv, d_model, 3 * d_model, std=std),
        "proj": init_linear(k_proj, d_model, d_model, std=std if proj_std is None else proj_std),
    }


def attention(
    params: Params,
    x: Tensor,
    *,
    n_head: int,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    mask: Tensor | None = None,
    key: Tensor | None = None,
    dropout: float = 0.0,
    impl: Impl = "auto",
) -> Tensor:
    """Multi-head self-attention: ``proj(merge_heads(attend(q, k, v)))``.

    The three steps are public (:func:`attention_qkv`, :func:`dot_product_attention`,
    :func:`merge_heads`) so a decoder with a KV cache can concatenate past keys and values
    between the first two.

    Example:
        >>> import torch
        >>> from fnllm import nn, random
        >>> p = nn.init_attention(random.key(0), 8)
        >>> x = torch.randn(2, 5, 8)
        >>> y = nn.attention(p, x, n_head=2, causal=True)
        >>> y.shape
        torch.Size([2, 5, 8])
        >>> torch.allclose(y, nn.attention(p, x, n_head=2, causal=True, impl="math"), atol=1e-6)
        True

    Args:
        params: ``{"qkv": ..., "proj": ...}`` from :func:`init_attention`.
        x: input ``[..., T, d_model]``.
        n_head: number of heads; must divide ``d_model``.
        causal: mask future positions (query ``i`` sees keys ``<= i``).
        attention_mask: key-padding mask ``[..., T]``, 1/``True`` = keep, 0/``False`` = pad.
        mask: instead of ``attention_mask``, a mask already made by
            :func:`make_attention_mask`. A model makes it once and hands it to every layer.
            With ``causal=True``, a padding-only mask (``[..., 1, 1, T]``) gets the causal
            triangle combined in; a square mask (``[..., 1, T, T]``) must already be causal
            (made with ``causal=True``): one that lets a query see a later key raises
            (checked eagerly, outside ``vmap``), never silently dropping ``causal``.
        key: a ``fnllm.random`` key for attention dropout, or ``None`` (no dropout).
        dropout: attention-probability dropout rate.
        impl: ``"sdpa"``, ``"math"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``[..., T, d_model]``. Query rows whose keys are all masked get finite values.

    Raises:
        ValueError: a mask whose length is not ``T``, or ``causal=True`` with a prepared
            mask that is not causal.
    """
    T = x.shape[-2] if isinstance(x, Tensor) and x.ndim >= 2 else None
    if attention_mask is not None:
        if mask is not None:
            raise ValueError("attention: pass attention_mask or a prepared mask, not both")
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention: attention_mask must be a tensor, got {type(attention_mask).__name__}"
            )
        if T is not None and (attention_mask.ndim == 0 or attention_mask.shape[-1] != T):
            raise ValueError(
                f"attention: attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"[..., {T}] (one entry per position of x {tuple(x.shape)})"
            )
        mask = make_attention_mask(attention_mask, causal=causal)
        causal = causal and mask is None
    impl, drop = _resolve_impl(impl, key, dropout)
    if mask is not None:
        mask = _prepared(mask, T, causal)
        causal = False  # now folded into the mask
    q, k, v = attention_qkv(params, x, n_head=n_head)
    y = _attend(q, k, v, mask, causal, key if drop else None, dropout, impl)
    return linear(params["proj"], merge_heads(y))


def make_attention_mask(
    attention_mask: Tensor | None, *, causal: bool = False, drop_full: bool = True
) -> Tensor | None:
    """Turn a key-padding mask into the boolean mask self-attention uses, once per forward.

    The result broadcasts against attention scores ``[..., H, T, T]``: ``[..., 1, 1, T]``
    for a padding mask alone, ``[..., 1, T, T]`` with the causal triangle folded in. A query
    row left with no key to attend to (a padding query under a causal mask, or an all-padding
    sequence) attends to every key instead, so it gives finite values rather than NaN.

    In eager mode (not while ``torch.compile`` traces, not inside ``vmap``) a mask that keeps
    every position comes back as ``None`` when ``drop_full`` is set: attention then runs
    unmasked (with ``causal=True`` for a causal model) on SDPA's fastest kernel, which gives
    the same result. Checking costs one host synchronisation.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.make_attention_mask(torch.tensor([[1, 1, 0]])).shape
        torch.Size([1, 1, 1, 3])
        >>> nn.make_attention_mask(torch.tensor([[0, 1, 1]]), causal=True)[0, 0].int()
        tensor([[1, 1, 1],
                [0, 1, 0],
                [0, 1, 1]], dtype=torch.int32)
        >>> nn.make_attention_mask(torch.ones(2, 3)) is None
        True

    Args:
        attention_mask: key-padding mask ``[..., T]``, 1/``True`` = keep, 0/``False`` = pad,
            or ``None``.
        causal: fold in the causal mask (query ``i`` sees keys ``<= i``).
        drop_full: return ``None`` for an all-keep mask where that can be checked.

    Returns:
        A bool tensor to pass as ``attention(..., mask=...)``, or ``None`` (no masking
        beyond ``causal``).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.is_complex():
        what = attention_mask.dtype if isinstance(attention_mask, Tensor) else type(attention_mask)
        raise TypeError(f"attention_mask: expected a bool, integer or float tensor, got {what}")
    if attention_mask.ndim == 0:
        raise ValueError("attention_mask: expected [..., T], got a scalar")
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    if drop_full and checks_enabled() and bool(attention_mask.all()):
        return None
    mask = attention_mask[..., None, None, :]  # [..., 1, 1, T]
    if causal:
        T = attention_mask.shape[-1]
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return _fix_empty_rows(mask)


def _prepared(mask: object, T: int | None, causal: bool) -> Tensor:
    """Check a prepared mask against ``T`` and fold ``causal`` into it (see :func:`attention`)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"attention: mask must be a bool tensor, got {what}")
    if mask.ndim < 2 or (T is not None and mask.shape[-1] != T):
        raise ValueError(
            f"attention: mask has shape {tuple(mask.shape)}, expected [..., 1 or {T}, {T}] "
            "(from make_attention_mask)"
        )
    if not causal:
        return mask
    rows = mask.shape[-2]
    if rows == 1:  # padding only: fold the triangle in, then re-fix the rows it emptied
        tri = torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device)
        return _fix_empty_rows(mask & tri.tril())
    if checks_enabled() and not _checks.wrapped(mask):
        # Causal already? Every row is either fixed (all keys) or sees no later key.
        ones = torch.ones(rows, mask.shape[-1], dtype=torch.bool, device=mask.device)
        later = mask & ~ones.tril()
        if bool((later.any(-1) & ~mask.all(-1)).any()):
            raise ValueError(
                "attention: causal=True, but the prepared mask lets a query see a later key; "
                "make it with make_attention_mask(attention_mask, causal=True)"
            )
    return mask


def _fix_empty_rows(mask: Tensor) -> Tensor:
    """Let query rows with nothing to attend to see all keys (avoids 0/0 in the softmax)."""
    return mask | ~mask.any(-1, keepdim=True)


def _resolve_impl(impl: Impl, key: Tensor | None, dropout: float) -> tuple[Impl, bool]:
    """Validate ``impl`` and pick the path for ``"auto"``; also say whether dropout is on."""
    if impl not in _IMPLS:
        raise ValueError(f"attention: impl must be one of {_IMPLS}, got {impl!r}")
    if not isinstance(dropout, Tensor):
        _checks.check_range("attention: dropout", dropout, low=0.0, high=1.0, high_open=True)
    drop = key is not None and dropout > 0.0
    if impl == "auto":
        impl = "math" if drop or in_vmap() else "sdpa"
    elif impl == "sdpa" and drop:
        raise ValueError(
            "attention: dropout with a key needs impl='math' or 'auto' "
            "(SDPA would draw from the global RNG)"
        )
    return impl, drop


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    key: Tensor | None,
    rate: float,
    impl: str,
) -> Tensor:
    """Attention with a ready mask (row-fixed, causal folded in) or ``causal`` without one."""
    if causal and (impl == "math" or q.shape[-2] != k.shape[-2]):
        # An explicit lower-triangular mask, aligned to the last key.
        L, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        if L > S:
            mask = _fix_empty_rows(mask)
        causal = False
    if impl == "sdpa":
        gqa = k.shape[-3] != q.shape[-3]  # grouped-query attention: fewer key/value heads
        if _cpu16.upcasts(q, k) and not (q.requires_grad or k.requires_grad or v.requires_grad):
            # 16-bit on a CPU without 16-bit units, nothing to keep for a backward pass
            # (decoding, evaluation): float32 is faster. With a backward pass it stays 16-bit,
            # whose kernel keeps half the bytes float32 copies would.
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, enable_gqa=gqa
            )
            return y.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )
    return _math_attention(q, k, v, mask, key, rate)


def attention_qkv(params: Params, x: Tensor, *, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``x`` to per-head queries, keys and values.

    Example:
        >>> import torch
        >>> from fnllm import nn, random
        >>> p = nn.init_attention(random.key(0), 8)
        >>> [t.shape for t in nn.attention_qkv(p, torch.ones(2, 5, 8), n_head=2)]
        [torch.Size([2, 2, 5, 4]), torch.Size([2, 2, 5, 4]), torch.Size([2, 2, 5, 4])]

    Args:
        params: attention params with a ``"qkv"`` linear of shape ``[3 * D, D]``.
        x: input ``[..., T, D]``.
        n_head: number of heads; must divide ``D``.

    Returns:
        ``(q, k, v)``, each ``[..., n_head, T, D // n_head]``.
    """
    _checks.check_int("attention: n_head", n_head, low=1)
    d_model = x.shape[-1]
    if d_model % n_head:
        raise ValueError(f"attention: d_model {d_model} is not divisible by n_head {n_head}")
    qkv = linear(params["qkv"], x)  # [..., T, 3D]
    qkv = qkv.unflatten(-1, (3, n_head, d_model // n_head))  # [..., T, 3, H, hd]
    q, k, v = qkv.movedim(-3, 0).transpose(-2, -3).unbind(0)  # 3 x [..., H, T, hd]
    return q, k, v


def merge_heads(y: Tensor) -> Tensor:
    """Concatenate heads: ``[..., H, T, hd] -> [..., T, H * hd]``.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.merge_heads(torch.zeros(2, 3, 5, 4)).shape
        torch.Size([2, 5, 12])

    Args:
        y: per-head outputs ``[..., H, T, hd]``.

    Returns:
        ``[..., T, H * hd]``.
    """
    return y.transpose(-2, -3).flatten(-2)


def dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    key: Tensor | None = None,
    dropout: float = 0.0,
    impl: Impl = "auto",
) -> Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(hd)) v`` with masks.

    With more keys than queries (``S > L``, a KV cache) the causal mask is aligned to the
    end: query ``i`` sees keys ``<= i + S - L``. Grouped-query attention: with
    ``H_kv`` key/value heads dividing the ``H`` query heads, query head ``h`` attends with
    key/value head ``h // (H / H_kv)`` (as `transformers`' ``repeat_kv``), without copying
    the keys and values ``H / H_kv`` times. A query row with every key masked (a padding
    query under a causal mask) attends to all keys instead of giving NaN; its output is
    meaningless but finite, and the same on both paths.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> q = k = torch.zeros(1, 1, 3, 2)
        >>> v = torch.arange(3.0).reshape(1, 1, 3, 1)
        >>> nn.dot_product_attention(q, k, v, causal=True).flatten()
        tensor([0.0000, 0.5000, 1.0000])

    Args:
        q: queries ``[..., H, L, hd]``.
        k: keys ``[..., H_kv, S, hd]``; ``H_kv`` divides ``H`` (``H_kv == H``: multi-head).
        v: values ``[..., H_kv, S, hd_v]``.
        causal: apply the causal mask.
        mask: boolean keep-mask broadcastable to ``[..., H, L, S]`` (``True`` = attend).
        key: a ``fnllm.random`` key for dropout on the attention probabilities.
        dropout: attention dropout rate (used only with a key).
        impl: ``"sdpa"``, ``"math"`` or ``"auto"``: math under ``vmap`` or with dropout,
            SDPA otherwise. SDPA draws dropout from the global RNG, so ``impl="sdpa"``
            refuses a dropout key.

    Returns:
        ``[..., H, L, hd_v]``.
    """
    impl, drop = _resolve_impl(impl, key, dropout)
    _check_heads(q, k, v)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be a bool tensor, got {mask.dtype}")
        if causal:
            L, S = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            causal = False
        mask = _fix_empty_rows(mask)
    return _attend(q, k, v, mask, causal, key if drop else None, dropout, impl)


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Keys and values have one head count, and it divides the queries'."""
    if q.ndim < 3 or k.ndim < 3 or v.ndim < 3:
        raise ValueError(
            f"attention: q, k, v must be [..., heads, T, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    h, h_k, h_v = q.shape[-3], k.shape[-3], v.shape[-3]
    if h_k != h_v or h % h_k:
        raise ValueError(
            f"attention: {h} query heads need key and value heads that divide them, got "
            f"{h_k} key heads and {h_v} value heads"
        )


def _math_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, key: Tensor | None, rate: float
) -> Tensor:
    """Attention as matmul, softmax (in float32), matmul: batchable under ``vmap``.

    With fewer key/value heads than query heads (grouped-query attention) the query heads
    are grouped ``[..., H_kv, H / H_kv, L, hd]`` and each group meets its one key/value head
    by broadcasting, so nothing is copied.
    """
    h, h_kv = q.shape[-3], k.shape[-3]
    if h != h_kv:
        q = q.unflatten(-3, (h_kv, h // h_kv))  # [..., H_kv, G, L, hd]
        k, v = k.unsqueeze(-3), v.unsqueeze(-3)  # [..., H_kv, 1, S, hd]
        if mask is not None and mask.ndim >= 3:
            mask = mask.unsqueeze(-3) if mask.shape[-3] == 1 else mask.unflatten(-3, (h_kv, -1))
        return _math_scores(q, k, v, mask, key, rate).flatten(-4, -3)
    return _math_scores(q, k, v, mask, key, rate)


def _math_scores(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, key: Tensor | None, rate: float
) -> Tensor:
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    probs = dropout(key, probs, rate)
    return probs @ v
