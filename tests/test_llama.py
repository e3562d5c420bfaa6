"""Tests for fnllm.models.Llama and its layers in fnllm.nn (rms_norm, swiglu, rotary, GQA).

Parity with `transformers` (Llama, Qwen2, Mistral) is in test_llama_hf.py; here are the
properties the model must have on its own.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import fnllm
from fnllm import losses, models, nn, random, testing, tree
from fnllm.models import Llama, LlamaOutput

TOL = 1e-5


def tiny(**overrides) -> Llama:
    """A 2-layer, 16-wide Llama with grouped-query attention (4 query, 2 key/value heads)."""
    base = dict(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24, max_len=24)
    return Llama(**{**base, **overrides})


def noisy(model: Llama, seed: int = 0, std: float = 0.2) -> dict:
    """Parameters at a larger std than init's 0.02 (norm weights around 1), so bugs show."""
    params = model.init(random.key(seed))
    g = torch.Generator().manual_seed(seed)

    def draw(path: str, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=g)
        return 1 + 0.1 * noise if "norm" in path else std * noise

    return tree.unflatten({p: draw(p, x) for p, x in tree.flatten(params).items()})


# ----------------------------------------------------------------------------- layers


def test_rms_norm_matches_torch():
    x, w = torch.randn(3, 5, 8), torch.randn(8)
    got = nn.rms_norm({"weight": w}, x, eps=1e-5)
    assert torch.allclose(got, F.rms_norm(x, (8,), w, eps=1e-5), atol=1e-6)


def test_rms_norm_bf16_normalises_in_float32_then_casts():
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(8).bfloat16()
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    got = nn.rms_norm({"weight": w}, x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, w * h.bfloat16())


def test_rms_norm_bad_width_is_named():
    with pytest.raises(ValueError, match="rms_norm: x has width 4"):
        nn.rms_norm(nn.init_rms_norm(None, 3), torch.ones(2, 4))


def test_swiglu_is_down_of_silu_gate_times_up():
    p = nn.init_swiglu(random.key(0), 6, 10, std=0.5)
    x = torch.randn(2, 3, 6)
    gate, up, down = (p[k]["weight"] for k in ("gate", "up", "down"))
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(nn.swiglu(p, x), want, atol=1e-6)


@settings(max_examples=30)
@given(
    p=st.integers(0, 300),
    q=st.integers(0, 300),
    rope_type=st.sampled_from(["default", "llama3"]),
    seed=st.integers(0, 2**16),
)
def test_rotary_by_p_then_q_equals_rotary_by_p_plus_q(p, q, rope_type, seed):
    inv = nn.rotary_frequencies(8, theta=500.0, rope_type=rope_type, original_max_len=32)
    x = torch.randn(2, 3, 1, 8, generator=torch.Generator().manual_seed(seed))
    rot = lambda y, pos: nn.apply_rotary(y, *nn.rotary_tables(torch.tensor([pos]), inv))
    assert torch.allclose(rot(rot(x, p), q), rot(x, p + q), atol=1e-4)


@settings(max_examples=20)
@given(p=st.integers(0, 200), shift=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_rotary_scores_depend_on_distance_only(p, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 8, generator=g)
    inv = nn.rotary_frequencies(8, theta=100.0)
    rot = lambda y, pos: nn.apply_rotary(y, *nn.rotary_tables(torch.tensor([pos]), inv))
    score = lambda a, b: (rot(q, a) * rot(k, b)).sum()
    assert torch.allclose(score(p + 7, p), score(p + 7 + shift, p + shift), atol=1e-4)


def test_rotary_odd_head_dim_and_unknown_type_are_named():
    with pytest.raises(ValueError, match="head_dim 5 is odd"):
        nn.rotary_frequencies(5)
    with pytest.raises(ValueError, match="rope_type must be one of"):
        nn.rotary_frequencies(4, rope_type="yarn")
    with pytest.raises(ValueError, match=r"high_freq_factor 1\.0 must exceed"):
        nn.rotary_frequencies(4, rope_type="llama3", high_freq_factor=1.0)


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.repeat_interleave(n, dim=-3)


@settings(max_examples=25)
@given(
    groups=st.sampled_from([1, 2, 3]),
    n_kv=st.sampled_from([1, 2]),
    L=st.integers(1, 5),
    extra=st.integers(0, 3),
    masked=st.booleans(),
    impl=st.sampled_from(["sdpa", "math"]),
    seed=st.integers(0, 2**16),
)
def test_gqa_equals_multi_head_attention_on_repeated_keys(
    groups, n_kv, L, extra, masked, impl, seed
):
    g = torch.Generator().manual_seed(seed)
    S = L + extra
    q = torch.randn(2, n_kv * groups, L, 4, generator=g)
    k, v = torch.randn(2, 2, n_kv, S, 4, generator=g).unbind(0)
    mask = torch.rand(2, 1, L, S, generator=g) > 0.3 if masked else None
    got = nn.dot_product_attention(q, k, v, causal=True, mask=mask, impl=impl)
    want = nn.dot_product_attention(
        q, _repeat(k, groups), _repeat(v, groups), causal=True, mask=mask, impl=impl
    )
    assert torch.allclose(got, want, atol=TOL)


def test_gqa_math_path_batches_under_vmap():
    q, k, v = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    attend = lambda a, b, c: nn.dot_product_attention(a, b, c, causal=True)
    got = torch.func.vmap(attend)(q, k, v)
    assert torch.allclose(got, attend(q, k, v), atol=TOL)


def test_attention_heads_that_do_not_divide_are_named():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8)
    with pytest.raises(ValueError, match="4 query heads need key and value heads"):
        nn.dot_product_attention(q, k, k)


