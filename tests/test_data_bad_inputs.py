"""fnllm.data text readers on bad inputs: each case names the file, line/row or argument."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from fnllm import data
from fnllm import random as jr
from fnllm.data import vader
from fnllm.instruct import read_jsonl


def _write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        # an unquoted comma would shift the label: refused, with the line and the fix
        (
            "text,label\ngreat, really,pos\nbad,neg\n",
            ValueError,
            r"d.csv:2 row 1: 3 fields where the header has 2",
        ),
        (
            "text,label\ngood,pos\nbad\n",
            ValueError,
            r"d.csv:3 row 2: 1 fields where the header has 2",
        ),
        ("text,label\ngood,pos\nbad,\n", ValueError, r"d.csv:3 row 2: empty label"),
        ("text,label\ngood,pos\nbad,   \n", ValueError, r"d.csv:3 row 2: empty label"),
        ("text,label\ngood,pos\n  ,neg\n", ValueError, r"d.csv:3 row 2: empty or non-text"),
        (b"text,label\ngood,pos\nb\xe9d,neg\n", ValueError, r"d.csv:3: bytes that are not UTF-8"),
        (b'text,label\ngood,pos\n"bad\n', ValueError, r"d.csv:\d+: bad CSV"),
        ("", ValueError, r"d.csv is empty \(no header row\)"),
        ("text,label\na,pos\nb,pos\nc,pos\n", ValueError, r"single class 'pos' \(3 rows\)"),
        ("text,label\n", ValueError, "has no rows"),
    ],
)
def test_read_labelled_csv_names_the_odd_row(tmp_path, content, error, match):
    path = _write(tmp_path / "d.csv", content)
    with pytest.raises(error, match=match):
        data.read_labelled(path)


def test_read_labelled_csv_follows_the_csv_quoting_rules(tmp_path):
    text = 'text,label\n"great, really",pos\n"said ""no""",neg\n"two\nlines", pos \n'
    texts, labels, classes = data.read_labelled(_write(tmp_path / "d.csv", text))
    assert texts == ["great, really", 'said "no"', "two\nlines"]
    assert classes == ["neg", "pos"] and labels.tolist() == [1, 0, 1]
    # a UTF-8 byte-order mark (Excel's "CSV UTF-8") does not hide the first column's name
    bom = _write(tmp_path / "bom.csv", b"\xef\xbb\xbftext,label\na,x\nb,y\n")
    assert data.read_labelled(bom)[2] == ["x", "y"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            b'{"text": "a", "label": "x"}\n{"text": "b\xff", "label": "y"}\n',
            r"d.jsonl:2: bytes that are not UTF-8",
        ),
        (
            '{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n',
            r"d.jsonl:2 row 2: empty label",
        ),
        (
            '{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n',
            r"d.jsonl:2 row 2: empty or non-text",
        ),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label"\n', r"d.jsonl:2: not valid JSON"),
        ('{"text": "a", "label": "x"}\n[1, 2]\n', r"d.jsonl:2: expected a JSON object"),
    ],
)
def test_read_labelled_jsonl_names_the_odd_line(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        data.read_labelled(_write(tmp_path / "d.jsonl", content))


def test_read_labelled_refuses_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="path must be a str"):
        data.read_labelled(3)
    with pytest.raises(TypeError, match="text_column must be a non-empty str"):
        data.read_labelled(tmp_path / "d.csv", text_column=None)
    with pytest.raises(TypeError, match="label_column must be a non-empty str"):
        data.read_labelled(tmp_path / "d.csv", label_column=1)


