"""The samplers of :mod:`fnllm.random` (private; see that module): each is a pure function of
a key, built on the threefry core in ``fnllm.random._keys``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fnllm.random import _fast
from fnllm.random._erfinv import _ABOVE_MINUS_ONE, _erfinv_f32
from fnllm.random._fast import _fast_draw
from fnllm.random._keys import (
    _MASK,
    _check_key,
    _check_shape,
    _counters,
    _eager,
    _key_words,
    _random_bits32,
    _threefry,
    _use_ops,
    split,
)
from fnllm.random._keys import key as key  # the examples below call key(0)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_BITS_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int64)
_SQRT2 = 1.4142135623730951


def bits(key: Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.int64) -> Tensor:
    """Draw uniform random bits, like ``jax.random.bits``.

    The default result holds JAX's uint32 values in an int64 tensor (``torch.uint32`` has
    almost no CPU kernels in torch 2.13, and compiled code that produces it is not
    vectorised: ~3x slower); pass ``dtype=torch.uint32`` for the exact dtype.

    Example:
        >>> bits(key(0), (3,))
        tensor([4070199207, 4202968722, 1427181096])
        >>> bits(key(0), (3,), torch.uint8)
        tensor([167, 146,  40], dtype=torch.uint8)

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        dtype: ``torch.int64`` (default: 32 random bits, values in ``[0, 2**32)``),
            ``torch.uint32`` (the same values), ``torch.uint8`` / ``torch.uint16`` (JAX's
            8/16-bit draws: the low bits of the 32-bit draw), or ``torch.uint64`` (JAX's
            64-bit draw, as with ``jax_enable_x64``).

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    words = _key_words("bits", key)
    shape = _check_draw("bits", shape, dtype, _BITS_DTYPES)
    if dtype == torch.uint64:
        x0, x1 = _threefry(words[0], words[1], *_counters(shape, key.device))
        return ((x0 << 32) | x1).to(torch.uint64)
    b = _fast_draw("bits", words, shape)
    if b is None:
        b = _random_bits32(words[0], words[1], shape, key.device)
    if dtype == torch.uint8:
        return (b & 0xFF).to(torch.uint8)
    if dtype == torch.uint16:
        return (b & 0xFFFF).to(torch.uint16)
    return b if dtype == torch.int64 else b.to(torch.uint32)


