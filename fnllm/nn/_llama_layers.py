"""Layers of the Llama family in :mod:`fnllm.nn` (private; see that module): RMS norm and the
SwiGLU MLP, each an ``init_*`` function plus an apply function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import random as jr
from fnllm._checks import check_int, check_number
from fnllm.nn._layers import Params, init_linear, linear


def init_rms_norm(key: Tensor | None, dim: int) -> Params:
    """Initialise an RMS norm: a weight of ones (no bias).

    Example:
        >>> from fnllm import nn
        >>> nn.init_rms_norm(None, 3)
        {'weight': tensor([1., 1., 1.])}

    Args:
        key: unused (the initial value is fixed); a key only places the tensor on its device.
        dim: normalised width.

    Returns:
        ``{"weight": [dim]}``.
    """
    check_int("init_rms_norm: dim", dim, low=1)
    return {"weight": torch.ones(dim, device=key.device if key is not None else None)}


def rms_norm(params: Params, x: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Scale the last dimension to unit root-mean-square, then by a learned weight.

    ``weight * x / sqrt(mean(x**2) + eps)``, computed in float32 and cast back to ``x``'s
    dtype before the weight multiplies it (as `transformers`' ``LlamaRMSNorm`` does, so bf16
    results agree too). Unlike :func:`layer_norm` it neither centres nor shifts.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.rms_norm(nn.init_rms_norm(None, 2), torch.tensor([[3.0, 4.0]]), eps=0.0)
        tensor([[0.8485, 1.1314]])

    Args:
        params: ``{"weight": [dim]}``.
        x: input ``[..., dim]``.
        eps: added to the mean square.

    Returns:
        Same shape and dtype as ``x``.

    Raises:
        ValueError: the width of ``x`` is not that of the weight.
    """
    weight = params["weight"] if isinstance(params, dict) and "weight" in params else None
    if not isinstance(weight, Tensor):
        raise KeyError(f"rms_norm: params must be a dict with a 'weight' tensor, got {params!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim == 0:
        raise TypeError(f"rms_norm: x must be a floating tensor with a last dimension, got {x!r}")
    check_number("rms_norm: eps", eps, nonnegative=True)
    if weight.ndim != 1 or x.shape[-1:] != weight.shape:
        raise ValueError(
            f"rms_norm: x has width {x.shape[-1]} (shape {tuple(x.shape)}), expected "
            f"{tuple(weight.shape)[-1]} to match weight {tuple(weight.shape)}"
        )
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype != x.dtype:  # mixed precision (float32 norm, bf16 stream): in float32
        return (weight.float() * h).to(x.dtype)
    return weight * h.to(x.dtype)


def init_swiglu(
    key: Tensor,
    d_model: int,
    d_ff: int,
    *,
    std: float = 0.02,
    proj_std: float | None = None,
    bias: bool = False,
) -> Params:
    """Initialise a SwiGLU MLP: ``gate`` and ``up`` (``d_model -> d_ff``), ``down`` back.

    Example:
        >>> from fnllm import nn, random
        >>> p = nn.init_swiglu(random.key(0), 4, 16)
        >>> {k: tuple(v["weight"].shape) for k, v in p.items()}
        {'gate': (16, 4), 'up': (16, 4), 'down': (4, 16)}

    Args:
        key: a ``fnllm.random`` key.
        d_model: input and output width.
        d_ff: hidden width.
        std: standard deviation of the ``gate`` and ``up`` weights.
        proj_std: standard deviation of the ``down`` weight (defaults to ``std``).
        bias: give each projection a bias (Llama has none).

    Returns:
        ``{"gate": linear [d_ff, d_model], "up": linear [d_ff, d_model],
        "down": linear [d_model, d_ff]}``.
    """
    k_gate, k_up, k_down = jr.split(key, 3)
    down_std = std if proj_std is None else proj_std
    return {
        "gate": init_linear(k_gate, d_model, d_ff, bias=bias, std=std),
        "up": init_linear(k_up, d_model, d_ff, bias=bias, std=std),
        "down": init_linear(k_down, d_ff, d_model, bias=bias, std=down_std),
    }


def swiglu(params: Params, x: Tensor) -> Tensor:
    """Apply ``down(silu(gate(x)) * up(x))``: the gated MLP of Llama, Qwen2 and Mistral.

    Example:
        >>> import torch
        >>> from fnllm import nn, random
        >>> p = nn.init_swiglu(random.key(0), 4, 16)
        >>> nn.swiglu(p, torch.ones(2, 3, 4)).shape
        torch.Size([2, 3, 4])

    Args:
        params: ``{"gate": ..., "up": ..., "down": ...}`` from :func:`init_swiglu`; or
            ``{"gate_up": ..., "down": ...}`` with the gate's rows above the up's.
        x: input ``[..., d_model]``.

    Returns:
        ``[..., d_model]``.
    """
    if "gate_up" in params:  # gate and up as one matrix (Llama.decode_params)
        gate, up = linear(params["gate_up"], x).chunk(2, dim=-1)
        return linear(params["down"], F.silu(gate) * up)
    return linear(params["down"], F.silu(linear(params["gate"], x)) * linear(params["up"], x))
