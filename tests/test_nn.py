"""Tests for fnllm.nn: layers against torch.nn references, attention paths, vmap, checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import nn
from fnllm import random as jr

FEW = settings(max_examples=15, deadline=None)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ simple layers


@FEW
@given(
    d_in=st.integers(1, 16),
    d_out=st.integers(1, 16),
    lead=st.lists(st.integers(1, 3), max_size=2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_torch_linear(d_in, d_out, lead, bias, seed) -> None:
    params = nn.init_linear(jr.key(seed), d_in, d_out, bias=bias, std=0.5)
    assert params["weight"].shape == (d_out, d_in) and ("bias" in params) == bias
    ref = torch.nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(params["weight"])
        if bias:
            params = {**params, "bias": _randn(d_out, seed=seed)}
            ref.bias.copy_(params["bias"])
    x = _randn(*lead, d_in, seed=seed + 1)
    torch.testing.assert_close(nn.linear(params, x), ref(x))


@FEW
@given(dim=st.integers(1, 32), rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_layer_norm_matches_torch_layer_norm(dim, rows, seed) -> None:
    params = {"weight": _randn(dim, seed=seed), "bias": _randn(dim, seed=seed + 1)}
    ref = torch.nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(params["weight"])
        ref.bias.copy_(params["bias"])
    x = _randn(rows, 3, dim, seed=seed + 2) * 3 + 1
    torch.testing.assert_close(nn.layer_norm(params, x, eps=1e-6), ref(x))


def test_layer_norm_init_is_identity_affine() -> None:
    params = nn.init_layer_norm(jr.key(0), 5)
    x = _randn(4, 5)
    torch.testing.assert_close(
        nn.layer_norm(params, x), torch.nn.functional.layer_norm(x, (5,), eps=1e-5)
    )


@FEW
@given(approximate=st.sampled_from(["none", "tanh"]), seed=st.integers(0, 2**16))
def test_gelu_matches_torch_gelu(approximate, seed) -> None:
    x = _randn(7, 3, seed=seed) * 4
    torch.testing.assert_close(nn.gelu(x, approximate), torch.nn.GELU(approximate)(x))


def test_gelu_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="approximate"):
        nn.gelu(torch.zeros(1), "erf")


@FEW
@given(num=st.integers(1, 20), dim=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_embedding_matches_torch_embedding(num, dim, seed) -> None:
    params = nn.init_embedding(jr.key(seed), num, dim)
    ids = torch.randint(0, num, (3, 4), generator=torch.Generator().manual_seed(seed))
    ref = torch.nn.Embedding(num, dim)
    with torch.no_grad():
        ref.weight.copy_(params["weight"])
    torch.testing.assert_close(nn.embedding(params, ids), ref(ids))


def test_init_draws_normal_with_given_std_and_is_deterministic() -> None:
    w = nn.init_linear(jr.key(0), 256, 128, std=0.02)["weight"]
    assert abs(w.std().item() / 0.02 - 1) < 0.05 and abs(w.mean().item()) < 0.002
    assert torch.equal(w, nn.init_linear(jr.key(0), 256, 128, std=0.02)["weight"])
    m = nn.init_mlp(jr.key(1), 64, 256, std=0.02, proj_std=0.005)
    assert abs(m["proj"]["weight"].std().item() / 0.005 - 1) < 0.05
    assert not torch.equal(m["fc"]["weight"][:64, :64], m["proj"]["weight"][:64, :64])
    a = nn.init_attention(jr.key(2), 64, proj_std=0.001)
    assert a["qkv"]["weight"].shape == (192, 64) and a["proj"]["weight"].std() < 0.002
    assert torch.equal(a["qkv"]["bias"], torch.zeros(192))


def test_mlp_is_proj_of_gelu_of_fc() -> None:
    p = nn.init_mlp(jr.key(0), 8, 32)
    x = _randn(2, 8)
    want = torch.nn.functional.gelu(x @ p["fc"]["weight"].T, approximate="tanh")
    want = want @ p["proj"]["weight"].T
    torch.testing.assert_close(nn.mlp(p, x, approximate="tanh"), want)


# ---------------------------------------------------------------------- dropout


def test_dropout_without_key_or_rate_is_identity() -> None:
    x = _randn(10)
    assert nn.dropout(None, x, 0.5) is x
    assert nn.dropout(jr.key(0), x, 0.0) is x


@FEW
@given(rate=st.floats(0.05, 0.9), seed=st.integers(0, 2**16))
def test_dropout_keeps_expected_fraction_and_rescales(rate, seed) -> None:
    x = torch.ones(20000)
    y = nn.dropout(jr.key(seed), x, rate)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - rate)) < 0.03
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - rate)))
    assert torch.equal(y, nn.dropout(jr.key(seed), x, rate))


def test_dropout_under_vmap_uses_each_examples_key() -> None:
    keys = jr.split(jr.key(0), 4)
    x = torch.ones(4, 100)
    y = torch.func.vmap(lambda k, row: nn.dropout(k, row, 0.5))(keys, x)
    for i in range(4):
        assert torch.equal(y[i], nn.dropout(keys[i], x[i], 0.5))
    assert not torch.equal(y[0], y[1])


def test_dropout_rejects_bad_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        nn.dropout(jr.key(0), torch.ones(3), 1.0)


@pytest.mark.parametrize("shape", [(3, 7), (4, 12, 10, 10)], ids=["op-path", "compiled-core"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_equals_its_definition_and_jax_mask(shape: tuple, dtype: torch.dtype) -> None:
    jax = pytest.importorskip("jax")
    import numpy as np

    rate, key = 0.3, jr.key(11)
    x = _randn(*shape).to(dtype)
    keep = jr.bernoulli(key, 1.0 - rate, shape)
    jkeep = jax.random.bernoulli(jr.to_jax_key(key), 1.0 - rate, shape)
    assert np.array_equal(keep.numpy(), np.asarray(jkeep))  # the mask is JAX's
    want = torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=dtype))
    got = nn.dropout(key, x, rate)
    assert got.dtype == dtype and torch.equal(got, want)
    # a tensor rate gives the mask of bernoulli(key, 1 - rate) and the same scaling
    t = torch.tensor(rate)
    want_t = torch.where(jr.bernoulli(key, 1 - t, shape), x, torch.zeros((), dtype=dtype)) / (1 - t)
    assert torch.equal(nn.dropout(key, x, t), want_t)


def test_dropout_gradient_is_the_scaled_mask() -> None:
    x = _randn(4, 12, 10, 10).requires_grad_()
    key, rate = jr.key(3), 0.25
    nn.dropout(key, x, rate).sum().backward()
    mask = jr.bernoulli(key, 1 - rate, tuple(x.shape))
    assert torch.equal(x.grad, mask.float() / (1 - rate))
    g = torch.func.grad(lambda x: nn.dropout(key, x, rate).sum())(x.detach())
    assert torch.equal(g, x.grad)


def test_dropout_compiled_and_vmapped_equal_eager() -> None:
    key, x = jr.key(5), _randn(2, 4, 30, 40)  # 4800 per row: eager rows use the compiled core
    f = lambda x: nn.dropout(key, x, 0.1)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))
    keys = jr.split(key, 2)
    mapped = torch.func.vmap(lambda k, row: nn.dropout(k, row, 0.1))(keys, x)
    assert torch.equal(mapped, torch.stack([nn.dropout(k, r, 0.1) for k, r in zip(keys, x)]))


@pytest.mark.parametrize("rate", [float("nan"), 1.0, -0.1, float("inf")], ids=str)
def test_dropout_rejects_bad_rates_as_floats_and_tensors(rate: float) -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="dropout: rate must be in \\[0, 1\\)"):
        nn.dropout(jr.key(0), x, rate)
    with pytest.raises(ValueError, match="dropout: rate must be in \\[0, 1\\)"):
        nn.dropout(jr.key(0), x, torch.tensor(rate))
    with pytest.raises(ValueError, match="dropout: rate must be in \\[0, 1\\)"):
        nn.dropout(None, x, torch.tensor(rate))  # checked even when no dropout happens


def test_dropout_rejects_rate_tensors_of_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="0-dim float tensor"):
        nn.dropout(jr.key(0), torch.ones(3), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="0-dim float tensor"):
        nn.dropout(jr.key(0), torch.ones(3), torch.tensor(0))
    with pytest.raises(TypeError, match="rate must be a float or a tensor"):
        nn.dropout(jr.key(0), torch.ones(3), "0.1")


# -------------------------------------------------------------------- attention


def _mha_reference(params, x, n_head, causal, pad):
    """torch.nn.MultiheadAttention with the same weights (its in_proj is also [q; k; v])."""
    d = x.shape[-1]
    ref = torch.nn.MultiheadAttention(d, n_head, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(params["qkv"]["weight"])
        ref.in_proj_bias.copy_(params["qkv"]["bias"])
        ref.out_proj.weight.copy_(params["proj"]["weight"])
        ref.out_proj.bias.copy_(params["proj"]["bias"])
    T = x.shape[1]
    attn_mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None  # True = block
    key_padding_mask = None if pad is None else ~pad
    return ref(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    n_head=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 8]),
    causal=st.booleans(),
    padded=st.booleans(),
    impl=st.sampled_from(["sdpa", "math"]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_torch_multihead_attention(
    B, T, n_head, head_dim, causal, padded, impl, seed
) -> None:
    d = n_head * head_dim
    params = nn.init_attention(jr.key(seed), d, std=0.3)
    params["qkv"]["bias"] = _randn(3 * d, seed=seed) * 0.1
    x = _randn(B, T, d, seed=seed + 1)
    pad = None
    if padded:  # right padding, at least one real token per row
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
        pad = torch.arange(T)[None, :] < lengths[:, None]
    got = nn.attention(params, x, n_head=n_head, causal=causal, attention_mask=pad, impl=impl)
    want = _mha_reference(params, x, n_head, causal, pad)
    keep = torch.ones(B, T, dtype=torch.bool) if pad is None else pad
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    L=st.integers(1, 6),
    extra=st.integers(0, 5),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_and_math_paths_agree_with_any_mask(L, extra, causal, seed) -> None:
    S = L + extra
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g) for n in (L, S, S))
    mask = torch.rand(2, 1, L, S, generator=g) < 0.6  # may fully mask some rows
    a = nn.dot_product_attention(q, k, v, causal=causal, mask=mask, impl="sdpa")
    b = nn.dot_product_attention(q, k, v, causal=causal, mask=mask, impl="math")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 7),
    causal=st.booleans(),
    impl=st.sampled_from(["sdpa", "math"]),
    seed=st.integers(0, 2**16),
)
def test_prepared_mask_equals_per_call_key_padding_mask(T, causal, impl, seed) -> None:
    params = nn.init_attention(jr.key(seed), 8, std=0.3)
    x = _randn(3, T, 8, seed=seed)
    pad = torch.rand(3, T, generator=torch.Generator().manual_seed(seed)) < 0.6  # may be empty
    mask = nn.make_attention_mask(pad, causal=causal, drop_full=False)
    raw = pad[:, None, None, :]
    q, k, v = nn.attention_qkv(params, x, n_head=2)
    want = nn.linear(
        params["proj"],
        nn.merge_heads(nn.dot_product_attention(q, k, v, causal=causal, mask=raw, impl=impl)),
    )
    got = nn.attention(params, x, n_head=2, causal=causal, mask=mask, impl=impl)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    by_padding = nn.attention(params, x, n_head=2, causal=causal, attention_mask=pad, impl=impl)
    torch.testing.assert_close(by_padding, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_all_keep_mask_is_dropped_in_eager_and_gives_the_same_output(causal) -> None:
    ones = torch.ones(2, 5, dtype=torch.long)
    assert nn.make_attention_mask(ones, causal=causal) is None
    kept = nn.make_attention_mask(ones, causal=causal, drop_full=False)
    assert kept is not None and kept.dtype == torch.bool
    assert kept.shape == ((2, 1, 5, 5) if causal else (2, 1, 1, 5))
    # Under vmap the values cannot be read, so the mask stays (and still batches).
    per_example = torch.func.vmap(lambda m: nn.make_attention_mask(m, causal=causal))(ones)
    assert per_example.shape == ((2, 1, 5, 5) if causal else (2, 1, 1, 5))
    params = nn.init_attention(jr.key(0), 8)
    x = _randn(2, 5, 8)
    unmasked = nn.attention(params, x, n_head=2, causal=causal)
    masked = nn.attention(params, x, n_head=2, causal=causal, mask=kept)
    torch.testing.assert_close(masked, unmasked, atol=1e-6, rtol=1e-5)


def test_attention_rejects_both_masks_and_non_bool_prepared_mask() -> None:
    params = nn.init_attention(jr.key(0), 8)
    x = torch.zeros(1, 3, 8)
    pad = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="not both"):
        nn.attention(params, x, n_head=2, attention_mask=pad, mask=nn.make_attention_mask(pad))
    with pytest.raises(TypeError, match="bool"):
        nn.attention(params, x, n_head=2, mask=torch.ones(1, 1, 1, 3))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_fully_masked_rows_give_finite_values_and_grads(impl) -> None:
    params = nn.init_attention(jr.key(0), 8)
    x = _randn(2, 5, 8).requires_grad_()
    pad = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # left pad, empty
    y = nn.attention(params, x, n_head=2, causal=True, attention_mask=pad, impl=impl)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_causal_attention_with_cache_is_aligned_to_the_end() -> None:
    """Queries for the last L positions over all S keys equal the last rows of full attention."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g) for _ in range(3))
    full = nn.dot_product_attention(q, k, v, causal=True)
    for impl in ("sdpa", "math"):
        tail = nn.dot_product_attention(q[..., 4:, :], k, v, causal=True, impl=impl)
        torch.testing.assert_close(tail, full[..., 4:, :], atol=1e-6, rtol=1e-5)


