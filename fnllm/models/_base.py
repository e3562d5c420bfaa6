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
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from fnllm import nn, tree
from fnllm import random as jr
from fnllm._deprecation import deprecated

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
    for f in dataclasses.fields(model):
        value = getattr(model, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise TypeError(f"{kind}: {f.name} must be a bool, got {value!r}")
    if not 0.0 <= model.dropout < 1.0:
        raise ValueError(f"{kind}: dropout must be in [0, 1), got {model.dropout}")
    if not model.ln_eps > 0:
        raise ValueError(f"{kind}: ln_eps must be positive, got {model.ln_eps}")


def dropout_keys(model: Any, key: Tensor | None) -> tuple[float, list[Tensor | None]]:
    """The dropout rate in effect and one key per block plus one for the embeddings (last)."""
    drop = model.dropout if key is not None else 0.0
    if key is not None and drop > 0.0:
        return drop, list(jr.split(key, model.n_layer + 1))
    return drop, [None] * (model.n_layer + 1)


def block_keys(key: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Keys for a block's attention dropout and its two residual dropouts (or ``None``)."""
    if key is None:
        return None, None, None
    k_attn, k_res1, k_res2 = jr.split(key, 3)
    return k_attn, k_res1, k_res2


class Forward(NamedTuple):
    """What every block of one forward shares: the attention mask, made once by
    :func:`fnllm.nn.make_attention_mask` (``None``: no padding), the dropout rate in effect
    and the attention implementation."""

    mask: Tensor | None
    drop: float
    impl: nn.Impl


def batched(*xs: Tensor | None) -> list[Any]:
    """Add a leading batch dimension of 1 to every tensor (``None`` stays ``None``)."""
    return [None if x is None else x[None] for x in xs]


def param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of ``model.init``'s leaves, in the order ``init`` builds them."""
    return dict(_cached_shapes(model))


def check_params(model: Any, params: Params) -> None:
    """``nn.check_shapes`` against :func:`param_shapes`, with a fast path for good trees;
    then one floating dtype and one device for every leaf.

    A valid tree is recognised by comparing its structure and leaf shapes with a layout
    cached per config. Anything else takes the slow path, which names the offending path.
    """
    # Measured: a few hundred microseconds for GPT-2's ~150 leaves, cheap next to a forward.
    leaves, spec = tree.flatten_spec(params)
    want_spec, want_shapes = _layout(model)
    if not (
        spec == want_spec
        and all(
            isinstance(leaf, Tensor) and leaf.shape == shape
            for leaf, shape in zip(leaves, want_shapes)
        )
    ):
        nn.check_shapes(params, param_shapes(model))
    _check_one_dtype(leaves, spec)


def _check_one_dtype(leaves: list[Any], spec: Any) -> None:
    """All leaves floating, of one dtype and on one device; else name the odd leaf."""
    if not leaves:
        return
    first = leaves[0]
    if first.is_floating_point() and all(
        x.dtype is first.dtype and x.device == first.device for x in leaves[1:]
    ):
        return
    paths = tree.spec_paths(spec)
    for path, x in zip(paths, leaves):
        if not x.is_floating_point():
            raise TypeError(f"params: {path} has dtype {x.dtype}, expected a floating dtype")
    dtypes = [x.dtype for x in leaves]
    common = max(set(dtypes), key=dtypes.count)
    for path, x in zip(paths, leaves):
        if x.dtype is not common:
            raise TypeError(
                f"params: {path} has dtype {x.dtype} while the other leaves are {common}; "
                "cast the whole tree (fnllm.tree.cast) so that every leaf has one dtype"
            )
    devices = [x.device for x in leaves]
    where = max(set(devices), key=devices.count)
    for path, x in zip(paths, leaves):
        if x.device != where:
            raise ValueError(
                f"params: {path} is on {x.device} while the other leaves are on {where}"
            )


def check_inputs(
    model: Any, params: Params, tokens: Any, attention_mask: Any
) -> tuple[Tensor, Tensor | None]:
    """Validate tokens and mask (and, in eager mode, the parameter tree) for ``apply``."""
    tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens: expected shape [B, T] or [T], got {tuple(tokens.shape)}")
    if tokens.shape[-1] == 0:
        raise ValueError(f"tokens: empty sequence (shape {tuple(tokens.shape)}), expected T >= 1")
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
    """Build dataclass ``cls`` from a dict, checking the ``"type"`` tag and field names.

    Fields renamed since a config was saved (``cls._renamed``: old name -> new name) are read
    under their new names, so old checkpoints keep loading.
    """
    values = dict(config)
    for old, new in getattr(cls, "_renamed", {}).items():  # see renamed_fields
        if old in values:
            value = values.pop(old)
            if values.setdefault(new, value) != value:
                raise ValueError(
                    f"{cls.__name__}.from_config: {old} (the old name of {new}) is {value!r} "
                    f"but {new} is {values[new]!r}"
                )
    tag = values.pop("type", kind)
    if tag != kind:
        raise ValueError(f"{cls.__name__}.from_config: type is {tag!r}, expected {kind!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_config: unknown fields {unknown}")
    return cls(**values)


def renamed_fields(**old_to_new: str) -> Any:
    """Class decorator: a model config keeps accepting fields under their old names.

    ``cls(old=v)`` and ``model.old`` keep working until 0.2 (the first use of each warns with
    a ``DeprecationWarning`` naming the new name) and :func:`from_config` reads saved configs
    that use the old names, silently and beyond 0.2 (files outlive code); ``to_config``
    writes the new ones.
    """

    def decorate(cls: Any) -> Any:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in old_to_new.items():
                if old in kwargs:
                    deprecated(f"{cls.__name__}({old}=...)", new)
                    value = kwargs.pop(old)
                    if kwargs.setdefault(new, value) != value:
                        raise ValueError(
                            f"{cls.__name__}: {old} (the old name of {new}) is {value!r} "
                            f"but {new} is {kwargs[new]!r}"
                        )
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls._renamed = {**getattr(cls, "_renamed", {}), **old_to_new}
        for old, new in old_to_new.items():
            setattr(cls, old, property(functools.partial(_old_name, old=old, new=new)))
        return cls

    return decorate


def _old_name(model: Any, *, old: str, new: str) -> Any:
    deprecated(f"{type(model).__name__}.{old}", new)
    return getattr(model, new)


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


class ModelConfig:
    """What every model config shares: its parameter layout, checks and JSON form.

    A model (:class:`~fnllm.models.GPT`, :class:`~fnllm.models.BERT`) is a frozen dataclass
    of hyper-parameters deriving from this class and naming its ``kind``; the layout comes from
    the model's own ``init`` (run once on the meta device and cached), so it is written once.
    """

    kind: ClassVar[str] = ""
    _causal: ClassVar[bool] = False
    _renamed: ClassVar[dict[str, str]] = {}  # old field name -> new (see renamed_fields)
    if TYPE_CHECKING:  # fields every model dataclass declares (not fields of this base)
        n_layer: int
        dropout: float

    def _block(self, p: Params, x: Tensor, key: Tensor | None, fwd: Forward) -> Tensor:
        """One block on hidden states ``x`` (each model defines it; ``apply`` and
        :meth:`apply_blocks` run them in turn); ``key`` draws its dropout."""
        raise NotImplementedError

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The expected ``{path: shape}`` of every parameter leaf.

        Example:
            >>> from fnllm.models import GPT
            >>> shapes = GPT(vocab_size=10, n_layer=2, n_head=2, d_model=8).param_shapes()
            >>> shapes["blocks.1.attn.qkv.weight"], len(shapes)
            ((24, 8), 28)

        Returns:
            A dict from dotted path to shape tuple, in layer order.
        """
        return param_shapes(self)

    def check_params(self, params: Params) -> None:
        """Raise unless ``params`` has exactly this model's leaves, shapes and one dtype.

        Example:
            >>> from fnllm import random
            >>> from fnllm.models import GPT
            >>> gpt = GPT(vocab_size=10, n_layer=1, n_head=2, d_model=8)
            >>> params = gpt.init(random.key(0))
            >>> gpt.check_params(params)
            >>> del params["ln_f"]["bias"]
            >>> gpt.check_params(params)
            Traceback (most recent call last):
            ...
            KeyError: 'params: missing ln_f.bias'

        Args:
            params: a candidate parameter tree (from ``init``, a checkpoint or ``io.from_hf``).

        Raises:
            KeyError: a leaf is missing or unexpected (named by path). ValueError: a leaf has
                the wrong shape (named by path). TypeError: a leaf is not floating, or its dtype
                differs from the others'.
        """
        check_params(self, params)

    def to_config(self) -> dict[str, Any]:
        """A plain-JSON dict of the config, tagged with the model's ``"type"``.

        Example:
            >>> from fnllm.models import BERT, GPT
            >>> GPT(n_layer=2).to_config()["type"], BERT(n_layer=6).to_config()["n_layer"]
            ('gpt', 6)

        Returns:
            ``{"type": kind, field: value, ...}``; :meth:`from_config` inverts it.
        """
        return to_config(self, self.kind)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        """Rebuild a config from :meth:`to_config`'s dict.

        Example:
            >>> from fnllm.models import GPT
            >>> gpt = GPT(n_layer=2, tie_head=False)
            >>> GPT.from_config(gpt.to_config()) == gpt
            True

        Args:
            config: field values; an optional ``"type"`` entry must name this model's kind.

        Returns:
            The config (a ``ValueError`` names a wrong ``"type"`` or an unknown field).
        """
        return from_config(cls, cls.kind, config)

    def apply_blocks(
        self,
        params: Params,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
        key: Tensor | None = None,
        impl: nn.Impl = "auto",
    ) -> Tensor:
        """Run blocks ``start .. stop-1`` on hidden states: a forward resumed at layer ``start``.

        ``x`` is ``hidden_states[start]`` of :meth:`apply` (the input of block ``start``), so
        frozen lower blocks can run once and their output be reused (``fnllm.finetune``).

        Example:
            >>> import torch
            >>> from fnllm import models, random
            >>> model = models.GPT(vocab_size=16, n_layer=3, n_head=2, d_model=8, max_len=8)
            >>> params, tokens = model.init(random.key(0)), torch.tensor([[1, 2, 3]])
            >>> out = model.apply(params, tokens, output_hidden_states=True)
            >>> h = model.apply_blocks(params, out.hidden_states[1], start=1, stop=2)
            >>> torch.allclose(h, out.hidden_states[2])
            True

        Args:
            params: the parameter tree.
            x: ``[B, T, D]`` hidden states entering block ``start``.
            attention_mask: ``[B, T]`` keep-mask (1 = real token), or ``None``.
            start: first block to run.
            stop: one past the last block to run (default ``n_layer``).
            key: a ``fnllm.random`` key to enable dropout; ``None`` = eval.
            impl: attention implementation.

        Returns:
            ``[B, T, D]``: the output of block ``stop - 1`` (before GPT's final layer norm).
        """
        stop = self.n_layer if stop is None else stop
        if not 0 <= start <= stop <= self.n_layer:
            raise ValueError(f"apply_blocks: need 0 <= start {start} <= stop {stop} <= n_layer")
        drop = self.dropout if key is not None else 0.0
        fwd = Forward(nn.make_attention_mask(attention_mask, causal=self._causal), drop, impl)
        keys: list[Tensor | None] = [None] * (stop - start)
        if key is not None and drop > 0.0 and stop > start:
            keys = list(jr.split(key, stop - start))
        for block, k in zip(params["blocks"][start:stop], keys):
            x = self._block(block, x, k, fwd)
        return x
