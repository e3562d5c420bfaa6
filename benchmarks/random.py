"""fnllm.random (threefry2x32, JAX-identical bits) vs torch.rand, eager and compiled.

Run: ``.venv/bin/python -m benchmarks.random [--quick] [--threads N] [--runs N]``.
Never as ``python benchmarks/random.py``: a script named ``random.py`` shadows the standard
library's ``random`` for everything imported after it (the guard below drops this folder
from ``sys.path`` if you do).

Rows: ``bits`` (the 32-bit draw held in int64, the default) and ``uniform`` (float32 in
[0, 1)) for 32x512 and 256x512, each eager (one Python call; draws of 4096+ values run the
threefry hash as one kernel compiled on first use, see ``fnllm.random``) and compiled
(``torch.compile(fullgraph=True)``: fused into the caller); plus ``bits[uint32]`` compiled
(the same draw as ``torch.uint32``: inductor does not vectorise that dtype). Peer:
``torch.rand`` of the same shape (a stateful generator, no key). Second table:
``fnllm.nn.dropout`` (rate 0.1, [32, 12, 50, 50] float32, attention-probability sized)
eager and compiled against eager ``torch.nn.functional.dropout``. Times are medians of
interleaved A/B runs (``benchmarks/_harness.py``); ratio = fnllm / peer, the median of the
paired ratios with their [min, max]. Goals: eager sampling <= 3x, eager dropout <= 1.5x,
compiled <= 2x. ``--quick``: 32x512 and dropout, eager only, few runs.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):  # run as a script: unshadow `random`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))  # the repo root, for `benchmarks._harness`

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._harness import compare, print_table
from fnllm import nn as fnn
from fnllm import random as fr

SHAPES = [(32, 512), (256, 512)]
DROPOUT_SHAPE = (32, 12, 50, 50)
DROPOUT_RATE = 0.1


def samplers(shape: tuple[int, ...]) -> list[tuple[str, Callable[[torch.Tensor], Any], bool]]:
    """The fnllm callables benchmarked for one shape: (name, fn, also time it eagerly)."""
    return [
        ("bits", lambda k: fr.bits(k, shape), True),
        ("bits[uint32]", lambda k: fr.bits(k, shape, torch.uint32), False),
        ("uniform", lambda k: fr.uniform(k, shape), True),
    ]


def run(shape: tuple[int, ...], *, runs: int, warmup: int, compiled: bool) -> list[list[Any]]:
    key = fr.key(0)
    peer = lambda: torch.rand(shape)
    rows = []
    for name, fn, eager in samplers(shape):
        variants = [("eager", fn)] if eager else []
        if compiled:
            cfn = torch.compile(fn, fullgraph=True)
            t0 = time.perf_counter()
            out = cfn(key)
            assert torch.equal(out, fn(key)), f"{name}: compiled differs from eager"
            print(f"# {name} {shape}: compile took {time.perf_counter() - t0:.1f} s", flush=True)
            variants.append(("compiled", cfn))
        for mode, f in variants:
            c = compare(lambda f=f: f(key), peer, warmup=warmup, runs=runs)
            label = f"{name} {shape[0]}x{shape[1]} {mode}"
            rows.append([label, c.a.median, c.b.median, c.ratio])
    return rows


def run_dropout(*, runs: int, warmup: int, compiled: bool) -> list[list[Any]]:
    """fnllm.nn.dropout (eager, and compiled if asked) vs eager F.dropout, training mode."""
    key = fr.key(0)
    x = fr.uniform(fr.key(1), DROPOUT_SHAPE)
    fn = lambda k, x: fnn.dropout(k, x, DROPOUT_RATE)
    peer = lambda: torch.nn.functional.dropout(x, DROPOUT_RATE, training=True)
    variants = [("eager", fn)]
    if compiled:
        cfn = torch.compile(fn, fullgraph=True)
        t0 = time.perf_counter()
        out = cfn(key, x)
        assert torch.equal(out, fn(key, x)), "dropout: compiled differs from eager"
        print(f"# dropout: compile took {time.perf_counter() - t0:.1f} s", flush=True)
        variants.append(("compiled", cfn))
    rows = []
    for mode, f in variants:
        c = compare(lambda f=f: f(key, x), peer, warmup=warmup, runs=runs)
        label = f"dropout {'x'.join(map(str, DROPOUT_SHAPE))} p={DROPOUT_RATE} {mode}"
        rows.append([label, c.a.median, c.b.median, c.ratio])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x512 and dropout, eager only, few runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--eager-only", action="store_true", help="all shapes, no compiled rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.runs or (5 if args.quick else 31)
    shapes = SHAPES[:1] if args.quick else SHAPES
    compiled = not (args.quick or args.eager_only)
    warmup = 2 if args.quick else 5
    table: list[list[Any]] = []
    for shape in shapes:
        table += run(shape, runs=runs, warmup=warmup, compiled=compiled)
    print_table(
        table,
        header=("workload", "fnllm ms", "torch.rand ms", "ratio"),
        title=f"fnllm.random vs torch.rand (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
    )
    drop = run_dropout(runs=runs, warmup=warmup, compiled=compiled)
    print_table(
        drop,
        header=("workload", "fnllm ms", "F.dropout ms", "ratio"),
        title=f"fnllm.nn.dropout vs F.dropout ({torch.get_num_threads()} threads)",
    )


if __name__ == "__main__":
    main()
