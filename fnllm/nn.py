"""Pure layers: each is an ``init_*(key, ...) -> params`` function plus ``f(params, x, ...)``.

Parameters are plain dicts of tensors (``{"weight": ..., "bias": ...}``), so a model is a
composition of these functions over a nested tree, and ``torch.func.grad``, ``vmap`` and
``torch.compile`` see nothing but tensors. Weights follow PyTorch's layout (a linear weight is
``[out, in]``), which keeps the arithmetic identical to ``torch.nn`` and the Hugging Face
checkpoints one transpose away.

Attention runs on :func:`torch.nn.functional.scaled_dot_product_attention` (``impl="sdpa"``)
or on a plain matmul-softmax-matmul path (``impl="math"``) that batches under ``vmap``;
``impl="auto"`` picks the math path inside ``torch.func.vmap`` (SDPA has no batching rule on
CPU) and when attention dropout needs a key, SDPA otherwise.

The module ends with the boundary checks the models share: :func:`check_ids` and
:func:`check_shapes`, plus :func:`in_vmap` and :func:`checks_enabled`, which say when a
data-dependent check can run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_current_functorch_interpreter

from fnllm import random as jr
from fnllm import tree

__all__ = [
    "Impl",
    "Params",
    "attention",
    "attention_qkv",
    "check_ids",
    "check_shapes",
    "checks_enabled",
    "dot_product_attention",
    "dropout",
    "embedding",
    "gelu",
    "in_vmap",
    "init_attention",
    "init_embedding",
    "init_layer_norm",
    "init_linear",
    "init_mlp",
    "layer_norm",
    "linear",
    "make_attention_mask",
    "merge_heads",
    "mlp",
]

Params: TypeAlias = dict[str, Any]
Impl: TypeAlias = Literal["auto", "sdpa", "math"]
Approximate: TypeAlias = Literal["none", "tanh"]

_IMPLS = ("auto", "sdpa", "math")


# --------------------------------------------------------------------------- linear layers


def init_linear(
    key: Tensor, d_in: int, d_out: int, *, bias: bool = True, std: float = 0.02
) -> Params:
    """Initialise a linear layer: weight ``[d_out, d_in]`` from N(0, std), bias zeros.

    Example:
        >>> from fnllm import nn, random
        >>> p = nn.init_linear(random.key(0), 4, 3)
        >>> {k: tuple(v.shape) for k, v in p.items()}
        {'weight': (3, 4), 'bias': (3,)}

    Args:
        key: a ``fnllm.random`` key; the weight is drawn on its device.
        d_in: input features.
        d_out: output features.
        bias: whether to add a ``"bias"`` leaf.
        std: standard deviation of the weight.

    Returns:
        ``{"weight": [d_out, d_in], "bias": [d_out]}`` (no ``"bias"`` when ``bias=False``).
    """
    weight = jr.normal(key, (d_out, d_in), torch.float32) * std
    params: Params = {"weight": weight}
    if bias:
        params["bias"] = torch.zeros(d_out, dtype=weight.dtype, device=weight.device)
    return params


def linear(params: Params, x: Tensor) -> Tensor:
    """Apply ``x @ weight.T + bias`` over the last dimension (like ``torch.nn.Linear``).

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = {"weight": torch.eye(2) * 3, "bias": torch.ones(2)}
        >>> nn.linear(p, torch.tensor([[1.0, 2.0]]))
        tensor([[4., 7.]])

    Args:
        params: ``{"weight": [out, in]}`` and optionally ``"bias": [out]``.
        x: input ``[..., in]``.

    Returns:
        ``[..., out]``.
    """
    y = F.linear(x, params["weight"], params.get("bias"))
    if "lora_a" in params:  # LoRA adapter leaves (fnllm.finetune.lora); W stays untouched
        y = y + _lora_delta(params, x)
    return y


def _lora_delta(params: Params, x: Tensor) -> Tensor:
    """``scale * (x A^T) B^T``; ``[S, ...]`` adapters picked per row apply one set per example."""
    a, b, scale = params["lora_a"], params["lora_b"], params["lora_scale"].detach()
    if a.ndim == 2:
        return scale * F.linear(F.linear(x, a), b)
    h = torch.einsum("b...i,bri->b...r", x, a)
    return scale.reshape(-1, *[1] * (x.ndim - 1)) * torch.einsum("b...r,bor->b...o", h, b)


def init_embedding(key: Tensor, num: int, dim: int, *, std: float = 0.02) -> Params:
    """Initialise an embedding table ``[num, dim]`` from N(0, std).

    Example:
        >>> from fnllm import nn, random
        >>> nn.init_embedding(random.key(0), 10, 4)["weight"].shape
        torch.Size([10, 4])

    Args:
        key: a ``fnllm.random`` key.
        num: number of rows (vocabulary size, positions, ...).
        dim: embedding width.
        std: standard deviation.

    Returns:
        ``{"weight": [num, dim]}``.
    """
    return {"weight": jr.normal(key, (num, dim), torch.float32) * std}


def embedding(params: Params, ids: Tensor) -> Tensor:
    """Look up rows of an embedding table.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = {"weight": torch.arange(6.0).reshape(3, 2)}
        >>> nn.embedding(p, torch.tensor([2, 0]))
        tensor([[4., 5.],
                [0., 1.]])

    Args:
        params: ``{"weight": [num, dim]}``.
        ids: integer tensor of any shape with values in ``[0, num)``
            (validate untrusted ids with :func:`check_ids`).

    Returns:
        ``[*ids.shape, dim]``.
    """
    return F.embedding(ids, params["weight"])


def init_layer_norm(key: Tensor | None, dim: int) -> Params:
    """Initialise a layer norm: weight ones, bias zeros.

    Example:
        >>> from fnllm import nn
        >>> nn.init_layer_norm(None, 3)
        {'weight': tensor([1., 1., 1.]), 'bias': tensor([0., 0., 0.])}

    Args:
        key: unused (the initial values are fixed); a key only places the tensors on its
            device. Accepted so every ``init_*`` takes a key first.
        dim: normalised width.

    Returns:
        ``{"weight": [dim], "bias": [dim]}``.
    """
    device = key.device if key is not None else None
    return {
        "weight": torch.ones(dim, device=device),
        "bias": torch.zeros(dim, device=device),
    }


def layer_norm(params: Params, x: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Normalise the last dimension to zero mean, unit variance, then scale and shift.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = nn.init_layer_norm(None, 2)
        >>> nn.layer_norm(p, torch.tensor([[1.0, 3.0]]))
        tensor([[-1.0000,  1.0000]])

    Args:
        params: ``{"weight": [dim], "bias": [dim]}``.
        x: input ``[..., dim]``.
        eps: added to the variance.

    Returns:
        Same shape as ``x``.
    """
    return F.layer_norm(x, x.shape[-1:], params["weight"], params["bias"], eps)


