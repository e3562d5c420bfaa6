"""Sampling from a decoder with a KV cache: ``next_token``, ``sample``, ``stream``, ``pad_prompts``.

:func:`next_token` applies temperature, top-k and top-p (nucleus) filtering and draws with an
explicit key (greedy at temperature 0); :func:`sample` and :func:`stream` generate from a
batch of prompts (a ``[B, T]`` tensor or ragged token lists, left-padded by
:func:`pad_prompts`), all at once or one step at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnllm import _checks, nn, tree
from fnllm import random as jr
from fnllm.generate.cache import KVCache, _check_decoder, init_cache

__all__ = ["next_token", "pad_prompts", "sample", "stream"]

Params = dict[str, Any]


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
        temperature: >= 0; 0 is greedy, 1 samples from the model's distribution. A tiny
            positive temperature (even ``1e-45``) samples among the argmax tokens only.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the nucleus of probability ``top_p`` in ``(0, 1]`` (``None``: all).

    Returns:
        int64 token ids ``logits.shape[:-1]``.

    Raises:
        ValueError: ``logits`` hold NaN or +inf (the message names the first position), a
            bad temperature, ``top_k`` or ``top_p``, or no key for sampling.
        TypeError: ``logits`` is not a floating-point tensor.
    """
    _check_sampling(temperature, top_k, top_p)
    _check_key(key, temperature)
    _checks.check_logits("next_token: logits", logits)
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
    model: Any,
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
        model: a decoder config (:class:`~fnllm.models.GPT`, ...).
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
    out, steps = _start(
        key, model, params, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids,
        attention_mask, pad_id, compile,
    )  # fmt: skip
    return (out[:, i] for i in steps)


