"""Tests for fnllm.models: GPT and BERT against transformers, compile, vmap, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from transformers import BertConfig, BertForPreTraining, GPT2Config, GPT2LMHeadModel

from fnllm import models, testing, tree
from fnllm import random as jr
from fnllm.models import BERT, GPT

V, D, H, LAYERS, MAXLEN, FF = 97, 32, 4, 2, 24, 64
ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers


def _gpt_from_hf(sd: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict:
    """Map a GPT2LMHeadModel state_dict onto the fnllm tree (Conv1D weights transposed)."""

    def lin(name: str) -> dict:
        return {"weight": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}

    def ln(name: str) -> dict:
        return {"weight": sd[name + ".weight"], "bias": sd[name + ".bias"]}

    params = {
        "embed": {
            "tokens": {"weight": sd["transformer.wte.weight"]},
            "positions": {"weight": sd["transformer.wpe.weight"]},
        },
        "blocks": [
            {
                "ln_1": ln(f"transformer.h.{i}.ln_1"),
                "attn": {
                    "qkv": lin(f"transformer.h.{i}.attn.c_attn"),
                    "proj": lin(f"transformer.h.{i}.attn.c_proj"),
                },
                "ln_2": ln(f"transformer.h.{i}.ln_2"),
                "mlp": {
                    "fc": lin(f"transformer.h.{i}.mlp.c_fc"),
                    "proj": lin(f"transformer.h.{i}.mlp.c_proj"),
                },
            }
            for i in range(n_layer)
        ],
        "ln_f": ln("transformer.ln_f"),
    }
    if not tied:
        params["head"] = {"weight": sd["lm_head.weight"]}
    return params


def _bert_from_hf(sd: dict[str, torch.Tensor], n_layer: int) -> dict:
    """Map a BertForPreTraining state_dict onto the fnllm tree (q, k, v concatenated)."""

    def pair(name: str) -> dict:
        return {"weight": sd[name + ".weight"], "bias": sd[name + ".bias"]}

    def block(i: int) -> dict:
        b = f"bert.encoder.layer.{i}."
        qkv = [pair(b + f"attention.self.{n}") for n in ("query", "key", "value")]
        return {
            "attn": {
                "qkv": {
                    "weight": torch.cat([p["weight"] for p in qkv]),
                    "bias": torch.cat([p["bias"] for p in qkv]),
                },
                "proj": pair(b + "attention.output.dense"),
            },
            "ln_1": pair(b + "attention.output.LayerNorm"),
            "mlp": {"fc": pair(b + "intermediate.dense"), "proj": pair(b + "output.dense")},
            "ln_2": pair(b + "output.LayerNorm"),
        }

    return {
        "embed": {
            "tokens": {"weight": sd["bert.embeddings.word_embeddings.weight"]},
            "positions": {"weight": sd["bert.embeddings.position_embeddings.weight"]},
            "token_types": {"weight": sd["bert.embeddings.token_type_embeddings.weight"]},
            "ln": pair("bert.embeddings.LayerNorm"),
        },
        "blocks": [block(i) for i in range(n_layer)],
        "pooler": pair("bert.pooler.dense"),
        "mlm": {
            "transform": pair("cls.predictions.transform.dense"),
            "ln": pair("cls.predictions.transform.LayerNorm"),
            "bias": sd["cls.predictions.bias"],
        },
        "sop": pair("cls.seq_relationship"),
    }


def _hf_gpt(tied: bool) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V,
        n_positions=MAXLEN,
        n_embd=D,
        n_layer=LAYERS,
        n_head=H,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_bert() -> BertForPreTraining:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        intermediate_size=FF,
        max_position_embeddings=MAXLEN,
        type_vocab_size=2,
    )
    model = BertForPreTraining(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tiny_gpt(**kw) -> GPT:
    return GPT(vocab_size=V, n_layer=LAYERS, n_head=H, d_model=D, max_len=MAXLEN, **kw)


def _tiny_bert(**kw) -> BERT:
    return BERT(vocab_size=V, n_layer=LAYERS, n_head=H, d_model=D, d_ff=FF, max_len=MAXLEN, **kw)


def _batch(seed: int = 0, B: int = 3, T: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and a mask with left padding (row 0), right padding (row 1), none (row 2)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    return tokens, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    if keep is not None:
        a, b = a[keep.bool()], b[keep.bool()]
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------- GPT


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_gpt_logits_and_hidden_states_match_transformers(tied: bool, padded: bool) -> None:
    hf = _hf_gpt(tied)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    gpt = _tiny_gpt(tie_head=tied)
    params = _gpt_from_hf(hf.state_dict(), LAYERS, tied)
    gpt.check_params(params)
    tokens, mask = _batch()
    mask = mask if padded else None
    keep = mask if padded else torch.ones_like(tokens)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True)
        out = gpt.apply(params, tokens, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == (3, 11, V) and out.logits.dtype == torch.float32
    assert _max_diff(out.logits, ref.logits, keep) <= ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert _max_diff(mine, theirs, keep) <= ATOL
    plain = gpt.apply(params, tokens, attention_mask=mask)
    assert torch.equal(plain, out.logits)


def test_gpt_padding_leaves_real_tokens_unchanged() -> None:
    """Right padding: logits at the real positions equal those of the unpadded sequence."""
    gpt = _tiny_gpt()
    params = gpt.init(jr.key(3))
    tokens, _ = _batch(T=8)
    short = gpt.apply(params, tokens[:, :5])
    padded = torch.cat([tokens[:, :5], torch.zeros(3, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, 5), torch.zeros(3, 3)], dim=1)
    out = gpt.apply(params, padded, attention_mask=mask)
    assert _max_diff(out[:, :5], short) <= 1e-5
    assert torch.isfinite(out).all()


def test_gpt_init_follows_gpt2_scheme() -> None:
    gpt = GPT(vocab_size=512, n_layer=3, n_head=4, d_model=64, max_len=128, tie_head=False)
    params = gpt.init(jr.key(0))
    flat = tree.flatten(params)
    resid = 0.02 / math.sqrt(2 * gpt.n_layer)
    for path, leaf in flat.items():
        assert leaf.dtype == torch.float32, path
        if path.endswith("bias"):
            assert torch.equal(leaf, torch.zeros_like(leaf)), path
        elif ".ln_" in path or path.startswith("ln_f"):
            assert torch.equal(leaf, torch.ones_like(leaf)), path
        else:
            want = resid if path.endswith("proj.weight") else 0.02
            assert leaf.mean().abs() < 0.2 * want, path
            assert abs(leaf.std().item() / want - 1) < 0.1, path
    # every weight matrix is drawn from its own key
    assert not torch.equal(flat["blocks.0.attn.qkv.weight"], flat["blocks.1.attn.qkv.weight"])
    assert torch.equal(flat["head.weight"], gpt.init(jr.key(0))["head"]["weight"])


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_param_shapes_describe_init(tied: bool) -> None:
    gpt = _tiny_gpt(tie_head=tied)
    flat = tree.flatten(gpt.init(jr.key(0)))
    assert {p: tuple(t.shape) for p, t in flat.items()} == gpt.param_shapes()
    assert ("head.weight" in flat) == (not tied)
    assert flat["blocks.1.attn.qkv.weight"].shape == (3 * D, D)
    assert flat["blocks.1.mlp.fc.weight"].shape == (4 * D, D)


def test_gpt_unbatched_input_equals_batch_of_one() -> None:
    gpt = _tiny_gpt()
    params = gpt.init(jr.key(1))
    tokens, mask = _batch()
    one = gpt.apply(params, tokens[0], attention_mask=mask[0], output_hidden_states=True)
    many = gpt.apply(params, tokens, attention_mask=mask, output_hidden_states=True)
    assert one.logits.shape == (11, V)
    assert _max_diff(one.logits, many.logits[0]) <= 1e-5
    assert all(_max_diff(a, b[0]) <= 1e-5 for a, b in zip(one.hidden_states, many.hidden_states))


def test_gpt_dropout_needs_a_key_and_is_deterministic() -> None:
    gpt = _tiny_gpt(dropout=0.2)
    params = gpt.init(jr.key(0))
    tokens, mask = _batch()
    eval_ = gpt.apply(params, tokens, attention_mask=mask)
    assert torch.equal(eval_, _tiny_gpt().apply(params, tokens, attention_mask=mask))
    a = gpt.apply(params, tokens, attention_mask=mask, key=jr.key(1))
    b = gpt.apply(params, tokens, attention_mask=mask, key=jr.key(1))
    c = gpt.apply(params, tokens, attention_mask=mask, key=jr.key(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, eval_) and not torch.allclose(a, c)


def test_gpt_vmap_over_examples_equals_batched_call(monkeypatch: pytest.MonkeyPatch) -> None:
    gpt = _tiny_gpt()
    params = gpt.init(jr.key(0))
    tokens, mask = _batch()
    batched = gpt.apply(params, tokens, attention_mask=mask)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called under vmap")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "There is a performance drop ... batching rule"
        per_example = torch.func.vmap(lambda t, m: gpt.apply(params, t, attention_mask=m))(
            tokens, mask
        )
    assert _max_diff(per_example, batched, mask[..., None].expand_as(batched)) <= 1e-5


def test_gpt_per_example_grads_under_vmap_match_a_loop() -> None:
    gpt = _tiny_gpt()
    params = gpt.init(jr.key(0))
    tokens, _ = _batch(B=3, T=6)

    def loss(p: dict, t: torch.Tensor) -> torch.Tensor:
        logits = gpt.apply(p, t)
        return torch.nn.functional.cross_entropy(logits[:-1], t[1:])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SDPA's backward has no batching rule: must not run
        per_ex = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, tokens)
    for i in range(3):
        single = torch.func.grad(loss)(params, tokens[i])
        for path, g in tree.flatten(single).items():
            assert _max_diff(tree.flatten(per_ex)[path][i], g) <= 1e-5, path


# -------------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("padded", [False, True])
def test_bert_outputs_and_heads_match_transformers(padded: bool) -> None:
    hf = _hf_bert()
    bert = _tiny_bert()
    params = _bert_from_hf(hf.state_dict(), LAYERS)
    bert.check_params(params)
    tokens, mask = _batch(seed=4)
    types = torch.zeros_like(tokens)
    types[:, 6:] = 1
    mask = mask if padded else None
    keep = mask if padded else torch.ones_like(tokens)
    with torch.no_grad():
        ref = hf(tokens, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        ref_model = hf.bert(tokens, token_type_ids=types, attention_mask=mask)
        out = bert.apply(
            params, tokens, token_type_ids=types, attention_mask=mask, output_hidden_states=True
        )
        mlm, sop = bert.pretrain_apply(params, tokens, token_type_ids=types, attention_mask=mask)
    assert _max_diff(out.last_hidden_state, ref_model.last_hidden_state, keep) <= ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert _max_diff(mine, theirs, keep) <= ATOL
    rows = keep[:, 0].bool()  # the pooler reads position 0
    assert _max_diff(out.pooled[rows], ref_model.pooler_output[rows]) <= ATOL
    assert _max_diff(mlm, ref.prediction_logits, keep) <= ATOL
    assert _max_diff(sop[rows], ref.seq_relationship_logits[rows]) <= ATOL
    assert torch.equal(mlm, bert.mlm_logits(params, out.last_hidden_state))


def test_bert_default_token_types_are_zeros() -> None:
    bert = _tiny_bert()
    params = bert.init(jr.key(0))
    tokens, mask = _batch()
    a = bert.apply(params, tokens, attention_mask=mask).last_hidden_state
    b = bert.apply(
        params, tokens, token_type_ids=torch.zeros_like(tokens), attention_mask=mask
    ).last_hidden_state
    assert _max_diff(a, b) <= 1e-6


@pytest.mark.parametrize(
    "flags",
    [{}, {"pooler": False, "pair_head": False}, {"mlm_head": False}, {"pair_head": False}],
)
def test_bert_param_shapes_describe_init(flags: dict) -> None:
    bert = _tiny_bert(**flags)
    params = bert.init(jr.key(0))
    flat = tree.flatten(params)
    assert {p: tuple(t.shape) for p, t in flat.items()} == bert.param_shapes()
    for head in ("pooler", "mlm", "sop"):
        assert (head in params) == flags.get(
            {"pooler": "pooler", "mlm": "mlm_head", "sop": "pair_head"}[head], True
        )
    out = bert.apply(params, torch.tensor([[1, 2, 3]]))
    assert (out.pooled is None) == (not bert.pooler)
    assert out.hidden_states is None


def test_bert_sop_head_is_the_old_name_of_pair_head() -> None:
    with pytest.warns(DeprecationWarning, match="use pair_head"):
        old = _tiny_bert(sop_head=False)
    assert old == _tiny_bert(pair_head=False) and "sop" not in old.init(jr.key(0))
    with pytest.warns(DeprecationWarning, match="use pair_head"):
        assert old.sop_head is False and _tiny_bert().sop_head is True
    with pytest.raises(ValueError, match=r"sop_head .*old name of pair_head.* False"):
        _tiny_bert(sop_head=False, pair_head=True)
    assert dataclasses.replace(old, pair_head=True) == _tiny_bert()
    # a config saved before the rename
    config = old.to_config()
    assert "sop_head" not in config
    config["sop_head"] = config.pop("pair_head")
    assert models.from_config(config) == BERT.from_config(config) == old
    with pytest.raises(ValueError, match=r"sop_head .*old name of pair_head"):
        BERT.from_config({**config, "pair_head": True})
    # the logits keep their old names too
    bert = _tiny_bert()
    params = bert.init(jr.key(0))
    out = bert.pretrain_apply(params, torch.tensor([[1, 2, 3]]))
    assert out.sop_logits is out.pair_logits
    pooled = bert.apply(params, torch.tensor([[1, 2, 3]])).pooled
    assert torch.equal(bert.sop_logits(params, pooled), out.pair_logits)


def test_bert_init_statistics() -> None:
    bert = BERT(vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=128, max_len=128)
    for path, leaf in tree.flatten(bert.init(jr.key(0))).items():
        if path.endswith("bias"):
            assert torch.equal(leaf, torch.zeros_like(leaf)), path
        elif "ln" in path.split("."):
            assert torch.equal(leaf, torch.ones_like(leaf)), path
        elif leaf.numel() >= 1000:
            assert abs(leaf.std().item() / 0.02 - 1) < 0.1, path


def test_bert_heads_missing_raise() -> None:
    bert = _tiny_bert(mlm_head=False, pair_head=False)
    params = bert.init(jr.key(0))
    h = bert.apply(params, torch.tensor([[1, 2]]))
    with pytest.raises(KeyError, match="mlm"):
        bert.mlm_logits(params, h.last_hidden_state)
    with pytest.raises(KeyError, match="sop"):
        bert.pair_logits(params, h.pooled)
    with pytest.raises(ValueError, match="pretrain_apply"):
        bert.pretrain_apply(params, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="pooler"):
        _tiny_bert(pooler=False)


def test_bert_vmap_over_examples_equals_batched_call() -> None:
    bert = _tiny_bert()
    params = bert.init(jr.key(0))
    tokens, mask = _batch()
    types = (torch.arange(11) > 5).long().expand(3, 11)
    batched = bert.apply(params, tokens, token_type_ids=types, attention_mask=mask)

    def one(t: torch.Tensor, tt: torch.Tensor, m: torch.Tensor) -> tuple:
        out = bert.apply(params, t, token_type_ids=tt, attention_mask=m)
        return out.last_hidden_state, out.pooled  # vmap refuses the None hidden_states

    hidden, pooled = torch.func.vmap(one)(tokens, types, mask)
    keep = mask[..., None].expand_as(batched.last_hidden_state)
    assert _max_diff(hidden, batched.last_hidden_state, keep) <= 1e-5
    assert _max_diff(pooled, batched.pooled) <= 1e-5


# ---------------------------------------------------------------------- torch.compile


def test_gpt_compiles_without_graph_breaks() -> None:
    gpt = GPT(vocab_size=V, n_layer=1, n_head=H, d_model=D, max_len=MAXLEN)
    params = gpt.init(jr.key(0))
    tokens, mask = _batch()

    def fn(p, t, m):
        return gpt.apply(p, t, attention_mask=m, output_hidden_states=True)

    testing.assert_compiles(fn, (params, tokens, mask))  # traced whole: zero graph breaks
    got = torch.compile(fn, fullgraph=True)(params, tokens, mask)  # inductor code
    testing.assert_trees_close(got, fn(params, tokens, mask), rtol=0, atol=1e-5)


def test_bert_compiles_without_graph_breaks() -> None:
    bert = BERT(vocab_size=V, n_layer=1, n_head=H, d_model=D, d_ff=FF, max_len=MAXLEN)
    params = bert.init(jr.key(0))
    tokens, mask = _batch()

    def fn(p, t, m):
        return tuple(bert.pretrain_apply(p, t, attention_mask=m))

    testing.assert_compiles(fn, (params, tokens, mask))  # traced whole: zero graph breaks
    got = torch.compile(fn, fullgraph=True)(params, tokens, mask)  # inductor code
    testing.assert_trees_close(got, fn(params, tokens, mask), rtol=0, atol=1e-5)


# ------------------------------------------------------------------- attention masks


def _record_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor | None, bool]]:
    """Record (attn_mask, is_causal) of every SDPA call."""
    calls: list[tuple[torch.Tensor | None, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("model", [_tiny_gpt(), _tiny_bert()], ids=["gpt", "bert"])
def test_all_ones_mask_equals_no_mask_and_runs_unmasked(
    model: GPT | BERT, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = model.init(jr.key(0))
    tokens, _ = _batch()
    calls = _record_sdpa(monkeypatch)
    out = model.apply(params, tokens, attention_mask=torch.ones_like(tokens))
    causal = isinstance(model, GPT)
    assert calls == [(None, causal)] * model.n_layer  # the fast unmasked kernel, every layer
    ref = model.apply(params, tokens)
    for a, b in zip(tree.leaves(tuple(out)), tree.leaves(tuple(ref))):
        assert _max_diff(a, b) <= 1e-6
    # The math path (what vmap uses) agrees with the fast path.
    math = model.apply(params, tokens, attention_mask=torch.ones_like(tokens), impl="math")
    for a, b in zip(tree.leaves(tuple(math)), tree.leaves(tuple(ref))):
        assert _max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("model", [_tiny_gpt(), _tiny_bert()], ids=["gpt", "bert"])
def test_padding_mask_is_prepared_once_for_all_layers(
    model: GPT | BERT, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = model.init(jr.key(0))
    tokens, mask = _batch()
    calls = _record_sdpa(monkeypatch)
    model.apply(params, tokens, attention_mask=mask)
    assert len(calls) == model.n_layer > 1
    first = calls[0][0]
    assert first is not None and first.dtype == torch.bool
    assert all(m is first and not c for m, c in calls)  # one tensor, causal folded in
    B, T = tokens.shape
    assert first.shape == ((B, 1, T, T) if isinstance(model, GPT) else (B, 1, 1, T))


def test_param_shapes_is_cached_but_returns_a_fresh_dict() -> None:
    gpt = _tiny_gpt()
    shapes = gpt.param_shapes()
    shapes["bogus"] = (1,)
    assert "bogus" not in gpt.param_shapes()
    assert gpt.param_shapes() == _tiny_gpt().param_shapes()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model", [_tiny_gpt(), _tiny_bert()], ids=["gpt", "bert"])
def test_bad_tokens_raise_clear_errors(model: GPT | BERT) -> None:
    params = model.init(jr.key(0))
    tokens, _ = _batch()
    with pytest.raises(TypeError, match="tokens: expected an integer tensor"):
        model.apply(params, tokens.float())
    with pytest.raises(TypeError, match="tokens"):
        model.apply(params, tokens.tolist())
    bad = tokens.clone()
    bad[2, 7] = V + 3
    with pytest.raises(ValueError, match=rf"tokens: id {V + 3} at \[2, 7\] >= vocab_size {V}"):
        model.apply(params, bad)
    bad[2, 7] = -1
    with pytest.raises(ValueError, match=r"tokens: id -1 at \[2, 7\] < 0"):
        model.apply(params, bad)
    with pytest.raises(ValueError, match=f"sequence length {MAXLEN + 1} > max_len {MAXLEN}"):
        model.apply(params, torch.ones(1, MAXLEN + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask: shape \(3, 10\) != tokens shape"):
        model.apply(params, tokens, attention_mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match=r"tokens: expected shape"):
        model.apply(params, tokens[None])


def test_bad_token_type_ids_raise() -> None:
    bert = _tiny_bert()
    params = bert.init(jr.key(0))
    tokens, _ = _batch()
    types = torch.zeros_like(tokens)
    types[1, 2] = 2
    with pytest.raises(ValueError, match=r"token_type_ids: id 2 at \[1, 2\] >= size 2"):
        bert.apply(params, tokens, token_type_ids=types)
    with pytest.raises(ValueError, match="token_type_ids: shape"):
        bert.apply(params, tokens, token_type_ids=types[:, :3].clamp(max=1))


@pytest.mark.parametrize("model", [_tiny_gpt(), _tiny_bert()], ids=["gpt", "bert"])
def test_bad_params_are_named_by_path(model: GPT | BERT) -> None:
    tokens = torch.tensor([[1, 2, 3]])
    params = model.init(jr.key(0))
    del params["blocks"][1]["mlp"]["fc"]["bias"]
    with pytest.raises(KeyError, match=r"missing blocks\.1\.mlp\.fc\.bias"):
        model.apply(params, tokens)

    params = model.init(jr.key(0))
    params["blocks"][0]["attn"]["extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected blocks\.0\.attn\.extra"):
        model.apply(params, tokens)

    params = model.init(jr.key(0))
    params["blocks"][0]["attn"]["qkv"]["weight"] = torch.zeros(3 * D, D + 1)
    with pytest.raises(
        ValueError, match=rf"blocks\.0\.attn\.qkv\.weight has shape \({3 * D}, {D + 1}\)"
    ):
        model.apply(params, tokens)

    params = model.init(jr.key(0))
    params["blocks"].pop()
    with pytest.raises(KeyError, match=r"missing blocks\.1\."):
        model.check_params(params)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPT(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        BERT(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPT(dropout=1.0)


@pytest.mark.parametrize(
    "model",
    [
        _tiny_gpt(),
        _tiny_gpt(tie_head=False, d_ff=40),
        _tiny_bert(),
        _tiny_bert(pooler=False, pair_head=False),
    ],
)
def test_config_round_trips_through_json(model: GPT | BERT) -> None:
    cfg = json.loads(json.dumps(model.to_config()))
    assert type(model).from_config(cfg) == model
    assert models.from_config(cfg) == model
    assert hash(models.from_config(cfg)) == hash(model)


def test_from_config_rejects_wrong_type_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="expected 'gpt'"):
        GPT.from_config(_tiny_bert().to_config())
    with pytest.raises(ValueError, match=r"unknown fields \['n_embd'\]"):
        GPT.from_config({"n_embd": 8})
    with pytest.raises(ValueError, match="type must be one of"):
        models.from_config({"n_layer": 2})
