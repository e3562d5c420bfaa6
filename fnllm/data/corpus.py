"""A tokenized ``Corpus``: documents tokenized once, whole (for GPT) and split into sentences
(for BERT). Tokenizers are in :mod:`fnllm.data.tokenizers`, the loaders in
:mod:`fnllm.data.loaders`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks
from fnllm.data.corpus_text import default_documents
from fnllm.data.tokenizers import (
    _KINDS,
    BPE_EOS,
    check_texts,
    load_tokenizer,
    model_type,
    train_tokenizer,
)

__all__ = ["Corpus", "split_sentences"]

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+\S)")


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


def _token_id_property(token: str) -> property:
    """A read-only ``Corpus`` attribute: the id of the special token ``token``.

    (Defined above :class:`Corpus` because its class body calls it.)
    """

    def get(self: Corpus) -> int:
        return self.token_id(token)

    get.__doc__ = f"The ``{token}`` id."
    return property(get)


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
        docs = check_texts(default_documents() if texts is None else texts)
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {_KINDS}")
        if tokenizer is None:
            kind = kind or "wordpiece"
            tok = train_tokenizer(docs, kind, vocab_size)
        else:
            tok = load_tokenizer(tokenizer)
            kind = kind or ("wordpiece" if model_type(tok) == "WordPiece" else "bpe")
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

    cls_id = _token_id_property("[CLS]")
    """The ``[CLS]`` id."""
    sep_id = _token_id_property("[SEP]")
    """The ``[SEP]`` id."""
    mask_id = _token_id_property("[MASK]")
    """The ``[MASK]`` id."""

    @property
    def pad_id(self) -> int:
        """The ``[PAD]`` id (``<|endoftext|>`` for a BPE vocabulary without ``[PAD]``)."""
        if self.tokenizer.token_to_id("[PAD]") is None and self.kind == "bpe":
            return self.eos_id
        return self.token_id("[PAD]")

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
        if model_type(self.tokenizer) != "WordPiece":
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
        pairs: list[tuple[list[int], list[int]]] = []
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
