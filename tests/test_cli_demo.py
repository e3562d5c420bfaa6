"""``fnllm demo``: the comparison of adaptation strategies, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _tiny import tiny_bert, tiny_gpt

from fnllm import data, io
from fnllm import random as jr
from fnllm.cli import main
from fnllm.cli.demo import DEFAULT_STRATEGIES
from fnllm.models import Llama

COLUMNS = [
    "strategy",
    "trainable",
    "epochs",
    "seeds",
    "frozen pass reused",
    "time (s)",
    "val acc",
    "val F1",
    "test acc",
    "test F1",
]


def _rows(stdout: str) -> list[list[str]]:
    """The printed table's header and rows (split on runs of 2+ spaces)."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("strategy "))
    rows = []
    for ln in lines[start:]:
        if not ln.strip():
            break
        if not set(ln.strip()) <= {"-", " "}:
            rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


def _check_outputs(out_dir, names):
    png = (out_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out_dir / "results.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == COLUMNS
    assert set(table[1].replace("|", "").replace(" ", "")) <= set("-:")
    assert [ln.strip("|").split("|")[0].strip() for ln in table[2:]] == names
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["trainable"] > 0


def test_quick_demo_with_two_seeds_on_minilm_and_vader(tmp_path, capsys):
    """``fnllm demo --quick --seeds 2``: mean ± std per finetuning row in the table, the same
    numbers in Markdown and JSON, and the figure's error bars are the rows' spreads."""
    try:
        io.pretrained_dir("all-MiniLM-L6-v2")
        data.load_vader()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    assert main(["demo", "--quick", "--seeds", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    rows = _rows(stdout)
    assert rows[0] == COLUMNS
    assert [r[0] for r in rows[1:]] == list(DEFAULT_STRATEGIES)
    reused = {r[0]: r[4] for r in rows[1:]}
    assert reused["head"] == "6/6 blocks" and reused["last:2"] == "4/6 blocks"
    assert reused["full"] == "-" and reused["lora"] == "-"
    _check_outputs(tmp_path, list(DEFAULT_STRATEGIES))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == 2 and "standard deviation" in results["spread"]
    md = [ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("|")]
    md_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md[2:]]
    points = {p["name"]: p for p in results["figure"]["accuracy"]}
    for row, printed, cells in zip(results["rows"], rows[1:], md_rows, strict=True):
        probe = row["name"].startswith("features+")
        assert row["seeds"] == (1 if probe else 2) == len(row["runs"])
        accs = [r["test_acc"] for r in row["runs"]]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if not probe else 0.0
        assert row["test_acc"] == pytest.approx(mean) and row["test_acc_std"] == pytest.approx(std)
        assert (row["test_acc_min"], row["test_acc_max"]) == (min(accs), max(accs))
        want = f"{mean:.3f}" if probe else f"{mean:.3f} ± {std:.3f}"
        assert cells[COLUMNS.index("test acc")] == printed[COLUMNS.index("test acc")] == want
        assert cells == printed, row["name"]  # the Markdown table is the printed one
        point = points[row["name"]]  # what the figure drew: the mean and its error bar
        assert point["y"] == pytest.approx(mean) and point["yerr"] == pytest.approx(std)
        assert point["bar"] == pytest.approx([mean - std, mean + std], abs=1e-9)
    assert results["verdicts"][0].startswith("best test accuracy:")
    assert all(
        ("larger than the spread" in v) or ("within the spread" in v) or ("no spread" in v)
        for v in results["verdicts"][1:]
    )
    assert len(results["verdicts"]) == len(DEFAULT_STRATEGIES)
    assert "\n".join(results["verdicts"]) in stdout
    assert results["recipe"]["name"] == "default" and results["recipe"]["notes"]


def _tiny_dir(tmp_path, kind: str):
    """A random tiny model with a trained tokenizer, saved as a Hugging Face folder."""
    texts = [
        f"the film was {w} and {v}"
        for w in ("great", "fun", "awful", "dull")
        for v in ("long", "short", "loud", "calm", "odd")
    ]
    tok = data.train_tokenizer(texts, "wordpiece" if kind == "bert" else "bpe", vocab_size=300)
    vocab = tok.get_vocab_size()
    if kind == "bert":
        model = tiny_bert(vocab_size=vocab, max_len=32, mlm_head=False, pair_head=False)
    elif kind == "llama":
        model = Llama(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=32,
                      max_len=32)  # fmt: skip
    else:
        model = tiny_gpt(vocab_size=vocab, max_len=32)
    directory = tmp_path / kind
    io.to_hf(model, model.init(jr.key(0)), directory)
    tok.save(str(directory / "tokenizer.json"))
    rows = "".join(f"{t},{'pos' if ('great' in t or 'fun' in t) else 'neg'}\n" for t in texts * 3)
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\n" + rows)
    return directory, csv


@pytest.mark.parametrize("kind", ["bert", "gpt", "llama"])
def test_demo_runs_on_a_users_model_and_csv(tmp_path, capsys, kind):
    directory, csv = _tiny_dir(tmp_path, kind)
    names = ["features+logreg", "head", "last:1", "lora"]
    argv = [
        "demo",
        "--model-dir",
        str(directory),
        "--data",
        str(csv),
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--strategies",
        ",".join(names),
        "--train-size",
        "40",
        "--val-size",
        "8",
        "--test-size",
        "8",
        "--epochs",
        "2",
        "--lora-rank",
        "2",
        "--seeds",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[0] for r in rows[1:]] == names
    assert {r[0]: r[2] for r in rows[1:]}["last:1"] == "2"
    _check_outputs(tmp_path / "out", names)


def test_reference_recipe_and_preset_are_recorded_and_train_from_the_embeddings(tmp_path, capsys):
    directory, csv = _tiny_dir(tmp_path, "bert")
    argv = ["demo", "--model-dir", str(directory), "--data", str(csv), "--text-column",
            "review", "--label-column", "sentiment", "--strategies", "head,last:1", "--seeds",
            "2", "--recipe", "reference", "--preset", "reference", "--no-progress", "--out",
            str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    # dropout runs in the frozen blocks too: training starts at the embeddings, eval reuses
    assert {r[0]: r[4] for r in rows[1:]} == {"head": "- (eval 2/2)", "last:1": "- (eval 1/2)"}
    assert {r[0]: r[2] for r in rows[1:]} == {"head": "1", "last:1": "1"}  # one recipe for all
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["preset"] == "reference" and results["seeds"] == 2
    assert results["recipe"]["name"] == "reference"
    assert set(results["recipe"]["learning_rates"].values()) == {5e-5}
    assert results["recipe"]["dropout"] == "from the checkpoint's config"
    assert results["max_len"] == 32  # the preset's 64 tokens, capped at the model's max_len


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategies", "head,everything"], "unknown name 'everything'"),
        (["--strategies", "last:3"], "N must be in [1, 2]"),
        (["--strategies", "last:1.5"], "'last:1.5': N must be a whole number"),
        (["--strategies", "head,head"], "'head' is given twice"),
        (["--label-column", "stars"], "has no column 'stars'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--lora-rank", "1000"], "--lora-rank 1000: lora.init: rank 1000"),
        (["--threads", "-1"], "--threads must be >= 1, got -1"),
        (["--steps", "0"], "--steps is for --pretrain"),
        (["--compile"], "--compile is for --pretrain"),
        (["--quick", "--preset", "reference"], "--quick and --preset reference: give one"),
        (["--recipe", "mine"], "invalid choice: 'mine'"),
        (["--data", "missing.csv"], "--data missing.csv: no such file"),
    ],
)
def test_demo_bad_flags_exit_with_a_message(tmp_path, capsys, extra, message):
    directory, csv = _tiny_dir(tmp_path, "bert")
    argv = [
        "demo",
        "--model-dir",
        str(directory),
        "--data",
        str(csv),
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "fnllm demo: error:" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out" / "results.json").exists()


def test_demo_refuses_an_out_that_is_a_file_and_splits_that_come_out_empty(tmp_path, capsys):
    directory, _ = _tiny_dir(tmp_path, "bert")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("review,sentiment\ngreat film,pos\nawful film,neg\nfun film,pos\ndull,neg\n")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    base = ["demo", "--model-dir", str(directory), "--text-column", "review", "--label-column",
            "sentiment", "--no-progress"]  # fmt: skip
    for extra, message in (
        (["--data", str(tiny), "--out", str(a_file)], f"--out {a_file}: is a file, not a folder"),
        (["--data", str(tiny), "--out", str(tmp_path / "o")], "every split needs at least one"),
    ):
        with pytest.raises(SystemExit) as err:
            main([*base, *extra])
        assert err.value.code == 2
        stderr = capsys.readouterr().err
        assert message in stderr and "fnllm demo: error:" in stderr, stderr


def test_pretrain_demo_rerun_with_fewer_steps_is_refused_and_the_same_steps_resume(
    tmp_path, capsys
):
    argv = ["demo", "--pretrain", "--no-progress", "--no-minilm", "--threads", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert main([*argv, "--steps", "4"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main([*argv, "--steps", "2"])
    assert err.value.code == 2
    assert "trained to step 4, past --steps 2" in capsys.readouterr().err
    assert main([*argv, "--steps", "4"]) == 0  # a finished run: nothing left to train
    assert "already trained to --steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main([*argv, "--steps", "4", "--seeds", "2"])
    assert "--seeds is for the finetuning comparison" in capsys.readouterr().err


def test_demo_model_dir_without_weights_or_of_another_architecture(tmp_path, capsys):
    directory, csv = _tiny_dir(tmp_path, "bert")
    (directory / "model.safetensors").unlink()
    base = ["demo", "--data", str(csv), "--text-column", "review", "--label-column", "sentiment"]
    with pytest.raises(SystemExit):
        main([*base, "--model-dir", str(directory)])
    err = capsys.readouterr().err
    assert str(directory) in err and "safetensors" in err
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(SystemExit):
        main([*base, "--model-dir", str(other)])
    assert "t5" in capsys.readouterr().err


def test_help_lists_the_demo():
    out = subprocess.run(
        [sys.executable, "-m", "fnllm.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--model-dir" in out.stdout and "--pretrain" in out.stdout


@pytest.mark.parametrize("fused", [True, False])
def test_two_optimizers_over_a_partition_equal_each_run_on_its_half(fused):
    import torch

    from fnllm import optim, tree
    from fnllm import random as jr
    from fnllm.cli._compare import per_part

    params = {
        "base": {"blocks": [{"w": jr.normal(jr.key(i), (3, 2))} for i in range(2)]},
        "head": {"w": jr.normal(jr.key(5), (2,)), "b": torch.zeros(2)},
    }
    grads = tree.map(lambda x: jr.normal(jr.key(7), x.shape), params)
    is_head = ["head.*"]
    fast, slow = optim.adamw(1e-1), (optim.adamw(1e-3) if fused else optim.sgd(1e-3))
    both = per_part(is_head, fast, slow)
    assert (both.fused_step is not None) == fused
    head, body = tree.partition(params, is_head)
    g_head, g_body = tree.partition(grads, is_head)
    state, s_head, s_body = both.init(params), fast.init(head), slow.init(body)
    for _ in range(3):
        new, state = optim.step(both, grads, state, params)
        head, s_head = optim.step(fast, g_head, s_head, head)
        body, s_body = optim.step(slow, g_body, s_body, body)
        params = new
    want = tree.combine(head, body)
    assert tree.paths(params) == tree.paths(want)
    for a, b in zip(tree.leaves(params), tree.leaves(want)):
        assert torch.equal(a, b)


def test_demo_under_torchrun_equals_one_process(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m fnllm.cli demo` trains the finetuning rows data parallel.

    Two gloo ranks, each on its half of every batch with gradients averaged, give the losses
    and scores of one process (float tolerance); the scikit-learn probe runs on rank 0 alone;
    only rank 0 prints and writes the files.
    """
    import os
    import socket

    try:
        io.pretrained_dir("all-MiniLM-L6-v2")
        data.load_vader()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    names = ["features+logreg", "head", "last:1", "lora"]
    flags = ["demo", "--quick", "--no-progress", "--strategies", ",".join(names)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "fnllm.cli", *flags, "--threads", "1", "--out", str(two)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("fnllm demo:") == 1 and "2 ranks" in proc.stdout
    assert proc.stdout.count("wrote ") == 1
    _check_outputs(two, names)
    one = tmp_path / "one"
    assert main([*flags, "--out", str(one)]) == 0
    capsys.readouterr()
    rows_1 = json.loads((one / "results.json").read_text())["rows"]
    rows_2 = json.loads((two / "results.json").read_text())["rows"]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert a["name"] == b["name"] and a["trainable"] == b["trainable"]
        assert len(b["losses"]) == (0 if a["name"] == names[0] else 2 * b["epochs"])  # 32 / 16
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-5), a["name"]
        for k in ("val_acc", "test_acc", "val_f1", "test_f1"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), (a["name"], k)


def test_demo_under_torchrun_refuses_batches_the_ranks_do_not_divide(tmp_path, capsys, monkeypatch):
    # WORLD_SIZE=2 without RANK: init() starts a group of one, the check uses the 2 launched
    import torch.distributed as dist

    directory, csv = _tiny_dir(tmp_path, "bert")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["demo", "--model-dir", str(directory), "--data", str(csv), "--text-column",
            "review", "--label-column", "sentiment", "--no-progress", "--strategies", "head",
            "--train-size", "6", "--batch-size", "3"]  # fmt: skip
    try:
        with pytest.raises(SystemExit) as err:
            main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert err.value.code == 2
    assert "a batch of 3 examples does not divide" in capsys.readouterr().err
