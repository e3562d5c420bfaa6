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
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor

from fnllm import random as jr
from fnllm import tree
from fnllm.finetune import _lora_checks

__all__ = [
    "DEFAULT_TARGETS",
    "adapters",
    "attach",
    "init",
    "load",
    "merge",
    "pick",
    "save",
    "stack",
]

Params = Any
DEFAULT_TARGETS = ("*.attn.qkv", "*.attn.proj")
_LEAVES = ("lora_a", "lora_b", "lora_scale")


def init(
    key: Tensor,
    params: Params,
    rank: int | Mapping[str, int] = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    *,
    rslora: bool = False,
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
        targets: globs over the paths of linear layers (a dict with a 2-D ``weight``).
        rslora: use rank-stabilised scaling ``alpha / sqrt(r)``.

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
    if not isinstance(params, (dict, list, tuple)):
        raise TypeError(f"lora.init: params must be a model's tree, got {type(params).__name__}")
    if not isinstance(key, Tensor) or key.dtype not in (torch.int32, torch.int64):
        got = key.dtype if isinstance(key, Tensor) else type(key).__name__
        raise TypeError(f"lora.init: key must be a fnllm.random key, got {got}")
    found: list[str] = []

    def visit(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            weight = node.get("weight")
            if isinstance(weight, Tensor) and weight.ndim == 2 and _matches(path, globs):
                if "lora_a" in node:
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
        raise ValueError(
            f"lora.init: targets {list(globs)} match no linear layer (a dict with a 2-D weight); "
            f"linear layers here: {_linears(params)[:6]}"
        )
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
        ValueError: the adapters are stacked (merge one set: ``pick`` needs a batch), or a
            layer's adapters are incomplete, misshaped or hold a non-finite scale (the
            message names the layer).
    """

    def fold(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if "lora_a" in node:
                a, b, s = _lora_checks.adapter_leaves("lora.merge", node, path, _LEAVES)
                if a.ndim != 2:
                    raise ValueError(f"lora.merge: {path} holds stacked adapters {tuple(a.shape)}")
                rest = {k: v for k, v in node.items() if k not in _LEAVES}
                rest["weight"] = node["weight"] + s * (b @ a)
                return rest
            return {k: fold(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fold(v, f"{path}.{i}") for i, v in enumerate(node))
        return node

    return fold(params, "params")


def adapters(params: Params) -> dict[str, Tensor]:
    """The adapter leaves alone, as ``{dotted.path: tensor}``.

    Example:
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=2, n_head=2, d_model=8, max_len=8)
        >>> lp = lora.init(random.key(1), gpt.init(random.key(0)), rank=2)
        >>> len(lora.adapters(lp))
        12

    Args:
        params: a tree with adapters.

    Returns:
        A flat dict of the ``lora_a``, ``lora_b`` and ``lora_scale`` leaves.
    """
    return {p: v for p, v in tree.flatten(params).items() if p.rpartition(".")[2] in _LEAVES}


def save(path: str | os.PathLike, params: Params) -> None:
    """Save only the adapters of ``params`` as a (small) safetensors file.

    Example:
        >>> import os, tempfile
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> path = os.path.join(tempfile.mkdtemp(), "adapters.safetensors")
        >>> lora.save(path, lora.init(random.key(1), base, rank=2))
        >>> sorted(lora.load(path))[:2]
        ['blocks.0.attn.proj.lora_a', 'blocks.0.attn.proj.lora_b']

    Args:
        path: the file to write.
        params: a tree with adapters.

    The write is atomic (a temp file renamed over ``path``): a crash leaves the old file or
    the new one, never half of one, and the next save to the same folder removes the temp
    files of a writer that was killed.

    Raises:
        ValueError: the tree has no adapters.
        TypeError: ``path`` is not a path, or an adapter leaf is not a tensor.
    """
    from fnllm.io import _safetensors

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"lora.save: path must be a str or os.PathLike, got {type(path).__name__}")
    flat = adapters(params)
    if not flat:
        raise ValueError("lora.save: the tree has no adapters (lora.init adds them)")
    for p, v in flat.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"lora.save: {p} is a {type(v).__name__}, not a tensor")
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
    # a temp file next to ``path`` renamed over it once complete: a crash never leaves a
    # half-written file, and the next save sweeps the temp files of a killed writer
    _safetensors.write_safetensors(path, tensors, {"fnllm": "lora"})


def load(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read adapters written by :func:`save`: ``{dotted.path: tensor}`` for :func:`attach`.

    Example:
        >>> from fnllm.finetune import lora
        >>> lora.load("missing.safetensors")
        Traceback (most recent call last):
        ...
        FileNotFoundError: lora.load: no such file missing.safetensors

    Args:
        path: a file written by :func:`save`.

    Returns:
        The flat adapter dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, not safetensors, corrupt (its checksums differ) or
            holds something other than adapters (the message names the file).
    """
    return _lora_checks.read_adapters(path, _LEAVES)


