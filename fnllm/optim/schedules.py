"""Learning-rate schedules: plain functions ``step -> value`` written with torch ops.

A schedule takes the optimizer's step count (the number of updates made so far, starting at
0) as an integer tensor, or a Python int, and returns a float32 0-d tensor on the step's
device. Because it is tensor arithmetic with no Python branch on the step's value, an
optimizer whose learning rate is a schedule still compiles with ``fullgraph=True`` and never
recompiles as the step advances.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fnllm import _checks

__all__ = ["Schedule", "constant", "cosine_decay", "linear_warmup", "warmup_cosine"]

Schedule = Callable[[Tensor | int], Tensor]


def constant(value: float) -> Schedule:
    """A schedule that always returns ``value``.

    Example:
        >>> from fnllm import optim
        >>> optim.constant(0.1)(7)
        tensor(0.1000)

    Args:
        value: the learning rate (or any scale).

    Returns:
        The schedule ``step -> value``.
    """
    value = _check_float("constant: value", value)

    def schedule(step: Tensor | int) -> Tensor:
        return torch.full_like(_as_float_step(step), value)

    return schedule


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    """Ramp linearly from ``init`` at step 0 to ``peak`` at ``warmup_steps``, then stay there.

    ``value(step) = init + (peak - init) * min(step, warmup_steps) / warmup_steps``.

    Example:
        >>> from fnllm import optim
        >>> s = optim.linear_warmup(1.0, warmup_steps=4)
        >>> [round(float(s(i)), 2) for i in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

    Args:
        peak: the value reached at the end of the warmup.
        warmup_steps: length of the ramp (0 means ``peak`` from the start).
        init: the value at step 0.

    Returns:
        The schedule.

    Raises:
        ValueError: ``warmup_steps`` is negative.
    """
    peak = _check_float("linear_warmup: peak", peak)
    init = _check_float("linear_warmup: init", init)
    warmup_steps = _check_steps("linear_warmup: warmup_steps", warmup_steps, low=0)

    def schedule(step: Tensor | int) -> Tensor:
        s = _as_float_step(step)
        if warmup_steps == 0:
            return torch.full_like(s, peak)
        frac = torch.clamp(s / warmup_steps, max=1.0)
        return init + (peak - init) * frac

    return schedule


def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half-cosine decay from ``init`` to ``alpha * init`` over ``decay_steps``, then constant.

    ``value(step) = init * ((1 - alpha) * 0.5 * (1 + cos(pi * min(step, T) / T)) + alpha)``,
    as in SGDR without restarts (and ``optax.cosine_decay_schedule``).

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> values = optim.cosine_decay(1.0, decay_steps=4)(torch.arange(6))
        >>> [round(v, 4) for v in values.tolist()]
        [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]

    Args:
        init: the value at step 0.
        decay_steps: ``T > 0``, the number of steps of the decay.
        alpha: the final value as a fraction of ``init``.

    Returns:
        The schedule.

    Raises:
        ValueError: ``decay_steps < 1``.
    """
    init = _check_float("cosine_decay: init", init)
    alpha = _checks.check_range("cosine_decay: alpha", alpha, low=0.0, high=1.0)
    decay_steps = _check_steps("cosine_decay: decay_steps", decay_steps, low=1)

    def schedule(step: Tensor | int) -> Tensor:
        s = torch.clamp(_as_float_step(step), max=float(decay_steps))
        cosine = 0.5 * (1.0 + torch.cos(s * (math.pi / decay_steps)))
        return init * ((1.0 - alpha) * cosine + alpha)

    return schedule


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warmup from ``init`` to ``peak``, then half-cosine decay to ``end``.

    For ``step < W = warmup_steps`` the value is ``init + (peak - init) * step / W``; after
    that it is ``end + (peak - end) * 0.5 * (1 + cos(pi * p))`` with
    ``p = min((step - W) / (total_steps - W), 1)``. ``total_steps`` counts the warmup (the
    decay ends at ``total_steps`` and the value stays at ``end``), like
    ``optax.warmup_cosine_decay_schedule``.

    Example:
        >>> from fnllm import optim
        >>> s = optim.warmup_cosine(1.0, warmup_steps=2, total_steps=6, end=0.1)
        >>> [round(float(s(i)), 3) for i in range(8)]
        [0.0, 0.5, 1.0, 0.868, 0.55, 0.232, 0.1, 0.1]

    Args:
        peak: the value at the end of the warmup.
        warmup_steps: length of the linear warmup (may be 0).
        total_steps: step at which the decay reaches ``end``; greater than ``warmup_steps``.
        init: the value at step 0.
        end: the final value.

    Returns:
        The schedule.

    Raises:
        ValueError: ``warmup_steps < 0`` or ``total_steps <= warmup_steps``.
    """
    peak = _check_float("warmup_cosine: peak", peak)
    init = _check_float("warmup_cosine: init", init)
    end = _check_float("warmup_cosine: end", end)
    warmup_steps = _check_steps("warmup_cosine: warmup_steps", warmup_steps, low=0)
    total_steps = _check_steps("warmup_cosine: total_steps", total_steps, low=warmup_steps + 1)
    decay = total_steps - warmup_steps

    def schedule(step: Tensor | int) -> Tensor:
        s = _as_float_step(step)
        progress = torch.clamp((s - warmup_steps) / decay, min=0.0, max=1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + torch.cos(progress * math.pi))
        if warmup_steps == 0:
            return cosine
        warm = init + (peak - init) * (s / warmup_steps)
        return torch.where(s < warmup_steps, warm, cosine)

    return schedule


# ----------------------------------------------------------------------------- helpers


def _as_float_step(step: Tensor | int) -> Tensor:
    if isinstance(step, Tensor):
        return step.to(torch.float32)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"schedule: step must be an int or an integer tensor, got {step!r}")
    if step < 0:
        raise ValueError(f"schedule: step must be >= 0, got {step}")
    return torch.tensor(float(step), dtype=torch.float32)


def _check_float(name: str, value: object) -> float:
    # a learning rate that goes negative moves the parameters uphill: refuse it here, once
    return _checks.check_number(name, value, nonnegative=True)


def _check_steps(name: str, value: object, *, low: int) -> int:
    return _checks.check_int(name, value, low=low)
