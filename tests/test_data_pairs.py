"""Tests for fnllm.data.sentence_pairs: structure, truncation, label rates, vmap, compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import random as jr
from fnllm.data import pad_sequences, sentence_pairs, truncate_lengths

CLS, SEP, PAD = 1, 2, 0
IDS = {"cls_id": CLS, "sep_id": SEP, "pad_id": PAD}


def _segments(seed: int, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random segments with ids >= 10 (distinct from the specials)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=rows)  # empty segments are refused
    ids = rng.integers(10, 100, size=(rows, width))
    ids = np.where(np.arange(width) < lengths[:, None], ids, PAD)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def _reference_truncate(a: int, b: int, budget: int) -> tuple[int, int]:
    """BERT's truncate_seq_pair loop: drop from the longer segment, B on a tie."""
    while a + b > budget:
        if a > b:
            a -= 1
        else:
            b -= 1
    return a, b


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 60))
def test_truncate_lengths_equals_the_longest_first_loop(a: int, b: int, budget: int) -> None:
    got = truncate_lengths(torch.tensor([a]), torch.tensor([b]), budget)
    assert (int(got[0]), int(got[1])) == _reference_truncate(a, b, budget)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(2, 5),
    width_a=st.integers(1, 12),
    width_b=st.integers(1, 12),
    max_len=st.integers(3, 24),
    mode=st.sampled_from(["sop", "nsp"]),
)
def test_pair_structure_invariants(
    seed: int, rows: int, width_a: int, width_b: int, max_len: int, mode: str
) -> None:
    first, first_len = _segments(seed, rows, width_a)
    second, second_len = _segments(seed + 1, rows, width_b)
    out = sentence_pairs(
        jr.key(seed), first, second, first_len=first_len, second_len=second_len,
        mode=mode, max_len=max_len, **IDS,
    )  # fmt: skip
    ids, types, mask, labels = (
        out["input_ids"], out["token_type_ids"], out["attention_mask"], out["labels"]
    )  # fmt: skip
    assert ids.shape == types.shape == mask.shape == (rows, max_len)
    assert labels.shape == (rows,) and set(labels.tolist()) <= {0, 1}
    for r in range(rows):
        n = int(mask[r].sum())
        assert torch.equal(mask[r], (torch.arange(max_len) < n).long())  # mask = non-pad prefix
        assert bool((ids[r, n:] == PAD).all()) and bool((ids[r, :n] != PAD).all())
        assert int(ids[r, 0]) == CLS and int((ids[r] == CLS).sum()) == 1
        seps = (ids[r] == SEP).nonzero().flatten().tolist()
        assert len(seps) == 2 and seps[1] == n - 1  # never dropped by truncation
        la, lb = seps[0] - 1, seps[1] - seps[0] - 1
        assert types[r].tolist() == [0] * (la + 2) + [1] * (lb + 1) + [0] * (max_len - n)
        seg_a, seg_b = ids[r, 1 : 1 + la].tolist(), ids[r, seps[0] + 1 : seps[1]].tolist()
        # The label matches the order actually produced.
        true_a = first[r, : first_len[r]].tolist()
        true_b = second[r, : second_len[r]].tolist()
        budget = max_len - 3
        if mode == "sop":
            src_a, src_b = (true_b, true_a) if labels[r] else (true_a, true_b)
        elif not labels[r]:
            src_a, src_b = true_a, true_b
        else:  # B came from another row: some other row's B explains what we see
            src_a = true_a
            others = [second[o, : second_len[o]].tolist() for o in range(rows) if o != r]
            fits = [
                o for o in others
                if o[:lb] == seg_b and _reference_truncate(len(src_a), len(o), budget) == (la, lb)
            ]  # fmt: skip
            assert fits, f"row {r}: B segment {seg_b} is no other row's truncated B"
            src_b = fits[0]
        assert (la, lb) == _reference_truncate(len(src_a), len(src_b), budget)
        assert seg_a == src_a[:la] and seg_b == src_b[:lb]


@pytest.mark.parametrize("mode", ["sop", "nsp"])
def test_label_rate_is_about_one_half(mode: str) -> None:
    n = 4000
    first, first_len = _segments(0, n, 4)
    second, second_len = _segments(1, n, 4)
    out = sentence_pairs(
        jr.key(3), first, second, first_len=first_len, second_len=second_len, mode=mode,
        max_len=12, **IDS,
    )  # fmt: skip
    rate = float(out["labels"].float().mean())
    assert abs(rate - 0.5) <= 5 * math.sqrt(0.25 / n)


