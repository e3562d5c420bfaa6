"""The eager fast path of :mod:`fnllm.random` (private): the threefry hash as one compiled kernel.

An eager draw of many values would otherwise run ~150 small tensor ops; this module compiles the
whole hash once per kind (dynamic shapes, so one compile serves every size) and falls back to
the plain ops (same bits) where compiling is impossible or pointless.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fnllm.random._keys import _threefry

# Eager draws of at least _FAST_MIN values run the threefry hash as one compiled kernel
# (torch.compile with dynamic shapes: one compile per kind and device for every size), instead
# of ~150 separate tensor ops. Smaller draws, traced code (which inductor fuses by itself) and
# draws inside torch.func transforms take the op path; both give the same bits.
_FAST_MIN = 4096
# A kind is compiled only once a process has made this many large eager draws of it: a training
# loop (dropout in every block, every step) gets there within a step or two and then runs the
# fused kernel, while a one-off draw (shuffling a data set once) never pays the compile, which
# costs seconds (cached by inductor) to tens of seconds (a cold machine).
_FAST_AFTER = 8
# FNLLM_EAGER_SAMPLER: "auto" (the default: compile after _FAST_AFTER large draws), "compiled"
# (compile on the first large draw), "ops" (never compile). Same values in every mode.
_MODE_VARIABLE = "FNLLM_EAGER_SAMPLER"
_MODES = ("auto", "compiled", "ops")

_FAST_DEVICES = ("cpu",)
_FAST_CACHE: dict[str, Any] = {}


def _fast_draw(kind: str, key: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """Draw with the compiled core, flat then reshaped; ``None`` where the op path must run.

    ``key`` is a checked int64 key (``_key_words``).

    Kinds: ``"bits"`` (32 random bits in int64), ``"unit"`` (float32 in [0, 1)). Each kind
    is compiled once the process has made ``_FAST_AFTER`` large draws of it (at once with
    ``FNLLM_EAGER_SAMPLER=compiled``, never with ``=ops``);
    if compiling fails (no C++ compiler, ...) a warning says so once and every later draw
    takes the op path.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    n = math.prod(shape)
    if n < _FAST_MIN or n > 2**32 or key.device.type not in _FAST_DEVICES:
        return None
    if _FAST_CACHE.get("broken"):
        return None
    fn = _FAST_CACHE.get(kind)
    if fn is None:
        mode = _mode()
        seen = _FAST_CACHE[f"seen:{kind}"] = _FAST_CACHE.get(f"seen:{kind}", 0) + 1
        if mode == "ops" or (mode == "auto" and seen < _FAST_AFTER):
            return None
        fn = _FAST_CACHE[kind] = torch.compile(_FAST_CORES[kind], dynamic=True, fullgraph=True)
    try:
        with torch.no_grad():
            out = fn(key, n)
    except Exception as e:  # compile failures surface as many exception types
        _FAST_CACHE["broken"] = True
        warnings.warn(
            f"fnllm.random: compiling the eager sampling core failed ({type(e).__name__}: "
            f"{e}); eager draws fall back to plain tensor ops (same values, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return out.reshape(shape)


def _mode() -> str:
    mode = os.environ.get(_MODE_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{_MODE_VARIABLE}={mode!r}: expected one of {list(_MODES)}")
    return mode


def _core_bits(key: Tensor, n: int) -> Tensor:
    x0, x1 = _threefry(key[0], key[1], None, torch.arange(n, dtype=torch.int64, device=key.device))
    return x0 ^ x1


def _core_unit(key: Tensor, n: int) -> Tensor:
    return (_core_bits(key, n) >> 9).to(torch.float32) * 2.0**-23


_FAST_CORES: dict[str, Callable[..., Tensor]] = {
    "bits": _core_bits,
    "unit": _core_unit,
}