# ----------------------------------------------------------------------------- the model


def test_param_paths_are_readable():
    shapes = tiny(qkv_bias=True).param_shapes()
    assert shapes["embed.tokens.weight"] == (40, 16)
    assert shapes["blocks.1.attn.q.weight"] == (16, 16)
    assert shapes["blocks.1.attn.k.weight"] == (8, 16)
    assert shapes["blocks.1.attn.v.bias"] == (8,)
    assert shapes["blocks.0.attn.o.weight"] == (16, 16)
    assert shapes["blocks.0.mlp.gate.weight"] == (24, 16)
    assert shapes["blocks.0.mlp.down.weight"] == (16, 24)
    assert {"blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "norm.weight",
            "head.weight"} <= set(shapes)  # fmt: skip
    assert "blocks.0.attn.o.bias" not in shapes
    assert "head.weight" not in tiny(tie_head=True).param_shapes()


def test_llama_is_exported_and_round_trips_its_config():
    model = tiny(rope_type="llama3", rope_factor=4.0, qkv_bias=True)
    assert fnllm.Llama is Llama and models.Llama is Llama
    assert models.from_config(model.to_config()) == model
    assert hash(model) == hash(Llama.from_config(model.to_config()))
    assert Llama(rope_theta=500000) == Llama(rope_theta=500000.0)
    assert Llama(n_head=4, d_model=16).n_kv_head == 4


def test_gqa_model_equals_multi_head_model_with_repeated_kv_weights():
    gqa = tiny(n_kv_head=2)
    mha = dataclasses.replace(gqa, n_kv_head=4)
    params = noisy(gqa, 1)
    flat = tree.flatten(params)
    for path in [p for p in flat if p.endswith((".attn.k.weight", ".attn.v.weight"))]:
        flat[path] = flat[path].unflatten(0, (2, 4)).repeat_interleave(2, 0).flatten(0, 1)
    tokens = random.randint(random.key(2), (3, 9), 0, 40)
    out = mha.apply(tree.unflatten(flat), tokens)
    assert torch.allclose(gqa.apply(params, tokens), out, atol=TOL)


@settings(max_examples=15)
@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 9), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_cached_decoding_equals_the_full_forward_for_any_split(lengths, cuts, seed):
    model = tiny(rope_type="llama3", rope_original_max_len=8, qkv_bias=True)
    params = noisy(model, 3)
    T = 12
    bounds = sorted({c for c in cuts if c < T} | {T})
    tokens = random.randint(random.key(seed), (len(lengths), T), 0, 40)
    # Ragged rows: row b's prompt is its last lengths[b] tokens of the first chunk, left-padded.
    first = bounds[0]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, : max(first - n, 0)] = False
    cache = model.init_cache(len(lengths), T)
    outs, start = [], 0
    for stop in bounds:
        x, cache = model.apply_cached(params, tokens[:, start:stop], mask[:, start:stop], cache)
        outs.append(model.logits(params, x))
        start = stop
    got = torch.cat(outs, dim=1)
    for b in range(len(lengths)):  # each row alone, without its padding, in a plain forward
        real = tokens[b][mask[b]]
        want = model.apply(params, real[None])[0]
        assert torch.allclose(got[b][mask[b]], want, atol=1e-4), b
    assert int(cache.length) == T


