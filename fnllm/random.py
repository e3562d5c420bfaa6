"""Functional, splittable random keys, bit-identical to ``jax.random`` (threefry2x32).

A key is a plain ``torch.int64`` tensor of shape ``(2,)`` holding two unsigned 32-bit words
(each in ``[0, 2**32)``), exactly the words of JAX's ``jax.random.key_data(key)`` /
``jax.random.PRNGKey(seed)``. Every sampler is a pure function of its key: the same key gives
the same numbers, on any device, eagerly, under ``torch.func.vmap`` (map over a batch of keys
made by :func:`split`) and under ``torch.compile(fullgraph=True)``.

The bit layout follows JAX with ``jax_threefry_partitionable=True`` (the default of current
JAX): element ``i`` of a draw of shape ``shape`` hashes the 64-bit counter ``i`` (hi word,
lo word) with the key; ``split(key, n)[i]`` is the hash of counter ``i``; ``fold_in(key, d)``
is the hash of counter ``d``.

What matches JAX (running on CPU) bit for bit: :func:`key`, :func:`split`, :func:`fold_in`,
:func:`bits`, :func:`uniform` (float32, float16, bfloat16, any ``minval``/``maxval``),
:func:`bernoulli`, :func:`randint`, :func:`permutation`, and :func:`normal` in float16 and
bfloat16. What matches to a few ulp: :func:`normal` in float32 (JAX's ``erf_inv`` polynomial
is reproduced, XLA's ``log1p`` is not: ~1% of values differ, by at most 3 ulp),
:func:`gumbel` (torch's ``log`` vs XLA's), and so :func:`categorical`, whose samples agree
with JAX unless two perturbed logits are within an ulp of each other (practically never).
Scaled float32 uniforms emulate XLA's fused multiply-add in float64; that double rounding
could differ from a true FMA only when ``minval`` is tiny next to the span (never seen).

Why int64 and not ``torch.uint32``: ``torch.uint32`` lacks add/shift/compare kernels on CPU,
so the hash runs on int64 values masked to 32 bits. :func:`to_jax_key` / :func:`from_jax_key`
convert losslessly to and from JAX (``uint32[..., 2]`` key data or typed keys). Key words
must lie in ``[0, 2**32)``: eager calls refuse other int64 words (they would alias other keys);
int32 keys are read as the bit patterns of uint32 words.

Speed: in eager mode a draw of 4096 values or more from :func:`bits`, float32 :func:`uniform`
or :func:`bernoulli` (and so ``fnllm.nn.dropout``) runs the 20 threefry rounds as one kernel
made by ``torch.compile`` with dynamic shapes (one compile per kind for every size, cached on
disk by inductor: tens of seconds the first time on a machine, about a second in later
processes); smaller draws, code traced by ``torch.compile`` (fused there anyway) and draws
inside ``torch.func`` transforms use plain tensor ops. Both give the same bits.

Example:
    >>> from fnllm import random as jr
    >>> k = jr.key(0)
    >>> k1, k2 = jr.split(k)
    >>> jr.uniform(k1, (3,))
    tensor([0.8423, 0.1824, 0.2272])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KEY_DTYPE",
    "bernoulli",
    "bits",
    "categorical",
    "fold_in",
    "from_jax_key",
    "gumbel",
    "key",
    "normal",
    "permutation",
    "randint",
    "split",
    "to_jax_key",
    "uniform",
]

KEY_DTYPE = torch.int64
"""dtype of a key tensor: int64 holding two uint32 words."""

_MASK = 0xFFFFFFFF
_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_BITS_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int64)
_SQRT2 = 1.4142135623730951


# ----------------------------------------------------------------------------------------------
# keys


def key(seed: int | Tensor, *, device: torch.device | str | None = None) -> Tensor:
    """Make a key from an integer seed, like ``jax.random.key(seed)`` / ``PRNGKey(seed)``.

    JAX (with 64-bit mode off, its default) keeps only the low 32 bits of the seed and sets
    the high word to 0: ``key(-1)`` is ``[0, 2**32 - 1]`` and ``key(2**32 + 5)`` is ``[0, 5]``.
    fnllm does the same for every seed, so keys agree with default JAX for all seeds.

    Example:
        >>> key(0)
        tensor([0, 0])
        >>> key(-1)
        tensor([         0, 4294967295])

    Args:
        seed: a Python int in ``[-2**63, 2**64)`` or an integer tensor of shape ``()``
            (under ``vmap`` a batch of seeds gives a batch of keys).
        device: where to put the key (Python seeds only; a tensor seed keeps its device).

    Returns:
        An int64 tensor of shape ``(2,)``.
    """
    if isinstance(seed, Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"key: seed must be an integer tensor, got dtype {seed.dtype}")
        if seed.dim() != 0:
            raise ValueError(
                f"key: seed tensor must have shape (), got {tuple(seed.shape)}; "
                "use torch.func.vmap to make many keys"
            )
        lo = seed.to(torch.int64) & _MASK
        return torch.stack([torch.zeros_like(lo), lo])
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"key: seed must be an int or an integer tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"key: seed {seed} outside [-2**63, 2**64)")
    return torch.tensor([0, seed & _MASK], dtype=KEY_DTYPE, device=device)


def split(key: Tensor, num: int | Sequence[int] = 2) -> Tensor:
    """Split a key into ``num`` new independent keys, like ``jax.random.split``.

    Example:
        >>> split(key(0))
        tensor([[1797259609, 2579123966],
                [ 928981903, 3453687069]])
        >>> split(key(0), 3).shape
        torch.Size([3, 2])

    Args:
        key: a key (shape ``(2,)``).
        num: how many keys (an int), or the shape of the batch of keys (a tuple).

    Returns:
        Keys of shape ``(num, 2)`` (or ``(*num, 2)``), on the key's device.
    """
    k0, k1 = _check_key("split", key)
    shape = (num,) if isinstance(num, int) and not isinstance(num, bool) else num
    shape = _check_shape("split: num", shape)
    x0, x1 = _threefry(k0, k1, *_counters(shape, key.device))
    return torch.stack([x0, x1], dim=-1)


def fold_in(key: Tensor, data: int | Tensor) -> Tensor:
    """Fold an integer into a key, giving a new key, like ``jax.random.fold_in``.

    ``fold_in(key, i)`` equals ``split(key, n)[i]`` for any ``n > i``.

    Example:
        >>> fold_in(key(0), 1)
        tensor([ 928981903, 3453687069])

    Args:
        key: a key (shape ``(2,)``).
        data: a Python int in ``[0, 2**32)`` (JAX raises outside it too), or an integer
            tensor of shape ``()`` whose value is taken modulo ``2**32`` (as JAX does for
            integer arrays, e.g. ``-1`` folds in ``2**32 - 1``).

    Returns:
        A new key of shape ``(2,)``.
    """
    k0, k1 = _check_key("fold_in", key)
    if isinstance(data, Tensor):
        if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
            raise TypeError(f"fold_in: data must be an integer tensor, got dtype {data.dtype}")
        if data.dim() != 0:
            raise ValueError(
                f"fold_in: data must have shape (), got {tuple(data.shape)}; "
                "use torch.func.vmap to fold in many values"
            )
        lo = data.to(device=key.device, dtype=torch.int64) & _MASK
    elif isinstance(data, int) and not isinstance(data, bool):
        if not 0 <= data <= _MASK:
            raise ValueError(f"fold_in: data {data} outside [0, 2**32)")
        lo = torch.tensor(data, dtype=torch.int64, device=key.device)
    else:
        raise TypeError(f"fold_in: data must be an int or a tensor, got {type(data).__name__}")
    x0, x1 = _threefry(k0, k1, None, lo)
    return torch.stack([x0, x1])


def to_jax_key(key: Tensor) -> Any:
    """Convert a key (or a batch of keys) to JAX's raw ``uint32[..., 2]`` key data.

    The result works with every ``jax.random`` function (as a legacy ``PRNGKey``) and with
    ``jax.random.wrap_key_data`` to make a typed key.

    Example:
        >>> to_jax_key(key(7)).tolist()
        [0, 7]

    Args:
        key: an fnllm key of shape ``(..., 2)``.

    Returns:
        A ``jax.Array`` of dtype uint32 and the same shape.
    """
    import jax.numpy as jnp
    import numpy as np

    _check_key_dtype("to_jax_key", key)
    if key.dim() == 0 or key.shape[-1] != 2:
        raise ValueError(f"to_jax_key: key must have shape (..., 2), got {tuple(key.shape)}")
    words = (key.detach().to("cpu", torch.int64) & _MASK).numpy().astype(np.uint32)
    return jnp.asarray(words, dtype=jnp.uint32)


def from_jax_key(jax_key: Any, *, device: torch.device | str | None = None) -> Tensor:
    """Convert a JAX key (typed ``jax.random.key`` or raw ``uint32[..., 2]``) to an fnllm key.

    Example:
        >>> import numpy as np
        >>> from_jax_key(np.array([0, 42], dtype=np.uint32))
        tensor([ 0, 42])

    Args:
        jax_key: a typed threefry key array, or raw key data of shape ``(..., 2)``
            (a jax or numpy uint32 array).
        device: where to put the result.

    Returns:
        An int64 tensor of shape ``(..., 2)``.
    """
    import numpy as np

    dtype = getattr(jax_key, "dtype", None)
    if dtype is not None and "key" in str(dtype):
        import jax

        jax_key = jax.random.key_data(jax_key)
    arr = np.asarray(jax_key)
    if arr.dtype != np.uint32 or arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(
            f"from_jax_key: expected threefry key data uint32[..., 2], got {arr.dtype}{arr.shape}"
        )
    return torch.as_tensor(arr.astype(np.int64), device=device)


# ----------------------------------------------------------------------------------------------
# samplers


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
    shape = _check_shape("bits: shape", shape)
    if dtype not in _BITS_DTYPES:
        raise ValueError(f"bits: dtype must be one of {_BITS_DTYPES}, got {dtype}")
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
    shape = _check_shape("uniform: shape", shape)
    if dtype not in _FLOATS:
        raise ValueError(f"uniform: dtype must be one of {_FLOATS}, got {dtype}")
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
    shape = _check_shape("normal: shape", shape)
    if dtype not in _FLOATS:
        raise ValueError(f"normal: dtype must be one of {_FLOATS}, got {dtype}")
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
        p = torch.tensor(float(p), dtype=dtype, device=key.device)
    if dtype == torch.float32 and p.dim() == 0 and p.device == key.device:
        u = _fast_draw("unit", words, shape)  # a bool-output kernel is not vectorised
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
    shape = _check_shape("randint: shape", shape)
    if dtype not in _INTS:
        raise ValueError(f"randint: dtype must be one of {_INTS}, got {dtype}")
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
    span = torch.clamp(hi_t - lo_t, min=1)
    mult = ((torch.remainder(65536, span) ** 2) & _MASK) % span
    offset = ((higher % span) * mult + lower % span) % span
    return (offset + lo_t).to(dtype)


def gumbel(key: Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw standard Gumbel floats, like ``jax.random.gumbel`` (its default ``mode="low"``).

    Computed as ``-log(-log(u))`` with ``u = uniform(key, shape, dtype, tiny, 1)``, as JAX
    does; ``u`` is bit-identical, the logs may differ from XLA's in the last bit.

    Example:
        >>> gumbel(key(0), (3,))
        tensor([ 2.9234,  3.8326, -0.0969])

    Args:
        key: a key (shape ``(2,)``).
        shape: output shape, a tuple of non-negative ints.
        dtype: a float dtype (float32, float16, bfloat16, float64).

    Returns:
        A tensor of the given shape and dtype on the key's device.
    """
    k0, k1 = _check_key("gumbel", key)
    shape = _check_shape("gumbel: shape", shape)
    if dtype not in _FLOATS:
        raise ValueError(f"gumbel: dtype must be one of {_FLOATS}, got {dtype}")
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


