"""The benchmark harness: paired comparisons and the GEMM-time floor."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks._harness import Ratio, compare, matmul_ms, print_table, time_fn


def test_matmul_ms_counts_gemms_only() -> None:
    a, b = torch.ones(64, 64), torch.ones(64, 64)
    assert matmul_ms(lambda: a @ b, runs=1) > 0
    assert matmul_ms(lambda: torch.addmm(a, a, b), runs=1) > 0
    assert matmul_ms(lambda: torch.bmm(a[None], b[None]), runs=1) > 0
    assert matmul_ms(lambda: (a + b).exp().sum(), runs=1) == 0


def test_matmul_ms_is_a_part_of_the_call() -> None:
    a = torch.ones(128, 128)

    def work() -> torch.Tensor:
        y = a @ a
        time.sleep(0.01)  # not a GEMM: must not be counted
        return y

    assert matmul_ms(work, runs=1) < 10


def test_compare_orders_a_slow_and_a_fast_callable() -> None:
    c = compare(lambda: time.sleep(0.004), lambda: time.sleep(0.001), warmup=0, runs=3)
    assert c.a.median > c.b.median
    assert c.ratio > 1.5


def test_time_fn_and_compare_reject_no_runs() -> None:
    with pytest.raises(ValueError, match="runs must be >= 1"):
        time_fn(lambda: None, runs=0)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        compare(lambda: None, lambda: None, runs=0)


def test_compare_ratio_carries_the_spread_of_paired_ratios() -> None:
    c = compare(lambda: time.sleep(0.003), lambda: time.sleep(0.001), warmup=0, runs=5)
    assert isinstance(c.ratio, Ratio)
    assert c.ratio.min <= c.ratio <= c.ratio.max
    # every paired ratio lies between the extremes the two sides' stats allow
    assert c.ratio.min >= c.a.min / c.b.max - 1e-9
    assert c.ratio.max <= c.a.max / c.b.min + 1e-9
    inv = 1 / c.ratio
    assert isinstance(inv, Ratio)
    assert inv.min == pytest.approx(1 / c.ratio.max) and inv.max == pytest.approx(1 / c.ratio.min)
    assert float(inv) == pytest.approx(1 / float(c.ratio))


def test_print_table_shows_the_spread_beside_the_ratio(capsys: pytest.CaptureFixture) -> None:
    c = compare(lambda: time.sleep(0.002), lambda: time.sleep(0.001), warmup=0, runs=3)
    print_table([["row", c.a.median, c.b.median, c.ratio], ["plain", 1.0, 2.0, 0.5]], title="t")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| row"))
    ratio_cell = row.split("|")[4].strip()
    median, spread = ratio_cell.split(" ", 1)
    lo, hi = (float(v) for v in spread.strip("[]").split(", "))
    assert lo <= float(median) <= hi
    assert float(median) == pytest.approx(float(c.ratio), abs=1e-3)
    assert "median [min, max]" in out
    assert "| 0.500 " in out  # a plain float stays a plain number


def test_llm_memory_counts_a_quantized_weight_by_what_it_stores() -> None:
    pytest.importorskip("torchao")
    from benchmarks.llm_memory import _held_bytes
    from fnllm import io

    w = torch.zeros(64, 256)
    q = io.quantize({"l": {"weight": w}}, "l", "nf4")["l"]["weight"]
    assert _held_bytes([w, w[1:]]) == 64 * 256 * 4  # one storage, counted once
    packed = _held_bytes([q])  # 4 bits a weight, plus the 8-bit scales and their factors
    assert 64 * 256 // 2 <= packed < 64 * 256 // 2 * 1.2  # (a view keeps its whole storage)
