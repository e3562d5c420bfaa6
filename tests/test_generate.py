"""Tests for fnllm.generate: cached decoding against full recompute and transformers, sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnllm import generate, io, tree
from fnllm import random as jr
from fnllm.models import BERT, GPT

GPT_TINY = GPT(vocab_size=61, n_layer=2, n_head=2, d_model=16, max_len=32)


@pytest.fixture(scope="module")
def params() -> dict:
    # a larger init than GPT-2's 0.02 gives peaked, well-separated logits (no argmax ties)
    p = GPT_TINY.init(jr.key(3))
    return {k: v for k, v in p.items()} | {
        "embed": {
            "tokens": {"weight": p["embed"]["tokens"]["weight"] * 20},
            "positions": p["embed"]["positions"],
        }
    }


def _greedy_by_recompute(model: GPT, params: dict, prompt: list[int], n: int) -> list[int]:
    """The reference: one unpadded row, full forward at every step, argmax."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model.apply(params, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt) :].tolist()


PROMPTS = [[5, 9, 2, 40, 7, 7], [11], [3, 60, 1]]


def test_cached_greedy_equals_recompute_for_left_padded_batch(params: dict) -> None:
    out = generate.sample(None, GPT_TINY, params, PROMPTS, 10, temperature=0)
    assert out.shape == (3, 10)
    for row, prompt in zip(out.tolist(), PROMPTS):
        assert row == _greedy_by_recompute(GPT_TINY, params, prompt, 10)


def test_prefill_and_decode_logits_equal_apply_per_row(params: dict) -> None:
    tokens, mask = generate.pad_prompts(PROMPTS, pad_id=0)
    cache = generate.init_cache(GPT_TINY, 3, tokens.shape[1] + 3)
    logits, cache = generate.prefill(GPT_TINY, params, cache, tokens, mask)
    rows = [list(p) for p in PROMPTS]
    for step in range(3):
        for i, row in enumerate(rows):
            want = GPT_TINY.apply(params, torch.tensor([row]))[0, -1]
            torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=1e-5)
        nxt = torch.tensor([10 + step, 20 + step, 30 + step])
        for row, t in zip(rows, nxt.tolist()):
            row.append(t)
        logits, cache = generate.decode_step(GPT_TINY, params, cache, nxt)
    assert int(cache.length) == tokens.shape[1] + 3


def test_equal_length_batch_matches_apply_on_the_batch(params: dict) -> None:
    tokens = jr.randint(jr.key(1), (4, 7), 0, GPT_TINY.vocab_size)
    cache = generate.init_cache(GPT_TINY, 4, 8)
    _, cache = generate.prefill(GPT_TINY, params, cache, tokens[:, :6])
    logits, _ = generate.decode_step(GPT_TINY, params, cache, tokens[:, 6])
    torch.testing.assert_close(logits, GPT_TINY.apply(params, tokens)[:, -1], atol=1e-4, rtol=0)


def test_untied_head_and_tensor_prompts_with_mask() -> None:
    gpt = GPT(vocab_size=40, n_layer=1, n_head=2, d_model=8, max_len=16, tie_head=False)
    params = gpt.init(jr.key(0))
    tokens = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0]])  # right-padded: re-aligned inside
    mask = tokens != 0
    out = generate.sample(None, gpt, params, tokens, 4, temperature=0, attention_mask=mask)
    assert out[0].tolist() == _greedy_by_recompute(gpt, params, [4, 5, 6], 4)
    assert out[1].tolist() == _greedy_by_recompute(gpt, params, [7, 8], 4)


