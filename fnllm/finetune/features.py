"""The feature-based way: a frozen model's pooled vectors, then a probe fitted on them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fnllm.finetune.classifier import Classifier, Pooling
from fnllm.models import ModelConfig

__all__ = ["boosting_probe", "extract_features", "linear_probe"]


def extract_features(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    pooling: Pooling | None = None,
    progress: bool = True,
) -> Tensor:
    """Pooled sentence vectors of a frozen model, batch by batch, without gradients.

    Example:
        >>> import torch
        >>> from fnllm import finetune, models, random
        >>> bert = models.BERT(vocab_size=50, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
        >>> params = bert.init(random.key(0))
        >>> batches = [{"input_ids": torch.tensor([[2, 5, 3], [2, 6, 0]]),
        ...             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}]
        >>> finetune.extract_features(bert, params, batches, progress=False).shape
        torch.Size([2, 8])

    Args:
        model: a :class:`Classifier` (its pooling, ``params`` its tree) or a bare model
            config (``params`` the model's tree).
        params: the parameters.
        batches: an iterable of dicts with ``"input_ids"`` (or ``"tokens"``) ``[B, T]`` and
            optionally ``"attention_mask"``, or of ``(ids, mask)`` pairs, or of id tensors.
        pooling: ``"mean"``, ``"cls"`` or ``"last"``; default the Classifier's, else the
            model's ``default_pooling`` (``"mean"`` for BERT, ``"last"`` for GPT).
        progress: show a tqdm progress bar.

    Returns:
        ``[N, D]`` float features, rows in the order of the batches.

    Raises:
        TypeError: ``model`` or a batch has the wrong type.
        ValueError: no batches; features that are NaN or inf (batch and row named).
    """
    if isinstance(model, Classifier):
        clf, tree_ = model, params
        if pooling is not None and pooling != model.pooling:
            clf = Classifier(model.base, model.n_classes, pooling)
    elif isinstance(model, ModelConfig):
        how = pooling or model.default_pooling
        clf, tree_ = Classifier(model, 1, how), {"base": params, "head": {}}
    else:
        raise TypeError(
            "extract_features: model must be a Classifier, GPT or BERT (or another fnllm model "
            f"config), got {type(model).__name__}"
        )
    if isinstance(batches, (dict, torch.Tensor, str)):
        raise TypeError(
            f"extract_features: batches must be an iterable of batches, got one "
            f"{type(batches).__name__} (wrap it: [batch])"
        )
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for i, batch in enumerate(
            tqdm(batches, desc="features", disable=not progress, leave=False)
        ):
            ids, mask = _ids_and_mask(batch)
            h = clf.prefix(tree_, ids, clf.n_layer, mask)
            feats = clf.features(tree_, h, clf.n_layer, mask)
            bad = ~torch.isfinite(feats).all(-1)
            if bool(bad.any()):
                raise ValueError(
                    f"extract_features: batch {i} row {int(bad.nonzero()[0])}: the features "
                    "hold NaN or inf (do the params hold NaN or inf?)"
                )
            out.append(feats)
    if not out:
        raise ValueError("extract_features: batches is empty")
    return torch.cat(out)


def linear_probe(features: Any, labels: Any, *, c: float = 1.0, max_iter: int = 2000) -> Any:
    """Fit a logistic-regression probe (scikit-learn) on standardised features.

    Example:
        >>> import torch
        >>> from fnllm.finetune import linear_probe
        >>> x = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.2]])
        >>> probe = linear_probe(x, torch.tensor([0, 0, 1, 1]))
        >>> probe.predict(x.numpy()).tolist()
        [0, 0, 1, 1]

    Args:
        features: ``[N, D]`` features (tensor or array).
        labels: ``[N]`` integer class ids.
        c: inverse regularisation strength.
        max_iter: solver iterations.

    Returns:
        The fitted scikit-learn pipeline (``predict``, ``predict_proba``, ``score``).

    Raises:
        ImportError: scikit-learn is not installed (``pip install fnllm[finetune]``).
    """
    LogisticRegression = _sklearn("sklearn.linear_model", "LogisticRegression")
    make_pipeline = _sklearn("sklearn.pipeline", "make_pipeline")
    StandardScaler = _sklearn("sklearn.preprocessing", "StandardScaler")
    x, y = _arrays(features, labels)
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter)).fit(x, y)


def boosting_probe(
    features: Any, labels: Any, *, backend: str = "auto", n_estimators: int = 200, seed: int = 0
) -> Any:
    """Fit a gradient-boosted-trees probe: XGBoost where installed, else scikit-learn's.

    Example:
        >>> import torch
        >>> from fnllm.finetune import boosting_probe
        >>> x = torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]] * 10)
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1] * 10)
        >>> probe = boosting_probe(x, y, backend="sklearn", n_estimators=10)
        >>> probe.predict(x.numpy())[:6].tolist()
        [0, 0, 0, 1, 1, 1]

    Args:
        features: ``[N, D]`` features.
        labels: ``[N]`` integer class ids.
        backend: ``"auto"``, ``"xgboost"`` or ``"sklearn"``.
        n_estimators: number of boosting rounds.
        seed: the model's random seed.

    Returns:
        The fitted classifier (``predict``).

    Raises:
        ValueError: an unknown backend.
        ImportError: the backend is not installed.
    """
    if backend not in ("auto", "xgboost", "sklearn"):
        raise ValueError(
            f"boosting_probe: backend must be auto, xgboost or sklearn, got {backend!r}"
        )
    x, y = _arrays(features, labels)
    if backend in ("auto", "xgboost"):
        try:
            from xgboost import XGBClassifier
        except ImportError:
            if backend == "xgboost":
                raise ImportError("boosting_probe: xgboost is not installed") from None
        else:
            model = XGBClassifier(
                n_estimators=n_estimators,
                max_depth=4,
                learning_rate=0.1,
                random_state=seed,
                n_jobs=1,
                tree_method="hist",
            )
            return model.fit(x, y)
    Hist = _sklearn("sklearn.ensemble", "HistGradientBoostingClassifier")
    return Hist(max_iter=n_estimators, random_state=seed).fit(x, y)


def _ids_and_mask(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids", batch.get("tokens"))
        if ids is None:
            raise TypeError(f"extract_features: a batch dict needs input_ids, got {sorted(batch)}")
        return ids, batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"extract_features: unsupported batch type {type(batch).__name__}")


def _arrays(features: Any, labels: Any) -> tuple[Any, Any]:
    import numpy as np

    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"probe: expected features [N, D] and labels [N], got {x.shape}, {y.shape}"
        )
    return x, y


def _sklearn(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise ImportError(
            f"{module}.{name} needs scikit-learn: pip install 'fnllm[finetune]'"
        ) from None
