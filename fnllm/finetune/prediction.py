"""Batched prediction over labelled batches, with the rows put back in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Predictions", "predict"]


class Predictions(NamedTuple):
    """What :func:`predict` returns: row ``i`` is input example ``i``.

    Example:
        >>> import torch
        >>> p = Predictions(torch.zeros(2, 3), torch.tensor([1, 0]))
        >>> p.logits.shape, p.labels
        (torch.Size([2, 3]), tensor([1, 0]))

    Args:
        logits: ``[N, C]`` float logits.
        labels: ``[N]`` labels, or ``None`` when the batches carry none.
    """

    logits: Tensor
    labels: Tensor | None


def predict(
    model: Any,
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    forward: Callable[[Any, Mapping[str, Any]], Tensor] | None = None,
) -> Predictions:
    """Logits (and labels) of every example, in input order, without gradients or dropout.

    Batches may come in any order and hold rows of any lengths (the shuffled, length-bucketed
    batches of :func:`fnllm.data.length_batches` and :func:`fnllm.data.epochs`): each batch's
    ``index`` says which input rows it holds, and row ``index[j]`` of the result is its row
    ``j``. The indices of all batches must cover ``0 .. N-1`` once each. Without ``index``
    fields the rows stay in the order of the batches.

    Example:
        >>> import torch
        >>> from fnllm import data, finetune, models, random
        >>> clf = finetune.Classifier(models.GPT(vocab_size=50, n_layer=1, n_head=2, d_model=8,
        ...                                      max_len=8), n_classes=2, pooling="last")
        >>> params = clf.init(random.key(0))
        >>> ids = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
        >>> batches = data.length_batches(ids, torch.tensor([0, 1, 1, 0]), 2, key=random.key(1))
        >>> out = finetune.predict(clf, params, batches)
        >>> out.logits.shape, out.labels
        (torch.Size([4, 2]), tensor([0, 1, 1, 0]))
        >>> alone = clf.apply(params, torch.tensor([ids[3]]))
        >>> torch.allclose(out.logits[3], alone[0], atol=1e-6)
        True

    Args:
        model: a classifier with ``apply(params, input_ids, attention_mask)`` (such as
            :class:`~fnllm.finetune.Classifier`); unused when ``forward`` is given.
        params: its parameters.
        batches: dicts with ``input_ids`` (and ``attention_mask``), or whatever ``forward``
            reads; optional ``labels`` and ``index``.
        forward: ``forward(params, batch) -> [B, C] logits`` instead of ``model.apply`` (e.g.
            a forward that starts from cached hidden states).

    Returns:
        :class:`Predictions` ``(logits [N, C], labels [N] or None)``.

    Raises:
        TypeError: a batch that is not a dict, no ``input_ids`` for ``model.apply``, logits or
            ``index`` that are not tensors.
        ValueError: no batches; indices that repeat, skip a row or disagree with the batch
            size; labels in some batches only; logits of differing widths; NaN logits
            (batch and row named).
    """
    if forward is None:
        if not callable(getattr(model, "apply", None)):
            raise TypeError(
                f"predict: model must have apply(params, input_ids, attention_mask), got "
                f"{type(model).__name__}; or pass forward="
            )
        forward = _apply(model)
    if isinstance(batches, (Mapping, Tensor, str)):
        raise TypeError(
            f"predict: batches must be an iterable of batches, got one {type(batches).__name__}"
            " (wrap it: [batch])"
        )
    logits, labels, index = [], [], []
    with torch.no_grad():
        for n, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise TypeError(f"predict: batch {n} is a {type(batch).__name__}, not a dict")
            out = forward(params, batch)
            if not isinstance(out, Tensor) or out.ndim != 2:
                raise TypeError(
                    f"predict: batch {n}: the forward must give [B, C] logits, got {_describe(out)}"
                )
            nan = torch.isnan(out).any(-1)
            if bool(nan.any()):
                raise ValueError(
                    f"predict: batch {n} row {int(nan.nonzero()[0])}: NaN logits (do the params "
                    "hold NaN or inf?)"
                )
            logits.append(out)
            labels.append(batch.get("labels"))
            index.append(_index(batch, n, out.shape[0]))
    if not logits:
        raise ValueError("predict: no batches")
    widths = {x.shape[1] for x in logits}
    if len(widths) > 1:
        raise ValueError(f"predict: batches gave logits of different widths {sorted(widths)}")
    have = [x is not None for x in labels]
    if any(have) and not all(have):
        raise ValueError(f"predict: batch {have.index(False)} has no labels, others do")
    all_logits = torch.cat(logits)
    order = _order(index, all_logits.shape[0])
    all_labels = torch.cat([torch.as_tensor(x) for x in labels]) if all(have) else None
    if order is None:
        return Predictions(all_logits, all_labels)
    return Predictions(all_logits[order], None if all_labels is None else all_labels[order])


def _apply(model: Any) -> Callable[[Any, Mapping[str, Any]], Tensor]:
    def forward(params: Any, batch: Mapping[str, Any]) -> Tensor:
        ids = batch.get("input_ids", batch.get("tokens"))
        if ids is None:
            raise TypeError(f"predict: a batch needs input_ids, got keys {sorted(batch)}")
        return model.apply(params, ids, batch.get("attention_mask"))

    return forward


def _index(batch: Mapping[str, Any], n: int, rows: int) -> Tensor | None:
    index = batch.get("index")
    if index is None:
        return None
    if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point():
        raise TypeError(f"predict: batch {n}: index must be a [B] integer tensor, got {index!r}")
    if index.numel() != rows:
        raise ValueError(f"predict: batch {n}: {index.numel()} indices for {rows} rows")
    return index


def _order(index: list[Tensor | None], total: int) -> Tensor | None:
    """The permutation that puts the concatenated rows back in input order."""
    have = [i is not None for i in index]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"predict: batch {have.index(False)} has no index, others do")
    flat = torch.cat([i for i in index if i is not None]).long()
    counts = torch.bincount(flat.clamp(min=0), minlength=total)
    if (flat < 0).any() or flat.max() >= total or (counts != 1).any():
        repeated = (counts > 1).nonzero()[:, 0].tolist()[:5]
        missing = (counts == 0).nonzero()[:, 0].tolist()[:5]
        raise ValueError(
            f"predict: the batches' index fields must cover rows 0..{total - 1} once each "
            f"(repeated {repeated}, missing {missing}, range {int(flat.min())}.."
            f"{int(flat.max())})"
        )
    return torch.argsort(flat)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