# ----------------------------------------------------------------------------------------------
# helpers


def _check_key_dtype(name: str, key: Any) -> None:
    if not isinstance(key, Tensor):
        raise TypeError(f"{name}: key must be a tensor (see fnllm.random.key), got {type(key)}")
    if key.dtype.is_floating_point or key.dtype.is_complex or key.dtype == torch.bool:
        raise TypeError(
            f"{name}: key must be an integer tensor (from fnllm.random.key/split), "
            f"got dtype {key.dtype}"
        )


def _check_key(name: str, key: Any) -> tuple[Tensor, Tensor]:
    """Validate a single key and return its two words as int64 scalars."""
    key = _key_words(name, key)
    return key[0], key[1]


def _key_words(name: str, key: Any) -> Tensor:
    """Validate a single key and return it as an int64 tensor of shape (2,)."""
    _check_key_dtype(name, key)
    if tuple(key.shape) != (2,):
        if key.dim() >= 2 and key.shape[-1] == 2:
            raise ValueError(
                f"{name}: got a batch of keys of shape {tuple(key.shape)}; pass one key of "
                "shape (2,), or map over the batch with torch.func.vmap"
            )
        raise ValueError(f"{name}: key must have shape (2,), got {tuple(key.shape)}")
    _check_key_words(name, key)
    if key.dtype != torch.int64:
        key = key.to(torch.int64) & _MASK
    return key


