"""JAX interoperability: trees, keys and functions that cross between PyTorch and JAX.

- :func:`to_jax` / :func:`from_jax`: trees of tensors to trees of ``jax.Array`` and back through
  DLPack, sharing memory (no copy) where device, dtype, layout and alignment allow.
- :func:`key_to_jax` / :func:`key_from_jax`: ``fnllm.random`` keys are threefry2x32 keys with
  the same bits as ``jax.random`` keys; these convert raw ``uint32[..., 2]`` data and typed keys.
- :func:`as_jax`: an fnllm function of tensor trees (a loss, a model's ``apply``) as a JAX
  function that works under ``jax.grad``, ``jax.value_and_grad``, ``jax.jit`` and ``jax.vmap``.
- :func:`as_torch`: a JAX function as a PyTorch function with autograd (also under
  ``torch.func.grad``).
- :func:`train_optax`: train fnllm parameters from JAX with an ``optax`` optimizer;
  :func:`plot_loss_curves` draws such runs side by side.

JAX is an optional dependency (``pip install 'fnllm[jax]'``): this module imports without it
and each function imports JAX when first called, raising an ``ImportError`` that names the
extra when it is missing.
"""

from fnllm.interop.arrays import from_jax, key_from_jax, key_to_jax, to_jax
from fnllm.interop.functions import as_jax, as_torch
from fnllm.interop.training import OptaxRun, plot_loss_curves, train_optax

__all__ = [
    "OptaxRun",
    "as_jax",
    "as_torch",
    "from_jax",
    "key_from_jax",
    "key_to_jax",
    "plot_loss_curves",
    "to_jax",
    "train_optax",
]
