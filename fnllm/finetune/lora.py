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
from typing import Any

import torch
from torch import Tensor

from fnllm import nn, tree
from fnllm import random as jr

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
            a targeted layer matches no glob of a rank mapping; ``alpha`` is not positive.
        TypeError: ``targets`` or ``rank`` has the wrong type.
    """
    if targets is None:
        targets = DEFAULT_TARGETS if model is None else model.lora_targets
    globs = (targets,) if isinstance(targets, str) else tuple(targets)
    if not globs or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"lora.init: targets must be glob strings, got {targets!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"lora.init: alpha must be a positive number, got {alpha!r}")
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
        tree.check_globs(
            globs, _linears(params), where="lora.init: targets", what="linear layer", each=False,
            hint=" (a linear layer is a dict with a 2-D weight)",
        )  # fmt: skip
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
        ValueError: the adapters are stacked (merge one set: ``pick`` needs a batch).
    """

    def fold(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if nn.has_adapter(node):
                a = node[nn.ADAPTER_TRAINED[0]]
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

    Raises:
        ValueError: the tree has no adapters.
    """
    from safetensors.torch import save_file

    flat = adapters(params)
    if not flat:
        raise ValueError("lora.save: the tree has no adapters (lora.init adds them)")
    save_file(
        {k: v.detach().contiguous() for k, v in flat.items()}, os.fspath(path), {"fnllm": "lora"}
    )


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
    """
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora.load: no such file {os.fspath(path)}")
    return load_file(os.fspath(path))


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
        ValueError: an adapter's shape does not fit its layer's weight.
    """
    flat = tree.flatten(params)
    for path, value in adapter_leaves.items():
        layer, _, leaf = path.rpartition(".")
        if leaf not in _LEAVES or layer + ".weight" not in flat:
            raise KeyError(f"lora.attach: {path} has no linear layer {layer} in params")
        out_f, in_f = flat[layer + ".weight"].shape
        bad = (leaf == "lora_a" and value.shape[-1] != in_f) or (
            leaf == "lora_b" and value.shape[-2] != out_f
        )
        if bad:
            raise ValueError(
                f"lora.attach: {path} has shape {tuple(value.shape)}, which does not fit "
                f"{layer}.weight {(out_f, in_f)}"
            )
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
        ValueError: no trees, or their adapters differ in layers or shapes.
    """
    if not trees:
        raise ValueError("lora.stack: no adapter sets given")
    flats = [adapters(t) for t in trees]
    first = flats[0]
    for i, f in enumerate(flats[1:], 1):
        shapes = {p: tuple(v.shape) for p, v in f.items()}
        if shapes != {p: tuple(v.shape) for p, v in first.items()}:
            raise ValueError(f"lora.stack: set {i} has other adapter layers or ranks than set 0")
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
    """
    flat = tree.flatten(params)
    stacked = {p: v for p, v in flat.items() if p.rpartition(".")[2] in _LEAVES}
    if not stacked or any(v.ndim != (1 if p.endswith("scale") else 3) for p, v in stacked.items()):
        raise ValueError("lora.pick: params has no stacked adapters (use lora.stack)")
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
