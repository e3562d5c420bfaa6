"""JAX interop overhead: ``as_jax`` gradients and ``to_jax`` / ``from_jax`` conversion time.

1. ``jax.jit(jax.grad(as_jax(loss)))`` against ``torch.func.grad(loss)`` called directly, for
   the causal-LM loss of GPT tiny (4 layers, d=256, 4 heads, vocab 8192, batch 8 x 128;
   ``--quick``: batch 2 x 64). Both compute the same PyTorch forward and backward; the JAX
   side adds the callback, DLPack crossings and the copy of the gradients into XLA buffers.
   Goal: ratio <= 1.2.
2. ``to_jax`` and ``from_jax`` on trees of 64 float32 leaves of growing size, against copying
   through numpy (``jnp.array(t.numpy())`` / ``torch.tensor(np.asarray(a))``): sharing memory
   costs the same per leaf at every size (JAX's ``from_dlpack`` has a fixed cost of some
   tens of microseconds), copying grows with the bytes.

Run (interleaved A/B, medians and the paired ratio; fnllm is column A)::

    .venv/bin/python -m benchmarks.interop --quick --threads 1
    .venv/bin/python -m benchmarks.interop --threads 1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks._harness import compare, print_table
from fnllm import interop, losses
from fnllm import random as jr
from fnllm.models import GPT


def grad_rows(batch: int, seq: int, runs: int, warmup: int) -> list[list[object]]:
    gpt = GPT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_len=seq)
    params = gpt.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (batch, seq), 0, gpt.vocab_size).to(torch.int32)

    def loss(p: dict, t: torch.Tensor) -> torch.Tensor:
        return losses.causal_lm(gpt.apply(p, t), t)

    torch_grad = torch.func.grad(loss)
    jax_grad = jax.jit(jax.grad(interop.as_jax(loss)))
    jp, jt = interop.to_jax(params), interop.to_jax(tokens)

    def via_jax() -> None:
        jax.block_until_ready(jax_grad(jp, jt))

    def direct() -> None:
        torch_grad(params, tokens)

    c = compare(via_jax, direct, warmup=warmup, runs=runs)
    name = f"grad GPT tiny {batch}x{seq}: jit(grad(as_jax)) vs torch.func.grad"
    return [[name, c.a.median, c.b.median, c.ratio]]


def conversion_rows(sizes: list[int], leaves: int, runs: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in sizes:
        rows += _conversion_rows(n, leaves, runs)
    return rows


def _conversion_rows(n: int, leaves: int, runs: int) -> list[list[object]]:
    tree = {f"w{i}": torch.full((n,), float(i)) for i in range(leaves)}
    jtree = jax.block_until_ready({k: jnp.full((n,), float(i)) for i, k in enumerate(tree)})
    kb = n * 4 / 1024

    def copy_to() -> None:
        jax.block_until_ready({k: jnp.array(v.numpy()) for k, v in tree.items()})

    def copy_from() -> None:
        {k: torch.tensor(np.asarray(v)) for k, v in jtree.items()}

    rows: list[list[object]] = []
    for name, ours, peer in (
        ("to_jax", lambda: interop.to_jax(tree), copy_to),
        ("from_jax", lambda: interop.from_jax(jtree), copy_from),
    ):
        c = compare(ours, peer, warmup=2, runs=runs)
        per_leaf = c.a.median * 1e3 / leaves
        label = f"{name} {leaves} x {kb:g} KB ({per_leaf:.1f} us/leaf)"
        rows.append([label, c.a.median, c.b.median, c.ratio])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batch, two sizes, few runs")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.runs or (5 if args.quick else 21)
    batch, seq = (2, 64) if args.quick else (8, 128)
    rows = grad_rows(batch, seq, runs, warmup=1 if args.quick else 3)
    sizes = [256, 262_144] if args.quick else [16, 1024, 65_536, 1_048_576]
    rows += conversion_rows(sizes, leaves=64, runs=runs)
    print_table(
        rows,
        header=("workload", "fnllm ms", "peer ms", "ratio"),
        title=f"JAX interop (threads {torch.get_num_threads()}, jax {jax.__version__})",
    )


if __name__ == "__main__":
    main()
