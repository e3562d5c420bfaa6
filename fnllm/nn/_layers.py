"""Layers of :mod:`fnllm.nn` (private; see that module): linear, embedding, layer norm,
GELU, MLP and dropout, each an ``init_*`` function plus an apply function.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import _cpu16, _quant
from fnllm import random as jr
from fnllm._checks import check_ids, check_int, check_number, checks_enabled
from fnllm.nn._adapters import adapter_delta, has_adapter

Params: TypeAlias = dict[str, Any]
Impl: TypeAlias = Literal["auto", "sdpa", "math"]
Approximate: TypeAlias = Literal["none", "tanh"]


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
    _check_dims("init_linear", d_in=d_in, d_out=d_out)
    _check_std("init_linear", std)
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
        params: ``{"weight": [out, in]}`` and optionally ``"bias": [out]``; or one layer
            per row of the batch, ``weight [B, out, in]`` and ``bias [B, out]`` (what
            ``finetune.lora.pick`` gives a head stacked per set). The weight may be a
            quantized leaf (:func:`fnllm.io.quantize`): it is dequantized on the fly in forward
            and backward and gets no gradient.
        x: input ``[..., in]`` (``[B, ..., in]`` for per-row layers).

    Returns:
        ``[..., out]``, in the weight's dtype: ``x`` is cast to it first, so a bf16 base
        layer runs in bf16 whatever the input. A LoRA adapter on the layer runs in its own
        dtype (float32 adapters stay float32 on a bf16 base) and its output is cast back.
        On a CPU without bf16/fp16 matrix units (no AVX512-BF16 or AMX) a 16-bit product is
        computed in float32, a block of the weight at a time, and rounded back: the same
        values up to the order of the sums, several times faster than PyTorch's 16-bit CPU
        kernels there, and nothing more kept for the backward pass.

    Raises:
        ValueError: the width of ``x`` is not the weight's ``in``, or the bias is not ``[out]``.
    """
    weight, bias = _param(params, "weight", "linear"), params.get("bias")
    _check_input("linear", x)
    if weight.ndim == 3 and x.ndim >= 2 and x.shape[0] == weight.shape[0]:
        return _per_row_linear(params, x)  # one layer per row (finetune.lora.stack + pick)
    if weight.ndim != 2 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"linear: x has width {x.shape[-1]} (shape {tuple(x.shape)}), expected "
            f"{weight.shape[-1]} to match weight {tuple(weight.shape)} [out, in]"
        )
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:1]):
        raise ValueError(
            f"linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)"
        )
    # mixed precision: the input is cast to the weight's dtype (a bf16 frozen base runs in
    # bf16); an adapter runs in its own dtype (float32 LoRA) and its delta is cast back
    x_w = x.to(weight.dtype)
    if _quant.is_quantized(weight):  # a frozen NF4/int8 base (fnllm.io.quantize)
        y = _quant.linear(x_w, weight, bias)
    elif _quant.hidden_by_transform(weight):
        raise ValueError(
            "linear: a quantized (NF4/int8) weight reached a torch.func transform as an "
            "argument, which wraps it in a plain tensor: close over the frozen tree "
            "(torch.func.grad(lambda t: loss(t, frozen))), use fnllm.grads.per_example / "
            "accumulate (they carry quantized leaves through), or io.dequantize it first"
        )
    elif _cpu16.upcasts(x_w, weight):  # 16-bit on a CPU without 16-bit units: in float32
        y = _cpu16.linear(x_w, weight, bias)
    else:
        y = F.linear(x_w, weight, bias)
    if has_adapter(params):  # an adapter (fnllm.nn._adapters); W stays untouched
        y = y + adapter_delta(params, x).to(y.dtype)
    return y


