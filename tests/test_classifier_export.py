"""io.to_hf on a finetune.Classifier: transformers loads the folder with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from _tiny import tiny_bert, tiny_gpt
from safetensors import safe_open
from safetensors.torch import load_file

from fnllm import io, tree
from fnllm import random as jr
from fnllm.finetune import Classifier, lora

PAD = 39  # GPT-2 export default pad_token_id: vocab_size - 1
TOKENS = jr.randint(jr.key(7), (3, 6), 1, 39)
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])


def _random(params, key, std=0.2):
    """Every leaf random at a large std (bugs hide under 1e-4 at the default init)."""
    flat = tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        flat[p] = jr.normal(jr.fold_in(key, i), tuple(v.shape)) * std + (
            1.0 if p.endswith("weight") and v.ndim == 1 else 0.0
        )
    return tree.unflatten(flat)


def _logits(hf, tokens, mask):
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask).logits


@pytest.mark.parametrize("heads", [False, True], ids=["bare", "with-pretraining-heads"])
def test_bert_cls_exports_as_bert_for_sequence_classification(heads, tmp_path):
    clf = Classifier(tiny_bert(mlm_head=heads, pair_head=heads), 3, "cls")
    params = _random(clf.init(jr.key(0)), jr.key(1))
    out = io.to_hf(clf, params, tmp_path, classes=["neg", "neu", "pos"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    hf, info = transformers.BertForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing or unexpected
    want = clf.apply(params, TOKENS, MASK)
    torch.testing.assert_close(_logits(hf.eval(), TOKENS, MASK), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("untied", [False, True])
def test_gpt_last_exports_as_gpt2_for_sequence_classification(untied, tmp_path):
    clf = Classifier(tiny_gpt(tie_head=not untied), 2, "last")
    params = _random(clf.init(jr.key(0)), jr.key(2))
    assert bool((params["head"]["bias"] != 0).all())  # folded into ln_f.bias
    out = io.to_hf(clf, params, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    assert cfg["pad_token_id"] == PAD
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info.values()), info
    padded = torch.where(MASK.bool(), TOKENS, torch.full_like(TOKENS, PAD))  # right padding
    want = clf.apply(params, padded, MASK)
    torch.testing.assert_close(_logits(hf.eval(), padded, MASK), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "clf",
    [
        Classifier(tiny_bert(mlm_head=False, pair_head=False), 3, "mean"),
        Classifier(tiny_bert(pooler=False, mlm_head=False, pair_head=False), 2, "cls"),
        Classifier(tiny_gpt(), 2, "mean"),
    ],
    ids=["bert-mean", "bert-cls-no-pooler", "gpt-mean"],
)
def test_a_pooling_without_a_class_exports_encoder_and_head_file(clf, tmp_path):
    params = _random(clf.init(jr.key(0)), jr.key(3))
    with pytest.raises(ValueError, match="has no transformers class"):
        io.to_hf(clf, params, tmp_path / "x", architecture="BertForSequenceClassification")
    out = io.to_hf(clf, params, tmp_path / "y", classes=[f"c{i}" for i in range(clf.n_classes)])
    head = load_file(out / io.hf.HEAD_FILE)
    with safe_open(out / io.hf.HEAD_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["pooling"] == clf.pooling and json.loads(meta["classes"])[0] == "c0"
    encoder = transformers.AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = encoder(input_ids=TOKENS, attention_mask=MASK).last_hidden_state
    if clf.pooling == "mean":
        m = MASK.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
    else:
        pooled = hidden[:, 0]
    got = pooled @ head["weight"].T + head["bias"]
    torch.testing.assert_close(got, clf.apply(params, TOKENS, MASK), atol=1e-5, rtol=1e-5)


def test_a_merged_lora_classifier_exports_and_an_unmerged_one_is_refused(tmp_path):
    clf = Classifier(tiny_bert(mlm_head=False, pair_head=False), 2, "cls")
    lp = lora.init(jr.key(1), _random(clf.init(jr.key(0)), jr.key(4)), rank=2)
    lp = tree.map(lambda p, v: v + 0.3 if p.endswith("lora_b") else v, lp, with_path=True)
    with pytest.raises(ValueError, match=r"call lora\.merge first"):
        io.to_hf(clf, lp, tmp_path)
    with pytest.raises(ValueError, match=r"call lora\.merge first"):
        io.to_hf(clf.base, lp["base"], tmp_path)
    assert not (tmp_path / "config.json").exists()
    out = io.to_hf(clf, lora.merge(lp), tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    want = clf.apply(lp, TOKENS, MASK)
    torch.testing.assert_close(_logits(hf, TOKENS, MASK), want, atol=1e-5, rtol=1e-5)


def test_bad_classifier_exports_are_named(tmp_path):
    clf = Classifier(tiny_gpt(), 2, "last")
    params = clf.init(jr.key(0))
    with pytest.raises(ValueError, match="exports as 'GPT2ForSequenceClassification'"):
        io.to_hf(clf, params, tmp_path, architecture="GPT2LMHeadModel")
    with pytest.raises(ValueError, match="classes must be 2 strings"):
        io.to_hf(clf, params, tmp_path, classes=["a"])
    with pytest.raises(KeyError, match=r"keys \['base', 'head'\]"):
        io.to_hf(clf, params["base"], tmp_path)
    one = Classifier(tiny_gpt(), 2, "last")
    flat = tree.flatten(one.init(jr.key(0)))
    flat["head.weight"] = torch.zeros(2, 16)  # rank 0: a bias cannot be folded
    flat["head.bias"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"cannot be folded into ln_f\.bias"):
        io.to_hf(one, tree.unflatten(flat), tmp_path)
