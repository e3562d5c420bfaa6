"""Full train step (forward + backward + AdamW): fnllm ``train.make_step`` vs Hugging Face.

fnllm: ``train.make_step(loss_fn, optim.adamw(...))``, the step
``(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)`` with its
non-finite guard, eager and compiled (``torch.compile(fullgraph=True)``), called with
``donate=True`` as ``train.fit`` calls it. Hugging Face:
``GPT2LMHeadModel`` holding the same weights (``fnllm.io.to_hf`` + ``from_pretrained``), the
same float32 cross-entropy, ``loss.backward()`` and ``torch.optim.AdamW(fused=True)``, eager
(the usual way to train it). Same hyper-parameters on both sides (lr 3e-4, betas 0.9/0.95,
weight decay 0.1 on every leaf). Goal: fnllm compiled <= 0.8x HF's time.

Freezing: fnllm's step training only the last block and ``ln_f`` (the tied head/embedding and
every lower block frozen) against fnllm's full step, same mode. Backward stops at the last
block, so the goal is <= 0.65x.

Workloads: ``gpt-tiny`` (4 layers, d=256, 4 heads, vocab 8192, batch 8 x 128) and
``gpt2-small`` (124M, batch 4 x 256; ``--quick`` skips it). With ``--dtype bf16`` both sides run
their forward and backward under ``torch.autocast(bfloat16)`` with float32 params and optimizer
state (mixed precision). MFU = model matmul FLOPs (``benchmarks.train_step``'s count) per second
over the peak of a 2048^3 matmul measured at start-up (and over the datasheet's dense peak on a
known GPU).

A last table profiles one step of each side and sums the time spent in GEMMs alone
(``benchmarks._harness.matmul_ms``): fnllm's GEMM time over HF's whole step is the ratio a step
that fused every other op away would reach. On CPU, where GEMMs are most of the step, that floor
decides whether the 0.8x goal is reachable at all.

    .venv/bin/python -m benchmarks.full_step --quick        # GPT tiny, eager, seconds
    .venv/bin/python -m benchmarks.full_step                # both workloads, eager + compiled
    python -m benchmarks.full_step --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._harness import add_model_args, compare, matmul_ms, print_table
from benchmarks.train_step import (
    WORKLOADS,
    _device_name,
    _hf_twin,
    _matmul_peak,
    _train_flops,
)
from fnllm import losses, optim, train, tree
from fnllm import random as jr

NAMES = ("gpt-tiny", "gpt2-small")
LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense datasheet peaks (FLOP/s) for the MFU column on known GPUs
DATASHEET = {
    ("H100", "bf16"): 989e12,
    ("H200", "bf16"): 989e12,
    ("A100", "bf16"): 312e12,
    ("H100", "fp32"): 67e12,
    ("H200", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the step and freezing tables."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = ["gpt-tiny"] if args.quick else args.workloads.split(",")
    for n in names:
        if n not in NAMES:
            sys.exit(f"unknown workload {n!r}; known: {', '.join(NAMES)}")
    compile_ = args.compile if args.compile is not None else not args.quick
    peak = _matmul_peak(device, autocast or torch.float32, sync)
    sheet = next((v for (gpu, dt), v in DATASHEET.items()
                  if gpu in _device_name(device) and dt == args.dtype), None)  # fmt: skip
    print(
        f"device {device} ({_device_name(device)}), {args.dtype}, threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}, matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (2048^3)"
        + (f", datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else "")
    )
    step_rows: list[list[Any]] = []
    freeze_rows: list[list[Any]] = []
    floor_rows: list[list[Any]] = []
    for n in names:
        w = WORKLOADS[n]
        runs = args.runs or (3 if args.quick else w.runs * (5 if device.type == "cuda" else 1))
        warmup = 1 if args.quick else 2
        freeze = not args.no_freeze and (n == "gpt-tiny" or not args.quick)
        s, f, m = _run(w, device, autocast, sync, runs, warmup, compile_, peak, sheet,
                       freeze=freeze)  # fmt: skip
        step_rows += s
        freeze_rows += f
        floor_rows += m
    print_table(step_rows, header=("workload", "fnllm ms", "HF ms", "ratio", "fnllm MFU",
                                   "HF MFU"),
                title=f"full train step fwd+bwd+AdamW vs HF + AdamW(fused) ({args.device}, "
                      f"{args.dtype})")  # fmt: skip
    print("goal: fnllm compiled / HF <= 0.8")
    if freeze_rows:
        print_table(freeze_rows, header=("workload", "frozen ms", "full ms", "ratio"),
                    title="freezing: last block + ln_f trainable (head/embedding frozen) vs "
                          "full step, fnllm")  # fmt: skip
        print("goal: frozen / full <= 0.65")
    print_table(floor_rows, header=("workload", "fnllm GEMM ms", "HF GEMM ms", "HF step ms",
                                    "fnllm GEMM / HF step"),
                title="matrix-multiply floor (one profiled step each)")  # fmt: skip
    print("fnllm GEMM / HF step is the best ratio fusing everything else away could reach")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny only, eager, 3 runs")
    add_model_args(p, NAMES, DTYPES)
    p.add_argument("--no-freeze", action="store_true", help="skip the freezing measurement")
    return p.parse_args(argv)


def _run(
    w: Any,
    device: torch.device,
    autocast: torch.dtype | None,
    sync: Callable[[], Any],
    runs: int,
    warmup: int,
    compile_: bool,
    peak: float,
    sheet: float | None,
    *,
    freeze: bool,
) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    model = w.model
    params = model.init(jr.key(0))
    hf = _hf_twin(model, params).to(device).train()
    params = tree.map(lambda x: x.to(device), params)
    tokens = jr.randint(jr.key(1), (w.batch, w.seq), 0, model.vocab_size).to(device)
    hf_step = _hf_step(hf, tokens, autocast, device)

    def loss_fn(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
        return losses.causal_lm(model.apply(tree.combine(trainable, frozen), batch), batch)

    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
    full = _fn_step(loss_fn, opt, params, {}, tokens, autocast, compile_=False)
    # same weights, same loss
    fn_loss, hf_loss = float(full()[2]["loss"]), float(hf_step())
    tol = 1e-3 if autocast is None else 5e-2
    if abs(fn_loss - hf_loss) > tol * max(1.0, abs(hf_loss)):
        print(f"{w.name}: LOSSES DIFFER: fnllm {fn_loss:.6f} vs HF {hf_loss:.6f}")

    flops = _train_flops(model, w.batch, w.seq)
    mfu = lambda ms: f"{100 * flops / (ms / 1e3) / peak:.1f}%" + (
        f" ({100 * flops / (ms / 1e3) / sheet:.1f}% sheet)" if sheet else "")  # fmt: skip
    step_rows: list[list[Any]] = []
    c = compare(full, hf_step, warmup=warmup, runs=runs, sync=sync)
    step_rows.append([f"{w.name} eager", c.a.median, c.b.median, c.ratio, mfu(c.a.median),
                      mfu(c.b.median)])  # fmt: skip
    hf_ms = c.b.median
    full_c = None
    if compile_:
        t0 = time.perf_counter()
        full_c, label = _compiled(loss_fn, opt, params, {}, tokens, autocast, w.name)
        sync()
        print(f"{w.name}: first compiled fnllm step (compile) {time.perf_counter() - t0:.1f} s")
        c = compare(full_c, hf_step, warmup=warmup, runs=runs, sync=sync)
        step_rows.append([f"{w.name} {label}", c.a.median, c.b.median, c.ratio,
                          mfu(c.a.median), mfu(c.b.median)])  # fmt: skip

    best, label = (full_c, "compiled") if full_c is not None else (full, "eager")
    fn_gemm, hf_gemm = matmul_ms(best, sync), matmul_ms(hf_step, sync)
    floor_rows = [[f"{w.name} {label}", fn_gemm, hf_gemm, hf_ms, fn_gemm / hf_ms]]

    freeze_rows: list[list[Any]] = []
    if freeze:
        trainable, frozen = tree.partition(params, [f"blocks.{model.n_layer - 1}.*", "ln_f"])
        part = _fn_step(loss_fn, opt, trainable, frozen, tokens, autocast, compile_=False)
        c = compare(part, full, warmup=warmup, runs=runs, sync=sync)
        freeze_rows.append([f"{w.name} eager", c.a.median, c.b.median, c.ratio])
        if full_c is not None:
            part_c, label = _compiled(loss_fn, opt, trainable, frozen, tokens, autocast, w.name)
            c = compare(part_c, full_c, warmup=warmup, runs=runs, sync=sync)
            freeze_rows.append([f"{w.name} {label}", c.a.median, c.b.median, c.ratio])
    return step_rows, freeze_rows, floor_rows


def _compiled(
    loss_fn: Callable[..., Any],
    opt: Any,
    trainable: Any,
    frozen: Any,
    tokens: torch.Tensor,
    autocast: torch.dtype | None,
    name: str,
) -> tuple[Callable[[], Any], str]:
    """The compiled step, run once; fullgraph, or (after saying why) with graph breaks."""
    fn = _fn_step(loss_fn, opt, trainable, frozen, tokens, autocast, compile_=True)
    try:
        fn()
        return fn, "compiled"
    except Exception as e:  # a graph break somewhere: measure without fullgraph, say so
        print(f"{name}: fullgraph compile failed: {type(e).__name__}: {str(e)[:600]}")
    fn = _fn_step(loss_fn, opt, trainable, frozen, tokens, autocast, compile_={"fullgraph": False})
    fn()
    return fn, "compiled (graph breaks!)"


def _fn_step(
    loss_fn: Callable[..., Any],
    opt: Any,
    trainable: Any,
    frozen: Any,
    tokens: torch.Tensor,
    autocast: torch.dtype | None,
    *,
    compile_: bool | dict[str, Any],
) -> Callable[[], Any]:
    """One fnllm step, called as ``train.fit`` calls it; every call does the same work.

    The step runs donated, as in ``fit``: the params and optimizer state (private copies here)
    are updated in place from call to call.
    """
    step = train.make_step(loss_fn, opt, compile=compile_, autocast=autocast)
    key = jr.key(2)
    own = {"tr": tree.map(torch.clone, trainable)}
    own["state"] = opt.init(own["tr"])

    def donated() -> Any:
        out = step(own["tr"], frozen, own["state"], tokens, key, donate=True)
        own["tr"], own["state"] = out[0], out[1]
        return out

    return donated


def _hf_step(
    hf: torch.nn.Module, tokens: torch.Tensor, autocast: torch.dtype | None, device: torch.device
) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    v = hf.config.vocab_size

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):  # fmt: skip
            logits = hf(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


if __name__ == "__main__":
    main()