def test_cached_forward_in_place_matches_the_pure_one():
    model = tiny()
    params, tokens = noisy(model, 4), random.randint(random.key(5), (2, 6), 0, 40)
    ones = torch.ones_like(tokens, dtype=torch.bool)
    x1, c1 = model.apply_cached(params, tokens, ones, model.init_cache(2, 8))
    empty = model.init_cache(2, 8)
    x2, c2 = model.apply_cached(params, tokens, ones, empty, inplace=True)
    assert torch.equal(x1, x2) and torch.equal(c1.keys[1], c2.keys[1])
    assert c2.keys[1] is empty.keys[1] and int(empty.length) == 6


@settings(max_examples=20, deadline=None)
@given(testing.llama_configs(max_len=12), st.integers(0, 2**16), st.booleans())
def test_decode_params_give_the_cached_forward_of_params(model, seed, column_major):
    """The decode tree (fused q/k/v and gate/up, rotary tables) runs the same cached forward
    as the user's tree, within float32 rounding, and leaves that tree as it was."""
    model = dataclasses.replace(model, dropout=0.0)
    params = noisy(model, seed % 7)
    if column_major:  # the layout generate gives every matrix on a CPU
        params = tree.map(lambda w: w.t().contiguous().t() if w.ndim == 2 else w, params)
    before = tree.map(torch.clone, params)
    fused = model.decode_params(params)
    attn, mlp = fused["blocks"][0]["attn"], fused["blocks"][0]["mlp"]
    assert sorted(attn) == ["o", "qkv"] and sorted(mlp) == ["down", "gate_up"]
    assert ("bias" in attn["qkv"]) == model.qkv_bias
    if column_major and model.d_model > 1:
        assert attn["qkv"]["weight"].stride(0) == 1
    T = model.max_len
    tokens = random.randint(random.key(seed), (2, T), 0, model.vocab_size)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, : T // 2] = False  # a left-padded row
    cut = max(1, T - 2)
    outs = []
    for tree_ in (params, fused):
        cache = model.init_cache(2, T)
        x1, cache = model.apply_cached(tree_, tokens[:, :cut], mask[:, :cut], cache)
        x2, cache = model.apply_cached(tree_, tokens[:, cut:], mask[:, cut:], cache)
        outs.append(model.logits(tree_, torch.cat([x1, x2], dim=1)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    testing.assert_trees_equal(params, before)


def test_decode_params_keep_layers_with_an_adapter_or_a_bias_mismatch():
    from fnllm.finetune import lora

    model = tiny()
    params = lora.init(random.key(1), model.init(random.key(0)), rank=2, targets=["*.attn.q"])
    fused = model.decode_params(params)["blocks"][0]
    assert sorted(fused["attn"]) == ["k", "o", "q", "v"]  # q has an adapter: no fusion
    assert sorted(fused["mlp"]) == ["down", "gate_up"]
    odd = model.init(random.key(0))
    odd["blocks"][0]["attn"]["k"]["bias"] = torch.zeros(8)  # only k has a bias
    assert sorted(model.decode_params(odd)["blocks"][0]["attn"]) == ["k", "o", "q", "v"]


def test_compiled_sampling_is_one_graph_without_recompiles_and_equals_eager():
    """generate.sample(compile=True) on a Llama: the decode tree compiles to one graph,
    reused by every step and by a second call (another max_new_tokens), with eager's tokens."""
    from torch._dynamo.utils import counters

    from fnllm import generate

    model = tiny()
    params = noisy(model, 8)
    prompts = [[1, 2, 3, 4], [5, 6]]
    torch._dynamo.reset()
    counters.clear()
    for n in (6, 9):
        eager = generate.sample(None, model, params, prompts, n, temperature=0)
        compiled = generate.sample(None, model, params, prompts, n, temperature=0, compile=True)
        assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]


def test_right_padding_leaves_real_positions_unchanged():
    model = tiny()
    params, tokens = noisy(model, 6), random.randint(random.key(7), (2, 10), 0, 40)
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    out = model.apply(params, tokens, attention_mask=mask)
    alone = model.apply(params, tokens[1:, :6])
    assert torch.allclose(out[1, :6], alone[0], atol=TOL)
    assert torch.allclose(out[0], model.apply(params, tokens[:1])[0], atol=TOL)


def test_sdpa_and_math_paths_agree():
    model = tiny()
    params, tokens = noisy(model, 8), random.randint(random.key(9), (2, 10), 0, 40)
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0
    for m in (None, mask):
        a = model.apply(params, tokens, attention_mask=m, impl="sdpa")
        assert torch.allclose(a, model.apply(params, tokens, attention_mask=m, impl="math"),
                              atol=TOL)  # fmt: skip


def test_vmap_over_unbatched_sequences_equals_the_batch():
    model = tiny()
    params, tokens = noisy(model, 10), random.randint(random.key(11), (3, 7), 0, 40)
    got = torch.func.vmap(lambda t: model.apply(params, t))(tokens)
    assert torch.allclose(got, model.apply(params, tokens), atol=TOL)


def test_per_example_gradients_match_a_loop():
    model = tiny(tie_head=True)
    params, tokens = noisy(model, 12), random.randint(random.key(13), (3, 6), 0, 40)
    loss = lambda p, t: losses.causal_lm(model.apply(p, t[None]), t[None])
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, tokens)
    for i in range(3):
        one = torch.func.grad(loss)(params, tokens[i])
        for path, g in tree.flatten(one).items():
            assert torch.allclose(tree.flatten(per)[path][i], g, atol=1e-5), path


