"""Tests for fnllm.grads: per-example gradients, clipping, DP noise, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import grads, losses, testing, tree
from fnllm import random as jr

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- fixtures


def _mlp_params(seed: int = 0, d_in: int = 5, d_hidden: int = 7, d_out: int = 3) -> dict:
    k = jr.split(jr.key(seed), 4)
    return {
        "l1": {"w": jr.normal(k[0], (d_in, d_hidden)), "b": jr.normal(k[1], (d_hidden,))},
        "l2": {"w": jr.normal(k[2], (d_hidden, d_out)), "b": jr.normal(k[3], (d_out,))},
    }


def _mlp_loss(trainable: dict, frozen: dict, batch: dict) -> torch.Tensor:
    """Mean over the examples of a masked squared error (mask 0 = padding example row)."""
    p = tree.combine(trainable, frozen)
    h = torch.tanh(batch["x"] @ p["l1"]["w"] + p["l1"]["b"])
    out = h @ p["l2"]["w"] + p["l2"]["b"]
    err = ((out - batch["y"]) ** 2 * batch["mask"][..., None]).sum(-1)
    return err.mean()


def _mlp_batch(seed: int, b: int, d_in: int = 5, d_out: int = 3) -> dict:
    k = jr.split(jr.key(seed + 100), 3)
    return {
        "x": jr.normal(k[0], (b, d_in)),
        "y": jr.normal(k[1], (b, d_out)),
        "mask": jr.bernoulli(k[2], 0.8, (b,)).float(),
    }


# ----------------------------------------------------------------------------- per_example


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 6),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
    trainable_glob=st.sampled_from(["*", "l2", "l1.w", ["l1.b", "l2.w"]]),
    seed=st.integers(0, 50),
)
def test_per_example_equals_loop_of_single_example_grads(b, chunk, trainable_glob, seed):
    params = _mlp_params(seed)
    trainable, frozen = tree.partition(params, trainable_glob)
    batch = _mlp_batch(seed, b)
    got = grads.per_example(_mlp_loss, chunk_size=chunk)(trainable, frozen, batch)
    assert tree.paths(got) == tree.paths(trainable)  # no gradient for a frozen leaf
    testing.assert_per_example_grads(
        lambda tr, bt: _mlp_loss(tr, frozen, bt),
        trainable,
        batch,
        per_example_grads=got,
        rtol=RTOL,
        atol=ATOL,
    )


def test_per_example_chunking_does_not_change_the_result():
    params, batch = _mlp_params(1), _mlp_batch(1, 7)
    full = grads.per_example(_mlp_loss)(params, {}, batch)
    for chunk in (1, 2, 3, 7, 20):
        chunked = grads.per_example(_mlp_loss, chunk_size=chunk)(params, {}, batch)
        for a, c in zip(tree.leaves(full), tree.leaves(chunked)):
            torch.testing.assert_close(c, a, rtol=RTOL, atol=ATOL)


def test_per_example_in_dims_and_has_aux():
    params = _mlp_params(2)
    batch = _mlp_batch(2, 4)

    def loss_with_aux(batch_first, params):  # batch is argument 0, params argument 1
        loss = _mlp_loss(params, {}, batch_first)
        return loss, loss.detach() * 2

    fn = grads.per_example(loss_with_aux, argnums=1, in_dims=(0, None), has_aux=True)
    g, aux = fn(batch, params)
    assert aux.shape == (4,)
    testing.assert_per_example_grads(
        lambda p, bt: _mlp_loss(p, {}, bt), params, batch, per_example_grads=g, rtol=RTOL, atol=ATOL
    )
    for i in range(4):
        one = tree.map(lambda x, i=i: x[i : i + 1], batch)
        torch.testing.assert_close(aux[i], 2 * _mlp_loss(params, {}, one))


def test_per_example_without_kept_batch_dim():
    w = {"w": torch.tensor([1.0, -2.0])}
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.0]])
    g = grads.per_example(lambda p, xi: (xi @ p["w"]) ** 2, keep_batch_dim=False)(w, x)
    expected = 2 * (x @ w["w"])[:, None] * x
    torch.testing.assert_close(g["w"], expected)


def test_per_example_errors_name_the_problem():
    params = _mlp_params(0)
    trainable, frozen = tree.partition(params, "no.such.layer")
    batch = _mlp_batch(0, 2)
    with pytest.raises(ValueError, match="holds no tensor"):
        grads.per_example(_mlp_loss)(trainable, frozen, batch)
    with pytest.raises(ValueError, match="chunk_size"):
        grads.per_example(_mlp_loss, chunk_size=0)
    with pytest.raises(ValueError, match="in_dims has 2 entries"):
        grads.per_example(_mlp_loss, in_dims=(None, 0))(params, {}, batch)
    with pytest.raises(ValueError, match="batches no argument"):
        grads.per_example(_mlp_loss, in_dims=(None, None, None))(params, {}, batch)


# ----------------------------------------------------------------------------- tiny GPT


def _gpt():
    from fnllm.models.gpt import GPT

    return GPT(vocab_size=37, n_layer=2, n_head=2, d_model=16, max_len=12, tie_head=False)


def _gpt_loss(model):
    def loss_fn(trainable, frozen, batch):
        params = tree.combine(trainable, frozen)
        logits = model.apply(params, batch["tokens"], attention_mask=batch["mask"], impl="math")
        return losses.causal_lm(logits, batch["tokens"], attention_mask=batch["mask"])

    return loss_fn


def _gpt_batch(model, b: int = 4, t: int = 10) -> dict:
    tokens = jr.randint(jr.key(3), (b, t), 0, model.vocab_size)
    lengths = torch.tensor([t, t - 3, 4, t - 1][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"tokens": tokens * mask, "mask": mask}  # right padding with id 0


@pytest.mark.parametrize("chunk", [None, 3])
def test_per_example_tiny_gpt_with_frozen_part_and_padding(chunk):
    model = _gpt()
    params = model.init(jr.key(0))
    trainable, frozen = tree.partition(params, ["blocks.1.*", "ln_f", "head"])
    batch = _gpt_batch(model)
    loss_fn = _gpt_loss(model)
    got = grads.per_example(loss_fn, chunk_size=chunk)(trainable, frozen, batch)
    assert tree.paths(got) == tree.paths(trainable)
    testing.assert_per_example_grads(
        lambda tr, bt: loss_fn(tr, frozen, bt),
        trainable,
        batch,
        per_example_grads=got,
        rtol=RTOL,
        atol=ATOL,
    )
    # padding positions do not count: the padded example equals itself unpadded (truncated)
    one = {"tokens": batch["tokens"][2:3, :4], "mask": batch["mask"][2:3, :4]}
    alone = grads.per_example(loss_fn)(trainable, frozen, one)
    for a, g in zip(tree.leaves(alone), tree.leaves(got)):
        torch.testing.assert_close(g[2], a[0], rtol=1e-4, atol=1e-6)


def test_per_example_tiny_gpt_default_attention_under_vmap():
    """The model picks its batchable attention path under vmap by itself (impl="auto")."""
    model = _gpt()
    params = model.init(jr.key(1))
    batch = _gpt_batch(model, b=3)

    def loss_fn(params, batch):
        logits = model.apply(params, batch["tokens"], attention_mask=batch["mask"])
        return losses.causal_lm(logits, batch["tokens"], attention_mask=batch["mask"])

    got = grads.per_example(loss_fn)(params, batch)
    testing.assert_per_example_grads(
        loss_fn, params, batch, per_example_grads=got, rtol=RTOL, atol=ATOL
    )


# ----------------------------------------------------------------------------- clipping, noise


per_example_trees = st.integers(1, 5).flatmap(
    lambda b: st.lists(
        st.tuples(st.integers(1, 4), st.floats(-3.0, 3.0)), min_size=1, max_size=3
    ).map(lambda specs, b=b: _random_tree(b, specs))
)


def _random_tree(b: int, specs: list[tuple[int, float]]) -> dict:
    k = jr.split(jr.key(len(specs) * 7 + b), len(specs))
    return {f"p{i}": jr.normal(k[i], (b, n)) * 10.0**e for i, (n, e) in enumerate(specs)}


@settings(max_examples=30, deadline=None)
@given(g=per_example_trees, max_norm=st.floats(1e-3, 1e3))
def test_clipped_norms_are_at_most_max_norm(g, max_norm):
    before = grads.per_example_norm(g)
    clipped = grads.clip_per_example(g, max_norm)
    after = grads.per_example_norm(clipped)
    assert bool((after <= max_norm * (1 + 1e-6)).all())
    small = before <= max_norm
    # below the bound nothing changes; above it the norm becomes max_norm * n / (n + 1e-6)
    torch.testing.assert_close(after[small], before[small], rtol=1e-5, atol=0)
    big = before[~small]
    torch.testing.assert_close(after[~small], max_norm * big / (big + 1e-6), rtol=1e-5, atol=0)


def test_per_example_norm_matches_manual_global_norm():
    g = _random_tree(3, [(2, 0.0), (5, 1.0)])
    manual = torch.stack([torch.cat([g["p0"][i], g["p1"][i]]).norm() for i in range(3)])
    torch.testing.assert_close(grads.per_example_norm(g), manual)


@settings(max_examples=20, deadline=None)
@given(g=per_example_trees, clip=st.floats(1e-2, 10.0))
def test_privatize_with_zero_noise_equals_clip_and_sum(g, clip):
    key = jr.key(0)
    out_sum = grads.privatize(key, g, clip=clip, noise_multiplier=0.0, reduction="sum")
    ref = tree.map(lambda x: x.sum(0), grads.clip_per_example(g, clip))
    for a, r in zip(tree.leaves(out_sum), tree.leaves(ref)):
        assert torch.equal(a, r)
    b = tree.leaves(g)[0].shape[0]
    out_mean = grads.privatize(key, g, clip=clip, noise_multiplier=0.0)
    for a, r in zip(tree.leaves(out_mean), tree.leaves(ref)):
        torch.testing.assert_close(a, r / b)


def test_privatize_noise_has_the_dp_sgd_scale_and_follows_the_key():
    g = {"w": torch.zeros(4, 20000), "b": torch.zeros(4, 3)}
    clip, sigma = 0.5, 3.0
    out = grads.privatize(jr.key(1), g, clip=clip, noise_multiplier=sigma, reduction="sum")
    std = float(out["w"].std())
    assert abs(std - clip * sigma) < 0.05 * clip * sigma  # 20000 draws: ~0.5% standard error
    assert abs(float(out["w"].mean())) < 0.05
    again = grads.privatize(jr.key(1), g, clip=clip, noise_multiplier=sigma, reduction="sum")
    assert torch.equal(out["w"], again["w"])
    other = grads.privatize(jr.key(2), g, clip=clip, noise_multiplier=sigma, reduction="sum")
    assert not torch.equal(out["w"], other["w"])
    mean = grads.privatize(jr.key(1), g, clip=clip, noise_multiplier=sigma)
    torch.testing.assert_close(mean["w"], out["w"] / 4)


def test_privatize_and_clip_reject_bad_arguments():
    g = {"w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="max_norm"):
        grads.clip_per_example(g, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        grads.privatize(jr.key(0), g, clip=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        grads.privatize(jr.key(0), g, clip=1.0, noise_multiplier=0.0, reduction="avg")
    with pytest.raises(ValueError, match=r"'b' \(3,\) and 'w' \(2, 3\) differ"):
        grads.per_example_norm({"w": torch.ones(2, 3), "b": torch.ones(3)})


# ----------------------------------------------------------------------------- accumulate


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 9), n=st.integers(1, 4), seed=st.integers(0, 20))
def test_accumulate_equals_full_batch_gradient(b, n, seed):
    n = min(n, b)
    params = _mlp_params(seed)
    trainable, frozen = tree.partition(params, ["l1.w", "l2"])
    batch = _mlp_batch(seed, b)
    loss, g = grads.accumulate(_mlp_loss, n)(trainable, frozen, batch)
    full_g, full_loss = torch.func.grad_and_value(_mlp_loss)(trainable, frozen, batch)
    torch.testing.assert_close(loss, full_loss, rtol=RTOL, atol=ATOL)
    for a, r in zip(tree.leaves(g), tree.leaves(full_g)):
        torch.testing.assert_close(a, r, rtol=RTOL, atol=ATOL)


def test_accumulate_token_weighted_tiny_gpt_equals_full_batch():
    model = _gpt()
    params = model.init(jr.key(4))
    trainable, frozen = tree.partition(params, ["blocks.1.*", "head"])
    batch = _gpt_batch(model)
    loss_fn = _gpt_loss(model)

    def n_targets(trainable, frozen, batch):  # what causal_lm averages over
        m = batch["mask"]
        return (m[:, 1:] * m[:, :-1]).sum()

    loss, g = grads.accumulate(loss_fn, 3, weight_fn=n_targets)(trainable, frozen, batch)
    full_g, full_loss = torch.func.grad_and_value(loss_fn)(trainable, frozen, batch)
    torch.testing.assert_close(loss, full_loss, rtol=RTOL, atol=ATOL)
    for a, r in zip(tree.leaves(g), tree.leaves(full_g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_accumulate_errors():
    params, batch = _mlp_params(0), _mlp_batch(0, 3)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        grads.accumulate(_mlp_loss, 0)
    with pytest.raises(ValueError, match="micro_batches 4 > batch size 3"):
        grads.accumulate(_mlp_loss, 4)(params, {}, batch)


def test_per_example_then_privatize_is_one_dp_sgd_gradient():
    """End to end: DP-SGD's gradient of the trainable part equals clip-sum of the loop."""
    params = _mlp_params(5)
    trainable, frozen = tree.partition(params, "l2")
    batch = _mlp_batch(5, 6)
    per = grads.per_example(_mlp_loss)(trainable, frozen, batch)
    dp = grads.privatize(jr.key(0), per, clip=0.1, noise_multiplier=0.0, reduction="sum")
    # the per-example gradients are the loop's; clip and sum them by hand
    testing.assert_per_example_grads(
        lambda tr, bt: _mlp_loss(tr, frozen, bt),
        trainable,
        batch,
        per_example_grads=per,
        rtol=RTOL,
        atol=ATOL,
    )
    ref = tree.flatten(per)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in ref.values()))
    factor = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    for path, v in ref.items():
        expected = (v * factor.reshape(-1, *[1] * (v.dim() - 1))).sum(0)
        torch.testing.assert_close(tree.flatten(dp)[path], expected, rtol=RTOL, atol=ATOL)
    assert math.isfinite(float(norms.sum()))


def test_dp_gradient_of_a_partition_has_zero_graph_breaks():
    """per_example (chunked) + privatize on a sparse trainable half traces as one graph."""
    model = _gpt()
    trainable, frozen = tree.partition(model.init(jr.key(0)), ["blocks.1.*", "head"])
    batch = _gpt_batch(model)
    per_ex = grads.per_example(_gpt_loss(model), chunk_size=2)

    def dp_grad(trainable, frozen, batch, key):
        g = per_ex(trainable, frozen, batch)
        return grads.privatize(key, g, clip=1.0, noise_multiplier=1.0)

    explanation = torch._dynamo.explain(dp_grad)(trainable, frozen, batch, jr.key(0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
