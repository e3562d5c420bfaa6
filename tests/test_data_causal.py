"""Tests for fnllm.data causal-LM helpers: causal_targets, instruction_targets, pack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import testing
from fnllm.data import causal_targets, instruction_targets, pack


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(["right", "left"]).flatmap(
        lambda side: testing.token_batches(50, 20, padding=side, pad_id=0, min_tokens=0)
    )
)
def test_targets_are_next_tokens_except_where_a_pair_touches_padding(batch: dict) -> None:
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    rows, length = tokens.shape
    targets = causal_targets(tokens, mask)
    assert targets.shape == tokens.shape and targets.dtype == tokens.dtype
    for b in range(rows):
        for t in range(length):
            valid = t + 1 < length and bool(mask[b, t]) and bool(mask[b, t + 1])
            assert int(targets[b, t]) == (int(tokens[b, t + 1]) if valid else -100)


def test_targets_without_mask_shift_everything_and_work_unbatched() -> None:
    tokens = torch.tensor([4, 5, 6])
    assert causal_targets(tokens).tolist() == [5, 6, -100]
    assert causal_targets(tokens[None]).tolist() == [[5, 6, -100]]


@settings(max_examples=20, deadline=None)
@given(testing.token_batches(17, 12, pad_id=0, min_tokens=2))  # right padding, as HF batches come
def test_loss_on_targets_equals_hugging_face_causal_lm_loss(batch: dict) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokens, mask = batch["input_ids"], batch["attention_mask"]
    shape = (*tokens.shape, 17)
    logits = torch.from_numpy(np.random.default_rng(0).standard_normal(shape)).float()
    hf_labels = torch.where(mask.bool(), tokens, -100)  # HF: labels = ids, -100 on padding
    want = ForCausalLMLoss(logits, hf_labels, vocab_size=17)
    targets = causal_targets(tokens, mask)
    got = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want)


@settings(max_examples=40, deadline=None)
@given(testing.token_batches(50, 16, pad_id=0, min_tokens=0), st.data())
def test_instruction_targets_drop_exactly_the_prompt_predictions(
    batch: dict, data: st.DataObject
) -> None:
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    rows, length = tokens.shape
    prompt = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows)))
    by_len = instruction_targets(tokens, prompt_len=prompt, attention_mask=mask)
    prompt_mask = torch.arange(length) < prompt[:, None]
    by_mask = instruction_targets(tokens, prompt_mask=prompt_mask, attention_mask=mask)
    assert torch.equal(by_len, by_mask)
    full = causal_targets(tokens, mask)
    for b in range(rows):
        for t in range(length):
            want = -100 if t + 1 < int(prompt[b]) else int(full[b, t])
            assert int(by_len[b, t]) == want


def test_instruction_targets_with_int_prompt_and_bad_arguments() -> None:
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert instruction_targets(tokens, prompt_len=2).tolist() == [[-100, 3, 4, -100]]
    with pytest.raises(ValueError, match="exactly one"):
        instruction_targets(tokens)
    with pytest.raises(ValueError, match="exactly one"):
        instruction_targets(tokens, prompt_len=1, prompt_mask=torch.ones(1, 4, dtype=bool))
    with pytest.raises(ValueError, match="prompt_len"):
        instruction_targets(tokens, prompt_len=torch.tensor([1.5]))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 99), max_size=12), max_size=8),
    st.integers(1, 10),
    st.booleans(),
)
def test_pack_rows_are_the_eos_joined_stream_cut_into_blocks(
    docs: list[list[int]], block: int, drop: bool
) -> None:
    stream = [t for d in docs for t in (*d, 0)]
    out = pack(docs, block, eos_id=0, drop_remainder=drop, pad_id=100)
    assert out.dtype == torch.int64 and out.shape[1:] == (block,)
    n_full = len(stream) // block
    if drop or len(stream) % block == 0:
        assert out.shape[0] == n_full
        assert out.flatten().tolist() == stream[: n_full * block]
    else:
        assert out.shape[0] == n_full + 1
        flat = out.flatten().tolist()
        assert flat[: len(stream)] == stream and set(flat[len(stream) :]) == {100}


def test_pack_accepts_tensors_and_rejects_bad_input() -> None:
    out = pack([torch.tensor([1, 2]), [3]], block_size=5, eos_id=9)
    assert out.tolist() == [[1, 2, 9, 3, 9]]
    with pytest.raises(ValueError, match="block_size"):
        pack([[1]], block_size=0, eos_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        pack([[1]], block_size=4, eos_id=0, drop_remainder=False)
    with pytest.raises(TypeError, match=r"sequences\[1\]"):
        pack([[1], [2.5]], block_size=2, eos_id=0)


def test_float_tokens_and_mask_shape_mismatch_raise() -> None:
    with pytest.raises(ValueError, match="tokens: expected a signed integer dtype"):
        causal_targets(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="attention_mask: shape"):
        causal_targets(torch.tensor([[1, 2]]), torch.ones(1, 3))


def test_causal_targets_under_vmap_and_compile_match_eager() -> None:
    # right padding, one full row, one fully padded row
    tokens = torch.tensor([[7, 3, 9, 4, 0, 0, 0, 0, 0], [5, 1, 8, 2, 6, 3, 9, 4, 7], [0] * 9])
    mask = (tokens != 0).long()
    eager = causal_targets(tokens, mask)
    assert torch.equal(torch.func.vmap(causal_targets)(tokens, mask), eager)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(causal_targets)(tokens, mask)
    assert explained.graph_break_count == 0
    compiled = torch.compile(causal_targets, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(tokens, mask), eager)
