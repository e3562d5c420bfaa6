"""What compiling a finetuning step costs: fnllm against ``transformers``, one process per cell.

Workloads (random weights, AdamW, 2-class cross-entropy or causal LM):

- ``minilm-0.1`` / ``minilm-0.0``: all-MiniLM-L6-v2 shapes (6 layers, d 384, 12 heads, d_ff 1536,
  vocab 30522), mean-pooled 2-class classifier, batch 32 x 64, dropout 0.1 / 0.0; the peer is
  ``BertForSequenceClassification`` with the same dropout.
- ``gpt2-small``: GPT-2 small (12 layers, d 768, vocab 50257), causal LM, batch 4 x 256,
  dropout 0.1; the peer is ``GPT2LMHeadModel``.

Cells, each measured in its own Python process (so nothing is shared through memory):

- ``eager``: the first eager step (the one-off cost: for fnllm, building or loading the native
  random kernel in a fresh ``FNLLM_CACHE_DIR``) and the median steady eager step.
- ``cold``: the first compiled step in a fresh ``TORCHINDUCTOR_CACHE_DIR`` (the compile) and
  the median steady compiled step. fnllm: ``train.make_step(compile=True)``; peer:
  ``torch.compile(model)`` with ``torch.optim.AdamW(fused=True)``.
- ``warm``: a second process on the cold cell's cache folder: its first compiled step (what a
  user waits for when re-running a script).

Every cell runs ``--repeats`` times (fresh folders each time); the table gives medians and the
fnllm / peer ratios as ``median [min, max]`` over the repeats (paired by repeat). The machine's
load average is printed before and after: on a shared machine the absolute times move with it.

    .venv/bin/python -m benchmarks.compile_cost --quick          # tiny shapes, a few minutes
    .venv/bin/python -m benchmarks.compile_cost --threads 2      # the full table (hours cold)
    .venv/bin/python -m benchmarks.compile_cost --workloads minilm-0.1 --cells eager
    .venv/bin/python -m benchmarks.compile_cost --regional   # fnllm: compile={"regional": True}
    .venv/bin/python -m benchmarks.compile_cost --regional --device cuda   # the GPU check
    .venv/bin/python -m benchmarks.compile_cost --regional --profile --repeats 1 \
        --workloads minilm-0.1 --cells eager,cold --libs fnllm    # where a step's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks._harness import Ratio, load_average, print_table

WORKLOADS = ("minilm-0.1", "minilm-0.0", "gpt2-small")
CELLS = ("eager", "cold", "warm")
LIBS = ("fnllm", "transformers")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (2 layers, d 64), 1 repeat")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every cell")
    p.add_argument("--repeats", type=int, default=0, help="repeats per cell (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=0, help="timed steady steps (default 5, quick 3)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated: eager,cold,warm")
    p.add_argument("--libs", default=",".join(LIBS), help="comma-separated: fnllm,transformers")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell process")
    p.add_argument(
        "--regional", action="store_true",
        help='fnllm compiles with make_step(compile={"regional": True}): forward regions',
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="after the timed steps, profile 2 steps of each cell and print the top ops",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (each cell's device)")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = p.parse_args(argv)
    if args.cell:
        print(json.dumps(_run_cell(args.cell, args)))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else 5)
    names = [w for w in args.workloads.split(",") if w]
    cells = [c for c in args.cells.split(",") if c]
    libs = [x for x in args.libs.split(",") if x]
    for bad, allowed in ((names, WORKLOADS), (cells, CELLS), (libs, LIBS)):
        unknown = sorted(set(bad) - set(allowed))
        if unknown:
            p.error(f"unknown {unknown}; expected some of {list(allowed)}")
    if "warm" in cells and "cold" not in cells:
        cells.insert(cells.index("warm"), "cold")  # warm reuses the cold cell's cache folder
    print(f"threads {args.threads}, quick {args.quick}, repeats {repeats}")
    print(f"load average at start: {load_average()}")
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for name in names:
        for r in range(repeats):
            for lib in libs:
                with tempfile.TemporaryDirectory(prefix="compile_cost_") as tmp:
                    for cell in cells:
                        got = _spawn(lib, name, cell, tmp, args)
                        results.setdefault((name, lib, cell), []).append(got)
                        print(f"  {name} {lib} {cell} repeat {r}: {got}", flush=True)
    print(f"load average at end: {load_average()}")
    _report(results, names, cells, libs)


def _spawn(lib: str, name: str, cell: str, tmp: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")  # shared by cold and warm
    # fnllm's own cache (the native random kernel): fresh for the eager cell, so its first step
    # includes building it; cold/warm share one, as a user's machine does
    env["FNLLM_CACHE_DIR"] = os.path.join(tmp, "fnllm-eager" if cell == "eager" else "fnllm")
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "benchmarks.compile_cost", "--cell", f"{lib}:{name}:{cell}"]
    cmd += ["--threads", str(args.threads), "--steps", str(args.steps)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--regional"] if args.regional else []
    cmd += ["--profile"] if args.profile else []
    cmd += ["--device", args.device]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    if args.profile:  # the cell's profile table, printed above its JSON line
        print("\n".join(res.stdout.strip().splitlines()[:-1]))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def _report(results: dict, names: list[str], cells: list[str], libs: list[str]) -> None:
    measures = {
        "eager": [("eager first step", "first_s", "s"), ("eager step", "step_ms", "ms")],
        "cold": [("compiled: cold compile", "first_s", "s"), ("compiled step", "step_ms", "ms")],
        "warm": [("compiled: warm start", "first_s", "s")],
    }
    for name in names:
        rows = []
        for cell in cells:
            for label, field, unit in measures[cell]:
                vals = {lib: _field(results, name, lib, cell, field) for lib in libs}
                txt = [_median_txt(vals[lib], unit) for lib in libs]
                rows.append([label, *txt, _ratio(vals.get("fnllm"), vals.get("transformers"))])
        # fnllm's own payoff: compiled step against its eager step
        eag = [r.get("step_ms") for r in results.get((name, "fnllm", "eager"), [])]
        cmp_ = [r.get("step_ms") for r in results.get((name, "fnllm", "cold"), [])]
        if eag and cmp_:
            rows.append(["fnllm compiled / fnllm eager", "", "", _ratio(cmp_, eag)])
        header = ("measure", *(f"{lib}" for lib in libs), "fnllm / transformers")
        print_table(rows, header=header, title=name)


def _field(results: dict, name: str, lib: str, cell: str, field: str) -> list:
    return [r.get(field) for r in results.get((name, lib, cell), [])]


def _median_txt(vals: list, unit: str) -> str:
    if not vals or None in vals:
        return "-"
    return f"{statistics.median(vals):.2f} {unit}"


def _ratio(a: list | None, b: list | None) -> str:
    if not a or not b or None in a or None in b:
        return "-"
    pairs = [x / y for x, y in zip(a, b) if y]
    if not pairs:
        return "-"
    return str(Ratio(statistics.median(pairs), min(pairs), max(pairs)))


# ------------------------------------------------------------------------ one cell, in-process


def _shapes(name: str, quick: bool) -> dict[str, Any]:
    if name.startswith("minilm"):
        s = {"vocab": 30522, "layers": 6, "d": 384, "heads": 12, "ff": 1536, "batch": (32, 64)}
        if quick:
            s = {"vocab": 1000, "layers": 2, "d": 64, "heads": 4, "ff": 256, "batch": (8, 32)}
        return {**s, "dropout": float(name.split("-")[1]), "kind": "bert"}
    s = {"vocab": 50257, "layers": 12, "d": 768, "heads": 12, "ff": 3072, "batch": (4, 256)}
    if quick:
        s = {"vocab": 1000, "layers": 2, "d": 64, "heads": 4, "ff": 256, "batch": (4, 32)}
    return {**s, "dropout": 0.1, "kind": "gpt"}


def _run_cell(spec: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    lib, name, cell = spec.split(":")
    s = _shapes(name, args.quick)
    compile: Any = cell != "eager"
    if lib == "fnllm" and compile and args.regional:
        compile = {"regional": True}
    step = (_fnllm_step if lib == "fnllm" else _hf_step)(s, compile=compile, device=args.device)
    t0 = time.perf_counter()
    step(0)
    first_s = time.perf_counter() - t0
    if cell == "warm":
        return {"first_s": first_s}
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i + 1)
        times.append((time.perf_counter() - t0) * 1e3)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2):
                step(args.steps + 1 + i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"{lib} {name} {cell}: 2 profiled steps\n{table}")
    return {"first_s": first_s, "step_ms": statistics.median(times)}


def _fnllm_step(s: dict[str, Any], compile: Any, device: str = "cpu") -> Any:
    import torch

    from fnllm import losses, optim, train, tree
    from fnllm import random as jr
    from fnllm.finetune import Classifier
    from fnllm.models import BERT, GPT

    b, t = s["batch"]
    tokens = jr.randint(jr.key(1, device=device), (b, t), 0, s["vocab"])
    if s["kind"] == "bert":
        base = BERT(
            vocab_size=s["vocab"], n_layer=s["layers"], n_head=s["heads"], d_model=s["d"],
            d_ff=s["ff"], max_len=512, dropout=s["dropout"],
        )  # fmt: skip
        clf = Classifier(base, n_classes=2, pooling="mean")
        params = clf.init(jr.key(0, device=device))
        labels = jr.randint(jr.key(2, device=device), (b,), 0, 2)

        def loss_fn(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
            return losses.cross_entropy(clf.apply(tree.combine(tr, fr), batch, key=key), labels)

    else:
        gpt = GPT(
            vocab_size=s["vocab"], n_layer=s["layers"], n_head=s["heads"], d_model=s["d"],
            max_len=1024, dropout=s["dropout"],
        )  # fmt: skip
        params = gpt.init(jr.key(0, device=device))

        def loss_fn(tr: Any, fr: Any, batch: Any, key: Any) -> torch.Tensor:
            return losses.causal_lm(gpt.apply(tree.combine(tr, fr), batch, key=key), batch)

    opt = optim.adamw(1e-5)
    train_step = train.make_step(loss_fn, opt, compile=compile)
    state = {"params": params, "opt": opt.init(params)}
    key = jr.key(3, device=device)

    def step(i: int) -> None:
        tr, st, metrics = train_step(
            state["params"], {}, state["opt"], tokens, jr.fold_in(key, i), donate=True
        )
        state["params"], state["opt"] = tr, st
        float(metrics["loss"])

    return step


def _hf_step(s: dict[str, Any], compile: bool, device: str = "cpu") -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    b, t = s["batch"]
    tokens = torch.randint(0, s["vocab"], (b, t), device=device)
    p = s["dropout"]
    if s["kind"] == "bert":
        cfg = transformers.BertConfig(
            vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["ff"], num_labels=2,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg)
        labels = torch.randint(0, 2, (b,), device=device)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=s["vocab"], n_embd=s["d"], n_layer=s["layers"], n_head=s["heads"],
            n_positions=1024, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        labels = tokens
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    forward = torch.compile(model) if compile else model

    def step(i: int) -> None:
        out = forward(input_ids=tokens, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()

    return step


if __name__ == "__main__":
    main()