def _eager(*tensors: Any) -> bool:
    """True when values can be checked: not while compiling, no ``torch.func`` wrapper, not meta."""
    if torch.compiler.is_compiling():
        return False
    return not any(
        isinstance(t, Tensor)
        and (torch._C._functorch.is_functorch_wrapped_tensor(t) or t.device.type == "meta")
        for t in tensors
    )


def _check_key_words(name: str, key: Tensor) -> None:
    """Eagerly refuse key words outside ``[0, 2**32)``: they would alias other keys.

    int32 keys are taken as the bit patterns of uint32 words (as JAX's ``uint32`` data viewed
    as ``int32``), so any int32 value is valid; other integer dtypes must hold the words.
    """
    if key.dtype in (torch.int32, torch.uint32, torch.uint8, torch.uint16) or not _eager(key):
        return
    bad = any(w < 0 or w > _MASK for w in key.tolist())  # two words: cheaper than tensor ops
    if bad:
        raise ValueError(
            f"{name}: key {key.tolist()} has words outside the uint32 range [0, 2**32) "
            "(it would alias another key); make keys with fnllm.random.key/split/fold_in"
        )


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


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(shape).__name__} {shape!r}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, torch.SymInt)):
            raise TypeError(f"{name} must be a tuple of ints, got {shape!r}")
        if isinstance(d, int) and d < 0:
            raise ValueError(f"{name} must be non-negative, got {tuple(shape)}")
    return tuple(shape)


