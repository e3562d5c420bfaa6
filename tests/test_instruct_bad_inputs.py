"""fnllm.instruct and data.instruction_targets on bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from fnllm.data import instruction_targets
from fnllm.instruct import sft_batch

TOKENS = torch.arange(1, 9).reshape(2, 4)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        (torch.tensor([[1], [2]]), r"shape \(2, 1\) does not match .* \(squeeze the last dim\)"),
        (torch.tensor([1, 2, 3]), r"shape \(3,\) does not match the rows of tokens \(2, 4\)"),
        (torch.tensor([[1, 2], [1, 2]]), r"shape \(2, 2\)"),
    ],
)
def test_prompt_len_of_the_wrong_shape_is_refused(prompt, match):
    with pytest.raises(ValueError, match=match):
        instruction_targets(TOKENS, prompt_len=prompt)


def test_rows_left_without_targets_are_named_in_a_warning():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.warns(UserWarning, match=r"rows 1 \(flat index\) have no target left"):
        out = instruction_targets(TOKENS, prompt_len=torch.tensor([2, 2]), attention_mask=mask)
    assert out[1].tolist() == [-100] * 4 and out[0].tolist() == [-100, 3, 4, -100]
    with pytest.warns(UserWarning, match=r"rows 0, 1 \(flat index\)"):
        instruction_targets(TOKENS, prompt_len=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instruction_targets(TOKENS, prompt_len=torch.tensor([3, 1]))  # every row keeps one


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt_len": 2.0}, TypeError, "prompt_len"),
        ({"prompt_len": True}, TypeError, "prompt_len"),
        ({"prompt_len": torch.tensor([True, False])}, ValueError, "prompt_len: expected integers"),
        ({"prompt_len": 5}, ValueError, r"prompt_len: 5 at \[\] is outside \[0, 4\]"),
        ({"prompt_len": torch.tensor([1, -1])}, ValueError, r"prompt_len: -1 at \[1\]"),
        ({}, ValueError, "exactly one of prompt_len and prompt_mask"),
        ({"prompt_mask": torch.ones(2, 3)}, ValueError, r"prompt_mask: shape \(2, 3\)"),
    ],
)
def test_instruction_targets_names_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        instruction_targets(TOKENS, **kwargs)


def test_sft_batch_names_the_record():
    enc = lambda s: list(s.encode())
    with pytest.raises(KeyError, match=r"records\[1\]: missing 'response'"):
        sft_batch(
            [{"instruction": "a", "response": "b"}, {"instruction": "c"}], enc, eos_id=0, max_len=64
        )
    with pytest.raises(ValueError, match=r"records\[0\]: the prompt has \d+ tokens"):
        sft_batch([{"instruction": "a" * 80, "response": "b"}], enc, eos_id=0, max_len=64)
    with pytest.raises(KeyError, match="record: missing 'instruction'"):
        sft_batch([{"response": "b"}], enc, eos_id=0, max_len=64)


FMT = None


def _sft(records, encode=lambda s: list(s.encode()), **kw):
    from fnllm.instruct import InstructionFormat

    args = {"eos_id": 0, "max_len": 32, "fmt": InstructionFormat(template="{instruction}="), **kw}
    return sft_batch(records, encode, **args)


REC = {"instruction": "1+1", "response": "2"}


@pytest.mark.parametrize(
    ("records", "encode", "kwargs", "error", "match"),
    [
        ("abc", None, {}, TypeError, r"records: expected a list of dicts, got str"),
        (REC, None, {}, TypeError, r"got dict \(one record\? wrap it: \[record\]\)"),
        (["x"], None, {}, TypeError, r"records\[0\]: expected a dict, got str"),
        (
            [{"instruction": 1, "response": "2"}],
            None,
            {},
            TypeError,
            r"field 'instruction' must be a string",
        ),
        ([REC], list, {}, TypeError, r"records\[0\]: encode returned '1' in the prompt"),
        ([REC], lambda s: [-1], {}, TypeError, r"encode returned -1 in the prompt"),
        ([REC], lambda s: "ids", {}, TypeError, r"encode returned a str for the prompt"),
        ([REC], 3, {}, TypeError, "encode: expected a function"),
        ([REC], None, {"eos_id": True}, TypeError, "eos_id: expected an int, got True"),
        ([REC], None, {"eos_id": -2}, ValueError, "eos_id: -2 < 0"),
        ([REC], None, {"pad_id": 1.0}, TypeError, "pad_id: expected an int"),
        ([REC], None, {"max_len": "32"}, TypeError, "max_len: expected an int, got '32'"),
        ([REC], None, {"max_len": 1}, ValueError, "max_len: 1 < 2"),
    ],
)
def test_sft_batch_names_bad_records_and_arguments(records, encode, kwargs, error, match):
    with pytest.raises(error, match=match):
        if encode is None:
            _sft(records, **kwargs)
        else:
            _sft(records, encode, **kwargs)


def test_sft_batch_accepts_extra_non_string_fields_and_tensor_ids():
    batch = _sft([{**REC, "id": 7}], lambda s: torch.tensor(list(s.encode())))
    assert batch["targets"].tolist() == [[-100, -100, -100, 50, 0, -100]]


def test_read_jsonl_refuses_an_empty_file_and_no_required_field(tmp_path):
    from fnllm.instruct import read_jsonl

    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"read_jsonl: .*e.jsonl holds no records"):
        read_jsonl(empty, ["instruction"])
    good = tmp_path / "g.jsonl"
    good.write_text('{"instruction": "a"}\n')
    with pytest.raises(ValueError, match="read_jsonl: required is empty"):
        read_jsonl(good, [])
    with pytest.raises(TypeError, match="read_jsonl: optional must be a list of field names"):
        read_jsonl(good, ["instruction"], optional=[3])


def test_sft_batch_refuses_a_bad_fmt_and_an_id_past_int64():
    with pytest.raises(TypeError, match=r"fmt: expected an instruct.InstructionFormat, got str"):
        sft_batch([REC], lambda s: list(s.encode()), eos_id=0, max_len=32, fmt="{instruction}")
    with pytest.raises(ValueError, match=r"eos_id: 1180591620717411303424 > 9223372036854775807"):
        _sft([REC], eos_id=2**70)


def test_sft_loss_refuses_an_encoder_and_names_missing_batch_keys():
    from _tiny import tiny_bert, tiny_gpt

    from fnllm import random as jr
    from fnllm.instruct import sft_loss

    with pytest.raises(TypeError, match=r"sft_loss: model: .* BERT is an encoder"):
        sft_loss(tiny_bert())
    gpt = tiny_gpt()
    batch = _sft([REC], encode=lambda s: [b % 40 for b in s.encode()], max_len=16)
    with pytest.raises(KeyError, match=r"sft_loss: batch lacks targets"):
        sft_loss(gpt)(gpt.init(jr.key(0)), {}, {k: batch[k] for k in ("input_ids",
                      "attention_mask")}, None)  # fmt: skip
    with pytest.raises(TypeError, match="sft_loss: batch must be a dict of tensors, got list"):
        sft_loss(gpt)(gpt.init(jr.key(0)), {}, [batch], None)
