"""Argument checks shared by every fnllm module (private; public names are re-exported by
:mod:`fnllm.nn`).

Static checks (Python scalars, dtypes, shapes) always run. Data-dependent checks (id ranges,
lengths) read tensor values, which is not possible while ``torch.compile`` traces and not
allowed inside ``torch.func`` transforms; two questions decide when they run:

- :func:`checks_enabled`: no tensor at hand: eager and not inside ``vmap``;
- :func:`tracing`: given the tensors to read: tracing, or one of them is a ``torch.func``
  wrapper (``grad`` or ``vmap``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_current_functorch_interpreter

IGNORE_INDEX = -100  # the label of a position no loss counts (as in PyTorch and transformers)

_SIGNED_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)  # labels hold -100


def in_vmap() -> bool:
    """Whether the caller runs inside ``torch.func.vmap`` (at any level of nesting).

    Works in eager mode and while ``torch.compile`` traces (the answer is a trace-time
    constant, so it causes no graph break). ``torch.func.grad`` alone does not count.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.in_vmap()
        False
        >>> torch.func.vmap(lambda x: x + nn.in_vmap())(torch.zeros(2))
        tensor([1., 1.])

    Returns:
        ``True`` when a vmap transform is active.
    """
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        return _vmap_on_stack()
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == TransformType.Vmap for level in stack)


def checks_enabled() -> bool:
    """Whether data-dependent input checks can run: eager mode and not inside ``vmap``.

    Example:
        >>> from fnllm import nn
        >>> nn.checks_enabled()
        True

    Returns:
        ``False`` while ``torch.compile`` traces or inside ``torch.func.vmap``.
    """
    return not torch.compiler.is_compiling() and not in_vmap()


def has_values(x: Tensor) -> bool:
    """False for a tensor without data to read: on the ``meta`` device, or a fake tensor
    (``fnllm.memory.plan`` runs steps on them)."""
    return x.device.type != "meta" and not torch._subclasses.fake_tensor.is_fake(x)


def wrapped(x: object) -> bool:
    """True for a ``torch.func`` wrapper tensor seen eagerly (False while compiling)."""
    if torch.compiler.is_compiling():
        return False
    return isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)


def tracing(*tensors: object) -> bool:
    """True when values may not be read: under ``torch.compile`` tracing, or when any tensor
    is a ``torch.func`` wrapper or has no values (meta or fake: ``fnllm.memory.plan``)."""
    return torch.compiler.is_compiling() or any(
        wrapped(t) or (isinstance(t, Tensor) and not has_values(t)) for t in tensors
    )


def check_ids(ids: Any, size: int, *, name: str = "tokens") -> Tensor:
    """Validate integer ids for an embedding lookup of ``size`` rows.

    The dtype check always runs; the range check (which reads the values) runs only when
    :func:`checks_enabled`.

    Example:
        >>> import torch
        >>> from fnllm import nn
        >>> nn.check_ids(torch.tensor([[1, 2], [3, 9]]), 5)
        Traceback (most recent call last):
        ...
        ValueError: tokens: id 9 at [1, 1] >= vocab_size 5

    Args:
        ids: the candidate ids.
        size: the number of rows (ids must be in ``[0, size)``).
        name: how the error message names ``ids`` (the bound is called ``vocab_size`` for
            ``"tokens"`` and ``size`` otherwise).

    Returns:
        ``ids`` as an int64 or int32 tensor (other integer dtypes are widened to int64).

    Raises:
        TypeError: ``ids`` is not a tensor, or not of an integer dtype.
        ValueError: an id is out of range; the message names the first one and its index.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {ids.dtype}")
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    if checks_enabled():
        check_id_range(name, ids, size, bound="vocab_size" if name == "tokens" else "size")
    return ids


def check_id_range(
    name: str, ids: Tensor, size: int, *, bound: str = "vocab_size", ignore: int | None = None
) -> None:
    """Raise naming the first id outside ``[0, size)`` (other than ``ignore``); one host sync.

    The caller decides whether values may be read (:func:`checks_enabled`, :func:`tracing`).
    """
    if ids.numel() == 0 or not has_values(ids):
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low >= 0 and high < size:
        return
    bad = (ids < 0) | (ids >= size)
    if ignore is not None:
        bad = bad & (ids != ignore)
    if not bool(bad.any()):
        return
    where = [int(i) for i in bad.nonzero()[0]]
    value = int(ids[tuple(where)])
    rel = "< 0" if value < 0 else f">= {bound} {size}"
    extra = f" (and is not ignore_index {ignore})" if ignore is not None else ""
    raise ValueError(f"{name}: id {value} at {where} {rel}{extra}")


def check_keys(prefix: str, missing: list[str], unexpected: list[str]) -> None:
    """Raise one ``KeyError`` listing the missing and the unexpected keys, if there are any."""
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    raise KeyError(prefix + "; ".join(parts))


