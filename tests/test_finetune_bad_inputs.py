"""fnllm.finetune (strategies, features, predict, the classifier) on bad inputs: each case
raises the right type naming the culprit, or gives its documented result."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt

from fnllm import random as jr
from fnllm import tree
from fnllm.finetune import Classifier, extract_features, predict, strategy

CLF = Classifier(tiny_gpt(), 2, "last")
PARAMS = CLF.init(jr.key(0))
TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _nan(params):
    return tree.map(lambda x: x * float("nan"), params)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("last:1.5", ValueError, r"'last:1.5': N must be an integer"),  # not read as a glob
        ("last:", ValueError, r"'last:': N must be an integer"),
        (3, TypeError, "name must be a strategy name or a list of globs, got 3"),
        (None, TypeError, "name must be a strategy name or a list of globs, got None"),
        (["head", ""], ValueError, "a glob list must be non-empty strings"),
    ],
)
def test_strategy_names_a_bad_name(name, error, match):
    with pytest.raises(error, match=match):
        strategy(name, CLF)


@pytest.mark.parametrize("globs", [["zzz.*"], "base.blocks.9.*", ["head", "base.nope"]])
def test_globs_that_select_nothing_are_refused_when_applied(globs):
    bad = globs if isinstance(globs, str) else next(g for g in globs if g != "head")
    with pytest.raises(ValueError, match=f"glob '{bad}' matches no leaf of the tree"):
        tree.partition(PARAMS, strategy(globs, CLF))
    trainable, _ = tree.partition(PARAMS, strategy(["head", "base.ln_f"], CLF))
    assert tree.paths(trainable) == ["base.ln_f.bias", "base.ln_f.weight", "head.bias",
                                     "head.weight"]  # fmt: skip


def test_extract_features_refuses_nan_features_naming_batch_and_row():
    bert = tiny_bert()
    params = bert.init(jr.key(1))
    with pytest.raises(ValueError, match=r"extract_features: batch 0 row 0: .*NaN or inf"):
        extract_features(bert, _nan(params), [TOKENS], progress=False)
    good = extract_features(bert, params, [TOKENS], progress=False)
    assert good.shape == (2, 16) and bool(torch.isfinite(good).all())


def test_predict_refuses_one_batch_and_nan_logits():
    with pytest.raises(TypeError, match=r"got one dict \(wrap it: \[batch\]\)"):
        predict(CLF, PARAMS, {"input_ids": TOKENS})
    with pytest.raises(ValueError, match=r"predict: batch 0 row 0: NaN logits"):
        predict(CLF, _nan(PARAMS), [{"input_ids": TOKENS}])

    def forward(params, batch):
        out = CLF.apply(params, batch["input_ids"])
        return out * torch.tensor([[1.0], [float("nan")]]) if batch.get("bad") else out

    with pytest.raises(ValueError, match=r"predict: batch 1 row 1: NaN logits"):
        predict(CLF, PARAMS, [{"input_ids": TOKENS}, {"input_ids": TOKENS, "bad": 1}],
                forward=forward)  # fmt: skip


def test_a_mask_row_without_a_real_token_is_refused_eagerly():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    for pooling in ("last", "mean"):
        clf = Classifier(tiny_gpt(), 2, pooling)
        with pytest.raises(ValueError, match=r"attention_mask: row 1 has no real token"):
            clf.apply(clf.init(jr.key(0)), TOKENS, mask)
    # under vmap the values are not read (no host sync in transformed code)
    out = torch.func.vmap(lambda t, m: CLF.apply(PARAMS, t[None], m[None])[0])(
        TOKENS, torch.ones(2, 4, dtype=torch.long)
    )
    assert out.shape == (2, 2)
