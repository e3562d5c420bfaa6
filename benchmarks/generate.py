"""Greedy decoding: ``fnllm.generate.sample`` (compiled decode step) vs ``transformers`` generate.

Run: ``.venv/bin/python -m benchmarks.generate [--quick] [--threads N] [--runs N]``.

Workloads: GPT tiny (4 layers, d=256, vocab 8192) and GPT-2 small (12 layers, d=768, vocab
50257), batch 1 and 8, prompt 32 tokens, 128 new tokens, greedy, fp32, same weights on both
sides. fnllm: ``generate.sample(..., temperature=0, compile=True)`` (prefill eager, then one
compiled ``torch.compile(fullgraph=True)`` call per token: cached decode in place, argmax,
output write). Peer: ``GPT2LMHeadModel.generate(do_sample=False, use_cache=True)``. The two
outputs are checked token for token. Runs are interleaved (AB, BA, ...); speed-up = median
[min, max] of the per-run ratios of fnllm tokens/s to peer tokens/s.

Goals (issue 14): >= 3x the peer on GPT tiny batch 1 (overhead-bound); on GPT-2 small batch
1, >= 85% of the memory-bandwidth limit: (bytes of the parameters read per token) / (copy
bandwidth, read + write, measured right before each timed pair), against that run's time per
token. For reference the table also gives the limit from the rate one BLAS matrix-vector
product reads a 256 MB weight at (``gemv read``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._harness import Ratio, print_table
from fnllm import generate, io
from fnllm import random as jr
from fnllm.models import GPT

MODELS = {
    "gpt-tiny": GPT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_len=256),
    "gpt2-small": GPT(),
}
BATCHES = (1, 8)
PROMPT, NEW = 32, 128


def copy_bandwidth(n_bytes: int = 256 * 2**20, runs: int = 7) -> float:
    """Read + write bytes per second of a large ``copy_`` (median of ``runs``)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n_bytes / _median_s(lambda: dst.copy_(src), runs)


def read_bandwidth(n_bytes: int = 256 * 2**20, runs: int = 3) -> float:
    """Bytes per second that one BLAS matrix-vector product reads (a ``[n, 1024]`` weight).

    The best a decode step can stream its weights at; for reference next to the copy
    bandwidth (the issue's yardstick).
    """
    weight = torch.ones(n_bytes // 4096, 1024)
    x = torch.ones(1, 1024)
    F.linear(x, weight)
    return n_bytes / _median_s(lambda: F.linear(x, weight), runs)


def bytes_per_token(model: GPT, params: Any) -> int:
    """Parameter bytes a decode step reads at batch 1, each tensor once.

    Every block's parameters, the final layer norm and the LM head (the tied token embedding
    counts once: its one looked-up row is part of the same table); the position table is
    left out (one row of it is read).
    """
    total = 0
    for path, leaf in _leaves(params):
        if path != "embed.positions.weight":
            total += leaf.numel() * leaf.element_size()
    return total


def run(name: str, batch: int, *, runs: int, new: int) -> tuple[list[Any], list[Any] | None]:
    """One workload: interleaved timed runs (AB, BA, ...), the copy bandwidth before each pair.

    Returns the speed row and, at batch 1, the bandwidth-limit row (per-run ratios of the
    floor, parameter bytes / copy bandwidth of that run, to the run's time per token).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    model = MODELS[name]
    params = model.init(jr.key(0))
    cfg = io.hf_config(model)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    hf.load_state_dict(io.to_hf_state_dict(model, params), strict=False)
    hf.tie_weights()
    hf.eval()
    prompts = jr.randint(jr.key(1), (batch, PROMPT), 0, model.vocab_size)
    mask = torch.ones_like(prompts)

    def ours() -> torch.Tensor:
        return generate.sample(None, model, params, prompts, new, temperature=0, compile=True)

    def peer() -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(
                prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        return out[:, PROMPT:]

    t0 = time.perf_counter()
    a = ours()
    compile_s = time.perf_counter() - t0
    same = torch.equal(a, peer())
    print(f"# {name} b{batch}: first call (compile) {compile_s:.1f} s, same tokens: {same}")
    limit = batch == 1
    need = bytes_per_token(model, params)
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    copies, reads = [], []
    for r in range(runs):
        if limit:
            copies.append(copy_bandwidth(runs=3))
            reads.append(read_bandwidth())
        pair = [("ours", ours), ("peer", peer)]
        for side, fn in pair if r % 2 == 0 else pair[::-1]:
            times[side].append(_median_s(fn, 1))
    speed = [p / o for o, p in zip(times["ours"], times["peer"])]
    tokens = batch * new
    row = [
        f"{name} b{batch}",
        tokens / statistics.median(times["ours"]),
        tokens / statistics.median(times["peer"]),
        _spread(speed),
        "yes" if same else "NO",
    ]
    if not limit:
        return row, None
    per_token = [t / new for t in times["ours"]]
    of_copy = [need / bw / t for bw, t in zip(copies, per_token)]
    of_read = [need / bw / t for bw, t in zip(reads, per_token)]
    return row, [
        name,
        need / 1e6,
        statistics.median(copies) / 1e9,
        statistics.median(reads) / 1e9,
        statistics.median(per_token) * 1e3,
        _spread(of_copy),
        _spread(of_read),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny batch 1, 16 tokens, 2 runs")
    p.add_argument("--runs", type=int, default=0, help="timed runs per row (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--workloads", default="gpt-tiny,gpt2-small", help="comma-separated")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["gpt-tiny"] if args.quick else args.workloads.split(",")
    batches = (1,) if args.quick else tuple(int(b) for b in args.batches.split(","))
    new = 16 if args.quick else NEW
    runs = args.runs or (2 if args.quick else 5)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth "
          f"{copy_bandwidth() / 1e9:.1f} GB/s (read + write) at the start")  # fmt: skip
    rows, limits = [], []
    for name in names:
        for batch in batches:
            row, limit = run(name, batch, runs=runs, new=new)
            rows.append(row)
            if limit is not None:
                limits.append(limit)
    print_table(
        rows,
        header=("workload", "fnllm tok/s", "transformers tok/s", "speed-up", "same tokens"),
        title=f"greedy decoding, prompt {PROMPT}, {new} new tokens (medians of {runs})",
    )
    if limits:
        print_table(
            limits,
            header=(
                "model b1",
                "param MB/token",
                "copy GB/s",
                "gemv read GB/s",
                "fnllm ms/token",
                "of copy limit",
                "of read limit",
            ),
            title="memory-bandwidth limit, batch 1 (bandwidths measured before each timed "
            "pair; time per token includes the prefill)",
        )


def _median_s(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spread(values: list[float]) -> Ratio:
    return Ratio(statistics.median(values), min(values), max(values))


def _leaves(params: Any) -> list[tuple[str, torch.Tensor]]:
    from fnllm import tree

    return list(tree.flatten(params).items())


if __name__ == "__main__":
    main()