def test_read_jsonl_names_undecodable_and_missing_files(tmp_path):
    path = _write(tmp_path / "s.jsonl", b'{"instruction": "a", "response": "\xc3("}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: bytes that are not UTF-8"):
        read_jsonl(path, ["instruction", "response"])
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", ["instruction"])
    with pytest.raises(TypeError, match="expected a file path"):
        read_jsonl(None, ["instruction"])


class _Tok:
    """The least a tokenizer needs for encode_texts (load_tokenizer passes objects through)."""


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(data.default_documents(), "wordpiece", vocab_size=200)


@pytest.mark.parametrize(
    ("texts", "max_len", "error", "match"),
    [
        ("a river", 8, TypeError, r"got one str 'a river' \(wrap it: \[text\]\)"),
        (b"a river", 8, TypeError, "got one bytes"),
        (["a", 3], 8, TypeError, r"texts\[1\] is a int"),
        (["a", None], 8, TypeError, r"texts\[1\] is a NoneType"),
        (5, 8, TypeError, "texts must be a list of strings, got int"),
        (["a"], 1, ValueError, "max_len must be an int >= 2, got 1"),
        (["a"], 8.0, TypeError, "max_len"),
        (["a"], True, TypeError, "max_len"),
    ],
)
def test_encode_texts_refuses_bad_inputs(tok, texts, max_len, error, match):
    with pytest.raises(error, match=match):
        data.encode_texts(tok, texts, max_len)


@pytest.mark.parametrize(
    ("labels", "fractions", "error", "match"),
    [
        (torch.tensor([True, False]), (0.5, 0.5), TypeError, "bool tensor"),
        ("0101", (0.5, 0.5), TypeError, "labels must be an int \\[N\\] tensor, got str"),
        (torch.tensor([0.0, 1.0]), (0.5, 0.5), ValueError, "labels must be \\[N\\] ints"),
        (torch.tensor([[0, 1]]), (0.5, 0.5), ValueError, r"\(1, 2\)"),
        (torch.tensor([0, 1]), 0.5, TypeError, "fractions must be a sequence"),
        (torch.tensor([0, 1]), (True, False), TypeError, "fractions must be numbers"),
        (torch.tensor([0, 1]), (0.5, 0.6), ValueError, "sum to 1"),
    ],
)
def test_stratified_split_refuses_bad_inputs(labels, fractions, error, match):
    with pytest.raises(error, match=match):
        data.stratified_split(jr.key(0), labels, fractions)


def test_stratified_split_accepts_a_list_of_labels():
    parts = data.stratified_split(jr.key(0), [0, 1, 0, 1], (0.5, 0.5))
    assert sorted(torch.cat(parts).tolist()) == [0, 1, 2, 3]


def _fake_vader(tmp_path, lines):
    member = "\n".join(lines).encode()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo(vader._MEMBER)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    with tarfile.open(tmp_path / vader.SDIST, "w:gz") as outer:
        info = tarfile.TarInfo(vader._INNER)
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))
    return tmp_path


