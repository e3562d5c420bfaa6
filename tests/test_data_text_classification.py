"""fnllm.data text classification: files, tokenising, splits, batches and the VADER reader."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnllm import data
from fnllm import random as jr


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_and_jsonl_give_the_same_examples(tmp_path):
    rows = [("good film", "pos"), ("bad, really bad", "neg"), ('said "fine"', "pos")]
    csv_path = tmp_path / "d.csv"
    import csv

    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "y"])
        w.writerows(rows)
    jsonl = _write(
        tmp_path / "d.jsonl", "".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows)
    )
    a = data.read_labelled(csv_path, "sentence", "y")
    b = data.read_labelled(jsonl, "sentence", "y")
    assert a[0] == b[0] == [t for t, _ in rows]
    assert a[1].tolist() == b[1].tolist() == [1, 0, 1]
    assert a[2] == b[2] == ["neg", "pos"]


def test_integer_labels_keep_their_order(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,10\nb,2\nc,10\n")
    _, labels, classes = data.read_labelled(path)
    assert classes == [2, 10] and labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("d.csv", "review,stars\na,1\n", ValueError, "has no column 'text' (columns: ['review'"),
        ("d.csv", "text,label\n", ValueError, "has no rows"),
        ("d.csv", "text,label\na,1\nb,1\n", ValueError, "single class 1"),
        (
            "d.jsonl",
            '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n',
            TypeError,
            "label 0.5 is neither an integer nor a string",
        ),
        ("d.jsonl", '{"text": "a", "label": [1]}\n', TypeError, "neither an integer"),
        (
            "d.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n',
            TypeError,
            "mixes integer and string",
        ),
        ("d.jsonl", '{"text": "a"}\n', ValueError, "has no column 'label'"),
        ("d.jsonl", "not json\n", ValueError, "not valid JSON"),
        ("d.txt", "x", ValueError, "must end in .csv or .jsonl"),
        ("d.csv", "text,label\n,1\nb,0\n", ValueError, "row 1: empty"),
    ],
)
def test_bad_files_raise_naming_the_problem(tmp_path, name, content, error, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(error) as err:
        data.read_labelled(path)
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        data.read_labelled(tmp_path / "nope.csv")


def test_long_texts_are_truncated_with_a_warning_keeping_special_tokens():
    from fnllm import io

    try:
        directory = io.pretrained_dir("all-MiniLM-L6-v2")
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    texts = ["short one", "word " * 600]
    with pytest.warns(UserWarning, match="1 of 2 texts were longer than max_len 16"):
        ids = data.encode_texts(directory, texts, max_len=16)
    assert len(ids[1]) == 16 and ids[1][0] == 101 and ids[1][-1] == 102  # [CLS] ... [SEP]
    bert, params = io.from_hf(directory)
    x, n = data.pad_sequences(ids, 0)
    mask = torch.arange(x.shape[1]) < n[:, None]
    assert bert.apply(params, x, attention_mask=mask).last_hidden_state.shape == (2, 16, 384)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=80), st.integers(0, 2**31 - 1))
def test_stratified_split_covers_every_example_once_and_splits_each_class_alike(labels, seed):
    y = torch.tensor(labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = data.stratified_split(jr.key(seed), y, (0.5, 0.25, 0.25))
    empty = [i for i, p in enumerate(parts) if p.numel() == 0]
    said = [str(w.message) for w in caught if "stratified_split" in str(w.message)]
    assert bool(empty) == bool(said)  # an empty part is always named, and only then
    if empty:
        assert f"part {empty[0]} empty" in said[0]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))
    for c in set(labels):
        n = labels.count(c)
        counts = [int((y[p] == c).sum()) for p in parts]
        assert all(abs(k - f * n) <= 1 for k, f in zip(counts, (0.5, 0.25, 0.25)))
    again = data.stratified_split(jr.key(seed), y, (0.5, 0.25, 0.25))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        data.stratified_split(jr.key(0), torch.tensor([0, 1]), (0.5, 0.6))


@given(st.lists(st.integers(1, 9), min_size=1, max_size=40), st.integers(1, 8))
def test_length_batches_hold_every_example_once_with_its_own_ids(lengths, batch_size):
    ids = [list(range(1, n + 1)) for n in lengths]
    labels = torch.arange(len(ids)) % 2
    batches = data.length_batches(ids, labels, batch_size, key=jr.key(len(ids)), bucket=None)
    seen = torch.cat([b["index"] for b in batches]).sort().values
    assert torch.equal(seen, torch.arange(len(ids)))
    for b in batches:
        assert b["input_ids"].shape[0] <= batch_size
        for row, i in enumerate(b["index"].tolist()):
            n = int(b["attention_mask"][row].sum())
            assert b["input_ids"][row, :n].tolist() == ids[i] and n == len(ids[i])
            assert int(b["labels"][row]) == int(labels[i])
        assert int(b["attention_mask"].sum(1).max()) == b["input_ids"].shape[1]


def test_vader_movie_reviews_when_installed():
    try:
        texts, labels, ratings = data.load_vader()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert len(texts) == 10072 and int(labels.sum()) == 4996
    assert bool(((ratings > 0) == (labels == 1)).all()) and float(ratings.abs().min()) >= 0.5
    assert texts[0].startswith("The Rock is destined")


def test_vader_missing_names_the_path_and_the_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FNLLM_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        data.load_vader()
    assert str(tmp_path / "vaderSentiment-3.3.2.tar.gz") in str(err.value)
    assert ".ci/setup" in str(err.value)


@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.integers(1, 6),
    st.one_of(st.integers(1, 20), st.lists(st.integers(1, 48), min_size=1, max_size=4)),
)
def test_bucketed_batches_pad_to_a_bucket_width_and_keep_every_row(lengths, batch_size, bucket):
    ids = [list(range(1, n + 1)) for n in lengths]
    labels = torch.arange(len(ids)) % 2
    plain = data.length_batches(ids, labels, batch_size, bucket=None)
    bucketed = data.length_batches(ids, labels, batch_size, bucket=bucket)
    assert len(plain) == len(bucketed)
    for p, b in zip(plain, bucketed):
        own, width = p["input_ids"].shape[1], b["input_ids"].shape[1]
        # the allowed widths: the next multiple / listed width, capped at the longest example
        if isinstance(bucket, int):
            want = -(-own // bucket) * bucket
        else:
            want = min((w for w in bucket if w >= own), default=own)
        assert width == max(own, min(want, max(lengths)))
        assert torch.equal(b["input_ids"][:, :own], p["input_ids"])
        assert torch.equal(b["attention_mask"][:, :own], p["attention_mask"])
        assert not b["attention_mask"][:, own:].any()
        assert (b["input_ids"][:, own:] == 0).all()
        assert torch.equal(b["index"], p["index"]) and torch.equal(b["labels"], p["labels"])


@pytest.mark.parametrize("bucket", [0, -16, [8, 0], [], "16", 2.5, True])
def test_length_batches_reject_a_bad_bucket(bucket):
    with pytest.raises(ValueError, match="bucket"):
        data.length_batches([[1, 2]], torch.tensor([0]), 1, bucket=bucket)


def _tiny_classifier(pooling: str):
    from fnllm.finetune import Classifier
    from fnllm.models import BERT, GPT

    if pooling == "last":
        base = GPT(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_len=32)
    else:
        base = BERT(
            vocab_size=50, n_layer=2, n_head=2, d_model=16, d_ff=32, max_len=32,
            mlm_head=False, pair_head=False,
        )  # fmt: skip
    model = Classifier(base, n_classes=3, pooling=pooling)
    return model, model.init(jr.key(0))


def _random_ids(n: int, low: int, high: int) -> list[list[int]]:
    lens = jr.randint(jr.key(5), (n,), low, high + 1).tolist()
    return [jr.randint(jr.fold_in(jr.key(6), i), (k,), 1, 50).tolist() for i, k in enumerate(lens)]


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_bucketing_does_not_change_a_classifiers_logits(pooling):
    model, params = _tiny_classifier(pooling)
    ids = _random_ids(24, 1, 30)
    labels = torch.arange(24) % 3
    with torch.no_grad():
        out = {}
        for bucket in (None, 16, [4, 32]):
            batches = data.length_batches(ids, labels, 5, key=jr.key(1), bucket=bucket)
            logits = torch.cat(
                [model.apply(params, b["input_ids"], b["attention_mask"]) for b in batches]
            )
            index = torch.cat([b["index"] for b in batches])
            out[str(bucket)] = logits[index.argsort()]
    torch.testing.assert_close(out["16"], out["None"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["[4, 32]"], out["None"], rtol=1e-5, atol=1e-5)


def test_ten_lengths_through_a_compiled_loss_compile_once_per_bucket():
    from torch._dynamo.utils import counters

    from fnllm import losses

    model, params = _tiny_classifier("mean")
    ids = _random_ids(40, 1, 32)  # 4 full batches of 4 ... 10 batches of 4 rows
    labels = torch.arange(40) % 3
    plain = data.length_batches(ids, labels, 4, bucket=None)
    batches = data.length_batches(ids, labels, 4, bucket=16)
    assert len({b["input_ids"].shape[1] for b in plain}) >= 8  # many lengths...
    widths = {b["input_ids"].shape[1] for b in batches}
    assert widths <= {16, 32}  # ...two buckets

    def loss(p, x, mask, y):
        return losses.classification(model.apply(p, x, mask), y)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, fullgraph=True, dynamic=False)
    for b, p in zip(batches, plain):
        got = compiled(params, b["input_ids"], b["attention_mask"], b["labels"])
        want = loss(params, p["input_ids"], p["attention_mask"], p["labels"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= len(widths)
    torch._dynamo.reset()


def test_stratified_split_of_large_classes_is_a_keyed_partition():
    labels = torch.arange(9000) % 2  # 4500 per class: the blockwise shuffle
    parts = data.stratified_split(jr.key(3), labels, (0.5, 0.3, 0.2))
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(9000))
    assert [int((labels[p] == 1).sum()) for p in parts] == [2250, 1350, 900]
    other = data.stratified_split(jr.key(4), labels, (0.5, 0.3, 0.2))
    assert not torch.equal(parts[0], other[0])
    again = data.stratified_split(jr.key(3), labels, (0.5, 0.3, 0.2))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
