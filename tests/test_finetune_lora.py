"""fnllm.finetune.lora: adapters as leaves, checked against the base model, peft and a loop."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt
from hypothesis import given
from hypothesis import strategies as st

from fnllm import io, losses, tree
from fnllm import random as jr
from fnllm.finetune import Classifier, lora, strategy
from fnllm.models import BERT, GPT


def _bert() -> BERT:
    return tiny_bert(mlm_head=False, pair_head=False)


def _gpt() -> GPT:
    return tiny_gpt()


def _randomise_b(params, key):
    """Give every lora_b random values (B = 0 right after init makes the adapters invisible)."""
    flat = tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.endswith("lora_b"):
            flat[p] = jr.normal(jr.fold_in(key, i), tuple(v.shape)) * 0.1
    return tree.unflatten(flat)


TOKENS = jr.randint(jr.key(7), (3, 6), 1, 40)
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])


@pytest.mark.parametrize("model", [Classifier(_bert(), 3, "cls"), Classifier(_gpt(), 1, "last")])
def test_fresh_adapters_leave_the_function_unchanged(model):
    params = model.init(jr.key(0))
    lp = lora.init(jr.key(1), params, rank=4, targets=["*.attn.*", "*.mlp.*"])
    assert torch.equal(model.apply(lp, TOKENS, MASK), model.apply(params, TOKENS, MASK))


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(rslora):
    model = Classifier(_bert(), 3, "mean")
    params = model.init(jr.key(0))
    lp = _randomise_b(lora.init(jr.key(1), params, rank=4, alpha=8, rslora=rslora), jr.key(2))
    out = model.apply(lp, TOKENS, MASK)
    assert not torch.allclose(out, model.apply(params, TOKENS, MASK))  # adapters matter
    merged = lora.merge(lp)
    assert tree.paths(merged) == tree.paths(params)
    torch.testing.assert_close(model.apply(merged, TOKENS, MASK), out, atol=1e-5, rtol=1e-5)
    scale = float(lp["base"]["blocks"][0]["attn"]["qkv"]["lora_scale"])
    assert scale == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)


@given(st.integers(1, 16), st.floats(0.5, 64))
def test_merge_of_fresh_adapters_is_the_identity(rank, alpha):
    params = _gpt().init(jr.key(0))
    lp = lora.init(jr.key(rank), params, rank=rank, alpha=alpha)
    merged = lora.merge(lp)
    for p, x in tree.flatten(params).items():
        assert torch.equal(tree.flatten(merged)[p], x), p


def test_only_adapters_and_head_get_gradients_and_the_scale_never_trains():
    model = Classifier(_bert(), 2, "mean")
    lp = lora.init(jr.key(1), model.init(jr.key(0)), rank=2)
    trainable, frozen = tree.partition(lp, strategy("lora", model))
    names = {p.rpartition(".")[2] for p in tree.paths(trainable)}
    assert names == {"lora_a", "lora_b", "weight", "bias"}  # weight/bias: the head only
    assert {p for p in tree.paths(trainable) if not p.startswith("head")} == {
        p for p in tree.paths(lp) if p.endswith(("lora_a", "lora_b"))
    }
    for name in ("full", "bitfit", "last:1"):
        tr, _ = tree.partition(lp, strategy(name, model))
        assert not [p for p in tree.paths(tr) if p.endswith("lora_scale")], name

    labels = torch.tensor([0, 1, 1])

    def loss(tr):
        return losses.classification(model.apply(tree.combine(tr, frozen), TOKENS, MASK), labels)

    grads = torch.func.grad(loss)(trainable)
    flat = tree.flatten(grads)
    assert set(flat) == set(tree.paths(trainable))
    # B starts at zero, so A's gradient is zero at step 0 but B's is not
    assert any(float(v.abs().sum()) > 0 for p, v in flat.items() if p.endswith("lora_b"))

    def loss_all(tr, fr):
        return losses.classification(model.apply(tree.combine(tr, fr), TOKENS, MASK), labels)

    # even a "*" partition gives the scale a zero gradient (nn.linear detaches it)
    everything, nothing = tree.partition(lp, "*")
    g_all = tree.flatten(torch.func.grad(lambda t: loss_all(t, nothing))(everything))
    assert all(float(v.abs().sum()) == 0 for p, v in g_all.items() if p.endswith("lora_scale"))


def test_matches_peft_lora_on_a_transformers_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    bert, base = io.from_hf(tmp_path)
    r, alpha, D = 2, 6, 16
    pcfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0
    )
    model = peft.get_peft_model(hf, pcfg).eval()
    # peft's query and value adapters as one fused qkv adapter of rank 2r:
    # A = [A_q; A_v], B = [[B_q, 0], [0, 0], [0, B_v]] (rows: query; key; value)
    lp = lora.init(jr.key(0), base, rank=2 * r, targets=["*.attn.qkv"])
    for i, layer in enumerate(model.base_model.model.encoder.layer):
        att = layer.attention.self
        a_q, b_q = jr.normal(jr.key(10 + i), (r, D)), jr.normal(jr.key(20 + i), (D, r))
        a_v, b_v = jr.normal(jr.key(30 + i), (r, D)), jr.normal(jr.key(40 + i), (D, r))
        with torch.no_grad():
            att.query.lora_A["default"].weight.copy_(a_q)
            att.query.lora_B["default"].weight.copy_(b_q)
            att.value.lora_A["default"].weight.copy_(a_v)
            att.value.lora_B["default"].weight.copy_(b_v)
        b = torch.zeros(3 * D, 2 * r)
        b[:D, :r], b[2 * D :, r:] = b_q, b_v
        qkv = lp["blocks"][i]["attn"]["qkv"]
        qkv["lora_a"], qkv["lora_b"] = torch.cat([a_q, a_v]), b
        qkv["lora_scale"] = torch.tensor(alpha / r)
    with torch.no_grad():
        want = model(input_ids=TOKENS, attention_mask=MASK).last_hidden_state
    got = bert.apply(lp, TOKENS, attention_mask=MASK).last_hidden_state
    assert not torch.allclose(got, bert.apply(base, TOKENS, attention_mask=MASK).last_hidden_state)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merged_model_exports_to_transformers_with_the_same_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    bert = _bert()
    lp = _randomise_b(lora.init(jr.key(1), bert.init(jr.key(0)), rank=3), jr.key(2))
    want = bert.apply(lp, TOKENS, attention_mask=MASK).last_hidden_state
    io.to_hf(bert, lora.merge(lp), tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = hf(input_ids=TOKENS, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", [Classifier(_bert(), 3, "mean"), Classifier(_gpt(), 2, "last")])
def test_stacked_adapters_picked_per_row_equal_each_set_alone(model):
    params = model.init(jr.key(0))
    sets = [_randomise_b(lora.init(jr.key(i), params, rank=2), jr.key(9 + i)) for i in range(3)]
    index = torch.tensor([2, 0, 1])
    got = model.apply(lora.pick(lora.stack(sets), index), TOKENS, MASK)
    for row, s in enumerate(index.tolist()):
        alone = model.apply(sets[s], TOKENS[row : row + 1], MASK[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_adapters_save_alone_and_attach_to_the_base(tmp_path):
    gpt = _gpt()
    base = gpt.init(jr.key(0))
    lp = _randomise_b(lora.init(jr.key(1), base, rank=2), jr.key(3))
    path = tmp_path / "adapters.safetensors"
    lora.save(path, lp)
    assert path.stat().st_size < 0.2 * 4 * tree.count(base)
    again = lora.attach(base, lora.load(path))
    assert torch.equal(gpt.apply(again, TOKENS), gpt.apply(lp, TOKENS))
    assert "lora_a" not in base["blocks"][0]["attn"]["qkv"]  # the base tree is untouched


def test_per_layer_rank_from_a_glob_mapping():
    lp = lora.init(jr.key(1), _gpt().init(jr.key(0)), rank={"blocks.0.*": 4, "*": 2})
    assert lp["blocks"][0]["attn"]["qkv"]["lora_a"].shape == (4, 16)
    assert lp["blocks"][1]["attn"]["proj"]["lora_b"].shape == (16, 2)


def test_fullgraph_compile_has_no_graph_breaks():
    model = Classifier(_gpt(), 2, "last")
    params = model.init(jr.key(0))
    sets = [_randomise_b(lora.init(jr.key(i), params, rank=2), jr.key(5 + i)) for i in range(2)]
    stacked = lora.stack(sets)
    index = torch.tensor([1, 0, 1])

    def f(lp, st, idx):
        return model.apply(lp, TOKENS, MASK).sum() + model.apply(lora.pick(st, idx), TOKENS, MASK)

    explanation = torch._dynamo.explain(f)(sets[0], stacked, index)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(sets[0], stacked, index), f(sets[0], stacked, index))


def test_bad_arguments_name_the_problem():
    params = _gpt().init(jr.key(0))
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.init(jr.key(1), params, targets=["*.nothing"])
    with pytest.raises(ValueError, match=r"rank 0 for blocks.0.attn.qkv must be in \[1, 16\]"):
        lora.init(jr.key(1), params, rank=0)
    with pytest.raises(ValueError, match=r"rank 17 .* must be in \[1, 16\]"):
        lora.init(jr.key(1), params, rank=17)
    with pytest.raises(ValueError, match="matches no glob of the rank mapping"):
        lora.init(jr.key(1), params, rank={"blocks.0.*": 2})
    with pytest.raises(ValueError, match="alpha"):
        lora.init(jr.key(1), params, alpha=0)
    lp = lora.init(jr.key(1), params, rank=2)
    with pytest.raises(ValueError, match="already has adapters"):
        lora.init(jr.key(1), lp)
    with pytest.raises(ValueError, match="no stacked adapters"):
        lora.pick(lp, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"index values must be in \[0, 2\)"):
        lora.pick(lora.stack([lp, lp]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="stacked adapters"):
        lora.merge(lora.stack([lp, lp]))
    with pytest.raises(KeyError, match="no linear layer"):
        lora.attach(params, {"blocks.9.attn.qkv.lora_a": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="does not fit"):
        lora.attach(params, {"blocks.0.attn.qkv.lora_a": torch.zeros(2, 15)})
    with pytest.raises(ValueError, match="no adapters"):
        lora.save("x.safetensors", params)
