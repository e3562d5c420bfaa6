"""Hypothesis strategies for small model configs, token batches and data-transform arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from fnllm.models import BERT, GPT, Llama
from fnllm.testing._trees import keys


def gpt_configs(
    *, max_vocab: int = 64, max_layers: int = 2, max_heads: int = 4, max_len: int = 16
) -> st.SearchStrategy[GPT]:
    """Draw small, valid :class:`fnllm.GPT` configs (``d_model`` a multiple of ``n_head``).

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing
        >>> @settings(max_examples=5)
        ... @given(testing.gpt_configs())
        ... def test_shapes_cover_params(model):
        ...     assert model.d_model % model.n_head == 0
        >>> test_shapes_cover_params()

    Args:
        max_vocab: largest vocabulary (at least 2).
        max_layers: most blocks.
        max_heads: most attention heads.
        max_len: largest ``max_len`` (number of positions).

    Returns:
        A strategy of GPT configs.
    """

    def gpt_fields(draw: st.DrawFn) -> dict[str, Any]:
        return {
            "d_ff": draw(st.one_of(st.none(), st.integers(1, 32))),
            "tie_head": draw(st.booleans()),
        }

    return _configs(GPT, gpt_fields, max_vocab, max_layers, max_heads, max_len)


def bert_configs(
    *, max_vocab: int = 64, max_layers: int = 2, max_heads: int = 4, max_len: int = 16
) -> st.SearchStrategy[BERT]:
    """Draw small, valid :class:`fnllm.BERT` configs, as :func:`gpt_configs` does GPT's.

    The pair head is drawn only with a pooler (it reads the pooled output).

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing
        >>> @settings(max_examples=5)
        ... @given(testing.bert_configs(max_layers=1))
        ... def test_one_block_and_pair_head_needs_pooler(model):
        ...     assert model.n_layer == 1 and (model.pooler or not model.pair_head)
        >>> test_one_block_and_pair_head_needs_pooler()

    Args:
        max_vocab: as in :func:`gpt_configs`.
        max_layers: as in :func:`gpt_configs`.
        max_heads: as in :func:`gpt_configs`.
        max_len: as in :func:`gpt_configs`.

    Returns:
        A strategy of BERT configs.
    """

    def bert_fields(draw: st.DrawFn) -> dict[str, Any]:
        pooler = draw(st.booleans())
        return {
            "d_ff": draw(st.integers(1, 32)),
            "type_vocab_size": draw(st.integers(1, 3)),
            "pooler": pooler,
            "mlm_head": draw(st.booleans()),
            "pair_head": pooler and draw(st.booleans()),
        }

    return _configs(BERT, bert_fields, max_vocab, max_layers, max_heads, max_len)


def llama_configs(
    *, max_vocab: int = 64, max_layers: int = 2, max_heads: int = 4, max_len: int = 16
) -> st.SearchStrategy[Llama]:
    """Draw small, valid :class:`fnllm.Llama` configs, as :func:`gpt_configs` does GPT's.

    ``n_kv_head`` divides ``n_head`` (grouped-query attention included), the head width is
    even (rotary embeddings), and rope scaling, q/k/v biases and a tied head are drawn too.

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing
        >>> @settings(max_examples=5)
        ... @given(testing.llama_configs())
        ... def test_kv_heads_divide_heads(model):
        ...     assert model.n_head % model.n_kv_head == 0 and model.head_dim % 2 == 0
        >>> test_kv_heads_divide_heads()

    Args:
        max_vocab: as in :func:`gpt_configs`.
        max_layers: as in :func:`gpt_configs`.
        max_heads: as in :func:`gpt_configs` (query heads).
        max_len: as in :func:`gpt_configs`.

    Returns:
        A strategy of Llama configs.
    """
    _configs(Llama, lambda draw: {}, max_vocab, max_layers, max_heads, max_len)  # checks bounds

    @st.composite
    def _draw(draw: st.DrawFn) -> Llama:
        n_head = draw(st.integers(1, max_heads))
        head_dim = 2 * draw(st.integers(1, 4))
        llama3 = draw(st.booleans())
        return Llama(
            vocab_size=draw(st.integers(2, max_vocab)),
            n_layer=draw(st.integers(1, max_layers)),
            n_head=n_head,
            n_kv_head=draw(st.sampled_from([k for k in range(1, n_head + 1) if n_head % k == 0])),
            d_model=n_head * head_dim,
            d_ff=draw(st.integers(1, 32)),
            max_len=draw(st.integers(1, max_len)),
            rope_theta=draw(st.sampled_from([100.0, 10000.0])),
            rope_type="llama3" if llama3 else "default",
            rope_original_max_len=draw(st.integers(1, 32)),
            qkv_bias=draw(st.booleans()),
            tie_head=draw(st.booleans()),
            dropout=draw(st.sampled_from([0.0, 0.1])),
        )

    return _draw()


def with_params(configs: st.SearchStrategy) -> st.SearchStrategy[tuple[Any, Any]]:
    """Pair each drawn config with parameters from ``config.init(key)`` for a drawn key.

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing, tree
        >>> @settings(max_examples=5, deadline=None)  # the first init is slow
        ... @given(testing.with_params(testing.gpt_configs()))
        ... def test_init_matches_param_shapes(model_and_params):
        ...     model, params = model_and_params
        ...     assert {p: tuple(x.shape) for p, x in tree.flatten(params).items()} == (
        ...         model.param_shapes())
        >>> test_init_matches_param_shapes()

    Args:
        configs: a strategy of model configs with an ``init(key)`` method.

    Returns:
        A strategy of ``(model, params)`` pairs.
    """
    return st.tuples(configs, keys()).map(lambda mk: (mk[0], mk[0].init(mk[1])))


def token_batches(
    vocab_size: int,
    max_len: int,
    *,
    max_batch: int = 4,
    pad_id: int = 0,
    padding: str = "right",
    exclude: tuple[int, ...] = (),
    min_tokens: int = 1,
) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Draw padded token batches ``{"input_ids": [B, T] int64, "attention_mask": [B, T] int64}``.

    The batch keys are the ones ``fnllm.data`` writes. ``"tokens"`` holds the same tensor
    under its old name until fnllm 0.2 (see the deprecation page).

    Every row has at least ``min_tokens`` real tokens (one by default, so every row can be
    attended to); padded positions hold ``pad_id`` and mask 0. Real
    tokens are ids in ``[0, vocab_size)`` other than ``pad_id`` and ``exclude`` (when any remain).

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import testing
        >>> @settings(max_examples=10)
        ... @given(testing.token_batches(vocab_size=50, max_len=8))
        ... def test_mask_marks_real_tokens(batch):
        ...     real = batch["attention_mask"].bool()
        ...     assert bool((batch["input_ids"][~real] == 0).all()) and bool(real.any(1).all())
        >>> test_mask_marks_real_tokens()

    Args:
        vocab_size: number of token ids.
        max_len: longest sequence ``T``.
        max_batch: largest batch size ``B``.
        pad_id: the id on padded positions.
        padding: ``"right"``, ``"left"`` or ``"none"`` (all rows full length, mask all ones).
        exclude: ids never drawn as real tokens (special ids).
        min_tokens: fewest real tokens in a row (0 allows fully padded rows).

    Returns:
        A strategy of batches.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"token_batches: vocab_size must be an int >= 1, got {vocab_size!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"token_batches: max_len must be an int >= 1, got {max_len!r}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"token_batches: pad_id {pad_id} outside [0, vocab_size {vocab_size})")
    if padding not in ("right", "left", "none"):
        raise ValueError(f"token_batches: padding {padding!r} is not 'right', 'left' or 'none'")
    if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_len:
        raise ValueError(f"token_batches: min_tokens {min_tokens!r} outside [0, max_len {max_len}]")
    ids = [i for i in range(vocab_size) if i != pad_id and i not in exclude] or [pad_id]
    real = st.sampled_from(ids)

    @st.composite
    def _draw(draw: st.DrawFn) -> dict[str, torch.Tensor]:
        b = draw(st.integers(1, max_batch))
        t = draw(st.integers(max(1, min_tokens), max_len))
        rows, masks = [], []
        for _ in range(b):
            n = t if padding == "none" else draw(st.integers(min_tokens, t))
            row = draw(st.lists(real, min_size=n, max_size=n))
            pad = [pad_id] * (t - n)
            rows.append(row + pad if padding != "left" else pad + row)
            mask = [1] * n + [0] * (t - n)
            masks.append(mask if padding != "left" else mask[::-1])
        ids = torch.tensor(rows)
        # "tokens": the old key for the same tensor, until fnllm 0.2 (docs/deprecation.md)
        return {"input_ids": ids, "attention_mask": torch.tensor(masks), "tokens": ids}

    return _draw()


def mlm_args(
    *, max_vocab: int = 64, max_len: int = 16, max_batch: int = 4, min_tokens: int = 1
) -> st.SearchStrategy[dict[str, Any]]:
    """Draw valid keyword arguments for :func:`fnllm.data.mlm_mask`.

    The dict holds ``key``, ``tokens``, ``attention_mask``, ``mask_id``, ``vocab_size``,
    ``special_ids``, ``prob``, ``mask_frac`` and ``random_frac``; call ``mlm_mask(**args)``.

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import data, testing
        >>> @settings(max_examples=10)
        ... @given(testing.mlm_args())
        ... def test_labels_are_original_or_ignored(args):
        ...     inputs, labels = data.mlm_mask(**args)
        ...     picked = labels != -100
        ...     assert bool((labels[picked] == args["tokens"][picked]).all())
        >>> test_labels_are_original_or_ignored()

    Args:
        max_vocab: largest vocabulary (at least 4: pad, mask and two more ids).
        max_len: longest sequence.
        max_batch: largest batch size.
        min_tokens: fewest real tokens in a row (0 allows fully padded rows), as in
            :func:`token_batches`.

    Returns:
        A strategy of argument dicts.
    """
    if max_vocab < 4:
        raise ValueError(f"mlm_args: max_vocab must be >= 4, got {max_vocab}")
    if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_len:
        raise ValueError(f"mlm_args: min_tokens {min_tokens!r} outside [0, max_len {max_len}]")

    @st.composite
    def _draw(draw: st.DrawFn) -> dict[str, Any]:
        vocab = draw(st.integers(4, max_vocab))
        pad_id, mask_id = draw(
            st.lists(st.integers(0, vocab - 1), min_size=2, max_size=2, unique=True)
        )
        others = [i for i in range(vocab) if i not in (pad_id, mask_id)]
        extra = draw(
            st.lists(st.sampled_from(others), max_size=min(2, len(others) - 1), unique=True)
        )
        special = tuple(sorted({pad_id, *extra}))
        batch = draw(
            token_batches(vocab, max_len, max_batch=max_batch, pad_id=pad_id, min_tokens=min_tokens)
        )
        mask_frac = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
        random_frac = draw(st.sampled_from([0.0, 0.1, round(1.0 - mask_frac, 6)]))
        return {
            "key": draw(keys()),
            "tokens": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "mask_id": mask_id,
            "vocab_size": vocab,
            "special_ids": special,
            "prob": draw(st.sampled_from([0.0, 0.15, 0.5, 1.0])),
            "mask_frac": mask_frac,
            "random_frac": min(random_frac, 1.0 - mask_frac),
        }

    return _draw()


def sentence_pair_args(
    *, max_vocab: int = 64, max_segment: int = 8, max_batch: int = 4
) -> st.SearchStrategy[dict[str, Any]]:
    """Draw valid keyword arguments for :func:`fnllm.data.sentence_pairs`.

    The dict holds ``key``, ``first`` and ``second`` (lists of non-empty id lists without
    special ids), ``mode``, ``cls_id``, ``sep_id``, ``pad_id`` and ``max_len``.

    Example:
        >>> from hypothesis import given, settings
        >>> from fnllm import data, testing
        >>> @settings(max_examples=10)
        ... @given(testing.sentence_pair_args(max_batch=2))
        ... def test_two_rows_each_starting_with_cls(args):
        ...     ids = data.sentence_pairs(**args)["input_ids"]
        ...     assert len(ids) <= 2 and bool((ids[:, 0] == args["cls_id"]).all())
        >>> test_two_rows_each_starting_with_cls()

    Args:
        max_vocab: largest vocabulary (at least 4: pad, cls, sep and one word id).
        max_segment: longest segment A or B.
        max_batch: largest batch size (``"nsp"`` rows: at least 2).

    Returns:
        A strategy of argument dicts.
    """
    if max_vocab < 4:
        raise ValueError(f"sentence_pair_args: max_vocab must be >= 4, got {max_vocab}")

    @st.composite
    def _draw(draw: st.DrawFn) -> dict[str, Any]:
        vocab = draw(st.integers(4, max_vocab))
        pad_id, cls_id, sep_id = draw(
            st.lists(st.integers(0, vocab - 1), min_size=3, max_size=3, unique=True)
        )
        words = st.sampled_from([i for i in range(vocab) if i not in (pad_id, cls_id, sep_id)])
        mode = draw(st.sampled_from(["sop", "nsp"]))
        rows = draw(st.integers(2 if mode == "nsp" else 1, max(max_batch, 2)))
        segment = st.lists(words, min_size=1, max_size=max_segment)
        return {
            "key": draw(keys()),
            "first": draw(st.lists(segment, min_size=rows, max_size=rows)),
            "second": draw(st.lists(segment, min_size=rows, max_size=rows)),
            "mode": mode,
            "cls_id": cls_id,
            "sep_id": sep_id,
            "pad_id": pad_id,
            "max_len": draw(st.integers(3, 2 * max_segment + 3)),
        }

    return _draw()


# ----------------------------------------------------------------------------- helpers


def _configs(
    cls: Any,
    fields: Callable[[st.DrawFn], dict[str, Any]],
    max_vocab: int,
    max_layers: int,
    max_heads: int,
    max_len: int,
) -> st.SearchStrategy[Any]:
    """Configs ``cls(...)``: the sizes and dropout GPT and BERT draw alike (``d_model`` a
    multiple of ``n_head``) plus the model's own ``fields(draw)``; the bounds are checked."""
    for name, value, low in (
        ("max_vocab", max_vocab, 2),
        ("max_layers", max_layers, 1),
        ("max_heads", max_heads, 1),
        ("max_len", max_len, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"config strategy: {name} must be an int >= {low}, got {value!r}")

    @st.composite
    def _draw(draw: st.DrawFn) -> Any:
        n_head = draw(st.integers(1, max_heads))
        return cls(
            vocab_size=draw(st.integers(2, max_vocab)),
            n_layer=draw(st.integers(1, max_layers)),
            n_head=n_head,
            d_model=n_head * draw(st.integers(1, 8)),
            max_len=draw(st.integers(1, max_len)),
            dropout=draw(st.sampled_from([0.0, 0.1])),
            **fields(draw),
        )

    return _draw()
