"""BERT as a pure function: a frozen config, ``init(key) -> params``, ``apply(params, tokens)``.

The architecture is Hugging Face's ``BertModel``: word + position + token-type embeddings
followed by a layer norm, then ``n_layer`` post-LN blocks (``ln_1(x + attn(x))``, then
``ln_2(x + mlp(x))`` with exact GELU), a pooler (``tanh(dense(h[:, 0]))``), an MLM head whose
decoder is tied to the word embeddings, and a 2-way sentence-pair head on the pooled ``[CLS]``
(``pair_head``: sentence-order or next-sentence prediction). Parameter paths:

    embed.tokens.weight [V, D]   embed.positions.weight [max_len, D]
    embed.token_types.weight [type_vocab_size, D]   embed.ln.{weight,bias} [D]
    blocks.i.attn.qkv.{weight,bias} [3D, D], [3D]   (rows: query; key; value)
    blocks.i.attn.proj.{weight,bias} [D, D], [D]    blocks.i.ln_1.{weight,bias} [D]
    blocks.i.mlp.fc.{weight,bias} [F, D], [F]       blocks.i.mlp.proj.{weight,bias} [D, F], [D]
    blocks.i.ln_2.{weight,bias} [D]
    pooler.{weight,bias} [D, D], [D]                          (pooler=True)
    mlm.transform.{weight,bias} [D, D], [D]  mlm.ln.{weight,bias} [D]  mlm.bias [V]
                                                              (mlm_head=True)
    sop.{weight,bias} [2, D], [2]                             (pair_head=True)

The pair head's leaves keep the path ``sop`` (its first use, ALBERT's sentence-order
prediction) although the head also serves next-sentence prediction: every checkpoint,
optimizer state and path filter written so far names them so, and Hugging Face's
``cls.seq_relationship`` maps to them either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import nn, remat
from fnllm import random as jr
from fnllm._deprecation import deprecated
from fnllm.models import _base, _config
from fnllm.models._base import Params
from fnllm.nn._layers import _embed

__all__ = ["BERT", "BertOutput", "BertPretrainOutput"]


class BertOutput(NamedTuple):
    """What :meth:`BERT.apply` returns.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.models import BERT
        >>> bert = BERT(vocab_size=16, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=8)
        >>> out = bert.apply(bert.init(random.key(0)), torch.zeros(1, 4, dtype=torch.long))
        >>> out.last_hidden_state.shape, out.pooled.shape, out.hidden_states
        (torch.Size([1, 4, 8]), torch.Size([1, 8]), None)

    Attributes:
        last_hidden_state: ``[B, T, D]`` output of the last block.
        pooled: ``[B, D]`` ``tanh(dense(last_hidden_state[:, 0]))``, or ``None`` without
            a pooler.
        hidden_states: ``n_layer + 1`` tensors ``[B, T, D]`` (embeddings, then each
            block's output) when requested, else ``None``.
    """

    last_hidden_state: Tensor
    pooled: Tensor | None
    hidden_states: tuple[Tensor, ...] | None


class BertPretrainOutput(NamedTuple):
    """What :meth:`BERT.pretrain_apply` returns.

    Example:
        >>> import torch
        >>> from fnllm.models import BertPretrainOutput
        >>> mlm, pair = BertPretrainOutput(torch.zeros(1, 4, 16), torch.zeros(1, 2))  # a tuple
        >>> mlm.shape, pair.shape
        (torch.Size([1, 4, 16]), torch.Size([1, 2]))

    Attributes:
        mlm_logits: ``[B, T, V]`` masked-LM logits.
        pair_logits: ``[B, 2]`` sentence-order (or next-sentence) logits; ``sop_logits`` is
            its old name, still readable (deprecated, removed in 0.2).
    """

    mlm_logits: Tensor
    pair_logits: Tensor

    @property
    def sop_logits(self) -> Tensor:
        """Deprecated (removed in 0.2): the old name of :attr:`pair_logits`."""
        deprecated("BertPretrainOutput.sop_logits", "pair_logits")
        return self.pair_logits


@_config.renamed_fields(sop_head="pair_head")
@dataclass(frozen=True)
class BERT(_base.ModelConfig):
    """BERT configuration; ``init`` makes parameters and ``apply`` runs the encoder.

    The config is hashable and holds no tensors. The defaults are BERT-base.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.models import BERT
        >>> bert = BERT(vocab_size=100, n_layer=2, n_head=2, d_model=16, d_ff=32, max_len=32)
        >>> params = bert.init(random.key(0))
        >>> out = bert.apply(params, torch.tensor([[2, 5, 6, 3]]))
        >>> out.last_hidden_state.shape, out.pooled.shape
        (torch.Size([1, 4, 16]), torch.Size([1, 16]))

    Args:
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``d_model``.
        d_model: hidden width.
        d_ff: MLP hidden width (Hugging Face's ``intermediate_size``).
        max_len: number of learned positions.
        type_vocab_size: number of token types (segments).
        ln_eps: layer-norm epsilon.
        dropout: dropout rate on embeddings, attention probabilities and residual branches
            (active only when ``apply`` gets a key).
        pooler: include the pooler (``pooler`` leaves, ``BertOutput.pooled``).
        mlm_head: include the masked-LM head (``mlm`` leaves).
        pair_head: include the 2-way sentence-pair head (``sop`` leaves; see the module
            docstring) for sentence-order or next-sentence prediction; it reads the pooled
            output, so it needs ``pooler=True``. Its old name ``sop_head`` is still accepted
            (deprecated): ``BERT(sop_head=...)``, ``model.sop_head`` and saved configs.
    """

    kind: ClassVar[str] = "bert"
    hf_model_types: ClassVar[tuple[str, ...]] = ("bert",)
    hf_codec_module: ClassVar[str | None] = "fnllm.models._hf_bert"
    default_pooling: ClassVar[_base.Pooling] = "mean"
    lora_targets: ClassVar[tuple[str, ...]] = ("*.attn.qkv", "*.attn.proj")

    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    dropout: float = 0.0
    pooler: bool = True
    mlm_head: bool = True
    pair_head: bool = True

    def __post_init__(self) -> None:
        _base.check_config(
            self,
            ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len", "type_vocab_size"),
        )
        if self.pair_head and not self.pooler:
            raise ValueError("BERT: pair_head=True needs pooler=True (it reads the pooled output)")

    # ------------------------------------------------------------------ parameters

    def init(self, key: Tensor) -> Params:
        """Draw BERT-initialised parameters: N(0, 0.02) weights, zero biases, LN ones/zeros.

        Example:
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=10, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=8)
            >>> sorted(bert.init(random.key(0)))
            ['blocks', 'embed', 'mlm', 'pooler', 'sop']

        Args:
            key: a ``fnllm.random`` key; the parameters are float32 on its device.

        Returns:
            The parameter tree (see the module docstring for its layout).
        """
        D = self.d_model
        k_tok, k_pos, k_type, k_blocks, k_pool, k_mlm, k_pair = jr.split(key, 7)
        params: Params = {
            "embed": {
                "tokens": nn.init_embedding(k_tok, self.vocab_size, D),
                "positions": nn.init_embedding(k_pos, self.max_len, D),
                "token_types": nn.init_embedding(k_type, self.type_vocab_size, D),
                "ln": nn.init_layer_norm(key, D),
            },
            "blocks": [],
        }
        for k in jr.split(k_blocks, self.n_layer):
            k_attn, k_mlp = jr.split(k)
            params["blocks"].append(
                {
                    "attn": nn.init_attention(k_attn, D),
                    "ln_1": nn.init_layer_norm(key, D),
                    "mlp": nn.init_mlp(k_mlp, D, self.d_ff),
                    "ln_2": nn.init_layer_norm(key, D),
                }
            )
        if self.pooler:
            params["pooler"] = nn.init_linear(k_pool, D, D)
        if self.mlm_head:
            params["mlm"] = {
                "transform": nn.init_linear(k_mlm, D, D),
                "ln": nn.init_layer_norm(key, D),
                "bias": torch.zeros(self.vocab_size, device=key.device),
            }
        if self.pair_head:
            params["sop"] = nn.init_linear(k_pair, D, 2)
        return params

    # ------------------------------------------------------------------ forward

    def apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        output_hidden_states: bool = False,
        impl: nn.Impl = "auto",
        checkpoint: remat.Policy = None,
    ) -> BertOutput:
        """Run the encoder: token ids to hidden states (and the pooled output).

        In eager mode the inputs and the parameter tree are checked first; under
        ``torch.compile`` and inside ``vmap`` the data-dependent checks are skipped.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=100, n_layer=2, n_head=2, d_model=16, d_ff=32, max_len=32)
            >>> params = bert.init(random.key(0))
            >>> tokens = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
            >>> out = bert.apply(params, tokens, attention_mask=(tokens != 0),
            ...                  output_hidden_states=True)
            >>> out.last_hidden_state.shape, len(out.hidden_states)
            (torch.Size([2, 4, 16]), 3)

        Args:
            params: the parameter tree from :meth:`init` (or a checkpoint).
            tokens: int64/int32 ids ``[B, T]``, or ``[T]`` for one unbatched sequence.
            token_type_ids: segment ids like ``tokens`` in ``[0, type_vocab_size)``;
                ``None`` means all zeros.
            attention_mask: like ``tokens``, 1/``True`` for real tokens, 0/``False`` for
                padding (padded keys are ignored by every query).
            key: a ``fnllm.random`` key to enable dropout (training); ``None`` = eval.
            output_hidden_states: also return every layer's hidden states.
            impl: attention implementation, ``"auto"``, ``"sdpa"`` or ``"math"``.
            checkpoint: which blocks recompute their activations in the backward pass
                instead of keeping them (``True`` every block, ``k`` every ``k``-th, a set
                of indices; see :mod:`fnllm.remat`): same values and gradients, less memory.

        Returns:
            A :class:`BertOutput` (leading batch dimension dropped for unbatched input).
            ``torch.func.vmap`` refuses ``None`` outputs, so a function mapped with it
            should return the fields it needs rather than the whole tuple.
        """
        tokens, attention_mask = _base.check_inputs(self, params, tokens, attention_mask)
        if token_type_ids is not None:
            token_type_ids = nn.check_ids(
                token_type_ids, self.type_vocab_size, name="token_type_ids"
            )
            if token_type_ids.shape != tokens.shape:
                raise ValueError(
                    f"token_type_ids: shape {tuple(token_type_ids.shape)} != tokens shape "
                    f"{tuple(tokens.shape)}"
                )
        unbatched = tokens.ndim == 1
        if unbatched:
            tokens, attention_mask, token_type_ids = _base.batched(
                tokens, attention_mask, token_type_ids
            )
        drop, keys = _base.dropout_keys(self, key)

        # The mask is made once per forward for every block; None when nothing is padded (eager).
        fwd = _base.Forward(nn.make_attention_mask(attention_mask), drop, impl)
        x = self._embeddings(params["embed"], tokens, token_type_ids, keys[-1], drop)
        hidden = [x]
        x = _base.run_blocks(self, params["blocks"], x, keys, fwd, checkpoint, hidden=hidden)

        pooled = None
        if self.pooler:
            pooled = self.pool_first(params, x[:, 0])
        if unbatched:
            x = x[0]
            hidden = [h[0] for h in hidden]
            pooled = None if pooled is None else pooled[0]
        return BertOutput(x, pooled, tuple(hidden) if output_hidden_states else None)

    def embed(
        self,
        params: Params,
        tokens: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        key: Tensor | None = None,
    ) -> Tensor:
        """The embedding output, ``hidden_states[0]`` of :meth:`apply`, for ``[B, T]`` ids.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> model = BERT(vocab_size=16, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=8)
            >>> params = model.init(random.key(0))
            >>> tokens = torch.tensor([[1, 2, 3]])
            >>> x = model.embed(params, tokens)
            >>> out = model.apply(params, tokens, output_hidden_states=True)
            >>> torch.equal(x, out.hidden_states[0])
            True

        Args:
            params: the parameter tree.
            tokens: int ids ``[B, T]`` (not checked here; :meth:`apply` checks them).
            token_type_ids: segment ids like ``tokens``, or ``None`` (all zeros).
            key: a ``fnllm.random`` key to enable dropout; ``None`` = eval.

        Returns:
            ``[B, T, D]`` hidden states.
        """
        embed = params["embed"]
        tokens = nn.check_ids(tokens, embed["tokens"]["weight"].shape[0], name="ids")
        if token_type_ids is not None:
            types = embed["token_types"]["weight"].shape[0]
            token_type_ids = nn.check_ids(token_type_ids, types, name="ids")
        drop = self.dropout if key is not None else 0.0
        return self._embeddings(embed, tokens, token_type_ids, key, drop)

    def _embeddings(
        self,
        embed: Params,
        tokens: Tensor,
        token_type_ids: Tensor | None,
        key: Tensor | None,
        drop: float,
    ) -> Tensor:
        """Word + position + token-type embeddings, layer norm, dropout (ids checked)."""
        x = _embed(embed["tokens"], tokens) + embed["positions"]["weight"][: tokens.shape[-1]]
        if token_type_ids is None:
            x = x + embed["token_types"]["weight"][0]
        else:
            x = x + _embed(embed["token_types"], token_type_ids)
        return nn.dropout(key, nn.layer_norm(embed["ln"], x, eps=self.ln_eps), drop)

    def _block(
        self,
        p: Params,
        x: Tensor,
        key: Tensor | None,
        fwd: _base.Forward,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One post-LN block: ``ln_1(x + attn(x))``, then ``ln_2(x + mlp(x))`` (no cache:
        BERT is an encoder, ``kv`` must be ``None``)."""
        assert kv is None, "BERT is an encoder: it has no KV cache"
        drop = fwd.drop
        k_attn, k_res1, k_res2 = _base.block_keys(key)
        h = nn.attention(
            p["attn"],
            x,
            n_head=self.n_head,
            mask=fwd.mask,
            key=k_attn,
            dropout=drop,
            impl=fwd.impl,
        )
        x = nn.layer_norm(p["ln_1"], x + nn.dropout(k_res1, h, drop), eps=self.ln_eps)
        h = nn.dropout(k_res2, nn.mlp(p["mlp"], x), drop)
        return nn.layer_norm(p["ln_2"], x + h, eps=self.ln_eps)

    # ------------------------------------------------------------------ the model protocol

    def head_paths(self) -> tuple[str, ...]:
        """The heads present: ``pooler``, ``mlm`` and ``sop``.

        Example:
            >>> from fnllm.models import BERT
            >>> BERT(n_layer=1).head_paths(), BERT(n_layer=1, pair_head=False).head_paths()
            (('pooler', 'mlm', 'sop'), ('pooler', 'mlm'))
        """
        names = (("pooler", self.pooler), ("mlm", self.mlm_head), ("sop", self.pair_head))
        return tuple(n for n, present in names if present)

    def pool_first(self, params: Params, first: Tensor) -> Tensor:
        """The pooler, ``tanh(dense(first))``, when the model has one; else ``first``."""
        if not self.pooler:
            return first
        return torch.tanh(nn.linear(params["pooler"], first))

    def pool_first_paths(self) -> tuple[str, ...]:
        """``("pooler",)`` when the model has one."""
        return ("pooler",) if self.pooler else ()

    # ------------------------------------------------------------------ heads

    def mlm_logits(self, params: Params, hidden: Tensor) -> Tensor:
        """Masked-LM logits: dense, GELU, layer norm, then the tied word-embedding decoder.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=100, n_layer=1, n_head=2, d_model=16, d_ff=32, max_len=8)
            >>> params = bert.init(random.key(0))
            >>> h = bert.apply(params, torch.tensor([[2, 5, 3]])).last_hidden_state
            >>> bert.mlm_logits(params, h).shape
            torch.Size([1, 3, 100])

        Args:
            params: the parameter tree (needs ``mlm`` and ``embed.tokens``).
            hidden: ``[..., D]`` hidden states, usually ``last_hidden_state``.

        Returns:
            ``[..., V]`` logits.
        """
        if "mlm" not in params:
            raise KeyError("params: missing mlm (the model has no MLM head; mlm_head=False?)")
        p = params["mlm"]
        h = nn.gelu(nn.linear(p["transform"], hidden))
        h = nn.layer_norm(p["ln"], h, eps=self.ln_eps)
        return F.linear(h, params["embed"]["tokens"]["weight"], p["bias"])

    def pair_logits(self, params: Params, pooled: Tensor) -> Tensor:
        """Sentence-order / next-sentence logits from the pooled output (HF ``seq_relationship``).

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=50, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=4)
            >>> bert.pair_logits(bert.init(random.key(1)), torch.zeros(3, 8)).shape  # 3 pooled
            torch.Size([3, 2])

        Args:
            params: the parameter tree (needs ``sop``).
            pooled: ``[..., D]`` pooled output.

        Returns:
            ``[..., 2]`` logits.
        """
        if "sop" not in params:
            raise KeyError("params: missing sop (the model has no pair head; pair_head=False?)")
        return nn.linear(params["sop"], pooled)

    def sop_logits(self, params: Params, pooled: Tensor) -> Tensor:
        """Deprecated (removed in 0.2): the old name of :meth:`pair_logits`.

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=32, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
            >>> params = bert.init(random.key(0))
            >>> bert.sop_logits(params, torch.zeros(8)).shape  # bert.pair_logits instead
            torch.Size([2])

        Args:
            params: the parameter tree.
            pooled: ``[..., D]`` pooled output.

        Returns:
            ``[..., 2]`` logits, as :meth:`pair_logits`.
        """
        deprecated("BERT.sop_logits", "BERT.pair_logits")
        return self.pair_logits(params, pooled)

    def pretrain_apply(
        self,
        params: Params,
        tokens: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key: Tensor | None = None,
        impl: nn.Impl = "auto",
    ) -> BertPretrainOutput:
        """Encoder plus both pretraining heads (like ``BertForPreTraining``).

        Example:
            >>> import torch
            >>> from fnllm import random
            >>> from fnllm.models import BERT
            >>> bert = BERT(vocab_size=100, n_layer=1, n_head=2, d_model=16, d_ff=32, max_len=8)
            >>> params = bert.init(random.key(0))
            >>> mlm, pair = bert.pretrain_apply(params, torch.tensor([[2, 5, 3]]))
            >>> mlm.shape, pair.shape
            (torch.Size([1, 3, 100]), torch.Size([1, 2]))

        Args:
            params: the parameter tree (needs the ``mlm`` and ``sop`` (pair head) leaves).
            tokens: ids ``[B, T]`` (or ``[T]``).
            token_type_ids: segment ids like ``tokens``, or ``None``.
            attention_mask: 1/0 keep-mask like ``tokens``, or ``None``.
            key: a ``fnllm.random`` key to enable dropout; ``None`` = eval.
            impl: attention implementation.

        Returns:
            A :class:`BertPretrainOutput` ``(mlm_logits [B, T, V], pair_logits [B, 2])``.
        """
        if not (self.mlm_head and self.pair_head):
            raise ValueError("BERT.pretrain_apply needs mlm_head=True and pair_head=True")
        out = self.apply(
            params,
            tokens,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            key=key,
            impl=impl,
        )
        assert out.pooled is not None  # pair_head implies pooler
        return BertPretrainOutput(
            self.mlm_logits(params, out.last_hidden_state), self.pair_logits(params, out.pooled)
        )
