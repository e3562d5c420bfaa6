"""Shared test settings."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

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

# Two cores on CI: keep intra-op threads at the core count and never spin-wait.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
