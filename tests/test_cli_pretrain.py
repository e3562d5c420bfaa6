"""``fnllm demo --pretrain``: the pretraining demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fnllm import io
from fnllm.cli import main


def test_demo_trains_resumes_and_saves(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--pretrain",
                "--steps",
                "12",
                "--no-progress",
                "--no-minilm",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "reload equal: True" in out
    first, last = out.split("loss: ")[1].split(" at step 1 -> ")
    assert float(last.split()[0]) < float(first)  # it learned something in 12 steps
    model, _params = io.load_model(tmp_path / "gpt.safetensors")
    assert model.n_layer == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())


def test_demo_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--pretrain", "--steps", "0"])
    assert err.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fnllm.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout
