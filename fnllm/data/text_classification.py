"""Text classification data: ``(text, label)`` files, tokenised, split and batched by length.

- :func:`read_labelled`: texts and class ids from a CSV or JSONL file (columns by name).
- :func:`encode_texts`: a ``tokenizers`` tokenizer's ids, truncated to ``max_len`` with a warning.
- :func:`stratified_split`: train/validation/test indices from a key, each class split alike.
- :func:`length_batches`: padded batches of similar lengths (little padding), order from a key.
- :func:`load_vader`: the VADER study's 10,605 human-rated movie-review sentences.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks
from fnllm import random as jr
from fnllm.data._jsonl import json_objects
from fnllm.data.corpus import load_tokenizer
from fnllm.data.pairs import pad_sequences

__all__ = ["encode_texts", "length_batches", "read_labelled", "stratified_split"]


def read_labelled(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], Tensor, list[Any]]:
    """Read ``(text, label)`` rows from a ``.csv`` (with a header) or ``.jsonl`` file.

    Labels may be integers or strings; they become class ids ``0 .. C-1`` in sorted order.

    Example:
        >>> import os, tempfile
        >>> from fnllm.data import read_labelled
        >>> path = os.path.join(tempfile.mkdtemp(), "reviews.csv")
        >>> _ = open(path, "w").write("review,stars\\ngreat,pos\\nawful,neg\\nfine,pos\\n")
        >>> texts, labels, classes = read_labelled(path, "review", "stars")
        >>> texts, labels, classes
        (['great', 'awful', 'fine'], tensor([1, 0, 1]), ['neg', 'pos'])

    Args:
        path: a ``.csv`` or ``.jsonl`` file.
        text_column: the text field's name.
        label_column: the label field's name.

    Returns:
        ``(texts, labels [N] int64, classes)``: ``classes[labels[i]]`` is row ``i``'s label.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, a missing column (the message lists the present
            ones), no rows, a single class (with its count), or a row with the wrong number
            of fields, an empty text, an empty label
            or bytes that are not UTF-8 (the message names ``path:line``).
        TypeError: a label that is neither an integer nor a string.

    CSV files follow Python's :mod:`csv` rules (RFC 4180): a field holding a comma, a quote
    or a line break must be quoted (``"great, really",pos``); a row with more or fewer fields
    than the header is an error, not a shifted label. Labels are stripped of surrounding
    spaces, and ``"1"``/``1`` both read as the integer 1.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_labelled: path must be a str or os.PathLike, got {path!r:.60}")
    for name, col in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(col, str) or not col:
            raise TypeError(f"read_labelled: {name} must be a non-empty str, got {col!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_labelled: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text_column, label_column)
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, obj in json_objects(path):
            _check_columns(path, list(obj), text_column, label_column, line=n)
            rows.append((f"{path}:{n} row {len(rows) + 1}", obj[text_column], obj[label_column]))
    else:
        raise ValueError(f"read_labelled: {path} must end in .csv or .jsonl, not {suffix!r}")
    if not rows:
        raise ValueError(f"read_labelled: {path} has no rows")
    for where, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"read_labelled: {where}: empty or non-text {text_column} {text!r}")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise TypeError(
                f"read_labelled: {where}: label {label!r} is neither an integer nor a string"
            )
        if isinstance(label, str) and not label.strip():
            raise ValueError(f"read_labelled: {where}: empty label ({label_column} {label!r})")
    pairs = [(text, label.strip() if isinstance(label, str) else label) for _, text, label in rows]
    kinds = {type(label) for _, label in pairs}
    if len(kinds) > 1:
        raise TypeError(f"read_labelled: {path} mixes integer and string labels")
    counts = Counter(label for _, label in pairs)
    classes = sorted(counts)
    if len(classes) < 2:
        raise ValueError(
            f"read_labelled: {path} has a single class {classes[0]!r} ({len(pairs)} rows); "
            "a classifier needs two"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[label] for _, label in pairs], dtype=torch.int64)
    return [t for t, _ in pairs], labels, classes


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), at most ``max_len`` each.

    Longer texts are truncated (keeping the special tokens) and a warning says how many.

    Example:
        >>> from fnllm.data import default_documents, encode_texts, train_tokenizer
        >>> tok = train_tokenizer(default_documents(), "wordpiece", vocab_size=300)
        >>> ids = encode_texts(tok, ["a river", "the river ran on and on"], max_len=3)
        >>> [len(x) for x in ids]
        [2, 3]

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, a ``tokenizer.json`` path or a directory
            holding one (see :func:`fnllm.data.load_tokenizer`).
        texts: the texts.
        max_len: the longest id list (the model's ``max_len`` or less).

    Returns:
        One id list per text.

    Raises:
        ValueError: ``max_len`` < 2.
        TypeError: ``texts`` is one string (it would be read as a list of characters) or
            holds a non-string (the message names its index); ``max_len`` is not an int.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"encode_texts: max_len must be an int >= 2, got {max_len!r}")
    if max_len < 2:
        raise ValueError(f"encode_texts: max_len must be an int >= 2, got {max_len!r}")
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"encode_texts: texts must be a list of strings, got one {type(texts).__name__} "
            f"{texts[:30]!r} (wrap it: [text])"
        )
    if not isinstance(texts, Iterable):
        raise TypeError(
            f"encode_texts: texts must be a list of strings, got {type(texts).__name__}"
        )
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode_texts: texts[{i}] is a {type(t).__name__}, not a str")
    tok = load_tokenizer(tokenizer)
    tok.enable_truncation(max_len)
    encodings = tok.encode_batch(texts)
    cut = sum(1 for e in encodings if e.overflowing)
    if cut:
        warnings.warn(
            f"encode_texts: {cut} of {len(encodings)} texts were longer than max_len "
            f"{max_len} tokens and were truncated",
            stacklevel=2,
        )
    return [e.ids for e in encodings]


