"""Masked-language-model corruption (BERT's 80/10/10 recipe) as a pure function of a key.

``mlm_mask`` picks positions to predict, corrupts the picked inputs and returns the labels.
It is a pure function of ``(key, tokens)``: the same key gives the same output, it runs on a
single sequence ``[T]`` or a batch ``[B, T]`` (or any ``[..., T]``), per-example keys under
``torch.func.vmap`` give the same result as a Python loop, and it compiles with
``torch.compile(fullgraph=True)`` without graph breaks.

Differences from Hugging Face ``DataCollatorForLanguageModeling`` (same 0.15 / 0.8 / 0.1
defaults, same joint probabilities: of the picked tokens 80% become ``[MASK]``, 10% a random
token and 10% stay unchanged):

- randomness comes from an explicit key (threefry, ``fnllm.random``) instead of torch's
  global generator, so a batch can be reproduced from ``(key, tokens)`` alone;
- random replacements are drawn uniformly from the *non-special* ids (``special_ids`` and
  ``mask_id`` excluded); the collator draws from the whole vocabulary, specials included;
- special ids are given as a set of ids and padding as an ``attention_mask``; the collator
  asks the tokenizer for a special-tokens mask row by row in Python;
- randomness is one threefry draw of uniform 32-bit words (``fnllm.random.bits``). In the
  default mode a token's single word decides everything: it is picked when
  ``word < prob * 2**32``; a picked word is uniform on ``[0, prob * 2**32)``, whose first
  80% means ``[MASK]``, next 10% a random id (the word's offset in that part, scaled to the
  allowed ids) and last 10% keep. Exact-count and whole-word modes draw a second word per
  token for the 80/10/10 choice. The collator draws a Bernoulli for the pick, two more
  (0.8, then 0.5 of the rest) and a randint. Both give the same joint probabilities, not
  the same samples;
- optional exact-count mode (``round(prob * n)`` per sequence, as in the BERT paper's data
  creation) and whole-word masking from a word-start mask, both vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fnllm import _checks
from fnllm import random as jr

__all__ = ["mlm_mask"]

IGNORE_INDEX = _checks.IGNORE_INDEX


def mlm_mask(
    key: Tensor,
    tokens: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    attention_mask: Tensor | None = None,
    whole_word: Tensor | None = None,
    exact: bool = False,
) -> tuple[Tensor, Tensor]:
    """Corrupt tokens for masked-language-model training and return ``(inputs, labels)``.

    Each *candidate* token (not in ``special_ids``, not ``mask_id``, not padding) is picked
    with probability ``prob``. A picked token becomes ``mask_id`` with probability
    ``mask_frac``, a uniformly random non-special id with probability ``random_frac`` and
    stays unchanged otherwise (joint probabilities over the picked tokens: 0.8 / 0.1 / 0.1 by
    default). ``labels`` holds the original id at picked positions and -100 elsewhere.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.data import mlm_mask
        >>> tokens = torch.tensor([[101, 7, 8, 9, 10, 11, 12, 13, 102, 0]])
        >>> inputs, labels = mlm_mask(random.key(4), tokens, mask_id=103, vocab_size=200,
        ...                           special_ids=(0, 101, 102), prob=0.3)
        >>> inputs                                      # 8 masked, 12 replaced by 25
        tensor([[101,   7, 103,   9,  10,  11,  25,  13, 102,   0]])
        >>> labels
        tensor([[-100, -100,    8, -100, -100, -100,   12, -100, -100, -100]])

    Args:
        key: a ``fnllm.random`` key. One key draws the whole ``tokens`` array; for
            per-example keys use ``torch.func.vmap`` over ``random.split(key, B)``.
        tokens: integer token ids, shape ``[T]`` or ``[B, T]`` (any ``[..., T]``).
        mask_id: the ``[MASK]`` id; it is never picked nor drawn as a random replacement.
        vocab_size: number of token ids; every id must lie in ``[0, vocab_size)``.
        special_ids: ids never picked nor drawn as replacements (``[CLS]``, ``[SEP]``,
            ``[PAD]``, ...).
        prob: probability that a candidate token is picked (the expected fraction; with
            ``exact=True`` the exact fraction, rounded).
        mask_frac: probability that a picked token becomes ``mask_id``.
        random_frac: probability that a picked token becomes a random non-special id.
        attention_mask: optional ``[..., T]`` mask, 0/False on padding; padding is never
            picked.
        whole_word: optional bool ``[..., T]``, True where a token starts a word. Words are
            picked as units (the 80/10/10 choice is still per token, as in BERT). A special
            or padding token always ends the word before it.
        exact: pick exactly ``round(prob * n)`` tokens per sequence, where ``n`` is the number
            of candidates (Python's ``round``, half to even). With ``whole_word``, ``n``
            counts words and ``round(prob * n)`` whole words are picked.

    Returns:
        ``(inputs, labels)``, both shaped and typed like ``tokens``: the corrupted inputs and
        the original ids at picked positions (-100 elsewhere).

    Raises:
        ValueError: ``prob`` outside [0, 1], negative fractions or fractions summing over 1,
            ``mask_id`` or a special id outside ``[0, vocab_size)``, non-integer tokens,
            token ids out of range (eager mode only), or masks of the wrong shape.
    """
    excluded = _check_args(tokens, mask_id, vocab_size, special_ids, prob, mask_frac, random_frac)
    if attention_mask is not None:
        _checks.check_mask("attention_mask", attention_mask, tokens)
    if whole_word is not None:
        _checks.check_mask("whole_word", whole_word, tokens)
    if not _checks.tracing(tokens):
        _checks.check_id_range("tokens", tokens, vocab_size)

    candidates = _candidates(tokens, excluded, attention_mask)
    if whole_word is None and not exact:
        # One uniform 32-bit word per token decides everything: the token is picked when
        # word < cut, and then the word is uniform on [0, cut), which splits into the
        # mask / random / keep intervals and, inside the random one, the random id.
        word = jr.bits(key, tokens.shape, torch.int64)
        cut = _threshold(prob)
        picked = candidates & (word < cut)
        choice, span = word, cut
    else:
        # Exact counts and whole words rank or share a pick word, so a second word per
        # token decides the 80/10/10 choice.
        words = jr.bits(key, (2, *tokens.shape), torch.int64)
        picked = _pick(words[0], candidates, whole_word, prob, exact)
        choice, span = words[1], 2**32
    n_allowed = vocab_size - len(excluded)
    inputs = _corrupt(
        tokens, picked, choice, span, mask_id, mask_frac, random_frac, excluded, n_allowed
    )
    labels = torch.where(picked, tokens, IGNORE_INDEX)
    return inputs, labels


def _check_args(
    tokens: Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    prob: float,
    mask_frac: float,
    random_frac: float,
) -> tuple[int, ...]:
    """Validate the static arguments; return the sorted ids excluded from replacement."""
    _checks.check_int_tensor("tokens", tokens)
    _checks.check_int("vocab_size", vocab_size, low=1)
    _checks.check_int("mask_id", mask_id)
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id: {mask_id} outside [0, vocab_size {vocab_size})")
    for name, value in (("prob", prob), ("mask_frac", mask_frac), ("random_frac", random_frac)):
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}: {value!r} outside [0, 1]")
    if mask_frac + random_frac > 1.0 + 1e-9:
        raise ValueError(
            f"mask_frac + random_frac: {mask_frac} + {random_frac} = {mask_frac + random_frac} > 1"
        )
    excluded = _checks.check_id_list("special_ids", (*special_ids, mask_id), vocab_size)
    if random_frac > 0.0 and len(excluded) >= vocab_size:
        raise ValueError(
            f"special_ids: all {vocab_size} ids are special, no id left for random replacement"
        )
    return excluded


def _candidates(tokens: Tensor, excluded: tuple[int, ...], attention_mask: Tensor | None) -> Tensor:
    """Bool mask of the tokens that may be picked: not special, not padding."""
    candidates = torch.ones_like(tokens, dtype=torch.bool)
    for s in excluded:
        candidates = candidates & (tokens != s)
    if attention_mask is not None:
        candidates = candidates & attention_mask.bool()
    return candidates


def _corrupt(
    tokens: Tensor,
    picked: Tensor,
    choice: Tensor,
    span: int,
    mask_id: int,
    mask_frac: float,
    random_frac: float,
    excluded: tuple[int, ...],
    n_allowed: int,
) -> Tensor:
    """Apply the mask / random / keep choice to the picked tokens.

    ``choice`` is uniform on ``[0, span)`` at picked positions. The interval is cut at
    ``mask_frac * span`` and ``(mask_frac + random_frac) * span``; inside the random part
    the word's offset, scaled to the ``n_allowed`` ids not in ``excluded``, gives the
    replacement (each id gets ``part / n_allowed`` words rounded down or up, so ids are
    uniform to a relative error below ``n_allowed / part``: under 0.1% for BERT's defaults).
    """
    mask_cut = round(mask_frac * span)
    random_cut = min(round((mask_frac + random_frac) * span), span)
    inputs = torch.where(picked & (choice < mask_cut), mask_id, tokens)
    if random_cut > mask_cut:
        to_random = picked & (choice >= mask_cut) & (choice < random_cut)
        nth = ((choice - mask_cut) * n_allowed) // (random_cut - mask_cut)
        inputs = torch.where(to_random, _nth_allowed_id(nth, excluded).to(tokens.dtype), inputs)
    return inputs


def _threshold(p: float) -> int:
    """The 32-bit cut ``c`` with ``P(word < c) = p`` for a uniform 32-bit word."""
    return min(max(round(p * 2**32), 0), 2**32)


def _pick(
    scores: Tensor, candidates: Tensor, whole_word: Tensor | None, prob: float, exact: bool
) -> Tensor:
    """Choose the positions to predict among ``candidates`` (tokens or whole words).

    ``scores`` are uniform 32-bit words (int64), one per token.
    """
    cut = _threshold(prob)
    if whole_word is None:
        if not exact:
            return candidates & (scores < cut)
        return _top_fraction(scores, candidates, prob)
    # A word is a maximal run of candidates that starts at a word-start token; every token
    # looks up the decision of its word's first token.
    prev = torch.cat([torch.zeros_like(candidates[..., :1]), candidates[..., :-1]], dim=-1)
    starts = whole_word.bool() | ~candidates | ~prev
    positions = torch.arange(candidates.shape[-1], device=candidates.device)
    start_of = torch.cummax(torch.where(starts, positions, 0), dim=-1).values
    if not exact:
        word_picked = scores < cut
    else:
        word_picked = _top_fraction(scores, starts & candidates, prob)
    return candidates & torch.gather(word_picked, -1, start_of)


def _top_fraction(scores: Tensor, units: Tensor, prob: float) -> Tensor:
    """Pick the ``round(prob * units.sum(-1))`` units with the lowest scores, per row."""
    count = units.sum(dim=-1, keepdim=True)
    target = torch.round(count.to(torch.float64) * prob).to(count.dtype)
    # Non-units sort last (scores are below 2**32); the rank of each position is its index in
    # the sorted order, obtained by scattering 0..T-1 back through the sort permutation.
    order = torch.argsort(torch.where(units, scores, 2**32), dim=-1, stable=True)
    steps = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.zeros_like(order).scatter(-1, order, steps)
    return units & (rank < target)


def _nth_allowed_id(n: Tensor, excluded: tuple[int, ...]) -> Tensor:
    """Map ``n`` in ``[0, vocab_size - len(excluded))`` to the n-th id not in ``excluded``.

    ``excluded`` is sorted ascending; stepping over each excluded id in order shifts ``n``
    past it exactly when the running id has reached it.
    """
    for s in excluded:
        n = n + (n >= s).to(n.dtype)
    return n
