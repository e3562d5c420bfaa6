"""Llama: fnllm against `transformers` (and `peft`) on a SmolLM-135M-shaped model.

Run: ``.venv/bin/python -m benchmarks.llama [--quick] [--device cuda] [--runs N] [--clock cpu]``.

``--clock cpu`` times with the process's CPU time (``getrusage``) instead of the wall clock:
on a shared, loaded machine it is the steadier measure (use ``--threads 1`` with it, so that
idle threads spinning do not count).

Workloads: ``smollm-135m`` (30 layers, d 576, 9 heads, 3 key/value heads, d_ff 1536, vocab
49152, tied embeddings; random weights), batch 8 x 256; ``llama-tiny`` (4 layers, d 256,
8/2 heads, vocab 4096, batch 4 x 64) for ``--quick``. The same weights on both sides
(``io.to_hf`` + ``from_pretrained``); runs interleaved in one process (AB, BA, ...), medians
and the median [min, max] of the paired ratios.

1. Full train step (forward, backward, AdamW): fnllm ``train.make_step`` eager and compiled
   (the whole step; ``--regional``: ``compile={"regional": True}``, as ``train.fit`` compiles)
   against ``LlamaForCausalLM`` + ``torch.optim.AdamW(fused=True)``, eager and
   ``torch.compile``'d. Goal: <= 1.0x eager, <= 0.9x compiled.
2. LoRA r=16 on every linear layer of the blocks (q, k, v, o, gate, up, down): fnllm
   ``finetune.lora`` against ``peft``, eager. Goal: step <= 0.9x, peak memory <= peft's
   (CUDA: ``max_memory_allocated``, weights included; CPU: the peak of the tensors a step
   allocates on top of what was live before it, from the profiler's memory events). Peak
   memory does not depend on the machine's load: ``--sections lora --runs 1`` measures it.
3. Greedy decoding, prompt 32, 64 new tokens, batch 1 and 8 (``--batches``): fnllm's cached
   forward with a compiled decode step (``generate.sample`` where it takes a Llama, else the
   same loop written here) against ``generate(cache_implementation="static")``; outputs
   checked token for token. ``generate.sample`` decodes from ``Llama.decode_params`` (fused
   q/k/v and gate/up, rotary tables); ``--decode-before`` adds rows that decode from the
   plain tree instead (the code before that change), in the same process.
   Goal: >= 1.5x tokens/s at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._harness import Ratio, compare, cpu_clock, load_average, print_table
from benchmarks.full_step import _fn_step, _hf_step
from fnllm import generate, io, losses, optim, tree
from fnllm import random as jr
from fnllm.finetune import lora
from fnllm.models import Llama

WORKLOADS = {
    "smollm-135m": (Llama(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                          d_ff=1536, max_len=2048, tie_head=True, norm_eps=1e-5), 8, 256),
    "llama-tiny": (Llama(vocab_size=4096, n_layer=4, n_head=8, n_kv_head=2, d_model=256,
                         d_ff=688, max_len=256, tie_head=True), 4, 64),
}  # fmt: skip
LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1
RANK, ALPHA = 16, 32.0
PROMPT, NEW = 32, 64
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> None:
    """Run the three comparisons and print one table each."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = cpu_clock if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timing = {"sync": sync, "clock": clock}  # how compare() times both sides
    name = "llama-tiny" if args.quick else args.workload
    model, batch, seq = WORKLOADS[name]
    runs = args.runs or (3 if args.quick else 5)
    compile_ = args.compile if args.compile is not None else not args.quick
    print(f"{name}: device {device}, threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}, load average {load_average()}")  # fmt: skip

    params = tree.map(lambda x: x.to(device), model.init(jr.key(0)))  # random, std 0.02
    tokens = jr.randint(jr.key(1), (batch, seq), 0, model.vocab_size).to(device)
    sections = args.sections.split(",")
    if "step" in sections:
        hf = _twin(model, params).to(device)  # each section gets a fresh twin: steps train it
        how = {"regional": True} if args.regional else True  # fnllm's compiled step
        step_rows = _full_step(model, params, hf, tokens, timing, runs, compile_ and how)
        print_table(step_rows, header=("step", "fnllm ms", "HF ms", "ratio"),
                    title=f"{name} full train step, batch {batch} x {seq}")  # fmt: skip
        print("goal: eager <= 1.0, compiled <= 0.9")
    if "lora" in sections:
        hf = _twin(model, params).to(device)
        lora_rows = _lora_step(model, params, hf, tokens, timing, runs)
        print_table(lora_rows, header=("LoRA r=16", "fnllm", "peft", "ratio"),
                    title=f"{name} LoRA step, every block linear, {batch} x {seq}")  # fmt: skip
        print("goal: step <= 0.9, peak memory <= peft's")
    if "decode" not in sections:
        return
    hf = _twin(model, params).to(device).eval()
    decode_rows = []
    variants = [(model, "")] + ([(_PlainDecode(**_fields(model)), ", plain tree")]
                                if args.decode_before else [])  # fmt: skip
    for b in (int(n) for n in args.batches.split(",")):
        for m, tag in variants:
            row = _decode(m, params, hf, b, device, timing, runs, compile_)
            decode_rows.append([row[0] + tag, *row[1:]])
    print_table(decode_rows, header=("greedy decode", "fnllm tok/s", "HF tok/s", "speed-up",
                                     "fnllm path"),
                title=f"{name} greedy decoding, prompt {PROMPT}, {NEW} new tokens")  # fmt: skip
    print("goal: speed-up >= 1.5 at batch 1")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="llama-tiny, eager (no compile), 3 runs")
    p.add_argument("--workload", default="smollm-135m", choices=sorted(WORKLOADS))
    p.add_argument("--sections", default="step,lora,decode", help="which tables to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    p.add_argument(
        "--decode-before",
        action="store_true",
        help="also decode from the plain tree (no Llama.decode_params)",
    )
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="time with the wall clock or with this process's CPU time")  # fmt: skip
    p.add_argument("--regional", action="store_true",
                   help="compile fnllm's step regionally, as train.fit does")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None)
    g.add_argument("--no-compile", dest="compile", action="store_false")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class _PlainDecode(Llama):
    """A Llama that decodes from the user's tree as it is (``--decode-before``)."""

    def decode_params(self, params: Any) -> Any:
        return params


