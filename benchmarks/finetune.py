"""Finetuning benchmark: fnllm train steps against ``transformers`` and ``peft`` on MiniLM.

Both sides hold the same pretrained weights (all-MiniLM-L6-v2, loaded by ``fnllm.io.from_hf``
and by ``BertForSequenceClassification.from_pretrained``), the same batch (16 x 128 random ids,
no padding), dropout off, ``[CLS]`` + pooler + a 2-way head, and AdamW. A step is forward,
cross-entropy, backward and the optimizer update:

- ``full``: every parameter trains (HF: ``torch.optim.AdamW``, foreach).
- ``last:2``: the last two blocks, the pooler and the head; HF freezes the rest with
  ``requires_grad_(False)``. fnllm is timed twice: the plain step (same work as HF) and the step
  that resumes from cached hidden states of the frozen blocks (what ``fnllm demo`` does).
- ``lora``: peft ``LoraConfig(r=8, alpha=16, target_modules=["query", "value"])`` against fnllm
  adapters on the fused ``qkv`` of rank 16, the same function class (a rank-16 adapter on
  ``qkv`` holds peft's two rank-8 adapters; see ``tests/test_finetune_lora.py``).

Variable-length rows (``--rows variable``): full finetuning with dropout 0.1 on real padded
batches, one timed run = one epoch over ``--var-batches`` batches of 16 random-length texts
(10 to 64 tokens, padded by ``fnllm.data.length_batches`` to the buckets 32 and 64). ``eager``:
fnllm's step with ``compile=False`` against ``BertForSequenceClassification`` in train mode;
``compiled``: ``train.make_step(compile=True)`` against ``torch.compile`` of the Hugging Face
model, both fed the same bucketed batches (the warm-up epoch holds the compiles, one per bucket).

Times are medians of interleaved runs in one process (:func:`benchmarks._harness.compare`);
the ratio is the median of paired ratios fnllm / peer. Peak memory is measured in a fresh
subprocess per configuration: the highest resident set size sampled every millisecond during
three steps, minus the resident size just before them.

    .venv/bin/python -m benchmarks.finetune --quick        # a tiny random BERT, seconds
    .venv/bin/python -m benchmarks.finetune --threads 1    # MiniLM, batch 16 x 128
    .venv/bin/python -m benchmarks.finetune --threads 1 --rows variable --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from benchmarks._harness import compare, load_average, print_table

CONFIGS = ("full", "last:2", "lora")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one table (times) and one (peak memory)."""
    args = _parse(argv)
    if args.child:
        _child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = _model_dir(args)
    runs = args.runs or (3 if args.quick else 8)
    if args.rows in ("all", "variable"):
        _variable_rows(model_dir, args, runs)
    if args.rows == "variable":
        return
    rows = []
    fn_ms: dict[str, float] = {}
    for name in CONFIGS:
        fn_step = _fnllm_step(model_dir, name, args, cached=False)
        peer_step = _peer_step(model_dir, name, args)
        c = compare(fn_step, peer_step, warmup=2, runs=runs)
        fn_ms[name] = c.a.median
        rows.append([name, c.a.median, c.b.median, c.ratio])
        if name == "last:2":
            cached = _fnllm_step(model_dir, name, args, cached=True)
            c2 = compare(cached, peer_step, warmup=2, runs=runs)
            fn_ms["last:2 cached"] = c2.a.median
            rows.append(["last:2 (frozen prefix cached)", c2.a.median, c2.b.median, c2.ratio])
    print(
        f"fnllm finetune benchmark: {model_dir}, batch {args.batch} x {args.seq}, "
        f"{torch.get_num_threads()} threads, {runs} interleaved runs"
    )
    print_table(rows, header=("step", "fnllm ms", "peer ms", "fnllm / peer"), title="train step")
    print(
        f"\nlast:2 / full (fnllm): {fn_ms['last:2'] / fn_ms['full']:.2f} plain, "
        f"{fn_ms['last:2 cached'] / fn_ms['full']:.2f} with the frozen prefix cached"
    )
    if args.no_memory:
        print(f"(load average at the end: {load_average()})")
        return
    mem = []
    for name in CONFIGS:
        a = _child_peak(model_dir, name, "fnllm", args)
        b = _child_peak(model_dir, name, "peer", args)
        mem.append([name, a, b, a / b])
    print_table(mem, header=("step", "fnllm MB", "peer MB", "fnllm / peer"), title="peak memory")
    print(f"(load average at the end: {load_average()})")


