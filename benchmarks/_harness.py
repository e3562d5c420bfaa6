"""A small timing harness shared by every benchmark.

- :func:`time_fn` warms a callable up, times ``runs`` calls and returns median/min/max.
- :func:`compare` interleaves two callables (A, B, A, B, ...) in one process so that machine
  noise hits both alike, and reports each one's median plus the median of the paired ratios
  (a :class:`Ratio`: a float that also carries the min and max of the paired ratios).
- :func:`print_table` prints one aligned table: workload, fnllm, peer, ratio; a ratio cell
  shows its spread as ``median [min, max]``, so a noisy row shows itself.
- :func:`matmul_ms` profiles one call and returns the time its matrix multiplies took (the
  floor no fusion can go below).

Times are in milliseconds. Call ``sync`` (e.g. ``torch.cuda.synchronize``) inside the timed
callable's wrapper when timing asynchronous devices; :func:`time_fn` and :func:`compare` take a
``sync`` argument for that.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Comparison",
    "Ratio",
    "Stats",
    "add_model_args",
    "compare",
    "load_average",
    "matmul_ms",
    "print_table",
    "time_fn",
]


@dataclass(frozen=True)
class Stats:
    """Timing summary of one callable, in milliseconds."""

    median: float
    min: float
    max: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median:.3f} ms (min {self.min:.3f}, max {self.max:.3f}, n={self.runs})"


class Ratio(float):
    """The median of paired ratios A/B, a float carrying their spread (``min``, ``max``).

    It prints as ``median [min, max]`` in :func:`print_table`; ``1 / r`` (a throughput ratio)
    is a ``Ratio`` too, with the spread inverted.

    Example:
        >>> r = Ratio(1.5, 1.2, 2.0)
        >>> float(r), r.min, r.max, str(r)
        (1.5, 1.2, 2.0, '1.500 [1.200, 2.000]')
        >>> (1 / r).min, (1 / r).max
        (0.5, 0.8333333333333334)
    """

    min: float
    max: float

    def __new__(cls, median: float, lo: float, hi: float) -> Ratio:
        r = super().__new__(cls, median)
        r.min, r.max = lo, hi
        return r

    def __rtruediv__(self, other: object) -> Ratio | float:
        if isinstance(other, (int, float)) and other > 0 and self.min > 0:
            return Ratio(other / float(self), other / self.max, other / self.min)
        return float(other) / float(self)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{_fmt(float(self))} [{_fmt(self.min)}, {_fmt(self.max)}]"

    def __repr__(self) -> str:
        return f"Ratio({float(self)!r}, {self.min!r}, {self.max!r})"


@dataclass(frozen=True)
class Comparison:
    """Interleaved A/B timing: each side's stats and the median of the paired ratios A/B."""

    a: Stats
    b: Stats
    ratio: Ratio  # median (and min, max) over runs of time_a / time_b: paired, same noise


def _noop() -> None:
    return None


def _timed(
    fn: Callable[[], Any], sync: Callable[[], Any], clock: Callable[[], float] = time.perf_counter
) -> float:
    sync()
    t0 = clock()
    fn()
    sync()
    return (clock() - t0) * 1e3


def cpu_clock() -> float:
    """Seconds of CPU time of this process (user + system, every thread): a clock for
    :func:`compare` that a loaded machine slows down less than the wall clock.

    Example:
        >>> cpu_clock() > 0
        True
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stats(times: Sequence[float]) -> Stats:
    return Stats(statistics.median(times), min(times), max(times), len(times))


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    runs: int = 10,
    sync: Callable[[], Any] = _noop,
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed ones.

    Example:
        >>> s = time_fn(lambda: sum(range(1000)), warmup=1, runs=3)
        >>> s.runs
        3
    """
    if runs < 1:
        raise ValueError(f"time_fn: runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    return _stats([_timed(fn, sync) for _ in range(runs)])


def compare(
    a: Callable[[], Any],
    b: Callable[[], Any],
    *,
    warmup: int = 3,
    runs: int = 10,
    sync: Callable[[], Any] = _noop,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time two callables interleaved (A, B, A, B, ...) and pair their ratios.

    The order alternates each round (AB, BA, AB, ...) so neither side always runs second.
    ``clock`` is the wall clock by default; :func:`cpu_clock` measures CPU time instead.

    Example:
        >>> c = compare(lambda: sum(range(2000)), lambda: sum(range(1000)), warmup=1, runs=5)
        >>> c.ratio > 0
        True
    """
    if runs < 1:
        raise ValueError(f"compare: runs must be >= 1, got {runs}")
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            ta.append(_timed(a, sync, clock))
            tb.append(_timed(b, sync, clock))
        else:
            tb.append(_timed(b, sync, clock))
            ta.append(_timed(a, sync, clock))
    ratios = [x / y for x, y in zip(ta, tb)]
    ratio = Ratio(statistics.median(ratios), min(ratios), max(ratios))
    return Comparison(_stats(ta), _stats(tb), ratio)


def add_model_args(
    p: argparse.ArgumentParser, workloads: Sequence[str], dtypes: Sequence[str]
) -> None:
    """Add the flags the model benchmarks share (workloads, device, dtype, runs, compile)."""
    p.add_argument("--workloads", default=",".join(workloads), help="comma-separated names")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(dtypes))
    p.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None)
    g.add_argument("--no-compile", dest="compile", action="store_false")


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def matmul_ms(fn: Callable[[], Any], sync: Callable[[], Any] = _noop, runs: int = 3) -> float:
    """Milliseconds one call of ``fn`` spends in matrix multiplies (median of ``runs`` calls).

    Profiles each call with :mod:`torch.profiler` and sums the self time of the GEMM ops
    (``MATMUL_OPS``): on CPU their CPU time, on CUDA their device time. Compiled code that calls
    extern GEMMs (inductor's default) is counted too; fused attention kernels are not.

    Example:
        >>> import torch
        >>> a = torch.ones(64, 64)
        >>> matmul_ms(lambda: a @ a, runs=1) > 0, matmul_ms(lambda: a + a, runs=1)
        (True, 0.0)
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    sync()
    totals = []
    for _ in range(runs):
        with profile(activities=acts) as prof:
            fn()
            sync()
        events = [e for e in prof.key_averages() if e.key in MATMUL_OPS]
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        totals.append(sum(getattr(e, attr) for e in events) / 1e3)
    return statistics.median(totals)


def load_average() -> str:
    """The 1/5/15-minute load averages, for the benchmark's header line."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def print_table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str] = ("workload", "fnllm ms", "peer ms", "ratio"),
    title: str | None = None,
) -> None:
    """Print rows as one aligned plain-text table (markdown-compatible).

    A :class:`Ratio` cell prints as ``median [min, max]`` of the paired ratios, and the
    table then ends with a line saying so.

    Example:
        >>> print_table([["x", 2.0, 1.0, Ratio(2.0, 1.9, 2.5)]])
        | workload | fnllm ms | peer ms | ratio                |
        |----------|----------|---------|----------------------|
        | x        | 2.000    | 1.000   | 2.000 [1.900, 2.500] |
        ratio: median [min, max] of the paired per-run ratios
    """
    cells = [[_fmt(c) for c in header], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    if title:
        print(f"\n{title}  (load average {load_average()})")
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    if any(isinstance(c, Ratio) for r in rows for c in r):
        print("ratio: median [min, max] of the paired per-run ratios")


def _fmt(x: Any) -> str:
    if isinstance(x, Ratio):
        return str(x)
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return str(x)