def gelu(x: Tensor, approximate: Approximate = "none") -> Tensor:
    """Gaussian error linear unit, exact (BERT) or with the tanh approximation (GPT-2).

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.gelu(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([-0.1587,  0.0000,  0.8413])

    Args:
        x: any tensor.
        approximate: ``"none"`` for ``x * Phi(x)``, ``"tanh"`` for GPT-2's approximation
            (Hugging Face's ``gelu_new``).

    Returns:
        Same shape as ``x``.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return F.gelu(x, approximate=approximate)


def init_mlp(
    key: Tensor, d_model: int, d_ff: int, *, std: float = 0.02, proj_std: float | None = None
) -> Params:
    """Initialise a two-layer MLP ``d_model -> d_ff -> d_model``.

    Example:
        >>> from fnllm import nn, random
        >>> p = nn.init_mlp(random.key(0), 4, 16)
        >>> p["fc"]["weight"].shape, p["proj"]["weight"].shape
        (torch.Size([16, 4]), torch.Size([4, 16]))

    Args:
        key: a ``fnllm.random`` key.
        d_model: input and output width.
        d_ff: hidden width.
        std: standard deviation of the ``fc`` weight.
        proj_std: standard deviation of the ``proj`` weight (defaults to ``std``; GPT-2
            uses ``std / sqrt(2 * n_layer)`` for residual projections).

    Returns:
        ``{"fc": linear [d_ff, d_model], "proj": linear [d_model, d_ff]}``.
    """
    k_fc, k_proj = jr.split(key)
    return {
        "fc": init_linear(k_fc, d_model, d_ff, std=std),
        "proj": init_linear(k_proj, d_ff, d_model, std=std if proj_std is None else proj_std),
    }


def mlp(params: Params, x: Tensor, *, approximate: Approximate = "none") -> Tensor:
    """Apply ``proj(gelu(fc(x)))``.

    Example:
        >>> import torch
        >>> from fnllm import nn, random
        >>> p = nn.init_mlp(random.key(0), 4, 16)
        >>> nn.mlp(p, torch.ones(2, 3, 4)).shape
        torch.Size([2, 3, 4])

    Args:
        params: ``{"fc": ..., "proj": ...}`` from :func:`init_mlp`.
        x: input ``[..., d_model]``.
        approximate: the GELU variant, see :func:`gelu`.

    Returns:
        ``[..., d_model]``.
    """
    return linear(params["proj"], gelu(linear(params["fc"], x), approximate))


def dropout(key: Tensor | None, x: Tensor, rate: float) -> Tensor:
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    With ``key=None`` (evaluation) or ``rate == 0`` the input comes back unchanged. The mask
    is drawn with :func:`fnllm.random.bernoulli`, so the same key gives the same mask.

    Example:
        >>> import torch
        >>> from fnllm import nn, random
        >>> x = torch.ones(1000)
        >>> nn.dropout(None, x, 0.5) is x
        True
        >>> y = nn.dropout(random.key(0), x, 0.5)
        >>> sorted(set(y.tolist()))
        [0.0, 2.0]
        >>> torch.equal(y, nn.dropout(random.key(0), x, 0.5))
        True

    Args:
        key: a ``fnllm.random`` key on ``x``'s device, or ``None`` for no dropout.
        x: any tensor.
        rate: drop probability in ``[0, 1)``.

    Returns:
        A tensor like ``x``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    if key is None or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, tuple(x.shape))
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


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
            :func:`make_attention_mask` (with ``causal`` folded in), used as is. A model
            makes it once and hands it to every layer; ``causal`` then only matters when
            ``mask`` is ``None`` (the mask was dropped because it kept everything).
        key: a ``fnllm.random`` key for attention dropout, or ``None`` (no dropout).
        dropout: attention-probability dropout rate.
        impl: ``"sdpa"``, ``"math"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``[..., T, d_model]``. Query rows whose keys are all masked get finite values.
    """
    if attention_mask is not None:
        if mask is not None:
            raise ValueError("attention: pass attention_mask or a prepared mask, not both")
        mask = make_attention_mask(attention_mask, causal=causal)
    impl, drop = _resolve_impl(impl, key, dropout)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be a bool tensor, got {mask.dtype}")
        causal = False  # folded into the prepared mask
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
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    if drop_full and checks_enabled() and bool(attention_mask.all()):
        return None
    mask = attention_mask[..., None, None, :]  # [..., 1, 1, T]
    if causal:
        T = attention_mask.shape[-1]
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return _fix_empty_rows(mask)