def test_load_vader_never_labels_a_zero_rating_and_checks_neutral(tmp_path):
    d = _fake_vader(tmp_path, ["1\t0.0\tmeh", "2\t0.3\tok", "3\t-0.6\tbad", "4\t2.5\tgreat"])
    texts, labels, _ = data.load_vader(d, neutral=0.0)
    assert texts == ["ok", "bad", "great"] and labels.tolist() == [1, 0, 1]  # 0.0 left out
    texts, labels, _ = data.load_vader(d, neutral=0.5)
    assert texts == ["bad", "great"] and labels.tolist() == [0, 1]
    for bad, error in ((-0.1, ValueError), (float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="neutral"):
            data.load_vader(d, neutral=bad)


def test_load_vader_names_a_malformed_line(tmp_path):
    d = _fake_vader(tmp_path, ["1\t0.9\tgood", "2\tabc\toops"])
    with pytest.raises(ValueError, match=r"GroundTruth.txt:2: rating 'abc' is not a number"):
        data.load_vader(d)


@pytest.mark.parametrize(
    ("ids", "labels", "batch_size", "error", "match"),
    [
        ("abc", torch.tensor([0, 1, 0]), 2, TypeError, "ids must be a list of id lists, got 'abc'"),
        ([[1], [2]], "01", 2, TypeError, "labels must be a tensor, got str"),
        ([[1], [2]], torch.tensor([0, 1]), True, TypeError, "batch_size must be an int"),
        ([[1], [2]], torch.tensor([0, 1]), 2.0, TypeError, "batch_size must be an int"),
        ([[1], [2]], torch.tensor([0, 1]), 0, ValueError, "batch_size must be an int >= 1, got 0"),
        ([], torch.tensor([], dtype=torch.long), 2, ValueError, "no examples"),
        ([[1], []], torch.tensor([0, 1]), 2, ValueError, r"ids\[1\] is empty"),
        ([[1], [2]], torch.tensor([0]), 2, ValueError, r"labels shape \(1,\) != \[2\]"),
    ],
)
def test_length_batches_names_bad_inputs(ids, labels, batch_size, error, match):
    with pytest.raises(error, match=match):
        data.length_batches(ids, labels, batch_size)


def test_length_batches_accepts_a_list_of_labels():
    (batch,) = data.length_batches([[1, 2], [3]], [1, 0], 2)
    assert sorted(batch["labels"].tolist()) == [0, 1]


def test_vader_path_names_a_bad_folder():
    with pytest.raises(TypeError, match="data_dir: expected a folder path, got 3"):
        data.load_vader(3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("text,text,label\na,b,x\nc,d,y\n", r"d.csv:1: the header names column 'text' 2 times"),
        (b"text,label\na,x\nb\x00c,y\n", r"d.csv:3: a NUL byte \(a UTF-16 or binary file\?\)"),
        ("text,label\na,x\nb,y\n".encode("utf-16"), r"d.csv:1: bytes that are not UTF-8"),
    ],
)
def test_read_labelled_refuses_duplicate_columns_and_binary_bytes(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        data.read_labelled(_write(tmp_path / "d.csv", content))


@pytest.mark.parametrize(
    ("labels", "fractions", "error", "match"),
    [
        (["a", "b", "a", "b"], (0.5, 0.5), TypeError, "labels must be int class ids .* got list"),
        (
            torch.tensor([0, 1, 0, 1]),
            (float("nan"), 1.0),
            ValueError,
            "fractions must be positive and finite",
        ),
        (
            torch.tensor([0, 1, 0, 1]),
            (float("inf"), -1.0),
            ValueError,
            "fractions must be positive and finite",
        ),
    ],
)
def test_stratified_split_refuses_string_labels_and_non_finite_fractions(
    labels, fractions, error, match
):
    with pytest.raises(error, match=f"stratified_split: {match}"):
        data.stratified_split(jr.key(0), labels, fractions)


def test_stratified_split_names_an_empty_part_and_splits_any_integer_ids():
    with pytest.warns(UserWarning, match=r"leave part 0 empty \(sizes \[0, 1\]\)"):
        parts = data.stratified_split(jr.key(0), torch.tensor([0]), (0.4, 0.6))
    assert [p.tolist() for p in parts] == [[], [0]]
    big = torch.tensor([0, 10**12, 0, 10**12, -5, -5])
    np = pytest.importorskip("numpy")
    for labels in (big, np.array(big.tolist())):
        parts = data.stratified_split(jr.key(0), labels, (0.5, 0.5))
        assert sorted(torch.cat(parts).tolist()) == list(range(6))
        assert all(int((big[p] == c).sum()) == 1 for p in parts for c in (0, 10**12, -5))


def test_load_vader_names_a_truncated_download(tmp_path):
    (tmp_path / "good").mkdir()
    good = _fake_vader(tmp_path / "good", ["1\t0.9\tgood", "2\t-0.9\tbad"])
    raw = (good / vader.SDIST).read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / vader.SDIST).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"load_vader: .*{vader.SDIST} is damaged \(truncated"):
        data.load_vader(bad)


def test_length_batches_refuses_a_negative_token_id_naming_the_example():
    with pytest.raises(ValueError, match=r"length_batches: ids\[1\] holds a negative token id"):
        data.length_batches([[1, 2], [3, -1]], torch.tensor([0, 1]), 2)
