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

Speed: in eager mode, draws of 4096 values or more (:func:`bits`, float32 :func:`uniform`,
:func:`bernoulli`) run the 20 threefry rounds in a small native kernel: about 60 lines of C,
built with the system C compiler in well under a second the first time a process needs it and
cached in fnllm's cache folder (``$FNLLM_CACHE_DIR``, else ``~/.cache/fnllm``), then loaded in
milliseconds by later processes. A process builds it at its first draw of 16384 values or more,
or after 8 smaller large draws, so a one-off shuffle never pays it
(``FNLLM_EAGER_SAMPLER=compiled`` builds it at the first large draw, ``=ops`` never).
Under ``torch.compile`` on the CPU, Bernoulli masks with a float probability (every
``nn.dropout`` mask) and new keys (:func:`split`, :func:`fold_in` of an int) come from two
opaque custom ops, ``fnllm::keep_mask`` and ``fnllm::threefry_pairs``, running the same kernel:
inductor keeps the 1-byte mask for the backward instead of fusing the hash into every kernel that
reads it, which made a train step with dropout take minutes to compile
(``FNLLM_COMPILED_SAMPLER=inline`` traces the hash into the graph as before). Smaller draws,
other devices and draws inside ``torch.func`` transforms use plain tensor ops. Every path
gives the same bits.

Example:
    >>> from fnllm import random as jr
    >>> k = jr.key(0)
    >>> k1, k2 = jr.split(k)
    >>> jr.uniform(k1, (3,))
    tensor([0.8423, 0.1824, 0.2272])
"""

from fnllm.random._keys import KEY_DTYPE, fold_in, from_jax_key, key, split, to_jax_key
from fnllm.random._samplers import (
    bernoulli,
    bits,
    categorical,
    gumbel,
    normal,
    permutation,
    randint,
    uniform,
)

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
