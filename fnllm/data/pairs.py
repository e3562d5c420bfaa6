"""Sentence-pair inputs for BERT pretraining: ``[CLS] A [SEP] B [SEP]`` with a pair label.

Two objectives from the seed material:

- ``"nsp"`` (next-sentence prediction, BERT): with probability 0.5 segment B is replaced by
  the B segment of *another row of the batch* (label 1 = "not next"), else B is the true
  next segment (label 0).
- ``"sop"`` (sentence-order prediction, ALBERT): B is always the true next segment and the
  two are swapped with probability 0.5 (label 1 = "swapped").

The tensor path is vectorised: per row it computes the truncated lengths in closed form and
builds the output with one ``gather`` per segment through computed index maps, so there is
no Python loop over examples and the function compiles with ``fullgraph=True``.

How "another document" is chosen (``nsp``): each row ``b`` draws an offset ``o_b`` uniformly
from ``{1, ..., B-1}`` and takes its replacement from row ``(b + o_b) mod B``. The source is
never the row itself, every other row is equally likely, and the draw is a pure function of
the key. It needs ``B >= 2``. If two rows of a batch come from the same document, the
replacement is still a segment that does not follow A (it follows another A), which is what
the label says; the loaders in ``fnllm.data.corpus`` draw rows across the whole corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fnllm import _checks
from fnllm import random as jr

__all__ = ["pad_sequences", "sentence_pairs", "truncate_lengths"]

_MODES = ("sop", "nsp")


def sentence_pairs(
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
    max_len: int,
) -> dict[str, Tensor]:
    """Build ``[CLS] A [SEP] B [SEP]`` pair inputs with a next-sentence or order label.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.data import sentence_pairs
        >>> batch = sentence_pairs(random.key(1), [[5, 6, 7], [8, 9]], [[10], [11, 12]],
        ...                        mode="sop", cls_id=1, sep_id=2, pad_id=0, max_len=8)
        >>> batch["input_ids"]                           # row 0 swapped, row 1 in order
        tensor([[ 1, 10,  2,  5,  6,  7,  2,  0],
                [ 1,  8,  9,  2, 11, 12,  2,  0]])
        >>> batch["token_type_ids"]
        tensor([[0, 0, 0, 1, 1, 1, 1, 0],
                [0, 0, 0, 0, 1, 1, 1, 0]])
        >>> batch["next_sentence_label"]
        tensor([1, 0])

    Args:
        key: a ``fnllm.random`` key.
        first: segment A per row: an integer tensor ``[B, La]`` padded on the right (or
            ``[La]`` for one row, ``sop`` only), or a list of id lists.
        second: segment B per row (the segment that truly follows A): ``[B, Lb]`` or a list
            of id lists.
        first_len: ``[B]`` lengths of ``first``; default: the count of non-``pad_id`` ids.
        second_len: ``[B]`` lengths of ``second``; default as for ``first_len``.
        mode: ``"sop"`` (swap with probability 0.5, label 1 = swapped) or ``"nsp"``
            (replace B by another row's B with probability 0.5, label 1 = not next).
        cls_id: the ``[CLS]`` id.
        sep_id: the ``[SEP]`` id.
        pad_id: the padding id used in the inputs and in the output.
        max_len: output length; A and B are truncated longest-first (ties shorten B, as in
            BERT and Hugging Face ``longest_first``), from the end, to ``max_len - 3``
            tokens together, so the three special tokens always survive.

    Returns:
        A dict of ``[B, max_len]`` tensors ``input_ids`` (dtype of ``first``),
        ``token_type_ids`` (0 for CLS, A and the first SEP; 1 for B and the last SEP; 0 on
        padding), ``attention_mask`` (1 on the tokens, 0 on padding), and
        ``next_sentence_label`` ``[B]`` (int64, 0 = in order / next, 1 = swapped / not next;
        the Hugging Face name; ``labels`` is the same tensor under its old name, deprecated:
        it goes in 0.2). Unbatched
        ``[L]`` inputs give ``[max_len]`` outputs and a scalar label.

    Raises:
        ValueError: ``max_len < 3``, an unknown ``mode``, ``nsp`` with fewer than 2 rows,
            non-integer ids, a negative special id, mismatched batch sizes, an empty segment,
            or lengths outside the padded width.
    """
    if not isinstance(first, Tensor):
        first, first_len = pad_sequences(first, pad_id)
    if not isinstance(second, Tensor):
        second, second_len = pad_sequences(second, pad_id)
    unbatched = _check_pair_args(first, second, mode, cls_id, sep_id, pad_id, max_len)
    if unbatched:
        first, second = first[None], second[None]
        first_len = None if first_len is None else first_len.reshape(1)
        second_len = None if second_len is None else second_len.reshape(1)
    if first_len is None:
        first_len = (first != pad_id).sum(dim=-1)
    if second_len is None:
        second_len = (second != pad_id).sum(dim=-1)
    _check_lengths("first_len", first_len, first)
    _check_lengths("second_len", second_len, second)

    rows = first.shape[0]
    width = max(first.shape[1], second.shape[1], 1)
    first, second = _pad_to(first, width, pad_id), _pad_to(second, width, pad_id)
    # One threefry draw: word 0 decides the label (P = 1/2 exactly), word 1 the nsp source.
    words = jr.bits(key, (2, rows), torch.int64)
    label = words[0] < 2**31
    if mode == "sop":
        flip = label[:, None]
        seg_a, seg_b = torch.where(flip, second, first), torch.where(flip, first, second)
        len_a = torch.where(label, second_len, first_len)
        len_b = torch.where(label, first_len, second_len)
    else:
        offset = 1 + ((words[1] * (rows - 1)) >> 32)  # uniform in {1, ..., rows - 1}
        source = (torch.arange(rows, device=first.device) + offset) % rows
        seg_a, len_a = first, first_len
        seg_b = torch.where(label[:, None], second.index_select(0, source), second)
        len_b = torch.where(label, second_len.index_select(0, source), second_len)

    len_a, len_b = truncate_lengths(len_a, len_b, max_len - 3)
    out = _layout(seg_a, seg_b, len_a, len_b, cls_id, sep_id, pad_id, max_len)
    out["next_sentence_label"] = label.to(torch.int64)
    out["labels"] = out["next_sentence_label"]  # the old name, until 0.2 (docs/deprecation.md)
    if unbatched:
        out = {k: v[0] for k, v in out.items()}
    return out


def truncate_lengths(len_a: Tensor, len_b: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Lengths after longest-first truncation of a pair to ``budget`` tokens in total.

    Closed form of the loop "while too long, drop one token from the longer segment, B on a
    tie" used by BERT's ``truncate_seq_pair`` and Hugging Face ``longest_first``.

    Example:
        >>> import torch
        >>> from fnllm.data import truncate_lengths
        >>> truncate_lengths(torch.tensor([10, 3, 5, 2]), torch.tensor([3, 10, 5, 2]), 7)
        (tensor([4, 3, 4, 2]), tensor([3, 4, 3, 2]))

    Args:
        len_a: integer tensor of first-segment lengths.
        len_b: integer tensor of second-segment lengths, same shape.
        budget: the most tokens the two segments may keep together.

    Returns:
        ``(new_len_a, new_len_b)`` with ``new_len_a + new_len_b <= budget``.
    """
    _checks.check_int("budget", budget, low=0)
    over = (len_a + len_b) > budget
    # The loop ends with the shorter segment intact if it fits in half the budget (rounded
    # so that A keeps the extra token on an odd budget, since ties shorten B first).
    keep_a = torch.minimum(len_a, torch.clamp(budget - len_b, min=(budget + 1) // 2))
    new_a = torch.where(over, keep_a, len_a)
    new_b = torch.where(over, budget - keep_a, len_b)
    return new_a, new_b


def pad_sequences(
    sequences: Sequence[Sequence[int]] | Sequence[Tensor],
    pad_id: int,
    *,
    width: int | None = None,
    dtype: torch.dtype = torch.int64,
) -> tuple[Tensor, Tensor]:
    """Right-pad a list of id lists into a ``[N, width]`` tensor plus the ``[N]`` lengths.

    Example:
        >>> from fnllm.data import pad_sequences
        >>> pad_sequences([[5, 6, 7], [8]], pad_id=0)
        (tensor([[5, 6, 7],
                [8, 0, 0]]), tensor([3, 1]))

    Args:
        sequences: id lists (or 1-D tensors).
        pad_id: the padding id.
        width: output width; default the longest sequence (at least 1). Longer sequences
            raise.
        dtype: integer dtype of the output ids.

    Returns:
        ``(ids, lengths)``: ``ids[i, :lengths[i]]`` is ``sequences[i]``, the rest ``pad_id``.
    """
    _checks.check_int("pad_id", pad_id)
    if isinstance(sequences, (str, bytes)):
        raise TypeError("sequences: expected a list of id lists, got a string")
    seqs = [s.tolist() if isinstance(s, Tensor) else list(s) for s in sequences]
    for i, s in enumerate(seqs):
        if any(isinstance(t, bool) or not isinstance(t, int) for t in s):
            bad = next(t for t in s if isinstance(t, bool) or not isinstance(t, int))
            raise TypeError(f"sequences[{i}]: expected integer ids, got {bad!r}")
    lengths = [len(s) for s in seqs]
    longest = max(lengths, default=0)
    if width is None:
        width = max(longest, 1)
    elif longest > width:
        raise ValueError(f"sequences: length {longest} > width {width}")
    ids = torch.full((len(seqs), width), pad_id, dtype=dtype)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=dtype)
    return ids, torch.tensor(lengths, dtype=torch.int64)


def _check_pair_args(
    first: Tensor,
    second: Tensor,
    mode: str,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_len: int,
) -> bool:
    """Validate the static arguments; return whether the inputs are one unbatched row."""
    _checks.check_int_tensor("first", first)
    _checks.check_int_tensor("second", second)
    for name, value in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id)):
        _checks.check_int(name, value, low=0)
    _checks.check_int("max_len", max_len)
    if max_len < 3:
        raise ValueError(f"max_len: {max_len} < 3, too small for [CLS] A [SEP] B [SEP]")
    if mode not in _MODES:
        raise ValueError(f"mode: {mode!r} is not one of {_MODES}")
    if first.ndim != second.ndim or first.ndim > 2:
        raise ValueError(
            f"first, second: expected both [B, L] or both [L], got shapes "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    if first.ndim == 2 and first.shape[0] != second.shape[0]:
        raise ValueError(
            f"first, second: batch sizes differ ({first.shape[0]} != {second.shape[0]})"
        )
    rows = 1 if first.ndim == 1 else first.shape[0]
    if mode == "nsp" and rows < 2:
        raise ValueError(f"mode 'nsp': needs at least 2 rows to draw another segment, got {rows}")
    return first.ndim == 1


def _check_lengths(name: str, lengths: Tensor, ids: Tensor) -> None:
    """Lengths must be integer ``[B]`` within ``[0, ids.shape[1]]`` (values checked eagerly)."""
    _checks.check_int_tensor(name, lengths)
    if lengths.shape != ids.shape[:1]:
        raise ValueError(f"{name}: shape {tuple(lengths.shape)} != ({ids.shape[0]},)")
    if _checks.tracing(lengths) or lengths.numel() == 0:
        return
    bad = (lengths < 1) | (lengths > ids.shape[1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if int(lengths[i]) == 0:
            raise ValueError(f"{name}: row {i} is an empty segment (length 0); expected >= 1 id")
        raise ValueError(f"{name}: {int(lengths[i])} at [{i}] outside [1, {ids.shape[1]}]")


def _pad_to(ids: Tensor, width: int, pad_id: int) -> Tensor:
    """Right-pad ``[B, L]`` ids with ``pad_id`` to ``[B, width]``."""
    if ids.shape[1] == width:
        return ids
    fill = torch.full((ids.shape[0], width - ids.shape[1]), pad_id, dtype=ids.dtype)
    return torch.cat([ids, fill.to(ids.device)], dim=1)


def _layout(
    seg_a: Tensor,
    seg_b: Tensor,
    len_a: Tensor,
    len_b: Tensor,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_len: int,
) -> dict[str, Tensor]:
    """Place ``[CLS] A[:len_a] [SEP] B[:len_b] [SEP] pad...`` with gathers, per row."""
    width = seg_a.shape[1]
    p = torch.arange(max_len, device=seg_a.device)[None, :]
    la, lb = len_a[:, None], len_b[:, None]
    pos_a = p - 1
    pos_b = p - la - 2
    in_a = (pos_a >= 0) & (pos_a < la)
    in_b = (pos_b >= 0) & (pos_b < lb)
    sep = (p == la + 1) | (p == la + lb + 2)
    end = la + lb + 3
    a_ids = torch.gather(seg_a, 1, pos_a.clamp(0, width - 1).expand(seg_a.shape[0], -1))
    b_ids = torch.gather(seg_b, 1, pos_b.clamp(0, width - 1))
    ids = torch.where(in_a, a_ids, torch.where(in_b, b_ids, pad_id))
    ids = torch.where(sep, sep_id, torch.where(p == 0, cls_id, ids))
    attention = p < end
    token_type = (p >= la + 2) & attention
    return {
        "input_ids": ids,
        "token_type_ids": token_type.to(torch.int64),
        "attention_mask": attention.to(torch.int64),
    }