def attach(params: Params, adapter_leaves: Mapping[str, Tensor]) -> Params:
    """Put saved adapters onto a base tree (a new tree; ``params`` is not modified).

    Example:
        >>> from fnllm import random, testing
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> lp = lora.init(random.key(1), base, rank=2)
        >>> testing.assert_trees_equal(lora.attach(base, lora.adapters(lp)), lp)  # lp again

    Args:
        params: the base model's tree (without adapters).
        adapter_leaves: ``{path: tensor}`` from :func:`load` or :func:`adapters`.

    Returns:
        The tree with the adapters in place.

    Raises:
        KeyError: an adapter's layer is not in ``params``.
        ValueError: an adapter's shape does not fit its layer's weight, a layer lacks one of
            its three adapter leaves, or the layer already has adapters.
        TypeError: ``adapter_leaves`` is not a ``{str: tensor}`` mapping.
    """
    if not isinstance(adapter_leaves, Mapping):
        raise TypeError(
            "lora.attach: adapter_leaves must be a {path: tensor} mapping (lora.load or "
            f"lora.adapters), got {type(adapter_leaves).__name__}"
        )
    flat = tree.flatten(params)
    for path, value in adapter_leaves.items():
        if not isinstance(path, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"lora.attach: {path!r} must map a str path to a tensor, got {type(value).__name__}"
            )
        layer, _, leaf = path.rpartition(".")
        if leaf not in _LEAVES or layer + ".weight" not in flat:
            raise KeyError(f"lora.attach: {path} has no linear layer {layer} in params")
        if any(layer + "." + k in flat for k in _LEAVES):
            raise ValueError(f"lora.attach: {layer} already has adapters in params")
        weight = flat[layer + ".weight"]
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise KeyError(f"lora.attach: {path}: {layer}.weight is not a 2-D linear weight")
        out_f, in_f = weight.shape
        want = 0 if leaf == "lora_scale" else 2
        if value.ndim not in (want, want + 1):  # + 1: a stacked set
            raise ValueError(
                f"lora.attach: {path} has shape {tuple(value.shape)}; expected {want} dims"
                " (or one more for stacked sets)"
            )
        bad = (leaf == "lora_a" and value.shape[-1] != in_f) or (
            leaf == "lora_b" and value.shape[-2] != out_f
        )
        if bad:
            raise ValueError(
                f"lora.attach: {path} has shape {tuple(value.shape)}, which does not fit "
                f"{layer}.weight {(out_f, in_f)}"
            )
    layers = {p.rpartition(".")[0] for p in adapter_leaves}
    for layer in sorted(layers):
        node = {k: adapter_leaves.get(f"{layer}.{k}") for k in _LEAVES}
        _lora_checks.adapter_leaves("lora.attach", node, layer, _LEAVES)
    return tree.unflatten({**flat, **adapter_leaves})


def stack(trees: Sequence[Params]) -> Params:
    """Stack several adapter sets of one base into ``[S, ...]`` adapter leaves.

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
        trees: adapted trees with the same layers and ranks (their base leaves are taken
            from the first).

    Returns:
        One tree whose adapters carry a leading set dimension; :func:`pick` selects per row.

    Raises:
        ValueError: no trees, a tree without adapters, or adapters that differ in layers,
            shapes or dtypes.
        TypeError: ``trees`` is not a list of trees.
    """
    if isinstance(trees, (dict, str)) or not isinstance(trees, Sequence):
        raise TypeError(
            f"lora.stack: trees must be a list of adapted trees, got {type(trees).__name__}"
        )
    if not trees:
        raise ValueError("lora.stack: no adapter sets given")
    flats = [adapters(t) for t in trees]
    first = flats[0]
    for i, f in enumerate(flats):
        if not f:
            raise ValueError(f"lora.stack: set {i} has no adapters (lora.init adds them)")
        shapes = {p: (tuple(v.shape), v.dtype) for p, v in f.items()}
        if shapes != {p: (tuple(v.shape), v.dtype) for p, v in first.items()}:
            raise ValueError(
                f"lora.stack: set {i} has other adapter layers, ranks or dtypes than set 0"
            )
    stacked = {p: torch.stack([f[p] for f in flats]) for p in first}
    return tree.unflatten({**tree.flatten(trees[0]), **stacked})


def pick(params: Params, index: Tensor) -> Params:
    """Give row ``i`` of a batch the adapter set ``index[i]`` of a :func:`stack`-ed tree.

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
        A tree whose adapters are ``[B, ...]`` (a differentiable gather), for one batch.

    Raises:
        ValueError: the tree is not stacked, or an index is out of range.
        TypeError: ``index`` is not a tensor, or is a bool mask.
    """
    flat = tree.flatten(params)
    stacked = {p: v for p, v in flat.items() if p.rpartition(".")[2] in _LEAVES}
    if not stacked or any(v.ndim != (1 if p.endswith("scale") else 3) for p, v in stacked.items()):
        raise ValueError("lora.pick: params has no stacked adapters (use lora.stack)")
    n_sets = next(iter(stacked.values())).shape[0]
    if not isinstance(index, Tensor):
        raise TypeError(f"lora.pick: index must be an int [B] tensor, got {type(index).__name__}")
    if index.dtype == torch.bool:
        raise TypeError(
            "lora.pick: index must hold set ids (int), got a bool tensor; a mask would select "
            "rows, not give each row its set (use mask.long() for sets 0/1)"
        )
    if index.ndim != 1 or index.dtype.is_floating_point or index.is_complex():
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


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatchcase(path, g) for g in globs)


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
    return {
        "lora_a": a,
        "lora_b": torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device),
        "lora_scale": torch.tensor(scale, dtype=weight.dtype, device=weight.device),
    }


def _rank_for(path: str, rank: Any) -> int:
    if isinstance(rank, Mapping):
        for glob, r in rank.items():
            if fnmatchcase(path, glob):
                return _check_rank(r, path)
        raise ValueError(f"lora.init: {path} matches no glob of the rank mapping {dict(rank)}")
    return _check_rank(rank, path)


def _check_rank(r: Any, path: str) -> int:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"lora.init: rank for {path} must be an int, got {r!r}")
    return r
