"""Tests for fnllm.pretraining and the ``fnllm pretrain`` / ``fnllm generate`` commands."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnllm import data, generate, io, tree
from fnllm import random as jr
from fnllm.cli import main
from fnllm.models import BERT, GPT
from fnllm.pretraining import (
    PretrainConfig,
    cached_tokenizer,
    pretrain,
    python_docs,
    unigram_entropy,
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    """One ``fnllm pretrain --quick`` run (a tiny GPT on the pydoc topics, ~20 s)."""
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_pretrain_beats_the_unigram_entropy(quick_run) -> None:
    metrics = json.loads((quick_run / "metrics.json").read_text())
    final = metrics["eval"][-1]
    assert final["step"] == PretrainConfig().quick().steps
    assert final["val_loss"] < metrics["unigram_entropy"]
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert metrics["train"][-1]["loss"] < metrics["train"][0]["loss"] - 1.0
    assert (quick_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = io.load_model(quick_run / "model.safetensors")
    assert isinstance(model, GPT) and model.n_layer == 2
    assert sorted(p.name for p in (quick_run / "checkpoints").iterdir())


def test_rerun_resumes_from_the_checkpoint_and_keeps_the_history(quick_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    tokenizers = sorted(out.glob("tokenizer-bpe-*.json"))
    stamp = tokenizers[0].stat().st_mtime_ns
    steps = PretrainConfig().quick().steps
    argv = ["pretrain", "--quick", "--out", str(out), "--no-progress", "--steps", str(steps + 4)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["train"]] == list(range(1, steps + 5))
    assert metrics["eval"][-1]["step"] == steps + 4
    assert sorted(out.glob("tokenizer-bpe-*.json")) == tokenizers  # the cached one was reused
    assert tokenizers[0].stat().st_mtime_ns == stamp


def test_generate_command_streams_the_greedy_continuation(quick_run, capsys) -> None:
    prompt = "The for statement"
    argv = ["generate", str(quick_run), "--prompt", prompt, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model, params = io.load_model(quick_run / "model.safetensors")
    tok = data.load_tokenizer(quick_run / "tokenizer.json")
    ids = generate.sample(None, model, params, [tok.encode(prompt).ids], 12, temperature=0)
    eos = tok.token_to_id("<|endoftext|>")
    new = ids[0].tolist()
    new = new[: new.index(eos)] if eos in new else new
    assert printed == prompt + tok.decode(new) + "\n"


def test_generate_default_length_fits_the_quick_models_context(quick_run, capsys) -> None:
    model, params = io.load_model(quick_run / "model.safetensors")
    tok = data.load_tokenizer(quick_run / "tokenizer.json")
    prompt = "The for statement"
    n_prompt = len(tok.encode(prompt, add_special_tokens=False).ids)
    room = model.max_len - n_prompt
    assert room < 64  # the quick model's context is shorter than the default 64 new tokens
    argv = ["generate", str(quick_run), "--prompt", prompt, "--temperature", "0"]
    assert main(argv) == 0  # default flags: capped to the context, with a notice
    out, err = capsys.readouterr()
    assert f"generating {room} new tokens" in err
    ids = generate.sample(None, model, params, [tok.encode(prompt).ids], room, temperature=0)
    eos = tok.token_to_id("<|endoftext|>")
    new = ids[0].tolist()
    new = new[: new.index(eos)] if eos in new else new
    assert out == prompt + tok.decode(new) + "\n"
    # an explicit count that does not fit is refused, naming the flag and the room
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max-new-tokens", str(room + 1)])
    assert exc.value.code == 2
    assert f"--max-new-tokens {room + 1}: the {n_prompt}-token prompt leaves room for {room}" in (
        capsys.readouterr().err
    )


def test_generate_reads_a_transformers_gpt2_folder(tmp_path, capsys) -> None:
    tok = data.train_tokenizer(data.default_documents(), "bpe", 300)
    gpt = GPT(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_len=32)
    folder = io.to_hf(gpt, gpt.init(jr.key(0)), tmp_path / "hf")
    tok.save(str(folder / "tokenizer.json"))
    assert main(["generate", str(folder), "--prompt", "the river", "--seed", "3",
                 "--max-new-tokens", "5", "--top-k", "20"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the river")
    # a GPT-2 folder with the older vocab.json + merges.txt instead of tokenizer.json
    (folder / "tokenizer.json").unlink()
    tok.model.save(str(folder))
    assert main(["generate", str(folder), "--prompt", "the river", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the river")


def test_generate_refuses_a_checkpoint_that_is_not_a_gpt(tmp_path, capsys) -> None:
    bert = BERT(vocab_size=50, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=16)
    io.save_model(tmp_path / "model.safetensors", bert, bert.init(jr.key(0)))
    with pytest.raises(SystemExit) as err:
        main(["generate", str(tmp_path / "model.safetensors"), "--prompt", "hi"])
    assert err.value.code == 2
    assert "holds a BERT, not a GPT" in capsys.readouterr().err


def test_bad_flags_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(tmp_path), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "missing.safetensors")])
    assert "missing.safetensors" in capsys.readouterr().err


def test_bert_pretraining_runs_mlm_and_sentence_order(tmp_path) -> None:
    cfg = PretrainConfig(
        out=tmp_path, model="bert", steps=3, batch_size=2, block_size=32, vocab_size=300,
        n_layer=1, n_head=2, d_model=16, val_fraction=0.25, progress=False,
        texts=tuple(data.default_documents()),
    )  # fmt: skip
    summary = pretrain(cfg)
    assert summary["step"] == 3 and 0.0 <= summary["val_sop_accuracy"] <= 1.0
    assert summary["val_loss"] > 0 and summary["unigram_entropy"] > 0
    model, _ = io.load_model(tmp_path / "model.safetensors")
    assert isinstance(model, BERT) and model.mlm_head and model.pair_head


def test_python_docs_are_the_pydoc_topics_plus_docstrings() -> None:
    from pydoc_data.topics import topics

    only_topics = python_docs(docstrings=False, min_chars=0)
    assert only_topics == [topics[k].strip() for k in sorted(topics)]
    both = python_docs()
    assert len(both) > len(only_topics) + 100
    import inspect
    import textwrap

    assert inspect.getdoc(textwrap.dedent).strip() in both


def test_cached_tokenizer_depends_on_texts_and_size(tmp_path) -> None:
    texts = data.default_documents()
    a = cached_tokenizer(texts, "bpe", 300, tmp_path)
    cached_tokenizer(texts, "bpe", 300, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    b = cached_tokenizer(texts[:4], "bpe", 300, tmp_path)
    cached_tokenizer(texts, "bpe", 280, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3
    assert a.get_vocab() != b.get_vocab()


@given(st.lists(st.integers(0, 9), min_size=1, max_size=60), st.permutations(range(10)))
def test_unigram_entropy_is_the_entropy_of_the_counts(ids: list[int], relabel: list[int]) -> None:
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / len(ids)
    assert unigram_entropy(ids) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    assert unigram_entropy([relabel[i] for i in ids]) == pytest.approx(unigram_entropy(ids))
    assert unigram_entropy(ids) <= math.log(len(set(ids))) + 1e-12
    padded = torch.tensor([*ids, -100, -100])
    assert unigram_entropy(padded) == pytest.approx(unigram_entropy(ids))


def test_pretrain_under_torchrun_equals_one_process(tmp_path, quick_run) -> None:
    """`torchrun --nproc-per-node 2 -m fnllm.cli pretrain` is data parallel over the ranks.

    Two gloo ranks, each on its half of every global batch with gradients averaged, end where
    one process on the whole batch ends (float tolerance); only rank 0 writes the files.
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "fnllm.cli", "pretrain", "--quick", "--out", str(out), "--no-progress",
         "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("fnllm pretrain:") == 1  # rank 0 reports, once
    assert "on 2 ranks" in proc.stdout
    _, two = io.load_model(out / "model.safetensors")
    _, one = io.load_model(quick_run / "model.safetensors")
    assert tree.paths(two) == tree.paths(one)
    for a, b in zip(tree.leaves(two), tree.leaves(one), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
