"""Trees and keys across PyTorch and JAX: DLPack views and threefry key data.

A tensor crosses to JAX (and a ``jax.Array`` back) through the DLPack protocol, which hands
over the buffer itself: no bytes are copied, the two arrays share memory, and a conversion
costs the same few microseconds for a 1-element leaf as for a 100 MB one. A copy happens
only when sharing is impossible:

- the tensor is not contiguous (a transpose, a strided slice): it is made contiguous first;
- the buffer is not 64-byte aligned (a slice starting mid-allocation): XLA copies it;
- the tensor has the conjugate or negative bit set: it is resolved first.

JAX arrays are immutable by contract; writing through the torch view of a shared buffer
changes the JAX array too, so treat both as read-only after crossing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fnllm import random as _random
from fnllm import tree as _tree
from fnllm.interop import _common

__all__ = ["from_jax", "key_from_jax", "key_to_jax", "to_jax"]

_MASK32 = 0xFFFFFFFF
_ML_DTYPES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})


def to_jax(tree: Any) -> Any:
    """Convert every tensor leaf of a tree to a ``jax.Array`` through DLPack, sharing memory.

    The structure (dicts, lists, tuples) is kept, so ``jax.tree_util`` and ``optax`` work on
    the result directly. Tensors that require grad are detached.

    Example:
        >>> import torch
        >>> from fnllm import interop
        >>> params = {"w": torch.ones(2, 3), "blocks": [{"b": torch.zeros(3)}]}
        >>> jp = interop.to_jax(params)
        >>> type(jp["w"]).__name__, jp["w"].shape, jp["blocks"][0]["b"].dtype
        ('ArrayImpl', (2, 3), dtype('float32'))

    Args:
        tree: a nested dict/list/tuple of tensors. Supported dtypes: bool, (u)int8/16/32,
            float16, bfloat16, float32, complex64, float8 (e4m3fn, e5m2); 64-bit dtypes
            (int64, uint64, float64, complex128) only with ``jax_enable_x64`` on, since JAX
            otherwise narrows them to 32 bits.

    Returns:
        The same structure with ``jax.Array`` leaves on the tensors' device.

    Raises:
        TypeError: a leaf is not a tensor, or its dtype cannot cross unchanged (the message
            names the leaf's path).
    """
    jax = _common.jax()
    cpu = jax.devices("cpu")[0]  # naming the device skips a lookup per leaf (~30% faster)

    def convert(path: str, x: Any) -> Any:
        where = path or "<root>"
        if not isinstance(x, Tensor):
            raise TypeError(f"to_jax: leaf {where!r} is a {type(x).__name__}, not a torch.Tensor")
        _common.check_dtype("to_jax", f"leaf {where!r}", x.dtype)
        x = x.detach().resolve_conj().resolve_neg()
        if not x.is_contiguous():
            x = x.contiguous()
        return jax.dlpack.from_dlpack(x, device=cpu if x.device.type == "cpu" else None)

    return _tree.map(convert, tree, with_path=True)


def from_jax(tree: Any) -> Any:
    """Convert every ``jax.Array`` (or numpy array) leaf of a tree to a tensor, sharing memory.

    Example:
        >>> import jax.numpy as jnp
        >>> from fnllm import interop
        >>> interop.from_jax({"w": jnp.arange(3.0), "n": [jnp.int32(4)]})
        {'w': tensor([0., 1., 2.]), 'n': [tensor(4, dtype=torch.int32)]}

    Args:
        tree: a nested dict/list/tuple of concrete ``jax.Array`` or ``numpy.ndarray`` leaves
            (not tracers: call it outside ``jit``/``grad``). Writable numpy arrays are shared,
            read-only ones copied.

    Returns:
        The same structure with tensor leaves; ``from_jax(to_jax(t))`` is bit-identical to
        ``t`` and shares its memory.

    Raises:
        TypeError: a leaf is not an array, is a JAX tracer, is a typed key array (use
            :func:`key_from_jax`) or has a dtype PyTorch cannot hold.
    """
    jax = _common.jax()

    def convert(path: str, x: Any) -> Any:
        where = path or "<root>"
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"from_jax: leaf {where!r} is a JAX tracer; convert concrete arrays outside "
                "jit/grad/vmap (inside them use as_torch)"
            )
        if isinstance(x, np.ndarray):
            dtype = _common.torch_dtype("from_jax", f"leaf {where!r}", x.dtype)
            # read-only arrays (numpy views of JAX arrays) are copied: torch assumes writable
            x = np.array(x, copy=not x.flags.writeable, order="C")
            if x.dtype.kind == "V" or x.dtype.name in _ML_DTYPES:  # bfloat16, float8
                return torch.from_numpy(x.view(f"u{x.dtype.itemsize}")).view(dtype)
            return torch.from_numpy(x)
        if not isinstance(x, jax.Array):
            raise TypeError(f"from_jax: leaf {where!r} is a {type(x).__name__}, not a jax.Array")
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(f"from_jax: leaf {where!r} is a typed JAX key; use key_from_jax")
        _common.torch_dtype("from_jax", f"leaf {where!r}", x.dtype)
        return torch.from_dlpack(x)

    return _tree.map(convert, tree, with_path=True)


def key_to_jax(key: Tensor, *, typed: bool = False) -> Any:
    """Convert an ``fnllm.random`` key (or a batch of keys) to a JAX key with the same bits.

    ``jax.random`` then draws exactly what ``fnllm.random`` draws from ``key``.

    Example:
        >>> import jax
        >>> from fnllm import interop, random
        >>> interop.key_to_jax(random.key(7)).tolist()
        [0, 7]
        >>> k = interop.key_to_jax(random.key(7), typed=True)
        >>> bool((jax.random.key_data(k) == jax.random.key_data(jax.random.key(7))).all())
        True

    Args:
        key: an fnllm key, an integer tensor of shape ``(..., 2)`` holding 32-bit words.
        typed: return a typed ``jax.random.key`` array (``threefry2x32``) instead of the raw
            ``uint32[..., 2]`` key data that legacy ``jax.random.PRNGKey`` gives.

    Returns:
        A ``jax.Array``: uint32 of shape ``(..., 2)``, or a typed key array of shape ``(...)``.

    Raises:
        TypeError: ``key`` is not an integer tensor.
        ValueError: its last dimension is not 2 or a word lies outside ``[0, 2**32)``.
    """
    jax = _common.jax()
    if not isinstance(key, Tensor) or key.dtype.is_floating_point or key.dtype == torch.bool:
        what = f"a {key.dtype} tensor" if isinstance(key, Tensor) else type(key).__name__
        raise TypeError(f"key_to_jax: key must be an integer tensor, got {what}")
    if key.dim() == 0 or key.shape[-1] != 2:
        raise ValueError(f"key_to_jax: key must have shape (..., 2), got {tuple(key.shape)}")
    words = key.detach().to("cpu", torch.int64)
    if key.dtype in (torch.int64, torch.uint64) and ((words < 0) | (words > _MASK32)).any():
        raise ValueError("key_to_jax: key words must lie in [0, 2**32)")
    data = jax.numpy.asarray((words & _MASK32).numpy().astype(np.uint32))
    return jax.random.wrap_key_data(data, impl="threefry2x32") if typed else data


def key_from_jax(jax_key: Any, *, device: torch.device | str | None = None) -> Tensor:
    """Convert a JAX key (typed or raw ``uint32[..., 2]`` data) to an ``fnllm.random`` key.

    The interop spelling of :func:`fnllm.random.from_jax_key` (one implementation).

    Example:
        >>> import jax
        >>> from fnllm import interop, random
        >>> interop.key_from_jax(jax.random.key(42))
        tensor([ 0, 42])
        >>> bool((interop.key_from_jax(jax.random.PRNGKey(3)) == random.key(3)).all())
        True

    Args:
        jax_key: a typed ``threefry2x32`` key array of any shape, or raw key data of shape
            ``(..., 2)`` (a uint32 ``jax.Array`` or numpy array).
        device: where to put the result (default: CPU).

    Returns:
        An int64 tensor of shape ``(..., 2)``, usable with every ``fnllm.random`` function.

    Raises:
        ValueError: a typed key of another PRNG implementation, or raw data that is not
            uint32 of shape ``(..., 2)``.
    """
    _common.jax()  # a clear error when JAX is not installed
    return _random.from_jax_key(jax_key, device=device)