def test_nsp_replacement_comes_uniformly_from_the_other_rows() -> None:
    rows, draws = 5, 400
    first = torch.full((rows, 1), 10)
    second = (100 + torch.arange(rows))[:, None]  # row r's B segment is [100 + r]
    counts = torch.zeros(rows, rows)
    for k in jr.split(jr.key(0), draws):
        out = sentence_pairs(k, first, second, mode="nsp", max_len=5, **IDS)
        source = out["input_ids"][:, 3] - 100
        for r in range(rows):
            if out["labels"][r]:
                counts[r, source[r]] += 1
            else:
                assert int(source[r]) == r
    assert float(counts.diagonal().sum()) == 0  # never its own B when labelled "not next"
    per_row = counts.sum(1, keepdim=True)
    expected = per_row / (rows - 1)
    off = ~torch.eye(rows, dtype=torch.bool)
    sd = torch.sqrt(per_row * (1 / (rows - 1)) * (1 - 1 / (rows - 1))).expand(rows, rows)
    assert bool(((counts - expected).abs()[off] <= 5 * sd[off]).all())


def test_list_input_equals_padded_tensor_input() -> None:
    a, b = [[11, 12, 13], [14], [15, 16]], [[21], [22, 23, 24, 25], [26]]
    from_lists = sentence_pairs(jr.key(1), a, b, mode="nsp", max_len=9, **IDS)
    first, first_len = pad_sequences(a, PAD)
    second, second_len = pad_sequences(b, PAD)
    from_tensors = sentence_pairs(
        jr.key(1), first, second, first_len=first_len, second_len=second_len, mode="nsp",
        max_len=9, **IDS,
    )  # fmt: skip
    for k in from_lists:
        assert torch.equal(from_lists[k], from_tensors[k])


def test_default_lengths_count_non_pad_ids() -> None:
    first, first_len = _segments(2, 4, 6)
    second, second_len = _segments(3, 4, 5)
    given_len = sentence_pairs(
        jr.key(2), first, second, first_len=first_len, second_len=second_len, max_len=10, **IDS
    )
    default_len = sentence_pairs(jr.key(2), first, second, max_len=10, **IDS)
    for k in given_len:
        assert torch.equal(given_len[k], default_len[k])


def test_same_key_same_output_and_inputs_not_mutated() -> None:
    first, first_len = _segments(5, 6, 5)
    second, second_len = _segments(6, 6, 5)
    before = (first.clone(), second.clone())
    kw = {"first_len": first_len, "second_len": second_len, "mode": "nsp", "max_len": 11, **IDS}
    a = sentence_pairs(jr.key(4), first, second, **kw)
    b = sentence_pairs(jr.key(4), first, second, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])


def test_vmap_over_keys_equals_loop_for_unbatched_sop() -> None:
    first, first_len = _segments(7, 6, 5)
    second, second_len = _segments(8, 6, 4)
    keys = jr.split(jr.key(5), 6)

    def one(k: torch.Tensor, a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor):
        return sentence_pairs(k, a, b, first_len=la, second_len=lb, max_len=9, **IDS)

    batched = torch.func.vmap(one)(keys, first, second, first_len, second_len)
    for r in range(6):
        single = one(keys[r], first[r], second[r], first_len[r], second_len[r])
        for k in single:
            assert torch.equal(batched[k][r], single[k]), k


def test_compiled_equals_eager_with_zero_graph_breaks() -> None:
    first, first_len = _segments(9, 3, 4)
    second, second_len = _segments(10, 3, 4)

    def fn(k: torch.Tensor, a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor):
        return sentence_pairs(k, a, b, first_len=la, second_len=lb, mode="nsp", max_len=8, **IDS)

    args = (jr.key(6), first, second, first_len, second_len)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    got, want = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), fn(*args)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_len": 2}, ValueError, "max_len: 2 < 3"),
        ({"mode": "mlm"}, ValueError, "mode"),
        ({"first": torch.tensor([[1.0, 2.0]])}, ValueError, "first: expected a signed integer"),
        ({"first_len": torch.tensor([3, 1])}, ValueError, r"first_len: 3 at \[0\]"),
        ({"second": torch.ones(3, 2, dtype=torch.long)}, ValueError, "batch sizes differ"),
        ({"cls_id": 1.0}, TypeError, "cls_id"),
    ],
)
def test_bad_input_raises(kwargs: dict, error: type, match: str) -> None:
    args = {
        "first": torch.tensor([[11, 12], [13, 0]]),
        "second": torch.tensor([[14, 0], [15, 16]]),
        "max_len": 8,
        **IDS,
        **kwargs,
    }
    first, second = args.pop("first"), args.pop("second")
    with pytest.raises(error, match=match):
        sentence_pairs(jr.key(0), first, second, **args)


def test_nsp_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        sentence_pairs(jr.key(0), [[11]], [[12]], mode="nsp", max_len=6, **IDS)
