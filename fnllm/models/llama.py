"""Llama as a pure function: a frozen config, ``init(key) -> params``, ``apply(params, tokens)``.

One config covers the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM): token
embeddings, ``n_layer`` pre-norm blocks (``x + attn(attn_norm(x))``, then
``x + mlp(mlp_norm(x))``) with RMS norms, rotary position embeddings on queries and keys
(``rope_theta``, optionally Llama 3.1's ``llama3`` scaling), grouped-query attention
(``n_kv_head`` key/value heads shared by ``n_head`` query heads) and a SwiGLU MLP, then a
final RMS norm and a language-model head (a separate matrix, or tied to the token embedding
with ``tie_head=True``). Qwen2 adds biases to the q/k/v projections (``qkv_bias=True``).
Parameter paths read like ``blocks.3.attn.q.weight``:

    embed.tokens.weight          [V, D]      blocks.i.attn_norm.weight       [D]
    norm.weight                  [D]         blocks.i.attn.q.weight          [H * hd, D]
    head.weight                  [V, D]      blocks.i.attn.{k,v}.weight      [H_kv * hd, D]
      (only when tie_head=False)             blocks.i.attn.{q,k,v}.bias      (qkv_bias only)
                                             blocks.i.attn.o.weight          [D, H * hd]
                                             blocks.i.mlp_norm.weight        [D]
                                             blocks.i.mlp.{gate,up}.weight   [F, D]
                                             blocks.i.mlp.down.weight        [D, F]

``hd`` is ``head_dim`` (by default ``d_model // n_head``). A forward without a cache
places tokens at positions ``0 .. T-1`` whatever the padding (as `transformers` does without
``position_ids``); the cached forward that ``generate`` runs counts real tokens only, so a
left-padded row decodes as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor

from fnllm import _quant, nn, remat
from fnllm import random as jr
from fnllm.models import _base, _cache
from fnllm.models._base import Params
from fnllm.models._cache import KVCache
from fnllm.nn._layers import _embed
from fnllm.nn._rotary import ROPE_TYPES

__all__ = ["Llama", "LlamaOutput"]


class LlamaOutput(NamedTuple):
    """What :meth:`Llama.apply` returns with ``output_hidden_states=True``.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.models import Llama
        >>> llama = Llama(vocab_size=16, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=8)
        >>> out = llama.apply(llama.init(random.key(0)), torch.zeros(1, 4, dtype=torch.long),
        ...                   output_hidden_states=True)
        >>> out.logits.shape, len(out.hidden_states)
        (torch.Size([1, 4, 16]), 3)

    Attributes:
        logits: ``[B, T, V]`` next-token logits.
        hidden_states: ``n_layer + 1`` tensors ``[B, T, D]``: the embeddings, the output of
            every block but the last, and the last block's output after the final ``norm``
            (the Hugging Face ``output_hidden_states`` convention).
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...]


