"""Figures a researcher would rather look at than read, drawn with matplotlib.

Every function returns a ``matplotlib.figure.Figure`` built with the object-oriented API
(``Figure`` plus the Agg canvas): no ``pyplot``, no global state, no display needed, so the
functions are safe in tests, on servers and at docs-build time. Save a figure with
``fig.savefig("loss.png")`` or embed it in HTML with :func:`to_html`.

- :func:`loss_curve`: training loss per step (one or several runs, optional smoothing).
- :func:`masking`: BERT's 80/10/10 corruption drawn on a sentence, one coloured box per token.
- :func:`schedule`: a learning-rate schedule over steps.
- :func:`partition_tree`: a parameter tree drawn as a tree, trainable vs frozen.
- :func:`per_example_norms`: per-example gradient norms, with the clipping threshold.
- :func:`ratio_bars`: benchmark ratios as bars, with goal lines.
- :func:`memory_plans`: :func:`fnllm.memory.plan` results as stacked bars, part by part.
- :func:`finetune_results`: ``fnllm demo``'s ``results.json``: accuracy against trainable
  parameters, and each row's training loss over its own training.
- :func:`to_html`: a figure as a self-contained ``<img>`` tag (inline PNG).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fnllm import tree as _tree
from fnllm._figure_parts import (
    _PLAN_PARTS,
    _box,
    _figure,
    _moving_average,
    _numel,
    _one_row,
    _short,
    _values,
)

__all__ = [
    "COLORS",
    "finetune_results",
    "loss_curve",
    "masking",
    "memory_plans",
    "partition_tree",
    "per_example_norms",
    "ratio_bars",
    "schedule",
    "to_html",
]

#: The colours of the categories the figures draw (colour-blind-safe Okabe-Ito hues).
COLORS: dict[str, str] = {
    "kept": "#d9d9d9",
    "mask": "#0072b2",
    "random": "#d55e00",
    "unchanged": "#009e73",
    "trainable": "#0072b2",
    "frozen": "#bbbbbb",
    "mixed": "#e69f00",
    "goal": "#d55e00",
}

_MASK_LABELS = {
    "kept": "not picked",
    "mask": "picked -> [MASK]",
    "random": "picked -> random token",
    "unchanged": "picked, unchanged",
}


def loss_curve(
    runs: Sequence[float] | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    key: str = "loss",
    smooth: int = 1,
    title: str = "Training loss",
    log_y: bool = False,
) -> Figure:
    """Plot the training loss per step of one run or several.

    Example:
        >>> from fnllm import plot
        >>> fig = plot.loss_curve({"gpt": [5.0, 4.0, 3.5], "bert": [6.0, 5.5, 5.0]})
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['gpt', 'bert']
        >>> [float(v) for v in fig.axes[0].get_lines()[0].get_ydata()]
        [5.0, 4.0, 3.5]

    Args:
        runs: a sequence of losses, a ``fit`` history (dicts holding ``key``), or a mapping
            from run name to either.
        key: the entry to plot when a run is a list of dicts (e.g. ``"grad_norm"``).
        smooth: the width of a trailing moving average drawn over the raw curve (1: none).
        title: the title of the figure.
        log_y: draw the loss on a logarithmic axis.

    Returns:
        The figure, with one line per run (plus one smoothed line per run if ``smooth > 1``).

    Raises:
        ValueError: a run is empty, a value is not finite-convertible, or ``smooth < 1``.
    """
    if smooth < 1:
        raise ValueError(f"smooth: must be >= 1, got {smooth}")
    named = dict(runs) if isinstance(runs, Mapping) else {"": runs}
    if not named:
        raise ValueError("runs: no runs to plot")
    fig, ax = _figure(6.0, 3.4)
    raw_lines = []
    for name, run in named.items():
        values = _values(run, key, f"runs[{name!r}]" if name else "runs")
        steps = list(range(1, len(values) + 1))
        (line,) = ax.plot(steps, values, label=name or key, alpha=0.35 if smooth > 1 else 1.0)
        raw_lines.append(line)
        if smooth > 1:
            avg = _moving_average(values, smooth)
            ax.plot(steps, avg, color=line.get_color(), label=f"_{name or key} (smoothed)")
    # what the two shades of a run mean, where the figure has both
    ax.set_xlabel(
        f"step (faint: each step; solid: mean of the last {smooth})" if smooth > 1 else "step"
    )
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(named) > 1:  # beside the axes, never over the curves
        ax.legend(handles=raw_lines, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def masking(
    tokens: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    decode: Callable[[int], str],
    mask_id: int,
    per_row: int = 8,
    title: str = "MLM corruption (80/10/10)",
) -> Figure:
    """Draw BERT's masked-LM corruption of one sentence: one coloured box per token.

    A token is *not picked* (label -100), *masked* (input is ``mask_id``), *random* (input is
    another id) or *unchanged* (picked, but the model still sees the original). Each box shows
    the original token, with what the model sees below it when that differs.

    Example:
        >>> import torch
        >>> from fnllm import plot
        >>> tokens = torch.tensor([5, 6, 7, 8])
        >>> inputs = torch.tensor([5, 1, 9, 8])
        >>> labels = torch.tensor([-100, 6, 7, 8])
        >>> fig = plot.masking(tokens, inputs, labels, decode=lambda i: f"t{i}", mask_id=1)
        >>> fig.fnllm_categories
        ['kept', 'mask', 'random', 'unchanged']

    Args:
        tokens: the original ids of one sequence, shape ``[T]`` (or ``[1, T]``).
        inputs: the corrupted ids ``mlm_mask`` returned, same shape.
        labels: the labels ``mlm_mask`` returned (-100 where nothing was picked), same shape.
        decode: maps an id to the text drawn in its box (e.g. ``tokenizer.id_to_token``).
        mask_id: the id of the ``[MASK]`` token.
        per_row: how many tokens to draw per row.
        title: the title of the figure.

    Returns:
        The figure; its attribute ``fnllm_categories`` lists each token's category in order.

    Raises:
        ValueError: the three tensors differ in shape or are not one sequence.
    """
    tok, inp, lab = (
        _one_row(t, n) for t, n in ((tokens, "tokens"), (inputs, "inputs"), (labels, "labels"))
    )
    if not (tok.shape == inp.shape == lab.shape):
        raise ValueError(
            f"tokens, inputs, labels: shapes differ: {tuple(tok.shape)}, {tuple(inp.shape)}, "
            f"{tuple(lab.shape)}"
        )
    if per_row < 1:
        raise ValueError(f"per_row: must be >= 1, got {per_row}")
    cats = []
    for t, i, lb in zip(tok.tolist(), inp.tolist(), lab.tolist()):
        if lb == -100:
            cats.append("kept")
        elif i == mask_id:
            cats.append("mask")
        elif i != t:
            cats.append("random")
        else:
            cats.append("unchanged")
    n = len(cats)
    rows = max(1, -(-n // per_row))
    fig, ax = _figure(min(0.8 * per_row, 0.8 * n) + 0.4, 0.75 * rows + 1.1)
    for k, (t, i, cat) in enumerate(zip(tok.tolist(), inp.tolist(), cats)):
        x, y = k % per_row, -(k // per_row)
        ax.add_patch(_box(x, y, COLORS[cat]))
        light = cat in ("mask", "random")
        ax.text(
            x + 0.45,
            y + 0.55,
            decode(t),
            ha="center",
            va="center",
            fontsize=10,
            color="white" if light else "black",
            clip_on=True,
        )
        if cat in ("mask", "random"):
            ax.text(
                x + 0.45,
                y + 0.2,
                "-> " + decode(i),
                ha="center",
                va="center",
                fontsize=9,
                color="white",
                clip_on=True,
            )
    ax.set_xlim(-0.1, min(per_row, n) + 0.05)
    ax.set_ylim(-(rows - 1) - 0.15, 1.05)
    ax.set_axis_off()
    handles = [_box(0, 0, COLORS[c]) for c in _MASK_LABELS]
    ax.legend(
        handles,
        list(_MASK_LABELS.values()),
        loc="upper center",
        ncol=2,
        fontsize=9,
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
    )
    ax.set_title(title)
    fig.fnllm_categories = cats  # type: ignore[attr-defined]
    return fig


def schedule(
    fn: Callable[[int], Any],
    steps: int,
    *,
    title: str = "Learning-rate schedule",
    marks: Sequence[int] = (),
) -> Figure:
    """Plot a schedule (step -> value) over ``range(steps)``.

    Example:
        >>> from fnllm import optim, plot
        >>> s = optim.warmup_cosine(1.0, warmup_steps=2, total_steps=6)
        >>> fig = plot.schedule(s, 8, marks=[2])
        >>> [round(float(v), 2) for v in fig.axes[0].get_lines()[0].get_ydata()][:4]
        [0.0, 0.5, 1.0, 0.85]

    Args:
        fn: the schedule, e.g. ``optim.warmup_cosine(...)``; called with each step.
        steps: how many steps to draw.
        title: the title of the figure.
        marks: steps to mark with a dotted vertical line (e.g. the end of warmup).

    Returns:
        The figure with one line, the schedule's values.

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    values = [float(fn(s)) for s in range(steps)]
    fig, ax = _figure(6.0, 3.0)
    ax.plot(range(steps), values, color=COLORS["trainable"])
    for m in marks:
        ax.axvline(m, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def partition_tree(
    params: Any,
    filter: Any,
    *,
    depth: int = 3,
    title: str = "Trainable (blue) vs frozen (grey)",
) -> Figure:
    """Draw a parameter tree as a tree, each node coloured trainable, frozen or mixed.

    The colouring uses :func:`fnllm.tree.partition` with ``filter``, exactly what training
    would use; each label shows the node's number of parameters. Nodes deeper than ``depth``
    are folded into their parent, which is *mixed* when its leaves are split.

    Example:
        >>> import torch
        >>> from fnllm import plot
        >>> params = {"emb": torch.zeros(2), "head": {"w": torch.zeros(2), "b": torch.zeros(1)}}
        >>> fig = plot.partition_tree(params, ["head.w"])
        >>> fig.fnllm_nodes
        {'emb': 'frozen', 'head': 'mixed', 'head.b': 'frozen', 'head.w': 'trainable'}

    Args:
        params: a parameter tree.
        filter: what :func:`fnllm.tree.partition` takes: globs, a predicate, ...
        depth: the deepest level drawn (1: the top-level entries only).
        title: the title of the figure.

    Returns:
        The figure; its attribute ``fnllm_nodes`` maps each drawn path to its state.

    Raises:
        ValueError: ``depth < 1`` or the tree has no leaves.
    """
    if depth < 1:
        raise ValueError(f"depth: must be >= 1, got {depth}")
    trainable, _ = _tree.partition(params, filter)
    train_paths = set(_tree.paths(trainable))
    leaves = _tree.paths(params)
    if not leaves:
        raise ValueError("params: the tree has no leaves")
    sizes = {p: _numel(v) for p, v in _tree.flatten(params).items()}
    nodes: dict[str, set[bool]] = {}
    counts: dict[str, int] = {}
    for path in leaves:
        parts = path.split(".")
        for d in range(1, min(depth, len(parts)) + 1):
            node = ".".join(parts[:d])
            nodes.setdefault(node, set()).add(path in train_paths)
            counts[node] = counts.get(node, 0) + sizes.get(path, 0)
    states = {
        p: ("mixed" if len(s) == 2 else "trainable" if True in s else "frozen")
        for p, s in nodes.items()
    }
    fig, ax = _figure(6.0, 0.27 * len(states) + 0.8)
    rows = list(states)
    for r, path in enumerate(rows):
        level = path.count(".")
        y = -r
        ax.plot([level * 0.6 - 0.35, level * 0.6 - 0.05], [y, y], color="#888888", lw=0.8)
        parent = path.rsplit(".", 1)[0] if level else None
        if parent is not None:
            py = -rows.index(parent)
            ax.plot([level * 0.6 - 0.35] * 2, [py - 0.35, y], color="#888888", lw=0.8)
        ax.text(
            level * 0.6,
            y,
            f"{path.rsplit('.', 1)[-1]}  ({_short(counts[path])})",
            va="center",
            fontsize=9,
            color="black",
            bbox={"boxstyle": "round,pad=0.2", "fc": COLORS[states[path]], "ec": "none"},
        )
    ax.set_xlim(-0.5, 0.6 * depth + 3)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.set_axis_off()
    handles = [_box(0, 0, COLORS[c]) for c in ("trainable", "frozen", "mixed")]
    ax.legend(
        handles,
        ["trainable", "frozen", "mixed"],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=9,
        frameon=False,
    )
    ax.set_title(title)
    fig.fnllm_nodes = states  # type: ignore[attr-defined]
    return fig


def per_example_norms(
    norms: torch.Tensor | Sequence[float],
    *,
    clip: float | None = None,
    title: str = "Per-example gradient norms",
) -> Figure:
    """Draw one bar per example's gradient norm, with the clipping threshold as a line.

    Example:
        >>> import torch
        >>> from fnllm import plot
        >>> fig = plot.per_example_norms(torch.tensor([0.5, 2.0, 1.0]), clip=1.0)
        >>> [round(float(p.get_height()), 1) for p in fig.axes[0].patches]
        [0.5, 2.0, 1.0]

    Args:
        norms: one norm per example, e.g. ``grads.per_example_norm(g)``.
        clip: the per-example clipping norm (DP-SGD's ``max_norm``), drawn as a line; bars
            above it are coloured as clipped.
        title: the title of the figure.

    Returns:
        The figure.

    Raises:
        ValueError: ``norms`` is empty or not one-dimensional.
    """
    values = torch.as_tensor(norms, dtype=torch.float64).detach().cpu()
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"norms: need a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    vals = values.tolist()
    fig, ax = _figure(6.0, 3.0)
    colors = [
        COLORS["random"] if clip is not None and v > clip else COLORS["trainable"] for v in vals
    ]
    ax.bar(range(len(vals)), vals, color=colors)
    if clip is not None:
        from matplotlib.patches import Patch

        handles = [
            Patch(color=COLORS["trainable"], label="at most the clip: kept"),
            Patch(color=COLORS["random"], label="above the clip: scaled down to it"),
            ax.axhline(
                clip, color="black", linestyle="--", linewidth=1, label=f"clip = {clip:.3g}"
            ),
        ]
        ax.legend(
            handles=handles,
            fontsize=9,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),
            ncol=3,
            frameon=False,
        )
    ax.set_xlabel("example")
    ax.set_ylabel("gradient norm")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig


