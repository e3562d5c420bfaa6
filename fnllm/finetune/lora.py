"""LoRA as a tree transform: low-rank adapters are ordinary leaves next to a linear's weight.

:func:`init` turns a targeted linear ``{"weight": W [out, in], "bias": b}`` into
``{"weight": W, "bias": b, "lora_a": A [r, in], "lora_b": B [out, r], "lora_scale": s}``.
:func:`fnllm.nn.linear` recognises the adapters and computes ``x W^T + b + s (x A^T) B^T``
without forming ``W + s B A``, so the model's own ``apply`` runs the adapted model: no
wrapper, no mutable "active adapter", nothing for ``torch.compile`` to break on.

The scale ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora=True``) is a 0-d tensor leaf so
that it travels with the adapters (one tree, one file), yet it is never trained: every
:func:`fnllm.finetune.strategy` leaves ``*.lora_scale`` out and ``nn.linear`` detaches it, so
even a hand-written ``"*"`` filter gives it no gradient.

Several adapter sets for one base stack into ``[S, ...]`` leaves (:func:`stack`); :func:`pick`
gathers one set per example of a batch (an index per row), and the same ``apply`` then runs a
different adapter for every row.

An adapter set is the whole trained part (adapters, a classifier's head, ...): :func:`save`,
:func:`load` and :func:`attach` live in :mod:`fnllm.finetune.adapter_sets`, :func:`stack` and
:func:`pick` in :mod:`fnllm.finetune.stacking`; both are re-exported here, as are
:func:`to_peft` and :func:`from_peft` (:mod:`fnllm.finetune.peft_format`: peft's adapter
folders, both ways).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _quant, nn, tree
from fnllm import random as jr
from fnllm.finetune import _lora_checks
from fnllm.finetune.adapter_sets import (
    AdapterSet,
    adapters,
    attach,
    fingerprint,
    load,
    manifest,
    save,
)
from fnllm.finetune.peft_format import from_peft, to_peft
from fnllm.finetune.stacking import pick, stack

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterSet",
    "adapters",
    "attach",
    "fingerprint",
    "from_peft",
    "init",
    "load",
    "manifest",
    "merge",
    "pick",
    "save",
    "stack",
    "to_peft",
]

Params = Any
DEFAULT_TARGETS = ("*.attn.qkv", "*.attn.proj")  # GPT's and BERT's lora_targets
_LEAVES = nn.ADAPTER_LEAVES


def init(
    key: Tensor,
    params: Params,
    rank: int | Mapping[str, int] = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] | None = None,
    *,
    rslora: bool = False,
    model: Any = None,
) -> Params:
    """Add LoRA adapters to the targeted linear layers (A random, B zero: same function).

    Example:
        >>> import torch
        >>> from fnllm import random, tree
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> params = gpt.init(random.key(0))
        >>> lp = lora.init(random.key(1), params, rank=2, targets=["*.attn.qkv"])
        >>> [p for p in tree.paths(lp) if "lora" in p]
        ['blocks.0.attn.qkv.lora_a', 'blocks.0.attn.qkv.lora_b', 'blocks.0.attn.qkv.lora_scale']
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> torch.equal(gpt.apply(lp, tokens), gpt.apply(params, tokens))
        True

    Args:
        key: a ``fnllm.random`` key (one fold per adapted layer draws its ``A``).
        params: the model's tree; it is not modified (a new tree shares its tensors).
        rank: the adapters' rank ``r``, or a ``{glob: rank}`` mapping (first match wins)
            for per-layer ranks.
        alpha: the scale numerator: ``s = alpha / r``.
        targets: globs over the paths of linear layers (a dict with a 2-D ``weight``), in
            fnllm's glob dialect (:func:`fnllm.tree.glob_match`: a glob matching a layer's
            path or a dotted prefix of it, so ``"blocks.0"`` adapts every linear layer of
            block 0). Default: ``model.lora_targets`` when ``model`` is given, else
            :data:`DEFAULT_TARGETS` (GPT's and BERT's attention projections).
        rslora: use rank-stabilised scaling ``alpha / sqrt(r)``.
        model: the model config (or ``finetune.Classifier``) ``params`` belongs to; only its
            default targets (``lora_targets``) are read.

    Returns:
        The tree with ``lora_a`` ``[r, in]`` (uniform in ``+-1/sqrt(in)``), ``lora_b``
        ``[out, r]`` (zeros) and ``lora_scale`` (0-d) beside each targeted weight.

    Raises:
        ValueError: the targets match no linear layer; a rank is not in ``[1, min(out, in)]``;
            a targeted layer matches no glob of a rank mapping; ``alpha`` is not finite and
            positive; a target is an embedding table (``embed.*``) or a language-model head
            next to the embeddings (``head``): the model's forward reads those matrices
            directly, so ``apply`` would ignore an adapter there while :func:`merge` would fold
            it in.
        TypeError: ``targets``, ``rank``, ``alpha`` or ``rslora`` has the wrong type.
    """
    defaulted = targets is None and model is None
    if targets is None:
        targets = DEFAULT_TARGETS if model is None else model.lora_targets
    if isinstance(targets, (str, Sequence)) and not isinstance(targets, (bytes, bytearray)):
        globs = (targets,) if isinstance(targets, str) else tuple(targets)
    else:
        globs = ()
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise TypeError(f"lora.init: targets must be glob strings, got {targets!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"lora.init: alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora.init: alpha must be a finite positive number, got {alpha!r}")
    if not isinstance(rslora, bool):
        raise TypeError(f"lora.init: rslora must be a bool, got {rslora!r}")
    _lora_checks.check_tree("lora.init", params)
    if not isinstance(key, Tensor) or key.dtype not in (torch.int32, torch.int64):
        got = key.dtype if isinstance(key, Tensor) else type(key).__name__
        raise TypeError(f"lora.init: key must be a fnllm.random key, got {got}")
    found: list[str] = []

    def visit(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            weight = node.get("weight")
            if isinstance(weight, Tensor) and weight.ndim == 2 and _matches(path, globs):
                if nn.has_adapter(node):
                    raise ValueError(f"lora.init: {path} already has adapters")
                found.append(path)
                return {**node, **_adapter(key, path, weight, rank, alpha, rslora)}
            return {k: visit(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(
                visit(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)
            )
        return node

    out = visit(params, "")
    if not found:
        hint = " (a linear layer is a dict with a 2-D weight)"
        if defaulted:
            hint += "; pass model= for its default targets (model.lora_targets) or targets="
        tree.check_globs(
            globs, _linears(params), where="lora.init: targets", what="linear layer", each=False,
            hint=hint,
        )  # fmt: skip
    _lora_checks.refuse_unrun(found, params)
    return out


def merge(params: Params) -> Params:
    """Fold every adapter into its weight, ``W + s B A``, and drop the adapter leaves.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> p = {"weight": torch.eye(2), "lora_a": torch.ones(1, 2),
        ...      "lora_b": torch.ones(2, 1), "lora_scale": torch.tensor(0.5)}
        >>> lora.merge({"lin": p})["lin"]["weight"]
        tensor([[1.5000, 0.5000],
                [0.5000, 1.5000]])

    Args:
        params: a tree with adapters (not stacked).

    Returns:
        A plain tree with the base model's paths (``io.to_hf`` exports it as is).

    Raises:
        ValueError: the adapters are stacked (merge one set: ``pick`` needs a batch); a base
            weight is quantized (``io.quantize``: merge ``io.dequantize(params)`` explicitly);
            or a layer's adapters are incomplete, misshaped or hold a non-finite scale (the
            message names the layer).
    """

    _lora_checks.check_tree("lora.merge", params)

    def fold(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if nn.has_adapter(node):
                a, _, _ = _lora_checks.adapter_leaves("lora.merge", node, path, _LEAVES)
                if _quant.is_quantized(node.get("weight")):
                    raise ValueError(
                        f"lora.merge: {path}.weight is quantized ({_quant.kind_of(node['weight'])}"
                        "): folding an adapter into it would need a dense weight; merge "
                        "explicitly with lora.merge(io.dequantize(params)) (dense weights in "
                        "their original dtype), and quantize the result again if wanted"
                    )
                if a.ndim != 2:
                    raise ValueError(f"lora.merge: {path} holds stacked adapters {tuple(a.shape)}")
                rest = {k: v for k, v in node.items() if k not in _LEAVES}
                rest["weight"] = nn.adapter_weight(node)
                return rest
            return {k: fold(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fold(v, f"{path}.{i}") for i, v in enumerate(node))
        return node

    return fold(params, "params")


# ----------------------------------------------------------------------------- helpers


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    """A linear layer's path against target globs, in fnllm's one dialect (tree.glob_match)."""
    return tree.glob_match(path, globs)


def _linears(params: Params) -> list[str]:
    flat = tree.flatten(params)
    return [p[: -len(".weight")] for p, v in flat.items() if p.endswith(".weight") and v.ndim == 2]


def _adapter(
    key: Tensor, path: str, weight: Tensor, rank: Any, alpha: float, rslora: bool
) -> dict[str, Tensor]:
    r = _rank_for(path, rank)
    out_f, in_f = weight.shape
    if not 1 <= r <= min(out_f, in_f):
        raise ValueError(
            f"lora.init: rank {r} for {path} must be in [1, {min(out_f, in_f)}] "
            f"(its weight is {out_f} x {in_f})"
        )
    k = jr.fold_in(key, sum(ord(c) * 131**i for i, c in enumerate(path)) % (2**31))
    bound = 1.0 / math.sqrt(in_f)
    a = jr.uniform(k, (r, in_f), weight.dtype, -bound, bound).to(weight.device)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    b = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return nn.lora_leaves(a, b, torch.tensor(scale, dtype=weight.dtype, device=weight.device))


def _rank_for(path: str, rank: Any) -> int:
    if isinstance(rank, Mapping):
        for glob, r in rank.items():
            if tree.glob_match(path, glob):
                return _check_rank(r, path)
        raise ValueError(f"lora.init: {path} matches no glob of the rank mapping {dict(rank)}")
    return _check_rank(rank, path)


def _check_rank(r: Any, path: str) -> int:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"lora.init: rank for {path} must be an int, got {r!r}")
    return r
