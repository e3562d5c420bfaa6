"""The benchmark harness: paired comparisons and the GEMM-time floor."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks._harness import compare, matmul_ms, time_fn


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
