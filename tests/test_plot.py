"""Tests for ``fnllm.plot``: each figure draws exactly the data it was given."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.colors import to_hex
from matplotlib.patches import FancyBboxPatch

from fnllm import data, optim, plot, testing, tree
from fnllm import random as jr
from fnllm.models import GPT

_FAST = settings(max_examples=12, deadline=None)


def test_module_uses_no_pyplot() -> None:
    """Importing and drawing never touches pyplot's global state (Agg canvas only)."""
    code = (
        "import sys; from fnllm import plot; plot.to_html(plot.loss_curve([1.0, 0.5]));"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- loss_curve


@_FAST
@given(st.lists(st.floats(0.01, 20.0), min_size=1, max_size=40), st.integers(1, 9))
def test_loss_curve_draws_the_values_and_a_moving_average(values: list[float], width: int) -> None:
    fig = plot.loss_curve(values, smooth=width)
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), values)
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(1, len(values) + 1))
    if width > 1:  # trailing mean over the last `width` values (fewer at the start)
        ref = [np.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(lines[1].get_ydata(), ref, rtol=1e-9)
        assert f"solid: mean of the last {width}" in fig.axes[0].get_xlabel()  # says the shades
    else:
        assert len(lines) == 1 and fig.axes[0].get_xlabel() == "step"


def test_loss_curve_reads_fit_histories_and_names_runs() -> None:
    history = [{"step": i + 1, "loss": 3.0 - i, "grad_norm": 0.5 * i} for i in range(3)]
    fig = plot.loss_curve({"a": history, "b": [1.0, 2.0]})
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["a", "b"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [3.0, 2.0, 1.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    norms = plot.loss_curve(history, key="grad_norm").axes[0]
    np.testing.assert_allclose(norms.get_lines()[0].get_ydata(), [0.0, 0.5, 1.0])
    assert norms.get_ylabel() == "grad_norm"
    assert plot.loss_curve([1.0, 0.1], log_y=True).axes[0].get_yscale() == "log"


def test_loss_curve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"runs\['b'\]: no values"):
        plot.loss_curve({"a": [1.0], "b": []})
    with pytest.raises(ValueError, match="runs: no runs"):
        plot.loss_curve({})
    with pytest.raises(ValueError, match="smooth: must be >= 1, got 0"):
        plot.loss_curve([1.0], smooth=0)
    with pytest.raises(ValueError, match="runs: values must be numbers"):
        plot.loss_curve(["high", "low"])
    with pytest.raises(KeyError, match="loss"):
        plot.loss_curve([{"step": 1}])


# ----------------------------------------------------------------------------- masking


def _boxes(fig) -> list[FancyBboxPatch]:
    return [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]


@_FAST
@given(testing.mlm_args(max_len=24, max_batch=1))
def test_masking_colours_every_token_by_its_case(args: dict) -> None:
    inputs, labels = data.mlm_mask(**args)
    tokens = args["tokens"]
    fig = plot.masking(
        tokens, inputs, labels, decode=lambda i: f"<{i}>", mask_id=args["mask_id"], per_row=5
    )
    cats = fig.fnllm_categories
    assert len(cats) == tokens.shape[-1]
    picked = (labels[0] != -100).tolist()
    for t, (c, was_picked, x, y) in enumerate(
        zip(cats, picked, inputs[0].tolist(), tokens[0].tolist())
    ):
        assert (c != "kept") == was_picked, t
        if c == "mask":
            assert x == args["mask_id"]
        elif c == "random":
            assert x != y and x != args["mask_id"]
        elif c == "unchanged":
            assert x == y
    boxes = _boxes(fig)[: len(cats)]  # then the legend's four handles
    assert [to_hex(b.get_facecolor()) for b in boxes] == [plot.COLORS[c] for c in cats]
    texts = [t.get_text() for t in fig.axes[0].texts]
    for y in tokens[0].tolist():
        assert f"<{y}>" in texts


def test_masking_shows_what_the_model_sees() -> None:
    tokens = torch.tensor([[5, 6, 7, 8]])
    fig = plot.masking(
        tokens,
        torch.tensor([[5, 1, 9, 8]]),
        torch.tensor([[-100, 6, 7, 8]]),
        decode=lambda i: {1: "[MASK]"}.get(i, f"w{i}"),
        mask_id=1,
    )
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["w5", "w6", "-> [MASK]", "w7", "-> w9", "w8"]
    assert fig.fnllm_categories == ["kept", "mask", "random", "unchanged"]


def test_masking_rejects_bad_shapes() -> None:
    t = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"shapes differ: \(3,\), \(2,\)"):
        plot.masking(t, t[:2], t, decode=str, mask_id=0)
    with pytest.raises(ValueError, match=r"tokens: need one sequence.*\(2, 3\)"):
        plot.masking(torch.stack([t, t]), t, t, decode=str, mask_id=0)
    with pytest.raises(ValueError, match="per_row: must be >= 1"):
        plot.masking(t, t, t, decode=str, mask_id=0, per_row=0)


# ----------------------------------------------------------------------------- schedule


def test_schedule_draws_the_schedule_values() -> None:
    s = optim.warmup_cosine(2.0, warmup_steps=5, total_steps=30, end=0.1)
    fig = plot.schedule(s, 40, marks=[5, 30])
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), [float(s(i)) for i in range(40)])
    assert [ln.get_xdata()[0] for ln in lines[1:]] == [5, 30]
    with pytest.raises(ValueError, match="steps: must be >= 1, got 0"):
        plot.schedule(s, 0)