def ratio_bars(
    ratios: Mapping[str, float],
    *,
    goals: Mapping[str, float] | float | None = None,
    title: str = "fnllm time / peer time (lower is better)",
) -> Figure:
    """Draw benchmark ratios as horizontal bars, with each workload's goal as a black tick.

    Example:
        >>> from fnllm import plot
        >>> fig = plot.ratio_bars({"a": 0.5, "b": 1.2}, goals=1.0)
        >>> [round(float(p.get_width()), 1) for p in fig.axes[0].patches]
        [0.5, 1.2]

    Args:
        ratios: workload name -> ratio (fnllm time over the peer's time).
        goals: one goal for all workloads, or workload -> goal (workloads without one get
            none). Bars that miss their goal are drawn in the goal colour.
        title: the title of the figure.

    Returns:
        The figure.

    Raises:
        ValueError: ``ratios`` is empty, or ``goals`` names a workload not in ``ratios``.
    """
    if not ratios:
        raise ValueError("ratios: nothing to draw")
    names = list(ratios)
    if goals is None:
        goal = {}
    elif isinstance(goals, Mapping):
        unknown = sorted(set(goals) - set(names))
        if unknown:
            raise ValueError(f"goals: workloads not in ratios: {unknown}")
        goal = dict(goals)
    else:
        goal = dict.fromkeys(names, float(goals))
    fig, ax = _figure(6.5, 0.38 * len(names) + 1.0)
    ys = list(range(len(names)))[::-1]
    colors = [
        COLORS["goal"] if n in goal and ratios[n] > goal[n] else COLORS["trainable"] for n in names
    ]
    ax.barh(ys, [float(ratios[n]) for n in names], color=colors, height=0.6)
    high = max(max(float(v) for v in ratios.values()), *goal.values(), 1.0)
    for y, n in zip(ys, names):
        value = float(ratios[n])
        if n in goal:
            ax.plot([goal[n]] * 2, [y - 0.42, y + 0.42], color="black", linewidth=2)
        # the value right of the bar, or right of a goal tick that would cover it
        at = goal[n] if n in goal and value <= goal[n] < value + 0.1 * high else value
        ax.text(at + 0.01 * high, y, f" {value:.2f}", va="center", fontsize=9)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(ys, names, fontsize=9)
    ax.set_xlim(0, high * 1.15)  # room for the rightmost value
    ax.set_xlabel("ratio (black tick: goal; orange bar: goal missed)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def memory_plans(
    plans: Mapping[str, Any], *, budget: float | None = None, title: str = "peak memory by part"
) -> Figure:
    """Draw memory plans (:class:`fnllm.memory.MemoryPlan`) as stacked bars, one per
    configuration, with an optional budget line; the legend sits outside the bars.

    Example:
        >>> from fnllm import memory, plot
        >>> p = memory.MemoryPlan(weights_trainable=1, weights_frozen=2**30, optimizer=2,
        ...                       gradients=1, activations=2**31, settings={})
        >>> fig = plot.memory_plans({"bf16": p}, budget=4 * 2**30)
        >>> round(sum(float(b.get_width()) for b in fig.axes[0].patches), 2)   # GiB
        3.0

    Args:
        plans: configuration name -> plan (anything with the plan's five byte counts).
        budget: bytes available, drawn as a vertical line.
        title: the title of the figure.

    Returns:
        The figure (bars in GiB).

    Raises:
        ValueError: ``plans`` is empty.
    """
    if not plans:
        raise ValueError("plans: nothing to draw")
    names = list(plans)
    fig, ax = _figure(7.5, 0.42 * len(names) + 1.3)
    ys = list(range(len(names)))[::-1]
    left = [0.0] * len(names)
    for attr, label, color in _PLAN_PARTS:
        widths = [getattr(plans[n], attr) / 2**30 for n in names]
        ax.barh(ys, widths, left=left, color=color, height=0.6, label=label)
        left = [a + w for a, w in zip(left, widths)]
    for y, total in zip(ys, left):
        # a white box keeps the total readable where it crosses the budget line
        box = {"facecolor": "white", "edgecolor": "none", "pad": 0.5}
        ax.text(total, y, f" {total:.1f}", va="center", fontsize=9, zorder=4, bbox=box)
    if budget is not None:
        ax.axvline(budget / 2**30, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_yticks(ys, names, fontsize=9)
    ax.set_xlabel("GiB")
    ax.set_xlim(0, max([*left, (budget or 0) / 2**30]) * 1.15)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def finetune_results(
    results: Mapping[str, Any],
    *,
    title: str = "Adapting a pretrained encoder: accuracy and training loss",
    smooth: float = 0.2,
) -> Figure:
    """Draw ``fnllm demo``'s ``results.json``: test accuracy against trainable parameters
    (top; error bars: the seeds' ``test_acc_std`` where a row has one), and each row's
    training loss over its own training (bottom).

    Rows train for different numbers of steps (``head`` runs ten epochs on cached features,
    the others one), so the loss panel's x axis is each row's *fraction of its training*:
    every curve spans 0 to 1. One colour per row, the same in both panels.

    Example:
        >>> from fnllm import plot
        >>> rows = [
        ...     {"name": "head", "trainable": 770, "test_acc": 0.74, "losses": [0.7, 0.6, 0.5]},
        ...     {"name": "full", "trainable": 22_000_000, "test_acc": 0.77, "losses": [0.7, 0.4]},
        ... ]
        >>> fig = plot.finetune_results({"rows": rows}, smooth=0)
        >>> [float(x) for x in fig.axes[1].get_lines()[1].get_xdata()]
        [0.5, 1.0]

    Args:
        results: a mapping with ``"rows"``: dicts holding ``name``, ``trainable``,
            ``test_acc`` and (optionally) ``test_acc_std`` and ``losses``, one per training
            step.
        title: the title of the figure.
        smooth: the width of the trailing moving average over each loss curve, as a
            fraction of the row's steps (0: none).

    Returns:
        The figure, with two axes: accuracy, then loss.

    Raises:
        ValueError: there are no rows, or a row lacks a field.
    """
    rows = list(results.get("rows", ()))
    if not rows:
        raise ValueError("results: no rows to draw")
    for i, r in enumerate(rows):
        missing = [k for k in ("name", "trainable", "test_acc") if k not in r]
        if missing:
            raise ValueError(f"results['rows'][{i}]: missing {missing}")
    fig = Figure(figsize=(6.4, 6.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 1.1])
    palette = ["#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#000000"]
    palette += ["#999999", "#f0e442"]
    colors = {r["name"]: palette[i % len(palette)] for i, r in enumerate(rows)}
    for r in rows:
        x, y = max(int(r["trainable"]), 1), float(r["test_acc"])
        std = float(r.get("test_acc_std") or 0.0)
        top.errorbar(
            x, y, yerr=std if std > 0 else None, fmt="o", ms=6, capsize=3,
            color=colors[r["name"]], zorder=3,
        )  # fmt: skip
        top.annotate(
            f"{r['name']} {y:.2f}", (x, y), textcoords="offset points", xytext=(6, -3), fontsize=9
        )
    top.set_xscale("log")
    low, high = top.get_xlim()
    top.set_xlim(low, high * 6)  # room for the rightmost label
    top.set_xlabel("trainable parameters (log scale)")
    spread = any(float(r.get("test_acc_std") or 0.0) > 0 for r in rows)
    top.set_ylabel("test accuracy" + (" (mean ± std)" if spread else ""))
    top.grid(alpha=0.3)
    drawn = []
    for r in rows:
        values = [float(v) for v in r.get("losses") or ()]
        if not values:
            continue
        n = len(values)
        width = max(1, round(smooth * n))
        xs = [(i + 1) / n for i in range(n)]
        (line,) = bottom.plot(
            xs, _moving_average(values, width), color=colors[r["name"]], lw=1.4, label=r["name"]
        )
        drawn.append(line)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("fraction of the row's training (each row: its own steps)")
    bottom.set_ylabel("training loss" + (" (smoothed)" if smooth else ""))
    bottom.grid(alpha=0.3)
    if drawn:
        bottom.legend(
            handles=drawn, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
        )
    fig.suptitle(title, fontsize=11)
    return fig


def to_html(fig: Figure, *, alt: str = "figure", dpi: int = 110) -> str:
    """Render a figure to PNG and return a self-contained ``<img>`` tag (a data URI).

    For HTML of your own (a report, a notebook cell); a script saves ``fig.savefig(path)``.

    Example:
        >>> from fnllm import plot
        >>> tag = plot.to_html(plot.schedule(lambda s: s, 3), alt="ramp")
        >>> tag.startswith('<img alt="ramp" src="data:image/png;base64,')
        True

    Args:
        fig: the figure.
        alt: the image's alternative text.
        dpi: the resolution of the PNG.

    Returns:
        The HTML ``<img>`` tag.
    """
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" '
        'class="fnllm-figure" style="max-width:100%">'
    )