def uniform(
    key: Tensor,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    minval: float | Tensor = 0.0,
    maxval: float | Tensor = 1.0,
) -> Tensor:
    """Draw floats uniform in ``[minval, maxval)``, like ``jax.random.uniform``.

    Random mantissa bits give a float in ``[0, 1)`` (23 bits for float32, 10 for float16, 7
    for bfloat16), which is then scaled as ``max(minval, u * (maxval - minval) + minval)``,
    rounding as XLA on CPU does (one fused multiply-add for float32; each step rounded for
    float16/bfloat16), so the values equal JAX's bit for bit. One host exception: on CPUs with
    native float16 arithmetic (AVX512-FP16), XLA fuses the float16 scaling into one multiply-add
    too; fnllm keeps the per-step rule everywhere, so its draws never depend on the host (the
    unit floats, and every other dtype, still match). float64 follows JAX with
    ``jax_enable_x64`` (52 random bits); its scaled values may differ from JAX by 1 ulp.

    Example:
        >>> uniform(key(0), (2, 3))
        tensor([[0.9477, 0.9786, 0.3323],
                [0.4687, 0.5699, 0.1655]])
        >>> uniform(key(0), (3,), torch.bfloat16, minval=-1.0, maxval=1.0)
        tensor([ 0.2969,  0.1406, -0.6875], dtype=torch.bfloat16)

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        dtype: ``torch.float32``, ``torch.float16``, ``torch.bfloat16`` or ``torch.float64``.
        minval: lower bound (inclusive), a float or a tensor broadcastable to ``shape``.
        maxval: upper bound (exclusive), a float or a tensor broadcastable to ``shape``.

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    words = _key_words("uniform", key)
    shape = _check_draw("uniform", shape, dtype, _FLOATS)
    if (
        isinstance(minval, (int, float))
        and isinstance(maxval, (int, float))
        and not maxval >= minval
    ):
        raise ValueError(f"uniform: maxval {maxval} < minval {minval}")
    plain = not isinstance(minval, Tensor) and not isinstance(maxval, Tensor)
    if plain and dtype == torch.float32 and minval == 0 and maxval == 1:
        u = _fast_draw("unit", words, shape)
        if u is not None:
            return u
    return _uniform(words[0], words[1], shape, dtype, minval, maxval, key.device)


def normal(key: Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw standard normal floats, like ``jax.random.normal``.

    Same recipe as JAX: ``sqrt(2) * erfinv(u)`` with ``u`` uniform in ``(-1, 1)``, using the
    single-precision ``erfinv`` polynomial that XLA uses. float32 is not bit-identical:
    XLA's ``log1p`` differs from a correctly rounded one in the last bit for some inputs, so
    ~1% of values differ from JAX by 1-3 ulp (the uniform input is identical). float16 and
    bfloat16 round those differences away and match JAX bit for bit. float64 uses
    ``torch.erfinv`` (JAX with x64 uses another polynomial: equal to ~1e-12).

    Example:
        >>> normal(key(0), (3,))
        tensor([ 1.6226,  2.0253, -0.4336])

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        dtype: ``torch.float32``, ``torch.float16``, ``torch.bfloat16`` or ``torch.float64``
            (half types: ``erfinv`` computed in float32 and rounded, as XLA does).

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    k0, k1 = _check_key("normal", key)
    shape = _check_draw("normal", shape, dtype, _FLOATS)
    lo = _ABOVE_MINUS_ONE[dtype]
    u = _uniform(k0, k1, shape, dtype, lo, 1.0, key.device)
    if dtype == torch.float64:
        return torch.erfinv(u) * _SQRT2
    z = _erfinv_f32(u.to(torch.float32)).to(dtype)
    return z * torch.tensor(_SQRT2, dtype=dtype, device=key.device)


def bernoulli(key: Tensor, p: float | Tensor = 0.5, shape: Sequence[int] | None = None) -> Tensor:
    """Draw booleans that are True with probability ``p``, like ``jax.random.bernoulli``.

    Computed as ``uniform(key, shape, p.dtype) < p`` (a Python float ``p`` is float32),
    so it matches JAX bit for bit.

    Example:
        >>> bernoulli(key(0), 0.5, (5,))
        tensor([False, False,  True,  True, False])

    Args:
        key: a key (shape ``(2,)``).
        p: probability of True, a float in ``[0, 1]`` or a float tensor broadcastable to
            ``shape``.
        shape: output shape; ``None`` means ``p``'s shape.

    Returns:
        A bool tensor.
    """
    words = _key_words("bernoulli", key)
    if isinstance(p, Tensor):
        if p.dtype not in _FLOATS:
            raise TypeError(f"bernoulli: p must be a float tensor, got dtype {p.dtype}")
        dtype = p.dtype
        p_shape = tuple(p.shape)
        _check_probability("bernoulli", "p", p, upper_open=False)
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"bernoulli: p {p} outside [0, 1]")
        dtype = torch.float32
        p_shape = ()
    else:
        raise TypeError(f"bernoulli: p must be a float or a float tensor, got {type(p).__name__}")
    if shape is None:
        shape = p_shape
    shape = _check_shape("bernoulli: shape", shape)
    _check_broadcast("bernoulli", "p", p_shape, shape)
    if not isinstance(p, Tensor):
        threshold = _fast.below_threshold(float(p))
        if _use_ops(key) and 0 < math.prod(shape) <= 2**32:
            # one opaque op: not fused into (nor recomputed by) every kernel reading the mask
            return torch.ops.fnllm.keep_mask(words, list(shape), threshold)
        keep = _fast_draw("below", words, shape, threshold)
        if keep is not None:
            return keep
        p = torch.tensor(float(p), dtype=dtype, device=key.device)
    elif dtype == torch.float32 and p.dim() == 0 and p.device == key.device:
        u = _fast_draw("unit", words, shape)
        if u is not None:
            return u < p
    return _uniform(words[0], words[1], shape, dtype, 0.0, 1.0, key.device) < p


def randint(
    key: Tensor,
    shape: Sequence[int],
    minval: int | Tensor,
    maxval: int | Tensor,
    dtype: torch.dtype = torch.int64,
) -> Tensor:
    """Draw integers uniform in ``[minval, maxval)``, like ``jax.random.randint``.

    Uses JAX's 32-bit scheme for every dtype (JAX's default int32 result; int8/int16/uint8
    are drawn in 32 bits and cast, as JAX does): two 32-bit words ``hi``, ``lo`` per value,
    ``((hi % span) * (2**32 % span) + lo % span) % span`` with ``2**32 % span`` computed in
    wrapping uint32 as JAX does (so for spans above ``2**16`` only ``lo`` counts). The
    modulo makes values slightly biased unless the span is a power of 2, as in JAX.

    An empty or reversed span (``maxval <= minval``) returns ``minval`` everywhere, as JAX
    does. Bounds are clipped to the dtype's range (``maxval`` to its max + 1) and, for int32
    and int64, to the int32 range: int64 results match JAX's int32 ones (JAX without x64).
    Python int bounds outside that range raise (JAX raises ``OverflowError`` too).

    Example:
        >>> randint(key(0), (6,), 0, 10)
        tensor([9, 0, 2, 3, 1, 7])

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        minval: lowest value (inclusive), an int or an integer tensor broadcastable to shape.
        maxval: highest value (exclusive), an int or an integer tensor broadcastable to shape.
        dtype: one of int8, int16, int32, int64 (default), uint8.

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    k0, k1 = _check_key("randint", key)
    shape = _check_draw("randint", shape, dtype, _INTS)
    info = torch.iinfo(dtype)
    lo_lim, hi_lim = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    hi_lim_max = hi_lim + 1 if info.bits < 32 else hi_lim
    bounds = []
    for name, val, top in (("minval", minval, hi_lim), ("maxval", maxval, hi_lim_max)):
        if isinstance(val, Tensor):
            if val.dtype.is_floating_point or val.dtype.is_complex or val.dtype == torch.bool:
                raise TypeError(f"randint: {name} must be an integer tensor, got {val.dtype}")
            _check_broadcast("randint", name, tuple(val.shape), shape)
            val = val.to(device=key.device, dtype=torch.int64).clamp(lo_lim, top)
        elif isinstance(val, int) and not isinstance(val, bool):
            if info.bits >= 32 and not -(2**31) <= val <= 2**31 - 1:
                raise ValueError(
                    f"randint: {name} {val} outside the int32 range that JAX's 32-bit "
                    "scheme (used for every dtype) can sample"
                )
            val = min(max(val, lo_lim), top)
        else:
            raise TypeError(f"randint: {name} must be an int or a tensor, got {type(val).__name__}")
        bounds.append(val)
    lo, hi = bounds
    ka, kb = _threefry(k0, k1, None, torch.arange(2, device=key.device))
    counters = _counters(shape, key.device)
    hb0, hb1 = _threefry(ka[0], kb[0], *counters)
    lb0, lb1 = _threefry(ka[1], kb[1], *counters)
    higher, lower = hb0 ^ hb1, lb0 ^ lb1
    if isinstance(lo, int) and isinstance(hi, int):
        span = max(hi - lo, 1)
        mult = ((2**16 % span) ** 2 & _MASK) % span
        offset = ((higher % span) * mult + lower % span) % span
        return (offset + lo).to(dtype)
    lo_t = torch.as_tensor(lo, dtype=torch.int64, device=key.device)
    hi_t = torch.as_tensor(hi, dtype=torch.int64, device=key.device)
    span_t = torch.clamp(hi_t - lo_t, min=1)
    mult_t = ((torch.remainder(65536, span_t) ** 2) & _MASK) % span_t
    offset = ((higher % span_t) * mult_t + lower % span_t) % span_t
    return (offset + lo_t).to(dtype)


