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


def test_pretrain_flags_are_the_numbers_of_pretrain_config():
    """Each number in ``PretrainConfig`` is a flag of its type, with the field's doc as help."""
    import argparse
    import dataclasses

    from fnllm.cli import pretrain as cli_pretrain
    from fnllm.pretraining import PretrainConfig

    parser = argparse.ArgumentParser(prog="fnllm")
    cli_pretrain.register(parser.add_subparsers(dest="command"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {a.dest: a for a in sub.choices["pretrain"]._actions}
    numbers = [f for f in dataclasses.fields(PretrainConfig) if f.type in ("int", "float")]
    assert {f.name for f in numbers} <= set(flags)
    assert len(numbers) >= 10
    for f in numbers:
        action = flags[f.name]
        assert action.type.__name__ == f.type and action.default is None
        text, default = action.help.rsplit(" (default ", 1)
        assert text.strip() and default == f"{f.default})"
    assert flags["lr"].help.startswith("peak learning rate")
    args = parser.parse_args(["pretrain", "--out", "o", "--lr", "0.01", "--n-layer", "3"])
    assert args.lr == 0.01 and args.n_layer == 3 and args.steps is None
