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
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import _cpu16, nn, remat, tree
from fnllm import random as jr
from fnllm.models import _cache
from fnllm.models._cache import CacheStep, KVCache
from fnllm.models._config import from_config, to_config

Params = dict[str, Any]
#: How a sequence of hidden states becomes one vector (a classifier's or probe's input).
Pooling = Literal["cls", "mean", "last"]


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


def run_block(model: Any, p: Params, x: Tensor, key: Tensor | None, fwd: Forward) -> Tensor:
    """One block of :meth:`ModelConfig.apply_blocks`' layer loop: ``model._block(p, x, key,
    fwd)``.

    Under ``torch.compile`` the block is a nested compile region
    (``torch.compiler.nested_compile_region``): the layers share one shape, so Dynamo traces
    one block and reuses that graph for every layer (and inductor compiles it once)."""
    # Not inside torch.func.grad / vmap: Dynamo cannot trace a region under a functorch
    # transform in torch 2.13 (an AssertionError on the grad, a KeyError on vmap).
    # Only a plain forward: a cached one (positions, cache step) or one with per-forward
    # extras (Llama's rotary tables) runs the block as written.
    plain = fwd.positions is None and fwd.extra is None and fwd.step is None
    if plain and torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        values = tuple(getattr(model, f.name) for f in dataclasses.fields(model))
        return _block_region(name, values, fwd.drop, fwd.impl, p, x, key, fwd.mask)
    return model._block(p, x, key, fwd)


