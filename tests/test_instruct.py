"""Tests for fnllm.instruct: the JSONL reader, prompt-masked batches, and SFT end to end."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import generate, instruct, optim, tree
from fnllm import random as jr
from fnllm.models import GPT

FMT = instruct.InstructionFormat(template="Q: {instruction}\nA:", template_with_input="{input}|")
GPT_BYTES = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=32, max_len=48)
RECORDS = [
    {"instruction": "capital of France?", "response": " Paris"},
    {"instruction": "2+2?", "response": " four"},
    {"instruction": "color of the sky?", "response": " blue"},
    {"instruction": "opposite of up?", "response": " down"},
]


def encode(text: str) -> list[int]:
    return list(text.encode("ascii"))


def test_read_jsonl_reads_records_and_skips_blank_lines(tmp_path) -> None:
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps(RECORDS[0]), "", json.dumps({**RECORDS[1], "input": "x", "extra": 1})]
    path.write_text("\n".join(lines) + "\n")
    got = instruct.read_jsonl(path, ["instruction", "response"], ["input"])
    assert got == [RECORDS[0], {**RECORDS[1], "input": "x"}]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"instruction": "a", "response": ', r"sft\.jsonl:3: not valid JSON"),
        ('{"instruction": "a"}', r"sft\.jsonl:3: missing field 'response'"),
        ('{"instruction": "a", "response": 5}', r"sft\.jsonl:3: field 'response' must be a str"),
        ('["a", "b"]', r"sft\.jsonl:3: expected a JSON object"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path, line: str, match: str) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        instruct.read_jsonl(path, ["instruction", "response"])


@settings(max_examples=25)
@given(
    st.lists(
        st.tuples(st.text("abc xyz?", min_size=1, max_size=12), st.text("pqr ", max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_targets_skip_exactly_the_prompt_tokens(pairs: list[tuple[str, str]]) -> None:
    records = [{"instruction": q, "response": a} for q, a in pairs]
    batch = instruct.sft_batch(records, encode, eos_id=0, max_len=40, fmt=FMT)
    for row, rec in enumerate(records):
        n_prompt = len(encode(FMT.prompt(rec)))
        ids = encode(FMT.prompt(rec)) + encode(rec["response"]) + [0]
        for t in range(batch["targets"].shape[1]):
            learned = n_prompt - 1 <= t < len(ids) - 1  # predicts a response token or EOS
            want = ids[t + 1] if learned else -100
            assert int(batch["targets"][row, t]) == want
        assert batch["attention_mask"][row].sum() == len(ids)


def test_sft_loss_is_the_mean_response_nll_of_each_row_alone() -> None:
    params = GPT_BYTES.init(jr.key(1))
    batch = instruct.sft_batch(RECORDS, encode, eos_id=0, max_len=48, fmt=FMT)
    got = instruct.sft_loss(GPT_BYTES)(params, {}, batch, None)
    total, count = 0.0, 0
    for rec in RECORDS:
        prompt = encode(FMT.prompt(rec))
        ids = prompt + encode(rec["response"]) + [0]
        logp = torch.log_softmax(GPT_BYTES.apply(params, torch.tensor([ids]))[0].double(), -1)
        for t in range(len(prompt), len(ids)):
            total -= float(logp[t - 1, ids[t]])
            count += 1
    assert float(got) == pytest.approx(total / count, rel=1e-5)


def test_instruction_tuning_learns_the_responses() -> None:
    from fnllm import train

    params = GPT_BYTES.init(jr.key(0))
    batch = instruct.sft_batch(RECORDS, encode, eos_id=0, max_len=48, fmt=FMT)
    result = train.fit(
        instruct.sft_loss(GPT_BYTES), optim.adamw(1e-2), params, {}, lambda s: batch,
        key=jr.key(1), steps=60, compile=False, progress=False,
    )  # fmt: skip
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < 0.1 * first
    prompts = [encode(FMT.prompt(r)) for r in RECORDS]
    out = generate.sample(None, GPT_BYTES, result.trainable, prompts, 7, temperature=0)
    for rec, row in zip(RECORDS, out.tolist()):
        want = [*encode(rec["response"]), 0]
        assert row[: len(want)] == want
    assert tree.count(result.trainable) == tree.count(params)


def test_sft_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"records\[0\]: the prompt has \d+ tokens, no room"):
        instruct.sft_batch([{"instruction": "x" * 60, "response": "y"}], encode, eos_id=0,
                           max_len=48, fmt=FMT)  # fmt: skip
    with pytest.raises(KeyError, match=r"records\[1\]: missing 'response'"):
        instruct.sft_batch(
            [RECORDS[0], {"instruction": "a"}], encode, eos_id=0, max_len=48, fmt=FMT
        )
    with pytest.raises(ValueError, match="records: empty batch"):
        instruct.sft_batch([], encode, eos_id=0, max_len=48)