def _check_broadcast(name: str, what: str, arg_shape: tuple, shape: tuple) -> None:
    try:
        ok = tuple(torch.broadcast_shapes(arg_shape, shape)) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: {what} of shape {arg_shape} does not broadcast to {shape}")


def _counters(shape: tuple[int, ...], device: torch.device) -> tuple[Tensor | None, Tensor]:
    """The (hi, lo) words of a 64-bit iota of the given shape (hi is None when all zero)."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device).reshape(shape)
    if n <= 2**32:
        return None, idx
    return idx >> 32, idx & _MASK


def _threefry(k0: Tensor, k1: Tensor, x0: Tensor | None, x1: Tensor) -> tuple[Tensor, Tensor]:
    """Threefry-2x32 (20 rounds) of counters (x0, x1) under key (k0, k1); int64 in and out.

    Works on int64 holding uint32 values. The first word is left unmasked between rounds
    (its high bits never reach the low 32 bits: it is only added to and xor-ed), the second
    is masked after each round because it is rotated.
    """
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = ks[0] if x0 is None else x0 + ks[0]
    x1 = (x1 + ks[1]) & _MASK
    for i in range(5):
        for r in _ROT[i % 2]:
            x0 = x0 + x1
            x1 = (x0 ^ ((x1 << r) | (x1 >> (32 - r)))) & _MASK
        x0 = x0 + ks[(i + 1) % 3]
        x1 = (x1 + (ks[(i + 2) % 3] + (i + 1))) & _MASK
    return x0 & _MASK, x1


def _random_bits32(k0: Tensor, k1: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    x0, x1 = _threefry(k0, k1, *_counters(shape, device))
    return x0 ^ x1


# Eager draws of at least _FAST_MIN values run the threefry hash as one compiled kernel
# (torch.compile with dynamic shapes: one compile per kind and device for every size), instead
# of ~150 separate tensor ops. Smaller draws, traced code (which inductor fuses by itself) and
# draws inside torch.func transforms take the op path; both give the same bits.
_FAST_MIN = 4096
_FAST_DEVICES = ("cpu",)
_FAST_CACHE: dict[str, Any] = {}


def _fast_draw(kind: str, key: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """Draw with the compiled core, flat then reshaped; ``None`` where the op path must run.

    ``key`` is a checked int64 key (``_key_words``).

    Kinds: ``"bits"`` (32 random bits in int64), ``"unit"`` (float32 in [0, 1)). Each kind
    is compiled on first use;
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


