"""Adapters: leaves beside a linear layer's ``weight`` that add to its output (LoRA).

The one place that knows what an adapter looks like in a parameter tree. A linear layer's
dict ``{"weight": W [out, in], "bias": b}`` may also hold a low-rank adapter,
``{"lora_a": A [r, in], "lora_b": B [out, r], "lora_scale": s}``, and then computes
``x W^T + b + s (x A^T) B^T`` (:func:`adapter_delta`); ``A`` and ``B`` may carry a leading
``[S]`` axis (one adapter set per example, ``fnllm.finetune.lora.pick``). :func:`fnllm.nn.linear`
adds the delta, ``check_shapes`` lets adapter leaves ride along with a model's layout, and
``fnllm.finetune`` builds (:func:`lora_leaves`), trains (:data:`ADAPTER_TRAINED`) and folds
(:func:`adapter_weight`) them through this module alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ADAPTER_FIXED",
    "ADAPTER_LEAVES",
    "ADAPTER_TRAINED",
    "adapter_delta",
    "adapter_weight",
    "has_adapter",
    "is_adapter_leaf",
    "lora_leaves",
]

#: The adapter leaves a finetuning strategy trains.
ADAPTER_TRAINED: tuple[str, ...] = ("lora_a", "lora_b")
#: The adapter leaves that are fixed hyper-parameters (never trained).
ADAPTER_FIXED: tuple[str, ...] = ("lora_scale",)
#: Every adapter leaf name.
ADAPTER_LEAVES: tuple[str, ...] = ADAPTER_TRAINED + ADAPTER_FIXED


def is_adapter_leaf(path: str) -> bool:
    """Whether the leaf at a dotted ``path`` (or a bare leaf name) is an adapter leaf.

    Example:
        >>> from fnllm import nn
        >>> nn.is_adapter_leaf("blocks.0.attn.qkv.lora_b"), nn.is_adapter_leaf("head.weight")
        (True, False)
    """
    return path.rpartition(".")[2] in ADAPTER_LEAVES


def has_adapter(params: Any) -> bool:
    """Whether a linear layer's dict holds an adapter.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.has_adapter({"weight": torch.eye(2)})
        False
    """
    return isinstance(params, dict) and ADAPTER_TRAINED[0] in params


def lora_leaves(a: Tensor, b: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """The adapter leaves of a LoRA ``A [r, in]``, ``B [out, r]`` and scale ``s`` (0-d).

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = {"weight": torch.eye(2), **nn.lora_leaves(torch.ones(1, 2), torch.ones(2, 1),
        ...                                               torch.tensor(0.5))}
        >>> nn.linear(p, torch.tensor([[1.0, 2.0]]))
        tensor([[2.5000, 3.5000]])
    """
    return dict(zip(ADAPTER_LEAVES, (a, b, scale)))


def adapter_delta(params: dict[str, Any], x: Tensor) -> Tensor:
    """``s (x A^T) B^T``: what a linear layer's adapter adds to its output for input ``x``.

    With ``[S, r, in]`` / ``[S, out, r]`` adapters (one set per example) and ``[S]``
    scales, row ``i`` of ``x`` (``[S, ..., in]``) uses set ``i``. The scale is a constant
    (detached): gradients reach ``A`` and ``B`` only.
    """
    a, b, scale = (params[n] for n in ADAPTER_LEAVES)
    scale = scale.detach()
    if a.ndim == 2:
        return scale * F.linear(F.linear(x, a), b)
    h = torch.einsum("b...i,bri->b...r", x, a)
    return scale.reshape(-1, *[1] * (x.ndim - 1)) * torch.einsum("b...r,bor->b...o", h, b)


def adapter_weight(params: dict[str, Any]) -> Tensor:
    """The layer's weight with its adapter folded in, ``W + s B A``.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = {"weight": torch.zeros(2, 2), **nn.lora_leaves(torch.ones(1, 2),
        ...                                                    torch.ones(2, 1), torch.tensor(2.0))}
        >>> nn.adapter_weight(p)
        tensor([[2., 2.],
                [2., 2.]])
    """
    a, b, s = (params[n] for n in ADAPTER_LEAVES)
    w = params["weight"]
    return w + s * (b @ a)