def stratified_split(
    key: Tensor, labels: Tensor, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[Tensor, ...]:
    """Shuffle each class with ``key`` and cut it by ``fractions``: train/validation/test indices.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.data import stratified_split
        >>> labels = torch.tensor([0] * 10 + [1] * 10)
        >>> train, val, test = stratified_split(random.key(0), labels, (0.6, 0.2, 0.2))
        >>> [int((labels[i] == 1).sum()) for i in (train, val, test)]
        [6, 2, 2]

    Args:
        key: a ``fnllm.random`` key.
        labels: ``[N]`` class ids.
        fractions: positive parts summing to 1 (any number of them).

    Returns:
        One sorted int64 index tensor per fraction; together they cover ``0 .. N-1`` once.

    Raises:
        ValueError: fractions not positive and finite or not summing to 1; labels not
            ``[N]`` ints.

    Warns:
        UserWarning: a part comes out empty (too few labels for the fractions); the sizes
            are named.
        TypeError: labels not a tensor (a list or numpy array is accepted and converted),
            bool or string labels, or fractions that are not a sequence of numbers.
    """
    readable = isinstance(labels, (Tensor, Sequence)) or hasattr(labels, "__array__")
    if isinstance(labels, (str, bytes)) or not readable:
        raise TypeError(
            f"stratified_split: labels must be an int [N] tensor, got {type(labels).__name__}"
        )
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"stratified_split: labels must be int class ids (map names to ids first, as "
                f"read_labelled does), got {type(labels).__name__} that torch cannot read: {err}"
            ) from None
    if labels.dtype == torch.bool:
        raise TypeError("stratified_split: labels must be int class ids, got a bool tensor")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
        raise TypeError(f"stratified_split: fractions must be a sequence, got {fractions!r}")
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fractions):
        raise TypeError(f"stratified_split: fractions must be numbers, got {fractions!r}")
    if (
        not fractions
        or not all(math.isfinite(f) and f > 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"stratified_split: fractions must be positive and finite and sum to 1, got {fractions}"
        )
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"stratified_split: labels must be [N] ints, got {labels.dtype} {tuple(labels.shape)}"
        )
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero()[:, 0]
        # ids outside fold_in's [0, 2**32) keep their low 32 bits (any id splits)
        members = members[_shuffle(jr.fold_in(key, c % 2**32), members.numel())]
        bounds = torch.tensor([0.0, *fractions]).cumsum(0) * members.numel()
        cuts = bounds.round().long().tolist()
        for i in range(len(fractions)):
            parts[i].append(members[cuts[i] : cuts[i + 1]])
    out = tuple(torch.cat(p).sort().values if p else labels.new_zeros(0) for p in parts)
    empty = [i for i, p in enumerate(out) if p.numel() == 0]
    if empty:
        warnings.warn(
            f"stratified_split: fractions {tuple(fractions)} of {labels.numel()} labels leave "
            f"part {empty[0]} empty (sizes {[p.numel() for p in out]}); use more examples or "
            "larger fractions",
            stacklevel=2,
        )
    return out


