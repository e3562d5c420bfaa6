"""Decoding from a GPT: a preallocated KV cache, pure ``prefill``/``decode_step``, and sampling.

The cache is a pytree (:class:`KVCache`) of tensors with a fixed number of slots, so every
decode step sees the same shapes and ``torch.compile`` compiles it once. Prompts of different
lengths are left-padded: every row then writes its next token into the same slot, and a mask
over the slots keeps padding out of attention. Positions count real tokens only, so a padded
row decodes exactly as it would alone.

- :func:`init_cache`, :func:`prefill`, :func:`decode_step`: the cached forward pass, built from
  the layer functions in :mod:`fnllm.nn` on :class:`~fnllm.models.GPT`'s parameter tree.
- :func:`next_token`: temperature, top-k and top-p (nucleus) sampling with an explicit key;
  greedy (argmax) at temperature 0.
- :func:`sample` and :func:`stream`: generate ``max_new_tokens`` from a batch of prompts
  (a ``[B, T]`` tensor or ragged token lists), all at once or one step at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import nn
from fnllm import random as jr
from fnllm.models import GPT

__all__ = [
    "KVCache",
    "decode_step",
    "init_cache",
    "next_token",
    "pad_prompts",
    "prefill",
    "sample",
    "stream",
]

Params = dict[str, Any]


class KVCache(NamedTuple):
    """Keys and values of every layer for a fixed number of slots, plus which slots are real.

    A plain pytree (a named tuple of tensors), so it passes through ``torch.compile`` and
    ``torch.utils._pytree`` unchanged. Rows are left-padded: slot ``length`` is the next one
    written, for every row at once.

    Example:
        >>> from fnllm import generate
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> cache = generate.init_cache(gpt, batch_size=3, size=10)
        >>> len(cache.keys), cache.keys[0].shape, cache.mask.shape, int(cache.length)
        (2, torch.Size([3, 2, 10, 4]), torch.Size([3, 10]), 0)

    Attributes:
        keys: one ``[B, n_head, size, head_dim]`` tensor per layer.
        values: one tensor per layer, shaped like ``keys``.
        mask: bool ``[B, size]``, True where a slot holds a real (not padding) token.
        length: int64 scalar tensor, the number of slots written so far.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor
    length: Tensor


