"""The CLI framework: every user mistake is one line ``fnllm <command>: error: ...``, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fnllm.cli import UsageError, main


def _fails(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no usage block, no traceback
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["generate", "{tmp}", "--top-p", "0"],
            r"fnllm generate: error: --top-p must be in \(0, 1\], got 0.0",
        ),
        (["generate", "{tmp}", "--top-p", "1.5"], "fnllm generate: error: --top-p"),
        (["generate", "{tmp}", "--top-k", "0"], "fnllm generate: error: --top-k must be >= 1"),
        (["generate", "{tmp}", "--temperature", "-1"], "fnllm generate: error: --temperature"),
        (["generate", "{tmp}", "--temperature", "nan"], "fnllm generate: error: --temperature"),
        (["generate", "{tmp}", "--max-new-tokens", "0"], "fnllm generate: error: --max-new-tokens"),
        (["generate", "{tmp}", "--threads", "-1"], "fnllm generate: error: --threads must be >= 0"),
        (["generate", "{tmp}", "--seed", "-3"], "fnllm generate: error: --seed must be >= 0"),
        (["generate", "{tmp}/nope"], "fnllm generate: error: .*nope: no such file or folder"),
        (
            ["generate", "{tmp}", "--tokenizer", "{tmp}/t.json"],
            "fnllm generate: error: --tokenizer",
        ),
        (
            ["generate", "{tmp}", "--top-k", "x"],
            "fnllm generate: error: argument --top-k: invalid int",
        ),
        (["generate"], "fnllm generate: error: the following arguments are required: source"),
        (["generate", "{tmp}"], "fnllm generate: error: .*"),  # an empty folder is no model
        (["pretrain"], "fnllm pretrain: error: the following arguments are required: --out"),
        (
            ["pretrain", "--out", "{tmp}/o", "--lr", "inf"],
            "fnllm pretrain: error: --lr must be a finite",
        ),
        (["pretrain", "--out", "{tmp}/o", "--lr", "-1"], "fnllm pretrain: error: --lr"),
        (
            ["pretrain", "--out", "{tmp}/o", "--steps", "0"],
            "fnllm pretrain: error: --steps must be >= 1",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--val-fraction", "1.5"],
            "fnllm pretrain: error: --val-fraction",
        ),
        (["pretrain", "--out", "{tmp}/o", "--threads", "-2"], "fnllm pretrain: error: --threads"),
        (
            ["pretrain", "--out", "{tmp}/f"],
            "fnllm pretrain: error: --out .*f: exists and is not a folder",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--model", "t5"],
            "fnllm pretrain: error: argument --model",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--block-size", "1"],
            "fnllm pretrain: error: --block-size: 1 < 2, too short for a gpt training row",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--model", "bert", "--block-size", "2"],
            "fnllm pretrain: error: --block-size: 2 < 3",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--vocab-size", "5"],
            "fnllm pretrain: error: --vocab-size: 5 < 257",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--n-head", "3"],
            "fnllm pretrain: error: GPT: --d-model 256 is not divisible by --n-head 3",
        ),
        (
            ["pretrain", "--out", "{tmp}/o", "--model", "llama", "--n-head", "3"],
            "fnllm pretrain: error: Llama: --d-model 256 is not divisible by --n-head 3",
        ),
        (
            ["demo", "--label-column", " ", "--out", "{tmp}/d"],
            "fnllm demo: error: --label-column must name a column, got ' '",
        ),
        (["bogus"], "fnllm: error: argument command: invalid choice: 'bogus'"),
        ([], "fnllm: error: the following arguments are required: command"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, argv, line):
    (tmp_path / "f").write_text("a file")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    import re

    assert re.fullmatch(line + ".*", _fails(argv, capsys)), line


def test_a_corrupt_model_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 10)
    got = _fails(["generate", str(bad)], capsys)
    assert got.startswith("fnllm generate: error: ") and "model.safetensors" in got


def test_library_errors_escaping_a_command_are_one_line(monkeypatch, capsys):
    from fnllm.cli import generate as cli_generate

    def boom(args, parser):
        raise ValueError("read_labelled: d.csv:3 row 2: empty label\n(second line)")

    monkeypatch.setattr(cli_generate, "_run", boom)
    got = _fails(["generate", "x"], capsys)
    assert got == (
        "fnllm generate: error: read_labelled: d.csv:3 row 2: empty label (second line) "
        "(ValueError; FNLLM_DEBUG=1 shows where)"
    )

    def usage(args, parser):
        raise UsageError("--data: a 4-row file gives empty splits")

    monkeypatch.setattr(cli_generate, "_run", usage)
    assert _fails(["generate", "x"], capsys) == (
        "fnllm generate: error: --data: a 4-row file gives empty splits"
    )
    monkeypatch.setenv("FNLLM_DEBUG", "1")
    monkeypatch.setattr(cli_generate, "_run", boom)
    with pytest.raises(ValueError, match="empty label"):
        main(["generate", "x"])


def test_help_still_exits_0(capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--help"])
    assert err.value.code == 0 and "usage: fnllm generate" in capsys.readouterr().out


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "fnllm.cli", "generate", str(tmp_path / "nope"), "--top-k", "3"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fnllm generate: error: {tmp_path / 'nope'}: no such file or folder"
    ]
    assert "Traceback" not in proc.stderr
