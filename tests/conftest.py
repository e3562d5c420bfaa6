"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from fnllm import _deprecation

# CI explores a fixed sequence of examples (derandomized) so a red run is reproducible;
# locally hypothesis explores freely.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Tests use tiny models, where one intra-op thread is fastest and immune to a busy machine
# (measured: a tiny eager train step took 62 ms with 1 thread, 2378 ms with 2 on a loaded
# 2-core machine). `make test` runs two pytest workers (xdist) to use both cores instead.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_deprecation_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """fnllm warns once per process for each deprecated name: each test starts afresh, so a
    test that expects the warning does not depend on which tests ran before it."""
    monkeypatch.setattr(_deprecation, "_warned", set())
