"""A quantized frozen base (QLoRA-style): linear weights as torchao's NF4 or int8 tensors.

:func:`quantize` swaps the selected linear layers' 2-D weights for ``torchao`` quantized
tensors (``NF4Tensor``: 4-bit NormalFloat, one scale per 64 weights, the scales themselves
quantized to 8 bits; ``Int8Tensor``: int8 with one scale per output row). They stay ordinary
leaves of the same tree, with the weight's shape and original dtype: ``nn.linear`` (and so
every model) runs them, dequantizing one layer at a time in forward and backward; LoRA
adapters (``finetune.lora.init``) sit on top and train; ``tree.partition`` refuses to make one
trainable; ``io.save`` / ``io.load`` store their inner tensors bit for bit. Embeddings, norms and
the language-model head stay in their precision. :func:`dequantize` gives a plain tree back
(``finetune.lora.merge`` asks for it explicitly). Needs the ``quant`` extra (``torchao``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _quant
from fnllm import tree as _tree

__all__ = ["dequantize", "quantize"]


def quantize(params: Any, globs: str | Sequence[str], kind: str) -> Any:
    """Quantize the linear weights that ``globs`` select to NF4 (4-bit) or int8: a frozen base.

    Example:
        >>> import torch
        >>> from fnllm import io, random
        >>> from fnllm.models import Llama
        >>> llama = Llama(vocab_size=32, n_layer=1, n_head=2, d_model=64, d_ff=128)
        >>> params = llama.init(random.key(0))
        >>> q = io.quantize(params, "blocks.*.mlp", "nf4")
        >>> type(q["blocks"][0]["mlp"]["up"]["weight"]).__name__
        'NF4Tensor'
        >>> q["embed"]["tokens"]["weight"] is params["embed"]["tokens"]["weight"]  # shared
        True
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> (llama.apply(q, tokens) - llama.apply(params, tokens)).abs().max() < 0.1
        tensor(True)

    Args:
        params: a model's tree; it is not modified (the new tree shares every other leaf).
        globs: a glob or list of globs in fnllm's dialect (:func:`fnllm.tree.glob_match`)
            selecting linear layers (a dict holding a 2-D ``weight``) by their path, their
            weight's path or a dotted prefix: ``"blocks.*"`` quantizes every linear layer of
            every block, ``"blocks.*.mlp.*"`` the MLPs only. Biases, norms and other leaves
            under a selected prefix stay as they are.
        kind: ``"nf4"`` (4-bit NormalFloat, QLoRA's format; the weight's size must be a
            multiple of 64) or ``"int8"`` (per-row symmetric int8, weight-only).

    Returns:
        A new tree whose selected weights are torchao quantized tensors.

    Raises:
        ImportError: torchao is not installed (install the ``quant`` extra).
        ValueError: an unknown ``kind``; a glob that selects no linear layer (a glob naming a
            leaf that is not a linear layer's 2-D weight says so); a selected weight that is
            already quantized, is an embedding table or the language-model head next to the
            embeddings (the models read those directly), or whose size is not a multiple of
            NF4's block of 64.
        TypeError: ``globs`` is not a glob string or list of them; a selected weight is not
            floating point.
    """
    if not isinstance(kind, str) or kind not in _quant.KINDS:
        raise ValueError(f"io.quantize: unknown kind {kind!r}; choose one of {list(_quant.KINDS)}")
    globs = _check_globs_type(globs)
    _quant._torchao()  # the named ImportError before anything else
    flat = _tree.flatten(params)
    layers = {p[: -len(".weight")]: v for p, v in flat.items() if _is_linear_weight(p, v)}
    for glob in globs:
        if not any(_tree.glob_match(p, glob) for p in layers):
            _no_layer(glob, flat, list(layers))
    chosen = [p for p in layers if _tree.glob_match(p, globs)]
    out = {}
    for layer in chosen:
        w = layers[layer]
        _check_weight(layer, w, flat, kind)
        out[f"{layer}.weight"] = _quant.quantize(w, kind)
    return _tree.map(lambda p, x: out.get(p, x), params, with_path=True)


def dequantize(params: Any, dtype: torch.dtype | None = None) -> Any:
    """Replace every quantized leaf by its dense weight (a new tree; others are shared).

    Example:
        >>> import torch
        >>> from fnllm import io
        >>> w = torch.randn(8, 64)
        >>> q = io.quantize({"lin": {"weight": w}}, "lin", "int8")
        >>> d = io.dequantize(q)["lin"]["weight"]
        >>> type(d).__name__, d.dtype, bool((d - w).abs().max() < 0.05)
        ('Tensor', torch.float32, True)

    Args:
        params: a tree, possibly with quantized leaves (:func:`quantize`).
        dtype: the dense weights' dtype; ``None`` keeps each weight's original dtype.

    Returns:
        The tree with plain tensors where quantized ones were.

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"io.dequantize: dtype must be a floating torch.dtype, got {dtype!r}")

    def plain(x: Any) -> Any:
        return _quant.dequantize(x, dtype) if _quant.is_quantized(x) else x

    return _tree.map(plain, params)


# ----------------------------------------------------------------------------- checks


def _check_globs_type(globs: Any) -> tuple[str, ...]:
    out = (globs,) if isinstance(globs, str) else globs
    if (
        not isinstance(out, (list, tuple))
        or not out
        or not all(isinstance(g, str) and g for g in out)
    ):
        raise TypeError(
            f"io.quantize: globs must be a glob string or a list of them, got {globs!r}"
        )
    return tuple(out)


def _is_linear_weight(path: str, x: Any) -> bool:
    return path.endswith(".weight") and isinstance(x, Tensor) and x.ndim == 2


def _no_layer(glob: str, flat: dict[str, Any], layers: list[str]) -> None:
    hit = [p for p in flat if _tree.glob_match(p, glob)]
    if hit:
        x = flat[hit[0]]
        what = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"io.quantize: glob {glob!r} selects {hit[0]} ({what}), which is not a linear "
            "layer's 2-D weight; quantize selects linear layers (e.g. 'blocks.*.mlp')"
        )
    _tree.check_globs([glob], layers, where="io.quantize: globs", what="linear layer")


def _check_weight(layer: str, w: Tensor, flat: dict[str, Any], kind: str) -> None:
    parts = layer.split(".")
    sibling = ".".join([*parts[:-1], "embed", "tokens", "weight"])
    if "embed" in parts or (parts[-1] == "head" and sibling in flat):
        raise ValueError(
            f"io.quantize: {layer} is an embedding table or the language-model head, which "
            "the model reads directly (not through nn.linear); keep it in higher precision "
            "and select the blocks' linear layers (e.g. 'blocks.*')"
        )
    if _quant.is_quantized(w):
        raise ValueError(f"io.quantize: {layer}.weight is already quantized ({_quant.kind_of(w)})")
    if not w.is_floating_point():
        raise TypeError(f"io.quantize: {layer}.weight is {w.dtype}, not a floating weight")
    if kind == "nf4" and w.numel() % _quant.NF4_BLOCK:
        raise ValueError(
            f"io.quantize: {layer}.weight has {w.numel()} weights {tuple(w.shape)}, not a "
            f"multiple of NF4's block of {_quant.NF4_BLOCK}; use kind='int8' or leave it out"
        )
