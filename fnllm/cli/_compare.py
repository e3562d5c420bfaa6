"""The engine of ``fnllm demo``: one pretrained model, one data set, every way of adapting it.

Frozen blocks below the lowest trainable one are a fixed function of the input (no dropout),
so :func:`frozen_pass` runs them once per example and keeps the hidden states at every layer
a strategy resumes from; ``head``, ``last:N`` and the feature-based probes all reuse that pass,
across epochs and across strategies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fnllm import distributed, losses, optim, train, tree
from fnllm import random as jr
from fnllm.finetune import (
    Classifier,
    accuracy,
    boosting_probe,
    frozen_prefix,
    linear_probe,
    lora,
    macro_f1,
    strategy,
)

PROBES = ("features+logreg", "features+boosting")
# Adam learning rates per strategy (peak of a warm-up + cosine schedule).
LEARNING_RATES = {"head": 1e-2, "bitfit": 2e-3, "lora": 2e-3, "full": 1e-4}
LAST_N_LR = 1e-4
# The fresh head of ``last:N`` trains at its own rate (the ``head`` row's), not the blocks' small
# one: one epoch at 1e-4 leaves a randomly initialised head underfit.
HEAD_LR = 1e-2


@dataclass
class Row:
    """One line of the table."""

    name: str
    trainable: int
    epochs: int
    reused: str
    seconds: float
    val_acc: float
    val_f1: float
    test_acc: float
    test_f1: float
    losses: list[float] = field(default_factory=list)
    steps_per_epoch: int = 1


@dataclass
class Setup:
    """What all runs share: the model, its pretrained params, the batches and the cache."""

    model: Classifier
    params: Any
    batches: dict[str, list[dict[str, torch.Tensor]]]
    cache: dict[int, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    cache_seconds: float = 0.0


def resume_layer(setup: Setup, name: str, rank: int) -> int:
    """The layer a strategy's forward can start at (its frozen bottom blocks)."""
    if name in PROBES:
        return setup.model.n_layer
    params = _with_adapters(setup, name, rank)
    return frozen_prefix(setup.model, params, strategy(name, setup.model))


def frozen_pass(setup: Setup, layers: set[int], progress: bool) -> None:
    """Run the frozen blocks once per example, keeping the hidden states at ``layers``."""
    from tqdm.auto import tqdm

    layers = {k for k in layers if k > 0}
    if not layers:
        return
    model, params = setup.model, setup.params
    order = sorted(layers)
    start = time.perf_counter()
    total = sum(len(b) for b in setup.batches.values())
    bar = tqdm(total=total, desc=f"frozen pass (layers {order})", disable=not progress)
    with torch.no_grad():
        for split, batches in setup.batches.items():
            for b in batches:
                mask = b["attention_mask"]
                h = model.prefix(params, b["input_ids"], order[0], mask)
                prev = order[0]
                for k in order:
                    h = model.base.apply_blocks(
                        params["base"], h, attention_mask=mask, start=prev, stop=k
                    )
                    prev = k
                    setup.cache.setdefault(k, {}).setdefault(split, []).append(h)
                bar.update(1)
    bar.close()
    setup.cache_seconds = time.perf_counter() - start


def run_probe(setup: Setup, name: str, quick: bool) -> Row:
    """A feature-based row: pooled final hidden states, then a scikit-learn/XGBoost probe."""
    start = time.perf_counter()
    n = setup.model.n_layer
    feats, labels = {}, {}
    with torch.no_grad():
        for split, batches in setup.batches.items():
            hidden = setup.cache[n][split]
            feats[split] = torch.cat(
                [
                    setup.model.features(setup.params, h, n, b["attention_mask"])
                    for h, b in zip(hidden, batches)
                ]
            )
            labels[split] = torch.cat([b["labels"] for b in batches])
    if name == "features+logreg":
        probe = linear_probe(feats["train"], labels["train"])
        size = int(probe[-1].coef_.size + probe[-1].intercept_.size)
    else:
        probe = boosting_probe(feats["train"], labels["train"], n_estimators=20 if quick else 200)
        size = _tree_nodes(probe)
    scores = {}
    for split in ("val", "test"):
        pred = torch.as_tensor(probe.predict(feats[split].numpy())).long()
        scores[split] = (accuracy(pred, labels[split]), macro_f1(pred, labels[split]))
    seconds = time.perf_counter() - start
    return Row(name, size, 1, f"{n}/{n} blocks", seconds, *scores["val"], *scores["test"])


