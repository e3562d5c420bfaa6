"""Tokenizer glue: train a small tokenizer or load an existing one.

:func:`train_tokenizer` trains a small WordPiece (BERT) or byte-level BPE (GPT) tokenizer with
Hugging Face ``tokenizers``; :func:`load_tokenizer` takes an existing one (a
``tokenizers.Tokenizer``, a ``tokenizer.json`` path or directory, or a ``transformers`` fast
tokenizer) and returns a private copy with padding and truncation switched off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from fnllm import _checks

__all__ = ["BPE_EOS", "WORDPIECE_SPECIALS", "load_tokenizer", "train_tokenizer"]

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_EOS = "<|endoftext|>"
_KINDS = ("wordpiece", "bpe")


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
    texts = check_texts(texts)
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
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust error says what, not where: add the path
            raise ValueError(f"tokenizer: cannot read {path} as a tokenizer.json: {e}") from e
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


def check_texts(texts: Iterable[str]) -> list[str]:
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


def model_type(tok: Any) -> str:
    return type(tok.model).__name__


def _wordpiece_vocab(bpe: Any, texts: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary from a trained (prefix-free) BPE tokenizer, deterministically.

    Order: the specials, the alphabet as word starts and as ``##`` continuations, then the
    learned pieces in merge order, each in the form(s) it takes when the BPE model
    tokenizes the training texts; cut at ``vocab_size``.
    """
    bpe_vocab = bpe.get_vocab()
    by_id = sorted(bpe_vocab, key=bpe_vocab.__getitem__)
    starts: set[str] = set()
    inner: set[str] = set()
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
    unique = list(dict.fromkeys(pieces))
    need = len(WORDPIECE_SPECIALS) + 2 * len(alphabet)
    if vocab_size < need:
        raise ValueError(
            f"vocab_size: {vocab_size} is too small for a wordpiece vocabulary of these texts: "
            f"the {len(WORDPIECE_SPECIALS)} specials and the {len(alphabet)} characters (as word "
            f"starts and as ## continuations) need {need}; below that words become [UNK]"
        )
    unique = unique[:vocab_size]
    return {t: i for i, t in enumerate(unique)}