# ----------------------------------------------------------------------------- partition_tree


@_FAST
@given(st.data())
def test_partition_tree_states_follow_tree_partition(draw: st.DataObject) -> None:
    params = draw.draw(testing.trees(min_leaves=1, max_leaves=10))
    filt = draw.draw(testing.filters(params))
    depth = draw.draw(st.integers(1, 4))
    nodes = plot.partition_tree(params, filt, depth=depth).fnllm_nodes
    trainable = set(tree.paths(tree.partition(params, filt)[0]))
    leaves = tree.paths(params)
    for node, state in nodes.items():
        assert node.count(".") < depth
        below = [p for p in leaves if p == node or p.startswith(node + ".")]
        assert below, node
        inside = {p in trainable for p in below}
        assert state == {frozenset({True}): "trainable", frozenset({False}): "frozen"}.get(
            frozenset(inside), "mixed"
        )
    # every leaf shallow enough is drawn, as itself
    for leaf in leaves:
        if leaf.count(".") < depth:
            assert nodes[leaf] == ("trainable" if leaf in trainable else "frozen")


def test_partition_tree_on_a_gpt_and_its_errors() -> None:
    params = GPT(vocab_size=16, n_layer=2, n_head=2, d_model=8, max_len=4).init(jr.key(0))
    fig = plot.partition_tree(params, ["blocks.1.*", "ln_f.*"], depth=2)
    nodes = fig.fnllm_nodes
    labels = [t.get_text() for t in fig.axes[0].texts]
    block = sum(v.numel() for v in tree.leaves(params["blocks"][1]))
    assert "ln_f  (16)" in labels and f"1  ({block})" in labels, labels  # under 1000: exact
    assert f"blocks  ({2 * block / 1000:.1f}k)" in labels
    assert nodes["blocks"] == "mixed"
    assert nodes["blocks.1"] == "trainable" and nodes["blocks.0"] == "frozen"
    assert nodes["embed"] == "frozen" and nodes["ln_f"] == "trainable"
    with pytest.raises(ValueError, match="depth: must be >= 1, got 0"):
        plot.partition_tree(params, ["ln_f.*"], depth=0)
    with pytest.raises(ValueError, match="params: the tree has no leaves"):
        plot.partition_tree({}, lambda path, leaf: True)


# ----------------------------------------------------------------------------- bars


def test_per_example_norms_marks_clipped_examples() -> None:
    norms = torch.tensor([0.5, 2.0, 1.0, 3.0])
    fig = plot.per_example_norms(norms, clip=1.5)
    bars = fig.axes[0].patches
    np.testing.assert_allclose([b.get_height() for b in bars], norms.tolist())
    clipped = [to_hex(b.get_facecolor()) == plot.COLORS["random"] for b in bars]
    assert clipped == [False, True, False, True]
    assert fig.axes[0].get_lines()[0].get_ydata()[0] == 1.5
    with pytest.raises(
        ValueError, match=r"norms: need a non-empty 1-D sequence, got shape \(2, 2\)"
    ):
        plot.per_example_norms(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"got shape \(0,\)"):
        plot.per_example_norms([])