@dataclass(frozen=True)
class Llama(_base.ModelConfig):
    """Llama-family configuration; ``init`` makes parameters and ``apply`` runs the model.

    The config is hashable and holds no tensors, so ``torch.compile`` specialises on it. The
    defaults are a GPT-2-small-sized Llama; SmolLM-135M is
    ``Llama(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
    max_len=2048, tie_head=True, norm_eps=1e-5)``.

    Example:
        >>> from fnllm import random, tree
        >>> from fnllm.models import Llama
        >>> llama = Llama(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
        ...               d_ff=32, max_len=32)
        >>> tree.count(llama.init(random.key(0)))  # parameters; see apply for a forward pass
        7888

    Args:
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: query heads per block.
        n_kv_head: key/value heads per block, dividing ``n_head`` (grouped-query attention);
            ``None`` means ``n_head`` (multi-head attention).
        d_model: residual stream width.
        d_ff: SwiGLU hidden width.
        max_len: the longest sequence ``apply`` accepts (rotary positions need no table).
        head_dim: features per head; ``None`` means ``d_model // n_head``. Must be even.
        rope_theta: the rotary base period.
        rope_type: ``"default"`` or ``"llama3"`` (Llama 3.1's long-context scaling, with the
            four ``rope_*`` values below; see :func:`fnllm.nn.rotary_frequencies`).
        rope_factor: llama3 scaling: how much the longest wavelengths are stretched.
        rope_low_freq_factor: llama3 scaling: the low-frequency bound.
        rope_high_freq_factor: llama3 scaling: the high-frequency bound.
        rope_original_max_len: llama3 scaling: the original training context length.
        qkv_bias: biases on the q, k and v projections (Qwen2).
        tie_head: use the token embedding as the output matrix; ``False`` adds a ``head``.
        norm_eps: RMS-norm epsilon.
        dropout: dropout rate on the attention probabilities (as `transformers`'
            ``attention_dropout``), active only when ``apply`` gets a key.

    Raises:
        TypeError: a field of the wrong type (named).
        ValueError: a non-positive size, ``n_head`` not divisible by ``n_kv_head``, an odd
            head dim, ``d_model`` not divisible by ``n_head`` without ``head_dim``, an unknown
            rope type or a bad scaling value.
    """

    kind: ClassVar[str] = "llama"
    _causal: ClassVar[bool] = True

    hf_model_types: ClassVar[tuple[str, ...]] = ("llama", "qwen2", "mistral")
    hf_codec_module: ClassVar[str | None] = "fnllm.models._hf_llama"
    default_pooling: ClassVar[_base.Pooling] = "last"
    lora_targets: ClassVar[tuple[str, ...]] = (
        "*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o", "*.mlp.gate", "*.mlp.up", "*.mlp.down",
    )  # fmt: skip
    final_norm: ClassVar[str | None] = "norm"

    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    d_model: int = 768
    d_ff: int = 2048
    max_len: int = 2048
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool = False
    tie_head: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(
                    f"Llama: d_model {self.d_model} is not divisible by n_head {self.n_head} "
                    "(give head_dim to set the head width explicitly)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_head)
        if self.n_head % self._n_kv:
            raise ValueError(
                f"Llama: n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head} "
                "(grouped-query attention shares each key/value head among n_head / n_kv_head "
                "query heads)"
            )
        if self._hd % 2:
            raise ValueError(
                f"Llama: head_dim {self.head_dim} is odd; rotary embeddings rotate pairs of "
                "features, so each head needs an even width"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Llama: rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        try:
            self._inv_freq("meta")  # checks the scaling values once, on no memory
        except (TypeError, ValueError) as e:
            raise type(e)(f"Llama: {e}") from None

    # ------------------------------------------------------------------ parameters

    @property
    def _n_kv(self) -> int:
        """``n_kv_head`` once resolved (``__post_init__`` replaces ``None``)."""
        return cast(int, self.n_kv_head)

    @property
    def _hd(self) -> int:
        """``head_dim`` once resolved."""
        return cast(int, self.head_dim)

    def init(self, key: Tensor) -> Params:
        """Draw parameters: weights and embeddings N(0, 0.02), biases zero, norms ones.

        Example:
            >>> from fnllm import random
            >>> from fnllm.models import Llama
            >>> llama = Llama(vocab_size=10, n_layer=2, n_head=2, d_model=8, d_ff=16)
            >>> params = llama.init(random.key(0))
            >>> sorted(params), sorted(params["blocks"][0]["attn"])
            (['blocks', 'embed', 'head', 'norm'], ['k', 'o', 'q', 'v'])

        Args:
            key: a ``fnllm.random`` key; the parameters are float32 on its device.

        Returns:
            The parameter tree (see the module docstring for its layout).
        """
        std, d, hd = 0.02, self.d_model, self._hd
        k_tok, k_head, k_blocks = jr.split(key, 3)
        params: Params = {
            "embed": {"tokens": nn.init_embedding(k_tok, self.vocab_size, d, std=std)},
            "blocks": [],
            "norm": nn.init_rms_norm(key, d),
        }
        for k in jr.split(k_blocks, self.n_layer):
            k_q, k_k, k_v, k_o, k_mlp = jr.split(k, 5)
            bias = self.qkv_bias
            params["blocks"].append(
                {
                    "attn_norm": nn.init_rms_norm(key, d),
                    "attn": {
                        "q": nn.init_linear(k_q, d, self.n_head * hd, bias=bias, std=std),
                        "k": nn.init_linear(k_k, d, self._n_kv * hd, bias=bias, std=std),
                        "v": nn.init_linear(k_v, d, self._n_kv * hd, bias=bias, std=std),
                        "o": nn.init_linear(k_o, self.n_head * hd, d, bias=False, std=std),
                    },
                    "mlp_norm": nn.init_rms_norm(key, d),
                    "mlp": nn.init_swiglu(k_mlp, d, self.d_ff, std=std),
                }
            )
        if not self.tie_head:
            params["head"] = nn.init_linear(k_head, d, self.vocab_size, bias=False, std=std)
        return params

    # ------------------------------------------------------------------ forward

    def apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        output_hidden_states: bool = False,
        impl: nn.Impl = "auto",
        checkpoint: remat.Policy = None,
        cache: KVCache | None = None,
    ) -> Tensor | LlamaOutput | tuple[Tensor, KVCache]:
        """Run the model: token ids to next-token logits (with a KV cache: and the new cache).

        In eager mode the inputs and the parameter tree are checked first (ids in range,
        length, mask shape, every leaf's path and shape); under ``torch.compile`` and inside
        ``vmap`` the data-dependent checks are skipped.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import Llama
            >>> llama = Llama(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
            ...               d_ff=32, max_len=32)
            >>> params = llama.init(random.key(0))
            >>> tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
            >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
            >>> llama.apply(params, tokens, attention_mask=mask).shape
            torch.Size([2, 4, 100])

        Args:
            params: the parameter tree from :meth:`init` (or ``io.from_hf``).
            tokens: int64/int32 ids ``[B, T]``, or ``[T]`` for one unbatched sequence
                (handy under ``vmap``), with ``T <= max_len``.
            attention_mask: ``[B, T]`` (like ``tokens``), 1/``True`` for real tokens and
                0/``False`` for padding. Positions are ``0..T-1`` whatever the padding,
                as in `transformers` without ``position_ids``: pad on the right.
            key: a ``fnllm.random`` key to enable dropout (training); ``None`` = eval.
            output_hidden_states: also return every layer's hidden states.
            impl: attention implementation, ``"auto"``, ``"sdpa"`` or ``"math"``.
            checkpoint: which blocks recompute their activations in the backward pass
                instead of keeping them (``True`` every block, ``k`` every ``k``-th, a set
                of indices; see :mod:`fnllm.remat`): same values and gradients, less memory.
            cache: a KV cache from :meth:`init_cache` to continue (``tokens`` ``[B, T]``,
                left padding only, no ``key``, no ``output_hidden_states``): the checked
                form of :meth:`apply_cached`, as for ``GPT``.

        Returns:
            Float logits ``[B, T, V]`` (``[T, V]`` for unbatched input), or a
            :class:`LlamaOutput` when ``output_hidden_states`` is set; with ``cache``, the
            pair ``(logits [B, T, V], new cache)``.
        """
        if cache is not None:
            if key is not None or output_hidden_states:
                raise ValueError("apply: cache= runs without dropout and hidden states")
            return _cache.apply_checked(self, params, tokens, attention_mask, cache)
        tokens, attention_mask = _base.check_inputs(self, params, tokens, attention_mask)
        unbatched = tokens.ndim == 1
        if unbatched:
            tokens, attention_mask = _base.batched(tokens, attention_mask)
        drop, keys = _base.dropout_keys(self, key)

        x = _embed(params["embed"]["tokens"], tokens)
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        mask = nn.make_attention_mask(attention_mask, causal=True)  # None: nothing padded
        fwd = _base.Forward(mask, drop, impl, positions, self._extras(positions, x.dtype))
        hidden = [x]
        x = _base.run_blocks(self, params["blocks"], x, keys, fwd, checkpoint, hidden=hidden)
        x = self.finish(params, x)
        logits = self.logits(params, x)

        if unbatched:
            logits, x = logits[0], x[0]
            hidden = [h[0] for h in hidden]
        if not output_hidden_states:
            return logits
        return LlamaOutput(logits, (*hidden[:-1], x))

    def embed(self, params: Params, tokens: Tensor, *, key: Tensor | None = None) -> Tensor:
        """The embedding output, ``hidden_states[0]`` of :meth:`apply`, for ``[B, T]`` ids.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import Llama
            >>> llama = Llama(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
            >>> params = llama.init(random.key(0))
            >>> llama.embed(params, torch.tensor([[1, 2, 3]])).shape
            torch.Size([1, 3, 8])

        Args:
            params: the parameter tree.
            tokens: int ids ``[B, T]``.
            key: unused (Llama has no embedding dropout); accepted like GPT's.

        Returns:
            ``[B, T, D]`` hidden states.
        """
        table = params["embed"]["tokens"]
        return _embed(table, nn.check_ids(tokens, table["weight"].shape[0], name="ids"))

    def _embed_at(self, params: Params, tokens: Tensor, positions: Tensor) -> Tensor:
        """The token embeddings (positions enter through the rotary tables, :meth:`_extras`)."""
        return _embed(params["embed"]["tokens"], tokens)

    def _block(
        self,
        p: Params,
        x: Tensor,
        key: Tensor | None,
        fwd: _base.Forward,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Any:
        """One pre-norm block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``.

        Queries and keys are rotated by ``fwd.extra`` (the rotary tables of the forward's
        positions; made here for positions ``0..T-1`` when absent, as in ``apply_blocks``).
        With a cache slot ``kv`` the new keys and values are written into it first and the
        queries attend over the cache; the block then returns ``(x, kv)``.
        """
        h = nn.rms_norm(p["attn_norm"], x, eps=self.norm_eps)
        attn = p["attn"]
        if "qkv" in attn:  # q, k and v as one matrix (decode_params)
            n_q, n_kv = self.n_head * self._hd, self._n_kv * self._hd
            q, k, v = nn.linear(attn["qkv"], h).split((n_q, n_kv, n_kv), dim=-1)
        else:
            q, k, v = (nn.linear(attn[name], h) for name in "qkv")
        q, k, v = _heads(q, self.n_head), _heads(k, self._n_kv), _heads(v, self._n_kv)
        if fwd.extra is None:
            positions = torch.arange(x.shape[-2], device=x.device)
            cos, sin = self._extras(positions, x.dtype)
        else:
            cos, sin = fwd.extra
        q, k = nn.apply_rotary(q, cos, sin), nn.apply_rotary(k, cos, sin)
        if kv is None:  # a prepared mask has the causal triangle folded in
            y = nn.dot_product_attention(q, k, v, causal=fwd.mask is None, mask=fwd.mask,
                                         key=key, dropout=fwd.drop, impl=fwd.impl)  # fmt: skip
        else:
            step = cast(_cache.CacheStep, fwd.step)  # a cached forward always sets it
            kv = _cache.write(step, kv[0], kv[1], k, v)
            y = nn.dot_product_attention(q, kv[0], kv[1], mask=step.attend, impl=fwd.impl)
        x = x + nn.linear(attn["o"], nn.merge_heads(y))
        x = x + nn.swiglu(p["mlp"], nn.rms_norm(p["mlp_norm"], x, eps=self.norm_eps))
        return x if kv is None else (x, kv)

    def _extras(
        self, positions: Tensor, dtype: torch.dtype, params: Params | None = None
    ) -> tuple[Tensor, Tensor]:
        """The rotary ``(cos, sin)`` tables ``[..., T, head_dim]`` of the token positions:
        rows of a decode tree's ``rope`` tables (:meth:`decode_params`), else computed."""
        rope = params.get("rope") if params is not None else None
        if rope is not None:  # a lookup: compiled, cos and sin are not recomputed per use
            return rope["cos"][positions].to(dtype), rope["sin"][positions].to(dtype)
        inv_freq = self._inv_freq(positions.device)
        return nn.rotary_tables(positions, inv_freq, dtype=dtype)

    def _inv_freq(self, device: torch.device | str | None) -> Tensor:
        return nn.rotary_frequencies(
            self._hd,
            theta=self.rope_theta,
            rope_type=self.rope_type,  # type: ignore[arg-type]
            factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_len=self.rope_original_max_len,
            device=device,
        )

    # ------------------------------------------------------------------ the model protocol

    def head_paths(self) -> tuple[str, ...]:
        """The final norm and, when untied, the ``head`` matrix.

        Example:
            >>> from fnllm.models import Llama
            >>> Llama().head_paths(), Llama(tie_head=True).head_paths()
            (('norm', 'head'), ('norm',))
        """
        return ("norm",) if self.tie_head else ("norm", "head")

    def finish(self, params: Params, x: Tensor) -> Tensor:
        """The final RMS norm on the last block's output."""
        return nn.rms_norm(params["norm"], x, eps=self.norm_eps)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """Next-token logits ``[..., V]`` from final hidden states (the tied or own head)."""
        return _base.lm_logits(params, x, self.tie_head)

    def kv_shape(self) -> tuple[int, int]:
        """``(n_kv_head, head_dim)`` of one layer's cached keys and values."""
        return self._n_kv, self._hd

    def decode_params(self, params: Params) -> Params:
        """A tree for decoding: each block's ``q``, ``k``, ``v`` as one ``qkv`` layer,
        ``gate``, ``up`` as one ``gate_up``, and the rotary tables of every position
        (``rope``: ``cos``, ``sin`` ``[max_len, head_dim]``, float32). A new tree; ``params``
        is left as it is. Only :meth:`apply_cached` reads it (``apply`` checks params against
        :meth:`init`'s layout).

        Why: compiled, a decode step computed the rotary angles' cos and sin inside the
        attention's loop over the cache slots (inductor inlines them into the reduction),
        once per slot and layer; rows of a table are a plain load.

        A decode step multiplies one row per sequence by every matrix: two matmuls in place
        of five read the same weights with less overhead. The results equal the unfused
        ones (each output is the same dot product). Layers with an adapter or a quantized
        weight, and blocks whose three layers disagree on bias, stay as they are. The fused
        weight keeps its parts' memory layout (column-major parts give a column-major one).

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import Llama
            >>> llama = Llama(vocab_size=32, n_layer=1, n_head=4, n_kv_head=2, d_model=16,
            ...               d_ff=32, max_len=16)
            >>> params = llama.init(random.key(0))
            >>> fused = llama.decode_params(params)
            >>> sorted(fused["blocks"][0]["attn"]), sorted(fused["blocks"][0]["mlp"])
            (['o', 'qkv'], ['down', 'gate_up'])
            >>> tokens, ones = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
            >>> x, _ = llama.apply_cached(fused, tokens, ones, llama.init_cache(1, 8))
            >>> y, _ = llama.apply_cached(params, tokens, ones, llama.init_cache(1, 8))
            >>> torch.allclose(x, y, atol=1e-6)
            True
        """
        blocks = [
            {**p, "attn": _fused(p["attn"], ("q", "k", "v"), "qkv"),
             "mlp": _fused(p["mlp"], ("gate", "up"), "gate_up")}
            for p in params["blocks"]
        ]  # fmt: skip
        weight = params["norm"]["weight"]
        cos, sin = self._extras(torch.arange(self.max_len, device=weight.device), torch.float32)
        return {**params, "blocks": blocks, "rope": {"cos": cos, "sin": sin}}


def _fused(layers: Params, names: tuple[str, ...], into: str) -> Params:
    """``layers`` with the plain linear layers ``names`` stacked (along ``out``) into one,
    ``into``; unchanged when one is not a plain float weight (and bias) or biases differ."""
    parts: list[Any] = [layers.get(n) for n in names]
    plain = all(
        isinstance(p, dict) and set(p) <= {"weight", "bias"}
        and isinstance(p.get("weight"), Tensor) and not _quant.is_quantized(p["weight"])
        and p["weight"].ndim == 2 for p in parts
    )  # fmt: skip
    if not plain or len({"bias" in p for p in parts}) != 1:
        return layers
    fused = {"weight": _stack_rows([p["weight"] for p in parts])}
    if "bias" in parts[0]:
        fused["bias"] = torch.cat([p["bias"] for p in parts])
    return {**{k: v for k, v in layers.items() if k not in names}, into: fused}


def _stack_rows(ws: list[Tensor]) -> Tensor:
    """Matrices ``[out_i, in]`` stacked to ``[sum out_i, in]``, column-major if they all are."""
    if all(w.stride(0) == 1 and w.shape[0] > 1 for w in ws):
        return torch.cat([w.t() for w in ws], dim=1).t()
    return torch.cat(ws)


def _heads(y: Tensor, n: int) -> Tensor:
    """``[..., T, n * hd] -> [..., n, T, hd]``."""
    return y.unflatten(-1, (n, -1)).transpose(-2, -3)


_INTS = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len", "rope_original_max_len")
_OPTIONAL_INTS = ("n_kv_head", "head_dim")
_FLOATS = ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
           "norm_eps", "dropout")  # fmt: skip


def _check_fields(model: Llama) -> None:
    """Types and ranges of every field, each error naming the field."""
    for name in _INTS + _OPTIONAL_INTS:
        value = getattr(model, name)
        if value is None and name in _OPTIONAL_INTS:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Llama: {name} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"Llama: {name} must be positive, got {value}")
    for name in _FLOATS:
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Llama: {name} must be a number, got {value!r}")
        object.__setattr__(model, name, float(value))  # 10000 and 10000.0: one config
    for f in fields(model):
        if f.type in ("bool", bool) and not isinstance(getattr(model, f.name), bool):
            raise TypeError(f"Llama: {f.name} must be a bool, got {getattr(model, f.name)!r}")
    if not isinstance(model.rope_type, str):
        raise TypeError(f"Llama: rope_type must be a string, got {model.rope_type!r}")
    if not 0.0 <= model.dropout < 1.0:
        raise ValueError(f"Llama: dropout must be in [0, 1), got {model.dropout}")
    if not model.norm_eps > 0:
        raise ValueError(f"Llama: norm_eps must be positive, got {model.norm_eps}")
    if not model.rope_theta > 0:
        raise ValueError(f"Llama: rope_theta must be positive, got {model.rope_theta}")
