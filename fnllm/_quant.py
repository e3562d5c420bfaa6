"""Quantized weight leaves (private): the one place that knows torchao's tensor types.

A quantized leaf is a tensor subclass from ``torchao`` (the ``quant`` extra) standing where a
linear layer's 2-D float weight was: ``NF4Tensor`` (4-bit NormalFloat with double-quantized
block scales, as in QLoRA) or ``Int8Tensor`` (int8 with one symmetric scale per output row,
weight-only). It keeps the weight's shape and its original dtype, so trees, shapes and
checkpoints look the same; only its storage is smaller.

This module imports nothing from fnllm, so every layer may ask it: :func:`is_quantized` (for
``tree.partition`` and ``lora.merge``), :func:`linear` (for ``nn.linear``), :func:`dequantize`,
:func:`quantize` (for ``io.quantize``), and :func:`encode` / :func:`decode` (for
``io.save`` / ``io.load``). ``torchao`` is imported only when a weight is quantized; without it
no leaf can be quantized, so the other functions need it only for leaves that are.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import _cpu16

KINDS = ("nf4", "int8")
#: What to install when torchao is missing.
EXTRA_HINT = "install the 'quant' extra: pip install 'fnllm[quant]' (torchao>=0.18,<0.19)"
NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's and torchao's default)
NF4_SCALER_BLOCK = 256  # scales per double-quantization group, at most


def _torchao() -> Any:
    """Import torchao's quantized tensor types; an ImportError naming the extra if missing."""
    try:
        from torchao.quantization import Int8Tensor, NF4Tensor
        from torchao.quantization.granularity import PerRow
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching the import
        raise ImportError(f"quantized weights need torchao: {EXTRA_HINT} ({e})") from e
    return NF4Tensor, Int8Tensor, PerRow


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized weight leaf (never imports torchao)."""
    if not isinstance(x, Tensor) or type(x) is Tensor or "torchao" not in sys.modules:
        return False
    return kind_of(x) is not None


def hidden_by_transform(x: Any) -> bool:
    """Whether ``x`` is a quantized leaf that ``torch.func.grad``/``vmap`` wrapped in a plain
    tensor (passed to the transformed function as an argument): the type is lost and
    torchao's ops fail, so the caller names the problem instead."""
    if (
        "torchao" not in sys.modules
        or type(x) is not Tensor
        or torch.compiler.is_compiling()
        or not torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return False
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return kind_of(x) is not None


def kind_of(x: Any) -> str | None:
    """``"nf4"``, ``"int8"`` or ``None`` for a leaf."""
    if not isinstance(x, Tensor) or type(x) is Tensor or "torchao" not in sys.modules:
        return None
    nf4, int8, _ = _torchao()
    if isinstance(x, nf4):
        return "nf4"
    if isinstance(x, int8):
        return "int8"
    return None


def nf4_scaler_block(numel: int, block: int = NF4_BLOCK) -> int:
    """The largest scaler group (<= 256) dividing the number of NF4 blocks of a weight."""
    n_blocks = numel // block
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def quantize(w: Tensor, kind: str) -> Tensor:
    """Quantize one 2-D float weight (checked by the caller) with torchao."""
    nf4, int8, per_row = _torchao()
    w = w.detach().contiguous()
    if kind == "nf4":
        return nf4.from_tensor(w, NF4_BLOCK, nf4_scaler_block(w.numel()))
    return int8.from_hp(w, per_row())


def dequantize(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A quantized leaf's dense weight (in its original dtype unless ``dtype`` is given)."""
    kind = kind_of(x)
    if kind == "nf4":
        out = x.get_original_weight()  # type: ignore[attr-defined]
    elif kind == "int8":
        out = x.dequantize()
    else:
        raise TypeError(f"not a quantized weight: {type(x).__name__}")
    return out if dtype is None else out.to(dtype)


class _Frozen:
    """Hands a quantized weight to the autograd function as a non-tensor argument, so the
    function transforms (``torch.func.grad``) do not wrap it and lose its type."""

    __slots__ = ("weight",)

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight


class _QuantizedLinear(torch.autograd.Function):
    """``x W^T`` with a frozen quantized ``W``: the dense weight is rebuilt in forward and
    again in backward, never kept, so a training step holds the quantized bytes only.
    Under ``vmap`` (per-example gradients) functorch runs the same forward and backward on
    the batched input (``generate_vmap_rule``); the weight is shared by every example."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, frozen: _Frozen) -> Tensor:
        w = dequantize(frozen.weight, x.dtype)
        return _cpu16.matmul_t(x, w) if _cpu16.upcasts(x, w) else F.linear(x, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.frozen = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        w = dequantize(ctx.frozen.weight, grad.dtype)
        return (_cpu16.matmul(grad, w) if _cpu16.upcasts(grad, w) else grad @ w), None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` for a quantized ``W`` (no gradient reaches ``W``; ``x`` and ``b`` get one)."""
    y = _QuantizedLinear.apply(x, _Frozen(weight))
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- checkpoints


def encode(x: Tensor) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """``(kind, inner tensors, JSON metadata)``: what a checkpoint stores for a leaf."""
    kind = kind_of(x)
    names, ctx = x.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = {n: _dense(getattr(x, n)) for n in names if getattr(x, n) is not None}
    if kind == "nf4":
        tm = ctx["tensor_meta"]
        meta: dict[str, Any] = {
            "block_size": ctx["block_size"],
            "n_blocks": ctx["n_blocks"],
            "scaler_block_size": ctx["scaler_block_size"],
            "shape": list(tm.original_shape),
            "stride": list(tm.original_strides),
            "storage_offset": tm.storage_offset,
            "dtype": str(tm.dtype).removeprefix("torch."),
        }
    elif kind == "int8":
        if ctx.get("act_quant_kwargs") is not None:
            raise TypeError("save: int8 weights with activation quantization are not supported")
        meta = {
            "block_size": list(ctx["block_size"]),
            "dtype": str(ctx["dtype"]).removeprefix("torch."),
            "reduce_range": bool(ctx.get("reduce_range") or False),
        }
    else:
        raise TypeError(f"save: {type(x).__name__} is not a quantized weight fnllm knows")
    return kind, inner, meta


def _dense(t: Tensor) -> Tensor:
    """Row-major strides (torchao keeps a ``[1]`` scale with stride 256, which a byte view
    for the checksum refuses); the values are the same."""
    t = t.detach()
    if t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def decode(kind: str, inner: dict[str, Tensor], meta: dict[str, Any]) -> Tensor:
    """Rebuild a quantized leaf from what :func:`encode` gave (raises KeyError/ValueError)."""
    nf4, int8, _ = _torchao()
    dtype = getattr(torch, meta["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {meta['dtype']!r}")
    if kind == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

        device = inner["quantized_data"].device
        tm = SubclassTensorArgs(
            torch.Size(meta["shape"]), tuple(meta["stride"]), meta["storage_offset"], dtype,
            device, False,
        )  # fmt: skip
        ctx = {
            "block_size": meta["block_size"],
            "n_blocks": meta["n_blocks"],
            "scaler_block_size": meta["scaler_block_size"],
            "tensor_meta": tm,
        }
        return nf4.__tensor_unflatten__(inner, ctx, None, None)
    if kind == "int8":
        return int8(
            inner["qdata"], inner["scale"], list(meta["block_size"]), dtype,
            zero_point=inner.get("zero_point"), reduce_range=meta["reduce_range"],
        )  # fmt: skip
    raise ValueError(f"unknown quantized kind {kind!r} (known: {', '.join(KINDS)})")