def _fix_empty_rows(mask: Tensor) -> Tensor:
    """Let query rows with nothing to attend to see all keys (avoids 0/0 in the softmax)."""
    return mask | ~mask.any(-1, keepdim=True)


def _resolve_impl(impl: str, key: Tensor | None, dropout: float) -> tuple[str, bool]:
    """Validate ``impl`` and pick the path for ``"auto"``; also say whether dropout is on."""
    if impl not in _IMPLS:
        raise ValueError(f"attention: impl must be one of {_IMPLS}, got {impl!r}")
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
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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
    end: query ``i`` sees keys ``<= i + S - L``. A query row with every key masked (a padding
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
        k: keys ``[..., H, S, hd]``.
        v: values ``[..., H, S, hd_v]``.
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
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be a bool tensor, got {mask.dtype}")
        if causal:
            L, S = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            causal = False
        mask = _fix_empty_rows(mask)
    return _attend(q, k, v, mask, causal, key if drop else None, dropout, impl)


def _math_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, key: Tensor | None, rate: float
) -> Tensor:
    """Attention as matmul, softmax (in float32), matmul: batchable under ``vmap``."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    probs = dropout(key, probs, rate)
    return probs @ v


# ------------------------------------------------------------------------ boundary checks


def in_vmap() -> bool:
    """Whether the caller runs inside ``torch.func.vmap`` (at any level of nesting).

    Works in eager mode and while ``torch.compile`` traces (the answer is a trace-time
    constant, so it causes no graph break). ``torch.func.grad`` alone does not count.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.in_vmap()
        False
        >>> torch.func.vmap(lambda x: x + nn.in_vmap())(torch.zeros(2))
        tensor([1., 1.])

    Returns:
        ``True`` when a vmap transform is active.
    """
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        return _vmap_on_stack()
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == TransformType.Vmap for level in stack)


def _vmap_on_stack() -> bool:
    """Walk the functorch interpreter stack top-down (the form dynamo can trace)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    interpreter = retrieve_current_functorch_interpreter()
    if interpreter.key() == TransformType.Vmap:
        return True
    with interpreter.lower():
        return _vmap_on_stack()


