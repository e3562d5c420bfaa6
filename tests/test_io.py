"""Tests for fnllm.io checkpoints: exact round trips, atomic saves, corrupt files, model files."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import io, random, testing, tree
from fnllm.models.bert import BERT
from fnllm.models.gpt import GPT

# ----------------------------------------------------------------------------- strategies

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
_keys = st.text(alphabet="abz_019", min_size=1, max_size=4)


_SHAPES = testing.shapes(max_dims=3, min_side=0, max_side=3)
_tensors = st.tuples(
    st.one_of(
        testing.tensors(_SHAPES, _DTYPES[:4], min_value=-6e4, max_value=6e4),  # float16 max 65504
        testing.tensors(_SHAPES, _DTYPES[4:], min_value=-(2**62), max_value=2**62),
    ),
    st.booleans(),
).map(lambda xt: xt[0].transpose(0, 1) if xt[1] and xt[0].dim() >= 2 else xt[0])  # non-contiguous
_plain = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(-1e6, 1e6))
# any tree: a leaf or any container at the root, empty containers, dict keys that may be digits
_trees = testing.trees(
    st.one_of(_tensors, _tensors, _plain),
    max_leaves=10,
    min_leaves=0,
    tuples=True,
    root="any",
    empty=True,
    names=_keys,
)


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(_trees, st.dictionaries(_keys, st.one_of(_plain, st.lists(st.integers()))))
def test_save_then_load_is_identity(tmp_path_factory, t, meta):
    path = tmp_path_factory.mktemp("rt") / "t.safetensors"
    before = tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)
    io.save(path, t, meta=meta)
    loaded, loaded_meta = io.load(path, with_meta=True)
    testing.assert_trees_equal(loaded, t, bitwise=True, ordered=True)
    assert loaded_meta == meta
    testing.assert_trees_equal(t, before, bitwise=True, ordered=True)  # input not modified
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temp left behind


def test_file_from_another_tool_loads_by_paths(tmp_path):
    flat = {f"blocks.{i}.w": torch.full((2,), float(i)) for i in range(11)}
    flat["ln.b"] = torch.ones(1)
    safetensors.torch.save_file(flat, tmp_path / "x.safetensors", metadata={"k": "v"})
    loaded, meta = io.load(tmp_path / "x.safetensors", with_meta=True)
    assert [b["w"][0].item() for b in loaded["blocks"]] == [float(i) for i in range(11)]
    assert tree.paths(loaded) == sorted(flat, key=lambda p: (p.split(".")[0], len(p), p))
    assert meta == {"k": "v"}


def test_tied_leaves_load_as_one_tensor(tmp_path):
    w = torch.randn(6, 4)
    t = {"embed": w, "head": w, "q": w[:3], "k": w[3:], "wt": w.t(), "col": w[:, 1]}
    io.save(tmp_path / "t.safetensors", t)
    r = io.load(tmp_path / "t.safetensors")
    assert r["embed"] is r["head"]
    for k in t:
        assert torch.equal(r[k], t[k]), k
    # views of one storage come back as independent tensors
    assert r["q"].untyped_storage().data_ptr() != r["k"].untyped_storage().data_ptr()
    # the file holds each shared tensor once and names the alias
    with safetensors.safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert "head" not in list(f.keys())
        assert json.loads(f.metadata()["fnllm.aliases"]) == {"head": "embed"}


def test_save_takes_grad_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(3, 5, requires_grad=True)
    t = {"w": w * 2, "p": torch.nn.Parameter(torch.randn(2, 2)), "e": torch.randn(4, 6)[::2, 1:]}
    io.save(tmp_path / "g.safetensors", t)
    r = io.load(tmp_path / "g.safetensors")
    assert not r["w"].requires_grad and torch.equal(r["w"], (w * 2).detach())
    assert torch.equal(r["e"], t["e"]) and r["e"].is_contiguous()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("t", "meta", "err", "text"),
    [
        ({"a.b": torch.zeros(1)}, None, ValueError, "'a.b'"),
        ({1: torch.zeros(1)}, None, ValueError, "1"),
        ({"a": [object()]}, None, TypeError, "a.0"),
        ({"a": torch.zeros(1)}, {"fnllm.structure": 1}, ValueError, "reserved"),
        ({"a": torch.zeros(1)}, {"format": "x"}, ValueError, "reserved"),
        ({"a": torch.zeros(1)}, {"bad": object()}, TypeError, "meta['bad']"),
        ({"a": torch.zeros(1, device="meta")}, None, TypeError, "meta tensor"),
    ],
)
def test_bad_trees_and_meta_raise_and_write_nothing(tmp_path, t, meta, err, text):
    with pytest.raises(err, match=text.replace("[", r"\[").replace(".", r"\.")):
        io.save(tmp_path / "x.safetensors", t, meta=meta)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomicity


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    old = {"w": torch.arange(6.0)}
    io.save(path, old)

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a partial header
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save(path, {"w": torch.zeros(100)})
    monkeypatch.undo()
    testing.assert_trees_equal(io.load(path), old, bitwise=True, ordered=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


_KILLED_SAVER = textwrap.dedent(
    """
    import sys, time, torch, safetensors.torch
    from fnllm import io
    real = safetensors.torch.save_file

    def slow(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file, as a crash mid-write leaves it
            f.truncate(f.seek(0, 2) // 2)
        print("MID", filename, flush=True)
        time.sleep(60)

    safetensors.torch.save_file = slow
    io.save(sys.argv[1], {"w": torch.ones(4_000_000), "b": [torch.ones(1_000_000)]})
    """
)


def test_killed_save_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    old = {"w": torch.arange(10.0), "b": [torch.zeros(3)]}
    io.save(path, old)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("MID"), line
        tmp = Path(line.split(maxsplit=1)[1].strip())
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.safetensors.")
        assert tmp.stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    testing.assert_trees_equal(io.load(path), old, bitwise=True, ordered=True)
    with pytest.raises(ValueError, match="truncated"):  # the stray temp is the half file
        io.load(tmp)


def test_save_killed_at_any_moment_leaves_old_or_new_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    old = {"w": torch.zeros(10)}
    io.save(path, old)
    code = "import sys, torch; from fnllm import io\n" + (
        "print('GO', flush=True); io.save(sys.argv[1], {'w': torch.ones(16_000_000)})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout.readline().startswith("GO")
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    loaded = io.load(path)["w"]
    assert loaded.shape in ((10,), (16_000_000,))
    assert torch.equal(loaded, torch.zeros(10) if loaded.shape == (10,) else torch.ones(16_000_000))


# ----------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    io.save(path, {"a": torch.randn(4, 4), "b": [torch.arange(5)]}, meta={"m": 1})
    return path


def test_truncated_file_at_every_length_raises_valueerror_naming_it(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        for fn in (io.load, io.load_meta):
            with pytest.raises(ValueError, match=r"bad\.safetensors"):
                fn(bad)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_corrupt_header_bytes_raise_valueerror_or_load(good_file, data):
    raw = bytearray(good_file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, 8 + n - 1))
        raw[i] = data.draw(st.integers(0, 255))
    bad = good_file.with_name("corrupt.safetensors")
    bad.write_bytes(bytes(raw))
    try:
        io.load(bad)
    except ValueError as e:
        assert "corrupt.safetensors" in str(e)


def test_not_a_safetensors_file_raises_valueerror(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # e.g. a zip / torch.save file
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        io.load(p)
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- models


_GPT = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=8, max_len=16)
_BERT = BERT(vocab_size=32, n_layer=2, n_head=2, d_model=8, d_ff=16, max_len=16)


@pytest.mark.parametrize("model", [_GPT, _BERT, dataclasses.replace(_GPT, tie_head=False)])
def test_save_model_then_load_model_is_identity(tmp_path, model):
    params = model.init(random.key(1))
    io.save_model(tmp_path / "m.safetensors", model, params, meta={"step": 5})
    m2, p2, meta = io.load_model(tmp_path / "m.safetensors", with_meta=True)
    assert m2 == model and meta == {"step": 5}
    testing.assert_trees_equal(params, p2, bitwise=True, ordered=True)


def _flat_edit(params, **changes):
    flat = dict(tree.flatten(params))
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del flat[k]
        else:
            flat[k] = v
    return tree.unflatten(flat)


@pytest.mark.parametrize(
    ("edit", "err", "names"),
    [
        ({"ln_f__bias": None}, KeyError, ["missing", "ln_f.bias"]),
        ({"ln_f__extra": torch.zeros(1)}, KeyError, ["unexpected", "ln_f.extra"]),
        ({"blocks__1__mlp__fc__weight": torch.zeros(3, 8)}, ValueError, ["blocks.1.mlp.fc.weight"]),
    ],
)
def test_save_model_checks_params_against_the_config(tmp_path, edit, err, names):
    params = _flat_edit(_GPT.init(random.key(0)), **edit)
    with pytest.raises(err) as e:
        io.save_model(tmp_path / "m.safetensors", _GPT, params)
    assert all(n in str(e.value) for n in names)
    assert list(tmp_path.iterdir()) == []


def _rewrite_config(path: Path, **changes) -> None:
    with safetensors.safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
        meta = f.metadata()
    cfg = json.loads(meta["fnllm.config"])
    cfg.update(changes)
    meta["fnllm.config"] = json.dumps(cfg)
    safetensors.torch.save_file(tensors, path, metadata=meta)


def test_load_model_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_model(path, _GPT, _GPT.init(random.key(0)))
    _rewrite_config(path, d_model=16)
    with pytest.raises(ValueError, match=r"m\.safetensors.*embed\.tokens\.weight"):
        io.load_model(path)
    io.save_model(path, _GPT, _GPT.init(random.key(0)))
    _rewrite_config(path, n_layer=3)
    with pytest.raises(KeyError, match=r"missing.*blocks\.2\.attn\.qkv\.weight"):
        io.load_model(path)
    io.save_model(path, _GPT, _GPT.init(random.key(0)))
    _rewrite_config(path, type="llama")
    with pytest.raises(ValueError, match="llama"):
        io.load_model(path)


def test_load_model_reads_a_config_saved_with_sop_head(tmp_path):
    path, bert = tmp_path / "m.safetensors", dataclasses.replace(_BERT, pair_head=False)
    params = bert.init(random.key(0))
    io.save_model(path, bert, params)
    with safetensors.safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in list(f.keys())}, f.metadata()
    meta["fnllm.config"] = meta["fnllm.config"].replace('"pair_head"', '"sop_head"')
    safetensors.torch.save_file(tensors, path, metadata=meta)  # as written before the rename
    model, loaded = io.load_model(path)
    assert model == bert
    testing.assert_trees_equal(loaded, params, bitwise=True)


def test_load_model_on_a_plain_tree_file_says_so(tmp_path):
    io.save(tmp_path / "t.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="no model config"):
        io.load_model(tmp_path / "t.safetensors")