def few(items: list[str], limit: int = 8) -> str:
    """Name up to ``limit`` items, then say how many more."""
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Raise unless ``value`` is a Python int (not bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}: {value} < {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}: {value} > {high}")
    return value


INT64_MAX = 2**63 - 1  # the largest token id an int64 tensor holds


def check_number(
    name: str, value: object, *, positive: bool = False, nonnegative: bool = False
) -> float:
    """Raise unless ``value`` is a finite real number (with the sign asked for)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")
    return value


def check_range(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """Raise unless ``value`` (a number or a real tensor) is finite and within the bounds.

    A Python number is checked and returned as a float. A tensor is returned unchanged; its
    values are read (one host sync) only when that is allowed (not while tracing and not a
    ``torch.func`` wrapper), so the same hyper-parameter given as a tensor gets the checks a
    float gets wherever they can run. ``low_open``/``high_open`` exclude the bound itself.
    """
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected a real number or tensor, got dtype {value.dtype}")
        if value.numel() == 0 or tracing(value):
            return value
        lo, hi = (float(v) for v in torch.stack(torch.aminmax(value.detach().double())))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}: expected finite values, got a tensor holding {_bad(value)}")
        _check_bounds(name, lo, hi, low, high, low_open, high_open, " (a tensor value)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a tensor, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    _check_bounds(name, value, value, low, high, low_open, high_open, "")
    return value


def check_int_tensor(name: str, x: object) -> Tensor:
    """Raise unless ``x`` is a tensor of a signed integer dtype with at least one dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SIGNED_INTS:
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


def check_id_list(name: str, ids: Iterable[object], vocab_size: int) -> tuple[int, ...]:
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


def check_logits(name: str, logits: Any) -> None:
    """Refuse logits no token can be drawn from: NaN or +inf anywhere, or a row all -inf.

    Every sampler would otherwise answer token 0. The dtype and shape checks always run; the
    values are read (one host sync) only outside tracing and ``torch.func`` transforms.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name}: expected floating-point logits, got {logits.dtype}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name}: expected [..., V] logits with V >= 1, got {tuple(logits.shape)}")
    if tracing(logits):
        return
    bad = torch.isnan(logits) | (logits == math.inf)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"{name}: {float(logits[tuple(where)])} at {where}: the model's output is not a "
            "distribution (do the params hold NaN or inf?)"
        )
    dead = (logits == -math.inf).all(-1)
    if bool(dead.any()):
        where = [int(i) for i in dead.nonzero()[0]]
        raise ValueError(f"{name}: every logit of row {where} is -inf: no token can be drawn")


def _vmap_on_stack() -> bool:
    """Walk the functorch interpreter stack top-down (the form dynamo can trace)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    interpreter = retrieve_current_functorch_interpreter()
    if interpreter.key() == TransformType.Vmap:
        return True
    with interpreter.lower():
        return _vmap_on_stack()


def _bad(value: Tensor) -> str:
    bad = value.detach().double()
    bad = bad[~torch.isfinite(bad)]
    return str(float(bad.reshape(-1)[0])) if bad.numel() else "non-finite values"


def _check_bounds(
    name: str,
    lo: float,
    hi: float,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
    what: str,
) -> None:
    if low is not None and (lo <= low if low_open else lo < low):
        raise ValueError(f"{name}: expected {'>' if low_open else '>='} {low}, got {lo}{what}")
    if high is not None and (hi >= high if high_open else hi > high):
        raise ValueError(f"{name}: expected {'<' if high_open else '<='} {high}, got {hi}{what}")


def check_decoder(where: str, model: Any) -> None:
    """Refuse a model that cannot score next tokens: an encoder config (BERT), or an object
    without ``apply``. A model config's own ``check_decoder`` gives the message."""
    check = getattr(model, "check_decoder", None)
    if callable(check):
        check(where)
    elif not callable(getattr(model, "apply", None)):
        raise TypeError(
            f"{where}: model: expected a causal LM config (fnllm.models.GPT, Llama, ...), "
            f"got {type(model).__name__}"
        )


def check_texts(name: str, texts: Any, *, allow_empty: bool = False) -> list[Any]:
    """Refuse anything but a list/tuple of strings (one string, None, a dict...); return a list."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name}: expected a list of strings, got one {type(texts).__name__}")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name}: expected a list of strings, got {type(texts).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{name}: empty list (need at least one)")
    return list(texts)


def check_batch_keys(where: str, batch: Any, keys: Iterable[str]) -> None:
    """Refuse a batch that is not a mapping holding ``keys`` (static: no tensor is read)."""
    if not hasattr(batch, "keys") or not hasattr(batch, "__getitem__"):
        raise TypeError(f"{where}: batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(
            f"{where}: batch lacks {few(missing)} (it has {few(sorted(map(str, batch.keys())))})"
        )
