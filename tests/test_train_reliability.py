"""Issue 11 and 10 for fit: one run per folder, crash leftovers, checksums, refused options,
loss checks, the Checkpointing value, the progress bar and the compile choice."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnllm import optim, train
from fnllm import random as jr
from fnllm.train import _run

fit_module = sys.modules["fnllm.train.fit"]  # the module (the package re-exports the function)

ROOT = Path(__file__).resolve().parents[1]

# One run of a tiny regression, as its own process: argv = folder, seed, resume, overwrite,
# steps, and optionally the step whose save hangs after its temp file is complete.
_RUN = """
import os, sys, time, torch
from fnllm import optim, random, train
d, seed, resume, overwrite, steps = sys.argv[1:6]
if len(sys.argv) > 6:
    hang = f"step_{int(sys.argv[6]):08d}.safetensors"
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith(hang):
            print("saving", flush=True)
            time.sleep(3600)
        return real(src, dst)
    os.replace = replace
loss = lambda tr, fr, b, k: ((b @ tr["w"] - 1.0) ** 2).mean()
out = train.fit(
    loss, optim.adamw(0.1), {"w": torch.zeros(2)}, {}, lambda s: torch.eye(2) * (1 + s % 3),
    key=random.key(int(seed)), steps=int(steps), compile=False, progress=False,
    resume=resume == "1",
    checkpoint=train.Checkpointing(d, every=1, keep=2, overwrite=overwrite == "1"),
)
print("step", out.step, flush=True)
"""


def _loss(tr, fr, b, k):
    return ((b @ tr["w"] - 1.0) ** 2).mean()


def _data(s):
    return torch.eye(2) * (1 + s % 3)


def _run_proc(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _RUN, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_two_runs_in_one_folder_never_mix(tmp_path):
    first = _run_proc(tmp_path, 0, 1, 0, 6)
    assert first.returncode == 0, first.stderr
    assert _names(tmp_path) == ["step_00000005.safetensors", "step_00000006.safetensors"]
    # a new run (resume=False) into that folder is refused, with the way out in the message
    second = _run_proc(tmp_path, 1, 0, 0, 3)
    assert second.returncode != 0
    assert "already holds 2 checkpoint(s)" in second.stderr and "overwrite=True" in second.stderr
    assert _names(tmp_path) == ["step_00000005.safetensors", "step_00000006.safetensors"]
    # told to overwrite: the old run's files go, the new run keeps every file it wrote
    third = _run_proc(tmp_path, 1, 0, 1, 3)
    assert third.returncode == 0, third.stderr
    assert _names(tmp_path) == ["step_00000002.safetensors", "step_00000003.safetensors"]
    tr = {"w": torch.zeros(2)}
    ck = train.load_checkpoint(
        tmp_path / "step_00000003.safetensors", trainable=tr, opt_state=optim.adamw(0.1).init(tr)
    )
    assert ck.step == 3 and torch.equal(ck.key, jr.key(1))


def test_a_run_finding_newer_checkpoints_of_another_run_stops_instead_of_pruning(tmp_path):
    kw = dict(key=jr.key(0), compile=False, progress=False)
    other = tmp_path / "other"
    train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, steps=9,
              checkpoint=other, **kw)  # fmt: skip
    mine = tmp_path / "mine"

    def intruder(tr, fr):  # another process drops a later checkpoint into our folder
        mine.mkdir(exist_ok=True)
        (mine / "step_00000009.safetensors").write_bytes(
            (other / "step_00000009.safetensors").read_bytes()
        )
        return 0.0

    with pytest.raises(ValueError, match="another run is writing into this folder"):
        train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, steps=4,
                  checkpoint=train.Checkpointing(mine, every=2), eval_fn=intruder,
                  eval_every=1, **kw)  # fmt: skip
    assert "step_00000002.safetensors" in _names(mine)  # what it wrote is still there


def test_kill_during_a_checkpoint_save_then_resume_cleans_up_and_matches(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, *(str(a) for a in (tmp_path, 0, 1, 0, 5, 3))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    tmp, *done = _names(tmp_path)
    assert done == ["step_00000001.safetensors", "step_00000002.safetensors"]
    assert tmp.startswith(".step_00000003") and tmp.endswith(".tmp")
    kw = dict(key=jr.key(0), steps=5, compile=False, progress=False)
    resumed = train.fit(_loss, optim.adamw(0.1), {"w": torch.zeros(2)}, {}, _data,
                        checkpoint=train.Checkpointing(tmp_path, every=1), **kw)  # fmt: skip
    assert _names(tmp_path) == ["step_00000004.safetensors", "step_00000005.safetensors"]
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    straight = train.fit(_loss, optim.adamw(0.1), {"w": torch.zeros(2)}, {}, _data, **kw)
    assert torch.equal(resumed.trainable["w"], straight.trainable["w"])


def test_a_flipped_byte_in_a_checkpoint_names_the_tensor(tmp_path):
    tr = {"w": torch.arange(4.0)}
    path = tmp_path / "step_00000001.safetensors"
    train.save_checkpoint(path, trainable=tr, opt_state=(), step=1, key=jr.key(0))
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    data = raw[8 + header_len :]
    at = 8 + header_len + bytes(data).index(torch.arange(4.0).numpy().tobytes()) + 5
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tensor 'trainable\.w' is corrupt"):
        train.load_checkpoint(path, trainable=tr, opt_state=())
    ck = train.load_checkpoint(path, trainable=tr, opt_state=(), verify=False)
    assert not torch.equal(ck.trainable["w"], tr["w"])


# ----------------------------------------------------------------------------- refused arguments


def _fit(**kw):
    base = dict(key=jr.key(0), steps=2, compile=False, progress=False)
    return train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, **(base | kw))


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"checkpoint_every": 5}, ValueError, "checkpoint_every=5 has no effect"),
        ({"keep": 4}, ValueError, "keep=4 has no effect"),
        ({"eval_every": 3}, ValueError, "eval_every=3 has no effect without eval_fn"),
        ({"meta": {"a": 1}}, ValueError, "meta is stored only in checkpoints"),
        ({"checkpoint": "x", "checkpoint_dir": "y"}, ValueError, "not both"),
        ({"checkpoint_folder": "x"}, TypeError, "checkpoint_folder"),
        ({"steps": True}, ValueError, "steps"),
        ({"steps": 2.0}, ValueError, "steps"),
        ({"resume": "no"}, TypeError, "resume"),
        ({"progress": 1}, TypeError, "progress"),
        ({"donate": None}, TypeError, "donate"),
        ({"compile": "fast"}, TypeError, "compile"),
        ({"autocast": torch.float32}, ValueError, "autocast"),
        ({"clip": math.nan}, ValueError, "clip"),
        ({"clip": torch.tensor(1.0)}, TypeError, "clip"),
        ({"clip": -1.0}, ValueError, "clip"),
        ({"tokens_per_batch": -3}, ValueError, "tokens_per_batch"),
        ({"tokens_per_batch": "many"}, TypeError, "tokens_per_batch"),
        ({"eval_fn": 3, "eval_every": 1}, TypeError, "eval_fn"),
        ({"key": 0}, TypeError, "key"),
        ({"checkpoint": 3}, TypeError, "directory"),
    ],
)
def test_fit_refuses_wrong_or_ineffective_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        _fit(**kw)


def test_checkpointing_values_are_checked():
    with pytest.raises(ValueError, match="keep: 0 < 1"):
        train.Checkpointing("d", keep=0)
    with pytest.raises(TypeError, match="every"):
        train.Checkpointing("d", every=1.5)
    with pytest.raises(TypeError, match="overwrite"):
        train.Checkpointing("d", overwrite="yes")


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (lambda tr, fr, b, k: b @ tr["w"], ValueError, r"loss of shape \(2,\).*0-d"),
        (lambda tr, fr, b, k: 1.5, TypeError, "got float 1.5"),
        (lambda tr, fr, b, k: (tr["w"].sum(), {}, 3), ValueError, "tuple of 3"),
        (lambda tr, fr, b, k: (tr["w"] > 0).sum(), TypeError, "dtype torch.int64"),
    ],
)
@pytest.mark.parametrize("compile", [False, {"backend": "eager"}])
def test_fit_names_a_bad_loss(loss_fn, error, match, compile):
    with pytest.raises(error, match=match):
        train.fit(loss_fn, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, key=jr.key(0),
                  steps=1, compile=compile, progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- the new API


def test_checkpointing_value_and_old_keywords_write_the_same_files(tmp_path):
    kw = dict(key=jr.key(0), steps=5, compile=False, progress=False)
    new = train.fit(
        _loss,
        optim.sgd(0.1),
        {"w": torch.zeros(2)},
        {},
        _data,
        checkpoint=train.Checkpointing(tmp_path / "a", every=2, keep=3),
        **kw,
    )
    old = train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data,
                    checkpoint_dir=tmp_path / "b", checkpoint_every=2, keep=3, **kw)  # fmt: skip
    assert (
        _names(tmp_path / "a")
        == _names(tmp_path / "b")
        == [
            "step_00000002.safetensors",
            "step_00000004.safetensors",
            "step_00000005.safetensors",
        ]
    )
    assert torch.equal(new.trainable["w"], old.trainable["w"])
    # a bare directory: saved at the end only
    train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, checkpoint=tmp_path / "c",
              **kw)  # fmt: skip
    assert _names(tmp_path / "c") == ["step_00000005.safetensors"]
    # the old keywords at their defaults say nothing, so they may stay beside checkpoint=
    train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, checkpoint=tmp_path / "d",
              checkpoint_dir=None, checkpoint_every=0, keep=2, **kw)  # fmt: skip
    assert _names(tmp_path / "d") == ["step_00000005.safetensors"]


def test_progress_bar_shows_the_loss_of_the_step_just_finished(monkeypatch):
    seen = []

    class Bar:
        def __init__(self, *a, **k):
            self.n, self.postfix = 0, {}

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def update(self, n):  # what a refresh at this point would print
            self.n += n
            seen.append((self.n, self.postfix.get("loss")))

        def write(self, msg):
            pass

        def close(self):
            pass

    monkeypatch.setattr(fit_module, "tqdm", Bar)
    res = _fit(steps=4)
    assert seen == [(h["step"], f"{h['loss']:.4f}") for h in res.history]
    assert len({loss for _, loss in seen}) > 1


def test_compile_auto_does_not_compile_short_runs(monkeypatch):
    chosen = []
    real = fit_module.make_step

    def spy(*a, **kw):
        chosen.append(kw["compile"])
        return real(*a, **kw)

    monkeypatch.setattr(fit_module, "make_step", spy)
    train.fit(_loss, optim.sgd(0.1), {"w": torch.zeros(2)}, {}, _data, key=jr.key(0), steps=2,
              progress=False)  # fmt: skip
    assert chosen == [False]
    cpu = {"w": torch.zeros(2)}
    # the CPU never repays a compile (docs/performance.md, "Compile or not"): eager at any length
    assert _run.choose_compile("auto", 10**9, cpu) is False
    assert _run.choose_compile(True, 1, cpu) is True
    assert _run.choose_compile({"backend": "eager"}, 1, cpu) == {"backend": "eager"}
    assert _run.AUTO_COMPILE_MIN_STEPS == {"cuda": 2000}
    meta = {"w": torch.zeros(2, device="meta")}  # a device type with a threshold (as cuda has)
    assert _run.choose_compile("auto", 10**9, meta) is False
    monkeypatch.setitem(_run.AUTO_COMPILE_MIN_STEPS, "meta", 1000)
    assert _run.choose_compile("auto", 999, meta) is False
    assert _run.choose_compile("auto", 1000, meta) == {"regional": True}


def test_clipping_uses_optims_global_norm_rule():
    g_loss = lambda tr, fr, b, k: (tr["w"] * torch.tensor([30.0, 40.0])).sum()
    step = train.make_step(g_loss, optim.sgd(1.0), compile=False, clip=1.0)
    tr = {"w": torch.zeros(2)}
    new, _, metrics = step(tr, {}, optim.sgd(1.0).init(tr), None, None)
    clipped, _ = optim.clip_by_global_norm(1.0).update({"w": torch.tensor([30.0, 40.0])}, {})
    assert float(metrics["grad_norm"]) == 50.0
    torch.testing.assert_close(new["w"], -clipped["w"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"compile": "yes"}, TypeError, "compile"),
        ({"autocast": torch.int32}, TypeError, "autocast"),
        ({"clip": math.inf}, ValueError, "clip"),
        ({"guard": 1}, TypeError, "guard"),
    ],
)
def test_make_step_refuses_bad_arguments(kw, error, match):
    with pytest.raises(error, match=f"make_step: {match}"):
        train.make_step(_loss, optim.sgd(0.1), **kw)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        train.make_step("loss", optim.sgd(0.1))
