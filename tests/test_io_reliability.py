"""Issue 11: crash leftovers, per-tensor checksums, atomic to_hf, shard paths kept inside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fnllm import io, random
from fnllm.io import _safetensors
from fnllm.models.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]

# A writer that stops for good once its temp file is complete (just before the rename), so the
# test can kill it "mid-save" at a known point, or keep it alive while another process saves.
_STUCK_WRITER = """
import os, sys, time, torch
from fnllm import io
real_replace = os.replace
def stuck(src, dst):
    print("written", flush=True)
    time.sleep(3600)
os.replace = stuck
io.save(sys.argv[1], {"w": torch.arange(1000.0)})
"""


def _start_stuck_writer(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "written", line
    return proc


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_a_save_cleans_the_temp_file_of_a_writer_killed_mid_save_but_not_a_live_one(tmp_path):
    dead = _start_stuck_writer(tmp_path / "a.safetensors")
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    (left,) = _temps(tmp_path)
    assert f".{dead.pid}." in left and not (tmp_path / "a.safetensors").exists()

    live = _start_stuck_writer(tmp_path / "b.safetensors")
    try:
        live_tmp = [n for n in _temps(tmp_path) if f".{live.pid}." in n]
        assert len(live_tmp) == 1
        io.save(tmp_path / "c.safetensors", {"x": torch.ones(2)})
        # the dead writer's leftover is gone; the live writer's file is untouched
        assert _temps(tmp_path) == live_tmp
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
    assert io.clean_temp_files(tmp_path) == [str(tmp_path / live_tmp[0])]
    assert _temps(tmp_path) == []


def test_old_temp_files_are_removed_by_age_only(tmp_path):
    fresh = tmp_path / ".w.safetensors.12345.0123abcd.tmp"  # old naming: no host
    stale = tmp_path / ".v.safetensors.otherhost.1.89abcdef.tmp"
    unrelated = tmp_path / "notes.tmp"
    for p in (fresh, stale, unrelated):
        p.write_bytes(b"x")
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    assert io.clean_temp_files(tmp_path) == [str(stale)]
    assert fresh.exists() and unrelated.exists()


def test_flipped_byte_is_reported_with_the_tensor_name(tmp_path):
    path = tmp_path / "t.safetensors"
    io.save(path, {"a": torch.zeros(4), "b": {"c": torch.arange(6.0)}})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x10  # the last byte belongs to the last tensor in the data section
    path.write_bytes(bytes(raw))
    header, _ = _safetensors.read_header(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(ValueError, match=rf"tensor '{last}' is corrupt.*verify=False"):
        io.load(path)
    loaded = io.load(path, verify=False)  # opt-out: loads the damaged data as it is
    assert loaded["b"]["c"].shape == (6,)


def test_checksums_cover_models_and_train_checkpoints(tmp_path):
    gpt = GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
    path = tmp_path / "m.safetensors"
    io.save_model(path, gpt, gpt.init(random.key(0)))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 + 40] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt"):
        io.load_model(path)
    io.load_model(path, verify=False)


def test_files_without_checksums_still_load(tmp_path):
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(path), metadata={"format": "pt"})
    torch.testing.assert_close(io.load(path)["w"], torch.ones(3))
    assert "fnllm.crc32" in _safetensors.read_header(_save(tmp_path))[1]


def _save(d: Path) -> Path:
    p = d / "new.safetensors"
    tree = {"w": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0), "s": torch.tensor(1)}
    io.save(p, tree)
    io.load(p)  # bf16, empty and 0-d tensors checksum fine
    return p


# ----------------------------------------------------------------------------- to_hf / from_hf


def _gpt_dir(tmp_path: Path) -> tuple[GPT, Path]:
    gpt = GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
    return gpt, io.to_hf(gpt, gpt.init(random.key(0)), tmp_path / "hf")


def test_to_hf_crash_between_files_is_refused_by_from_hf(tmp_path, monkeypatch):
    _, out = _gpt_dir(tmp_path)
    bigger = GPT(vocab_size=16, n_layer=2, n_head=2, d_model=8, max_len=8)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after config.json, before the weights

    monkeypatch.setattr(_safetensors, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        io.to_hf(bigger, bigger.init(random.key(1)), out)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2  # new config, old weights
    with pytest.raises(ValueError, match=r"unfinished fnllm\.io\.to_hf export"):
        io.from_hf(out)
    monkeypatch.undo()
    io.to_hf(bigger, bigger.init(random.key(1)), out)  # a finished export loads again
    assert io.from_hf(out)[0] == bigger
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def _sharded(out: Path, shard: str) -> None:
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard for k in state}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_from_hf_refuses_shards_outside_the_model_folder(tmp_path, kind):
    _, out = _gpt_dir(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((out / "model.safetensors").read_bytes())
    shard = {"dotdot": "../elsewhere.safetensors", "absolute": str(outside)}.get(kind, "link")
    if kind == "symlink":
        (out / "link").symlink_to(outside)
    _sharded(out, shard)
    with pytest.raises(ValueError, match="outside the model folder"):
        io.from_hf(out)


def test_from_hf_reads_shards_inside_the_folder(tmp_path):
    gpt, out = _gpt_dir(tmp_path)
    (out / "sub").mkdir()
    os.replace(out / "model.safetensors", out / "sub" / "part.safetensors")
    (out / "model.safetensors").symlink_to(out / "sub" / "part.safetensors")
    _sharded(out, "sub/part.safetensors")
    assert io.from_hf(out)[0] == gpt