def length_batches(
    ids: Sequence[Sequence[int]],
    labels: Tensor,
    batch_size: int,
    *,
    pad_id: int = 0,
    key: Tensor | None = None,
    bucket: int | Sequence[int] | None = 16,
) -> list[dict[str, Tensor]]:
    """Padded batches of examples of similar length; ``key`` shuffles the batch order.

    Sorting by length keeps padding (wasted compute) small. Each batch is padded up to a
    *bucket* width, so a compiled step (``torch.compile``, ``train.make_step(compile=True)``)
    sees only a few shapes and compiles once per bucket rather than once per length. The default
    rounds up to a multiple of 16 tokens (never past the longest example), which wastes at most
    15 pad tokens per row; ``bucket=None`` pads each batch to its own longest example (best for
    eager runs of very short texts). Padding is masked, so the model's outputs do not change.

    Example:
        >>> import torch
        >>> from fnllm.data import length_batches
        >>> ids = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
        >>> batches = length_batches(ids, torch.tensor([0, 1, 0, 1]), 2, bucket=None)
        >>> [b["input_ids"].shape[1] for b in batches], batches[0]["index"]
        ([2, 4], tensor([1, 2]))
        >>> ids = [list(range(1, n + 1)) for n in (3, 5, 9, 17, 20, 33)]
        >>> batches = length_batches(ids, torch.zeros(6, dtype=torch.long), 1, bucket=8)
        >>> [b["input_ids"].shape[1] for b in batches]
        [8, 8, 16, 24, 24, 33]

    Args:
        ids: token id lists.
        labels: ``[N]`` class ids.
        batch_size: examples per batch (the last may be smaller).
        pad_id: the padding id.
        key: a ``fnllm.random`` key to shuffle the batch order (and ties); ``None``: by length.
        bucket: the padded widths. An int ``m``: round each batch's longest length up to a
            multiple of ``m``; a list of widths: the smallest one that fits (longer batches keep
            their own length); ``None`` or ``1``: no bucketing. Widths never exceed the longest
            example in ``ids``, so they stay within the ``max_len`` the ids were cut to.

    Returns:
        A list of ``{"input_ids", "attention_mask", "labels", "index"}`` dicts; ``index`` holds
        the rows' positions in ``ids``.

    Raises:
        ValueError: ``batch_size`` < 1, ``labels`` does not match ``ids``, no examples, an
            empty id list (named by index), or a ``bucket`` that is not a positive int or a
            list of them.
        TypeError: ``batch_size`` is not an int, ``ids`` is a string or ``labels`` not a
            tensor (a list is converted).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"length_batches: batch_size must be an int >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"length_batches: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"length_batches: ids must be a list of id lists, got {ids!r:.40}")
    if isinstance(labels, (list, tuple)):
        labels = torch.as_tensor(labels)
    if not isinstance(labels, Tensor):
        raise TypeError(f"length_batches: labels must be a tensor, got {type(labels).__name__}")
    if not ids:
        raise ValueError("length_batches: no examples (ids is empty)")
    empty = [i for i, s in enumerate(ids) if len(s) == 0]
    if empty:
        raise ValueError(f"length_batches: ids[{empty[0]}] is empty (a row needs a token)")
    if labels.shape != (len(ids),):
        raise ValueError(f"length_batches: labels shape {tuple(labels.shape)} != [{len(ids)}]")
    widths = _bucket_widths(bucket)
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.float64)
    longest = max((len(s) for s in ids), default=1)
    if key is not None:  # random tie-breaking among equal lengths
        k_ties, key = jr.split(key)
        lengths = lengths + jr.uniform(k_ties, (len(ids),), torch.float64) * 0.5
    order = torch.argsort(lengths, stable=True)
    chunks = list(order.split(batch_size))
    if key is not None:
        chunks = [chunks[i] for i in jr.permutation(key, len(chunks)).tolist()]
    out = []
    for index in chunks:
        rows = [ids[i] for i in index.tolist()]
        width = _bucket_width(max(len(r) for r in rows), widths, longest)
        x, n = pad_sequences(rows, pad_id, width=width)
        mask = (torch.arange(x.shape[1]) < n[:, None]).long()
        negative = ((x < 0) & (mask > 0)).any(-1)
        if bool(negative.any()):
            i = int(index[int(negative.nonzero()[0])])
            raise ValueError(f"length_batches: ids[{i}] holds a negative token id {ids[i]!r:.60}")
        out.append(
            {"input_ids": x, "attention_mask": mask, "labels": labels[index], "index": index}
        )
    return out


def _check_columns(
    path: Path, present: list[str], text: str, label: str, line: int | None = None
) -> None:
    missing = [c for c in (text, label) if c not in present]
    if missing:
        where = f"{path}" + (f":{line}" if line else "")
        raise ValueError(
            f"read_labelled: {where} has no column {missing[0]!r} (columns: {present}); "
            "choose them with --text-column/--label-column"
        )


def _read_csv(path: Path, text_column: str, label_column: str) -> list[tuple[str, Any, Any]]:
    """``(path:line, text, label)`` per row, with the csv module's quoting rules, every row
    checked to have the header's number of fields."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"read_labelled: {path}:{line}: bytes that are not UTF-8 ({err.reason} at byte "
            f"{err.start}); re-save the file as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValueError(
            f"read_labelled: {path}:{line}: a NUL byte (a UTF-16 or binary file?); re-save the "
            "file as UTF-8 text"
        )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, Any, Any]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"read_labelled: {path} is empty (no header row)")
        _check_columns(path, header, text_column, label_column, line=1)
        for col in (text_column, label_column):
            if header.count(col) > 1:
                raise ValueError(
                    f"read_labelled: {path}:1: the header names column {col!r} "
                    f"{header.count(col)} times; rename the others"
                )
        t, lab = header.index(text_column), header.index(label_column)
        start = reader.line_num
        for fields in reader:
            where = f"{path}:{start + 1}"  # the line the row starts on
            start = reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"read_labelled: {where} row {len(rows) + 1}: {len(fields)} fields where "
                    f"the header has {len(header)} ({_checks.few(header, 4)}); quote a text "
                    'holding a comma or a quote: "great, really",pos'
                )
            rows.append((f"{where} row {len(rows) + 1}", fields[t], _csv_label(fields[lab])))
    except csv.Error as err:
        raise ValueError(f"read_labelled: {path}:{reader.line_num}: bad CSV ({err})") from None
    return rows


