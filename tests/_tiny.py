"""Tiny model configs shared by the test modules (a few thousand parameters, fast to run)."""

from __future__ import annotations

from typing import Any

from fnllm.models import BERT, GPT

_SHAPE = {"vocab_size": 40, "n_layer": 2, "n_head": 2, "d_model": 16, "max_len": 16}


def tiny_gpt(**overrides: Any) -> GPT:
    """A 2-layer, 16-wide GPT over 40 ids; any field can be overridden."""
    return GPT(**{**_SHAPE, **overrides})


def tiny_bert(**overrides: Any) -> BERT:
    """A 2-layer, 16-wide BERT (d_ff 32) over 40 ids; any field can be overridden."""
    return BERT(**{**_SHAPE, "d_ff": 32, **overrides})
