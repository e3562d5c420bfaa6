"""Shared helpers of ``fnllm.interop``: the lazy JAX import, the dtype table, leaf paths."""

from __future__ import annotations

from typing import Any

import torch

# torch dtypes that cross through DLPack bit for bit (JAX's name on the right). The 64-bit
# ones need ``jax_enable_x64``: without it JAX silently narrows them to 32 bits.
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.uint16: "uint16",
    torch.int32: "int32",
    torch.uint32: "uint32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.complex64: "complex64",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int64: "int64",
    torch.uint64: "uint64",
    torch.float64: "float64",
    torch.complex128: "complex128",
}
WIDE = frozenset({torch.int64, torch.uint64, torch.float64, torch.complex128})
TORCH_DTYPES: dict[str, torch.dtype] = {name: dt for dt, name in DTYPES.items()}


def jax() -> Any:
    """Import and return the ``jax`` module, or raise an ImportError naming the extra."""
    try:
        import jax as _jax
        import jax.dlpack
    except ImportError as err:  # pragma: no cover - exercised only without jax
        raise ImportError(
            "fnllm.interop needs JAX, which is not installed: pip install 'fnllm[jax]'"
        ) from err
    return _jax


def x64_enabled() -> bool:
    """Whether JAX keeps 64-bit dtypes (``jax_enable_x64``)."""
    return bool(jax().config.jax_enable_x64)


def check_dtype(where: str, label: str, dtype: torch.dtype) -> None:
    """Raise a TypeError naming ``label`` when ``dtype`` cannot cross to JAX unchanged."""
    if dtype not in DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(f"{where}: {label} has dtype {dtype}, not one of: {supported}")
    if dtype in WIDE and not x64_enabled():
        raise TypeError(
            f"{where}: {label} has dtype {dtype}, which JAX narrows to 32 bits unless "
            "jax_enable_x64 is on; cast it (e.g. fnllm.tree.cast or .to(torch.int32)) or call "
            'jax.config.update("jax_enable_x64", True)'
        )


def torch_dtype(where: str, label: str, dtype: Any) -> torch.dtype:
    """The torch dtype of a JAX/numpy dtype, or a TypeError naming ``label``."""
    name = str(dtype)
    if name not in TORCH_DTYPES:
        raise TypeError(f"{where}: {label} has dtype {name}, which PyTorch cannot hold")
    return TORCH_DTYPES[name]


def keystr(parts: tuple[Any, ...]) -> str:
    """A dotted path (``"blocks.0.w"``) from a ``jax.tree_util`` key path."""
    out = []
    for p in parts:
        for attr in ("key", "idx", "name"):
            if hasattr(p, attr):
                out.append(str(getattr(p, attr)))
                break
        else:
            out.append(str(p))
    return ".".join(out)
