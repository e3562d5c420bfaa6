"""fnllm.finetune features, probes and metrics, against transformers and scikit-learn."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnllm import io
from fnllm import random as jr
from fnllm.finetune import (
    Classifier,
    accuracy,
    boosting_probe,
    confusion_matrix,
    extract_features,
    linear_probe,
    macro_f1,
)


def _minilm():
    try:
        return io.pretrained_dir("all-MiniLM-L6-v2")
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))


def test_features_equal_transformers_automodel_with_mean_pooling_on_minilm():
    transformers = pytest.importorskip("transformers")
    from fnllm import data

    directory = _minilm()
    bert, params = io.from_hf(directory)
    tok = data.load_tokenizer(directory)
    texts = ["A gripping, funny film.", "Dull.", "It never quite finds its footing, sadly."]
    ids, lengths = data.pad_sequences([tok.encode(t).ids for t in texts], pad_id=0)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, (ids[2:], mask[2:])]
    got = extract_features(bert, params, batches, progress=False)
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    want = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_classifier_features_use_its_pooling():
    from fnllm.models import GPT

    clf = Classifier(GPT(vocab_size=30, n_layer=1, n_head=2, d_model=8, max_len=8), 2, "last")
    params = clf.init(jr.key(0))
    ids = jr.randint(jr.key(1), (3, 5), 1, 30)
    feats = extract_features(clf, params, [ids], progress=False)
    logits = clf.apply(params, ids)
    torch.testing.assert_close(feats @ params["head"]["weight"].T + params["head"]["bias"], logits)


@pytest.mark.parametrize("probe", ["linear", "xgboost", "sklearn"])
def test_probes_separate_separable_features_perfectly(probe):
    x = jr.normal(jr.key(0), (200, 6))
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()
    x = x + 4.0 * y[:, None].float() * torch.tensor([1.0, 0, 0, 0, 0, 0])  # a clear margin
    if probe == "linear":
        model = linear_probe(x, y)
    else:
        if probe == "xgboost":
            pytest.importorskip("xgboost")
        model = boosting_probe(x, y, backend=probe)
    assert accuracy(torch.as_tensor(model.predict(x.numpy())), y) == 1.0


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_metrics_match_scikit_learn(pairs):
    metrics = pytest.importorskip("sklearn.metrics")
    pred = torch.tensor([p for p, _ in pairs])
    true = torch.tensor([t for _, t in pairs])
    assert accuracy(pred, true) == pytest.approx(metrics.accuracy_score(true, pred))
    assert macro_f1(pred, true) == pytest.approx(
        metrics.f1_score(true, pred, average="macro", zero_division=0)
    )
    assert (
        confusion_matrix(pred, true, 4).tolist()
        == metrics.confusion_matrix(true, pred, labels=[0, 1, 2, 3]).tolist()
    )


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="expected \\[N\\] integer class ids"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\)"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="Classifier, GPT or BERT"):
        extract_features("bert", {}, [], progress=False)
    with pytest.raises(ValueError, match="backend"):
        boosting_probe(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), backend="lightgbm")
    with pytest.raises(ValueError, match="features \\[N, D\\]"):
        linear_probe(torch.zeros(4), torch.tensor([0, 1, 0, 1]))
