"""lora.to_peft / lora.from_peft against peft itself: equal logits both ways, BERT, GPT-2 and
the Llama family (Llama, Qwen2, Mistral; grouped-query attention on)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt

from fnllm import io, testing, tree
from fnllm import random as jr
from fnllm.finetune import Classifier, lora
from fnllm.models import Llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PAD = 39
TOKENS = jr.randint(jr.key(7), (3, 6), 1, 39)
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
PADDED = torch.where(MASK.bool(), TOKENS, torch.full_like(TOKENS, PAD))
TARGETS = ["*.attn.qkv", "*.attn.proj", "*.mlp.fc"]

BERT_CLF = Classifier(tiny_bert(mlm_head=False, pair_head=False), 3, "cls")
GPT_CLF = Classifier(tiny_gpt(), 2, "last")
HF_CLASS = {"bert": "BertForSequenceClassification", "gpt": "GPT2ForSequenceClassification"}


def _random(params, key, std=0.2, only=None):
    flat = tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.endswith("lora_scale") or (only is not None and not only(p)):
            continue
        flat[p] = jr.normal(jr.fold_in(key, i), tuple(v.shape)) * std + (
            1.0 if p.rpartition(".")[2] == "weight" and v.ndim == 1 else 0.0
        )
    return tree.unflatten(flat)


def _trained(model, params, rank=2, alpha=6.0):
    """Adapters with random A and B, a random head: what training leaves."""
    lp = lora.init(jr.key(1), params, rank=rank, alpha=alpha, targets=TARGETS)
    return _random(lp, jr.key(2), only=lambda p: "lora_" in p or p.startswith("head."))


def _hf_model(model, params, folder):
    """The transformers classifier (or bare model) of the frozen base, as io.to_hf writes it."""
    io.to_hf(model, params, folder)
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder).eval()


def _run(hf, tokens, mask):
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask).logits


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_to_peft_loads_in_peft_with_equal_logits(name, tmp_path):
    clf = BERT_CLF if name == "bert" else GPT_CLF
    tokens = TOKENS if name == "bert" else PADDED
    params = _random(clf.init(jr.key(0)), jr.key(3))
    lp = _trained(clf, params)
    folder = lora.to_peft(lp, tmp_path / "adapter", clf)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 2 and cfg["lora_alpha"] == 6.0
    hf = _hf_model(clf, params, tmp_path / "base")
    before = _run(hf, tokens, MASK)
    pm = peft.PeftModel.from_pretrained(hf, folder).eval()
    want = clf.apply(lp, tokens, MASK)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter and the head matter
    torch.testing.assert_close(_run(pm, tokens, MASK), want, atol=1e-5, rtol=1e-5)


def test_to_peft_on_a_bare_gpt2_lm_with_per_layer_ranks(tmp_path):
    gpt = tiny_gpt()
    base = _random(gpt.init(jr.key(0)), jr.key(4))
    lp = lora.init(jr.key(1), base, rank={"blocks.0.*": 3, "*": 2}, alpha=4.0, targets=TARGETS)
    lp = _random(lp, jr.key(5), only=lambda p: "lora_" in p)
    folder = lora.to_peft(lp, tmp_path / "adapter", gpt)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and set(cfg["rank_pattern"].values()) == {3}
    hf = _hf_model(gpt, base, tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(hf, folder).eval()
    got = _run(pm, TOKENS, torch.ones_like(TOKENS))
    torch.testing.assert_close(got, gpt.apply(lp, TOKENS), atol=1e-5, rtol=1e-5)


def _peft_trained(hf, config, key):
    pm = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for i, (n, p) in enumerate(sorted(pm.named_parameters())):
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(jr.normal(jr.fold_in(key, i), tuple(p.shape)) * 0.3)
    return pm.eval()


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_from_peft_reads_adapters_and_head_with_equal_logits(name, tmp_path):
    clf = BERT_CLF if name == "bert" else GPT_CLF
    tokens = TOKENS if name == "bert" else PADDED
    params = _random(clf.init(jr.key(0)), jr.key(3))
    # a zero head bias: GPT-2's export would fold it into ln_f, and the backbones would differ
    params = {**params, "head": {**params["head"], "bias": torch.zeros(clf.n_classes)}}
    hf = _hf_model(clf, params, tmp_path / "base")
    if name == "bert":  # three separate q/k/v modules, with their own ranks and alphas
        targets = ["query", "key", "value", "attention.output.dense"]
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                 rank_pattern={"key": 3}, alpha_pattern={"value": 7},
                                 task_type="SEQ_CLS")  # fmt: skip
    else:
        config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                 fan_in_fan_out=True, task_type="SEQ_CLS")  # fmt: skip
    pm = _peft_trained(hf, config, jr.key(9))
    pm.save_pretrained(tmp_path / "adapter")
    want = _run(pm, tokens, MASK)
    leaves = lora.from_peft(tmp_path / "adapter", clf)
    assert {"head.weight", "head.bias"} <= set(leaves)
    got = clf.apply(lora.attach(params, leaves), tokens, MASK)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if name == "bert":  # the fused qkv: rank 2 + 3 + 2, with a block structure
        b = leaves["base.blocks.0.attn.qkv.lora_b"]
        assert leaves["base.blocks.0.attn.qkv.lora_a"].shape == (7, 16) and b.shape == (48, 7)
        assert not b[:16, 2:].any() and not b[16:32, :2].any() and not b[32:, :5].any()


def test_peft_round_trip_keeps_the_function(tmp_path):
    params = _random(BERT_CLF.init(jr.key(0)), jr.key(3))
    lp = _trained(BERT_CLF, params)
    again = lora.attach(params, lora.from_peft(lora.to_peft(lp, tmp_path, BERT_CLF), BERT_CLF))
    torch.testing.assert_close(BERT_CLF.apply(again, TOKENS, MASK),
                               BERT_CLF.apply(lp, TOKENS, MASK), atol=1e-5, rtol=1e-5)  # fmt: skip
    bare = lora.from_peft(lora.to_peft(lp["base"], tmp_path / "bare", BERT_CLF.base),
                          BERT_CLF.base)  # fmt: skip
    assert sorted(bare) == sorted(p.removeprefix("base.") for p in lora.adapters(lp))


def test_bad_peft_folders_and_exports_are_named(tmp_path):
    params = BERT_CLF.init(jr.key(0))
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        lora.from_peft(tmp_path, BERT_CLF)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3', not 'LORA'"):
        lora.from_peft(tmp_path, BERT_CLF)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                              "use_dora": True}))  # fmt: skip
    with pytest.raises(ValueError, match="use_dora"):
        lora.from_peft(tmp_path, BERT_CLF)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.to_peft(params, tmp_path / "x", BERT_CLF)
    mean = Classifier(BERT_CLF.base, 3, "mean")
    lp = lora.init(jr.key(1), mean.init(jr.key(0)), rank=2)
    with pytest.raises(ValueError, match="has no transformers class"):
        lora.to_peft(lp, tmp_path / "y", mean)
    gpt_folder = lora.to_peft(lora.init(jr.key(1), GPT_CLF.init(jr.key(0))), tmp_path / "g",
                              GPT_CLF)  # fmt: skip
    with pytest.raises(KeyError, match="modules this BERT does not have"):
        lora.from_peft(gpt_folder, BERT_CLF)


# ----------------------------------------------------------------------------- Llama family

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(arch):
    """GQA on (4 query heads over 2 KV heads); Qwen2 with q/k/v biases and a tied head."""
    qwen = arch == "qwen2"
    return Llama(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24,
                 max_len=16, qkv_bias=qwen, tie_head=qwen)  # fmt: skip


def _real(logits):
    return logits[MASK.bool()]  # right padding: real positions only


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_to_peft_llama_family_loads_in_peft_with_equal_logits(arch, tmp_path):
    model = _tiny_llama(arch)
    base = _random(model.init(jr.key(0)), jr.key(4))
    lp = lora.init(jr.key(1), base, rank={"blocks.1.mlp.*": 3, "*": 2}, alpha=6.0, model=model)
    lp = _random(lp, jr.key(5), only=lambda p: "lora_" in p)
    folder = lora.to_peft(lp, tmp_path / "adapter", model)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["fan_in_fan_out"] is False
    assert len(cfg["target_modules"]) == 2 * 7 and set(cfg["rank_pattern"].values()) == {3}
    assert {m.rpartition(".")[2] for m in cfg["target_modules"]} == set(LLAMA_LINEARS)
    hf = _hf_model(model, base, tmp_path / "base")
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    before = _run(hf, PADDED, MASK)
    pm = peft.PeftModel.from_pretrained(hf, folder).eval()
    want = model.apply(lp, PADDED, attention_mask=MASK)
    assert not torch.allclose(_real(before), _real(want), atol=1e-3)  # the adapters matter
    torch.testing.assert_close(_real(_run(pm, PADDED, MASK)), _real(want), atol=1e-5, rtol=1e-5)
    again = lora.attach(base, lora.from_peft(folder, model))  # and back
    testing.assert_trees_equal(again, lp)
    torch.testing.assert_close(model.apply(again, PADDED, attention_mask=MASK), want)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_from_peft_reads_llama_family_adapters_and_saved_head(arch, tmp_path):
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[arch]
    hf_cfg = cls(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                 tie_word_embeddings=False, sliding_window=None)  # fmt: skip
    hf = getattr(transformers, f"{arch.capitalize()}ForCausalLM")(hf_cfg)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(hf.named_parameters())):
            p.copy_(jr.normal(jr.fold_in(jr.key(3), i), tuple(p.shape)) * 0.2 + (p.ndim == 1))
    hf.eval().save_pretrained(tmp_path / "base")
    model, params = io.from_hf(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=LLAMA_LINEARS,
                             rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 7},
                             modules_to_save=["lm_head"])  # fmt: skip
    pm = _peft_trained(hf, config, jr.key(9))
    pm.save_pretrained(tmp_path / "adapter")
    want = _run(pm, PADDED, MASK)
    leaves = lora.from_peft(tmp_path / "adapter", model)
    assert "head.weight" in leaves and "blocks.1.attn.k.lora_a" in leaves
    assert leaves["blocks.0.mlp.down.lora_a"].shape == (3, 24)
    torch.testing.assert_close(float(leaves["blocks.0.attn.v.lora_scale"]), 3.5)
    got = model.apply(lora.attach(params, leaves), PADDED, attention_mask=MASK)
    torch.testing.assert_close(_real(got), _real(want), atol=1e-5, rtol=1e-5)
    plain = model.apply(params, PADDED, attention_mask=MASK)
    assert not torch.allclose(_real(plain), _real(want), atol=1e-3)  # the adapters matter
