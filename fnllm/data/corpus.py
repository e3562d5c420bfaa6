"""From text to batches: tokenizer glue, a tokenized ``Corpus`` and deterministic loaders.

- :func:`train_tokenizer` trains a small WordPiece (BERT) or byte-level BPE (GPT) tokenizer
  with Hugging Face ``tokenizers``; :func:`load_tokenizer` takes an existing one (a
  ``tokenizers.Tokenizer``, a ``tokenizer.json`` path or directory, or a ``transformers``
  fast tokenizer) and returns a private copy with padding and truncation switched off.
- :class:`Corpus` tokenizes documents once, whole (for GPT) and split into sentences (for
  BERT).
- :func:`gpt_batches` and :func:`bert_batches` return :class:`Batches`: the batch at step
  ``s`` of epoch ``e`` is a pure function of ``(key, e, s)`` (the epoch order comes from
  ``fold_in(key, e)``, the step's masking key from ``fold_in(..., s)``), so training resumes
  exactly from a step number.
- :func:`bert_pretraining_batch` composes :func:`~fnllm.data.sentence_pairs` and
  :func:`~fnllm.data.mlm_mask` in one pure function of a key.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks
from fnllm import random as jr
from fnllm.data.causal import pack
from fnllm.data.corpus_text import default_documents
from fnllm.data.masking import mlm_mask
from fnllm.data.pairs import pad_sequences, sentence_pairs

__all__ = [
    "Batches",
    "Corpus",
    "bert_batches",
    "bert_pretraining_batch",
    "gpt_batches",
    "load_tokenizer",
    "split_sentences",
    "train_tokenizer",
]

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_EOS = "<|endoftext|>"
_KINDS = ("wordpiece", "bpe")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+\S)")


def train_tokenizer(texts: Iterable[str], kind: str = "wordpiece", vocab_size: int = 1000) -> Any:
    """Train a small tokenizer on ``texts``: WordPiece (BERT-style) or byte-level BPE (GPT-style).

    Training is deterministic: the same texts give the same vocabulary and ids. (The
    ``tokenizers`` WordPiece trainer breaks ties in hash order, so the WordPiece vocabulary
    is derived from a deterministic BPE run instead: the learned pieces in merge order, each
    as a word start and, where it occurs inside words, as a ``##`` continuation, after the
    specials and the full alphabet in both forms.)

    Example:
        >>> from fnllm.data import default_documents, train_tokenizer
        >>> tok = train_tokenizer(default_documents(), "wordpiece", vocab_size=1000)
        >>> tok.encode("The river runs past the mill.").tokens
        ['the', 'river', 'runs', 'past', 'the', 'mill', '.']
        >>> [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
        [0, 1, 2, 3, 4]

    Args:
        texts: the training documents.
        kind: ``"wordpiece"`` (lower-cased, BERT pre-tokenizer, specials ``[PAD]`` 0,
            ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4) or ``"bpe"`` (byte-level like
            GPT-2, cased, special ``<|endoftext|>`` 0).
        vocab_size: the largest vocabulary to learn (a small corpus may give fewer).

    Returns:
        A ``tokenizers.Tokenizer`` without padding or truncation.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in _KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {_KINDS}")
    _checks.check_int("vocab_size", vocab_size, low=1)
    texts = _check_texts(texts)
    if kind == "bpe":
        if vocab_size < 257:
            raise ValueError(f"vocab_size: {vocab_size} < 257, the byte alphabet plus EOS")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BPE_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return tok

    normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(WORDPIECE_SPECIALS) + 1),
        special_tokens=list(WORDPIECE_SPECIALS),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    vocab = _wordpiece_vocab(bpe, texts, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(WORDPIECE_SPECIALS))
    return tok


