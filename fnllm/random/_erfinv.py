"""XLA's single-precision ``erf_inv`` polynomial (private), so ``normal`` matches ``jax.random``."""

from __future__ import annotations

import torch
from torch import Tensor

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
        # each coefficient rounded to float32 and held exactly in float64: one select, no cast
        c = torch.where(small, _f32_in_f64(a, x.device), _f32_in_f64(b, x.device))
        p = (p.to(torch.float64) * w + c).to(f32)
    out = p * x
    return torch.where(x.abs() == 1.0, x * torch.finfo(f32).max, out)


def _f32_in_f64(v: float, device: torch.device) -> Tensor:
    """``v`` rounded to float32, as a float64 scalar tensor (exact: a float32 fits a float64)."""
    return torch.tensor(v, dtype=torch.float32, device=device).to(torch.float64)
