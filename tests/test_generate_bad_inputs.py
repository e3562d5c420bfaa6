"""fnllm.generate, finetune metrics, prompts and optim on NaN and extreme values."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_gpt

from fnllm import generate, optim, tree
from fnllm import random as jr
from fnllm.finetune import accuracy, confusion_matrix, macro_f1
from fnllm.prompts import classify, label_logprobs

GPT = tiny_gpt()
PARAMS = GPT.init(jr.key(0))
NAN_PARAMS = tree.map(lambda x: x * float("nan"), PARAMS)


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        (torch.tensor([[0.0, float("nan"), 1.0]]), ValueError, r"nan at \[0, 1\]"),
        (torch.tensor([[0.0, float("inf")]]), ValueError, r"inf at \[0, 1\]"),
        (torch.tensor([[1, 2]]), TypeError, "floating-point logits"),
        (torch.zeros(2, 0), ValueError, "V >= 1"),
        ([[0.0, 1.0]], TypeError, "expected a torch.Tensor, got list"),
    ],
)
def test_next_token_refuses_logits_that_are_not_a_distribution(logits, error, match):
    with pytest.raises(error, match=match):
        generate.next_token(jr.key(0), logits, temperature=1.0)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-8])
def test_a_tiny_temperature_picks_the_argmax(temperature):
    logits = jr.normal(jr.key(3), (64, 50)) * 10
    got = generate.next_token(jr.key(1), logits, temperature=temperature)
    assert torch.equal(got, logits.argmax(-1))
    sampled = generate.sample(jr.key(1), GPT, PARAMS, [[1, 2, 3]], 4, temperature=temperature)
    assert torch.equal(sampled, generate.sample(None, GPT, PARAMS, [[1, 2, 3]], 4, temperature=0))


def test_sampling_with_nan_params_is_refused_not_token_zero():
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="generate: the logits after the prompts: nan"):
            generate.sample(jr.key(0), GPT, NAN_PARAMS, [[1, 2]], 3, temperature=temperature)


@pytest.mark.parametrize(
    ("temperature", "error"), [(-1.0, ValueError), (float("nan"), ValueError), (True, TypeError)]
)
def test_bad_temperatures_are_named(temperature, error):
    with pytest.raises(error, match="temperature"):
        generate.next_token(jr.key(0), torch.zeros(1, 3), temperature=temperature)


def test_decode_step_refuses_another_models_params_like_prefill():
    deeper = tiny_gpt(n_layer=3).init(jr.key(0))
    _, cache = generate.prefill(GPT, PARAMS, generate.init_cache(GPT, 1, 8), torch.tensor([[1, 2]]))
    with pytest.raises(KeyError, match=r"params: unexpected blocks\.2"):
        generate.decode_step(GPT, deeper, cache, torch.tensor([3]))
    with pytest.raises(KeyError, match=r"params: unexpected blocks\.2"):
        generate.prefill(GPT, deeper, generate.init_cache(GPT, 1, 8), torch.tensor([[1, 2]]))


# ------------------------------------------------------------------------------------- metrics


def test_metrics_agree_on_ignored_labels():
    pred = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([0, -100, 1, -100])
    assert accuracy(pred, labels) == 1.0
    assert macro_f1(pred, labels) == 1.0
    assert confusion_matrix(pred, labels).tolist() == [[1, 0], [0, 1]]
    assert accuracy(pred, torch.full((4,), -100)) != accuracy(pred, torch.full((4,), -100))  # nan


@pytest.mark.parametrize("metric", [accuracy, macro_f1, confusion_matrix])
@pytest.mark.parametrize(
    ("pred", "labels", "error", "match"),
    [
        (
            torch.full((3, 2), float("nan")),
            torch.tensor([0, 1, 0]),
            ValueError,
            "NaN scores in row 0",
        ),
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]),
            torch.tensor([1, 0]),
            ValueError,
            "row 1",
        ),
        (torch.tensor([True, False]), torch.tensor([1, 0]), TypeError, "predictions: .*torch.bool"),
        (torch.tensor([1, 0]), torch.tensor([True, False]), TypeError, "labels: .*torch.bool"),
        ("10", torch.tensor([1, 0]), TypeError, "predictions: expected a tensor"),
        (torch.tensor([1, 0]), None, TypeError, "labels: expected a tensor"),
        (torch.tensor([1, 0]), torch.tensor([1, -1]), ValueError, r"labels: class id -1 < 0 at 1"),
        (torch.tensor([-3, 0]), torch.tensor([1, 0]), ValueError, r"predictions: class id -3"),
        (torch.tensor([1, 0]), torch.tensor([1.0, 0.0]), ValueError, "integer class ids"),
    ],
)
def test_metrics_refuse_inputs_that_cannot_give_a_score(metric, pred, labels, error, match):
    with pytest.raises(error, match=match):
        metric(pred, labels)


def test_metrics_accept_lists_and_numpy():
    np = pytest.importorskip("numpy")
    assert accuracy([0, 1], np.array([0, 1])) == 1.0
    with pytest.raises(TypeError, match="n_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), n_classes=2.0)


# ------------------------------------------------------------------------------------- prompts


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
        ([], [" x"], {}, ValueError, "at least one prompt"),
        (["a"], [""], {}, ValueError, "encodes to no tokens"),
        (["a" * 20], [" x"], {}, ValueError, r"prompts\[0\]: 20 prompt \+ 2 answer tokens"),
        (["a"], [" x"], {"batch_size": 0}, ValueError, "batch_size"),
        (["a"], [" x"], {"batch_size": True}, TypeError, "batch_size"),
    ],
)
def test_label_logprobs_names_bad_arguments(prompts, answers, kwargs, error, match):
    with pytest.raises(error, match=match):
        label_logprobs(GPT, PARAMS, _enc, prompts, answers, **kwargs)


# --------------------------------------------------------------------------------------- optim


@pytest.mark.parametrize("make", [optim.adamw, optim.adam], ids=["adamw", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_eager_adam_step_refuses_a_non_finite_gradient(make, bad):
    params = {"a": torch.ones(2), "b": {"w": torch.ones(3)}}
    opt = make(1e-3)
    state = opt.init(params)
    grads = {"a": torch.ones(2), "b": {"w": torch.tensor([0.0, bad, 1.0])}}
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"grads b\.w holds {kind}"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match=rf"grads b\.w holds {kind}"):
        optim.apply_gradients(opt, grads, state, params)
    assert torch.equal(params["b"]["w"], torch.ones(3))  # untouched


@pytest.mark.parametrize("make", [optim.adamw, optim.adam, optim.sgd], ids=["adamw", "adam", "sgd"])
@pytest.mark.parametrize("rate", [-0.1, float("nan"), -1])
def test_a_schedule_returning_a_bad_python_number_is_refused(make, rate):
    params = {"w": torch.ones(2)}
    opt = make(lambda count: rate)
    with pytest.raises(ValueError, match="lr at step 0"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)


def test_a_schedule_returning_a_function_is_refused():
    params = {"w": torch.ones(2)}
    opt = optim.adamw(lambda count: lambda: 0.1)
    with pytest.raises(TypeError, match="the schedule returned a function"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)


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