def test_ratio_bars_draws_ratios_goals_and_misses() -> None:
    ratios = {"fast": 0.4, "slow": 1.3, "free": 0.9}
    fig = plot.ratio_bars(ratios, goals={"fast": 0.8, "slow": 1.0})
    ax = fig.axes[0]
    np.testing.assert_allclose([b.get_width() for b in ax.patches], [0.4, 1.3, 0.9])
    missed = [to_hex(b.get_facecolor()) == plot.COLORS["goal"] for b in ax.patches]
    assert missed == [False, True, False]
    ticks = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "-")
    assert ticks == [0.8, 1.0]  # one goal tick per workload that has a goal
    labels = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert sorted(labels, key=labels.get, reverse=True) == ["fast", "slow", "free"]  # top down
    every = plot.ratio_bars(ratios, goals=0.5).axes[0]
    assert sum(ln.get_linestyle() == "-" for ln in every.get_lines()) == 3
    with pytest.raises(ValueError, match=r"goals: workloads not in ratios: \['nope'\]"):
        plot.ratio_bars(ratios, goals={"nope": 1.0})
    with pytest.raises(ValueError, match="ratios: nothing to draw"):
        plot.ratio_bars({})


def test_finetune_results_normalises_each_rows_loss_axis_and_draws_the_spread() -> None:
    """Rows train for different numbers of steps (``head`` ten epochs, the others one): the
    loss panel puts every row on 0..1 of its own training; the accuracy panel draws each
    row's standard deviation over the seeds as an error bar."""
    rows = [
        {"name": "head", "trainable": 770, "test_acc": 0.76, "test_acc_std": 0.02,
         "losses": [0.7 - 0.001 * i for i in range(320)]},
        {"name": "full", "trainable": 22_000_000, "test_acc": 0.73, "test_acc_std": 0.0,
         "losses": [0.7, 0.6, 0.5, 0.4]},
        {"name": "probe", "trainable": 384, "test_acc": 0.70},
    ]  # fmt: skip
    fig = plot.finetune_results({"rows": rows}, smooth=0)
    top, bottom = fig.axes
    lines = {ln.get_label(): ln for ln in bottom.get_lines()}
    assert sorted(lines) == ["full", "head"]  # a row without losses has no curve
    for name, n in (("head", 320), ("full", 4)):
        xs = lines[name].get_xdata()
        assert len(xs) == n and xs[0] == pytest.approx(1 / n) and xs[-1] == pytest.approx(1.0)
    assert bottom.get_xlim() == (0.0, 1.0)
    bars = [c for c in top.collections if c.get_segments()]  # error bar segments
    assert len(bars) == 1  # only head has a spread
    np.testing.assert_allclose(bars[0].get_segments()[0][:, 1], [0.74, 0.78])
    assert "mean ± std" in top.get_ylabel()
    legend = bottom.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > bottom.bbox.x1 - 1  # outside
    with pytest.raises(ValueError, match="no rows"):
        plot.finetune_results({"rows": []})
    with pytest.raises(ValueError, match=r"missing \['test_acc'\]"):
        plot.finetune_results({"rows": [{"name": "x", "trainable": 1}]})


# ----------------------------------------------------------------------------- to_html


def test_to_html_embeds_a_png_of_the_figure() -> None:
    fig = plot.schedule(lambda s: s * s, 5)
    tag = plot.to_html(fig, alt='a "quoted" <alt>', dpi=50)
    m = re.fullmatch(
        r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)" class="fnllm-figure".*>', tag
    )
    assert m is not None, tag[:200]
    assert m.group(1) == "a &quot;quoted&quot; &lt;alt&gt;"
    png = base64.b64decode(m.group(2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    # bbox_inches="tight": the drawn area plus 0.1 inch of padding, about the figure's size
    assert 0.8 * 6.0 * 50 < width <= 6.2 * 50 + 1 and 0.8 * 3.0 * 50 < height <= 3.2 * 50 + 1
