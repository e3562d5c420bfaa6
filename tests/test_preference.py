"""Tests for fnllm.preference: batches, a reward model and DPO on tiny models, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fnllm import losses, optim, preference, train, tree
from fnllm import random as jr
from fnllm.finetune import Classifier
from fnllm.models import GPT

GPT_BYTES = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=32, max_len=40)
PAIRS = [
    {"prompt": "Review 1:", "chosen": " kind and helpful", "rejected": " rude"},
    {"prompt": "Review 2:", "chosen": " helpful", "rejected": " rude and wrong"},
    {"prompt": "Review 3:", "chosen": " kind", "rejected": " wrong"},
    {"prompt": "Review 4:", "chosen": " very kind", "rejected": " very rude"},
]


def encode(text: str) -> list[int]:
    return list(text.encode("ascii"))


@pytest.fixture(scope="module")
def batch() -> dict:
    return preference.preference_batch(PAIRS, encode, eos_id=0, max_len=40)


def test_batch_rows_and_response_masks(batch: dict) -> None:
    for i, rec in enumerate(PAIRS):
        for name in ("chosen", "rejected"):
            ids = encode(rec["prompt"]) + encode(rec[name]) + [0]
            row = batch[f"{name}_ids"][i]
            assert row[: len(ids)].tolist() == ids
            assert batch[f"{name}_mask"][i].sum() == len(ids)
            resp = batch[f"{name}_response"][i].nonzero().flatten().tolist()
            assert resp == list(range(len(encode(rec["prompt"])), len(ids)))


def test_read_preferences_names_the_bad_line(tmp_path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match=r"prefs\.jsonl:2: missing field 'rejected'"):
        preference.read_preferences(path)
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1])[:-3] + "\n")
    with pytest.raises(ValueError, match=r"prefs\.jsonl:2: not valid JSON"):
        preference.read_preferences(path)
    path.write_text("\n".join(json.dumps(p) for p in PAIRS))
    assert preference.read_preferences(path) == PAIRS


def test_dpo_loss_equals_losses_dpo_on_per_row_logprobs(batch: dict) -> None:
    policy = GPT_BYTES.init(jr.key(0))
    ref = GPT_BYTES.init(jr.key(1))
    full = preference.with_reference(lambda s: batch, GPT_BYTES, ref)(0)
    loss, aux = preference.dpo_loss(GPT_BYTES, beta=0.5)(policy, {}, full, None)

    def logp(params: dict, rec: dict, name: str) -> torch.Tensor:
        prompt = encode(rec["prompt"])
        ids = torch.tensor([prompt + encode(rec[name]) + [0]])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt) :] = True
        return losses.sequence_logprobs(GPT_BYTES.apply(params, ids), ids, mask)[0]

    pc, pr, rc, rr = (
        torch.stack([logp(p, rec, n) for rec in PAIRS])
        for p, n in ((policy, "chosen"), (policy, "rejected"), (ref, "chosen"), (ref, "rejected"))
    )
    torch.testing.assert_close(loss, losses.dpo(pc, pr, rc, rr, beta=0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux["chosen_logratio"], (pc - rc).mean(), atol=1e-4, rtol=1e-5)
    assert not full["ref_chosen_logps"].requires_grad


def test_reward_model_learns_to_rank_chosen_above_rejected(batch: dict) -> None:
    rm = Classifier(GPT_BYTES, n_classes=1, pooling="last", head_std=0.0)
    params = rm.init(jr.key(0))
    loss_fn = preference.reward_loss(rm)
    loss0, _ = loss_fn(params, {}, batch, None)
    assert float(loss0) == pytest.approx(math.log(2), abs=1e-6)  # zero head: all rewards 0
    result = train.fit(
        loss_fn, optim.adamw(3e-3), params, {}, lambda s: batch,
        key=jr.key(1), steps=40, compile=False, progress=False,
    )  # fmt: skip
    loss1, aux1 = loss_fn(result.trainable, {}, batch, None)
    assert float(loss1) < 0.3 * float(loss0)
    assert float(aux1["accuracy"]) == 1.0 and float(aux1["margin"]) > 1.0
    # unseen pairs built from the same words rank the same way
    held = preference.preference_batch(
        [{"prompt": "Review 9:", "chosen": " kind and helpful", "rejected": " rude and wrong"}],
        encode, eos_id=0, max_len=40,
    )  # fmt: skip
    assert float(loss_fn(result.trainable, {}, held, None)[1]["accuracy"]) == 1.0


def test_reward_loss_takes_a_plain_scoring_function(batch: dict) -> None:
    def length_score(params: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return params["w"] * mask.sum(-1).float()

    loss, aux = preference.reward_loss(length_score)({"w": torch.tensor(1.0)}, {}, batch, None)
    chosen = batch["chosen_mask"].sum(-1).float()
    rejected = batch["rejected_mask"].sum(-1).float()
    torch.testing.assert_close(loss, losses.pairwise_reward(chosen, rejected))
    assert float(aux["accuracy"]) == float((chosen > rejected).float().mean())


def test_dpo_raises_the_chosen_log_ratio_against_a_frozen_reference(batch: dict) -> None:
    ref = GPT_BYTES.init(jr.key(2))
    ref_copy = tree.map(torch.clone, ref)
    data = preference.with_reference(lambda s: batch, GPT_BYTES, ref)
    loss_fn = preference.dpo_loss(GPT_BYTES, beta=0.5)
    result = train.fit(
        loss_fn, optim.adamw(3e-3), ref, {}, data,
        key=jr.key(3), steps=25, compile=False, progress=False,
    )  # fmt: skip
    loss, aux = loss_fn(result.trainable, {}, data(0), None)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == ref
    assert float(loss) < 0.2
    assert float(aux["margin"]) > 1.0
    assert float(aux["chosen_logratio"]) > float(aux["rejected_logratio"])
    assert float(aux["chosen_logratio"]) > 0.0
    # the reference tree was only read
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(ref), tree.leaves(ref_copy)))


def test_dpo_needs_reference_logprobs(batch: dict) -> None:
    with pytest.raises(KeyError, match="ref_chosen_logps"):
        preference.dpo_loss(GPT_BYTES)(GPT_BYTES.init(jr.key(0)), {}, batch, None)
    with pytest.raises(ValueError, match="beta"):
        preference.dpo_loss(GPT_BYTES, beta=0.0)
    with pytest.raises(TypeError, match="scorer"):
        preference.reward_loss(3)
