"""fnllm.generate on NaN and extreme values: refused or argmax, never token 0."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_gpt

from fnllm import generate, tree
from fnllm import random as jr

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


def test_a_row_of_minus_inf_logits_is_refused():
    logits = torch.tensor([[0.0, 1.0], [-float("inf"), -float("inf")]])
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"every logit of row \[1\] is -inf"):
            generate.next_token(jr.key(0), logits, temperature=temperature)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key": 0}, TypeError, r"key: expected a fnllm.random key \(int \[2\]\), got 0"),
        ({"key": torch.zeros(2)}, TypeError, r"key: expected a fnllm.random key .*float32"),
        ({"stop_ids": 5}, TypeError, r"stop_ids: expected a list of token ids, got 5"),
        ({"stop_ids": "5"}, TypeError, "stop_ids: expected a list of token ids"),
        ({"stop_ids": [99]}, ValueError, r"stop_ids: id 99 is outside the vocabulary \[0, 40\)"),
    ],
)
def test_sample_names_a_bad_key_or_stop_ids(kwargs, error, match):
    args = {"key": jr.key(0), **kwargs}
    key = args.pop("key")
    with pytest.raises(error, match=match):
        generate.sample(key, GPT, PARAMS, [[1, 2]], 3, **args)


def test_stop_ids_as_a_tensor_are_read_as_ids():
    out = generate.sample(None, GPT, PARAMS, [[1, 2]], 3, temperature=0,
                          stop_ids=torch.tensor([3, 4]))  # fmt: skip
    assert out.shape[0] == 1


def test_init_cache_refuses_an_integer_dtype():
    with pytest.raises(TypeError, match=r"init_cache: dtype must be a floating-point"):
        generate.init_cache(GPT, 1, 8, dtype=torch.int64)


def test_stacked_adapter_sets_are_refused_by_name_not_broadcast():
    from fnllm.finetune import lora

    sets = lora.stack([lora.init(jr.key(i), PARAMS, rank=2) for i in (1, 2)])
    with pytest.raises(ValueError, match=r"adapter: 2 per-row adapter sets .*lora.pick"):
        generate.sample(jr.key(0), GPT, sets, [[1, 2]], 2)
