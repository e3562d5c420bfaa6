"""When does compiling the train step pay off? Compile time against step time, per workload.

For each workload this times the eager step (median of the runs after one warm-up), the first
compiled call (compile included) and the compiled step after warm-up, and prints the number of
steps after which compiling has paid for itself: ``compile_s / (eager_s - compiled_s)``
(infinite when the compiled step is not faster). ``fnllm.train.fit(compile="auto")`` uses
this kind of measurement; ``docs/performance.md`` records the numbers.

Workloads: ``gpt-tiny`` (4 layers, d=256, vocab 8192, batch 8 x 128, causal LM loss) and
``minilm`` (the shapes of all-MiniLM-L6-v2: 6 layers, d=384, 12 heads, d_ff 1536, vocab 30522,
batch 8 x 128, mean-pooled regression head; random weights).

    .venv/bin/python -m benchmarks.compile_payoff --quick        # GPT tiny only, few runs
    .venv/bin/python -m benchmarks.compile_payoff --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from fnllm import losses, nn, optim, train, tree
from fnllm import random as jr
from fnllm.models.bert import BERT
from fnllm.models.gpt import GPT


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny only, 3 timed runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--workloads", default="gpt-tiny,minilm", help="comma-separated names")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = 3 if args.quick else args.runs
    names = ["gpt-tiny"] if args.quick else args.workloads.split(",")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| workload | eager ms | compiled ms | compile s | pays off after (steps) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        loss_fn, params, batch = _workload(name)
        eager_ms, first_s, compiled_ms = _measure(loss_fn, params, batch, runs)
        gain = (eager_ms - compiled_ms) / 1e3
        compile_s = first_s - compiled_ms / 1e3
        payoff = f"{compile_s / gain:.0f}" if gain > 0 else "never"
        print(f"| {name} | {eager_ms:.1f} | {compiled_ms:.1f} | {compile_s:.1f} | {payoff} |")


def _workload(name: str) -> tuple[Callable[..., Any], Any, Any]:
    tokens_of = lambda vocab: jr.randint(jr.key(1), (8, 128), 0, vocab)
    if name == "gpt-tiny":
        gpt = GPT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_len=128)
        tokens = tokens_of(gpt.vocab_size)

        def gpt_loss(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
            return losses.causal_lm(gpt.apply(tree.combine(tr, fr), batch), batch)

        return gpt_loss, gpt.init(jr.key(0)), tokens
    bert = BERT(vocab_size=30522, n_layer=6, n_head=12, d_model=384, d_ff=1536, max_len=512)
    tokens = tokens_of(bert.vocab_size)
    params = {"bert": bert.init(jr.key(0)), "head": torch.zeros(384)}
    target = jr.normal(jr.key(2), (8,))

    def bert_loss(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
        p = tree.combine(tr, fr)
        hidden = bert.apply(p["bert"], batch).last_hidden_state
        pooled = nn.mean_pool(hidden, torch.ones_like(batch, dtype=torch.bool))
        return ((pooled @ p["head"] - target) ** 2).mean()

    return bert_loss, params, tokens


def _measure(loss_fn: Callable[..., Any], params: Any, batch: Any, runs: int):
    opt = optim.adamw(1e-4)
    state = opt.init(params)
    key = jr.key(3)

    def timed(step: Any, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(params, {}, state, batch, key)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    eager = train.make_step(loss_fn, opt, compile=False)
    eager_ms = statistics.median(timed(eager, runs + 1)[1:])
    compiled = train.make_step(loss_fn, opt, compile=True)
    first_s = timed(compiled, 1)[0] / 1e3
    compiled_ms = statistics.median(timed(compiled, runs))
    return eager_ms, first_s, compiled_ms


if __name__ == "__main__":
    main()