def test_greedy_matches_transformers_generate(params: dict, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    out_dir = io.to_hf(GPT_TINY, params, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    prompt = [5, 9, 2, 40]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    ours = generate.sample(None, GPT_TINY, params, [prompt], 12, temperature=0)
    assert ours[0].tolist() == ref[0, 4:].tolist()


def test_decode_step_compiles_once_without_graph_breaks(params: dict) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(generate.decode_step, fullgraph=True, dynamic=False)
    tokens, mask = generate.pad_prompts(PROMPTS)
    cache = generate.init_cache(GPT_TINY, 3, tokens.shape[1] + 5)
    _, cache = generate.prefill(GPT_TINY, params, cache, tokens, mask)
    eager_cache = cache
    for t in range(5):
        nxt = torch.full((3,), 7 + t)
        logits, cache = step(GPT_TINY, params, cache, nxt)
        want, eager_cache = generate.decode_step(GPT_TINY, params, eager_cache, nxt)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]
    # sample's own compiled token step (decode in place + top-k/top-p pick + output write):
    # one graph for all steps, no breaks, the tokens of the eager loop
    counters.clear()
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=10, top_p=0.9)
    eager = generate.sample(jr.key(5), GPT_TINY, params, PROMPTS, **kw)
    assert torch.equal(
        generate.sample(jr.key(5), GPT_TINY, params, PROMPTS, **kw, compile=True), eager
    )
    # another max_new_tokens: the cache size is bucketed, so the same step runs again
    kw["max_new_tokens"] = 9
    eager = generate.sample(jr.key(6), GPT_TINY, params, PROMPTS, **kw)
    assert torch.equal(
        generate.sample(jr.key(6), GPT_TINY, params, PROMPTS, **kw, compile=True), eager
    )
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]


def test_in_place_loop_equals_the_pure_decode_step(params: dict) -> None:
    """sample updates buffers it owns in place; a loop over the pure functions agrees."""
    key, n = jr.key(11), 7
    before = {k: v.clone() for k, v in tree.flatten(params).items()}
    out = generate.sample(key, GPT_TINY, params, PROMPTS, n, temperature=0.9, top_k=20)
    keys = jr.split(key, n)
    tokens, mask = generate.pad_prompts(PROMPTS)
    cache = generate.init_cache(GPT_TINY, 3, tokens.shape[1] + n - 1)
    logits, cache = generate.prefill(GPT_TINY, params, cache, tokens, mask)
    want = []
    for i in range(n):
        if i:
            logits, cache = generate.decode_step(GPT_TINY, params, cache, want[-1])
        want.append(generate.next_token(keys[i], logits, temperature=0.9, top_k=20))
    assert torch.equal(out, torch.stack(want, 1))
    after = tree.flatten(params)  # the caller's tree is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_key_same_tokens_and_keys_matter(params: dict) -> None:
    kw = dict(max_new_tokens=8, temperature=1.5)
    a = generate.sample(jr.key(0), GPT_TINY, params, PROMPTS, **kw)
    b = generate.sample(jr.key(0), GPT_TINY, params, PROMPTS, **kw)
    c = generate.sample(jr.key(1), GPT_TINY, params, PROMPTS, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stream_yields_what_sample_returns(params: dict) -> None:
    steps = list(generate.stream(jr.key(4), GPT_TINY, params, PROMPTS, 6, top_k=5))
    full = generate.sample(jr.key(4), GPT_TINY, params, PROMPTS, 6, top_k=5)
    assert torch.equal(torch.stack(steps, 1), full)


def test_top_k_never_leaves_the_top_k(params: dict) -> None:
    k = 3
    for seed in range(4):
        out = generate.sample(jr.key(seed), GPT_TINY, params, PROMPTS, 5, temperature=3.0, top_k=k)
        for prompt, row in zip(PROMPTS, out.tolist()):
            ids = list(prompt)
            for t in row:
                logits = GPT_TINY.apply(params, torch.tensor([ids]))[0, -1]
                assert t in logits.topk(k).indices.tolist()
                ids.append(t)


def _nucleus(logits: torch.Tensor, p: float) -> set[int]:
    """Brute force: add tokens from most to least likely until their mass reaches p."""
    probs = logits.softmax(-1).tolist()
    chosen: set[int] = set()
    mass = 0.0
    for i in sorted(range(len(probs)), key=lambda j: -probs[j]):
        if mass >= p:
            break
        chosen.add(i)
        mass += probs[i]
    return chosen


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95])
def test_top_p_stays_in_the_nucleus(top_p: float) -> None:
    logits = jr.normal(jr.key(7), (6, 20)) * 2
    allowed = [_nucleus(row, top_p) for row in logits]
    for k in jr.split(jr.key(8), 100):
        picks = generate.next_token(k, logits, top_p=top_p).tolist()
        assert all(t in ok for t, ok in zip(picks, allowed))
    seen = {int(generate.next_token(k, logits[:1], top_p=top_p)) for k in jr.split(jr.key(9), 300)}
    assert seen == allowed[0]


