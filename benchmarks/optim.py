"""fnllm.optim.adamw vs torch.optim.AdamW(fused=True) on GPT-sized parameter sets.

Run: ``.venv/bin/python -m benchmarks.optim [--quick] [--device cpu|cuda] [--no-compile]``.

Both sides see the same parameters (GPT-tiny: 4 layers, d=256, vocab 8192; GPT-2 small:
12 layers, d=768, vocab 50257) and the same weight-decay grouping (no decay for biases,
LayerNorm gains and embeddings). The peer is one ``optimizer.step()`` of PyTorch's fused
AdamW, which updates its tensors in place. fnllm rows:

- ``update+apply``: the pure optax-style pair ``opt.update`` + ``optim.apply_updates`` (new
  trees every step, inputs untouched), eager;
- ``update+apply [foreach]``: the same through the multi-tensor path used under compile;
- ``step``: ``optim.step`` (fused kernel on copies; still pure);
- ``step donate``: ``optim.step(..., donate=True)`` (buffers reused, like ``jax.jit``'s
  ``donate_argnums``);
- ``compiled update+apply``: the pure pair inside ``torch.compile(fullgraph=True)``.

Times are medians of interleaved A/B runs (``benchmarks/_harness.py``); ratio = fnllm / peer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import fnllm.optim._adam as adam_impl
from benchmarks._harness import compare, print_table
from fnllm import optim, tree

LR, WD = 3e-4, 0.1


def gpt_params(
    n_layer: int, d: int, vocab: int, max_len: int, device: str, seed: int = 0
) -> dict[str, Any]:
    """A GPT-2-shaped parameter tree of random float32 tensors."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device)

    def block() -> dict[str, Any]:
        return {
            "ln_1": {"weight": r(d), "bias": r(d)},
            "attn": {
                "qkv": {"weight": r(3 * d, d), "bias": r(3 * d)},
                "proj": {"weight": r(d, d), "bias": r(d)},
            },
            "ln_2": {"weight": r(d), "bias": r(d)},
            "mlp": {
                "fc": {"weight": r(4 * d, d), "bias": r(4 * d)},
                "proj": {"weight": r(d, 4 * d), "bias": r(d)},
            },
        }

    return {
        "embed": {"weight": r(vocab, d)},
        "pos_embed": {"weight": r(max_len, d)},
        "blocks": [block() for _ in range(n_layer)],
        "ln_f": {"weight": r(d), "bias": r(d)},
    }


WORKLOADS = {
    "gpt-tiny": dict(n_layer=4, d=256, vocab=8192, max_len=256),
    "gpt2-small": dict(n_layer=12, d=768, vocab=50257, max_len=1024),
}


def run(
    name: str, device: str, *, runs: int, warmup: int, compiled: bool, rows: set[str] | None = None
) -> list[list[Any]]:
    params = gpt_params(**WORKLOADS[name], device=device)
    grads = tree.map(lambda x: torch.randn_like(x) * 1e-3, params)
    mask = optim.decay_mask()
    decay = tree.flatten(tree.map(lambda p, x: mask(p, x), params, with_path=True))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # Peer: torch fused AdamW with the same decay groups, its own copies of the parameters.
    flat_p, flat_g = tree.flatten(params), tree.flatten(grads)
    tp = {k: torch.nn.Parameter(v.clone()) for k, v in flat_p.items()}
    for k, v in flat_g.items():
        tp[k].grad = v.clone()
    groups = [
        {"params": [tp[k] for k in tp if decay[k]], "weight_decay": WD},
        {"params": [tp[k] for k in tp if not decay[k]], "weight_decay": 0.0},
    ]
    peer = torch.optim.AdamW(groups, lr=LR, fused=True)

    def torch_step() -> None:
        peer.step()

    opt = optim.adamw(LR, weight_decay=WD, mask=mask)

    def looping(fn: Callable[[Any, Any], tuple[Any, Any]]) -> Callable[[], None]:
        box = {"p": tree.map(lambda x: x.clone(), params), "s": None}
        box["s"] = opt.init(box["p"])

        def call() -> None:
            box["p"], box["s"] = fn(box["p"], box["s"])

        return call

    def pure(p: Any, s: Any) -> tuple[Any, Any]:
        updates, s = opt.update(grads, s, p)
        return optim.apply_updates(p, updates), s

    def pure_foreach(p: Any, s: Any) -> tuple[Any, Any]:
        saved = adam_impl._fused_ok
        adam_impl._fused_ok = lambda s: False
        try:
            return pure(p, s)
        finally:
            adam_impl._fused_ok = saved

    variants: list[tuple[str, Callable[[Any, Any], tuple[Any, Any]]]] = [
        ("update+apply", pure),
        ("update+apply [foreach]", pure_foreach),
        ("step", lambda p, s: optim.step(opt, grads, s, p)),
        ("step donate", lambda p, s: optim.step(opt, grads, s, p, donate=True)),
    ]
    if rows is not None:
        variants = [v for v in variants if v[0] in rows]
    if compiled:
        fn = torch.compile(pure, fullgraph=True)
        t0 = time.perf_counter()
        looping(fn)()
        sync()
        print(f"# {name}: compile took {time.perf_counter() - t0:.1f} s")
        variants.append(("compiled update+apply", fn))

    n = sum(x.numel() for x in tree.leaves(params))
    rows = []
    for label, fn in variants:
        c = compare(looping(fn), torch_step, warmup=warmup, runs=runs, sync=sync)
        rows.append([f"{name} ({n / 1e6:.1f}M) {label}", c.a.median, c.b.median, c.ratio])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GPT-tiny only, few runs, no compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled row")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument(
        "--workloads", default=None, help="comma-separated subset of " + ",".join(WORKLOADS)
    )
    ap.add_argument("--rows", default=None, help="comma-separated eager rows to keep")
    args = ap.parse_args()
    keep = set(args.rows.split(",")) if args.rows else None
    names = ["gpt-tiny"] if args.quick else list(WORKLOADS)
    if args.workloads:
        names = args.workloads.split(",")
    runs = args.runs or (5 if args.quick else 21)
    table: list[list[Any]] = []
    for name in names:
        table += run(
            name,
            args.device,
            runs=runs,
            warmup=2 if args.quick else 5,
            compiled=not (args.quick or args.no_compile),
            rows=keep,
        )
    print_table(
        table,
        header=("workload", "fnllm ms", "torch AdamW(fused) ms", "ratio"),
        title=f"optimizer step on {args.device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
    )


if __name__ == "__main__":
    main()
