"""Small private pieces of :mod:`fnllm.plot`: a canvas, input coercion, smoothing, boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _values(run: Sequence[Any], key: str, where: str) -> list[float]:
    values = [r[key] if isinstance(r, Mapping) else r for r in run]
    if not values:
        raise ValueError(f"{where}: no values")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: values must be numbers ({err})") from err


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _one_row(t: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"{name}: need one sequence ([T] or [1, T]), got shape {tuple(t.shape)}")
    return t


def _numel(leaf: Any) -> int:
    return int(leaf.numel()) if isinstance(leaf, torch.Tensor) else 0


def _short(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _box(x: float, y: float, color: str) -> Any:
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((x, y), 0.9, 0.8, boxstyle="round,pad=0.02", fc=color, ec="white")


#: The parts of a memory plan, bottom to top, and their colours (Okabe-Ito).
_PLAN_PARTS = (
    ("weights_frozen", "weights (frozen)", "#bbbbbb"),
    ("weights_trainable", "weights (trainable)", "#0072b2"),
    ("gradients", "gradients", "#56b4e9"),
    ("optimizer", "optimizer state", "#009e73"),
    ("activations", "activations", "#e69f00"),
)