def gumbel(key: Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw standard Gumbel floats, like ``jax.random.gumbel`` (its default ``mode="low"``).

    Computed as ``-log(-log(u))`` with ``u = uniform(key, shape, dtype, tiny, 1)``, as JAX
    does; ``u`` is bit-identical, the logs may differ from XLA's in the last bit.

    Example:
        >>> logits = torch.tensor([0.0, 2.0, -1.0])
        >>> noise = gumbel(key(0), logits.shape)
        >>> int((logits + noise).argmax())  # the Gumbel-max trick: a draw from softmax(logits)
        1

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        dtype: a float dtype (float32, float16, bfloat16, float64).

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    k0, k1 = _check_key("gumbel", key)
    shape = _check_draw("gumbel", shape, dtype, _FLOATS)
    return _gumbel(k0, k1, shape, dtype, key.device)


def categorical(
    key: Tensor, logits: Tensor, axis: int = -1, shape: Sequence[int] | None = None
) -> Tensor:
    """Draw category indices with probabilities ``softmax(logits)``, like JAX's ``categorical``.

    The Gumbel-max trick, as JAX does it: ``argmax(gumbel(key, ...) + logits, axis)``. The
    same key gives the same samples as JAX unless two perturbed logits tie to within the last
    bit of a float (the Gumbel noise can differ from XLA's by one ulp).

    Example:
        >>> logits = torch.log(torch.tensor([0.1, 0.2, 0.7]))
        >>> categorical(key(0), logits, shape=(8,))
        tensor([1, 2, 2, 1, 2, 2, 2, 2])

    Args:
        key: a key (shape ``(2,)``).
        logits: float tensor of unnormalised log-probabilities; ``axis`` indexes categories.
        axis: the category axis.
        shape: output shape; must end with ``logits``' shape without ``axis`` (leading dims
            draw independent samples). ``None`` means that batch shape.

    Returns:
        An int64 tensor of category indices.
    """
    k0, k1 = _check_key("categorical", key)
    if not isinstance(logits, Tensor) or logits.dtype not in _FLOATS:
        raise TypeError(
            "categorical: logits must be a float tensor, got "
            f"{getattr(logits, 'dtype', type(logits).__name__)}"
        )
    ndim = logits.dim()
    if ndim == 0:
        raise ValueError("categorical: logits must have at least one dimension")
    if not -ndim <= axis < ndim:
        raise ValueError(f"categorical: axis {axis} out of range for logits of {ndim} dims")
    axis = axis - ndim if axis >= 0 else axis
    batch_shape = tuple(logits.shape[: axis % ndim]) + tuple(logits.shape[axis % ndim + 1 :])
    if shape is None:
        shape = batch_shape
    shape = _check_shape("categorical: shape", shape)
    _check_broadcast("categorical", "logits batch shape", batch_shape, shape)
    prefix = shape[: len(shape) - len(batch_shape)]
    full = list(shape[len(prefix) :])
    full.insert(axis % ndim, logits.shape[axis])
    g = _gumbel(k0, k1, (*prefix, *full), logits.dtype, key.device)
    return torch.argmax(g + logits, dim=axis)


def permutation(key: Tensor, x: int | Tensor) -> Tensor:
    """Shuffle ``arange(x)`` or the rows of ``x``, like ``jax.random.permutation``.

    Same algorithm as JAX (sort by fresh random 32-bit keys, stable, in as many rounds as JAX
    uses: one round below ~1600 items), so results equal JAX's for ``axis=0``,
    ``independent=False``. Only axis 0 is supported.

    Example:
        >>> permutation(key(0), 6)
        tensor([0, 1, 5, 4, 3, 2])

    Args:
        key: a key (shape ``(2,)``).
        x: an int ``n`` (shuffle ``arange(n)``) or a tensor with at least one dimension
            (shuffle along its first dimension).

    Returns:
        The shuffled int64 range, or ``x`` with its rows shuffled.
    """
    _check_key("permutation", key)
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("permutation: x must be an int or have at least one dimension")
        n = x.shape[0]
    elif isinstance(x, int) and not isinstance(x, bool):
        if x < 0:
            raise ValueError(f"permutation: n {x} must be >= 0")
        n = x
    else:
        raise TypeError(f"permutation: x must be an int or a tensor, got {type(x).__name__}")
    perm = torch.arange(n, device=key.device)
    rounds = math.ceil(3 * math.log(max(1, n)) / math.log(_MASK))
    for _ in range(rounds):
        key, sub = split(key)
        sort_keys = bits(sub, (n,), torch.int64)
        perm = perm[torch.argsort(sort_keys, stable=True)]
    return perm if not isinstance(x, Tensor) else x[perm]


def _check_draw(
    name: str, shape: Sequence[int], dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]
) -> tuple[int, ...]:
    """Check a sampler's ``shape`` and ``dtype`` (one of ``dtypes``); return the shape."""
    shape = _check_shape(f"{name}: shape", shape)
    if dtype not in dtypes:
        raise ValueError(f"{name}: dtype must be one of {dtypes}, got {dtype}")
    return shape