def test_attention_pieces_compose_to_attention() -> None:
    params = nn.init_attention(jr.key(0), 12)
    x = _randn(2, 5, 12)
    q, k, v = nn.attention_qkv(params, x, n_head=3)
    y = nn.linear(params["proj"], nn.merge_heads(nn.dot_product_attention(q, k, v, causal=True)))
    torch.testing.assert_close(y, nn.attention(params, x, n_head=3, causal=True))


def test_attention_dropout_is_keyed_and_uses_the_math_path() -> None:
    params = nn.init_attention(jr.key(0), 8)
    x = _randn(2, 5, 8)
    plain = nn.attention(params, x, n_head=2)
    a = nn.attention(params, x, n_head=2, key=jr.key(1), dropout=0.3)
    assert torch.equal(a, nn.attention(params, x, n_head=2, key=jr.key(1), dropout=0.3))
    assert not torch.allclose(a, plain)
    assert torch.equal(nn.attention(params, x, n_head=2, dropout=0.3), plain)  # no key: eval
    with pytest.raises(ValueError, match="impl='math'"):
        nn.attention(params, x, n_head=2, key=jr.key(1), dropout=0.3, impl="sdpa")


def test_attention_rejects_bad_arguments() -> None:
    params = nn.init_attention(jr.key(0), 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        nn.attention(params, torch.zeros(1, 2, 8), n_head=2, impl="flash")
    with pytest.raises(ValueError, match="not divisible by n_head 3"):
        nn.attention(params, torch.zeros(1, 2, 8), n_head=3)
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(TypeError, match="bool"):
        nn.dot_product_attention(q, q, q, mask=torch.ones(2, 2))


# ------------------------------------------------------------------ vmap detection


def _flag(x: torch.Tensor) -> torch.Tensor:
    """x.sum() times 2 when in_vmap() says so: the gradient reports the answer."""
    return x.sum() * (2.0 if nn.in_vmap() else 1.0)


_TRANSFORMS = {
    "none": (lambda x: _flag(x) / x.sum(), 1.0),
    "grad": (lambda x: torch.func.grad(_flag)(x), 1.0),
    "vmap": (lambda x: torch.func.vmap(lambda r: _flag(r) / r.sum())(x), 2.0),
    "vmap_grad": (lambda x: torch.func.vmap(torch.func.grad(_flag))(x), 2.0),
    "grad_vmap": (lambda x: torch.func.grad(lambda y: torch.func.vmap(_flag)(y).sum())(x), 2.0),
}


@pytest.mark.parametrize("name", list(_TRANSFORMS))
def test_in_vmap_sees_vmap_at_any_depth_in_eager(name) -> None:
    fn, want = _TRANSFORMS[name]
    got = fn(torch.ones(3, 2))
    torch.testing.assert_close(got, torch.full_like(got, want))


def test_in_vmap_is_a_trace_time_constant_under_compile() -> None:
    x = torch.ones(3, 2)
    for name in ("none", "grad", "vmap_grad"):
        fn, want = _TRANSFORMS[name]
        torch._dynamo.reset()
        assert torch._dynamo.explain(fn)(x).graph_break_count == 0, name
        got = torch.compile(fn, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, torch.full_like(got, want))


def test_attention_under_vmap_avoids_sdpa_and_matches_batched(monkeypatch) -> None:
    params = nn.init_attention(jr.key(0), 8)
    x = _randn(3, 5, 8)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    batched = nn.attention(params, x, n_head=2, causal=True, attention_mask=pad)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called under vmap")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = torch.func.vmap(
            lambda xi, mi: nn.attention(params, xi, n_head=2, causal=True, attention_mask=mi)
        )(x, pad)
    torch.testing.assert_close(mapped, batched, atol=1e-6, rtol=1e-5)