def _fields(model: Llama) -> dict[str, Any]:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}


def _twin(model: Llama, params: Any) -> torch.nn.Module:
    """The same weights as a `transformers` model (written and read back through a folder)."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        io.to_hf(model, tree.map(lambda x: x.cpu(), params), d, config_overrides={
            "eos_token_id": None, "bos_token_id": None, "pad_token_id": None})  # fmt: skip
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _loss_fn(model: Llama) -> Callable[..., torch.Tensor]:
    def loss_fn(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
        return losses.causal_lm(model.apply(tree.combine(trainable, frozen), batch), batch)

    return loss_fn


def _full_step(model, params, hf, tokens, timing, runs, compile_) -> list[list[Any]]:
    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
    ours = _fn_step(_loss_fn(model), opt, params, {}, tokens, None, compile_=False)
    theirs = _hf_step(hf.train(), tokens, None, tokens.device)
    a, b = float(ours()[2]["loss"]), float(theirs())
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        print(f"LOSSES DIFFER: fnllm {a:.6f} vs HF {b:.6f}")
    c = compare(ours, theirs, warmup=1, runs=runs, **timing)
    rows = [["eager", c.a.median, c.b.median, c.ratio]]
    if compile_:
        t0 = time.perf_counter()
        ours_c = _fn_step(_loss_fn(model), opt, params, {}, tokens, None, compile_=compile_)
        ours_c()
        theirs_c = _hf_step(torch.compile(hf), tokens, None, tokens.device)
        theirs_c()
        print(f"compiling both steps took {time.perf_counter() - t0:.0f} s")
        c = compare(ours_c, theirs_c, warmup=1, runs=runs, **timing)
        label = "compiled (fnllm regional)" if isinstance(compile_, dict) else "compiled"
        rows.append([label, c.a.median, c.b.median, c.ratio])
    return rows


def _lora_step(model, params, hf, tokens, timing, runs) -> list[list[Any]]:
    import peft

    lp = lora.init(jr.key(3), params, rank=RANK, alpha=ALPHA, targets=list(model.lora_targets))
    trainable, frozen = tree.partition(lp, ["*.lora_a", "*.lora_b"])
    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
    ours = _fn_step(_loss_fn(model), opt, trainable, frozen, tokens, None, compile_=False)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0)
    theirs = _hf_step(peft.get_peft_model(hf, cfg).train(), tokens, None, tokens.device)
    c = compare(ours, theirs, warmup=1, runs=runs, **timing)
    rows: list[list[Any]] = [["step ms", c.a.median, c.b.median, c.ratio]]
    if tokens.device.type == "cuda":
        peaks = []
        for fn in (ours, theirs):
            torch.cuda.reset_peak_memory_stats()
            fn()
            timing["sync"]()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        rows.append(["peak MiB", peaks[0], peaks[1], peaks[0] / peaks[1]])
    else:
        peaks = [_cpu_peak_mib(ours), _cpu_peak_mib(theirs)]
        rows.append(["step peak MiB", peaks[0], peaks[1], peaks[0] / peaks[1]])
    return rows


def _cpu_peak_mib(fn: Callable[[], Any]) -> float:
    """The peak of the CPU tensors ``fn()`` allocates on top of those live before it, in MiB
    (the running sum, in start order, of each op's own net allocation in the profiler's
    memory events: to the op, not to the byte)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0  # an op's own net allocation, and frees outside ops ("[memory]")
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _decode(model, params, hf, batch, device, timing, runs, compile_) -> list[Any]:
    prompts = jr.randint(jr.key(4), (batch, PROMPT), 1, model.vocab_size).to(device)
    ours, path = _fn_greedy(model, params, prompts, compile_)
    static = {"cache_implementation": "static", "do_sample": False}
    theirs = lambda: hf.generate(prompts, max_new_tokens=NEW, min_new_tokens=NEW, **static)[
        :, PROMPT:
    ]
    with torch.no_grad():
        mine, ref = ours(), theirs()
    if not torch.equal(mine.cpu(), ref.cpu()):
        same = (mine.cpu() == ref.cpu()).float().mean().item()
        print(f"batch {batch}: OUTPUTS DIFFER ({100 * same:.0f}% of tokens equal)")
    with torch.no_grad():
        c = compare(ours, theirs, warmup=1, runs=runs, **timing)
    tok = batch * NEW
    speed = 1 / c.ratio
    return [f"batch {batch}", tok / (c.a.median / 1e3), tok / (c.b.median / 1e3),
            speed if isinstance(speed, Ratio) else float(speed), path]  # fmt: skip


