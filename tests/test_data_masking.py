"""Tests for fnllm.data.mlm_mask: invariants, statistics, HF parity, vmap, compile, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import random as jr
from fnllm import testing
from fnllm.data import mlm_mask

# ----------------------------------------------------------------------------------------------
# helpers


def _batch(seed: int, shape: tuple[int, ...], vocab: int, pad_id: int = 0) -> tuple:
    """Random token ids plus a right-padding attention mask, from a numpy generator."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, vocab, size=shape)).to(torch.int64)
    lengths = rng.integers(0, shape[-1] + 1, size=shape[:-1])
    positions = np.arange(shape[-1])
    attention = torch.from_numpy(positions < lengths[..., None]).to(torch.int64)
    tokens = torch.where(attention.bool(), tokens, pad_id)
    return tokens, attention


def _words(seed: int, shape: tuple[int, ...], p_start: float = 0.5) -> torch.Tensor:
    rng = np.random.default_rng(seed + 1)
    return torch.from_numpy(rng.random(shape) < p_start)


@st.composite
def _case(draw: st.DrawFn) -> dict:
    """mlm_mask's arguments from the kit (fully padded rows too), plus ``exact`` and word starts
    (used when ``whole_word``)."""
    args = draw(testing.mlm_args(max_vocab=40, max_len=24, max_batch=3, min_tokens=0))
    args["exact"] = draw(st.booleans())
    words = draw(testing.tensors(tuple(args["tokens"].shape), torch.bool))
    return {"args": args, "words": words, "whole_word": draw(st.booleans())}


def _run(case: dict) -> tuple:
    args = case["args"]
    words = case["words"] if case["whole_word"] else None
    inputs, labels = mlm_mask(**args, whole_word=words)
    return args["tokens"], args["attention_mask"], words, inputs, labels


def _candidates(tokens: torch.Tensor, attention: torch.Tensor, kwargs: dict) -> torch.Tensor:
    excluded = torch.tensor([*kwargs["special_ids"], kwargs["mask_id"]])
    return ~torch.isin(tokens, excluded) & attention.bool()


# ----------------------------------------------------------------------------------------------
# properties


@settings(max_examples=60, deadline=None)
@given(_case())
def test_specials_and_padding_are_never_picked_nor_produced(case: dict) -> None:
    tokens, attention, _, inputs, labels = _run(case)
    kw = case["args"]
    picked = labels != -100
    assert not (picked & ~_candidates(tokens, attention, kw)).any()
    # Corrupted positions hold mask_id or a non-special id (never a special, never padding).
    changed = inputs != tokens
    specials = torch.tensor(kw["special_ids"] or [-1])
    assert not (changed & torch.isin(inputs, specials) & (inputs != kw["mask_id"])).any()
    assert not (changed & (inputs != kw["mask_id"]) & ~picked).any()


@settings(max_examples=60, deadline=None)
@given(_case())
def test_labels_hold_originals_exactly_at_picked_positions_and_rest_is_untouched(
    case: dict,
) -> None:
    tokens, _, _, inputs, labels = _run(case)
    picked = labels != -100
    assert torch.equal(labels[picked], tokens[picked])
    assert torch.equal(inputs[~picked], tokens[~picked])
    assert inputs.dtype == tokens.dtype and labels.dtype == tokens.dtype
    assert inputs.shape == tokens.shape and labels.shape == tokens.shape


@settings(max_examples=40, deadline=None)
@given(_case())
def test_exact_mode_picks_round_prob_times_the_units(case: dict) -> None:
    case["args"]["exact"] = True
    tokens, attention, words, _, labels = _run(case)
    candidates = _candidates(tokens, attention, case["args"])
    prob = case["args"]["prob"]
    for b in range(tokens.shape[0]):
        if words is None:
            n_units = int(candidates[b].sum())
            n_picked = int((labels[b] != -100).sum())
        else:
            starts = _word_starts(candidates[b], words[b])
            n_units = int((starts & candidates[b]).sum())
            n_picked = int(((labels[b] != -100) & starts).sum())
        assert n_picked == round(prob * n_units)


