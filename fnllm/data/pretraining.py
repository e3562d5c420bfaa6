"""The BERT pretraining batch: sentence pairs (:mod:`fnllm.data.pairs`) then masking
(:mod:`fnllm.data.masking`), one pure function of a key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fnllm import _checks
from fnllm import random as jr
from fnllm.data.masking import mlm_mask
from fnllm.data.pairs import sentence_pairs

__all__ = ["bert_pretraining_batch"]


def bert_pretraining_batch(
    key: Tensor,
    first: Tensor | Sequence[Sequence[int]],
    second: Tensor | Sequence[Sequence[int]],
    *,
    first_len: Tensor | None = None,
    second_len: Tensor | None = None,
    mode: str = "sop",
    cls_id: int,
    sep_id: int,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
    max_len: int,
    special_ids: Sequence[int] = (),
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    word_start_table: Tensor | None = None,
    exact: bool = False,
) -> dict[str, Tensor]:
    """One BERT pretraining batch: :func:`sentence_pairs`, then :func:`mlm_mask` on the result.

    The key is split in two: one half draws the pair order / replacement, the other the
    masking. ``[CLS]``, ``[SEP]``, ``[PAD]`` and ``[MASK]`` are never masked; padding is
    excluded through the pair's attention mask.

    Example:
        >>> from fnllm import random
        >>> from fnllm.data import bert_pretraining_batch
        >>> batch = bert_pretraining_batch(
        ...     random.key(0), [[10, 11, 12, 13], [14, 15]], [[16, 17], [18, 19, 20]],
        ...     mode="nsp", cls_id=1, sep_id=2, pad_id=0, mask_id=3, vocab_size=30,
        ...     max_len=10, prob=0.5)
        >>> batch["input_ids"]
        tensor([[ 1,  3, 11,  3,  3,  2,  3, 17,  2,  0],
                [ 1, 14,  3,  2,  3, 17,  2,  0,  0,  0]])
        >>> batch["labels"]
        tensor([[-100,   10, -100,   12,   13, -100,   16, -100, -100, -100],
                [-100, -100,   15, -100,   16, -100, -100, -100, -100, -100]])
        >>> batch["next_sentence_label"]                   # row 1 got row 0's B segment
        tensor([0, 1])

    Args:
        key: a ``fnllm.random`` key.
        first: segment A per row, as for :func:`sentence_pairs`.
        second: segment B per row (the true next segment).
        first_len: optional ``[B]`` lengths of ``first``.
        second_len: optional ``[B]`` lengths of ``second``.
        mode: ``"sop"`` or ``"nsp"``.
        cls_id: the ``[CLS]`` id.
        sep_id: the ``[SEP]`` id.
        pad_id: the ``[PAD]`` id.
        mask_id: the ``[MASK]`` id.
        vocab_size: number of token ids.
        max_len: sequence length.
        special_ids: further ids never masked nor drawn as replacements (e.g. ``[UNK]``).
        prob: MLM pick probability.
        mask_frac: fraction of picked tokens replaced by ``[MASK]``.
        random_frac: fraction of picked tokens replaced by a random non-special id.
        word_start_table: optional bool ``[vocab_size]``, True for ids that start a word;
            given, whole words are masked (``table[input_ids]`` is the word-start mask).
        exact: exact-count MLM picking.

    Returns:
        A dict of ``[B, max_len]`` tensors ``input_ids`` (masked), ``token_type_ids``,
        ``attention_mask``, ``labels`` (MLM targets, -100 where not picked) and
        ``next_sentence_label`` ``[B]`` (the pair label; the Hugging Face
        ``BertForPreTraining`` names).
    """
    k_pairs, k_mask = jr.split(key, 2)
    pairs = sentence_pairs(
        k_pairs,
        first,
        second,
        first_len=first_len,
        second_len=second_len,
        mode=mode,
        cls_id=cls_id,
        sep_id=sep_id,
        pad_id=pad_id,
        max_len=max_len,
    )
    ids = pairs["input_ids"]
    whole_word = None
    if word_start_table is not None:
        if word_start_table.shape != (vocab_size,) or word_start_table.dtype != torch.bool:
            raise ValueError(
                f"word_start_table: expected bool [{vocab_size}], got "
                f"{word_start_table.dtype} {tuple(word_start_table.shape)}"
            )
        if not _checks.tracing(ids):
            _checks.check_id_range("input_ids", ids, vocab_size)
        whole_word = word_start_table.to(ids.device)[ids]
    inputs, labels = mlm_mask(
        k_mask,
        ids,
        mask_id=mask_id,
        vocab_size=vocab_size,
        special_ids=(*special_ids, cls_id, sep_id, pad_id),
        prob=prob,
        mask_frac=mask_frac,
        random_frac=random_frac,
        attention_mask=pairs["attention_mask"],
        whole_word=whole_word,
        exact=exact,
    )
    return {
        "input_ids": inputs,
        "token_type_ids": pairs["token_type_ids"],
        "attention_mask": pairs["attention_mask"],
        "labels": labels,
        "next_sentence_label": pairs["labels"],
    }