def load_tokenizer(source: Any) -> Any:
    """Return a private copy of a tokenizer with padding and truncation switched off.

    Some shipped ``tokenizer.json`` files (the MiniLM one, for instance) switch on padding to
    128 and truncation at 128; the data functions want raw ids, so both are turned off on a
    copy (the caller's tokenizer is left as it was).

    Example:
        >>> from fnllm.data import default_documents, load_tokenizer, train_tokenizer
        >>> tok = train_tokenizer(default_documents(), "bpe", vocab_size=300)
        >>> tok.enable_padding(length=16)
        >>> copy = load_tokenizer(tok)
        >>> copy.padding is None, tok.padding["length"]
        (True, 16)

    Args:
        source: a ``tokenizers.Tokenizer``, a path to a ``tokenizer.json`` (or to a directory
            holding one), or a ``transformers`` fast tokenizer (its backend is used).

    Returns:
        A new ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer: no tokenizer.json at {path}")
        tok = Tokenizer.from_file(path)
    elif isinstance(source, Tokenizer):
        tok = Tokenizer.from_str(source.to_str())
    elif isinstance(getattr(source, "backend_tokenizer", None), Tokenizer):
        tok = Tokenizer.from_str(source.backend_tokenizer.to_str())
    else:
        raise TypeError(
            "tokenizer: expected a tokenizers.Tokenizer, a tokenizer.json path or a "
            f"transformers fast tokenizer, got {type(source).__name__}"
        )
    tok.no_padding()
    tok.no_truncation()
    return tok


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences at ``.``, ``!`` or ``?`` followed by white space.

    Example:
        >>> from fnllm.data import split_sentences
        >>> split_sentences("It rained. Did it stop? Yes!  Then the sun came out.")
        ['It rained.', 'Did it stop?', 'Yes!', 'Then the sun came out.']

    Args:
        text: one document.

    Returns:
        The non-empty sentences, stripped, in order.
    """
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]
    parts = (text[a:b].strip() for a, b in itertools.pairwise(cuts))
    return [p for p in parts if p]


