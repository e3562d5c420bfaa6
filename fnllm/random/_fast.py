"""The fast paths of :mod:`fnllm.random` (private): the threefry hash outside the op-by-op path.

Eager: a draw of many values would otherwise run ~150 small tensor ops; it runs the hash in
the native kernel of ``_native`` (a few lines of C built once per machine in under a second,
cached in fnllm's cache folder) instead. Compiled: a Bernoulli mask with a Python-float
probability (every ``nn.dropout`` mask) is drawn by the custom op ``fnllm::keep_mask``, one
opaque call that inductor neither fuses into the kernels reading the mask nor recomputes in the
backward (it saves the 1-byte mask instead): fused, the hash made a compiled train step with
dropout take minutes to compile. Every path gives the same bits.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fnllm.random import _native
from fnllm.random._keys import _MASK, _random_bits32, _threefry

# Eager draws of at least _FAST_MIN values run the native kernel. Smaller draws, traced code
# and draws inside torch.func transforms take the op path; both give the same bits.
_FAST_MIN = 4096
# Building the kernel (once per machine, then cached on disk) costs a C compile of ~0.3 s. In
# "auto" mode a process builds or loads it at its first draw of _FAST_BIG values or more (the op
# path would take longer than the build), or once it has made _FAST_AFTER large draws (a
# training loop gets there within a step); a one-off draw of a few thousand values (shuffling a
# data set once) never pays it.
_FAST_BIG = 1 << 14
_FAST_AFTER = 8
# FNLLM_EAGER_SAMPLER: "auto" (the default, see above), "compiled" (build and use the native
# kernel at the first large draw; the name is historical), "ops" (never). Same values in every
# mode.
_MODE_VARIABLE = "FNLLM_EAGER_SAMPLER"
_MODES = ("auto", "compiled", "ops")

_FAST_DEVICES = ("cpu",)
_FAST_CACHE: dict[str, Any] = {}


def _fast_draw(kind: str, key: Tensor, shape: tuple[int, ...], threshold: int = 0) -> Tensor | None:
    """Draw with the native kernel, flat then reshaped; ``None`` where the op path must run.

    ``key`` is a checked int64 key (``_key_words``).

    Kinds: ``"bits"`` (32 random bits in int64), ``"unit"`` (float32 in [0, 1)), ``"below"``
    (bool: a float32 unit value below ``threshold * 2**-23``). The kernel is loaded (built on
    a machine's first use) as the mode allows (see ``_FAST_AFTER``); if that fails (no C
    compiler, ...) a warning says so once and every later draw takes the op path.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    n = math.prod(shape)
    if n < _FAST_MIN or n > 2**32 or key.device.type not in _FAST_DEVICES:
        return None
    if torch._subclasses.fake_tensor.is_fake(key):  # shapes only (e.g. a memory plan): no data
        return None
    if _FAST_CACHE.get("broken"):
        return None
    fn = _FAST_CACHE.get(kind)
    if fn is None:
        mode = _mode()
        seen = _FAST_CACHE[f"seen:{kind}"] = _FAST_CACHE.get(f"seen:{kind}", 0) + 1
        if mode == "ops" or (mode == "auto" and seen < _FAST_AFTER and n < _FAST_BIG):
            return None
        fn = _FAST_CACHE[kind] = _native_core(kind)
    try:
        with torch.no_grad():
            out = fn(key, n, threshold) if kind == "below" else fn(key, n)
    except Exception as e:  # build failures surface as many exception types
        _FAST_CACHE["broken"] = True
        warnings.warn(
            f"fnllm.random: the native sampling kernel failed ({type(e).__name__}: "
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


def _native_core(kind: str) -> Callable[..., Tensor]:
    def core(key: Tensor, n: int, *threshold: int) -> Tensor:
        k0, k1 = key.tolist()
        return _native.draw(kind, k0 & _MASK, k1 & _MASK, n, *threshold)

    return core


def below_threshold(p: float) -> int:
    """The integer ``t`` with ``uniform < float32(p)`` exactly when ``bits >> 9 < t``.

    A float32 unit value is ``m * 2**-23`` with ``m = bits >> 9`` an integer, and
    ``float32(p) * 2**23`` is exact in float64, so ``m * 2**-23 < p`` iff ``m < ceil(p * 2**23)``.
    """
    p32 = struct.unpack("f", struct.pack("f", p))[0]  # round to float32 (nearest even)
    return math.ceil(p32 * 2.0**23)


# A Python float in, an int out: Dynamo calls it and keeps the result as a trace constant. What
# torch.compiler.assume_constant_result sets, without importing torch._dynamo with fnllm
# (slow, and it pulls in optional packages).
below_threshold._dynamo_marked_constant = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the compiled mask op


@torch.library.custom_op("fnllm::keep_mask", mutates_args=(), device_types=None)
def keep_mask(key: Tensor, shape: list[int], threshold: int) -> Tensor:
    """``uniform(key, shape) < p`` as bool, with ``threshold = below_threshold(p)``.

    One opaque call under ``torch.compile``: inductor runs it as its own kernel and keeps its
    1-byte result for the backward, instead of fusing (and recomputing) the threefry hash into
    every kernel that reads the mask. Same bits as :func:`fnllm.random.bernoulli`.
    """
    n = math.prod(shape)
    if key.device.type in _FAST_DEVICES and 0 < n <= 2**32 and not _FAST_CACHE.get("broken"):
        try:
            k0, k1 = key.tolist()
            out = _native.draw("below", k0 & _MASK, k1 & _MASK, n, threshold)
            return out.reshape(shape)
        except Exception as e:
            _FAST_CACHE["broken"] = True
            warnings.warn(
                f"fnllm.random: the native sampling kernel failed ({type(e).__name__}: {e}); "
                "compiled dropout masks fall back to plain tensor ops (same values, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
    b = _random_bits32(key[0], key[1], tuple(shape), key.device)
    return (b >> 9) < threshold


@keep_mask.register_fake
def _keep_mask_fake(key: Tensor, shape: list[int], threshold: int) -> Tensor:
    return key.new_empty(shape, dtype=torch.bool)


def _keep_mask_vmap(
    info: Any, in_dims: tuple[Any, ...], key: Tensor, shape: list[int], threshold: int
) -> tuple[Tensor, Any]:
    if in_dims[0] is None:
        return keep_mask(key, shape, threshold), None
    keys = key.movedim(in_dims[0], 0)
    return torch.stack([keep_mask(k, shape, threshold) for k in keys]), 0


torch.library.register_vmap("fnllm::keep_mask", _keep_mask_vmap)


@torch.library.custom_op("fnllm::threefry_pairs", mutates_args=(), device_types=None)
def threefry_pairs(key: Tensor, start: int, n: int) -> Tensor:
    """New keys ``[n, 2]``: the hash of counters ``start .. start + n - 1`` under ``key``.

    ``split(key, n)`` is ``threefry_pairs(key, 0, n)``, ``fold_in(key, d)`` is
    ``threefry_pairs(key, d, 1)[0]``. Under ``torch.compile`` the few new keys of a step come
    from this opaque call: traced, their 20 rounds of int64 ops were fused into large kernels
    (e.g. the embedding's) that took long to generate and compile.
    """
    if key.device.type in _FAST_DEVICES and not _FAST_CACHE.get("broken"):
        try:
            k0, k1 = key.tolist()
            return _native.pairs(k0 & _MASK, k1 & _MASK, start, n).to(key.device)
        except Exception as e:
            _FAST_CACHE["broken"] = True
            warnings.warn(
                f"fnllm.random: the native sampling kernel failed ({type(e).__name__}: {e}); "
                "compiled key splits fall back to plain tensor ops (same values, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
    counters = torch.arange(start, start + n, dtype=torch.int64, device=key.device)
    x0, x1 = _threefry(key[0], key[1], None, counters)
    return torch.stack([x0, x1], dim=-1)


@threefry_pairs.register_fake
def _threefry_pairs_fake(key: Tensor, start: int, n: int) -> Tensor:
    return key.new_empty((n, 2), dtype=torch.int64)


def _threefry_pairs_vmap(
    info: Any, in_dims: tuple[Any, ...], key: Tensor, start: int, n: int
) -> tuple[Tensor, Any]:
    if in_dims[0] is None:
        return threefry_pairs(key, start, n), None
    keys = key.movedim(in_dims[0], 0)
    return torch.stack([threefry_pairs(k, start, n) for k in keys]), 0


torch.library.register_vmap("fnllm::threefry_pairs", _threefry_pairs_vmap)
