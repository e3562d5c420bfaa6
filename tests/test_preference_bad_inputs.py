"""fnllm.preference on bad inputs: wrong-rank rewards and pairs without a preference."""

from __future__ import annotations

import pytest
import torch

from fnllm import random as jr
from fnllm.finetune import Classifier
from fnllm.models import GPT
from fnllm.preference import dpo_loss, preference_batch, reward_loss, with_reference


def _enc(s):
    return list(s.encode())


BATCH = preference_batch(
    [{"prompt": "Q", "chosen": "yes", "rejected": "no"}] * 2, _enc, eos_id=0, max_len=16
)


@pytest.mark.parametrize(
    ("out", "error", "match"),
    [
        (lambda n: torch.zeros(n, 3), ValueError, r"shape \(4, 3\) for 4 rows"),
        (lambda n: torch.zeros(n, 5, 7), ValueError, r"shape \(4, 5, 7\) for 4 rows"),
        (lambda n: torch.zeros(n // 2), ValueError, r"shape \(2,\) for 4 rows"),
        (lambda n: torch.zeros(()), ValueError, r"shape \(\) for 4 rows"),
        (lambda n: torch.zeros(n, dtype=torch.long), TypeError, "torch.int64 rewards"),
        (lambda n: [0.0] * n, TypeError, "returned a list"),
    ],
)
def test_reward_loss_refuses_anything_but_one_reward_per_row(out, error, match):
    def scorer(params, ids, mask):
        return out(ids.shape[0])

    with pytest.raises(error, match=match):
        reward_loss(scorer)({}, {}, BATCH, None)


def test_reward_loss_accepts_b_and_b1_rewards_alike():
    def flat(params, ids, mask):
        return ids.float().sum(-1) * params["w"]

    def column(params, ids, mask):
        return flat(params, ids, mask)[:, None]

    p = {"w": torch.tensor(0.01)}
    a, _ = reward_loss(flat)(p, {}, BATCH, None)
    b, _ = reward_loss(column)(p, {}, BATCH, None)
    torch.testing.assert_close(a, b)


def test_a_two_class_classifier_as_reward_model_is_refused():
    gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
    rm = Classifier(gpt, n_classes=2, pooling="last")
    with pytest.raises(ValueError, match="n_classes=1"):
        reward_loss(rm)(rm.init(jr.key(0)), {}, BATCH, None)


def test_pairs_that_truncation_makes_identical_are_refused_naming_the_record():
    ok = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    long = {"prompt": "question", "chosen": "yes, fine", "rejected": "yes, bad"}
    with pytest.raises(ValueError, match=r"records\[1\]: chosen and rejected .* max_len 10"):
        preference_batch([ok, long], _enc, eos_id=0, max_len=10)
    same = {"prompt": "Q", "chosen": "same", "rejected": "same"}
    with pytest.raises(ValueError, match=r"records\[0\]: .*\(the same text\)"):
        preference_batch([same], _enc, eos_id=0, max_len=16)
    assert preference_batch([ok, long], _enc, eos_id=0, max_len=16)["chosen_ids"].shape[0] == 2


def test_preference_batch_names_missing_fields_and_empty_batches():
    with pytest.raises(KeyError, match=r"records\[0\]: missing 'rejected'"):
        preference_batch([{"prompt": "Q", "chosen": "a"}], _enc, eos_id=0, max_len=8)
    with pytest.raises(ValueError, match="records: empty batch"):
        preference_batch([], _enc, eos_id=0, max_len=8)
    with pytest.raises(ValueError, match=r"records\[0\]: the prompt has 9 tokens"):
        preference_batch(
            [{"prompt": "Q" * 9, "chosen": "a", "rejected": "b"}], _enc, eos_id=0, max_len=8
        )


@pytest.mark.parametrize(
    ("records", "kwargs", "error", "match"),
    [
        ({"prompt": "Q", "chosen": "a", "rejected": "b"}, {}, TypeError, "wrap it"),
        (
            [{"prompt": "Q", "chosen": 1, "rejected": "b"}],
            {},
            TypeError,
            "field 'chosen' must be a string",
        ),
        (
            [{"prompt": "Q", "chosen": "a", "rejected": "b"}],
            {"eos_id": -1},
            ValueError,
            "eos_id: -1 < 0",
        ),
        ([{"prompt": "Q", "chosen": "a", "rejected": "b"}], {"max_len": 8.0}, TypeError, "max_len"),
    ],
)
def test_preference_batch_names_bad_arguments(records, kwargs, error, match):
    with pytest.raises(error, match=match):
        preference_batch(records, _enc, **{"eos_id": 0, "max_len": 16, **kwargs})


@pytest.mark.parametrize("margin", [float("nan"), float("inf")])
def test_reward_loss_refuses_a_non_finite_margin(margin):
    with pytest.raises(ValueError, match="reward_loss: margin"):
        reward_loss(lambda p, i, m: torch.zeros(i.shape[0]), margin=margin)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": "0.1"}, TypeError, "dpo_loss: beta: expected a number"),
        ({"beta": True}, TypeError, "dpo_loss: beta: expected a number"),
        ({"beta": 0.0}, ValueError, "dpo_loss: beta: expected > 0.0"),
        ({"beta": float("nan")}, ValueError, "dpo_loss: beta: expected a finite number"),
        ({"label_smoothing": 0.5}, ValueError, r"label_smoothing \(0.5 would leave no gradient"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
    ],
)
def test_dpo_loss_checks_its_numbers_up_front(kwargs, error, match):
    gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
    with pytest.raises(error, match=match):
        dpo_loss(gpt, **kwargs)


def test_dpo_and_with_reference_refuse_an_encoder_other_params_and_nan_references():
    from _tiny import tiny_bert

    from fnllm import tree

    gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
    params = gpt.init(jr.key(0))
    with pytest.raises(TypeError, match=r"dpo_loss: model: .* BERT is an encoder"):
        dpo_loss(tiny_bert())
    other = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=16, max_len=16).init(jr.key(0))
    with pytest.raises(KeyError, match=r"with_reference: ref_params: .*blocks\.1"):
        with_reference(lambda step: BATCH, gpt, other)
    nan = tree.map(lambda x: x * float("nan"), params)
    with pytest.raises(ValueError, match=r"with_reference: step 3: .* chosen row 0 as nan"):
        with_reference(lambda step: BATCH, gpt, nan)(3)
    with pytest.raises(TypeError, match="dpo_loss: batch must be a dict, got list"):
        dpo_loss(gpt)(params, {}, [BATCH], None)