def test_hidden_states_and_apply_blocks_agree():
    model = tiny(n_layer=3)
    params, tokens = noisy(model, 14), random.randint(random.key(15), (2, 5), 0, 40)
    out = model.apply(params, tokens, output_hidden_states=True)
    assert isinstance(out, LlamaOutput) and len(out.hidden_states) == 4
    assert torch.equal(out.hidden_states[0], model.embed(params, tokens))
    h = model.apply_blocks(params, out.hidden_states[1], start=1, stop=3)
    assert torch.allclose(model.finish(params, h), out.hidden_states[3], atol=TOL)
    assert torch.allclose(model.logits(params, out.hidden_states[3]), out.logits, atol=TOL)


def test_dropout_comes_from_the_key_only():
    model = tiny(dropout=0.3)
    params, tokens = noisy(model, 16), random.randint(random.key(17), (2, 8), 0, 40)
    plain = model.apply(params, tokens)
    a = model.apply(params, tokens, key=random.key(1))
    assert torch.equal(a, model.apply(params, tokens, key=random.key(1)))
    other = model.apply(params, tokens, key=random.key(2))
    assert not torch.allclose(a, plain) and not torch.equal(a, other)
    off = dataclasses.replace(model, dropout=0.0)
    assert torch.equal(off.apply(params, tokens, key=random.key(1)), plain)


def test_tied_head_uses_the_token_embedding():
    model = tiny(tie_head=True)
    params, tokens = noisy(model, 18), random.randint(random.key(19), (1, 4), 0, 40)
    out = model.apply(params, tokens, output_hidden_states=True)
    want = out.hidden_states[-1] @ params["embed"]["tokens"]["weight"].T
    assert torch.allclose(out.logits, want, atol=TOL)


def test_bf16_params_run_close_to_fp32():
    model = tiny()
    params, tokens = noisy(model, 20, std=0.1), random.randint(random.key(21), (2, 6), 0, 40)
    out = model.apply(tree.cast(params, torch.bfloat16), tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - model.apply(params, tokens)).abs().max() < 0.1


def test_protocol_answers():
    model = tiny()
    assert model.is_decoder and model.final_norm == "norm"
    assert model.head_paths() == ("norm", "head") and tiny(tie_head=True).head_paths() == ("norm",)
    assert model.block_paths() == ("blocks.0", "blocks.1")
    assert model.kv_shape() == (2, 4) and model.default_pooling == "last"
    assert "llama" in model.hf_model_types and "qwen2" in model.hf_model_types
    cache = model.init_cache(3, 10)
    assert cache.keys[0].shape == (3, 2, 10, 4) and len(cache.values) == 2
    targeted = tree.filter_fn(list(model.lora_targets))
    paths = tree.paths(model.init(random.key(0)))
    hit = {p.rsplit(".", 2)[-2] for p in paths if targeted(p, None)}
    assert hit == {"q", "k", "v", "o", "gate", "up", "down"}
    assert not any(targeted(p, None) for p in paths if "norm" in p or "embed" in p)


