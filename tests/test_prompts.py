"""Tests for fnllm.prompts: exact prompt strings, shot picking, label likelihood vs brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import prompts
from fnllm import random as jr
from fnllm.models import GPT
from fnllm.prompts import Template

GPT_BYTES = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=16, max_len=160)
POOL = [
    {"text": "what a wonderful film", "label": "positive"},
    {"text": "dull and far too long", "label": "negative"},
    {"text": "I loved every minute", "label": "positive"},
    {"text": "a waste of an evening", "label": "negative"},
    {"text": "charming", "label": "positive"},
]


def encode(text: str) -> list[int]:
    return list(text.encode("ascii"))


@pytest.fixture(scope="module")
def params() -> dict:
    return GPT_BYTES.init(jr.key(0))


def test_prompts_are_exact_strings() -> None:
    t = Template(
        query="Review: {text}\nSentiment:",
        answer=" {label}",
        instruction="Classify each review.",
        separator="\n---\n",
    )
    assert (
        prompts.zero_shot(t, {"text": "ok"}) == "Classify each review.\n---\nReview: ok\nSentiment:"
    )
    assert prompts.build_prompt(t, {"text": "ok"}, POOL[:2]) == (
        "Classify each review.\n---\n"
        "Review: what a wonderful film\nSentiment: positive\n---\n"
        "Review: dull and far too long\nSentiment: negative\n---\n"
        "Review: ok\nSentiment:"
    )
    bare = Template(query="{text} =", answer=" {label}", separator="; ")
    assert prompts.build_prompt(bare, {"text": "3+4"}, [{"text": "1+1", "label": "2"}]) == (
        "1+1 = 2; 3+4 ="
    )
    assert prompts.zero_shot(Template(), {"text": "x"}) == "Input: x\nOutput:"


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, len(POOL)))
def test_few_shot_draws_distinct_pool_examples_nested_in_k(seed: int, k: int) -> None:
    t = Template(query="<{text}>", answer="={label}", separator="|")
    key = jr.key(seed)
    text = prompts.few_shot(key, t, POOL, {"text": "?"}, k)
    shots = text.split("|")[:-1]
    assert len(shots) == k == len(set(shots))
    assert set(shots) <= {t.format_shot(e) for e in POOL}
    if k < len(POOL):
        bigger = prompts.few_shot(key, t, POOL, {"text": "?"}, k + 1).split("|")[:-1]
        assert bigger[:k] == shots
    assert text == prompts.few_shot(key, t, POOL, {"text": "?"}, k)
    assert prompts.one_shot(key, t, POOL, {"text": "?"}) == prompts.few_shot(
        key, t, POOL, {"text": "?"}, 1
    )


def _brute_force(params: dict, prompt: str, answer: str) -> float:
    """One unpadded row per pair, log-softmax by hand, summed over the answer tokens."""
    p, a = encode(prompt), encode(answer)
    ids = torch.tensor([p + a])
    logp = torch.log_softmax(GPT_BYTES.apply(params, ids)[0].double(), -1)
    return sum(float(logp[len(p) + j - 1, a[j]]) for j in range(len(a)))


def test_label_logprobs_and_classify_equal_a_brute_force_loop(params: dict) -> None:
    texts = ["so good", "terrible", "an utterly forgettable movie", "fun"]
    answers = [" positive", " negative", " meh"]
    got = prompts.label_logprobs(GPT_BYTES, params, encode, texts, answers, batch_size=5)
    want = torch.tensor(
        [[_brute_force(params, p, a) for a in answers] for p in texts], dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    pred = prompts.classify(GPT_BYTES, params, encode, texts, answers, batch_size=2)
    assert pred.tolist() == want.argmax(-1).tolist()


def test_shot_accuracy_equals_classifying_each_prompt(params: dict) -> None:
    t = Template(query="{text}:", answer=" {label}")
    labels = ["positive", "negative"]
    key = jr.key(5)
    got = prompts.shot_accuracy(
        key, GPT_BYTES, params, encode, t, POOL, POOL[:4], labels, shots=(0, 2)
    )
    for k in (0, 2):
        hits = 0
        for i, ex in enumerate(POOL[:4]):
            text = prompts.few_shot(jr.fold_in(key, i), t, POOL, ex, k)
            scores = [_brute_force(params, text, " " + lab) for lab in labels]
            hits += labels[max(range(2), key=scores.__getitem__)] == ex["label"]
        assert got[k] == pytest.approx(hits / 4)


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_named(params: dict) -> None:
    t = Template(query="{text} / {topic}")
    with pytest.raises(KeyError, match="template query: field 'topic' is missing"):
        prompts.zero_shot(t, {"text": "x"})
    with pytest.raises(ValueError, match="k: 9 shots > the 5 examples"):
        prompts.few_shot(jr.key(0), Template(), POOL, {"text": "x"}, 9)
    with pytest.raises(ValueError, match="Template: query is not a valid format string"):
        Template(query="{text")
    with pytest.raises(ValueError, match="answers: '' encodes to no tokens"):
        prompts.label_logprobs(GPT_BYTES, params, encode, ["a"], [""])
    with pytest.raises(ValueError, match=r"prompts\[0\]: 159 prompt \+ 2 answer tokens > max_len"):
        prompts.label_logprobs(GPT_BYTES, params, encode, ["x" * 159], [" a"])
    with pytest.raises(ValueError, match=r"test\[0\]: label 'neutral' is not one of"):
        prompts.shot_accuracy(
            jr.key(0), GPT_BYTES, params, encode, Template(), POOL,
            [{"text": "x", "label": "neutral"}], ["positive", "negative"],
        )  # fmt: skip