def _word_starts(candidates: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Reference (loop) word starts: a candidate starts a word at a word start or after a
    non-candidate."""
    out = torch.zeros_like(candidates)
    for t in range(candidates.shape[0]):
        out[t] = bool(words[t]) or not bool(candidates[t]) or t == 0 or not candidates[t - 1]
    return out


@settings(max_examples=40, deadline=None)
@given(_case())
def test_whole_word_mode_picks_every_word_as_one_unit(case: dict) -> None:
    case["whole_word"] = True
    tokens, attention, words, _, labels = _run(case)
    candidates = _candidates(tokens, attention, case["args"])
    for b in range(tokens.shape[0]):
        starts = _word_starts(candidates[b], words[b])
        current = None
        for t in range(tokens.shape[1]):
            if not candidates[b, t]:
                current = None
                continue
            picked = bool(labels[b, t] != -100)
            if starts[t]:
                current = picked
            assert picked == current, f"row {b} pos {t} split a word"


def test_all_word_starts_equals_token_mode_in_exact_mode() -> None:
    tokens, attention = _batch(3, (3, 40), 30)
    kw = {"mask_id": 4, "vocab_size": 30, "special_ids": (0, 1), "exact": True}
    a = mlm_mask(jr.key(5), tokens, attention_mask=attention, **kw)
    b = mlm_mask(
        jr.key(5), tokens, attention_mask=attention, whole_word=torch.ones(3, 40, dtype=bool), **kw
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_same_key_same_output_and_different_keys_differ() -> None:
    tokens, attention = _batch(0, (4, 64), 100)
    kw = {"mask_id": 3, "vocab_size": 100, "special_ids": (0,), "attention_mask": attention}
    a = mlm_mask(jr.key(7), tokens, prob=0.5, **kw)
    b = mlm_mask(jr.key(7), tokens, prob=0.5, **kw)
    c = mlm_mask(jr.key(8), tokens, prob=0.5, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], c[0])


def test_inputs_are_not_mutated() -> None:
    tokens, attention = _batch(1, (2, 16), 50)
    before = tokens.clone()
    mlm_mask(jr.key(0), tokens, mask_id=2, vocab_size=50, prob=1.0, attention_mask=attention)
    assert torch.equal(tokens, before)


# ----------------------------------------------------------------------------------------------
# statistics (fixed keys; tolerances are 5 binomial standard deviations)


def _within(observed: float, p: float, n: int, sds: float = 5.0) -> bool:
    return abs(observed - p) <= sds * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("exact", [False, True])
def test_pick_rate_and_80_10_10_split_match_binomial_expectations(exact: bool) -> None:
    vocab, specials = 1000, (0, 1, 2)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(3, vocab, (64, 512)))
    inputs, labels = mlm_mask(
        jr.key(11), tokens, mask_id=2, vocab_size=vocab, special_ids=specials, exact=exact
    )
    picked = labels != -100
    n, n_picked = tokens.numel(), int(picked.sum())
    assert _within(n_picked / n, 0.15, n)
    masked = (inputs == 2) & picked
    changed = (inputs != tokens) & picked & ~masked
    same = (inputs == tokens) & picked
    n_allowed = vocab - len(specials)
    # A random replacement equal to the original counts as "unchanged".
    p_same = 0.1 + 0.1 / n_allowed
    assert _within(int(masked.sum()) / n_picked, 0.8, n_picked)
    assert _within(int(changed.sum()) / n_picked, 0.1 - 0.1 / n_allowed, n_picked)
    assert _within(int(same.sum()) / n_picked, p_same, n_picked)


def test_random_replacements_are_uniform_over_non_special_ids() -> None:
    vocab, specials, mask_id = 12, (0, 5, 11), 3
    allowed = [i for i in range(vocab) if i not in (*specials, mask_id)]
    tokens = torch.full((256, 256), 7)
    inputs, labels = mlm_mask(
        jr.key(2), tokens, mask_id=mask_id, vocab_size=vocab, special_ids=specials,
        prob=1.0, mask_frac=0.0, random_frac=1.0,
    )  # fmt: skip
    assert bool((labels == 7).all())
    counts = torch.bincount(inputs.flatten(), minlength=vocab)
    assert int(counts[list((*specials, mask_id))].sum()) == 0
    n, p = tokens.numel(), 1 / len(allowed)
    for i in allowed:
        assert _within(int(counts[i]) / n, p, n), (i, int(counts[i]))


def _hf_collator(vocab: int, mask_id: int, pad_id: int) -> object:
    """A Hugging Face MLM collator over a word-level tokenizer with ids 0..vocab-1."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    names = {pad_id: "[PAD]", mask_id: "[MASK]"}
    vocab_map = {names.get(i, f"w{i}"): i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="w1"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", mask_token="[MASK]")
    assert len(fast) == vocab  # the NOTES pitfall: a silently tiny vocabulary
    return DataCollatorForLanguageModeling(fast, mlm_probability=0.15, seed=0)


def test_rates_match_hugging_face_data_collator() -> None:
    vocab, pad_id, mask_id = 500, 0, 4
    tokens, attention = _batch(4, (64, 256), vocab, pad_id=pad_id)
    tokens = torch.where(attention.bool() & (tokens == mask_id), 5, tokens)
    collator = _hf_collator(vocab, mask_id, pad_id)
    hf = collator.torch_call([{"input_ids": row} for row in tokens])
    ours_inputs, ours_labels = mlm_mask(
        jr.key(0), tokens, mask_id=mask_id, vocab_size=vocab, special_ids=(pad_id,),
        attention_mask=attention,
    )  # fmt: skip
    for inputs, labels in ((hf["input_ids"], hf["labels"]), (ours_inputs, ours_labels)):
        picked = labels != -100
        n, n_picked = int(attention.sum()), int(picked.sum())
        assert not (picked & ~attention.bool()).any()  # padding never picked by either
        assert _within(n_picked / n, 0.15, n)
        assert _within(int((inputs[picked] == mask_id).sum()) / n_picked, 0.8, n_picked)
        assert _within(int((inputs[picked] == labels[picked]).sum()) / n_picked, 0.1, n_picked)


# ----------------------------------------------------------------------------------------------
# transforms: vmap, compile


@pytest.mark.parametrize("mode", ["plain", "exact", "whole_word", "whole_word_exact"])
def test_vmap_over_keys_equals_python_loop(mode: str) -> None:
    tokens, attention = _batch(6, (5, 20), 40)
    words = _words(6, (5, 20))
    keys = jr.split(jr.key(9), 5)

    def one(key: torch.Tensor, t: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple:
        return mlm_mask(
            key, t, mask_id=3, vocab_size=40, special_ids=(0, 1), prob=0.4,
            attention_mask=a, whole_word=w if "whole" in mode else None,
            exact="exact" in mode,
        )  # fmt: skip

    v_inputs, v_labels = torch.func.vmap(one)(keys, tokens, attention, words)
    for b in range(5):
        inputs, labels = one(keys[b], tokens[b], attention[b], words[b])
        assert torch.equal(v_inputs[b], inputs) and torch.equal(v_labels[b], labels)


def test_compiled_equals_eager_with_zero_graph_breaks() -> None:
    tokens, attention = _batch(8, (2, 12), 30)
    words = _words(8, (2, 12))

    def fn(key: torch.Tensor, t: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple:
        kw = {"mask_id": 3, "vocab_size": 30, "special_ids": (0, 1), "attention_mask": a}
        plain = mlm_mask(key, t, prob=0.5, **kw)  # one word per token
        words = mlm_mask(key, t, prob=0.5, whole_word=w, exact=True, **kw)  # two words
        return (*plain, *words)

    args = (jr.key(4), tokens, attention, words)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), fn(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.slow
def test_inductor_compiled_equals_eager() -> None:
    """The default backend (inductor) too; slow because the threefry hash is a big kernel."""
    tokens, attention = _batch(12, (2, 8), 30)

    def fn(key: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> tuple:
        return mlm_mask(key, t, mask_id=3, vocab_size=30, special_ids=(0,), attention_mask=a)

    args = (jr.key(4), tokens, attention)
    torch._dynamo.reset()
    got, want = torch.compile(fn, fullgraph=True)(*args), fn(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------
# errors

_OK = {"mask_id": 3, "vocab_size": 10}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prob": 1.5}, "prob"),
        ({"prob": -0.1}, "prob"),
        ({"mask_frac": 0.8, "random_frac": 0.3}, "mask_frac \\+ random_frac"),
        ({"random_frac": -0.1}, "random_frac"),
        ({"mask_id": 10}, "mask_id"),
        ({"special_ids": (12,)}, "special_ids"),
        ({"special_ids": tuple(range(10))}, "special_ids"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mlm_mask(jr.key(0), torch.tensor([1, 2]), **{**_OK, **kwargs})


def test_bad_tokens_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match="tokens: expected a signed integer dtype"):
        mlm_mask(jr.key(0), torch.tensor([1.0, 2.0]), **_OK)
    with pytest.raises(ValueError, match=r"tokens: id 12 at \[1, 2\] >= vocab_size 10"):
        mlm_mask(jr.key(0), torch.tensor([[1, 2, 3], [4, 5, 12]]), **_OK)
    with pytest.raises(ValueError, match=r"tokens: id -1 at \[0\] < 0"):
        mlm_mask(jr.key(0), torch.tensor([-1, 2]), **_OK)
    with pytest.raises(ValueError, match="attention_mask: shape"):
        mlm_mask(jr.key(0), torch.tensor([1, 2]), attention_mask=torch.ones(3), **_OK)
    with pytest.raises(ValueError, match="batch of keys"):
        mlm_mask(jr.split(jr.key(0), 2), torch.tensor([[1, 2], [3, 4]]), **_OK)