@torch.compiler.nested_compile_region
def _block_region(
    name: str,
    values: tuple[Any, ...],
    drop: float,
    impl: nn.Impl,
    p: Params,
    x: Tensor,
    key: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """``model._block`` with inputs Dynamo can match between layers (tensors, ``None`` and
    Python constants: the model travels as its class name and field values)."""
    model = _MODEL_CLASSES[name](*values)
    return model._block(p, x, key, Forward(mask, drop, impl))


class Forward(NamedTuple):
    """What every block of one forward shares: the attention mask, made once by
    :func:`fnllm.nn.make_attention_mask` (``None``: no padding), the dropout rate in effect
    and the attention implementation; for a cached forward, the positions of the new tokens,
    the model's per-forward extras (:meth:`ModelConfig._extras`, e.g. rotary tables) and the
    cache bookkeeping (:class:`fnllm.models._cache.CacheStep`)."""

    mask: Tensor | None
    drop: float
    impl: nn.Impl
    positions: Tensor | None = None
    extra: Any = None
    step: CacheStep | None = None


def run_blocks(
    model: Any,
    blocks: list[Params],
    x: Tensor,
    keys: list[Tensor | None],
    fwd: Forward,
    checkpoint: remat.Policy = None,
    *,
    start: int = 0,
    hidden: list[Tensor] | None = None,
) -> Tensor:
    """The block loop of ``apply`` and :meth:`ModelConfig.apply_blocks`: each block in turn
    (``blocks[i]`` is block ``start + i``), recomputed in the backward where ``checkpoint``
    (:func:`fnllm.remat.selected`) picks it; every output is appended to ``hidden``."""
    recompute = remat.selected(checkpoint, model.n_layer)[start : start + len(blocks)]
    for p, k, again in zip(blocks, keys, recompute):
        if again:
            x = remat.checkpoint(model._block)(p, x, k, fwd)
        else:
            x = run_block(model, p, x, k, fwd)
        if hidden is not None:
            hidden.append(x)
    return x


def lm_logits(params: Params, x: Tensor, tie_head: bool) -> Tensor:
    """A decoder's next-token logits: ``x`` times the token embedding (tied) or ``head``; the
    stream is cast to the head's dtype (a float32 head on a bf16 stream gives float32)."""
    head = params["embed"]["tokens"]["weight"] if tie_head else params["head"]["weight"]
    x = x.to(head.dtype)
    if _cpu16.upcasts(x, head):  # a 16-bit head on a CPU without 16-bit units: in float32
        return _cpu16.linear(x, head, None)
    return F.linear(x, head)


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


#: The 16-bit dtypes a frozen base may be stored in, next to float32 trainable leaves.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _check_one_dtype(leaves: list[Any], spec: Any) -> None:
    """All leaves floating and on one device, of one dtype or of float32 plus one 16-bit
    dtype (a bf16 frozen base with float32 trainable leaves); else name the odd leaf."""
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
    kinds = set(dtypes)
    mixed_ok = len(kinds) == 2 and torch.float32 in kinds and bool(kinds & set(HALF_DTYPES))
    common = max(kinds, key=dtypes.count)
    for path, x in zip(paths, leaves):
        if not mixed_ok and x.dtype is not common:
            raise TypeError(
                f"params: {path} has dtype {x.dtype} while the other leaves are {common}; "
                "cast the whole tree (fnllm.tree.cast) so that every leaf has one dtype, or "
                "keep a bfloat16/float16 frozen base with float32 trainable leaves (no other "
                "mix)"
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


#: Every model class by module and name, for :func:`_block_region` (filled as classes are made).
_MODEL_CLASSES: dict[str, Any] = {}


class ModelConfig:
    """What every model config shares: its parameter layout, checks and JSON form.

    A model (:class:`~fnllm.models.GPT`, :class:`~fnllm.models.BERT`) is a frozen dataclass
    of hyper-parameters deriving from this class and naming its ``kind``; the layout comes from
    the model's own ``init`` (run once on the meta device and cached), so it is written once.

    It is also the *model protocol*: what the rest of fnllm asks a model instead of testing
    its class (block, head, final-norm and pooling paths, default pooling and LoRA targets,
    the Hugging Face codec, and for a decoder the logits and the cached forward that
    ``fnllm.generate`` runs). ``isinstance(x, ModelConfig)`` is how other modules recognise a
    model config.

    Example:
        >>> from fnllm.models import BERT, GPT, ModelConfig
        >>> gpt, bert = GPT(n_layer=2), BERT(n_layer=2)
        >>> isinstance(gpt, ModelConfig), gpt.is_decoder, bert.is_decoder
        (True, True, False)
        >>> gpt.block_paths(), gpt.final_norm, bert.default_pooling, bert.head_paths()
        (('blocks.0', 'blocks.1'), 'ln_f', 'mean', ('pooler', 'mlm', 'sop'))
    """

    kind: ClassVar[str] = ""
    _causal: ClassVar[bool] = False
    _renamed: ClassVar[dict[str, str]] = {}  # old field name -> new (see renamed_fields)
    # Fields every model config has (declared here for the type checker; each model's own
    # dataclass defines them).
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    max_len: int
    dropout: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MODEL_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls

    # ------------------------------------------------------------------ the model protocol
    # What other modules ask a model instead of testing its class (DESIGN.md: no module
    # outside models/ tests for a concrete model class). Each model answers for itself.

    #: Hugging Face ``model_type`` values this config reads and writes (``io.from_hf``).
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    #: The module of the Hugging Face codec for those types (interface: ``models._hf``).
    hf_codec_module: ClassVar[str | None] = None
    #: The pooling a feature extractor or classifier uses by default.
    default_pooling: ClassVar[Pooling] = "last"
    #: Globs (``tree`` dialect) of the linear layers LoRA adapts by default.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: Path of the norm applied after the last block (``None``: none).
    final_norm: ClassVar[str | None] = None

    @property
    def is_decoder(self) -> bool:
        """Whether the model predicts the next token (and so can generate with a KV cache)."""
        return self._causal

    def embed(self, params: Params, tokens: Tensor, *, key: Tensor | None = None) -> Tensor:
        """The embedding output for ``[B, T]`` ids: ``hidden_states[0]``, the input of block 0
        (each model defines it; ``finetune.Classifier.prefix`` starts here)."""
        raise NotImplementedError(f"{type(self).__name__}.embed")

    def init(self, key: Tensor) -> Params:
        """Draw the parameters (each model defines it)."""
        raise NotImplementedError(f"{type(self).__name__}.init")

    def block_paths(self) -> tuple[str, ...]:
        """The paths of the blocks, bottom to top (``"blocks.0"``, ...): ``last:N`` trains
        the last ``N``."""
        return tuple(f"blocks.{i}" for i in range(self.n_layer))

    def head_paths(self) -> tuple[str, ...]:
        """What the ``head`` strategy trains on the bare model (heads and the final norm)."""
        raise NotImplementedError(f"{type(self).__name__}.head_paths")

    def finish(self, params: Params, x: Tensor) -> Tensor:
        """The output of the last block to the final hidden states (the final norm, if any)."""
        return x

    def pool_first(self, params: Params, first: Tensor) -> Tensor:
        """``cls`` pooling of the first token's final hidden state (BERT: its pooler)."""
        return first

    def pool_first_paths(self) -> tuple[str, ...]:
        """The leaves :meth:`pool_first` reads (trained with ``last:N`` under cls pooling)."""
        return ()

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """Next-token logits ``[..., V]`` from final hidden states ``[..., D]`` (decoders)."""
        raise TypeError(self._not_decoder("logits"))

    def decode_params(self, params: Params) -> Params:
        """The tree a decode loop reads instead of ``params`` (same results; by default
        ``params`` itself). Llama fuses each block's projections into fewer matmuls."""
        return params

    def kv_shape(self) -> tuple[int, int]:
        """``(n_kv_head, head_dim)`` of one layer's cached keys and values."""
        n_head = self.n_head
        return getattr(self, "n_kv_head", n_head), self.d_model // n_head

    def init_cache(
        self,
        batch_size: int,
        size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`~fnllm.models._cache.KVCache` of ``size`` slots (decoders).

        Example:
            >>> from fnllm.models import GPT
            >>> cache = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8).init_cache(3, 10)
            >>> len(cache.keys), cache.keys[0].shape, int(cache.length)
            (2, torch.Size([3, 2, 10, 4]), 0)

        Args:
            batch_size: number of rows.
            size: number of slots (prompt width plus new tokens); at most ``max_len``.
            dtype: dtype of keys and values (the params' dtype).
            device: where to allocate.

        Raises:
            TypeError: the model is an encoder. ValueError: a size is not a positive int,
                or ``size > max_len``.
        """
        self.check_decoder("init_cache")
        for name, value in (("batch_size", batch_size), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if size > self.max_len:
            raise ValueError(f"size: {size} slots > max_len {self.max_len}")
        n_kv, head_dim = self.kv_shape()
        return _cache.empty(
            self.n_layer, batch_size, size, n_kv, head_dim, dtype=dtype, device=device
        )

    def apply_cached(
        self,
        params: Params,
        tokens: Tensor,
        attention_mask: Tensor,
        cache: KVCache,
        *,
        inplace: bool = False,
    ) -> tuple[Tensor, KVCache]:
        """The model's forward over ``tokens [B, T]`` written into ``cache`` (no checks).

        Prefill and decode are this one forward: ``models._cache.begin`` makes the
        slots, positions and attention mask, every block reads and writes its cache slot, and
        the result is the final hidden states ``[B, T, D]`` (after :meth:`finish`) with the
        new cache; :meth:`logits` turns them into next-token logits. ``generate`` checks the
        inputs and runs the sampling loop on top. Positions count each row's real tokens (as
        `transformers`' ``generate`` does), so a left-padded row decodes as it would alone.
        What differs between decoders is the model's: ``_embed_at``, ``_extras`` and
        ``_block`` with its cache slot.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import Llama
            >>> llama = Llama(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
            ...               d_ff=32, max_len=16)
            >>> params, tokens = llama.init(random.key(0)), torch.tensor([[3, 4, 5, 6]])
            >>> cache = llama.init_cache(batch_size=1, size=8)
            >>> ones = torch.ones(1, 3, dtype=torch.bool)
            >>> _, cache = llama.apply_cached(params, tokens[:, :3], ones, cache)
            >>> x, cache = llama.apply_cached(params, tokens[:, 3:], ones[:, :1], cache)
            >>> full = llama.apply(params, tokens)[:, -1]
            >>> torch.allclose(llama.logits(params, x[:, -1]), full, atol=1e-5), int(cache.length)
            (True, 4)

        Args:
            params: the parameter tree.
            tokens: int ids ``[B, T]``.
            attention_mask: bool ``[B, T]``, False for left padding.
            cache: a cache from :meth:`init_cache` with ``T`` free slots.
            inplace: write the cache's own tensors (only for a cache nobody else holds).

        Returns:
            ``(hidden states [B, T, D], the new cache)``.
        """
        self.check_decoder("apply_cached")
        step = _cache.begin(cache, attention_mask, inplace=inplace)
        x = self._embed_at(params, tokens, step.positions)
        impl: nn.Impl = "math" if tokens.shape[1] == 1 else "auto"  # one query: no flash set-up
        extra = self._extras(step.positions, x.dtype, params)
        fwd = Forward(None, 0.0, impl, step.positions, extra, step)
        keys, values = [], []
        for p, k_cache, v_cache in zip(params["blocks"], cache.keys, cache.values):
            x, (k_cache, v_cache) = self._block(p, x, None, fwd, (k_cache, v_cache))
            keys.append(k_cache)
            values.append(v_cache)
        return self.finish(params, x), _cache.finish(cache, step, keys, values)

    def _embed_at(self, params: Params, tokens: Tensor, positions: Tensor) -> Tensor:
        """A decoder's input embeddings of ``tokens`` at ``positions`` (no dropout), for
        :meth:`apply_cached`."""
        raise TypeError(self._not_decoder("apply_cached"))

    def check_decoder(self, where: str) -> None:
        """Raise a named ``TypeError`` unless the model is a decoder."""
        if not self.is_decoder:
            raise TypeError(self._not_decoder(where))

    def _not_decoder(self, where: str) -> str:
        kind = type(self).__name__
        return (
            f"{where}: model: expected a fnllm.models.GPT, got {kind} (or another decoder, such "
            f"as Llama; {kind} is an encoder: it has no next-token head or KV cache)"
        )

    def _extras(self, positions: Tensor, dtype: torch.dtype, params: Params | None = None) -> Any:
        """Per-forward values every block reads, made once from the token positions
        (Llama: the rotary cos/sin tables, read from ``params`` when a decode tree holds
        them); ``None`` by default."""
        return None

    def _block(
        self,
        p: Params,
        x: Tensor,
        key: Tensor | None,
        fwd: Forward,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Any:
        """One block on hidden states ``x`` (each model defines it; ``apply``,
        :meth:`apply_blocks` and :meth:`apply_cached` run them in turn); ``key`` draws its
        dropout. With a cache slot ``kv = (k_cache, v_cache)`` (and ``fwd.step`` set) the
        block writes its new keys and values with :func:`fnllm.models._cache.write`, attends
        over the cache and returns ``(x, (k_cache, v_cache))``; without, it returns ``x``."""
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
        """Raise unless ``params`` has exactly this model's leaves, shapes and dtypes: one
        dtype, or float32 with one 16-bit dtype (a bf16 frozen base, float32 trainable leaves).

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
                differs from the others' in another way than float32 next to bf16/fp16.
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
        checkpoint: remat.Policy = None,
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
            checkpoint: which blocks to recompute in the backward pass instead of keeping
                their activations (:func:`fnllm.remat.selected`; indices count from block 0).

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
        blocks = params["blocks"][start:stop]
        return run_blocks(self, blocks, x, keys, fwd, checkpoint, start=start)
