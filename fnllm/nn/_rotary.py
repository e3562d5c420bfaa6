"""Rotary position embeddings of :mod:`fnllm.nn` (private; see that module).

Rotary embeddings (RoPE) encode a token's position by rotating pairs of query and key
features by angles proportional to the position, so the attention score of two tokens
depends on their distance only. Feature ``i`` of the first half of a head is paired with
feature ``i + head_dim / 2`` of the second half (the "rotate half" convention of
`transformers`' Llama, so its checkpoints load without permuting the q/k weights).
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from fnllm._checks import check_int, check_number

RopeType: TypeAlias = Literal["default", "llama3"]
ROPE_TYPES = ("default", "llama3")


def rotary_frequencies(
    head_dim: int,
    *,
    theta: float = 10000.0,
    rope_type: RopeType = "default",
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_len: int = 8192,
    device: torch.device | str | None = None,
) -> Tensor:
    """The rotation speed (radians per position) of each feature pair of a head.

    ``"default"`` is the original RoPE, ``theta ** (-2i / head_dim)`` for pair ``i``;
    ``"llama3"`` is Llama 3.1's long-context scaling: wavelengths shorter than
    ``original_max_len / high_freq_factor`` are kept, those longer than
    ``original_max_len / low_freq_factor`` are divided by ``factor``, and the band between
    is interpolated smoothly.

    Example:
        >>> from fnllm import nn
        >>> nn.rotary_frequencies(4, theta=100.0)
        tensor([1.0000, 0.1000])
        >>> nn.rotary_frequencies(4, theta=1e4, rope_type="llama3", original_max_len=64)
        tensor([1.0000, 0.0012])

    Args:
        head_dim: features per head; must be even.
        theta: the base period (``rope_theta`` in `transformers` configs).
        rope_type: ``"default"`` or ``"llama3"``.
        factor: llama3 only: how much the longest wavelengths are stretched.
        low_freq_factor: llama3 only: wavelengths above ``original_max_len / low_freq_factor``
            are fully stretched.
        high_freq_factor: llama3 only: wavelengths below ``original_max_len / high_freq_factor``
            are kept; must exceed ``low_freq_factor``.
        original_max_len: llama3 only: the context length the model was first trained at.
        device: where to make the tensor.

    Returns:
        float32 ``[head_dim // 2]``.

    Raises:
        ValueError: an odd ``head_dim``, an unknown ``rope_type`` or a bad scaling value.
    """
    check_int("rotary: head_dim", head_dim, low=1)
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim {head_dim} is odd; rotary embeddings rotate pairs")
    check_number("rotary: theta", theta, positive=True)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rotary: rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    # As `transformers` computes it (float32 throughout), so that tables agree bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq
    check_number("rotary: factor", factor, positive=True)
    check_number("rotary: low_freq_factor", low_freq_factor, positive=True)
    check_number("rotary: high_freq_factor", high_freq_factor, positive=True)
    check_int("rotary: original_max_len", original_max_len, low=1)
    if not high_freq_factor > low_freq_factor:
        raise ValueError(
            f"rotary: high_freq_factor {high_freq_factor} must exceed low_freq_factor "
            f"{low_freq_factor}"
        )
    low_wavelen = original_max_len / low_freq_factor
    high_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, between, stretched)


def rotary_tables(
    positions: Tensor, inv_freq: Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """The cosine and sine tables of token positions, for :func:`apply_rotary`.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> cos, sin = nn.rotary_tables(torch.arange(3), nn.rotary_frequencies(4))
        >>> cos.shape, cos[0].tolist()
        (torch.Size([3, 4]), [1.0, 1.0, 1.0, 1.0])

    Args:
        positions: integer positions ``[..., T]`` (e.g. ``arange(T)``, or ``[B, T]`` counting
            each row's real tokens).
        inv_freq: ``[head_dim // 2]`` from :func:`rotary_frequencies`.
        dtype: the dtype of the tables (the activations'); computed in float32 first.

    Returns:
        ``(cos, sin)``, each ``[..., T, head_dim]`` (both halves of a head share an angle).
    """
    if not isinstance(positions, Tensor) or positions.is_floating_point():
        raise TypeError("rotary_tables: positions must be an integer tensor")
    angles = positions[..., None].float() * inv_freq.float()  # [..., T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys ``[..., H, T, head_dim]`` by the angles of their positions.

    Pair ``(x_i, x_{i + head_dim/2})`` becomes ``(x_i cos - x_{i+hd/2} sin,
    x_{i+hd/2} cos + x_i sin)``; every head of a token turns by the same angles.

    Example:
        >>> import math, torch
        >>> from fnllm import nn
        >>> cos, sin = nn.rotary_tables(torch.tensor([1]), torch.tensor([math.pi]))
        >>> nn.apply_rotary(torch.tensor([[[1.0, 2.0]]]), cos, sin).round(decimals=4)
        tensor([[[-1., -2.]]])

    Args:
        x: ``[..., H, T, head_dim]``.
        cos: ``[..., T, head_dim]`` from :func:`rotary_tables` (broadcast over heads).
        sin: like ``cos``.

    Returns:
        A tensor like ``x``.
    """
    if x.shape[-1] != cos.shape[-1] or x.shape[-2] != cos.shape[-2]:
        raise ValueError(
            f"apply_rotary: x {tuple(x.shape)} [..., H, T, head_dim] does not match the "
            f"tables {tuple(cos.shape)} [..., T, head_dim]"
        )
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
