"""GPT-2 as a pure function: a frozen config, ``init(key) -> params``, ``apply(params, tokens)``.

The architecture is GPT-2's: learned token and position embeddings, ``n_layer`` pre-LN
blocks (``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with GELU-tanh), a final layer norm
and a language-model head tied to the token embedding (or a separate ``head`` matrix with
``tie_head=False``). Parameter paths read like ``blocks.3.attn.qkv.weight``:

    embed.tokens.weight        [V, D]        blocks.i.ln_1.{weight,bias}   [D]
    embed.positions.weight     [max_len, D]  blocks.i.attn.qkv.weight      [3D, D]  (rows q;k;v)
    ln_f.{weight,bias}         [D]           blocks.i.attn.qkv.bias        [3D]
    head.weight                [V, D]        blocks.i.attn.proj.{weight,bias}  [D, D], [D]
      (only when tie_head=False)             blocks.i.ln_2.{weight,bias}   [D]
                                             blocks.i.mlp.fc.{weight,bias} [F, D], [F]
                                             blocks.i.mlp.proj.{weight,bias}   [D, F], [D]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, cast, overload

from torch import Tensor

from fnllm import nn, remat
from fnllm import random as jr
from fnllm.models import _base, _cache
from fnllm.models._base import Params
from fnllm.models._cache import KVCache
from fnllm.nn._layers import _embed

__all__ = ["GPT", "GPTOutput"]


class GPTOutput(NamedTuple):
    """What :meth:`GPT.apply` returns with ``output_hidden_states=True``.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=16, n_layer=2, n_head=2, d_model=8, max_len=8)
        >>> out = gpt.apply(gpt.init(random.key(0)), torch.zeros(1, 4, dtype=torch.long),
        ...                 output_hidden_states=True)
        >>> out.logits.shape, len(out.hidden_states)
        (torch.Size([1, 4, 16]), 3)

    Attributes:
        logits: ``[B, T, V]`` next-token logits.
        hidden_states: ``n_layer + 1`` tensors ``[B, T, D]``: the embeddings, the output of
            every block but the last, and the last block's output after ``ln_f`` (the
            Hugging Face ``output_hidden_states`` convention).
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...]