def init_cache(
    model: GPT,
    batch_size: int,
    size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """Allocate an empty cache of ``size`` slots for ``batch_size`` rows.

    Example:
        >>> from fnllm import generate
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=1, n_head=2, d_model=8, max_len=16)
        >>> generate.init_cache(gpt, 2, 16).values[0].shape
        torch.Size([2, 2, 16, 4])

    Args:
        model: the :class:`~fnllm.models.GPT` config.
        batch_size: number of rows.
        size: number of slots (prompt width plus new tokens); at most ``model.max_len``.
        dtype: dtype of keys and values (the params' dtype).
        device: where to allocate.

    Returns:
        A :class:`KVCache` of zeros with no slot written.
    """
    _check_gpt(model)
    for name, value in (("batch_size", batch_size), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if size > model.max_len:
        raise ValueError(f"size: {size} slots > max_len {model.max_len}")
    shape = (batch_size, model.n_head, size, model.d_model // model.n_head)
    zeros = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.n_layer))
    return KVCache(
        keys=zeros,
        values=tuple(torch.zeros_like(z) for z in zeros),
        mask=torch.zeros(batch_size, size, dtype=torch.bool, device=device),
        length=torch.zeros((), dtype=torch.int64, device=device),
    )


def prefill(
    model: GPT,
    params: Params,
    cache: KVCache,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, KVCache]:
    """Run a block of tokens through the model, writing their keys and values to the cache.

    Usually the (left-padded) prompts into an empty cache; a later call continues where the
    cache stops. Only the last position's logits are computed (the next token's).

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> tokens = torch.tensor([[3, 4, 5]])
        >>> logits, cache = generate.prefill(gpt, params, generate.init_cache(gpt, 1, 8), tokens)
        >>> torch.allclose(logits, gpt.apply(params, tokens)[:, -1], atol=1e-5), int(cache.length)
        (True, 3)

    Args:
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        cache: a :class:`KVCache` with at least ``T`` free slots.
        tokens: int ids ``[B, T]``; padding must be on the left (see :func:`pad_prompts`).
        attention_mask: ``[B, T]``, 1/True for real tokens (default: all real).

    Returns:
        ``(logits [B, V] for the last position, the updated cache)``.
    """
    _check_gpt(model)
    tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected shape [B, T] with T >= 1, got {tuple(tokens.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens, dtype=torch.bool)
    elif not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask
        raise ValueError(f"attention_mask: expected shape {tuple(tokens.shape)}, got {got}")
    attention_mask = attention_mask.bool()
    if nn.checks_enabled():
        model.check_params(params)
        _check_cache(model, cache, tokens.shape[0], tokens.shape[1])
        if not bool(attention_mask[:, -1].all()):
            row = int((~attention_mask[:, -1]).nonzero()[0])
            raise ValueError(f"attention_mask: row {row} ends in padding (pad on the left)")
    x, cache = _forward(model, params, cache, tokens, attention_mask)
    return _logits(model, params, x[:, -1]), cache


def decode_step(
    model: GPT, params: Params, cache: KVCache, tokens: Tensor
) -> tuple[Tensor, KVCache]:
    """Feed one token per row and get the next-token logits: a pure function, static shapes.

    Every call has the same shapes (the cache does not grow; its ``length`` is a tensor), so
    ``torch.compile(decode_step, fullgraph=True)`` compiles once for all steps. In eager mode
    the ids and the free space are checked first.

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> _, cache = generate.prefill(gpt, params, generate.init_cache(gpt, 1, 8),
        ...                             torch.tensor([[3, 4, 5]]))
        >>> logits, cache = generate.decode_step(gpt, params, cache, torch.tensor([6]))
        >>> full = gpt.apply(params, torch.tensor([[3, 4, 5, 6]]))[:, -1]
        >>> torch.allclose(logits, full, atol=1e-5), int(cache.length)
        (True, 4)

    Args:
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        cache: a :class:`KVCache` with a free slot.
        tokens: int ids ``[B]``, the latest token of every row.

    Returns:
        ``(logits [B, V], the updated cache)``.
    """
    if nn.checks_enabled():
        _check_gpt(model)
        tokens = nn.check_ids(tokens, model.vocab_size, name="tokens")
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected shape [B], got {tuple(tokens.shape)}")
        _check_cache(model, cache, tokens.shape[0], 1)
    return _decode(model, params, cache, tokens)


def next_token(
    key: Tensor | None,
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Pick the next token of every row from its logits: greedy, or sampled with a key.

    At ``temperature=0`` this is ``argmax`` (the key is unused). Otherwise the logits are
    divided by the temperature, cut to the ``top_k`` largest and to the nucleus (the fewest
    most-likely tokens whose probability reaches ``top_p``), and one token is drawn with
    :func:`fnllm.random.categorical`.

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
        >>> generate.next_token(None, logits, temperature=0.0)
        tensor([1])
        >>> keys = random.split(random.key(0), 50)
        >>> picks = {int(generate.next_token(k, logits, top_k=2)) for k in keys}
        >>> sorted(picks)
        [1, 3]

    Args:
        key: a ``fnllm.random`` key (``None`` only for greedy decoding).
        logits: float ``[..., V]``.
        temperature: >= 0; 0 is greedy, 1 samples from the model's distribution.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the nucleus of probability ``top_p`` in ``(0, 1]`` (``None``: all).

    Returns:
        int64 token ids ``logits.shape[:-1]``.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature > 0 and key is None:
        raise ValueError("key: sampling with temperature > 0 needs a fnllm.random key")
    return _choose(key, logits, temperature, top_k, top_p)


def pad_prompts(
    prompts: Tensor | Sequence[Sequence[int]],
    *,
    attention_mask: Tensor | None = None,
    pad_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into ``(tokens [B, T], attention_mask [B, T])``.

    A list of token-id lists is padded on the left to its longest member; a tensor with an
    ``attention_mask`` (padding on either side) is re-aligned to the right.

    Example:
        >>> from fnllm import generate
        >>> tokens, mask = generate.pad_prompts([[5, 6, 7], [8]], pad_id=0)
        >>> tokens
        tensor([[5, 6, 7],
                [0, 0, 8]])
        >>> mask.int()
        tensor([[1, 1, 1],
                [0, 0, 1]], dtype=torch.int32)

    Args:
        prompts: int ``[B, T]`` (or ``[T]``) tensor, or a list of non-empty id lists.
        attention_mask: for a tensor, ``[B, T]`` 1/True on real tokens (default: all real).
        pad_id: the id written into padding.

    Returns:
        ``(tokens int64 [B, T], bool mask [B, T])``.
    """
    if isinstance(prompts, Tensor):
        tokens = nn.check_ids(prompts, 2**62, name="prompts")
        if tokens.ndim == 1:
            tokens = tokens[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        if tokens.ndim != 2:
            raise ValueError(f"prompts: expected [B, T] or [T], got shape {tuple(tokens.shape)}")
        if attention_mask is None:
            rows = tokens.tolist()
        else:
            if not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(tokens.shape)}")
            keep = attention_mask.bool()
            rows = [r[m].tolist() for r, m in zip(tokens, keep)]
        device = tokens.device
    else:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts: expected a tensor or a list of id lists, got {prompts!r}")
        if attention_mask is not None:
            raise ValueError("attention_mask: only for a tensor of prompts")
        rows = []
        for i, row in enumerate(prompts):
            ids = row.tolist() if isinstance(row, Tensor) else row
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise TypeError(f"prompts[{i}]: expected a list of token ids, got {row!r}")
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise TypeError(f"prompts[{i}]: token ids must be ints")
            rows.append(list(ids))
        device = None
    if not rows:
        raise ValueError("prompts: no prompts")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompts[{i}]: empty prompt (give at least one token)")
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return tokens, mask.to(tokens.device)


def stream(
    key: Tensor | None,
    model: GPT,
    params: Params,
    prompts: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    *,
    attention_mask: Tensor | None = None,
    pad_id: int = 0,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Generate one token per row per iteration: the streaming form of :func:`sample`.

    Example:
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=1, n_head=2, d_model=8, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> steps = list(generate.stream(random.key(1), gpt, params, [[1, 2], [3]], 4))
        >>> len(steps), steps[0].shape
        (4, torch.Size([2]))

    Args:
        key: a ``fnllm.random`` key (``None`` allowed when ``temperature=0``).
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        prompts: see :func:`sample`.
        max_new_tokens: the most tokens to generate per row.
        temperature: see :func:`next_token`.
        top_k: see :func:`next_token`.
        top_p: see :func:`next_token`.
        stop_ids: a row is finished after emitting one of these ids.
        attention_mask: for a tensor of prompts, 1/True on real tokens.
        pad_id: the id padding the prompts and the rows that have finished.
        compile: run the decode step under ``torch.compile(fullgraph=True)``.

    Returns:
        An iterator of int64 ``[B]`` tensors, one per step; it ends after
        ``max_new_tokens`` steps or when every row has emitted a stop id.
    """
    _check_gpt(model)
    _check_sampling(temperature, top_k, top_p)
    if temperature > 0 and key is None:
        raise ValueError("key: sampling with temperature > 0 needs a fnllm.random key")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens: expected an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    V = model.vocab_size
    for name, ids in (("stop_ids", tuple(stop_ids)), ("pad_id", (pad_id,))):
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V:
                raise ValueError(f"{name}: id {i!r} is outside the vocabulary [0, {V})")
    tokens, mask = pad_prompts(prompts, attention_mask=attention_mask, pad_id=pad_id)
    bad = ((tokens < 0) | (tokens >= V)) & mask
    if bool(bad.any()):
        i, j = (int(n) for n in bad.nonzero()[0])
        k = int(mask[i, :j].sum())
        raise ValueError(
            f"prompts[{i}][{k}]: id {int(tokens[i, j])} is outside the vocabulary [0, {V})"
        )
    T = tokens.shape[1]
    size = T + max_new_tokens - 1
    if size > model.max_len:
        raise ValueError(
            f"prompts: {T} prompt tokens + {max_new_tokens} new tokens need a cache of "
            f"{size} positions > max_len {model.max_len}"
        )
    model.check_params(params)
    weight = params["embed"]["tokens"]["weight"]
    tokens, mask = tokens.to(weight.device), mask.to(weight.device)
    return _generate(
        key, model, params, tokens, mask, size, max_new_tokens,
        (temperature, top_k, top_p), tuple(stop_ids), pad_id, compile,
    )  # fmt: skip


def sample(
    key: Tensor | None,
    model: GPT,
    params: Params,
    prompts: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    *,
    attention_mask: Tensor | None = None,
    pad_id: int = 0,
    compile: bool = False,
) -> Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt, with a KV cache.

    Step ``i`` draws with ``random.split(key, max_new_tokens)[i]``, so the same key gives the
    same tokens. Rows are independent of their batch-mates: a left-padded row generates what
    it would alone (up to float rounding).

    Example:
        >>> import torch
        >>> from fnllm import generate, random
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> out = generate.sample(None, gpt, params, [[1, 2, 3], [4]], 5, temperature=0)
        >>> out.shape
        torch.Size([2, 5])
        >>> ids = torch.tensor([[1, 2, 3]])                # greedy by full recompute
        >>> for _ in range(5):
        ...     ids = torch.cat([ids, gpt.apply(params, ids)[:, -1:].argmax(-1)], dim=1)
        >>> torch.equal(out[0], ids[0, 3:])
        True

    Args:
        key: a ``fnllm.random`` key (``None`` allowed when ``temperature=0``).
        model: the :class:`~fnllm.models.GPT` config.
        params: its parameter tree.
        prompts: int ``[B, T]`` tensor (with ``attention_mask`` for padding) or a list of
            token-id lists of any lengths (left-padded here).
        max_new_tokens: the most tokens to generate per row; the prompt width plus this,
            minus one, must fit in ``model.max_len``.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_k: sample only among the ``top_k`` most likely tokens.
        top_p: sample only from the nucleus of probability ``top_p`` in ``(0, 1]``.
        stop_ids: a row is finished after emitting one of these ids; generation ends early
            once every row has.
        attention_mask: for a tensor of prompts, 1/True on real tokens.
        pad_id: the id filling prompt padding and the positions after a row's stop id.
        compile: run the decode step under ``torch.compile(fullgraph=True)`` (compiles once
            per model, batch size and cache size; pays off after a few dozen tokens).

    Returns:
        int64 ``[B, N]`` new tokens, ``N <= max_new_tokens`` (shorter when every row stopped).

    Raises:
        ValueError: an empty prompt, prompts too long for the cache, a negative
            temperature, ``top_p`` outside ``(0, 1]``, ``top_k < 1``, stop ids outside the
            vocabulary.
        TypeError: ``model`` is not a GPT, or the prompts are not token ids.
    """
    steps = list(
        stream(
            key,
            model,
            params,
            prompts,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop_ids,
            attention_mask=attention_mask,
            pad_id=pad_id,
            compile=compile,
        )
    )
    return torch.stack(steps, dim=1)


# ----------------------------------------------------------------------------- internals


def _generate(
    key: Tensor | None,
    model: GPT,
    params: Params,
    tokens: Tensor,
    mask: Tensor,
    size: int,
    n: int,
    how: tuple[float, int | None, float | None],
    stop_ids: tuple[int, ...],
    pad_id: int,
    compile: bool,
) -> Iterator[Tensor]:
    """The decode loop behind :func:`stream` (arguments already checked)."""
    B = tokens.shape[0]
    weight = params["embed"]["tokens"]["weight"]
    device = weight.device
    keys = jr.split(key.to(device), n) if how[0] > 0 else torch.zeros(n, 2, dtype=torch.int64)
    cache = init_cache(model, B, size, dtype=weight.dtype, device=device)
    with torch.no_grad():
        x, cache = _forward(model, params, cache, tokens, mask)
        tok = _choose(keys[0], _logits(model, params, x[:, -1]), *how)
    stop = torch.tensor(stop_ids, dtype=torch.int64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = _compiled_step() if compile else _step
    for i in range(n):
        tok = torch.where(done, pad_id, tok)
        yield tok
        if stop_ids:
            done = done | torch.isin(tok, stop)
            if bool(done.all()):
                return
        if i + 1 < n:
            with torch.no_grad():
                tok, cache = step(model, params, cache, tok, keys[i + 1], *how)


def _step(
    model: GPT,
    params: Params,
    cache: KVCache,
    tokens: Tensor,
    key: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> tuple[Tensor, KVCache]:
    """One decode step and the choice of the next token (what ``compile=True`` compiles)."""
    logits, cache = _decode(model, params, cache, tokens)
    return _choose(key, logits, temperature, top_k, top_p), cache


@functools.cache
def _compiled_step() -> Any:
    """``_step`` under ``torch.compile(fullgraph=True)``, created once per process."""
    return torch.compile(_step, fullgraph=True, dynamic=False)


def _decode(model: GPT, params: Params, cache: KVCache, tokens: Tensor) -> tuple[Tensor, KVCache]:
    """:func:`decode_step` without the checks."""
    x, cache = _forward(model, params, cache, tokens[:, None], torch.ones_like(tokens[:, None]))
    return _logits(model, params, x[:, 0]), cache


def _forward(
    model: GPT, params: Params, cache: KVCache, tokens: Tensor, mask: Tensor
) -> tuple[Tensor, KVCache]:
    """GPT's blocks over ``tokens [B, T]`` written at slots ``length .. length + T - 1``.

    Mirrors ``GPT.apply`` (pre-LN blocks, GELU-tanh MLP, final layer norm), with positions
    counted over real tokens and attention over the cache's real slots up to each query.
    Returns the final hidden states ``[B, T, D]`` (after ``ln_f``) and the new cache.
    """
    mask = mask.bool()
    T, S = tokens.shape[1], cache.mask.shape[1]
    slots = cache.length + torch.arange(T, device=tokens.device)  # [T]
    real = cache.mask.index_copy(1, slots, mask)  # [B, S]
    seen = cache.mask.sum(-1, keepdim=True)  # real tokens before this block, [B, 1]
    positions = (seen + mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    causal = torch.arange(S, device=tokens.device)[None, :] <= slots[:, None]  # [T, S]
    attend = real[:, None, None, :] & causal  # [B, 1, T, S]
    embed = params["embed"]
    x = nn.embedding(embed["tokens"], tokens) + nn.embedding(embed["positions"], positions)
    keys, values = [], []
    for p, k_cache, v_cache in zip(params["blocks"], cache.keys, cache.values):
        h = nn.layer_norm(p["ln_1"], x, eps=model.ln_eps)
        q, k, v = nn.attention_qkv(p["attn"], h, n_head=model.n_head)
        k_cache = k_cache.index_copy(2, slots, k.to(k_cache.dtype))
        v_cache = v_cache.index_copy(2, slots, v.to(v_cache.dtype))
        keys.append(k_cache)
        values.append(v_cache)
        y = nn.dot_product_attention(q, k_cache, v_cache, mask=attend)
        x = x + nn.linear(p["attn"]["proj"], nn.merge_heads(y))
        h = nn.mlp(p["mlp"], nn.layer_norm(p["ln_2"], x, eps=model.ln_eps), approximate="tanh")
        x = x + h
    x = nn.layer_norm(params["ln_f"], x, eps=model.ln_eps)
    return x, KVCache(tuple(keys), tuple(values), real, cache.length + T)


def _logits(model: GPT, params: Params, x: Tensor) -> Tensor:
    """The language-model head (tied to the token embedding unless ``tie_head=False``)."""
    head = params["embed"]["tokens"]["weight"] if model.tie_head else params["head"]["weight"]
    return F.linear(x, head)


def _choose(
    key: Tensor | None,
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> Tensor:
    """:func:`next_token` without the checks."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # keep a token while the probability of the tokens ranked above it is below top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    assert key is not None
    return jr.categorical(key, logits)


def _check_gpt(model: Any) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model: expected a fnllm.models.GPT, got {type(model).__name__}")


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")


def _check_cache(model: GPT, cache: Any, batch: int, needed: int) -> None:
    """The cache fits the model and the batch and has ``needed`` free slots (eager only)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
    if len(cache.keys) != model.n_layer or len(cache.values) != model.n_layer:
        raise ValueError(f"cache: {len(cache.keys)} layers, the model has {model.n_layer}")
    want = (batch, model.n_head, cache.mask.shape[-1], model.d_model // model.n_head)
    if tuple(cache.keys[0].shape) != want or cache.mask.shape[0] != batch:
        raise ValueError(
            f"cache: keys of shape {tuple(cache.keys[0].shape)} do not fit a batch of {batch} "
            f"for this model (expected {want})"
        )
    free = cache.mask.shape[-1] - int(cache.length)
    if needed > free:
        raise ValueError(f"cache: {needed} tokens do not fit in the {free} free slots")