def _fn_greedy(
    model: Llama, params: Any, prompts: torch.Tensor, compile_: bool
) -> tuple[Callable, str]:
    """Greedy decoding with fnllm: ``generate.sample`` when it takes a Llama, else a loop of
    the model's own cached forward with one decode step (compiled with ``compile_``)."""
    how = "compiled" if compile_ else "eager"
    with contextlib.suppress(TypeError):
        generate.sample(None, model, params, prompts[:, :2], 2, temperature=0)
        return (lambda: generate.sample(None, model, params, prompts, NEW, temperature=0,
                                        compile=compile_)), f"generate.sample, {how}"  # fmt: skip

    def decode(p: Any, nxt: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        x, cache = model.apply_cached(p, nxt, torch.ones_like(nxt, dtype=torch.bool), cache,
                                      inplace=True)  # fmt: skip
        return model.logits(p, x[:, -1]).argmax(-1, keepdim=True), cache

    step = torch.compile(decode, fullgraph=True, dynamic=False) if compile_ else decode

    def run() -> torch.Tensor:
        B = prompts.shape[0]
        cache = model.init_cache(B, PROMPT + NEW, device=prompts.device)
        mask = torch.ones_like(prompts, dtype=torch.bool)
        x, cache = model.apply_cached(params, prompts, mask, cache, inplace=True)
        nxt = model.logits(params, x[:, -1]).argmax(-1, keepdim=True)
        out = [nxt]
        for _ in range(NEW - 1):
            nxt, cache = step(params, nxt, cache)
            out.append(nxt)
        return torch.cat(out, dim=1)

    return run, f"apply_cached loop, {how}"


if __name__ == "__main__":
    main()