@dataclass(frozen=True)
class GPT(_base.ModelConfig):
    """GPT-2 configuration; ``init`` makes parameters and ``apply`` runs the model.

    The config is hashable and holds no tensors, so ``torch.compile`` specialises on it.
    The defaults are GPT-2 small (124M parameters).

    Example:
        >>> from fnllm import random, tree
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=100, n_layer=2, n_head=2, d_model=16, max_len=32)
        >>> tree.count(gpt.init(random.key(0)))  # parameters; see apply for a forward pass
        8704

    Args:
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``d_model``.
        d_model: residual stream width.
        max_len: number of learned positions (longest sequence).
        d_ff: MLP hidden width; ``None`` means ``4 * d_model`` (resolved at construction).
        tie_head: use the token embedding as the output matrix (GPT-2); ``False`` adds
            a ``head`` leaf.
        ln_eps: layer-norm epsilon.
        dropout: dropout rate on embeddings, attention probabilities and residual branches
            (active only when ``apply`` gets a key).
    """

    kind: ClassVar[str] = "gpt"
    _causal: ClassVar[bool] = True
    hf_model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    hf_codec_module: ClassVar[str | None] = "fnllm.models._hf_gpt2"
    default_pooling: ClassVar[_base.Pooling] = "last"
    lora_targets: ClassVar[tuple[str, ...]] = ("*.attn.qkv", "*.attn.proj")
    final_norm: ClassVar[str | None] = "ln_f"

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    max_len: int = 1024
    d_ff: int | None = None
    tie_head: bool = True
    ln_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        _base.check_config(self, ("vocab_size", "n_layer", "n_head", "d_model", "max_len", "d_ff"))

    # ------------------------------------------------------------------ parameters

    def init(self, key: Tensor) -> Params:
        """Draw GPT-2-initialised parameters.

        Weights and embeddings are N(0, 0.02), biases zero, layer norms ones/zeros, and the
        residual projections (``attn.proj``, ``mlp.proj``) N(0, 0.02 / sqrt(2 * n_layer)).

        Example:
            >>> from fnllm import random
            >>> from fnllm.models import GPT
            >>> params = GPT(vocab_size=10, n_layer=2, n_head=2, d_model=8).init(random.key(0))
            >>> sorted(params), len(params["blocks"])
            (['blocks', 'embed', 'ln_f'], 2)

        Args:
            key: a ``fnllm.random`` key; the parameters are float32 on its device.

        Returns:
            The parameter tree (see the module docstring for its layout).
        """
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * self.n_layer)
        k_tok, k_pos, k_head, k_blocks = jr.split(key, 4)
        params: Params = {
            "embed": {
                "tokens": nn.init_embedding(k_tok, self.vocab_size, self.d_model, std=std),
                "positions": nn.init_embedding(k_pos, self.max_len, self.d_model, std=std),
            },
            "blocks": [],
            "ln_f": nn.init_layer_norm(key, self.d_model),
        }
        for k in jr.split(k_blocks, self.n_layer):
            k_attn, k_mlp = jr.split(k)
            params["blocks"].append(
                {
                    "ln_1": nn.init_layer_norm(key, self.d_model),
                    "attn": nn.init_attention(k_attn, self.d_model, std=std, proj_std=proj_std),
                    "ln_2": nn.init_layer_norm(key, self.d_model),
                    "mlp": nn.init_mlp(
                        k_mlp, self.d_model, cast(int, self.d_ff), std=std, proj_std=proj_std
                    ),
                }
            )
        if not self.tie_head:
            params["head"] = nn.init_linear(k_head, self.d_model, self.vocab_size, bias=False)
        return params

    # ------------------------------------------------------------------ forward

    # What type checkers see: logits by default, GPTOutput with output_hidden_states=True.
    @overload
    def apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        key: Tensor | None = ...,
        output_hidden_states: Literal[False] = ...,
        impl: nn.Impl = ...,
        checkpoint: remat.Policy = ...,
        cache: None = ...,
    ) -> Tensor: ...
    @overload
    def apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        key: Tensor | None = ...,
        output_hidden_states: bool,
        impl: nn.Impl = ...,
        checkpoint: remat.Policy = ...,
        cache: None = ...,
    ) -> Tensor | GPTOutput: ...
    @overload
    def apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        key: Tensor | None = ...,
        output_hidden_states: Literal[False] = ...,
        impl: nn.Impl = ...,
        checkpoint: remat.Policy = ...,
        cache: KVCache,
    ) -> tuple[Tensor, KVCache]: ...
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
    ) -> Tensor | GPTOutput | tuple[Tensor, KVCache]:
        """Run the model: token ids to next-token logits (with a KV cache: and the new cache).

        In eager mode the inputs and the parameter tree are checked first (ids in range,
        length, mask shape, every leaf's path and shape); under ``torch.compile`` and inside
        ``vmap`` the data-dependent checks are skipped.

        With ``cache=`` (a :class:`~fnllm.models._cache.KVCache` from :meth:`init_cache`)
        the tokens continue the sequences the cache holds: they are written at its next
        slots and attend to everything before, and the result is ``(logits [B, T, V], new
        cache)`` (the cache passed in is not modified). This is the same forward as
        ``generate`` runs (:meth:`apply_cached`, here with checks): prefill with the
        left-padded prompts, then feed one token per row. Positions count real tokens only,
        so a left-padded row gets the logits it would get alone.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import GPT
            >>> gpt = GPT(vocab_size=100, n_layer=2, n_head=2, d_model=16, max_len=32)
            >>> params = gpt.init(random.key(0))
            >>> tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
            >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
            >>> out = gpt.apply(params, tokens, attention_mask=mask, output_hidden_states=True)
            >>> out.logits.shape, len(out.hidden_states)
            (torch.Size([2, 4, 100]), 3)
            >>> cache = gpt.init_cache(batch_size=2, size=6)   # continue with a KV cache
            >>> logits, cache = gpt.apply(params, tokens[:, :1], cache=cache)
            >>> logits.shape, int(cache.length)
            (torch.Size([2, 1, 100]), 1)

        Args:
            params: the parameter tree from :meth:`init` (or a checkpoint).
            tokens: int64/int32 ids ``[B, T]``, or ``[T]`` for one unbatched sequence
                (handy under ``vmap``), with ``T <= max_len``.
            attention_mask: ``[B, T]`` (like ``tokens``), 1/``True`` for real tokens and
                0/``False`` for padding. Positions are ``0..T-1`` whatever the padding,
                as in Hugging Face's GPT-2 without ``position_ids``.
            key: a ``fnllm.random`` key to enable dropout (training); ``None`` = eval.
            output_hidden_states: also return every layer's hidden states.
            impl: attention implementation, ``"auto"``, ``"sdpa"`` or ``"math"``.
            checkpoint: which blocks recompute their activations in the backward pass
                instead of keeping them (``True`` every block, ``k`` every ``k``-th, a set
                of indices; see :mod:`fnllm.remat`): same values and gradients, less memory.
            cache: a KV cache to continue (``tokens`` ``[B, T]``, left padding only, no
                ``key`` and no ``output_hidden_states``).

        Returns:
            Float logits ``[B, T, V]`` (``[T, V]`` for unbatched input), or a
            :class:`GPTOutput` when ``output_hidden_states`` is set; with ``cache``, the
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

        # The mask is made once per forward for every block; None when nothing is padded (eager).
        fwd = _base.Forward(nn.make_attention_mask(attention_mask, causal=True), drop, impl)
        embed = params["embed"]
        x = self._embeddings(embed, tokens, keys[-1], drop)
        hidden = [x]
        x = _base.run_blocks(self, params["blocks"], x, keys, fwd, checkpoint, hidden=hidden)
        x = self.finish(params, x)
        logits = self.logits(params, x)

        if unbatched:
            logits = logits[0]
            hidden = [h[0] for h in hidden]
            x = x[0]
        if not output_hidden_states:
            return logits
        return GPTOutput(logits, (*hidden[:-1], x))

    def embed(self, params: Params, tokens: Tensor, *, key: Tensor | None = None) -> Tensor:
        """The embedding output, ``hidden_states[0]`` of :meth:`apply`, for ``[B, T]`` ids.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import GPT
            >>> tokens = torch.tensor([[1, 2, 3]])
            >>> model = GPT(vocab_size=16, n_layer=2, n_head=2, d_model=8, max_len=8)
            >>> params = model.init(random.key(0))
            >>> x = model.embed(params, tokens)
            >>> out = model.apply(params, tokens, output_hidden_states=True)
            >>> torch.equal(x, out.hidden_states[0])
            True

        Args:
            params: the parameter tree.
            tokens: int ids ``[B, T]`` (not checked here; :meth:`apply` checks them).
            key: a ``fnllm.random`` key to enable dropout; ``None`` = eval.

        Returns:
            ``[B, T, D]`` hidden states.
        """
        embed = params["embed"]
        tokens = nn.check_ids(tokens, embed["tokens"]["weight"].shape[0], name="ids")
        return self._embeddings(embed, tokens, key, self.dropout if key is not None else 0.0)

    def _embeddings(self, embed: Params, tokens: Tensor, key: Tensor | None, drop: float) -> Tensor:
        """Token + position embeddings, then dropout (ids checked)."""
        x = _embed(embed["tokens"], tokens) + embed["positions"]["weight"][: tokens.shape[-1]]
        return nn.dropout(key, x, drop)

    def _block(
        self,
        p: Params,
        x: Tensor,
        key: Tensor | None,
        fwd: _base.Forward,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Any:
        """One pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

        ``fwd.mask`` has the causal triangle folded in, or is ``None`` for plain causal
        attention. With a cache slot ``kv`` (a cached forward, ``fwd.step`` set) the new keys
        and values are written into it, attention runs over the cache's slots, and the
        result is ``(x, kv)``.
        """
        mask, drop = fwd.mask, fwd.drop
        k_attn, k_res1, k_res2 = _base.block_keys(key)
        h = nn.layer_norm(p["ln_1"], x, eps=self.ln_eps)
        if kv is None:
            h = nn.attention(
                p["attn"],
                h,
                n_head=self.n_head,
                causal=mask is None,  # a prepared mask has the causal triangle folded in
                mask=mask,
                key=k_attn,
                dropout=drop,
                impl=fwd.impl,
            )
        else:
            assert fwd.step is not None
            q, k, v = nn.attention_qkv(p["attn"], h, n_head=self.n_head)
            kv = _cache.write(fwd.step, kv[0], kv[1], k, v)
            y = nn.dot_product_attention(q, kv[0], kv[1], mask=fwd.step.attend, impl=fwd.impl)
            h = nn.linear(p["attn"]["proj"], nn.merge_heads(y))
        x = x + nn.dropout(k_res1, h, drop)
        h = nn.mlp(p["mlp"], nn.layer_norm(p["ln_2"], x, eps=self.ln_eps), approximate="tanh")
        x = x + nn.dropout(k_res2, h, drop)
        return x if kv is None else (x, kv)

    # ------------------------------------------------------------------ the model protocol

    def head_paths(self) -> tuple[str, ...]:
        """``ln_f`` and, untied, ``head`` (a tied head is the token embedding, not trained).

        Example:
            >>> from fnllm.models import GPT
            >>> GPT(n_layer=1).head_paths(), GPT(n_layer=1, tie_head=False).head_paths()
            (('ln_f',), ('ln_f', 'head'))
        """
        return ("ln_f",) if self.tie_head else ("ln_f", "head")

    def finish(self, params: Params, x: Tensor) -> Tensor:
        """The final layer norm ``ln_f``."""
        return nn.layer_norm(params["ln_f"], x, eps=self.ln_eps)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """The language-model head, tied to the token embedding unless ``tie_head=False``."""
        return _base.lm_logits(params, x, self.tie_head)

    def _embed_at(self, params: Params, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token plus learned position embeddings at ``positions`` (no dropout)."""
        embed = params["embed"]
        return nn.embedding(embed["tokens"], tokens) + nn.embedding(embed["positions"], positions)
