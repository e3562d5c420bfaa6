"""Deterministic, resumable loaders over a :class:`~fnllm.data.Corpus` or labelled batches.

:func:`gpt_batches` and :func:`bert_batches` return :class:`Batches`: the batch at step ``s``
of epoch ``e`` is a pure function of ``(key, e, s)`` (the epoch order comes from
``fold_in(key, e)``, the step's masking key from ``fold_in(..., s)``), so training resumes
exactly from a step number. :func:`epochs` chains epochs into one stream, from such a loader
or from a list of ready batches (labelled data from :func:`~fnllm.data.length_batches`),
reshuffled per epoch by a key.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fnllm import _checks
from fnllm import random as jr
from fnllm.data.causal import pack
from fnllm.data.corpus import Corpus
from fnllm.data.pairs import pad_sequences
from fnllm.data.pretraining import bert_pretraining_batch

__all__ = ["Batches", "Epochs", "bert_batches", "epochs", "gpt_batches"]


@dataclass(frozen=True)
class Batches:
    """Deterministic, resumable batches: ``batch(step)`` depends only on the loader's key,
    epoch and ``step``; iterating yields steps ``start_step, ..., num_steps - 1``.

    Example:
        >>> from fnllm import random
        >>> from fnllm.data import Corpus, gpt_batches
        >>> loader = gpt_batches(Corpus(kind="bpe", vocab_size=300), random.key(0),
        ...                      batch_size=2, block_size=16, start_step=3)
        >>> len(loader), loader.num_steps
        (41, 44)
        >>> first = next(iter(loader))
        >>> bool((first["input_ids"] == loader.batch(3)["input_ids"]).all())
        True

    Attributes:
        make: ``step -> batch dict``.
        num_steps: steps per epoch.
        start_step: first step yielded by iteration.
    """

    make: Callable[[int], dict[str, Tensor]]
    num_steps: int
    start_step: int = 0

    def batch(self, step: int) -> dict[str, Tensor]:
        """The batch at ``step`` (0 <= step < num_steps)."""
        _checks.check_int("step", step, low=0)
        if step >= self.num_steps:
            raise ValueError(f"step: {step} >= num_steps {self.num_steps}")
        return self.make(step)

    def __len__(self) -> int:
        return max(self.num_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for step in range(self.start_step, self.num_steps):
            yield self.make(step)


@dataclass(frozen=True)
class Epochs:
    """Batches over several epochs, addressed by a global step (see :func:`epochs`).

    Global step ``s`` is step ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so a
    run resumes exactly from a step number whatever epoch it falls in.

    Example:
        >>> from fnllm import random
        >>> from fnllm.data import Corpus, epochs, gpt_batches
        >>> corpus, key = Corpus(kind="bpe", vocab_size=300), random.key(0)
        >>> stream = epochs(lambda e: gpt_batches(corpus, key, batch_size=8, block_size=32,
        ...                                       epoch=e), num_epochs=2)
        >>> stream.steps_per_epoch, len(stream)
        (5, 10)
        >>> stream.epoch_of(7)
        (1, 2)

    Attributes:
        loader: ``epoch -> Batches``.
        steps_per_epoch: steps in every epoch.
        num_epochs: how many epochs iteration covers (``None``: endless).
        start_step: first global step iteration yields.
    """

    loader: Callable[[int], Batches]
    steps_per_epoch: int
    num_epochs: int | None = None
    start_step: int = 0
    _current: dict[int, Batches] = field(default_factory=dict, compare=False, repr=False)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """``(epoch, step within the epoch)`` of a global step."""
        _checks.check_int("step", step, low=0)
        if self.num_epochs is not None and step >= self.num_epochs * self.steps_per_epoch:
            raise ValueError(
                f"step: {step} >= {self.num_epochs} epochs x {self.steps_per_epoch} steps"
            )
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int) -> dict[str, Tensor]:
        """The batch at global ``step`` (the epoch's loader is built once, then reused)."""
        epoch, i = self.epoch_of(step)
        loader = self._current.get(epoch)
        if loader is None:
            loader = _epoch_loader(self.loader, epoch, self.steps_per_epoch)
            self._current.clear()  # keep one epoch's loader alive, not all of them
            self._current[epoch] = loader
        return loader.batch(i)

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("len() of endless Epochs (num_epochs=None)")
        return max(self.num_epochs * self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        end = None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch
        steps = itertools.count(self.start_step) if end is None else range(self.start_step, end)
        for step in steps:
            yield self.batch(step)


def epochs(
    loader: Callable[[int], Batches] | Sequence[Any],
    *,
    key: Tensor | None = None,
    num_epochs: int | None = None,
    start_step: int = 0,
) -> Epochs:
    """Chain epochs into one stream addressed by the global step (what ``train.fit`` takes).

    Two sources:

    - a loader ``epoch -> Batches`` (:func:`gpt_batches`, :func:`bert_batches` with
      ``epoch=epoch``), which shuffles each epoch itself;
    - a list of ready batches, e.g. the labelled batches of
      :func:`~fnllm.data.length_batches`, with ``key``: epoch ``e`` visits every batch once,
      in the order ``random.permutation(fold_in(key, e), len(batches))``. The batches keep
      their rows (and their length buckets); only their order changes from epoch to epoch.

    Either way the batch of global step ``s`` depends only on ``(key, s)``, so a run resumes
    exactly from a step number, mid-epoch included.

    Example:
        >>> import torch
        >>> from fnllm import random
        >>> from fnllm.data import epochs, length_batches
        >>> ids = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
        >>> batches = length_batches(ids, torch.tensor([0, 1, 0, 1, 1]), 2, bucket=None)
        >>> stream = epochs(batches, key=random.key(0), num_epochs=3)
        >>> stream.steps_per_epoch, len(stream)
        (3, 9)
        >>> seen = [stream.batch(s)["index"].tolist() for s in range(3)]   # epoch 0
        >>> sorted(i for rows in seen for i in rows)                        # every row once
        [0, 1, 2, 3, 4]
        >>> from fnllm.data import Corpus, gpt_batches
        >>> corpus, key = Corpus(kind="bpe", vocab_size=300), random.key(0)
        >>> stream = epochs(lambda e: gpt_batches(corpus, key, batch_size=8, block_size=32,
        ...                                       epoch=e))
        >>> same = gpt_batches(corpus, key, batch_size=8, block_size=32, epoch=1).batch(0)
        >>> bool((stream.batch(stream.steps_per_epoch)["input_ids"] == same["input_ids"]).all())
        True

    Args:
        loader: ``epoch -> Batches`` (every epoch must have the same number of steps), or a
            list/tuple of batches (any objects, typically dicts of tensors).
        key: a ``fnllm.random`` key for the per-epoch order of a list of batches (required
            with a list; not taken with a loader, which has its own).
        num_epochs: epochs to iterate over (``None``: iterate without end).
        start_step: the global step iteration starts from (resume point).

    Returns:
        An :class:`Epochs`.

    Raises:
        TypeError: ``loader`` is neither callable nor a list of batches, a loader that does not
            return :class:`Batches`, ``key`` missing with a list or given with a loader.
        ValueError: an empty list of batches, a count that is not a non-negative int
            (``num_epochs`` >= 1).
    """
    if num_epochs is not None:
        _checks.check_int("epochs: num_epochs", num_epochs, low=1)
    _checks.check_int("epochs: start_step", start_step, low=0)
    if isinstance(loader, Sequence) and not isinstance(loader, (str, bytes, Mapping)):
        loader = _shuffled_epochs(loader, key)
    elif not callable(loader):
        raise TypeError(
            "epochs: loader must be a function epoch -> Batches or a list of batches, got "
            f"{type(loader).__name__}"
        )
    elif key is not None:
        raise TypeError(
            "epochs: key= is for a list of batches; a loader shuffles each epoch with its own "
            "key (e.g. gpt_batches(corpus, key, ..., epoch=e))"
        )
    first = _epoch_loader(loader, 0, None)
    return Epochs(loader, first.num_steps, num_epochs, start_step)


def gpt_batches(
    corpus: Corpus,
    key: Tensor,
    *,
    batch_size: int,
    block_size: int,
    epoch: int = 0,
    start_step: int = 0,
) -> Batches:
    """Causal-LM batches: documents packed into blocks, shuffled per epoch by the key.

    The corpus is packed (each document followed by EOS) into non-overlapping windows of
    ``block_size + 1`` tokens; a window gives ``input_ids = w[:-1]`` and ``targets = w[1:]``,
    so every position has a target (targets aligned with the logits, as in
    :func:`~fnllm.data.causal_targets`). The last partial window and the last partial batch
    are dropped.

    Example:
        >>> from fnllm import random
        >>> from fnllm.data import Corpus, gpt_batches
        >>> corpus = Corpus(kind="bpe", vocab_size=300)
        >>> batch = gpt_batches(corpus, random.key(0), batch_size=4, block_size=32).batch(0)
        >>> batch["input_ids"].shape
        torch.Size([4, 32])
        >>> bool((batch["input_ids"][:, 1:] == batch["targets"][:, :-1]).all())
        True

    Args:
        corpus: a :class:`Corpus`.
        key: a ``fnllm.random`` key.
        batch_size: windows per batch.
        block_size: tokens per window of inputs.
        epoch: the epoch; each epoch has its own order (``fold_in(key, epoch)``).
        start_step: first step the iterator yields (resume point).

    Returns:
        :class:`Batches` of dicts with ``input_ids`` and ``targets``, int64 ``[B, T]``.
    """
    _check_loader_args(batch_size, epoch, start_step)
    _checks.check_int("block_size", block_size, low=1)
    windows = pack(corpus.documents, block_size + 1, corpus.eos_id)
    order, _ = _epoch_keys(key, epoch, windows.shape[0])
    num_steps = windows.shape[0] // batch_size
    if num_steps == 0:
        raise ValueError(
            f"batch_size: {batch_size} > the {windows.shape[0]} blocks of {block_size + 1} "
            "tokens in the corpus"
        )

    def make(step: int) -> dict[str, Tensor]:
        w = windows[order[step * batch_size : (step + 1) * batch_size]]
        return {"input_ids": w[:, :-1], "targets": w[:, 1:]}

    return Batches(make, num_steps, start_step)


def bert_batches(
    corpus: Corpus,
    key: Tensor,
    *,
    batch_size: int,
    max_len: int = 128,
    mode: str = "sop",
    epoch: int = 0,
    start_step: int = 0,
    prob: float = 0.15,
    whole_word: bool = False,
    exact: bool = False,
) -> Batches:
    """BERT pretraining batches: segment pairs (sop or nsp) plus MLM masking, per step.

    Pairs come from :meth:`Corpus.segment_pairs` with segments of ``(max_len - 3) // 2``
    tokens; the epoch order is drawn from ``fold_in(key, epoch)`` and step ``s`` is built by
    :func:`bert_pretraining_batch` with a key derived from ``(key, epoch, s)``.

    Example:
        >>> from fnllm import random
        >>> from fnllm.data import Corpus, bert_batches
        >>> loader = bert_batches(Corpus(vocab_size=300), random.key(0), batch_size=4,
        ...                       max_len=32)
        >>> batch = loader.batch(0)
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'labels', 'next_sentence_label', 'token_type_ids']
        >>> batch["input_ids"].shape
        torch.Size([4, 32])

    Args:
        corpus: a WordPiece :class:`Corpus` (it needs ``[CLS]``, ``[SEP]``, ``[PAD]``,
            ``[MASK]``).
        key: a ``fnllm.random`` key.
        batch_size: pairs per batch.
        max_len: sequence length.
        mode: ``"sop"`` or ``"nsp"`` (see :func:`~fnllm.data.sentence_pairs`).
        epoch: the epoch.
        start_step: first step the iterator yields.
        prob: MLM pick probability.
        whole_word: mask whole words (``##`` continuations follow their word start).
        exact: exact-count MLM picking (see :func:`~fnllm.data.mlm_mask`).

    Returns:
        :class:`Batches` of :func:`bert_pretraining_batch` dicts.
    """
    _check_loader_args(batch_size, epoch, start_step)
    _checks.check_int("max_len", max_len, low=5)
    width = max_len - 3
    pairs = corpus.segment_pairs(max(width // 2, 1))
    num_steps = len(pairs) // batch_size
    if num_steps == 0:
        raise ValueError(f"batch_size: {batch_size} > the {len(pairs)} segment pairs in the corpus")
    first, first_len = pad_sequences([a[:width] for a, _ in pairs], corpus.pad_id, width=width)
    second, second_len = pad_sequences([b[:width] for _, b in pairs], corpus.pad_id, width=width)
    order, step_key = _epoch_keys(key, epoch, len(pairs))
    options = {
        "mode": mode,
        "cls_id": corpus.cls_id,
        "sep_id": corpus.sep_id,
        "pad_id": corpus.pad_id,
        "mask_id": corpus.mask_id,
        "vocab_size": corpus.vocab_size,
        "special_ids": corpus.special_ids,
        "max_len": max_len,
        "prob": prob,
        "exact": exact,
        "word_start_table": corpus.word_start_table() if whole_word else None,
    }

    def make(step: int) -> dict[str, Tensor]:
        rows = order[step * batch_size : (step + 1) * batch_size]
        return bert_pretraining_batch(
            jr.fold_in(step_key, step),
            first[rows],
            second[rows],
            first_len=first_len[rows],
            second_len=second_len[rows],
            **options,
        )

    return Batches(make, num_steps, start_step)


# ----------------------------------------------------------------------------- helpers


def _check_loader_args(batch_size: int, epoch: int, start_step: int) -> None:
    _checks.check_int("batch_size", batch_size, low=1)
    _checks.check_int("epoch", epoch, low=0)
    _checks.check_int("start_step", start_step, low=0)


def _epoch_keys(key: Tensor, epoch: int, n: int) -> tuple[Tensor, Tensor]:
    """The epoch's example order (a permutation of ``n``) and the key for its steps."""
    k_order, k_steps = jr.split(jr.fold_in(key, epoch), 2)
    return jr.permutation(k_order, n), k_steps


@dataclass(frozen=True)
class _Shuffled:
    """``epoch -> Batches``: a fixed list of batches in the order ``fold_in(key, epoch)`` draws."""

    batches: tuple[Any, ...]
    key: Tensor

    def __call__(self, epoch: int) -> Batches:
        order = jr.permutation(jr.fold_in(self.key, epoch), len(self.batches)).tolist()
        return Batches(lambda i: self.batches[order[i]], len(self.batches))


def _shuffled_epochs(batches: Sequence[Any], key: Tensor | None) -> _Shuffled:
    if key is None:
        raise TypeError(
            "epochs: a list of batches needs key= (a fnllm.random key) for the per-epoch order"
        )
    if not isinstance(key, Tensor):
        raise TypeError(f"epochs: key must be a fnllm.random key tensor, got {type(key).__name__}")
    if len(batches) == 0:
        raise ValueError("epochs: the list of batches is empty")
    return _Shuffled(tuple(batches), key)


def _epoch_loader(loader: Callable[[int], Batches], epoch: int, steps: int | None) -> Batches:
    got = loader(epoch)
    if not isinstance(got, Batches):
        raise TypeError(f"loader: epoch {epoch} gave a {type(got).__name__}, expected Batches")
    if steps is not None and got.num_steps != steps:
        raise ValueError(
            f"loader: epoch {epoch} has {got.num_steps} steps, epoch 0 had {steps}; "
            "every epoch must have the same number"
        )
    return got