def _per_row_linear(params: Params, x: Tensor) -> Tensor:
    """Row ``b`` of ``x [B, ..., in]`` through its own ``weight [B, out, in]`` and ``bias``."""
    weight, bias = params["weight"], params.get("bias")
    if x.shape[-1] != weight.shape[-1] or (
        bias is not None and tuple(bias.shape) != tuple(weight.shape[:2])
    ):
        raise ValueError(
            f"linear: per-row weight {tuple(weight.shape)} [B, out, in] and bias "
            f"{None if bias is None else tuple(bias.shape)} do not fit x {tuple(x.shape)}"
        )
    y = torch.einsum("b...i,boi->b...o", x, weight)
    if bias is not None:
        y = y + bias.reshape(bias.shape[0], *[1] * (x.ndim - 2), bias.shape[1])
    if has_adapter(params):
        y = y + adapter_delta(params, x)
    return y


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
    _check_dims("init_embedding", num=num, dim=dim)
    _check_std("init_embedding", std)
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

    Raises:
        TypeError: ``ids`` is not an integer tensor.
        ValueError: (eager, outside ``vmap``) an id is outside ``[0, num)``; the message
            names the first one and where it is.
    """
    weight = _param(params, "weight", "embedding")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be [num, dim], got {tuple(weight.shape)}")
    ids = check_ids(ids, weight.shape[0], name="ids")
    return F.embedding(ids, weight)


def _embed(params: Params, ids: Tensor) -> Tensor:
    """:func:`embedding` for ids the caller has already checked (the models)."""
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
    _check_dims("init_layer_norm", dim=dim)
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
        Same shape and dtype as ``x``. When the norm's dtype differs from ``x``'s (float32
        norms on a bf16 residual stream), it is computed in float32 and cast back.

    Raises:
        ValueError: the width of ``x`` is not that of the norm's weight.
    """
    weight, bias = _param(params, "weight", "layer_norm"), _param(params, "bias", "layer_norm")
    _check_input("layer_norm", x)
    check_number("layer_norm: eps", eps, positive=True)
    if weight.ndim != 1 or x.shape[-1:] != weight.shape:
        raise ValueError(
            f"layer_norm: x has width {x.shape[-1]} (shape {tuple(x.shape)}), expected "
            f"{tuple(weight.shape)[-1]} to match weight {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype or bias.dtype != x.dtype:  # mixed precision: in float32
        y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
        return y.to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


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


def dropout(key: Tensor | None, x: Tensor, rate: float | Tensor) -> Tensor:
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    With ``key=None`` (evaluation) or ``rate == 0`` the input comes back unchanged. The mask
    is ``fnllm.random.bernoulli(key, 1 - rate, x.shape)`` (the keep mask), so the same key
    gives the same mask, bit-identical to ``jax.random.bernoulli``; kept values are
    ``x / (1 - rate)``. The mask of a large tensor comes from fnllm's native threefry kernel;
    under ``torch.compile`` on the CPU it is one opaque op whose 1-byte mask the backward
    reuses, while the scaling fuses into the surrounding code (see :mod:`fnllm.random`).

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
        x: any float tensor.
        rate: drop probability in ``[0, 1)``: a float, or a 0-dim float tensor (checked
            eagerly, like a float; under ``torch.compile`` and ``vmap`` it is not checked).

    Returns:
        A tensor like ``x``.
    """
    if isinstance(rate, Tensor):
        _check_rate_tensor(rate)
        if key is None:
            return x
        keep = jr.bernoulli(key, 1.0 - rate, tuple(x.shape))
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) / (1 - rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"dropout: rate must be a float or a tensor, got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    if key is None or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, tuple(x.shape))
    # where(keep, x, 0) / (1 - rate) equals where(keep, x / (1 - rate), 0) bit for bit (0 / s
    # is +0); dividing the fresh result in place saves one pass over x in eager mode.
    out = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return out.div_(1.0 - rate)


def _check_rate_tensor(rate: Tensor) -> None:
    """A dropout rate given as a tensor: 0-dim float, in [0, 1) when it can be checked."""
    if rate.dim() != 0 or not rate.dtype.is_floating_point:
        raise ValueError(
            f"dropout: rate tensor must be a 0-dim float tensor, got dtype {rate.dtype} "
            f"shape {tuple(rate.shape)}"
        )
    if checks_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(rate):
        value = rate.item()
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout: rate must be in [0, 1), got {value}")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average token vectors over the real (unpadded) tokens: sentence embeddings.

    This is the pooling all-MiniLM-L6-v2 and other sentence-transformers models use.

    Example:
        >>> import torch
        >>> from fnllm import io
        >>> h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
        >>> io.mean_pool(h, torch.tensor([[1, 1, 0]]))
        tensor([[2., 3.]])

    Args:
        hidden: ``[..., T, D]`` token vectors.
        attention_mask: ``[..., T]``, 1 (or True) for real tokens and 0 for padding.

    Returns:
        ``[..., D]`` means over the real tokens (zeros for a row with none).

    Raises:
        ValueError: the shapes do not line up.
    """
    if attention_mask.shape != hidden.shape[:-1]:
        raise ValueError(
            f"mean_pool: attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"hidden {tuple(hidden.shape)} without its last dimension"
        )
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(-2) / m.sum(-2).clamp(min=1e-9)


def _param(params: object, name: str, layer: str) -> Tensor:
    """``params[name]`` as a tensor, or an error naming the layer and what it expected."""
    if not isinstance(params, dict) or name not in params:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise KeyError(f"{layer}: params must be a dict with {name!r}, got {got}")
    value = params[name]
    if not isinstance(value, Tensor):
        raise TypeError(f"{layer}: params[{name!r}] is a {type(value).__name__}, not a tensor")
    return value


def _check_input(layer: str, x: object) -> None:
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        what = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{layer}: x must be a floating-point tensor, got {what}")
    if x.ndim == 0:
        raise ValueError(f"{layer}: x must have at least 1 dimension, got a scalar")


def _check_dims(layer: str, **dims: object) -> None:
    for name, value in dims.items():
        check_int(f"{layer}: {name}", value, low=1)


def _check_std(layer: str, std: object) -> None:
    check_number(f"{layer}: std", std, nonnegative=True)