def _core_bits(key: Tensor, n: int) -> Tensor:
    x0, x1 = _threefry(key[0], key[1], None, torch.arange(n, dtype=torch.int64, device=key.device))
    return x0 ^ x1


def _core_unit(key: Tensor, n: int) -> Tensor:
    return (_core_bits(key, n) >> 9).to(torch.float32) * 2.0**-23


_FAST_CORES: dict[str, Callable[..., Tensor]] = {
    "bits": _core_bits,
    "unit": _core_unit,
}


def _unit_floats(
    k0: Tensor, k1: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Floats in [0, 1) from the top mantissa bits, exactly as JAX builds them."""
    if dtype == torch.float64:
        x0, x1 = _threefry(k0, k1, *_counters(shape, device))
        m = (x0 << 20) | (x1 >> 12)
        return m.to(torch.float64) * 2.0**-52
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


# nextafter(-1, 0) per dtype: the open lower end of normal()'s uniform, as in JAX.
_ABOVE_MINUS_ONE = {
    torch.float32: -1.0 + 2.0**-24,
    torch.float16: -1.0 + 2.0**-11,
    torch.bfloat16: -1.0 + 2.0**-8,
    torch.float64: -1.0 + 2.0**-53,
}


# Single-precision erfinv polynomial (M. Giles, "Approximating the erfinv function", 2010),
# which XLA uses for float32; evaluated in float64 steps rounded to float32 to mimic XLA's FMAs.
_ERFINV_SMALL = (
    2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
    -0.00125372503, -0.00417768164, 0.246640727, 1.50140941,
)  # fmt: skip
_ERFINV_LARGE = (
    -0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
    -0.0076224613, 0.00943887047, 1.00167406, 2.83297682,
)  # fmt: skip


def _erfinv_f32(x: Tensor) -> Tensor:
    # log1p in float64 rounded to float32: identical in eager, vmap and compiled code.
    w = (-torch.log1p(-(x * x).to(torch.float64))).to(torch.float32)
    small = w < 5.0
    w = torch.where(small, w - 2.5, torch.sqrt(w) - 3.0).to(torch.float64)
    f32 = torch.float32
    p = torch.where(
        small,
        torch.tensor(_ERFINV_SMALL[0], dtype=f32, device=x.device),
        torch.tensor(_ERFINV_LARGE[0], dtype=f32, device=x.device),
    )
    for a, b in zip(_ERFINV_SMALL[1:], _ERFINV_LARGE[1:]):
        c = torch.where(
            small,
            torch.tensor(a, dtype=f32, device=x.device),
            torch.tensor(b, dtype=f32, device=x.device),
        ).to(torch.float64)
        p = (p.to(torch.float64) * w + c).to(f32)
    out = p * x
    return torch.where(x.abs() == 1.0, x * torch.finfo(f32).max, out)
