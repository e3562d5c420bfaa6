"""Classification metrics on tensors: accuracy, macro-F1 and the confusion matrix.

All three read the same inputs the same way: ``[N]`` integer class ids or ``[N, C]`` float
scores (argmax taken; NaN or +inf scores are refused, since their argmax means nothing), and ``[N]``
integer labels where ``-100`` (the losses' ignore index) marks a position no metric counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fnllm import _checks
from fnllm._checks import IGNORE_INDEX

__all__ = ["accuracy", "confusion_matrix", "macro_f1"]


def confusion_matrix(predictions: Any, labels: Any, n_classes: int | None = None) -> Tensor:
    """Counts ``[C, C]``: row = true class, column = predicted class (as scikit-learn).

    Example:
        >>> import torch
        >>> from fnllm.finetune import confusion_matrix
        >>> confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
        tensor([[2, 1],
                [0, 1]])

    Args:
        predictions: ``[N]`` predicted class ids (or ``[N, C]`` logits: argmax is taken).
        labels: ``[N]`` true class ids; ``-100`` marks a position that is not counted.
        n_classes: ``C``; default ``max(id) + 1``.

    Returns:
        An int64 ``[C, C]`` tensor.

    Raises:
        ValueError: shapes differ, NaN or +inf scores, or an id is negative (other than a -100
            label) or ``>= n_classes``.
        TypeError: a bool, string or other non-numeric input; ``n_classes`` not an int.
    """
    pred, true = _check(predictions, labels, "confusion_matrix")
    if n_classes is not None:
        n_classes = _checks.check_int("confusion_matrix: n_classes", n_classes, low=1)
    c = n_classes if n_classes is not None else max(int(pred.max()), int(true.max()), -1) + 1
    if pred.numel() and (
        int(min(pred.min(), true.min())) < 0 or int(max(pred.max(), true.max())) >= c
    ):
        raise ValueError(f"confusion_matrix: class ids must be in [0, {c})")
    return torch.bincount(true * c + pred, minlength=c * c).reshape(c, c)


def accuracy(predictions: Any, labels: Any) -> float:
    """The fraction of correct predictions.

    Example:
        >>> import torch
        >>> from fnllm.finetune import accuracy
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5

    Args:
        predictions: ``[N]`` class ids or ``[N, C]`` logits.
        labels: ``[N]`` true class ids; ``-100`` marks a position that is not counted.

    Returns:
        A float in ``[0, 1]`` (``nan`` for no counted examples).

    Raises:
        ValueError: shapes differ, NaN or +inf scores, a negative class id other than a -100 label,
            or a label with no column in ``[N, C]`` scores.
        TypeError: a bool, string or other non-numeric input.
    """
    pred, true = _check(predictions, labels, "accuracy")
    return float((pred == true).double().mean()) if true.numel() else float("nan")


def macro_f1(predictions: Any, labels: Any) -> float:
    """The unweighted mean of per-class F1 over classes seen in labels or predictions.

    Matches ``sklearn.metrics.f1_score(average="macro")`` (a class with no true and no
    predicted example is left out; an undefined F1 counts as 0).

    Example:
        >>> import torch
        >>> from fnllm.finetune import macro_f1
        >>> round(macro_f1(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])), 4)
        0.7333

    Args:
        predictions: ``[N]`` class ids or ``[N, C]`` logits.
        labels: ``[N]`` true class ids; ``-100`` marks a position that is not counted.

    Returns:
        The macro-averaged F1 (``nan`` for no counted examples).

    Raises:
        ValueError: shapes differ, NaN or +inf scores, a negative class id other than a -100 label,
            or a label with no column in ``[N, C]`` scores.
        TypeError: a bool, string or other non-numeric input.
    """
    pred, true = _check(predictions, labels, "macro_f1")
    if not true.numel():
        return float("nan")
    cm = confusion_matrix(pred, true).double()
    tp = cm.diagonal()
    support = cm.sum(1) + cm.sum(0)
    seen = support > 0
    if not bool(seen.any()):
        return float("nan")
    f1 = torch.where(support > 0, 2 * tp / support.clamp(min=1), torch.zeros_like(tp))
    return float(f1[seen].mean())


def _check(predictions: Any, labels: Any, where: str) -> tuple[Tensor, Tensor]:
    """``(predicted ids, labels)`` as int64 CPU ``[N]``, without the ignored positions."""
    pred = _as_tensor(f"{where}: predictions", predictions)
    true = _as_tensor(f"{where}: labels", labels)
    n_scores = None
    if pred.is_floating_point():
        if pred.ndim != 2:
            raise ValueError(
                f"{where}: predictions: float scores must be [N, C], got {tuple(pred.shape)}"
            )
        nan = (torch.isnan(pred) | (pred == float("inf"))).any(-1)
        if bool(nan.any()):
            row = int(nan.nonzero()[0])
            what = "NaN" if bool(torch.isnan(pred[row]).any()) else "+inf"
            raise ValueError(
                f"{where}: predictions: {what} scores in row {row} (of {pred.shape[0]}): their "
                "argmax would count as a prediction of class 0"
            )
        n_scores = pred.shape[-1]
        pred = pred.argmax(-1)
    if true.is_floating_point() or pred.shape != true.shape or true.ndim != 1:
        raise ValueError(
            f"predictions {tuple(pred.shape)} and labels {tuple(true.shape)} {true.dtype}: "
            "expected [N] integer class ids each"
        )
    pred, true = pred.long().cpu(), true.long().cpu()
    keep = true != IGNORE_INDEX
    if not bool(keep.all()):
        pred, true = pred[keep], true[keep]
    for name, ids in (("labels", true), ("predictions", pred)):
        if ids.numel() and int(ids.min()) < 0:
            i = int((ids < 0).nonzero()[0])
            raise ValueError(
                f"{where}: {name}: class id {int(ids[i])} < 0 at {i} (only labels may be "
                f"{IGNORE_INDEX}, the ignore index)"
            )
    if n_scores is not None and true.numel() and int(true.max()) >= n_scores:
        i = int((true >= n_scores).nonzero()[0])
        raise ValueError(
            f"{where}: labels: class id {int(true[i])} at {i} (after dropping ignored labels) "
            f"has no column in the [N, {n_scores}] scores: no prediction could ever match it"
        )
    return pred, true


def _as_tensor(name: str, x: Any) -> Tensor:
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise TypeError(f"{name}: expected a tensor or a list of class ids, got {type(x).__name__}")
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name}: cannot read {type(x).__name__} as a tensor ({err})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name}: expected class ids or float scores, got {t.dtype}")
    return t
