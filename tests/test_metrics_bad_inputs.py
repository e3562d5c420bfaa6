"""fnllm.finetune metrics: -100 ignored alike, NaN scores and bool/str inputs refused."""

from __future__ import annotations

import pytest
import torch

from fnllm.finetune import accuracy, confusion_matrix, macro_f1


def test_metrics_agree_on_ignored_labels():
    pred = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([0, -100, 1, -100])
    assert accuracy(pred, labels) == 1.0
    assert macro_f1(pred, labels) == 1.0
    assert confusion_matrix(pred, labels).tolist() == [[1, 0], [0, 1]]
    assert accuracy(pred, torch.full((4,), -100)) != accuracy(pred, torch.full((4,), -100))  # nan


@pytest.mark.parametrize("metric", [accuracy, macro_f1, confusion_matrix])
@pytest.mark.parametrize(
    ("pred", "labels", "error", "match"),
    [
        (
            torch.full((3, 2), float("nan")),
            torch.tensor([0, 1, 0]),
            ValueError,
            "NaN scores in row 0",
        ),
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]),
            torch.tensor([1, 0]),
            ValueError,
            "row 1",
        ),
        (torch.tensor([True, False]), torch.tensor([1, 0]), TypeError, "predictions: .*torch.bool"),
        (torch.tensor([1, 0]), torch.tensor([True, False]), TypeError, "labels: .*torch.bool"),
        ("10", torch.tensor([1, 0]), TypeError, "predictions: expected a tensor"),
        (torch.tensor([1, 0]), None, TypeError, "labels: expected a tensor"),
        (torch.tensor([1, 0]), torch.tensor([1, -1]), ValueError, r"labels: class id -1 < 0 at 1"),
        (torch.tensor([-3, 0]), torch.tensor([1, 0]), ValueError, r"predictions: class id -3"),
        (torch.tensor([1, 0]), torch.tensor([1.0, 0.0]), ValueError, "integer class ids"),
    ],
)
def test_metrics_refuse_inputs_that_cannot_give_a_score(metric, pred, labels, error, match):
    with pytest.raises(error, match=match):
        metric(pred, labels)


def test_metrics_accept_lists_and_numpy():
    np = pytest.importorskip("numpy")
    assert accuracy([0, 1], np.array([0, 1])) == 1.0
    with pytest.raises(TypeError, match="n_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), n_classes=2.0)


@pytest.mark.parametrize("metric", [accuracy, macro_f1, confusion_matrix])
def test_labels_without_a_score_column_and_inf_scores_are_refused(metric):
    with pytest.raises(ValueError, match=r"labels: class id 5 at 1 .* no column in the \[N, 2\]"):
        metric(torch.zeros(2, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"predictions: \+inf scores in row 0"):
        metric(torch.tensor([[float("inf"), float("inf")], [0.0, 1.0]]), torch.tensor([0, 1]))
    # -inf marks a class that cannot be predicted: allowed, the argmax is still defined
    assert accuracy(torch.tensor([[-float("inf"), 0.0]]), torch.tensor([1])) == 1.0


def test_metrics_of_no_counted_example_are_nan_alike():
    for pred in (torch.tensor([], dtype=torch.long), torch.tensor([0, 1])):
        labels = torch.full(pred.shape, -100)
        a, f = accuracy(pred, labels), macro_f1(pred, labels)
        assert a != a and f != f  # nan, never an exception or 0