def run_strategy(
    setup: Setup, name: str, epochs: int, rank: int, key: torch.Tensor, progress: bool
) -> Row:
    """Train one strategy with AdamW and score it on validation and test."""
    model = setup.model
    params = _with_adapters(setup, name, rank)
    filt = strategy(name, model)
    k = frozen_prefix(model, params, filt)
    trainable, frozen = tree.partition(params, filt)
    lr = LEARNING_RATES.get(name, LAST_N_LR)
    head_lr = HEAD_LR if name.startswith("last:") else None
    train_batches = setup.batches["train"]
    n_batches = len(train_batches)
    steps = epochs * n_batches
    k_order, k_fit = jr.split(key)
    orders: dict[int, list[int]] = {}

    def inputs(split: str, j: int) -> torch.Tensor:
        return setup.cache[k][split][j] if k else setup.batches[split][j]["input_ids"]

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, n_batches)
        if epoch not in orders:
            orders[epoch] = jr.permutation(jr.fold_in(k_order, epoch), n_batches).tolist()
        j = orders[epoch][i]
        b = train_batches[j]
        return {"x": inputs("train", j), "mask": b["attention_mask"], "labels": b["labels"]}

    def logits_of(p: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.apply_from(p, x, k, mask) if k else model.apply(p, x, mask)

    def loss_fn(tr: Any, fr: Any, batch: dict[str, torch.Tensor], key: Any) -> torch.Tensor:
        logits = logits_of(tree.combine(tr, fr), batch["x"], batch["mask"])
        return losses.classification(logits, batch["labels"])

    start = time.perf_counter()
    warmup = max(1, steps // 10)
    opt = optim.adamw(optim.warmup_cosine(lr, warmup, steps + 1), weight_decay=0.01)
    if head_lr is not None:
        head_opt = optim.adamw(optim.warmup_cosine(head_lr, warmup, steps + 1), weight_decay=0.01)
        opt = per_part(_is_head, head_opt, opt)
    if distributed.world_size() > 1:  # under torchrun: each rank trains on its rows of a batch
        result = distributed.fit(
            loss_fn, opt, trainable, frozen, batch_at, key=k_fit, steps=steps, progress=progress
        )
    else:
        result = train.fit(
            loss_fn,
            opt,
            trainable,
            frozen,
            batch_at,
            key=k_fit,
            steps=steps,
            compile=False,
            progress=progress,
            tokens_per_batch=lambda b: int(b["mask"].sum()),
        )
    trained = tree.combine(result.trainable, frozen)
    scores = {s: (float("nan"), float("nan")) for s in ("val", "test")}
    with torch.no_grad():
        for split in ("val", "test") if distributed.is_main() else ():  # only rank 0 reports
            batches = setup.batches[split]
            logits = torch.cat(
                [
                    logits_of(trained, inputs(split, j), b["attention_mask"])
                    for j, b in enumerate(batches)
                ]
            )
            labels = torch.cat([b["labels"] for b in batches])
            scores[split] = (accuracy(logits, labels), macro_f1(logits, labels))
    seconds = time.perf_counter() - start
    n = model.n_layer
    reused = f"{k}/{n} blocks" if k else "-"
    return Row(
        name,
        tree.count(trainable),
        epochs,
        reused,
        seconds,
        *scores["val"],
        *scores["test"],
        losses=[h["loss"] for h in result.history],
        steps_per_epoch=n_batches,
    )


def per_part(
    selected: Any, first: optim.GradientTransformation, rest: optim.GradientTransformation
) -> optim.GradientTransformation:
    """Two optimizers over a partition: ``first`` for the leaves ``selected`` picks, ``rest``
    for the others (optax's ``multi_transform`` with two labels)."""

    def split(t: Any) -> tuple[Any, Any]:
        return tree.partition(t, selected)

    def init(params: Any) -> dict[str, Any]:
        a, b = split(params)
        return {"first": first.init(a), "rest": rest.init(b)}

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        ga, gb = split(grads)
        pa, pb = split(params) if params is not None else (None, None)
        ua, sa = first.update(ga, state["first"], pa)
        ub, sb = rest.update(gb, state["rest"], pb)
        return tree.combine(ua, ub), {"first": sa, "rest": sb}

    fused_a, fused_b = first.fused_step, rest.fused_step
    if fused_a is None or fused_b is None:
        return optim.GradientTransformation(init, update)

    def fused_step(grads: Any, state: Any, params: Any, donate: bool) -> tuple[Any, Any]:
        (ga, gb), (pa, pb) = split(grads), split(params)
        na, sa = fused_a(ga, state["first"], pa, donate)
        nb, sb = fused_b(gb, state["rest"], pb, donate)
        return tree.combine(na, nb), {"first": sa, "rest": sb}

    return optim.GradientTransformation(init, update, fused_step)


def _is_head(path: str, leaf: Any) -> bool:
    return path == "head" or path.startswith("head.")


def _with_adapters(setup: Setup, name: str, rank: int) -> Any:
    if name != "lora":
        return setup.params
    return lora.init(jr.key(17), setup.params, rank=rank, alpha=2 * rank)


def _tree_nodes(probe: Any) -> int:
    booster = getattr(probe, "get_booster", None)
    if booster is not None:
        return sum(d.count("\n") for d in booster().get_dump())
    # scikit-learn's HistGradientBoostingClassifier: an upper bound (full trees)
    return int(probe.n_iter_ * (2 * (probe.max_leaf_nodes or 31) - 1))