def test_sampling_frequencies_follow_softmax_with_temperature() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(20000, 3)
    for temperature in (1.0, 2.0):
        picks = generate.next_token(jr.key(0), logits, temperature=temperature)
        freq = torch.bincount(picks, minlength=3).float() / picks.numel()
        torch.testing.assert_close(freq, (logits[0] / temperature).softmax(-1), atol=0.015, rtol=0)


def test_temperature_zero_is_argmax_and_top_p_one_changes_nothing() -> None:
    logits = jr.normal(jr.key(1), (5, 30))
    assert torch.equal(generate.next_token(None, logits, temperature=0), logits.argmax(-1))
    key = jr.key(2)
    assert torch.equal(generate.next_token(key, logits, top_p=1.0), jr.categorical(key, logits))


def test_stop_ids_end_rows_and_pad_them(params: dict) -> None:
    greedy = generate.sample(None, GPT_TINY, params, PROMPTS, 8, temperature=0)
    stop = int(greedy[0, 2])
    out = generate.sample(
        None, GPT_TINY, params, PROMPTS, 8, temperature=0, stop_ids=[stop], pad_id=1
    )
    first = greedy[0].tolist().index(stop)
    assert out[0, : first + 1].tolist() == greedy[0, : first + 1].tolist()
    assert set(out[0, first + 1 :].tolist()) <= {1}
    for i in (1, 2):  # other rows continue as before until their own stop
        row = greedy[i].tolist()
        end = row.index(stop) + 1 if stop in row else len(row)
        assert out[i, :end].tolist() == row[:end]
    # every row stopping ends generation early
    one = generate.sample(None, GPT_TINY, params, PROMPTS[:1], 8, temperature=0, stop_ids=[stop])
    assert one.shape == (1, first + 1)


@given(st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=6), min_size=1, max_size=4))
def test_pad_prompts_left_pads_and_masks_exactly(rows: list[list[int]]) -> None:
    tokens, mask = generate.pad_prompts(rows, pad_id=0)
    assert tokens.shape == (len(rows), max(map(len, rows)))
    for r, t, m in zip(rows, tokens, mask):
        assert t[m].tolist() == r
        assert not m[: tokens.shape[1] - len(r)].any() and m[tokens.shape[1] - len(r) :].all()
    again, mask2 = generate.pad_prompts(tokens.flip(1), attention_mask=mask.flip(1))
    assert [a[m].tolist() for a, m in zip(again, mask2)] == [r[::-1] for r in rows]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 30}, ValueError, "need a cache of 35 positions > max_len 32"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"temperature": -0.5}, ValueError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"stop_ids": [61]}, ValueError, "stop_ids: id 61 is outside the vocabulary"),
        ({"stop_ids": [-1]}, ValueError, "stop_ids"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"prompts": [[1, 2], []]}, ValueError, r"prompts\[1\]: empty prompt"),
        (
            {"prompts": [[1, 99]]},
            ValueError,
            r"prompts\[0\]\[1\]: id 99 is outside the vocabulary \[0, 61\)",
        ),
        ({"prompts": "hello"}, TypeError, "prompts"),
        ({"key": None}, ValueError, "key"),
    ],
)
def test_bad_arguments_are_named(params: dict, kwargs: dict, error: type, match: str) -> None:
    args = {"key": jr.key(0), "prompts": PROMPTS, "max_new_tokens": 4} | kwargs
    with pytest.raises(error, match=match):
        generate.sample(args.pop("key"), GPT_TINY, params, args.pop("prompts"), **args)


def test_model_must_be_a_gpt() -> None:
    bert = BERT(vocab_size=30, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=16)
    with pytest.raises(TypeError, match=r"model: expected a fnllm\.models\.GPT, got BERT"):
        generate.sample(None, bert, bert.init(jr.key(0)), [[1, 2]], 2, temperature=0)


def test_decode_step_refuses_a_full_cache(params: dict) -> None:
    cache = generate.init_cache(GPT_TINY, 1, 3)
    _, cache = generate.prefill(GPT_TINY, params, cache, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="cache: 1 tokens do not fit in the 0 free slots"):
        generate.decode_step(GPT_TINY, params, cache, torch.tensor([4]))
    with pytest.raises(ValueError, match="ends in padding"):
        generate.prefill(
            GPT_TINY, params, generate.init_cache(GPT_TINY, 1, 3),
            torch.tensor([[1, 2]]), torch.tensor([[1, 0]]),
        )  # fmt: skip
