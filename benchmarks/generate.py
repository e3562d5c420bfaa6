"""Greedy decoding: ``fnllm.generate.sample`` (compiled decode step) vs ``transformers`` generate.

Run: ``.venv/bin/python -m benchmarks.generate [--quick] [--threads N] [--runs N]``.

Workloads: GPT tiny (4 layers, d=256, vocab 8192) and GPT-2 small (12 layers, d=768, vocab
50257), batch 1 and 8, prompt 32 tokens, 128 new tokens, greedy, fp32, same weights on both
sides. fnllm: ``generate.sample(..., temperature=0, compile=True)`` (prefill eager, then one
compiled ``torch.compile(fullgraph=True)`` step per token: cached decode + argmax).
Peer: ``GPT2LMHeadModel.generate(do_sample=False, use_cache=True)``. The two outputs are
checked token for token. Times are medians of interleaved runs; ratio = fnllm tokens/s over
peer tokens/s (paired median).

Goals (issue 14): >= 3x the peer on GPT tiny batch 1 (overhead-bound); on GPT-2 small batch
1, >= 85% of the memory-bandwidth limit: (bytes of the parameters read per token) / (copy
bandwidth measured in this run, read + write), against the measured time per token.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks._harness import compare, print_table
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
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n_bytes / times[len(times) // 2]


def bytes_per_token(model: GPT, params: Any) -> int:
    """Parameter bytes a decode step reads: all but the position table (one row is read)."""
    total = 0
    for path, leaf in _leaves(params):
        if path != "embed.positions.weight":
            total += leaf.numel() * leaf.element_size()
    return total


def run(name: str, batch: int, *, runs: int, new: int) -> tuple[list[Any], float]:
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
    c = compare(ours, peer, warmup=1, runs=runs)
    tokens = batch * new
    ours_tps, peer_tps = tokens / c.a.median * 1e3, tokens / c.b.median * 1e3
    print(f"# {name} b{batch}: first call (compile) {compile_s:.1f} s, same tokens: {same}")
    row = [f"{name} b{batch}", ours_tps, peer_tps, 1 / c.ratio, "yes" if same else "NO"]
    return row, c.a.median / new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny batch 1, 16 tokens, 2 runs")
    p.add_argument("--runs", type=int, default=0, help="timed runs per row (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--workloads", default="gpt-tiny,gpt2-small", help="comma-separated")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["gpt-tiny"] if args.quick else args.workloads.split(",")
    batches = (1,) if args.quick else BATCHES
    new = 16 if args.quick else NEW
    runs = args.runs or (2 if args.quick else 5)
    bandwidth = copy_bandwidth()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read + write)")  # fmt: skip
    rows, limits = [], []
    for name in names:
        for batch in batches:
            row, ms_per_step = run(name, batch, runs=runs, new=new)
            rows.append(row)
            if batch == 1:
                model = MODELS[name]
                need = bytes_per_token(model, model.init(jr.key(0)))
                bandwidth = copy_bandwidth()  # again now: the load of a shared machine drifts
                floor_ms = need / bandwidth * 1e3
                limits.append(
                    [
                        name,
                        need / 1e6,
                        bandwidth / 1e9,
                        floor_ms,
                        ms_per_step,
                        floor_ms / ms_per_step,
                    ]
                )
    print_table(
        rows,
        header=("workload", "fnllm tok/s", "transformers tok/s", "speed-up", "same tokens"),
        title=f"greedy decoding, prompt {PROMPT}, {new} new tokens (medians of {runs})",
    )
    print_table(
        limits,
        header=(
            "model b1",
            "param MB/token",
            "copy GB/s",
            "floor ms",
            "fnllm ms/token",
            "of limit",
        ),
        title="memory-bandwidth limit, batch 1 (time per token includes the prefill)",
    )


def _leaves(params: Any) -> list[tuple[str, torch.Tensor]]:
    from fnllm import tree

    return list(tree.flatten(params).items())


if __name__ == "__main__":
    main()
