"""Labelled data over epochs (data.epochs on a list of batches, fit(epochs=...)) and
finetune.predict, which puts shuffled, length-bucketed rows back in input order."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import data, finetune, losses, optim, train, tree
from fnllm import random as jr

CLF = finetune.Classifier(tiny_gpt(vocab_size=40, max_len=16), n_classes=3, pooling="last")


def _labelled(n: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
    lengths = jr.randint(jr.key(seed), (n,), 1, 12).tolist()
    ids = [
        jr.randint(jr.fold_in(jr.key(seed), i), (m,), 1, 40).tolist() for i, m in enumerate(lengths)
    ]
    return ids, jr.randint(jr.key(seed + 1), (n,), 0, 3)


def _loss(tr, fr, batch, key):
    p = tree.combine(tr, fr)
    logits = CLF.apply(p, batch["input_ids"], batch["attention_mask"], key=key)
    return losses.classification(logits, batch["labels"])


# ----------------------------------------------------------------------------- data.epochs


def test_each_epoch_visits_every_batch_once_in_its_own_key_driven_order() -> None:
    ids, labels = _labelled(23, 0)
    batches = data.length_batches(ids, labels, 4, key=jr.key(1))
    stream = data.epochs(batches, key=jr.key(2), num_epochs=4)
    n = stream.steps_per_epoch
    assert n == len(batches) == 6 and len(stream) == 24
    orders = []
    for e in range(4):
        got = [stream.batch(e * n + i) for i in range(n)]
        rows = sorted(i for b in got for i in b["index"].tolist())
        assert rows == list(range(23)), e
        orders.append([next(j for j, b in enumerate(batches) if b is g) for g in got])
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs
    again = data.epochs(batches, key=jr.key(2))  # a pure function of (key, step)
    assert all(again.batch(s) is stream.batch(s) for s in (13, 5, 0, 23))
    other = data.epochs(batches, key=jr.key(3))
    assert [other.batch(s) is stream.batch(s) for s in range(24)].count(False) > 0
    tail = data.epochs(batches, key=jr.key(2), num_epochs=4, start_step=22)  # a resume point
    assert [b["index"].tolist() for b in tail] == [
        stream.batch(22)["index"].tolist(),
        stream.batch(23)["index"].tolist(),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([{"x": 1}],), {}, TypeError, "a list of batches needs key="),
        (([],), {"key": jr.key(0)}, ValueError, "the list of batches is empty"),
        (([{"x": 1}],), {"key": 0}, TypeError, "key must be a fnllm.random key"),
        ((lambda e: None,), {"key": jr.key(0)}, TypeError, "key= is for a list of batches"),
        (({"x": 1},), {"key": jr.key(0)}, TypeError, "loader must be a function"),
    ],
)
def test_epochs_refuses_what_it_cannot_shuffle(args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        data.epochs(*args, **kwargs)


# ----------------------------------------------------------------------------- fit(epochs=...)


def test_fit_over_labelled_epochs_resumes_bit_identically_mid_epoch(tmp_path) -> None:
    ids, labels = _labelled(20, 4)
    batches = data.length_batches(ids, labels, 6, key=jr.key(5))  # 4 batches an epoch
    stream = data.epochs(batches, key=jr.key(6), num_epochs=3)
    params = CLF.init(jr.key(7))
    trainable, frozen = tree.partition(params, finetune.strategy("last:1", CLF))
    opt = optim.adamw(1e-2)
    common = dict(key=jr.key(8), epochs=3, compile=False, progress=False)
    whole = train.fit(_loss, opt, trainable, frozen, stream, **common)
    assert whole.step == 12 and len(whole.history) == 12

    class Crash(Exception):
        pass

    def crashing(step: int):
        if step == 6:  # mid-epoch 1, after the checkpoint of step 5 was written
            raise Crash
        return stream.batch(step)

    crashing.steps_per_epoch = stream.steps_per_epoch
    ck = train.Checkpointing(tmp_path / "ck", every=5)
    with pytest.raises(Crash):
        train.fit(_loss, opt, trainable, frozen, crashing, checkpoint=ck, **common)
    assert train.latest_checkpoint(ck.directory).name == "step_00000005.safetensors"
    resumed = train.fit(_loss, opt, trainable, frozen, stream, checkpoint=ck, **common)
    assert [h["step"] for h in resumed.history] == list(range(6, 13))
    for (path, a), b in zip(tree.flatten(whole.trainable).items(), tree.leaves(resumed.trainable)):
        assert torch.equal(a, b), path
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[5:]]


def test_fit_takes_steps_or_epochs_and_checks_them_against_the_stream() -> None:
    batches = [{"x": torch.ones(2)}] * 3
    stream = data.epochs(batches, key=jr.key(0), num_epochs=2)
    args = (lambda tr, fr, b, k: (tr["w"] * b["x"]).sum(), optim.sgd(0.1), {"w": torch.ones(2)})
    kw = dict(key=jr.key(0), progress=False, compile=False)
    with pytest.raises(TypeError, match="give steps= or epochs=, not both"):
        train.fit(*args, {}, stream, steps=3, epochs=1, **kw)
    with pytest.raises(TypeError, match="missing steps="):
        train.fit(*args, {}, stream, **kw)
    with pytest.raises(TypeError, match="needs data with steps_per_epoch"):
        train.fit(*args, {}, lambda s: batches[0], epochs=2, **kw)
    with pytest.raises(ValueError, match=r"epochs must be an int >= 1, got 0"):
        train.fit(*args, {}, stream, epochs=0, **kw)
    with pytest.raises(ValueError, match=r"past the end of data \(2 epochs x 3 steps\)"):
        train.fit(*args, {}, stream, epochs=3, **kw)
    assert train.fit(*args, {}, stream, epochs=2, **kw).step == 6


# ----------------------------------------------------------------------------- predict


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 17),
    batch_size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    bucket=st.sampled_from([None, 4, 16]),
)
def test_predict_returns_rows_in_input_order_for_shuffled_bucketed_batches(
    n: int, batch_size: int, seed: int, bucket: int | None
) -> None:
    ids, labels = _labelled(n, seed)
    params = CLF.init(jr.key(seed))
    batches = data.length_batches(ids, labels, batch_size, key=jr.key(seed + 2), bucket=bucket)
    stream = data.epochs(batches, key=jr.key(seed + 3))
    shuffled = [stream.batch(s) for s in range(stream.steps_per_epoch)]
    out = finetune.predict(CLF, params, shuffled)
    assert torch.equal(out.labels, labels)
    with torch.no_grad():
        alone = torch.cat([CLF.apply(params, torch.tensor([x])) for x in ids])
    torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=1e-5)


def test_predict_with_a_forward_of_its_own_and_without_index() -> None:
    batches = [{"h": torch.tensor([[1.0, 2.0]])}, {"h": torch.tensor([[3.0, 4.0], [5.0, 6.0]])}]
    out = finetune.predict(None, 2.0, batches, forward=lambda p, b: b["h"] * p)
    assert torch.equal(out.logits, torch.tensor([[2.0, 4.0], [6.0, 8.0], [10.0, 12.0]]))
    assert out.labels is None


@pytest.mark.parametrize(
    ("batches", "error", "match"),
    [
        ([], ValueError, "no batches"),
        ([torch.zeros(2, 3)], TypeError, "batch 0 is a Tensor, not a dict"),
        ([{"h": torch.zeros(2, 2), "index": torch.tensor([0, 0])}], ValueError, r"repeated \[0\]"),
        ([{"h": torch.zeros(2, 2), "index": torch.tensor([0, 2])}], ValueError, r"missing \[1\]"),
        ([{"h": torch.zeros(2, 2), "index": torch.tensor([0])}], ValueError, "1 indices for 2"),
        ([{"h": torch.zeros(2, 2), "index": [0, 1]}], TypeError, "index must be a"),
        ([{"h": torch.zeros(2)}], TypeError, r"\[B, C\] logits, got a tensor of shape \(2,\)"),
        (
            [{"h": torch.zeros(1, 2), "labels": torch.zeros(1)}, {"h": torch.zeros(1, 2)}],
            ValueError,
            "batch 1 has no labels",
        ),
        ([{"h": torch.zeros(1, 2)}, {"h": torch.zeros(1, 3)}], ValueError, r"widths \[2, 3\]"),
    ],
)
def test_predict_names_what_is_wrong(batches, error, match) -> None:
    with pytest.raises(error, match=match):
        finetune.predict(None, None, batches, forward=lambda p, b: b["h"])


def test_predict_needs_a_model_with_apply_or_input_ids() -> None:
    with pytest.raises(TypeError, match="model must have apply"):
        finetune.predict(object(), {}, [{"input_ids": torch.ones(1, 2)}])
    with pytest.raises(TypeError, match="a batch needs input_ids"):
        finetune.predict(CLF, CLF.init(jr.key(0)), [{"tokens_": torch.ones(1, 2)}])