def sample(
    key: Tensor | None,
    model: Any,
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
        >>> from fnllm import generate, models, random
        >>> gpt = models.GPT(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_len=16)
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
        model: a decoder config (:class:`~fnllm.models.GPT`, ...).
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
            vocabulary; the model's logits after the prompts hold NaN or +inf (params with
            NaN would otherwise decode as token 0).
        TypeError: ``model`` is not a decoder, or the prompts are not token ids.
    """
    out, steps = _start(
        key, model, params, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids,
        attention_mask, pad_id, compile,
    )  # fmt: skip
    n = 0
    for i in steps:
        n = i + 1
    return out[:, :n]


# ----------------------------------------------------------------------------- internals


def _check_key(key: Any, temperature: Any) -> None:
    """A key is needed to sample (temperature > 0) and must be a ``fnllm.random`` key."""
    if key is None:
        if temperature > 0:
            raise ValueError("key: sampling with temperature > 0 needs a fnllm.random key")
        return
    integer = isinstance(key, Tensor) and not (
        key.dtype.is_floating_point or key.dtype.is_complex or key.dtype == torch.bool
    )
    if not integer or key.shape[-1:] != (2,):
        got = f"{key.dtype} {tuple(key.shape)}" if isinstance(key, Tensor) else repr(key)
        raise TypeError(f"key: expected a fnllm.random key (int [2]), got {got:.60}")


def _start(
    key: Tensor | None,
    model: Any,
    params: Params,
    prompts: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_ids: Sequence[int],
    attention_mask: Tensor | None,
    pad_id: int,
    compile: bool,
) -> tuple[Tensor, Iterator[int]]:
    """Check the arguments of :func:`sample`/:func:`stream` and set up the decode loop."""
    _check_decoder(model, "sample")
    _check_sampling(temperature, top_k, top_p)
    _check_key(key, temperature)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens: expected an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    V = model.vocab_size
    if isinstance(stop_ids, (int, str, bytes, Tensor)) and not (
        isinstance(stop_ids, Tensor) and stop_ids.ndim == 1
    ):
        raise TypeError(
            f"stop_ids: expected a list of token ids, got {stop_ids!r:.40} (wrap one id: [id])"
        )
    stop_ids = [int(i) if isinstance(i, Tensor) and i.numel() == 1 else i for i in stop_ids]
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
    weight = tree.leaves(params)[0]  # one dtype and device for every leaf (check_params)
    tokens, mask = tokens.to(weight.device), mask.to(weight.device)
    return _generate(
        key, model, params, tokens, mask, size, max_new_tokens,
        (temperature, top_k, top_p), tuple(stop_ids), pad_id, compile,
    )  # fmt: skip


def _generate(
    key: Tensor | None,
    model: Any,
    params: Params,
    tokens: Tensor,
    mask: Tensor,
    size: int,
    n: int,
    how: tuple[float, int | None, float | None],
    stop_ids: tuple[int, ...],
    pad_id: int,
    compile: bool,
) -> tuple[Tensor, Iterator[int]]:
    """Allocate the output ``[B, n]`` and return it with the decode loop behind :func:`stream`.

    The loop fills column ``i`` of the output and yields ``i``; it ends early once every row
    has emitted a stop id. The cache and every other buffer belong to this loop alone, so
    each step updates them in place (:func:`_token`): the per-token work outside the step is
    one call and, with ``stop_ids``, one stop test.
    """
    B = tokens.shape[0]
    weight = tree.leaves(params)[0]
    device = weight.device
    # compiled: one step for every size in a bucket (see _bucket); eager: the exact sizes
    width = _bucket(n, n + _BUCKET) if compile else n
    keys = torch.zeros(width, 2, dtype=torch.int64, device=device)
    if how[0] > 0:
        assert key is not None
        keys[:n] = jr.split(key.to(device), n)  # the keys of max_new_tokens, at any width
    if compile:
        size = _bucket(size, model.max_len)
    cache = init_cache(model, B, size, dtype=weight.dtype, device=device)
    out = torch.full((B, width), pad_id, dtype=torch.int64, device=device)
    state = _State(out, torch.ones(1, dtype=torch.int64, device=device), keys,
                   torch.zeros(B, dtype=torch.bool, device=device))  # fmt: skip
    stop = torch.tensor(stop_ids, dtype=torch.int64, device=device)
    step = _compiled_token() if compile else _token

    def loop() -> Iterator[int]:
        with torch.no_grad():
            x, _ = model.apply_cached(params, tokens, mask, cache, inplace=True)
            first = model.logits(params, x[:, -1])
            _checks.check_logits("generate: the logits after the prompts", first)
            out[:, 0] = _choose(keys[0], first, *how)
            decode_params = model.decode_params(_decode_layout(params))
        for i in range(n):
            if i:
                with torch.no_grad():
                    step(model, decode_params, cache, state, how, pad_id)
            if stop_ids:
                torch.logical_or(state.done, torch.isin(out[:, i], stop), out=state.done)
            yield i
            if stop_ids and bool(state.done.all()):
                return

    return out, loop()


class _State(NamedTuple):
    """The buffers of one decode loop besides the cache (all updated in place by :func:`_token`).

    ``out [B, n]``: the tokens so far; ``step [1]``: the column the next call writes;
    ``keys [n, 2]``: one key per step; ``done [B]``: rows that have emitted a stop id.
    """

    out: Tensor
    step: Tensor
    keys: Tensor
    done: Tensor


def _token(
    model: Any,
    params: Params,
    cache: KVCache,
    state: _State,
    how: tuple[float, int | None, float | None],
    pad_id: int,
) -> None:
    """One whole decode step, in place: what ``compile=True`` compiles (once per shape).

    Feeds column ``step - 1`` of the output, writes its keys and values into the cache, picks
    the next token with key ``step`` (``pad_id`` for finished rows), writes it to column
    ``step`` and advances ``step``. Every argument is the same object at every step, so the
    compiled form is looked up once per call with nothing new to trace or copy.
    """
    out, step, keys, done = state
    tokens = out.index_select(1, step - 1)  # [B, 1]
    x, _ = model.apply_cached(params, tokens, torch.ones_like(tokens), cache, inplace=True)
    picked = _choose(keys.index_select(0, step)[0], model.logits(params, x[:, 0]), *how)
    out.index_copy_(1, step, torch.where(done, pad_id, picked)[:, None])
    step.add_(1)


def _decode_layout(params: Params) -> Params:
    """The params with every matrix stored transposed (CPU): the blocks' and the LM head's.

    Same shapes and values, column-major memory: ``x @ W.T`` then reads ``W.T`` row by row,
    which CPU BLAS does 2-3x faster than the row-major layout for a few rows of ``x`` (and
    up to 1.5x for one). The copy is made once per call and read once per token; on other
    devices the params are used as they are. (Embedding tables are copied too: a lookup
    reads one strided row per token, which costs nothing next to the matmuls.)
    """
    if tree.leaves(params)[0].device.type != "cpu":
        return params

    def transposed(w: Tensor) -> Tensor:
        return w.t().contiguous().t() if w.ndim == 2 else w

    return tree.map(transposed, params)


_BUCKET = 64


def _bucket(size: int, limit: int, step: int = _BUCKET) -> int:
    """The cache size (and output width) a compiled decode loop allocates: ``size`` rounded
    up to a multiple of ``step``, at most ``limit``.

    The compiled step is specialised to the cache's shape, and a new shape compiles again
    (minutes for a large model on a CPU; past dynamo's recompile limit the step silently runs
    eagerly). Slots past the last token are never attended (the cache's slot mask), so the
    extra ones change no result, nor do unused output columns; a different
    ``max_new_tokens`` then reuses the step.
    """
    return min(limit, -(-size // step) * step)


@functools.cache
def _compiled_token() -> Any:
    """:func:`_token` under ``torch.compile(fullgraph=True)``, created once per process."""
    return torch.compile(_token, fullgraph=True, dynamic=False)


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
    # shift the best logit to 0 first: the distribution is the same, and a tiny temperature
    # then sends every other logit to -inf (argmax) instead of overflowing to inf - inf = NaN
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")