def _csv_label(value: str | None) -> Any:
    if value is None:
        return None
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        return text


def _bucket_widths(bucket: int | Sequence[int] | None) -> int | list[int] | None:
    if bucket is None:
        return None
    if isinstance(bucket, int) and not isinstance(bucket, bool):
        if bucket < 1:
            raise ValueError(f"length_batches: bucket must be >= 1, got {bucket}")
        return None if bucket == 1 else bucket
    ok = isinstance(bucket, Sequence) and not isinstance(bucket, str) and bucket
    if (
        ok
        and isinstance(bucket, Sequence)
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in bucket)
    ):
        return sorted(bucket)
    raise ValueError(
        f"length_batches: bucket must be None, an int >= 1 or a list of widths >= 1, got {bucket!r}"
    )


def _bucket_width(length: int, widths: int | list[int] | None, longest: int) -> int:
    """The padded width of a batch whose longest row has ``length`` ids."""
    length = max(length, 1)
    if widths is None:
        return length
    if isinstance(widths, int):
        width = -(-length // widths) * widths
    else:
        width = next((w for w in widths if w >= length), length)
    return max(length, min(width, longest))


# Below fnllm.random's compiled-kernel threshold (4096 values): a cold compile of the sampling
# core costs ~25 s, far more than hashing a few thousand sort keys with plain ops.
_SHUFFLE_BLOCK = 4000


def _shuffle(key: Tensor, n: int) -> Tensor:
    """A uniformly random permutation of ``0 .. n-1``: argsort of 64-bit keys, drawn in blocks."""
    if n < _SHUFFLE_BLOCK:
        return jr.permutation(key, n)
    blocks = []
    for j, start in enumerate(range(0, n, _SHUFFLE_BLOCK)):
        hi, lo = jr.split(jr.fold_in(key, j))
        m = min(_SHUFFLE_BLOCK, n - start)
        blocks.append((jr.bits(hi, (m,), torch.int64) << 32) | jr.bits(lo, (m,), torch.int64))
    return torch.argsort(torch.cat(blocks), stable=True)