def test_head_dim_can_differ_from_d_model_over_n_head():
    model = tiny(head_dim=6)
    assert model.param_shapes()["blocks.0.attn.q.weight"] == (24, 16)
    params, tokens = noisy(model, 22), random.randint(random.key(23), (2, 5), 0, 40)
    x, _ = model.apply_cached(params, tokens, torch.ones_like(tokens, dtype=torch.bool),
                              model.init_cache(2, 5))  # fmt: skip
    assert torch.allclose(model.logits(params, x), model.apply(params, tokens), atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"n_head": 4, "n_kv_head": 3}, ValueError, "n_head 4 is not divisible by n_kv_head 3"),
        ({"n_head": 4, "d_model": 12}, ValueError, "head_dim 3 is odd"),
        ({"head_dim": 5}, ValueError, "head_dim 5 is odd"),
        ({"n_head": 3, "n_kv_head": 3}, ValueError, "d_model 16 is not divisible by n_head 3"),
        ({"rope_type": "yarn"}, ValueError, "rope_type must be one of"),
        ({"rope_type": "llama3", "rope_factor": -1.0}, ValueError, "Llama: rotary: factor"),
        ({"n_layer": "2"}, TypeError, "n_layer must be an int"),
        ({"n_kv_head": 2.0}, TypeError, "n_kv_head must be an int"),
        ({"qkv_bias": 1}, TypeError, "qkv_bias must be a bool"),
        ({"rope_theta": "1e4"}, TypeError, "rope_theta must be a number"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be positive"),
        ({"dropout": 1.0}, ValueError, "dropout must be in"),
        ({"norm_eps": 0.0}, ValueError, "norm_eps must be positive"),
    ],
)
def test_bad_configs_are_named(fields, error, match):
    with pytest.raises(error, match=match):
        tiny(**fields)


def test_bad_inputs_are_named():
    model = tiny()
    params = model.init(random.key(0))
    with pytest.raises(ValueError, match="sequence length 25 > max_len 24"):
        model.apply(params, torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="40"):
        model.apply(params, torch.tensor([[1, 40]]))
    del params["blocks"][1]
    with pytest.raises(KeyError, match=r"blocks\.1"):
        model.apply(params, torch.tensor([[1, 2]]))


@settings(max_examples=15)
@given(st.data(), testing.with_params(testing.llama_configs(max_len=8)))
def test_drawn_configs_prefill_equals_apply(data, model_and_params):
    model, params = model_and_params
    batch = data.draw(testing.token_batches(model.vocab_size, model.max_len, padding="none"))
    tokens = batch["tokens"]
    assert tree.flatten(params).keys() == model.param_shapes().keys()
    ones = torch.ones_like(tokens, dtype=torch.bool)
    x, _ = model.apply_cached(params, tokens, ones, model.init_cache(*tokens.shape))
    out = model.apply(params, tokens)
    assert out.shape == (*tokens.shape, model.vocab_size)
    assert torch.allclose(model.logits(params, x), out, atol=TOL)


def test_apply_with_a_cache_continues_the_sequence():
    from fnllm.models import _cache

    if not hasattr(_cache, "apply_checked"):  # the model protocol's checked cached forward
        pytest.skip("models._cache.apply_checked comes with the model protocol (issue 22)")
    model = tiny()
    params, tokens = noisy(model, 24), random.randint(random.key(25), (2, 7), 0, 40)
    logits, cache = model.apply(params, tokens[:, :4], cache=model.init_cache(2, 7))
    more, cache = model.apply(params, tokens[:, 4:], cache=cache)
    full = model.apply(params, tokens)
    assert torch.allclose(torch.cat([logits, more], dim=1), full, atol=1e-4)
    with pytest.raises(ValueError, match="cache= runs without dropout"):
        model.apply(params, tokens, key=random.key(0), cache=model.init_cache(2, 7))


def test_finetune_strategies_ask_the_llama():
    from fnllm import finetune
    from fnllm.models import _cache

    if not hasattr(_cache, "apply_checked"):
        pytest.skip("finetune asks the model protocol once it is merged")
    model = tiny(n_layer=3)
    paths = tree.paths(model.init(random.key(0)))
    pick = lambda name, m=model: sorted(p for p in paths if finetune.strategy(name, m)(p, None))
    assert pick("head") == ["head.weight", "norm.weight"]
    assert {p.split(".")[1] for p in pick("last:1") if p.startswith("blocks")} == {"2"}
    assert "norm.weight" in pick("last:1")
    with pytest.raises(ValueError, match="bias"):
        finetune.strategy("bitfit", model)
    biased = tiny(qkv_bias=True)
    paths = tree.paths(biased.init(random.key(0)))
    chosen = pick("bitfit", biased)
    assert chosen and all(p.endswith(".bias") or p.startswith(("head", "norm")) for p in chosen)