class Corpus:
    """A tokenized corpus: documents as id lists (GPT) and as lists of sentences (BERT).

    Example:
        >>> from fnllm.data import Corpus
        >>> corpus = Corpus(vocab_size=300)        # the built-in documents, WordPiece
        >>> len(corpus.documents), len(corpus.sentences[0])
        (8, 5)
        >>> corpus.decode(corpus.sentences[0][0])
        'the river runs past the old mill at the edge of the village.'
        >>> corpus.cls_id, corpus.sep_id, corpus.pad_id, corpus.mask_id
        (2, 3, 0, 4)

    Args:
        texts: the documents (strings); default: :func:`~fnllm.data.default_documents`.
        tokenizer: anything :func:`load_tokenizer` accepts; default: train one on ``texts``
            with :func:`train_tokenizer`.
        kind: ``"wordpiece"`` or ``"bpe"``: the tokenizer to train (default
            ``"wordpiece"``); with a given tokenizer, inferred from its model.
        vocab_size: vocabulary size when training a tokenizer.

    Attributes:
        tokenizer: the ``tokenizers.Tokenizer`` (a private copy, padding/truncation off).
        kind: ``"wordpiece"`` or ``"bpe"``.
        documents: one id list per document, the whole text tokenized at once.
        sentences: per document, one id list per sentence (:func:`split_sentences`).
    """

    def __init__(
        self,
        texts: Iterable[str] | None = None,
        tokenizer: Any = None,
        *,
        kind: str | None = None,
        vocab_size: int = 1000,
    ) -> None:
        docs = _check_texts(default_documents() if texts is None else texts)
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {_KINDS}")
        if tokenizer is None:
            kind = kind or "wordpiece"
            tok = train_tokenizer(docs, kind, vocab_size)
        else:
            tok = load_tokenizer(tokenizer)
            kind = kind or ("wordpiece" if _model_type(tok) == "WordPiece" else "bpe")
        self.tokenizer = tok
        self.kind = kind
        self.documents: list[list[int]] = [
            e.ids for e in tok.encode_batch(docs, add_special_tokens=False)
        ]
        split = [split_sentences(d) for d in docs]
        flat = tok.encode_batch([s for ss in split for s in ss], add_special_tokens=False)
        self.sentences: list[list[list[int]]] = []
        i = 0
        for ss in split:
            self.sentences.append([e.ids for e in flat[i : i + len(ss)]])
            i += len(ss)

    def __repr__(self) -> str:
        n_tokens = sum(len(d) for d in self.documents)
        return (
            f"Corpus(kind={self.kind!r}, documents={len(self.documents)}, "
            f"tokens={n_tokens}, vocab_size={self.vocab_size})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Sorted ids of the tokenizer's special tokens (never masked or drawn)."""
        added = self.tokenizer.get_added_tokens_decoder()
        return tuple(sorted(i for i, t in added.items() if t.special))

    def token_id(self, token: str) -> int:
        """The id of ``token``; raises ``KeyError`` naming it when the vocabulary lacks it."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the {self.kind} vocabulary")
        return int(i)

    @property
    def cls_id(self) -> int:
        """The ``[CLS]`` id."""
        return self.token_id("[CLS]")

    @property
    def sep_id(self) -> int:
        """The ``[SEP]`` id."""
        return self.token_id("[SEP]")

    @property
    def pad_id(self) -> int:
        """The ``[PAD]`` id (``<|endoftext|>`` for a BPE vocabulary without ``[PAD]``)."""
        if self.tokenizer.token_to_id("[PAD]") is None and self.kind == "bpe":
            return self.eos_id
        return self.token_id("[PAD]")

    @property
    def mask_id(self) -> int:
        """The ``[MASK]`` id."""
        return self.token_id("[MASK]")

    @property
    def eos_id(self) -> int:
        """The end-of-document id: ``<|endoftext|>`` if present, else ``[SEP]``."""
        if self.tokenizer.token_to_id(BPE_EOS) is not None:
            return self.token_id(BPE_EOS)
        return self.sep_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return str(self.tokenizer.decode(list(ids)))

    def word_start_table(self) -> Tensor:
        """Bool ``[vocab_size]``: True for ids that start a word (WordPiece: no ``##``).

        ``table[input_ids]`` is the ``whole_word`` mask :func:`~fnllm.data.mlm_mask` wants.
        """
        if _model_type(self.tokenizer) != "WordPiece":
            raise ValueError("word_start_table: needs a WordPiece tokenizer ('##' continuations)")
        prefix = self.tokenizer.model.continuing_subword_prefix
        table = torch.ones(self.vocab_size, dtype=torch.bool)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token.startswith(prefix):
                table[i] = False
        return table

    def segment_pairs(self, segment_len: int) -> list[tuple[list[int], list[int]]]:
        """Consecutive segment pairs ``(A, B)`` where B follows A in the same document.

        Each document's sentences are grouped greedily into segments of about
        ``segment_len`` tokens (a segment is closed as soon as it holds ``segment_len``
        tokens, so it may run over by part of a sentence; :func:`sentence_pairs` truncates),
        and every two neighbouring segments form a pair: ``A + B`` is a contiguous stretch
        of its document.

        Args:
            segment_len: target tokens per segment (at least 1).

        Returns:
            The pairs, document by document, in order.
        """
        _checks.check_int("segment_len", segment_len, low=1)
        pairs = []
        for sents in self.sentences:
            segments: list[list[int]] = []
            current: list[int] = []
            for s in sents:
                current.extend(s)
                if len(current) >= segment_len:
                    segments.append(current)
                    current = []
            if current:
                segments.append(current)
            pairs.extend(itertools.pairwise(segments))
        return pairs


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


def _check_texts(texts: Iterable[str]) -> list[str]:
    """Materialise ``texts`` and check every item is a string."""
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of document strings, got one string")
    docs = list(texts)
    for i, t in enumerate(docs):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(t).__name__}")
    if not docs:
        raise ValueError("texts: no documents")
    return docs


def _check_loader_args(batch_size: int, epoch: int, start_step: int) -> None:
    _checks.check_int("batch_size", batch_size, low=1)
    _checks.check_int("epoch", epoch, low=0)
    _checks.check_int("start_step", start_step, low=0)


def _epoch_keys(key: Tensor, epoch: int, n: int) -> tuple[Tensor, Tensor]:
    """The epoch's example order (a permutation of ``n``) and the key for its steps."""
    k_order, k_steps = jr.split(jr.fold_in(key, epoch), 2)
    return jr.permutation(k_order, n), k_steps


def _model_type(tok: Any) -> str:
    return type(tok.model).__name__


def _wordpiece_vocab(bpe: Any, texts: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary from a trained (prefix-free) BPE tokenizer, deterministically.

    Order: the specials, the alphabet as word starts and as ``##`` continuations, then the
    learned pieces in merge order, each in the form(s) it takes when the BPE model
    tokenizes the training texts; cut at ``vocab_size``.
    """
    bpe_vocab = bpe.get_vocab()
    by_id = sorted(bpe_vocab, key=bpe_vocab.__getitem__)
    starts, inner = set(), set()
    for enc in bpe.encode_batch(texts, add_special_tokens=False):
        prev = None
        for token, word in zip(enc.tokens, enc.word_ids):
            (starts if word != prev else inner).add(token)
            prev = word
    pieces = list(WORDPIECE_SPECIALS)
    learned = [t for t in by_id if t not in WORDPIECE_SPECIALS]
    alphabet = [t for t in learned if len(t) == 1]
    for t in alphabet:
        pieces += [t, "##" + t]
    for t in learned:
        if len(t) > 1:
            pieces += [p for p, seen in ((t, starts), ("##" + t, inner)) if t in seen]
    unique = list(dict.fromkeys(pieces))[: max(vocab_size, len(WORDPIECE_SPECIALS))]
    return {t: i for i, t in enumerate(unique)}
