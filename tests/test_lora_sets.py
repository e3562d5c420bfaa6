"""fnllm.finetune.adapter_sets: a set is the whole trained part (adapters, head) + a manifest."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import nn, tree
from fnllm import random as jr
from fnllm.finetune import Classifier, lora

TOKENS = jr.randint(jr.key(7), (4, 6), 1, 40)
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
BERT_CLF = Classifier(tiny_bert(mlm_head=False, pair_head=False), 3, "cls")
GPT_CLF = Classifier(tiny_gpt(), 2, "last")


def _trained(model, params, key):
    """A set as training leaves it: random adapters (B != 0) and a head of its own."""
    lp = lora.init(jr.fold_in(key, 0), params, rank=2)
    flat = tree.flatten(lp)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.endswith("lora_b") or p.startswith("head."):
            flat[p] = jr.normal(jr.fold_in(key, i + 1), tuple(v.shape)) * 0.3
    return tree.unflatten(flat)


@settings(max_examples=12, deadline=None)
@given(
    n_sets=st.integers(1, 4),
    rows=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    gpt=st.booleans(),
)
def test_mixed_batch_with_per_set_heads_equals_each_set_alone(n_sets, rows, gpt):
    model = GPT_CLF if gpt else BERT_CLF
    params = model.init(jr.key(0))
    sets = [_trained(model, params, jr.key(10 + i)) for i in range(n_sets)]
    index = torch.tensor([r % n_sets for r in rows])
    tokens, mask = TOKENS[: len(rows)], MASK[: len(rows)]
    got = model.apply(lora.pick(lora.stack(sets), index), tokens, mask)
    for row, s in enumerate(index.tolist()):
        alone = model.apply(sets[s], tokens[row : row + 1], mask[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_stack_refuses_sets_whose_shared_leaves_differ():
    params = GPT_CLF.init(jr.key(0))
    a = _trained(GPT_CLF, params, jr.key(1))
    other_base = GPT_CLF.init(jr.key(5))
    b = _trained(GPT_CLF, other_base, jr.key(2))
    with pytest.raises(ValueError, match=r"base\.\S+ differs between set 0 and set 1"):
        lora.stack([a, b])
    ln = tree.flatten(a)
    ln["base.ln_f.weight"] = ln["base.ln_f.weight"] + 1.0  # a norm cannot be stacked per set
    with pytest.raises(ValueError, match=r"base\.ln_f\.weight differs"):
        lora.stack([a, tree.unflatten(ln)])
    with pytest.raises(ValueError, match="other adapter layers or ranks"):
        lora.stack([a, lora.init(jr.key(3), params, rank=3)])


def test_per_row_linear_matches_a_loop_over_rows():
    w, b = jr.normal(jr.key(1), (3, 4, 5)), jr.normal(jr.key(2), (3, 4))
    x = jr.normal(jr.key(3), (3, 2, 5))
    got = nn.linear({"weight": w, "bias": b}, x)
    for i in range(3):
        torch.testing.assert_close(got[i], nn.linear({"weight": w[i], "bias": b[i]}, x[i]))


@pytest.mark.parametrize("model", [BERT_CLF, GPT_CLF], ids=["bert", "gpt"])
def test_a_saved_set_round_trips_with_its_head(model, tmp_path):
    params = model.init(jr.key(0))
    lp = _trained(model, params, jr.key(1))
    path = tmp_path / "set.safetensors"
    lora.save(path, lp, model, classes=[f"c{i}" for i in range(model.n_classes)])
    loaded = lora.load(path)
    assert {"head.weight", "head.bias"} <= set(loaded)
    assert not any(p.endswith(".weight") and p.startswith("base.") for p in loaded)
    fresh = model.init(jr.key(0))  # the same base, a fresh (untrained) head
    again = lora.attach(fresh, loaded)
    assert torch.equal(model.apply(again, TOKENS, MASK), model.apply(lp, TOKENS, MASK))
    m = lora.manifest(path)
    assert m == loaded.manifest
    assert m["model"] == model.to_config()
    assert m["base_type"] == model.base.to_config()["type"]
    assert m["prefix"] == "base." and m["strategy"]["name"] == "lora"
    assert m["classes"] == [f"c{i}" for i in range(model.n_classes)]
    assert set(m["lora"]["targets"]) == {
        f"base.blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")
    }
    assert set(m["lora"]["rank"].values()) == {2} and set(m["lora"]["alpha"].values()) == {16.0}
    assert m["fingerprint"] == lora.fingerprint(params["base"])


def test_a_classifier_set_attaches_to_the_bare_encoder(tmp_path):
    params = BERT_CLF.init(jr.key(0))
    lp = _trained(BERT_CLF, params, jr.key(1))
    lora.save(tmp_path / "s.safetensors", lp, BERT_CLF)
    bare = lora.attach(params["base"], lora.load(tmp_path / "s.safetensors"))
    assert tree.paths(bare) == tree.paths(lp["base"])
    base = BERT_CLF.base
    got = base.apply(bare, TOKENS, attention_mask=MASK).last_hidden_state
    want = base.apply(lp["base"], TOKENS, attention_mask=MASK).last_hidden_state
    assert torch.equal(got, want)
    # and a set saved from the bare encoder attaches to a classifier built on it
    lora.save(tmp_path / "bare.safetensors", lp["base"], base, trainable=[])
    onto = lora.attach(params, lora.load(tmp_path / "bare.safetensors"))
    assert torch.equal(onto["base"]["blocks"][1]["attn"]["qkv"]["lora_b"],
                       lp["base"]["blocks"][1]["attn"]["qkv"]["lora_b"])  # fmt: skip


def test_attach_names_the_leaves_of_another_base(tmp_path):
    params = GPT_CLF.init(jr.key(0))
    lora.save(tmp_path / "s.safetensors", _trained(GPT_CLF, params, jr.key(1)), GPT_CLF)
    loaded = lora.load(tmp_path / "s.safetensors")
    other = GPT_CLF.init(jr.key(9))
    with pytest.raises(
        ValueError, match=r"another base \(gpt.*blocks\.0\.attn\.proj\.weight holds"
    ):
        lora.attach(other, loaded)
    lora.attach(other, loaded, check_base=False)  # on purpose
    bigger = Classifier(tiny_gpt(max_len=20), 2, "last").init(jr.key(0))
    with pytest.raises(ValueError, match=r"embed\.positions\.weight has shape \[20, 16\]"):
        lora.attach(bigger, loaded)
    in_bf16 = tree.cast(params, torch.bfloat16)  # a cast base keeps its fingerprint
    as_bf16 = lora.AdapterSet({k: v.to(torch.bfloat16) for k, v in loaded.items()}, loaded.manifest)
    lora.attach(in_bf16, as_bf16)
    wrong_classes = Classifier(tiny_gpt(), 5, "last").init(jr.key(0))
    with pytest.raises(ValueError, match=r"head\.\w+ has shape \(2,.*\) in the set but \(5,"):
        lora.attach(wrong_classes, loaded)


def test_fingerprint_survives_bf16_and_notices_one_changed_leaf():
    base = GPT_CLF.base.init(jr.key(0))
    fp = lora.fingerprint(base)
    assert lora.fingerprint(tree.cast(base, torch.bfloat16)) == fp
    flat = tree.flatten(base)
    flat["blocks.1.mlp.fc.weight"] = flat["blocks.1.mlp.fc.weight"] * 2
    changed = lora.fingerprint(tree.unflatten(flat))
    assert changed["digest"] != fp["digest"]
    assert [p for p in fp["leaves"] if fp["leaves"][p] != changed["leaves"][p]] == [
        "blocks.1.mlp.fc.weight"
    ]


def test_save_takes_any_strategy_and_checks_its_arguments(tmp_path):
    params = BERT_CLF.init(jr.key(0))
    lp = _trained(BERT_CLF, params, jr.key(1))
    path = tmp_path / "bitfit.safetensors"
    lora.save(path, lp, BERT_CLF, trainable="bitfit")
    m = lora.manifest(path)
    assert m["strategy"]["name"] == "bitfit"
    assert "base.blocks.0.ln_1.bias" in m["leaves"]
    assert "blocks.0.ln_1.bias" not in m["fingerprint"]["leaves"]  # the set holds it
    assert "blocks.0.ln_1.weight" in m["fingerprint"]["leaves"]
    again = lora.attach(params, lora.load(path))
    assert torch.equal(BERT_CLF.apply(again, TOKENS, MASK), BERT_CLF.apply(lp, TOKENS, MASK))
    with pytest.raises(ValueError, match="3 class names for a head with 2 outputs"):
        lora.save(path, _trained(GPT_CLF, GPT_CLF.init(jr.key(0)), jr.key(1)), GPT_CLF,
                  classes=["a", "b", "c"])  # fmt: skip
    with pytest.raises(TypeError, match="needs the model"):
        lora.save(path, lp, trainable="bitfit")
    with pytest.raises(ValueError, match="nothing to save"):
        lora.save(path, params["base"])
    # without a model, a classifier tree still carries its head
    lora.save(path, lp)
    assert {"head.weight", "head.bias"} <= set(lora.load(path))
    assert lora.manifest(path)["model"] is None


def test_a_corrupt_manifest_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), {"fnllm.lora_set": "{not json"})
    with pytest.raises(ValueError, match="manifest is not valid JSON"):
        lora.load(path)
    save_file({"x": torch.zeros(1)}, str(path), {"fnllm.lora_set": json.dumps({"a": 1})})
    with pytest.raises(ValueError, match="not an fnllm adapter manifest"):
        lora.manifest(path)