def test_compiled_per_example_attention_grads_have_no_graph_breaks() -> None:
    params = nn.init_attention(jr.key(0), 8)
    x = _randn(3, 4, 8)

    def loss(p, xi):
        return nn.attention(p, xi, n_head=2, causal=True).square().mean()

    def per_example(p, xs):
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, xs)

    torch._dynamo.reset()
    assert torch._dynamo.explain(per_example)(params, x).graph_break_count == 0
    got = torch.compile(per_example, fullgraph=True, backend="aot_eager")(params, x)
    want = [torch.func.grad(loss)(params, x[i]) for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(got["qkv"]["weight"][i], want[i]["qkv"]["weight"])
        torch.testing.assert_close(got["proj"]["bias"][i], want[i]["proj"]["bias"])


# ---------------------------------------------------------------------- checks


def test_check_ids_names_the_first_bad_position() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 60]])
    with pytest.raises(ValueError, match=r"tokens: id 60 at \[1, 2\] >= vocab_size 10"):
        nn.check_ids(ids, 10)
    with pytest.raises(ValueError, match=r"labels: id -4 at \[0, 1\] < 0"):
        nn.check_ids(torch.tensor([[0, -4]]), 10, name="labels")
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.float32"):
        nn.check_ids(ids.float(), 10)
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.bool"):
        nn.check_ids(ids > 2, 10)
    assert nn.check_ids(ids.to(torch.int16), 100).dtype == torch.int64
    assert nn.check_ids(torch.zeros(0, dtype=torch.long), 1).numel() == 0


def test_check_ids_is_skipped_under_vmap() -> None:
    ids = torch.tensor([[1, 99]])
    out = torch.func.vmap(lambda i: nn.check_ids(i, 10) * 1)(ids)  # no error, no crash
    assert torch.equal(out, ids)


def test_check_shapes_names_paths() -> None:
    params = {"a": {"w": torch.zeros(2, 3)}, "b": [torch.zeros(4)]}
    nn.check_shapes(params, {"a.w": (2, 3), "b.0": (4,)})
    with pytest.raises(KeyError, match=r"missing c\.0"):
        nn.check_shapes(params, {"a.w": (2, 3), "b.0": (4,), "c.0": (1,)})
    with pytest.raises(KeyError, match=r"unexpected b\.0"):
        nn.check_shapes(params, {"a.w": (2, 3)})
    with pytest.raises(ValueError, match=r"a\.w has shape \(2, 3\), expected \(3, 2\)"):
        nn.check_shapes(params, {"a.w": (3, 2), "b.0": (4,)})
