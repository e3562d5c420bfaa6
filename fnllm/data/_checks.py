"""Boundary checks shared by the data transforms (private).

Static checks (Python scalars, dtypes, shapes) always run. Data-dependent checks (token-id
ranges, lengths) run only in eager mode: under ``torch.compile`` tracing and inside
``torch.func`` transforms they are skipped, because reading a tensor's values there either
breaks the graph or is not allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)  # signed: labels hold -100


def tracing(*tensors: object) -> bool:
    """True under ``torch.compile`` tracing or when any tensor is a functorch wrapper."""
    if torch.compiler.is_compiling():
        return True
    return any(
        isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in tensors
    )


def check_int_tensor(name: str, x: object) -> Tensor:
    """Raise unless ``x`` is a tensor of a signed integer dtype with at least one dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise ValueError(f"{name}: expected a signed integer dtype, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    return x


def check_mask(name: str, mask: object, like: Tensor) -> Tensor:
    """Raise unless ``mask`` is a real (bool/int/float) tensor with the shape of ``like``.

    Masks are read as ``mask != 0``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise ValueError(f"{name}: expected a bool, integer or float dtype, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(mask.shape)} != tokens shape {tuple(like.shape)}")
    return mask


def check_ids_in_range(name: str, ids: Tensor, vocab_size: int) -> None:
    """Raise naming the first id outside ``[0, vocab_size)`` (eager only)."""
    if tracing(ids) or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        value = int(ids[tuple(where)])
        rel = "< 0" if value < 0 else f">= vocab_size {vocab_size}"
        raise ValueError(f"{name}: id {value} at {where} {rel}")


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Raise unless ``value`` is a Python int (not bool) at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}: {value} < {low}")
    return value


def check_ids(name: str, ids: Iterable[object], vocab_size: int) -> tuple[int, ...]:
    """Validate a collection of Python token ids; return them sorted and deduplicated."""
    out = set()
    for i in ids:
        if isinstance(i, Tensor) and i.numel() == 1:
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name}: expected int ids, got {i!r}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name}: id {i} outside [0, vocab_size {vocab_size})")
        out.add(i)
    return tuple(sorted(out))
