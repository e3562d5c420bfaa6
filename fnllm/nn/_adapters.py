"""Adapters: leaves beside a linear layer's ``weight`` that add to its output (LoRA).

The one place that knows what an adapter looks like in a parameter tree. A linear layer's
dict ``{"weight": W [out, in], "bias": b}`` may also hold a low-rank adapter,
``{"lora_a": A [r, in], "lora_b": B [out, r], "lora_scale": s}``, and then computes
``x W^T + b + s (x A^T) B^T`` (:func:`adapter_delta`); ``A`` and ``B`` may carry a leading
``[S]`` axis (one adapter set per example, ``fnllm.finetune.lora.pick``). :func:`fnllm.nn.linear`
adds the delta, ``check_shapes`` lets adapter leaves ride along with a model's layout, and
``fnllm.finetune`` builds (:func:`lora_leaves`), trains (:data:`ADAPTER_TRAINED`) and folds
(:func:`adapter_weight`) them through this module alone. :func:`check_shapes` (a tree against
a layout) lives here because it lets adapter leaves ride along.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import tree
from fnllm._checks import check_keys

__all__ = [
    "ADAPTER_FIXED",
    "ADAPTER_LEAVES",
    "ADAPTER_TRAINED",
    "adapter_delta",
    "adapter_weight",
    "check_shapes",
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

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> p = nn.lora_leaves(torch.ones(1, 2), torch.ones(3, 1), torch.tensor(0.5))
        >>> nn.adapter_delta(p, torch.tensor([[1.0, 2.0]]))
        tensor([[1.5000, 1.5000, 1.5000]])
    """
    a, b, scale = (params[n] for n in ADAPTER_LEAVES)
    scale, x = scale.detach(), x.to(a.dtype)  # runs in the adapter's dtype (float32 LoRA)
    if a.ndim == 2:
        return scale * F.linear(F.linear(x, a), b)
    if x.ndim < 2 or a.shape[0] != x.shape[0]:
        raise ValueError(
            f"adapter: {a.shape[0]} per-row adapter sets for input {tuple(x.shape)} (batch "
            f"{x.shape[0] if x.ndim else '?'}): stacked sets need one per row; select them "
            "with lora.pick(sets, index), index holding one set id per row of the batch"
        )
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
    # adapter leaves (fnllm.nn._adapters) ride along with a linear layer's leaves
    flat = {p: v for p, v in flat.items() if not is_adapter_leaf(p)}
    check_keys(
        f"{name}: ", [p for p in expected if p not in flat], [p for p in flat if p not in expected]
    )
    for path, shape in expected.items():
        leaf = flat[path]
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}: {path} is a {type(leaf).__name__}, expected a tensor")
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(
                f"{name}: {path} has shape {tuple(leaf.shape)}, expected {tuple(shape)}"
            )
