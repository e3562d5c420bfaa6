"""The boundary checks of :mod:`fnllm.finetune.lora` (private): targets the forward never runs,
adapter leaves that do not fit together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, tree


def refuse_unrun(found: list[str], params: Any) -> None:
    """Refuse targets the model's forward reads directly rather than through ``nn.linear``.

    Those are the embedding tables (every path with an ``embed`` part: a lookup, not a
    matmul) and an untied language-model head, a ``head`` linear next to the ``embed``
    tables (the models multiply by its weight themselves). ``apply`` would ignore an adapter
    there while ``lora.merge`` folds it in, so the two would disagree.
    """
    flat_paths = set(tree.paths(params))
    for path in found:
        parts = path.split(".")
        if "embed" in parts:
            raise ValueError(
                f"lora.init: target {path} is an embedding table, not a linear layer the "
                "forward runs: an adapter there would be ignored by apply and folded in by "
                "merge; target the blocks' linear layers (e.g. '*.attn.qkv')"
            )
        parent = ".".join(parts[:-1])
        sibling = f"{parent}.embed.tokens.weight" if parent else "embed.tokens.weight"
        if parts[-1] == "head" and sibling in flat_paths:
            raise ValueError(
                f"lora.init: target {path} is the language-model head, which the model "
                "multiplies by directly (not through nn.linear): an adapter there would be "
                "ignored by apply and generate and folded in by merge; target the blocks' "
                "linear layers (e.g. '*.attn.qkv')"
            )


def adapter_leaves(
    where: str, node: Mapping[str, Any], path: str, leaves: tuple[str, ...]
) -> tuple[Any, Any, Any]:
    """The ``(lora_a, lora_b, lora_scale)`` of one layer, checked to fit together."""
    missing = [k for k in leaves if node.get(k) is None]
    if missing:
        raise ValueError(f"{where}: {path} has adapters but lacks {', '.join(missing)}")
    a, b, s = (node[k] for k in leaves)
    for k, v in zip(leaves, (a, b, s)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{where}: {path}.{k} is a {type(v).__name__}, not a tensor")
    stacked = a.ndim == 3
    if a.ndim not in (2, 3) or b.ndim != a.ndim or s.ndim != a.ndim - 2:
        raise ValueError(
            f"{where}: {path} has adapters of shapes lora_a {tuple(a.shape)}, lora_b "
            f"{tuple(b.shape)}, lora_scale {tuple(s.shape)}, which do not fit together"
        )
    if a.shape[-2] != b.shape[-1] or (stacked and not a.shape[0] == b.shape[0] == s.shape[0]):
        raise ValueError(
            f"{where}: {path}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} disagree on "
            "the rank (lora_a is [r, in], lora_b [out, r])"
        )
    if not _checks.tracing(s) and not bool(torch.isfinite(s.detach()).all()):
        raise ValueError(f"{where}: {path}.lora_scale is not finite ({s.detach().tolist()})")
    return a, b, s


def check_tree(where: str, params: Any) -> None:
    """Refuse a ``params`` that is not a parameter tree: a dict (or list) holding tensors."""
    if not isinstance(params, (dict, list, tuple)) or not any(
        isinstance(x, Tensor) for x in tree.leaves(params)
    ):
        raise TypeError(
            f"{where}: params must be a model's parameter tree (a dict of tensors, as "
            f"model.init returns), got {type(params).__name__}"
            + (" without a tensor" if isinstance(params, (dict, list, tuple)) else "")
        )


def refuse_nonfinite(where: str, leaves: Mapping[str, Any]) -> None:
    """Refuse NaN or inf in floating-point leaves (one host sync per leaf; at save/attach time)."""
    for path, x in leaves.items():
        if isinstance(x, Tensor) and x.is_floating_point() and _checks.has_values(x):
            bad = ~torch.isfinite(x.detach())
            if bool(bad.any()):
                at = [int(i) for i in bad.nonzero()[0]]
                raise ValueError(
                    f"{where}: {path} holds {float(x.detach()[tuple(at)])} at {at}: the set "
                    "did not train to finite values (did the loss diverge?)"
                )
