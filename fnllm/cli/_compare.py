"""The engine of ``fnllm demo``: one pretrained model, one data set, every way of adapting it.

Frozen blocks below the lowest trainable one are a fixed function of the input (no dropout),
so :func:`frozen_pass` runs them once per example and keeps the hidden states at every layer
a strategy resumes from; ``head``, ``last:N`` and the feature-based probes all reuse that pass,
across epochs, seeds and strategies. A :class:`Recipe` says how the rows train: the demo's own
(:data:`DEFAULT`) or the common ``transformers`` one (:data:`REFERENCE`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fnllm import data, distributed, losses, optim, train, tree
from fnllm import random as jr
from fnllm.finetune import (
    Classifier,
    accuracy,
    boosting_probe,
    frozen_prefix,
    linear_probe,
    lora,
    macro_f1,
    predict,
    strategy,
)

PROBES = ("features+logreg", "features+boosting")


@dataclass(frozen=True)
class Recipe:
    """How the finetuning rows train: learning rates, schedule, dropout, epochs of ``head``."""

    name: str
    lrs: dict[str, float]  # per strategy name; "last:N" under the key "last"
    head_lr: float | None  # the fresh head's own rate in last:N rows (None: the blocks' rate)
    schedule: str  # "warmup_cosine" or "linear" (transformers' default: linear decay to 0)
    weight_decay: float
    dropout: bool  # the checkpoint's dropout while training (a key to every forward)
    head_epochs: int  # epochs of the head row, as a multiple of --epochs
    notes: tuple[str, ...]  # what the recipe changes from the reference, and why

    def lr(self, name: str) -> float:
        return self.lrs["last" if name.startswith("last:") else name]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": f"AdamW, weight decay {self.weight_decay}",
            "learning_rates": self.lrs,
            "last_n_head_learning_rate": self.head_lr,
            "schedule": self.schedule,
            "dropout": "from the checkpoint's config" if self.dropout else "off",
            "head_epochs": f"{self.head_epochs} x --epochs",
            "notes": list(self.notes),
        }


# The demo's own recipe: each row at the rate that suits it in one short epoch.
DEFAULT = Recipe(
    name="default",
    lrs={"head": 1e-2, "bitfit": 2e-3, "lora": 2e-3, "full": 1e-4, "last": 1e-4},
    head_lr=1e-2,
    schedule="warmup_cosine",
    weight_decay=0.01,
    dropout=False,
    head_epochs=10,
    notes=(
        "dropout off (the checkpoint says 0.1): frozen blocks are then a fixed function of "
        "the input, so the frozen pass is computed once and reused by head, last:N and the "
        "probes, across epochs and seeds; those rows train in a fraction of the time. "
        "--recipe reference keeps the checkpoint's dropout",
        "a learning rate per strategy (head 1e-2, bitfit and lora 2e-3, full and last:N "
        "1e-4): rows with few trainable parameters (a fresh head, biases, adapters) barely "
        "move in one epoch at the 5e-5 of the reference recipe",
        "last:N trains its fresh head at the head row's 1e-2 (a second optimizer over the "
        "partition): at 1e-4 a randomly initialised head is still underfit after one epoch",
        "head trains 10x --epochs: an epoch on cached features costs next to nothing",
        "warm-up (10% of steps) then cosine decay, AdamW weight decay 0.01",
    ),
)
# The common transformers recipe (Trainer defaults), row for row comparable with such a script.
REFERENCE = Recipe(
    name="reference",
    lrs={"head": 5e-5, "bitfit": 5e-5, "lora": 5e-5, "full": 5e-5, "last": 5e-5},
    head_lr=None,
    schedule="linear",
    weight_decay=0.0,
    dropout=True,
    head_epochs=1,
    notes=(
        "as a transformers script: one learning rate 5e-5 for every trainable leaf of every "
        "row, linear decay to 0 without warm-up, AdamW without weight decay, dropout from the "
        "checkpoint's config in every block (frozen ones too, as model.train() does), so "
        "training starts from the embeddings; evaluation reuses the frozen pass",
    ),
)
RECIPES = {"default": DEFAULT, "reference": REFERENCE}


@dataclass
class Run:
    """One seed of a finetuning row (or the one run of a probe)."""

    seconds: float
    val_acc: float
    val_f1: float
    test_acc: float
    test_f1: float
    losses: list[float] = field(default_factory=list)


@dataclass
class Row:
    """One line of the table: a strategy over its seeds (mean and sample std)."""

    name: str
    trainable: int
    epochs: int
    reused: str
    runs: list[Run]
    steps_per_epoch: int = 1

    @property
    def seeds(self) -> int:
        return len(self.runs)

    def mean(self, metric: str) -> float:
        values = [getattr(r, metric) for r in self.runs]
        return sum(values) / len(values)

    def std(self, metric: str) -> float:
        """The sample standard deviation over the seeds (0 for a single run)."""
        values = [getattr(r, metric) for r in self.runs]
        if len(values) < 2:
            return 0.0
        m = sum(values) / len(values)
        return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    def summary(self) -> dict[str, Any]:
        """The row as results.json stores it: means, spreads and every run."""
        out: dict[str, Any] = {
            "name": self.name,
            "trainable": self.trainable,
            "epochs": self.epochs,
            "seeds": self.seeds,
            "reused": self.reused,
            "seconds": self.mean("seconds"),
        }
        for metric in ("val_acc", "val_f1", "test_acc", "test_f1"):
            values = [getattr(r, metric) for r in self.runs]
            out[metric] = self.mean(metric)
            out[f"{metric}_std"] = self.std(metric)
            out[f"{metric}_min"], out[f"{metric}_max"] = min(values), max(values)
        out["losses"] = self.runs[0].losses  # the first seed's curve (the figure's)
        out["steps_per_epoch"] = self.steps_per_epoch
        out["runs"] = [r.__dict__ for r in self.runs]
        return out


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
    params = _with_adapters(setup.model, setup.params, name, rank)
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
    run = Run(seconds, *scores["val"], *scores["test"])
    return Row(name, size, 1, f"{n}/{n} blocks", [run])


def run_strategy(
    setup: Setup,
    name: str,
    epochs: int,
    rank: int,
    key: torch.Tensor,
    progress: bool,
    recipe: Recipe = DEFAULT,
) -> tuple[Run, int, str, int]:
    """Train one strategy with AdamW for one seed (``key``) and score it on validation and test.

    The seed draws the head (and LoRA adapters), the batch order of every epoch and, with the
    reference recipe, the dropout masks. Returns ``(run, trainable count, reused, steps per
    epoch)``.
    """
    model = setup.model
    k_head, k_lora, k_order, k_fit = jr.split(key, 4)
    params = _with_adapters(
        model,
        {**setup.params, "head": model.init(k_head, setup.params["base"])["head"]},
        name,
        rank,
        k_lora,
    )
    filt = strategy(name, model)
    k = frozen_prefix(model, params, filt)
    k_train = 0 if recipe.dropout else k  # dropout runs in the frozen blocks too: no cache
    trainable, frozen = tree.partition(params, filt)

    def batches(split: str, layer: int) -> list[dict[str, torch.Tensor]]:
        return [
            {**b, "x": setup.cache[layer][split][j] if layer else b["input_ids"]}
            for j, b in enumerate(setup.batches[split])
        ]

    def logits_of(p: Any, b: Mapping[str, torch.Tensor], layer: int, key: Any = None) -> Any:
        if layer:
            return model.apply_from(p, b["x"], layer, b["attention_mask"], key)
        return model.apply(p, b["x"], b["attention_mask"], key)

    def loss_fn(tr: Any, fr: Any, batch: dict[str, torch.Tensor], key: Any) -> torch.Tensor:
        drop = key if recipe.dropout else None
        logits = logits_of(tree.combine(tr, fr), batch, k_train, drop)
        return losses.classification(logits, batch["labels"])

    stream = data.epochs(batches("train", k_train), key=k_order, num_epochs=epochs)
    steps = epochs * stream.steps_per_epoch
    start = time.perf_counter()
    opt = _optimizer(recipe, recipe.lr(name), steps)
    if recipe.head_lr is not None and name.startswith("last:"):
        opt = per_part(_is_head, _optimizer(recipe, recipe.head_lr, steps), opt)
    fit = distributed.fit if distributed.world_size() > 1 else train.fit
    options: dict[str, Any] = {"compile": False} if fit is train.fit else {}  # torchrun: DP
    result = fit(
        loss_fn, opt, trainable, frozen, stream, key=k_fit, epochs=epochs, progress=progress,
        tokens_per_batch=lambda b: int(b["attention_mask"].sum()), **options,
    )  # fmt: skip
    trained = tree.combine(result.trainable, frozen)
    scores = {s: (float("nan"), float("nan")) for s in ("val", "test")}
    for split in ("val", "test") if distributed.is_main() else ():  # only rank 0 reports
        out = predict(model, trained, batches(split, k), forward=lambda p, b: logits_of(p, b, k))
        scores[split] = (accuracy(out.logits, out.labels), macro_f1(out.logits, out.labels))
    seconds = time.perf_counter() - start
    reused = f"{k_train}/{model.n_layer} blocks" if k_train else "-"
    if k and not k_train:
        reused = f"- (eval {k}/{model.n_layer})"
    run = Run(seconds, *scores["val"], *scores["test"], losses=[h["loss"] for h in result.history])
    return run, tree.count(trainable), reused, stream.steps_per_epoch


def _optimizer(recipe: Recipe, lr: float, steps: int) -> optim.GradientTransformation:
    if recipe.schedule == "linear":  # transformers' default: from lr down to 0, no warm-up
        schedule = _linear_decay(lr, steps)
    else:
        schedule = optim.warmup_cosine(lr, max(1, steps // 10), steps + 1)
    return optim.adamw(schedule, weight_decay=recipe.weight_decay)


def _linear_decay(lr: float, steps: int) -> optim.Schedule:
    def schedule(step: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(step, dtype=torch.float32)
        return lr * torch.clamp(1.0 - t / max(steps, 1), min=0.0)

    return schedule


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


def _with_adapters(
    model: Any, params: Any, name: str, rank: int, key: torch.Tensor | None = None
) -> Any:
    """The LoRA row's adapters on the model's own default targets (``model.lora_targets``)."""
    if name != "lora":
        return params
    key = jr.key(17) if key is None else key
    return lora.init(key, params, rank=rank, alpha=2 * rank, model=model)


def _tree_nodes(probe: Any) -> int:
    booster = getattr(probe, "get_booster", None)
    if booster is not None:
        return sum(d.count("\n") for d in booster().get_dump())
    # scikit-learn's HistGradientBoostingClassifier: an upper bound (full trees)
    return int(probe.n_iter_ * (2 * (probe.max_leaf_nodes or 31) - 1))
