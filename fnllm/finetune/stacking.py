"""Several adapter sets in one batch: :func:`stack` them, then :func:`pick` one set per row.

The stacked tree holds every set's adapters as ``[S, ...]`` leaves (and, where the sets' heads
differ, the head as a per-set linear layer ``weight [S, C, D]``, ``bias [S, C]``); :func:`pick`
gathers one set per example, and the model's own ``apply`` runs a different adapter and head
for every row (``nn.linear`` takes a per-row ``weight [B, out, in]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import tree
from fnllm.finetune.adapter_sets import _LEAVES, _is_adapter, _is_classifier_tree

__all__ = ["pick", "stack"]

Params = Any


def stack(trees: Sequence[Params]) -> Params:
    """Stack several adapter sets of one base into ``[S, ...]`` leaves, heads included.

    The adapters of every set are stacked. Every other leaf must be the same in every set
    (the shared base), except a classifier's head (a linear layer outside ``base``), which
    is stacked per set when the sets' heads differ: :func:`pick` then gives each row its
    own adapters *and* its own head. Any other leaf that differs is refused, by path.

    Example:
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> sets = [lora.init(random.key(i), base, rank=2) for i in (1, 2, 3)]
        >>> lora.stack(sets)["blocks"][0]["attn"]["qkv"]["lora_a"].shape
        torch.Size([3, 2, 8])

    Args:
        trees: adapted trees over the same base, with the same layers and ranks.

    Returns:
        One tree whose adapters (and per-set linear layers) carry a leading set dimension.

    Raises:
        ValueError: no trees; their paths, adapter layers or ranks differ; or a shared leaf
            that is not part of a linear layer differs between sets (the path is named).
    """
    if isinstance(trees, (dict, str)) or not isinstance(trees, Sequence):
        raise TypeError(
            f"lora.stack: trees must be a list of adapted trees, got {type(trees).__name__}"
        )
    if not trees:
        raise ValueError("lora.stack: no adapter sets given")
    flats = [tree.flatten(t) for t in trees]
    for i, f in enumerate(flats):
        if not any(p.rpartition(".")[2] in _LEAVES for p in f):
            raise ValueError(f"lora.stack: set {i} has no adapters (lora.init adds them)")
    first = flats[0]
    for i, f in enumerate(flats[1:], 1):
        if set(f) != set(first):
            diff = sorted(set(f) ^ set(first))
            raise ValueError(f"lora.stack: set {i} has other leaves than set 0: {diff[:6]}")
        for p, v in f.items():
            if tuple(v.shape) != tuple(first[p].shape):
                kind = "adapter layers or ranks" if _is_adapter(p) else "shapes"
                raise ValueError(
                    f"lora.stack: set {i} has other {kind} than set 0: {p} is "
                    f"{tuple(v.shape)}, not {tuple(first[p].shape)}"
                )
    stacked = {p for p in first if _is_adapter(p)}
    classifier = _is_classifier_tree(trees[0])
    per_set_layers: set[str] = set()
    for p in first:
        if p in stacked or all(_same(f[p], first[p]) for f in flats[1:]):
            continue
        layer, _, leaf = p.rpartition(".")
        outside_base = classifier and not p.startswith("base.")
        if outside_base and leaf in ("weight", "bias") and _is_linear(first, layer):
            per_set_layers.add(layer)
            continue
        i = next(i for i, f in enumerate(flats) if not _same(f[p], first[p]))
        raise ValueError(
            f"lora.stack: {p} differs between set 0 and set {i}; only the adapters and a "
            "classifier's head are stacked per set, the rest must be one shared base"
        )
    for layer in per_set_layers:
        stacked |= {f"{layer}.weight"} | ({f"{layer}.bias"} if f"{layer}.bias" in first else set())
    out = {p: torch.stack([f[p] for f in flats]) if p in stacked else v for p, v in first.items()}
    return tree.unflatten(out)


def pick(params: Params, index: Tensor) -> Params:
    """Give row ``i`` of a batch the set ``index[i]`` of a :func:`stack`-ed tree.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> sets = lora.stack([lora.init(random.key(i), base, rank=2) for i in (1, 2)])
        >>> picked = lora.pick(sets, torch.tensor([1, 0, 1]))
        >>> gpt.apply(picked, torch.tensor([[1, 2], [3, 4], [5, 6]])).shape
        torch.Size([3, 2, 20])

    Args:
        params: a tree from :func:`stack`.
        index: int ``[B]`` set ids, one per row of the batch to run.

    Returns:
        A tree whose stacked leaves are ``[B, ...]`` (a differentiable gather), for one batch.

    Raises:
        ValueError: the tree is not stacked, or an index is out of range.
    """
    if not isinstance(index, Tensor):
        raise TypeError(f"lora.pick: index must be an int [B] tensor, got {type(index).__name__}")
    if index.dtype == torch.bool:
        raise TypeError(
            "lora.pick: index is a bool tensor (a mask); pass int set ids, one per row "
            "(e.g. mask.long() for two sets)"
        )
    flat = tree.flatten(params)
    stacked = {p: v for p, v in flat.items() if p.rpartition(".")[2] in _LEAVES}
    bad_adapters = any(v.ndim != (1 if p.endswith("scale") else 3) for p, v in stacked.items())
    heads = _per_set_linears(flat)
    if bad_adapters or not (stacked or heads):
        raise ValueError("lora.pick: params has no stacked adapters (use lora.stack)")
    stacked.update(heads)
    n_sets = next(iter(stacked.values())).shape[0]
    if index.ndim != 1 or index.dtype.is_floating_point:
        raise ValueError(
            f"lora.pick: index must be an int [B] tensor, got {index.dtype} {tuple(index.shape)}"
        )
    if (
        not torch.compiler.is_compiling()
        and index.numel()
        and (int(index.min()) < 0 or int(index.max()) >= n_sets)
    ):
        raise ValueError(f"lora.pick: index values must be in [0, {n_sets}), got {index.tolist()}")
    return tree.unflatten({**flat, **{p: v[index] for p, v in stacked.items()}})


# ----------------------------------------------------------------------------- helpers


def _is_linear(flat: Mapping[str, Tensor], layer: str) -> bool:
    w = flat.get(f"{layer}.weight")
    return w is not None and w.ndim == 2 and not any(f"{layer}.{a}" in flat for a in _LEAVES)


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))


def _per_set_linears(flat: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Linear layers stacked per set by :func:`stack`: a 3-D weight (and a 2-D bias)."""
    out: dict[str, Tensor] = {}
    for p, v in flat.items():
        layer, _, leaf = p.rpartition(".")
        if leaf == "weight" and v.ndim == 3 and f"{layer}.lora_a" not in flat:
            out[p] = v
            if f"{layer}.bias" in flat:
                out[f"{layer}.bias"] = flat[f"{layer}.bias"]
    return out
