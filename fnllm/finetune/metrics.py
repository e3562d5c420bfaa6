"""Classification metrics on tensors: accuracy, macro-F1 and the confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
        labels: ``[N]`` true class ids.
        n_classes: ``C``; default ``max(id) + 1``.

    Returns:
        An int64 ``[C, C]`` tensor.

    Raises:
        ValueError: shapes differ, or an id is negative or ``>= n_classes``.
    """
    pred, true = _check(predictions, labels)
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
        labels: ``[N]`` true class ids.

    Returns:
        A float in ``[0, 1]`` (``nan`` for no examples).
    """
    pred, true = _check(predictions, labels)
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
        labels: ``[N]`` true class ids.

    Returns:
        The macro-averaged F1.
    """
    cm = confusion_matrix(predictions, labels).double()
    tp = cm.diagonal()
    support = cm.sum(1) + cm.sum(0)
    seen = support > 0
    if not bool(seen.any()):
        return float("nan")
    f1 = torch.where(support > 0, 2 * tp / support.clamp(min=1), torch.zeros_like(tp))
    return float(f1[seen].mean())


def _check(predictions: Any, labels: Any) -> tuple[Tensor, Tensor]:
    pred = torch.as_tensor(predictions)
    true = torch.as_tensor(labels)
    if pred.is_floating_point():
        if pred.ndim != 2:
            raise ValueError(f"predictions: float scores must be [N, C], got {tuple(pred.shape)}")
        pred = pred.argmax(-1)
    if true.is_floating_point() or pred.shape != true.shape or true.ndim != 1:
        raise ValueError(
            f"predictions {tuple(pred.shape)} and labels {tuple(true.shape)} {true.dtype}: "
            "expected [N] integer class ids each"
        )
    return pred.long().cpu(), true.long().cpu()