def _check_probability(name: str, arg: str, p: Tensor, *, upper_open: bool) -> None:
    """Eagerly check that every value of a probability tensor lies in [0, 1] (or [0, 1))."""
    if not _eager(p) or p.numel() == 0:
        return
    ok = (p >= 0) & ((p < 1) if upper_open else (p <= 1))
    if not bool(ok.all()):
        idx = tuple(int(i) for i in torch.nonzero(~ok)[0].tolist())
        value = p[idx].item() if p.dim() else p.item()
        where = f" at {list(idx)}" if p.dim() else ""
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}: {arg} {value}{where} outside {interval}")


def _check_broadcast(name: str, what: str, arg_shape: tuple, shape: tuple) -> None:
    try:
        ok = tuple(torch.broadcast_shapes(arg_shape, shape)) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: {what} of shape {arg_shape} does not broadcast to {shape}")


def _unit_floats(
    k0: Tensor, k1: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Floats in [0, 1) from the top mantissa bits, exactly as JAX builds them."""
    if dtype == torch.float64:
        x0, x1 = _threefry(k0, k1, *_counters(shape, device))
        m = (x0 << 20) | (x1 >> 12)
        return m.to(torch.float64) * 2.0**-52
    # eager and large: the native kernel's bits (the same bits; None where the ops must run)
    b = _fast_draw("bits", torch.stack((k0, k1)), shape)
    if b is None:
        b = _random_bits32(k0, k1, shape, device)
    if dtype == torch.float32:
        return (b >> 9).to(torch.float32) * 2.0**-23
    if dtype == torch.float16:
        return ((b & 0xFFFF) >> 6).to(torch.float16) * 2.0**-10
    return ((b & 0xFF) >> 1).to(torch.bfloat16) * 2.0**-7


def _uniform(
    k0: Tensor,
    k1: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    minval: float | Tensor,
    maxval: float | Tensor,
    device: torch.device,
) -> Tensor:
    for name, v in (("minval", minval), ("maxval", maxval)):
        if isinstance(v, Tensor):
            _check_broadcast("uniform", name, tuple(v.shape), shape)
    f = _unit_floats(k0, k1, shape, dtype, device)
    plain = not isinstance(minval, Tensor) and not isinstance(maxval, Tensor)
    if plain and minval == 0 and maxval == 1:
        return f
    lo = _as_float(minval, dtype, device)
    hi = _as_float(maxval, dtype, device)
    if dtype == torch.float32:
        # XLA on CPU fuses u * span + lo into one FMA; float64 holds u * span exactly.
        span = (hi - lo).to(torch.float64)
        out = (f.to(torch.float64) * span + lo.to(torch.float64)).to(dtype)
    elif dtype == torch.float64:
        out = f * (hi - lo) + lo
    else:
        # float16/bfloat16: every step rounded to the dtype (done in float64 and rounded
        # explicitly, so compiled code, which may keep half precision in float32, agrees).
        lo64 = lo.to(torch.float64)
        span = (hi.to(torch.float64) - lo64).to(dtype).to(torch.float64)
        prod = (f.to(torch.float64) * span).to(dtype).to(torch.float64)
        out = (prod + lo64).to(dtype)
    return torch.maximum(lo, out)


def _as_float(v: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=dtype)
    return torch.tensor(float(v), dtype=dtype, device=device)


def _gumbel(
    k0: Tensor, k1: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    tiny = torch.finfo(dtype).tiny
    u = _uniform(k0, k1, shape, dtype, tiny, 1.0, device)
    if dtype == torch.float64:
        return -torch.log(-torch.log(u))
    # Each log in float64, rounded to the dtype: a correctly rounded float32 log (up to a
    # ~2**-29 chance per value), so eager, vmap and compiled code give the same bits.
    inner = torch.log(u.to(torch.float64)).to(dtype)
    return (-torch.log(-inner.to(torch.float64))).to(dtype)
