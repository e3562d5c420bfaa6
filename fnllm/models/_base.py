"""What the models share (private): config checks, dropout keys, batching of one sequence,
the parameter layout, the boundary checks of ``apply`` and the config round trip.

The parameter layout is written once, in each model's ``init``: :func:`param_shapes` runs
``init`` on the ``meta`` device (no memory, no arithmetic) and reads the leaves' paths and
shapes in insertion order, once per (hashable) config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fnllm import nn, tree
from fnllm import random as jr

Params = dict[str, Any]


def check_config(model: Any, positive: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first bad field of a model config."""
    kind = type(model).__name__
    for name in positive:
        value = getattr(model, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{kind}: {name} must be a positive int, got {value!r}")
    if model.d_model % model.n_head:
        raise ValueError(
            f"{kind}: d_model {model.d_model} is not divisible by n_head {model.n_head}"
        )
    if not 0.0 <= model.dropout < 1.0:
        raise ValueError(f"{kind}: dropout must be in [0, 1), got {model.dropout}")
    if not model.ln_eps > 0:
        raise ValueError(f"{kind}: ln_eps must be positive, got {model.ln_eps}")


def dropout_keys(model: Any, key: Tensor | None) -> tuple[float, list[Tensor | None]]:
    """The dropout rate in effect and one key per block plus one for the embeddings (last)."""
    drop = model.dropout if key is not None else 0.0
    if drop > 0.0:
        return drop, list(jr.split(key, model.n_layer + 1))
    return drop, [None] * (model.n_layer + 1)


def block_keys(key: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Keys for a block's attention dropout and its two residual dropouts (or ``None``)."""
    if key is None:
        return None, None, None
    k_attn, k_res1, k_res2 = jr.split(key, 3)
    return k_attn, k_res1, k_res2


def batched(*xs: Tensor | None) -> list[Tensor | None]:
    """Add a leading batch dimension of 1 to every tensor (``None`` stays ``None``)."""
    return [None if x is None else x[None] for x in xs]


def param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of ``model.init``'s leaves, in the order ``init`` builds them."""
    return dict(_cached_shapes(model))


def check_params(model: Any, params: Params) -> None:
    """``nn.check_shapes`` against :func:`param_shapes`, with a fast path for good trees.

    A valid tree is recognised by comparing its structure and leaf shapes with a layout
    cached per config: a few hundred microseconds for GPT-2's ~150 leaves, which keeps the
    eager check cheap next to the forward pass. Anything else takes the slow path, which
    names the offending path.
    """
    leaves, spec = tree.flatten_spec(params)
    want_spec, want_shapes = _layout(model)
    if spec == want_spec and all(
        isinstance(leaf, Tensor) and leaf.shape == shape for leaf, shape in zip(leaves, want_shapes)
    ):
        return
    nn.check_shapes(params, param_shapes(model))


def check_inputs(
    model: Any, params: Params, tokens: Any, attention_mask: Any
) -> tuple[Tensor, Tensor | None]:
    """Validate tokens and mask (and, in eager mode, the parameter tree) for ``apply``."""
    tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens: expected shape [B, T] or [T], got {tuple(tokens.shape)}")
    if tokens.shape[-1] > model.max_len:
        raise ValueError(f"tokens: sequence length {tokens.shape[-1]} > max_len {model.max_len}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} != tokens shape "
                f"{tuple(tokens.shape)}"
            )
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask: unsupported dtype {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
    if not torch.compiler.is_compiling():
        model.check_params(params)
    return tokens, attention_mask


def to_config(model: Any, kind: str) -> dict[str, Any]:
    """``{"type": kind, field: value, ...}``."""
    return {"type": kind, **dataclasses.asdict(model)}


def from_config(cls: Any, kind: str, config: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from a dict, checking the ``"type"`` tag and field names."""
    values = dict(config)
    tag = values.pop("type", kind)
    if tag != kind:
        raise ValueError(f"{cls.__name__}.from_config: type is {tag!r}, expected {kind!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_config: unknown fields {unknown}")
    return cls(**values)


@functools.lru_cache(maxsize=64)
def _cached_shapes(model: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``init`` on the meta device, read in insertion order (not sorted, as flatten is)."""
    with torch._C._DisableFuncTorch():  # the first call may come from inside grad or vmap
        params = model.init(jr.key(0).to("meta"))
    out: list[tuple[str, tuple[int, ...]]] = []

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict, list, tuple)):
                walk(v, path)
            else:
                out.append((path, tuple(v.shape)))

    walk(params, "")
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _layout(model: Any) -> tuple[Any, tuple[tuple[int, ...], ...]]:
    """The expected tree structure and the leaf shapes in flattening order."""
    shapes = param_shapes(model)
    paths = list(shapes)
    order, spec = tree.flatten_spec(tree.unflatten({p: i for i, p in enumerate(paths)}))
    return spec, tuple(shapes[paths[i]] for i in order)
