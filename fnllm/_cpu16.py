"""16-bit matrix products on CPUs without 16-bit matrix units (private).

Used by ``nn.linear`` (dense and quantized weights) and the decoders' output heads.

A CPU without AVX512-BF16 or AMX (AMD before Zen 4, Intel before Cooper Lake) multiplies
bfloat16 and float16 matrices several times slower than float32 ones. On the 2-core AVX2
machine of ``docs/performance.md``, one thread, ``[512, 896] x [896, 4864]``: bfloat16 487 ms,
float32 69 ms, the bfloat16 operands converted to float32 first 79 ms. So there a 16-bit layer
multiplies in float32: the weight is converted a block of rows at a time (the float32 copy is
transient and never kept for the backward pass) and the product is rounded back to the input's
dtype. A product of two 16-bit values is exact in float32 and the sums accumulate in float32,
as oneDNN's 16-bit kernels do, so the result is the 16-bit product up to the order of the sums.
What the backward pass keeps is what ``F.linear`` keeps: the 16-bit weight, and the 16-bit input
only where the weight takes a gradient. SDPA attention on 16-bit queries, keys and values runs
on float32 copies the same way where no gradient flows through it (decoding, evaluation; one
thread, ``[1, 14, 512, 64]`` causal, forward and backward: bfloat16 322 ms, float32 57 ms); in
training it keeps PyTorch's 16-bit kernel, whose backward keeps half the bytes that float32
copies would (measured: a LoRA step's peak 0.8% above `peft`'s with the copies, 1.8% below
without).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# rows of the weight converted at once: about 4M float32 values (16 MiB) per block
_BLOCK_VALUES = 1 << 22
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _native_units(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (then nothing is converted)."""
    caps = torch.cpu.get_capabilities()
    if dtype == torch.bfloat16:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(caps.get("avx512_fp16") or caps.get("amx_fp16"))


def upcasts(x: Tensor, weight: Tensor) -> bool:
    """A product of ``x`` and ``weight`` runs in float32: both of one 16-bit dtype, on a CPU
    without 16-bit matrix units (``nn.linear``, the output heads, SDPA attention).

    Example:
        >>> import torch
        >>> from fnllm import _cpu16
        >>> _cpu16.upcasts(torch.zeros(2, 3), torch.zeros(4, 3))  # float32: nothing to do
        False
    """
    return (
        x.dtype in _HALF
        and weight.dtype == x.dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not _native_units(x.dtype)
    )


def _rows(n_in: int) -> int:
    return max(1, _BLOCK_VALUES // max(1, n_in))


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` in float32, rounded to ``x.dtype``: ``x [..., in]``, ``w [out, in]``."""
    x32 = x.float()
    rows = _rows(w.shape[1])
    if w.shape[0] <= rows:
        return F.linear(x32, w.float()).to(x.dtype)
    if torch._C._are_functorch_transforms_active():  # vmap: no writes into a fresh tensor
        blocks = range(0, w.shape[0], rows)
        return torch.cat([F.linear(x32, w[r : r + rows].float()).to(x.dtype) for r in blocks], -1)
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    for r in range(0, w.shape[0], rows):  # a float32 block of the output at a time
        out[..., r : r + rows] = F.linear(x32, w[r : r + rows].float())
    return out


def matmul(g: Tensor, w: Tensor) -> Tensor:
    """``g @ w`` in float32, rounded to ``g.dtype``: ``g [..., out]``, ``w [out, in]``."""
    rows = _rows(w.shape[1])
    acc: Tensor | None = None
    for r in range(0, w.shape[0], rows):
        part = g[..., r : r + rows].float() @ w[r : r + rows].float()
        acc = part if acc is None else acc + part
    assert acc is not None
    return acc.to(g.dtype)


def weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """``g.T @ x`` over every leading dimension, in float32, rounded to ``x.dtype``."""
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]).float()
    rows = _rows(x.shape[-1])
    parts = [(g2[:, r : r + rows].float().T @ x2).to(x.dtype) for r in range(0, g2.shape[1], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Linear16(torch.autograd.Function):
    """``x @ w.T`` for 16-bit ``x`` and ``w`` on a CPU without 16-bit units (:func:`upcasts`).

    Saves the 16-bit ``w``, and ``x`` only when ``w`` takes a gradient (as ``F.linear``).
    Composes with ``torch.func.grad``/``vmap`` (``generate_vmap_rule``) and ``torch.compile``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, w_grad: bool) -> Tensor:
        return matmul_t(x, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, w, w_grad = inputs
        ctx.w_grad = w_grad
        ctx.save_for_backward(w, x if w_grad else None)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        w, x = ctx.saved_tensors
        dx = matmul(g, w) if ctx.needs_input_grad[0] else None
        dw = weight_grad(g, x) if ctx.w_grad and ctx.needs_input_grad[1] else None
        return dx, dw, None


def linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ w.T + bias`` through :class:`Linear16` (call where :func:`upcasts` holds)."""
    y = Linear16.apply(x, w, bool(w.requires_grad))
    return y if bias is None else y + bias
