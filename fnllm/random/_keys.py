"""Keys and the threefry2x32 core of :mod:`fnllm.random` (private; see that module).

A key is an int64 tensor of shape ``(2,)`` holding two uint32 words; :func:`key`, :func:`split`
and :func:`fold_in` hash counters with it, :func:`to_jax_key` / :func:`from_jax_key` convert.
Eager calls check the key's dtype, shape and words here, once, for every sampler.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

KEY_DTYPE = torch.int64
"""dtype of a key tensor: int64 holding two uint32 words."""
_MASK = 0xFFFFFFFF
_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
# FNLLM_COMPILED_SAMPLER: "op" (the default: under torch.compile on the CPU, dropout masks and
# new keys come from the opaque custom ops fnllm::keep_mask and fnllm::threefry_pairs, see
# _fast) or "inline" (the hash traced into the graph and fused by inductor: same bits, far
# slower to compile). Read when the code is traced.
_COMPILED_VARIABLE = "FNLLM_COMPILED_SAMPLER"
_COMPILED_MODES = ("op", "inline")


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
        _check_int_scalar(seed, "key: seed", "key: seed tensor", "make many keys")
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
    n = math.prod(shape)
    if _use_ops(key) and isinstance(n, int) and n <= 2**32:
        words = key if key.dtype == torch.int64 else key.to(torch.int64) & _MASK
        return torch.ops.fnllm.threefry_pairs(words, 0, n).reshape(*shape, 2)
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
        _check_int_scalar(data, "fold_in: data", "fold_in: data", "fold in many values")
        lo = data.to(device=key.device, dtype=torch.int64) & _MASK
    elif isinstance(data, int) and not isinstance(data, bool):
        if not 0 <= data <= _MASK:
            raise ValueError(f"fold_in: data {data} outside [0, 2**32)")
        if _use_ops(key):
            words = key if key.dtype == torch.int64 else key.to(torch.int64) & _MASK
            return torch.ops.fnllm.threefry_pairs(words, data, 1)[0]
        lo = torch.tensor(data, dtype=torch.int64, device=key.device)
    else:
        raise TypeError(f"fold_in: data must be an int or a tensor, got {type(data).__name__}")
    x0, x1 = _threefry(k0, k1, None, lo)
    return torch.stack([x0, x1])


def compiled_mode() -> str:
    """``FNLLM_COMPILED_SAMPLER``: ``"op"`` (default) or ``"inline"``; refuses anything else."""
    mode = os.environ.get(_COMPILED_VARIABLE, "op").strip().lower() or "op"
    if mode not in _COMPILED_MODES:
        raise ValueError(f"{_COMPILED_VARIABLE}={mode!r}: expected one of {list(_COMPILED_MODES)}")
    return mode


def _use_ops(key: Tensor) -> bool:
    """Whether traced code draws through fnllm's custom ops (compiling, on the CPU, mode op)."""
    return torch.compiler.is_compiling() and key.device.type == "cpu" and compiled_mode() == "op"


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
        jax_key: a typed ``threefry2x32`` key array of any shape, or raw key data of shape
            ``(..., 2)`` (a jax or numpy uint32 array).
        device: where to put the result (default: CPU).

    Returns:
        An int64 tensor of shape ``(..., 2)``.

    Raises:
        ValueError: a typed key of another PRNG implementation, or raw data that is not
            uint32 of shape ``(..., 2)``.
    """
    import numpy as np

    dtype = getattr(jax_key, "dtype", None)
    if dtype is not None and "key" in str(dtype):  # a typed key array: only then import jax
        import jax

        impl = str(jax.random.key_impl(jax_key))
        if impl != "threefry2x32":
            raise ValueError(f"jax_key: a typed key of {impl!r}; fnllm keys are threefry2x32")
        jax_key = jax.random.key_data(jax_key)
    arr = np.asarray(jax_key)
    if arr.dtype != np.uint32 or arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(
            f"jax_key: expected threefry key data uint32[..., 2], got {arr.dtype}{arr.shape}"
        )
    return torch.as_tensor(arr.astype(np.int64), device=device)


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
    """True when values can be checked: not while compiling, no ``torch.func`` wrapper, not
    meta or fake (``fnllm.memory.plan``)."""
    if torch.compiler.is_compiling():
        return False
    return not any(
        isinstance(t, Tensor)
        and (
            torch._C._functorch.is_functorch_wrapped_tensor(t)
            or t.device.type == "meta"
            or torch._subclasses.fake_tensor.is_fake(t)
        )
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


def _check_int_scalar(t: Tensor, name: str, shape_name: str, many: str) -> None:
    """Refuse a tensor ``t`` that is not a 0-d integer tensor (``many``: what vmap would do)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 0:
        raise ValueError(
            f"{shape_name} must have shape (), got {tuple(t.shape)}; use torch.func.vmap to {many}"
        )


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(shape).__name__} {shape!r}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, torch.SymInt)):
            raise TypeError(f"{name} must be a tuple of ints, got {shape!r}")
        if isinstance(d, int) and d < 0:
            raise ValueError(f"{name} must be non-negative, got {tuple(shape)}")
    return tuple(shape)


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

    On the ``meta`` device (shapes only, e.g. ``init`` for :func:`fnllm.memory.plan`) the
    words have no values to compute: the result is two empty tensors of the right shape,
    without the ~100 Python-level meta kernels of the rounds.
    """
    if k0.device.type == "meta" or x1.device.type == "meta":
        extra = () if x0 is None else (x0.shape,)
        shape = torch.broadcast_shapes(k0.shape, k1.shape, x1.shape, *extra)
        out = torch.empty(shape, dtype=torch.int64, device="meta")
        return out, out
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