def checks_enabled() -> bool:
    """Whether data-dependent input checks can run: eager mode and not inside ``vmap``.

    Example:
        >>> from fnllm import nn
        >>> nn.checks_enabled()
        True

    Returns:
        ``False`` while ``torch.compile`` traces or inside ``torch.func.vmap``.
    """
    return not torch.compiler.is_compiling() and not in_vmap()


def check_ids(ids: Any, size: int, *, name: str = "tokens") -> Tensor:
    """Validate integer ids for an embedding lookup of ``size`` rows.

    The dtype check always runs; the range check (which reads the values) runs only when
    :func:`checks_enabled`.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.check_ids(torch.tensor([[1, 2], [3, 9]]), 5)
        Traceback (most recent call last):
        ...
        ValueError: tokens: id 9 at [1, 1] >= vocab_size 5

    Args:
        ids: the candidate ids.
        size: the number of rows (ids must be in ``[0, size)``).
        name: how the error message names ``ids`` (the bound is called ``vocab_size`` for
            ``"tokens"`` and ``size`` otherwise).

    Returns:
        ``ids`` as an int64 or int32 tensor (other integer dtypes are widened to int64).

    Raises:
        TypeError: ``ids`` is not a tensor, or not of an integer dtype.
        ValueError: an id is out of range; the message names the first one and its index.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {ids.dtype}")
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    if checks_enabled() and ids.numel() > 0:
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if low < 0 or high >= size:
            bad = (ids < 0) | (ids >= size)
            where = [int(i) for i in bad.nonzero()[0]]
            value = int(ids[tuple(where)])
            bound = "vocab_size" if name == "tokens" else "size"
            relation = "< 0" if value < 0 else f">= {bound} {size}"
            raise ValueError(f"{name}: id {value} at {where} {relation}")
    return ids


def check_shapes(
    params: Any, expected: Mapping[str, tuple[int, ...]], *, name: str = "params"
) -> None:
    """Check that a tree has exactly the leaves ``expected`` names, with those shapes.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.check_shapes({"w": torch.zeros(2, 3)}, {"w": (2, 3)})
        >>> nn.check_shapes({"w": torch.zeros(2, 3)}, {"w": (3, 2)})
        Traceback (most recent call last):
        ...
        ValueError: params: w has shape (2, 3), expected (3, 2)

    Args:
        params: a nested dict/list tree of tensors.
        expected: ``{dotted.path: shape}``.
        name: how the error message names the tree.

    Raises:
        KeyError: a leaf is missing or unexpected (the message lists the paths).
        TypeError: a leaf is not a tensor.
        ValueError: a leaf has the wrong shape.
    """
    flat = tree.flatten(params)
    # LoRA adapters (``*.lora_a``, ``lora_b``, ``lora_scale``) ride along with a linear's leaves
    flat = {p: v for p, v in flat.items() if not p.rpartition(".")[2].startswith("lora_")}
    missing = [p for p in expected if p not in flat]
    extra = [p for p in flat if p not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise KeyError(f"{name}: " + "; ".join(parts))
    for path, shape in expected.items():
        leaf = flat[path]
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}: {path} is a {type(leaf).__name__}, expected a tensor")
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(
                f"{name}: {path} has shape {tuple(leaf.shape)}, expected {tuple(shape)}"
            )


def _few(paths: list[str], limit: int = 5) -> str:
    """Name up to ``limit`` paths, then say how many more."""
    shown = ", ".join(paths[:limit])
    return shown + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")
