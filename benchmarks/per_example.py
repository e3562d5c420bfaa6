"""Per-example gradients: fnllm ``grads.per_example`` vs a loop, Opacus and one batched backward.

Workload: the GPT tiny config (4 layers, d=256, 4 heads, vocab 8192, tied head), batch 16 x 64,
causal-LM loss (each example's gradient is that of its own mean token loss). Methods:

- ``fnllm``: ``grads.per_example(loss_fn)(params, {}, tokens)``, i.e. ``vmap(grad)`` (eager;
  ``--compile`` adds a ``torch.compile(fullgraph=True)`` row, ``--chunk N`` a chunked row);
- ``loop``: 16 single-example backwards (``torch.func.grad`` on a batch of one), stacked;
- ``opacus``: ``opacus.GradSampleModule`` around the Hugging Face ``GPT2LMHeadModel`` holding
  the same weights (written by ``fnllm.io.to_hf``), one ``loss.backward()`` (skipped with a
  message when opacus is not installed);
- ``batched``: one ordinary batched backward (the floor a per-example method is compared to;
  goal: fnllm <= 1.3x its time); with ``--compile`` also ``batched-compiled``, the same
  backward through ``torch.compile``, so that compiled fnllm is also compared like for like.

On Linux CPUs most of the eager gap is page faults: every fresh ``[16, 8192, 256]`` float32
buffer (a per-example gradient of the tied embedding) costs about 50 ms of first-touch faults
at 4 KiB pages. torch backs large CPU allocations with transparent huge pages when the process
starts with ``THP_MEM_ALLOC_ENABLE=1`` (read once, at import); the header says which mode ran,
and both sides always run under the same one.

Times: interleaved A/B in one process (``benchmarks._harness.compare``), medians and the median
of paired ratios. Peak memory: each method runs once in a fresh subprocess; on CPU the peak is
the resident set size (RSS) sampled every 0.2 ms from ``/proc/self/statm`` by a thread while
the method runs, combined with ``getrusage`` ``ru_maxrss``, minus the RSS just before the call
(model, batch and imports already loaded), so it is the extra memory the method needs
(``tracemalloc`` does not see torch's allocations). On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the call.

    .venv/bin/python -m benchmarks.per_example --quick    # a mini model, seconds
    .venv/bin/python -m benchmarks.per_example            # GPT tiny, 16 x 64, + memory
    python -m benchmarks.per_example --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._harness import compare, print_table
from fnllm import grads, tree
from fnllm import random as jr
from fnllm.models.gpt import GPT

FULL = (GPT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_len=128), 16, 64)
QUICK = (GPT(vocab_size=512, n_layer=2, n_head=2, d_model=64, max_len=32), 8, 16)
METHODS = (
    "fnllm",
    "fnllm-chunked",
    "fnllm-compiled",
    "loop",
    "opacus",
    "batched",
    "batched-compiled",
)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the time and memory tables."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _child(args)
        return
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, b, t = QUICK if args.quick else FULL
    fns = _methods(model, b, t, device, args.chunk, compile_=args.compile)
    print(
        f"per-example gradients, GPT {model.n_layer}x{model.d_model} vocab {model.vocab_size}, "
        f"batch {b} x {t}, device {device}, threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}"
    )
    _check_parity(fns, model, b)
    runs = args.runs or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    rows: list[list[Any]] = []
    for fn_name in [n for n in ("fnllm", "fnllm-chunked", "fnllm-compiled") if n in fns]:
        if fn_name == "fnllm-compiled":
            t0 = time.perf_counter()
            try:
                fns[fn_name]()
            except Exception as e:  # report and go on: the eager rows still stand
                print(f"fnllm-compiled failed: {type(e).__name__}: {str(e)[:500]}")
                del fns[fn_name]
                continue
            sync()
            print(f"fnllm-compiled: first call (compile) {time.perf_counter() - t0:.1f} s")
        peers = {"fnllm": ["batched", "loop", "opacus"], "fnllm-chunked": ["batched"]}.get(
            fn_name, ["batched", "batched-compiled"]
        )
        for peer in peers:
            if peer not in fns:
                continue
            c = compare(fns[fn_name], fns[peer], warmup=warmup, runs=runs, sync=sync)
            rows.append([f"{fn_name} vs {peer}", c.a.median, c.b.median, c.ratio])
    print_table(rows, header=("workload", "fnllm ms", "peer ms", "ratio"),
                title=f"per-example gradients, batch {b} x {t} (time, medians)")  # fmt: skip
    print("goal: fnllm vs batched <= 1.3")
    if not args.no_memory:
        mem = {m: _memory_of(m, args) for m in fns}
        mem_rows = [[f"fnllm vs {m}", mem["fnllm"], mem[m], _ratio(mem["fnllm"], mem[m])]
                    for m in ("batched", "loop", "opacus") if m in mem]  # fmt: skip
        mem_rows += [[f"{m} vs batched", mem[m], mem["batched"], _ratio(mem[m], mem["batched"])]
                     for m in ("fnllm-chunked", "fnllm-compiled") if m in mem]  # fmt: skip
        if "opacus" in mem:
            mem_rows += [[f"{m} vs opacus", mem[m], mem["opacus"], _ratio(mem[m], mem["opacus"])]
                         for m in ("fnllm-chunked", "fnllm-compiled") if m in mem]  # fmt: skip
        print_table(
            mem_rows,
            header=("workload", "fnllm MB", "peer MB", "ratio"),
            title="per-example gradients (extra peak memory, one call, fresh process)",
        )
        print("goal: fnllm peak memory <= Opacus'")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a mini model, 3 runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--chunk", type=int, default=4, help="chunk_size of the chunked row (0: none)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd fnllm row")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- methods


def _methods(
    model: GPT, b: int, t: int, device: torch.device, chunk: int, *, compile_: bool
) -> dict[str, Callable[[], Any]]:
    params = tree.map(lambda x: x.to(device), model.init(jr.key(0)))
    tokens = jr.randint(jr.key(1), (b, t), 0, model.vocab_size).to(device)

    def loss_fn(trainable: Any, frozen: Any, tokens: torch.Tensor) -> torch.Tensor:
        logits = model.apply(tree.combine(trainable, frozen), tokens)
        return _causal_loss(logits, tokens)

    per_ex = grads.per_example(loss_fn)
    grad = torch.func.grad(loss_fn)
    fns: dict[str, Callable[[], Any]] = {
        "fnllm": lambda: per_ex(params, {}, tokens),
        "loop": lambda: tree.map(
            lambda *xs: torch.stack(xs), *[grad(params, {}, tokens[i : i + 1]) for i in range(b)]
        ),
        "batched": lambda: grad(params, {}, tokens),
    }
    if chunk:
        chunked = grads.per_example(loss_fn, chunk_size=chunk)
        fns["fnllm-chunked"] = lambda: chunked(params, {}, tokens)
    if compile_:
        compiled = torch.compile(per_ex, fullgraph=True)
        fns["fnllm-compiled"] = lambda: compiled(params, {}, tokens)
        compiled_grad = torch.compile(grad, fullgraph=True)
        fns["batched-compiled"] = lambda: compiled_grad(params, {}, tokens)
    opacus_step = _opacus(model, params, tokens)
    if opacus_step is not None:
        fns["opacus"] = opacus_step
    return fns


def _opacus(model: GPT, params: Any, tokens: torch.Tensor) -> Callable[[], Any] | None:
    try:
        from opacus import GradSampleModule
    except ImportError:
        print("opacus is not installed: skipping the Opacus rows (pip install opacus)")
        return None
    from benchmarks.train_step import _hf_twin

    hf = _hf_twin(model, tree.map(lambda x: x.cpu(), params)).to(tokens.device).train()
    gsm = GradSampleModule(hf)

    def step() -> list[torch.Tensor]:
        gsm.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "full backward hook ... no inputs require grad"
            loss = _causal_loss(gsm(tokens).logits, tokens)
            loss.backward()
        return [p.grad_sample for p in gsm.parameters() if p.requires_grad]

    return step


def _causal_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, v).float(), tokens[..., 1:].reshape(-1))


def _check_parity(fns: dict[str, Callable[[], Any]], model: GPT, b: int) -> None:
    """The methods compute the same thing: fnllm == loop (per example), mean == batched."""
    per_ex, loop, batched = fns["fnllm"](), fns["loop"](), fns["batched"]()
    try:
        for path, x in tree.flatten(per_ex).items():
            torch.testing.assert_close(x, tree.flatten(loop)[path], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(x.mean(0), tree.flatten(batched)[path], rtol=1e-4, atol=1e-6)
    except AssertionError as e:  # say so, and still time them
        print(f"PARITY MISMATCH at {path}: {str(e)[:400]}")
        return
    print(f"parity: fnllm per-example == loop of {b} single-example grads; mean == batched")


# ----------------------------------------------------------------------------- memory


def _memory_of(method: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "benchmarks.per_example", "--child", method,
           "--device", args.device, "--chunk", str(args.chunk)]  # fmt: skip
    cmd += ["--quick"] if args.quick else []
    cmd += ["--compile"] if method.endswith("-compiled") else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    print(f"memory child {method} failed:\n{out.stderr[-2000:]}")
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model, b, t = QUICK if args.quick else FULL
    compile_ = args.child.endswith("-compiled")
    fns = _methods(model, b, t, device, args.chunk, compile_=compile_)
    fn = fns[args.child]
    if compile_:
        fn()  # compile first: the compiler's own memory is not the method's
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss()
        maxrss_before = _maxrss()
        sampled = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                sampled.append(_rss())
                time.sleep(0.0002)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out = fn()
        done.set()
        th.join()
        sampled.append(_rss())
        maxrss_after = _maxrss()
        top = max(max(sampled), maxrss_after if maxrss_after > maxrss_before else 0)
        peak = top - before
    del out
    print(f"PEAK_MB {peak / 2**20:.1f}")
    print(json.dumps({"method": args.child, "peak_mb": peak / 2**20}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


if __name__ == "__main__":
    main()
