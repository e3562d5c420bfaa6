"""fnllm.prompts on bad inputs: NaN scores refused, bad labels/shots/encode named."""

from __future__ import annotations

import pytest
from _tiny import tiny_gpt

from fnllm import random as jr
from fnllm import tree
from fnllm.prompts import classify, label_logprobs

GPT = tiny_gpt()
PARAMS = GPT.init(jr.key(0))
NAN_PARAMS = tree.map(lambda x: x * float("nan"), PARAMS)


def _enc(s):
    return [b % 40 for b in s.encode()]


def test_classify_with_nan_params_is_refused_naming_the_prompt():
    with pytest.raises(ValueError, match=r"prompts\[0\] with answers\[0\] ' x' as NaN"):
        classify(GPT, NAN_PARAMS, _enc, ["a", "b"], [" x", " y"])
    with pytest.raises(ValueError, match="as NaN"):
        label_logprobs(GPT, NAN_PARAMS, _enc, ["a"], [" x"])


@pytest.mark.parametrize(
    ("prompts", "answers", "kwargs", "error", "match"),
    [
        ("a", [" x"], {}, TypeError, "not one string"),
        (["a"], " x", {}, TypeError, "not one string"),
        ([], [" x"], {}, ValueError, "prompts: empty list"),
        (["a"], [], {}, ValueError, "answers: empty list"),
        (None, [" x"], {}, TypeError, "prompts: expected a list of strings, got NoneType"),
        (["a"], [" x", " y", " x"], {}, ValueError, r"answers\[2\]: ' x' appears twice"),
        (["a"], [""], {}, ValueError, "encodes to no tokens"),
        (["a" * 20], [" x"], {}, ValueError, r"prompts\[0\]: 20 prompt \+ 2 answer tokens"),
        (["a"], [" x"], {"batch_size": 0}, ValueError, "batch_size"),
        (["a"], [" x"], {"batch_size": True}, TypeError, "batch_size"),
    ],
)
def test_label_logprobs_names_bad_arguments(prompts, answers, kwargs, error, match):
    with pytest.raises(error, match=match):
        label_logprobs(GPT, PARAMS, _enc, prompts, answers, **kwargs)


DATA = [{"text": w, "label": w[0]} for w in ["ant", "bee", "asp", "bug"]]


@pytest.mark.parametrize(
    ("test", "labels", "shots", "error", "match"),
    [
        (DATA, "ab", (0,), TypeError, "labels: expected a list of label strings, got 'ab'"),
        (DATA, ["a", "a"], (0,), ValueError, "labels: 'a' appears twice"),
        (DATA, ["a", "b"], 2, TypeError, "shots: expected a list of shot counts"),
        ([], ["a", "b"], (0,), ValueError, "test: no examples to score"),
        ([{"text": "cat", "label": "c"}], ["a", "b"], (0,), ValueError, r"test\[0\]: label 'c'"),
        (DATA, ["a", "b"], (-1,), ValueError, "k: expected an int >= 0, got -1"),
    ],
)
def test_shot_accuracy_names_bad_arguments(test, labels, shots, error, match):
    from fnllm.prompts import Template, shot_accuracy

    gpt = tiny_gpt(vocab_size=128, max_len=64)
    with pytest.raises(error, match=match):
        shot_accuracy(jr.key(0), gpt, gpt.init(jr.key(1)), lambda s: list(s.encode()), Template(),
                      DATA, test, labels, shots=shots)  # fmt: skip


@pytest.mark.parametrize(
    ("encode", "prompts", "match"),
    [
        (lambda s: s, ["a"], r"answers\[0\]: encode returned a str, not token ids"),
        (lambda s: [1.5], ["a"], r"answers\[0\]: encode returned 1.5, not an int token id"),
        (_enc, [3], r"prompts\[0\]: expected a string, got int"),
    ],
)
def test_label_logprobs_names_what_encode_returned(encode, prompts, match):
    with pytest.raises(TypeError, match=match):
        label_logprobs(GPT, PARAMS, encode, prompts, [" x"])


def test_label_logprobs_refuses_an_encoder_and_a_missing_encode():
    from _tiny import tiny_bert

    bert = tiny_bert()
    with pytest.raises(TypeError, match=r"label_logprobs: model: .* BERT is an encoder"):
        classify(bert, bert.init(jr.key(0)), _enc, ["a"], [" x", " y"])
    with pytest.raises(TypeError, match="encode: expected a function text -> ids, got NoneType"):
        classify(GPT, PARAMS, None, ["a"], [" x", " y"])


def test_few_shot_refuses_one_example_as_the_pool():
    from fnllm.prompts import Template, few_shot

    with pytest.raises(TypeError, match="examples: expected a list of example dicts, got dict"):
        few_shot(jr.key(0), Template(), {"text": "a", "label": "x"}, {"text": "b"}, 1)