# ----------------------------------------------------------------------------- the two sides


def _batch(args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fnllm import random as jr

    ids = jr.randint(jr.key(1), (args.batch, args.seq), 1000 % vocab, vocab)
    return ids, jr.randint(jr.key(2), (args.batch,), 0, 2)


def _fnllm_step(model_dir: str, name: str, args: argparse.Namespace, cached: bool) -> Any:
    from fnllm import io, losses, optim, train, tree
    from fnllm import random as jr
    from fnllm.finetune import Classifier, frozen_prefix, lora, strategy

    bert, base = io.from_hf(model_dir)
    model = Classifier(bert, 2, "cls")
    params = model.init(jr.key(0), base_params=base)
    if name == "lora":
        params = lora.init(jr.key(3), params, rank=16, alpha=32, targets=["*.attn.qkv"])
    filt = strategy(name, model)
    k = frozen_prefix(model, params, filt) if cached else 0
    trainable, frozen = tree.partition(params, filt)
    ids, labels = _batch(args, bert.vocab_size)
    x = model.prefix(params, ids, k).detach() if k else ids

    def loss_fn(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
        p = tree.combine(tr, fr)
        logits = model.apply_from(p, batch[0], k) if k else model.apply(p, batch[0])
        return losses.classification(logits, batch[1])

    opt = optim.adamw(1e-5)
    step = train.make_step(loss_fn, opt, compile=False)
    state = {"tr": tree.map(torch.clone, trainable), "opt": opt.init(trainable)}

    def run() -> None:
        state["tr"], state["opt"], _ = step(
            state["tr"], frozen, state["opt"], (x, labels), jr.key(0), donate=True
        )

    return run


def _peer_step(model_dir: str, name: str, args: argparse.Namespace) -> Any:
    import transformers

    hf = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    hf.train()
    if name == "last:2":
        n = hf.config.num_hidden_layers
        keep = (f"encoder.layer.{n - 2}.", f"encoder.layer.{n - 1}.", "pooler.", "classifier.")
        for pname, p in hf.named_parameters():
            p.requires_grad_(any(k in pname for k in keep))
    if name == "lora":
        import peft

        cfg = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["query", "value"],
        )
        hf = peft.get_peft_model(hf, cfg)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, labels = _batch(args, hf.config.vocab_size)

    def run() -> None:
        out = hf(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------- variable lengths


def _variable_rows(model_dir: str, args: argparse.Namespace, runs: int) -> None:
    modes = ("eager",) if args.quick else ("eager", "compiled")
    rows = []
    for mode in modes:
        compiled = mode == "compiled"
        fn_epoch = _fnllm_epoch(model_dir, args, compiled)
        peer_epoch = _peer_epoch(model_dir, args, compiled)
        c = compare(fn_epoch, peer_epoch, warmup=1, runs=runs)
        rows.append([f"full, dropout 0.1, {mode}", c.a.median, c.b.median, c.ratio])
        print(f"{rows[-1][0]}: fnllm {c.a.median:.1f} ms, transformers {c.b.median:.1f} ms "
              f"per epoch, ratio {c.ratio}", flush=True)  # fmt: skip
    print(
        f"fnllm finetune benchmark, variable lengths: {model_dir}, {args.var_batches} batches "
        f"of 16 x 10..{_VAR_LONGEST} tokens per epoch, {torch.get_num_threads()} threads, "
        f"{runs} interleaved runs"
    )
    print_table(
        rows, header=("epoch", "fnllm ms", "transformers ms", "fnllm / peer"), title="epoch"
    )


_VAR_LONGEST = 64


def _var_batches(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    from fnllm import data
    from fnllm import random as jr

    n = 16 * args.var_batches
    longest = min(_VAR_LONGEST, args.seq)
    lengths = jr.randint(jr.key(4), (n,), min(10, longest), longest + 1).tolist()
    ids = [jr.randint(jr.fold_in(jr.key(5), i), (k,), 1000 % vocab, vocab).tolist() for i, k in
           enumerate(lengths)]  # fmt: skip
    labels = jr.randint(jr.key(6), (n,), 0, 2)
    return data.length_batches(ids, labels, 16, key=jr.key(7), bucket=[longest // 2, longest])


def _fnllm_epoch(model_dir: str, args: argparse.Namespace, compiled: bool) -> Any:
    from dataclasses import replace

    from fnllm import io, losses, optim, train, tree
    from fnllm import random as jr
    from fnllm.finetune import Classifier

    bert, base = io.from_hf(model_dir)
    model = Classifier(replace(bert, dropout=0.1), 2, "cls")
    params = model.init(jr.key(0), base_params=base)
    batches = _var_batches(args, bert.vocab_size)

    def loss_fn(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
        logits = model.apply(tree.combine(tr, fr), batch[0], batch[1], key=key)
        return losses.classification(logits, batch[2])

    opt = optim.adamw(1e-5)
    step = train.make_step(loss_fn, opt, compile={"dynamic": False} if compiled else False)
    state = {"tr": tree.map(torch.clone, params), "opt": opt.init(params), "n": 0}

    def run() -> None:
        for b in batches:
            state["n"] += 1
            state["tr"], state["opt"], _ = step(
                state["tr"],
                {},
                state["opt"],
                (b["input_ids"], b["attention_mask"], b["labels"]),
                jr.key(state["n"]),
                donate=True,
            )

    return run


def _peer_epoch(model_dir: str, args: argparse.Namespace, compiled: bool) -> Any:
    import transformers

    hf = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    hf.train()
    forward = torch.compile(hf, dynamic=False) if compiled else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    batches = _var_batches(args, hf.config.vocab_size)

    def run() -> None:
        for b in batches:
            out = forward(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------- peak memory


def _child_peak(model_dir: str, name: str, side: str, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.finetune",
        "--child",
        f"{side}:{name}",
        "--model-dir",
        model_dir,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--threads",
        str(args.threads or torch.get_num_threads()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def _child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    side, name = args.child.split(":", 1)
    maker = _fnllm_step if side == "fnllm" else _peer_step
    step = (
        maker(args.model_dir, name, args, cached=False)
        if side == "fnllm"
        else maker(args.model_dir, name, args)
    )
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(3):
        step()
    done.set()
    t.join()
    print(json.dumps({"peak_mb": (peak[0] - before) / 2**20}))


def _model_dir(args: argparse.Namespace) -> str:
    if args.model_dir:
        return args.model_dir
    from fnllm import io

    if not args.quick:
        return str(io.pretrained_dir("all-MiniLM-L6-v2"))
    from fnllm import random as jr
    from fnllm.models import BERT

    bert = BERT(
        vocab_size=2000,
        n_layer=4,
        n_head=4,
        d_model=64,
        d_ff=256,
        max_len=64,
        mlm_head=False,
        pair_head=False,
    )
    directory = tempfile.mkdtemp(prefix="fnllm-bench-")
    io.to_hf(bert, bert.init(jr.key(0)), directory)
    return directory


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random BERT, batch 4 x 32")
    p.add_argument("--model-dir", default=None, help="a BERT folder (default: MiniLM)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--rows",
        choices=("all", "fixed", "variable"),
        default="all",
        help="fixed: the 16 x 128 steps; variable: epochs of variable-length batches, dropout 0.1",
    )
    p.add_argument("--var-batches", type=int, default=None, help="batches per variable epoch")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 16)
    args.seq = args.seq or (32 if args.quick else 128)
    args.var_batches = args.var_batches or (3 if args.quick else 6)
    return args


if __name__ == "__main__":
    main()
