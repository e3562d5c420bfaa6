"""Bad input to the core modules (tree, data, losses, optim, nn, models) gets an error that
names the argument and what was expected, never a silent result (issue 11)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import losses, nn, optim, tree
from fnllm import random as jr
from fnllm.data import (
    default_documents,
    instruction_targets,
    load_tokenizer,
    pack,
    pad_sequences,
    sentence_pairs,
    train_tokenizer,
    truncate_lengths,
)
from fnllm.models import BERT, GPT

BAD_FLOATS = [math.nan, math.inf, -math.inf]

# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("bad", [*BAD_FLOATS, -0.1, 1.5])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_cross_entropy_label_smoothing_range(bad: float, as_tensor: bool) -> None:
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    value = torch.tensor(bad) if as_tensor else bad
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(logits, labels, label_smoothing=value)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.causal_lm(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]), label_smoothing=value)


def test_tensor_label_smoothing_equals_the_float() -> None:
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, -100])
    want = losses.cross_entropy(logits, labels, label_smoothing=0.2)
    got = losses.cross_entropy(logits, labels, label_smoothing=torch.tensor(0.2))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [*BAD_FLOATS, -0.5])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_pairwise_reward_margin_range(bad: float, as_tensor: bool) -> None:
    margin = torch.tensor([0.0, bad]) if as_tensor else bad
    with pytest.raises(ValueError, match="margin"):
        losses.pairwise_reward(torch.zeros(2), torch.zeros(2), margin=margin)


@pytest.mark.parametrize(
    ("option", "bad"),
    [("beta", 0.0), ("beta", -1.0), ("beta", math.nan), ("beta", math.inf)]
    + [("label_smoothing", v) for v in (-0.1, 0.6, math.nan)],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_dpo_options_range(option: str, bad: float, as_tensor: bool) -> None:
    z = torch.zeros(3)
    value = torch.tensor(bad) if as_tensor else bad
    with pytest.raises(ValueError, match=option):
        losses.dpo(z, z, z, z, **{option: value})


def test_dpo_tensor_beta_equals_the_float() -> None:
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    z = torch.zeros(2)
    want = losses.dpo(a, b, z, z, beta=0.3, label_smoothing=0.1)
    got = losses.dpo(a, b, z, z, beta=torch.tensor(0.3), label_smoothing=torch.tensor(0.1))
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- optim


def _one_step(opt: optim.GradientTransformation, steps: int = 1) -> dict:
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update({"w": torch.ones(3)}, state, params)
        params = optim.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("make", [optim.adamw, optim.adam, optim.sgd, optim.scale_by_learning_rate])
@pytest.mark.parametrize("bad", [*BAD_FLOATS, -1e-3])
def test_learning_rate_as_tensor_is_checked_like_a_float(make, bad: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        make(bad)
    with pytest.raises(ValueError, match="lr"):
        make(torch.tensor(bad))


@pytest.mark.parametrize("make", [optim.adamw, optim.adam, optim.sgd, optim.scale_by_learning_rate])
def test_learning_rate_tensor_changed_in_place_is_checked_when_used(make) -> None:
    lr = torch.tensor(0.1)
    opt = make(lr)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    opt.update({"w": torch.ones(2)}, state, params)  # fine
    lr.fill_(-0.1)
    with pytest.raises(ValueError, match="uphill"):
        opt.update({"w": torch.ones(2)}, state, params)


@pytest.mark.parametrize("make", [optim.adamw, optim.adam, optim.sgd, optim.scale_by_learning_rate])
def test_a_schedule_that_goes_negative_never_moves_parameters_uphill(make) -> None:
    """A hand-written schedule (built outside fnllm.optim) is checked where it is evaluated."""
    schedule = lambda count: 0.1 - 0.1 * count.float()  # 0.1, 0.0, -0.1, ...
    opt = make(schedule)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update({"w": torch.ones(2)}, state, params)
        params = optim.apply_updates(params, updates)
    with pytest.raises(ValueError, match=r"-0\.1.* at step 2"):
        opt.update({"w": torch.ones(2)}, state, params)


def test_tensor_learning_rate_gives_the_float_result() -> None:
    want = _one_step(optim.adamw(0.05, weight_decay=0.1), steps=3)
    got = _one_step(optim.adamw(torch.tensor(0.05), weight_decay=0.1), steps=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want = _one_step(optim.sgd(0.05, momentum=0.9), steps=3)
    got = _one_step(optim.sgd(torch.tensor(0.05), momentum=0.9), steps=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: optim.constant(v),
        lambda v: optim.linear_warmup(v, 10),
        lambda v: optim.linear_warmup(1e-3, 10, init=v),
        lambda v: optim.cosine_decay(v, 10),
        lambda v: optim.warmup_cosine(v, 2, 10),
        lambda v: optim.warmup_cosine(1e-3, 2, 10, end=v),
    ],
)
@pytest.mark.parametrize("bad", [*BAD_FLOATS, -1e-3])
def test_schedules_refuse_negative_or_non_finite_values_at_construction(make, bad) -> None:
    with pytest.raises(ValueError, match="expected"):
        make(bad)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_cosine_decay_alpha_is_a_fraction(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        optim.cosine_decay(1e-3, 10, alpha=alpha)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(1, 50), st.integers(0, 60))
def test_schedule_values_never_go_negative(peak: float, warmup: int, step: int) -> None:
    for s in (
        optim.warmup_cosine(peak, warmup, warmup + 10, end=peak / 10),
        optim.cosine_decay(peak, warmup, alpha=0.5),
        optim.linear_warmup(peak, warmup),
    ):
        assert float(s(step)) >= 0.0


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan])
def test_momentum_decay_is_a_fraction(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        optim.trace(decay)


def test_scale_by_schedule_refuses_a_non_finite_value() -> None:
    t = optim.scale_by_schedule(lambda count: torch.tensor(math.nan))
    with pytest.raises(ValueError, match=r"scale_by_schedule.*step 0"):
        t.update({"w": torch.ones(1)}, t.init({"w": torch.ones(1)}))


# ----------------------------------------------------------------------------- tree


def test_partition_names_a_glob_that_matches_nothing() -> None:
    params = {"blocks": [{"w": torch.zeros(1)}], "head": torch.ones(1)}
    with pytest.raises(ValueError, match="'haed'"):
        tree.partition(params, ["blocks.0.*", "haed"])
    # opting out keeps the old behaviour
    sel, rest = tree.partition(params, ["blocks.0.*", "haed"], allow_unmatched=True)
    assert tree.paths(sel) == ["blocks.0.w"] and tree.paths(rest) == ["head"]
    # every glob matching something is fine
    sel, _ = tree.partition(params, ["blocks.0.*", "head"])
    assert tree.paths(sel) == ["blocks.0.w", "head"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["a", "b.*", "b.0", "c", "zz", "b.9.*"]), min_size=1, max_size=4))
def test_partition_raises_exactly_when_some_glob_matches_nothing(globs: list[str]) -> None:
    params = {"a": torch.zeros(1), "b": [torch.zeros(1), torch.zeros(1)], "c": torch.zeros(1)}
    unmatched = [
        g for g in globs if not any(tree.filter_fn(g)(p, None) for p in tree.paths(params))
    ]
    if unmatched:
        with pytest.raises(
            ValueError, match=repr(unmatched[0]).replace(".", r"\.").replace("*", r"\*")
        ):
            tree.partition(params, globs)
    else:
        tree.partition(params, globs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_cast_to_an_integer_dtype_needs_allow_integer(dtype: torch.dtype) -> None:
    params = {"w": torch.full((2,), 0.7)}
    with pytest.raises(ValueError, match="allow_integer"):
        tree.cast(params, dtype)
    assert tree.cast(params, dtype, allow_integer=True)["w"].dtype == dtype
    with pytest.raises(TypeError, match="dtype"):
        tree.cast(params, "float16")


# ----------------------------------------------------------------------------- data


def test_sentence_pairs_refuse_empty_segments_and_negative_special_ids() -> None:
    ids = {"cls_id": 1, "sep_id": 2, "pad_id": 0, "max_len": 8}
    with pytest.raises(ValueError, match="first_len: row 1 is an empty segment"):
        sentence_pairs(jr.key(0), [[5], []], [[6], [7]], **ids)
    with pytest.raises(ValueError, match="second_len: row 0 is an empty segment"):
        sentence_pairs(jr.key(0), [[5], [6]], [[], [7]], **ids)
    for name in ("cls_id", "sep_id", "pad_id"):
        with pytest.raises(ValueError, match=name):
            sentence_pairs(jr.key(0), [[5], [6]], [[6], [7]], **{**ids, name: -1})


def test_pack_refuses_negative_special_ids() -> None:
    with pytest.raises(ValueError, match="eos_id"):
        pack([[1, 2]], block_size=2, eos_id=-1)
    with pytest.raises(ValueError, match="pad_id"):
        pack([[1, 2]], block_size=4, eos_id=0, drop_remainder=False, pad_id=-2)


@pytest.mark.parametrize("prompt", [5, -1, torch.tensor([1, 6]), torch.tensor([-2, 1])])
def test_instruction_targets_refuse_prompts_outside_the_sequence(prompt) -> None:
    tokens = torch.arange(8).reshape(2, 4)
    with pytest.raises(ValueError, match="prompt_len"):
        instruction_targets(tokens, prompt_len=prompt)


def test_instruction_targets_refuse_a_float_prompt_length() -> None:
    with pytest.raises(TypeError, match="prompt_len"):
        instruction_targets(torch.arange(4)[None], prompt_len=2.0)


def test_wordpiece_vocabulary_too_small_for_any_word_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vocab_size: 8 is too small.*need"):
        train_tokenizer(default_documents()[:3], "wordpiece", vocab_size=8)


def test_corrupt_tokenizer_file_names_the_path(tmp_path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- nn


def test_linear_names_a_width_mismatch() -> None:
    p = nn.init_linear(jr.key(0), 4, 3)
    with pytest.raises(ValueError, match=r"linear: x has width 5.*expected 4"):
        nn.linear(p, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bias"):
        nn.linear({"weight": torch.zeros(3, 4), "bias": torch.zeros(4)}, torch.zeros(4))
    with pytest.raises(KeyError, match="weight"):
        nn.linear({"w": torch.zeros(3, 4)}, torch.zeros(4))
    with pytest.raises(TypeError, match="floating"):
        nn.linear(p, torch.zeros(2, 4, dtype=torch.long))


def test_layer_norm_names_a_width_mismatch() -> None:
    with pytest.raises(ValueError, match=r"layer_norm: x has width 5.*expected 4"):
        nn.layer_norm(nn.init_layer_norm(None, 4), torch.zeros(2, 5))


def test_embedding_names_an_id_out_of_range() -> None:
    p = nn.init_embedding(jr.key(0), 10, 4)
    with pytest.raises(ValueError, match=r"ids: id 10 at \[1, 0\] >= size 10"):
        nn.embedding(p, torch.tensor([[1, 2], [10, 0]]))
    with pytest.raises(ValueError, match=r"ids: id -1"):
        nn.embedding(p, torch.tensor([-1]))
    with pytest.raises(TypeError, match="ids"):
        nn.embedding(p, torch.tensor([1.0]))


def test_attention_names_a_mask_of_the_wrong_length() -> None:
    p = nn.init_attention(jr.key(0), 8)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\).*\[\.\.\., 5\]"):
        nn.attention(p, x, n_head=2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask has shape"):
        nn.attention(p, x, n_head=2, mask=torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="width"):
        nn.attention(p, torch.randn(2, 5, 6), n_head=2)


def test_attention_combines_causal_with_a_padding_mask() -> None:
    """causal=True with a prepared padding-only mask equals folding both in at once."""
    p = nn.init_attention(jr.key(0), 8)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = nn.attention(p, x, n_head=2, causal=True, attention_mask=pad)
    padding_only = nn.make_attention_mask(pad)
    got = nn.attention(p, x, n_head=2, causal=True, mask=padding_only)
    # rows with a kept key agree exactly; a left-padding query differs only in which finite
    # values it gets (it has no key of its own to attend to)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1, 1:], want[1, 1:], rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(got).all())
    # and it is causal: changing a later position leaves earlier outputs unchanged
    x2 = x.clone()
    x2[:, -1] += 1.0
    got2 = nn.attention(p, x2, n_head=2, causal=True, mask=padding_only)
    torch.testing.assert_close(got2[0, :3], got[0, :3], rtol=1e-5, atol=1e-6)


def test_attention_refuses_causal_with_a_non_causal_square_mask() -> None:
    p = nn.init_attention(jr.key(0), 8)
    x = torch.randn(1, 4, 8)
    # a square padding mask (every query sees keys 0..2) is not causal
    square = torch.tensor([True, True, True, False]).expand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="causal=True"):
        nn.attention(p, x, n_head=2, causal=True, mask=square)
    # a mask made with causal=True is accepted as is (the documented pattern)
    causal = nn.make_attention_mask(torch.tensor([[0, 1, 1, 1]]), causal=True)
    torch.testing.assert_close(
        nn.attention(p, x, n_head=2, causal=True, mask=causal),
        nn.attention(p, x, n_head=2, mask=causal),
    )


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("model", [GPT(vocab_size=11, max_len=8, d_model=8, n_layer=1, n_head=2),
                                   BERT(vocab_size=11, max_len=8, d_model=8, n_layer=1, n_head=2,
                                        d_ff=16)])  # fmt: skip
def test_a_params_tree_with_one_odd_dtype_names_the_leaf(model) -> None:
    params = model.init(jr.key(0))
    path = tree.paths(params)[3]
    odd = tree.unflatten({**tree.flatten(params), path: tree.flatten(params)[path].double()})
    with pytest.raises(TypeError, match=rf"params: {path.replace('.', '[.]')} has dtype "
                       r"torch.float64 while the other leaves are torch.float32"):  # fmt: skip
        model.apply(odd, torch.tensor([[1, 2, 3]]))
    ints = tree.unflatten({**tree.flatten(params), path: tree.flatten(params)[path].long()})
    with pytest.raises(TypeError, match="floating"):
        model.apply(ints, torch.tensor([[1, 2, 3]]))


# ----------------------------------------------------------------------------- sweep


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nn.init_embedding(jr.key(0), 0, 3), "num"),
        (lambda: nn.init_embedding(jr.key(0), 3, 3, std=math.nan), "std"),
        (lambda: nn.init_linear(jr.key(0), 4.0, 3), "d_in"),
        (lambda: nn.init_linear(jr.key(0), 4, 3, std=-1.0), "std"),
        (lambda: nn.init_layer_norm(None, 0), "dim"),
        (lambda: nn.layer_norm(nn.init_layer_norm(None, 3), torch.ones(2, 3), eps=-1.0), "eps"),
        (lambda: nn.layer_norm(nn.init_layer_norm(None, 3), torch.ones(2, 3), eps=math.nan), "eps"),
        (
            lambda: nn.attention(
                nn.init_attention(jr.key(0), 8),
                torch.ones(1, 3, 8),
                n_head=2,
                key=jr.key(1),
                dropout=math.nan,
            ),
            "dropout",
        ),
        (
            lambda: nn.attention(nn.init_attention(jr.key(0), 8), torch.ones(1, 3, 8), n_head=0),
            "n_head",
        ),
        (lambda: nn.make_attention_mask([[1, 0]]), "attention_mask"),
        (
            lambda: losses.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), ignore_index=1.5),
            "ignore_index",
        ),
        (lambda: optim.decay_mask(min_ndim=-1), "min_ndim"),
        (lambda: optim.linear_warmup(0.1, 3)(-1), "step"),
        (lambda: tree.flatten({1: torch.ones(1), "1": torch.ones(1)}), "'1'"),
        (lambda: pad_sequences([[1.5]], 0), r"sequences\[0\]"),
        (lambda: pad_sequences("abc", 0), "sequences"),
        (lambda: truncate_lengths(torch.tensor([3]), torch.tensor([3]), -1), "budget"),
        (
            lambda: GPT(vocab_size=11, max_len=8, d_model=8, n_layer=1, n_head=2, tie_head="no"),
            "tie_head",
        ),
        (
            lambda: BERT(
                vocab_size=11, max_len=8, d_model=8, n_layer=1, n_head=2, d_ff=16, pooler=1
            ),
            "pooler",
        ),
    ],
)
def test_sweep_of_bad_arguments_names_them(call, match: str) -> None:
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        call()


def test_model_refuses_an_empty_sequence() -> None:
    model = GPT(vocab_size=11, max_len=8, d_model=8, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="empty sequence"):
        model.apply(model.init(jr.key(0)), torch.ones(1, 0, dtype=torch.long))


@pytest.mark.parametrize("mask", ["haed", ["blocks.*", "haed"]])
def test_optimizer_mask_glob_that_matches_nothing_is_named(mask) -> None:
    opt = optim.adamw(1e-3, weight_decay=0.1, mask=mask)
    with pytest.raises(ValueError, match="'haed' matches no leaf"):
        opt.init({"blocks": [{"w": torch.ones(2, 2)}], "head": torch.ones(2)})


# ----------------------------------------------------------------------------- renames, epochs


def test_old_names_stay_as_aliases() -> None:
    opt = optim.adamw(0.1)
    w = {"w": torch.ones(2)}
    g = {"w": torch.tensor([1.0, -1.0])}
    new, _ = optim.apply_gradients(opt, g, opt.init(w), w)
    old, _ = optim.step(opt, g, opt.init(w), w)
    torch.testing.assert_close(new, old, rtol=0, atol=0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        optim.apply_gradients("adamw", g, {}, w)
    batch = sentence_pairs(
        jr.key(0), [[5], [6]], [[7], [8]], cls_id=1, sep_id=2, pad_id=0, max_len=6
    )
    assert batch["labels"] is batch["next_sentence_label"]


def test_epochs_stream_is_the_per_epoch_loaders_back_to_back() -> None:
    from fnllm.data import Corpus, epochs, gpt_batches

    corpus, key = Corpus(kind="bpe", vocab_size=300), jr.key(3)
    make = lambda e: gpt_batches(corpus, key, batch_size=8, block_size=16, epoch=e)
    stream = epochs(make, num_epochs=3, start_step=2)
    n = stream.steps_per_epoch
    want = [make(e).batch(i)["input_ids"] for e in range(3) for i in range(n)][2:]
    got = [b["input_ids"] for b in stream]
    assert len(got) == len(stream) == 3 * n - 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="step"):
        stream.batch(3 * n)
    with pytest.raises(TypeError, match="Batches"):
        epochs(lambda e: [1, 2, 3])
    uneven = epochs(lambda e: gpt_batches(corpus, key, batch_size=8 + e, block_size=16, epoch=e))
    with pytest.raises(ValueError, match="same number"):
        uneven.batch(uneven.steps_per_epoch)
    with pytest.raises(TypeError, match="num_epochs"):
        epochs(make, num_epochs=1.5)


@pytest.mark.parametrize("prob", [torch.tensor(0.5), True, "0.1"])
def test_mlm_rates_must_be_python_floats(prob) -> None:
    from fnllm.data import mlm_mask

    with pytest.raises(TypeError, match="prob: expected a Python float"):
        mlm_mask(jr.key(0), torch.tensor([[5, 6]]), mask_id=1, vocab_size=10, prob=prob)
