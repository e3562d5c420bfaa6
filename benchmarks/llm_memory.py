"""LLM finetuning memory: a bf16 and an NF4 frozen base with LoRA, fnllm against `peft`.

Run: ``.venv/bin/python -m benchmarks.llm_memory [--quick] [--runs N] [--threads T]``;
``--peaks-only`` counts the peaks without the timed rows, ``--layers N`` keeps N of the blocks
at full widths, ``--vocab V`` shrinks the vocabulary, ``--sides`` picks the sides to build (on
a CPU without bf16 units a `peft` bf16 step of even 2 full-width blocks takes over ten minutes).

Workload: a Qwen2-0.5B-shaped Llama with random weights (24 layers, d 896, 14 heads, 2
key/value heads, d_ff 4864, vocab 151936, q/k/v biases, tied embeddings), batch 4 x 512, LoRA
r=16 (alpha 32) on every linear layer of the blocks (q, k, v, o, gate, up, down), AdamW over
the adapters. ``--quick``: the same layout at 2 layers, d 64, vocab 512, batch 2 x 32.

The same weights on both sides (``io.to_hf`` + ``from_pretrained``): fnllm (``io.quantize``,
``finetune.lora``, ``train.make_step`` eager) against `transformers` ``Qwen2ForCausalLM`` +
``peft`` (and ``bitsandbytes`` 4-bit NF4 where it runs), in one process.

Peak memory is counted, not sampled: a step's peak is what its parameters and optimizer state
hold (every storage, the quantized ones' inner tensors and bitsandbytes' quantization state
included) plus the most bytes its own allocations hold at once during one step
(``fnllm.memory.measure``, the second step, so the optimizer state exists). Both numbers
are independent of the machine's load. Step time is interleaved (A, B, A, B, ...); medians of
``--runs`` and the median [min, max] of the paired ratios.

Rows (goals from the issue): peak bf16 fnllm <= peft; peak NF4 fnllm <= 0.6x fnllm bf16 and
<= peft + bitsandbytes 4-bit; step time bf16 fnllm <= 0.9x peft; with every block
checkpointed (``apply(..., checkpoint=True)``), the memory a step allocates (activations,
gradients) down >= 3x at a step time <= 1.35x.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._harness import compare, load_average, print_table
from fnllm import finetune, io, losses, memory, optim, train, tree
from fnllm import random as jr
from fnllm.finetune import lora
from fnllm.models import Llama

QWEN2_05B = Llama(
    vocab_size=151936,
    n_layer=24,
    n_head=14,
    n_kv_head=2,
    d_model=896,
    d_ff=4864,
    max_len=32768,
    rope_theta=1e6,
    norm_eps=1e-6,
    tie_head=True,
    qkv_bias=True,
)
QUICK = Llama(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_len=64,
              rope_theta=1e6, norm_eps=1e-6, tie_head=True, qkv_bias=True)  # fmt: skip
RANK, ALPHA, LR = 16, 32.0, 1e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20
SIDES = ("fnllm bf16", "peft bf16", "fnllm nf4", "fnllm bf16 ckpt", "peft+bnb nf4")


def main(argv: list[str] | None = None) -> None:
    """Build both sides, measure their peaks, time the bf16 steps; print the table."""
    args = _parse(argv)
    unknown = [k for k in args.sides.split(",") if k and k not in SIDES] if args.sides else []
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; expected some of {list(SIDES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, (batch, seq) = (QUICK, (2, 32)) if args.quick else (QWEN2_05B, (4, 512))
    if args.layers:
        model = dataclasses.replace(model, n_layer=args.layers)
    if args.vocab:
        model = dataclasses.replace(model, vocab_size=args.vocab)
    runs = args.runs or (3 if args.quick else 5)
    name = "quick" if args.quick else "qwen2-0.5b"
    name += f", {model.n_layer} layers" if args.layers else ""
    name += f", vocab {model.vocab_size}" if args.vocab else ""
    print(f"{name}: batch {batch} x {seq}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, load {load_average()}")  # fmt: skip
    params = tree.cast(model.init(jr.key(0)), torch.bfloat16)
    tokens = jr.randint(jr.key(1), (batch, seq), 0, model.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        io.to_hf(model, params, folder, config_overrides={
            "eos_token_id": None, "bos_token_id": None, "pad_token_id": None})  # fmt: skip
        makers = {
            "fnllm bf16": lambda: _fnllm_step(model, params, tokens),
            "peft bf16": lambda: _peft_step(folder, tokens, four_bit=False),
            "fnllm nf4": lambda: _fnllm_step(model, io.quantize(params, "blocks.*", "nf4"), tokens),
            "fnllm bf16 ckpt": lambda: _fnllm_step(model, params, tokens, checkpoint=True),
            "peft+bnb nf4": lambda: _peft_step(folder, tokens, four_bit=True),
        }
        sides = {}
        for k in args.sides.split(",") if args.sides else makers:
            try:
                sides[k] = makers[k]()
            except Exception as e:  # print why a side does not run (bitsandbytes), keep the rest
                print(f"{k} does not run here: {type(e).__name__}: {e}")
        peaks = {k: _peak(k, side) for k, side in sides.items()}
        timed = not args.peaks_only

        def timing(a: str, b: str) -> Any:
            if not timed or a not in sides or b not in sides:
                return None
            return compare(sides[a]["step"], sides[b]["step"], warmup=1, runs=runs)

        c = timing("fnllm bf16", "peft bf16")
        ck = timing("fnllm bf16 ckpt", "fnllm bf16")
    total = {k: sum(v) / MIB for k, v in peaks.items()}
    act = {k: v[1] / MIB for k, v in peaks.items()}

    def row(what: str, a: str, b: str, goal: str, of: dict[str, float] = total) -> list[Any]:
        return [what, a, of[a], b, of[b], of[a] / of[b], goal]

    rows = []
    pairs = (("peak MiB, bf16 base", "fnllm bf16", "peft bf16", "<= 1.0"),
             ("peak MiB, NF4 base", "fnllm nf4", "fnllm bf16", "<= 0.6"),
             ("peak MiB, NF4 base", "fnllm nf4", "peft+bnb nf4", "<= 1.0"))  # fmt: skip
    for what, a, b, goal in pairs:
        if a in total and b in total:
            rows.append(row(what, a, b, goal))
    if c is not None:
        rows.append(["step ms, bf16 base", "fnllm bf16", c.a.median, "peft bf16", c.b.median,
                     c.ratio, "<= 0.9"])  # fmt: skip
    if "fnllm bf16 ckpt" in act and "fnllm bf16" in act:
        rows.append(row("step MiB, checkpointing", "fnllm bf16 ckpt", "fnllm bf16", "<= 0.33", act))
    if ck is not None:
        rows.append(["step ms, checkpointing", "fnllm bf16 ckpt", ck.a.median, "fnllm bf16",
                     ck.b.median, ck.ratio, "<= 1.35"])  # fmt: skip
    for k, (resident, step) in peaks.items():  # for fits across --layers (peaks are linear)
        print(f"PEAK {name} | {k} | resident {resident} | step {step} | total {resident + step}")
    title = f"{name}: LoRA r={RANK} on every block linear, batch {batch} x {seq}"
    header = ("row", "fnllm", "value", "against", "value", "ratio", "goal")
    print_table(rows, header=header, title=title)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, d 64, vocab 512, 2 x 32")
    p.add_argument("--runs", type=int, default=0, help="timed step pairs (default 5; quick 3)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--layers", type=int, default=0,
                   help="blocks of the model (0: all); the widths and vocabulary stay")  # fmt: skip
    p.add_argument("--vocab", type=int, default=0,
                   help="vocabulary size (0: the model's)")  # fmt: skip
    p.add_argument("--sides", default="",
                   help="comma-separated sides to build (default: all five)")  # fmt: skip
    p.add_argument("--peaks-only", action="store_true",
                   help="count the peaks (independent of load), skip the timed rows")  # fmt: skip
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the two sides


def _fnllm_step(
    model: Llama, base: Any, tokens: torch.Tensor, checkpoint: bool = False
) -> dict[str, Any]:
    """fnllm: LoRA on every block linear of ``base`` (bf16 or quantized), the adapters in
    float32 (as peft casts them), eager, donated; ``checkpoint``: every block recomputed."""
    lp = lora.init(jr.key(3), base, rank=RANK, alpha=ALPHA, model=model)
    trainable, frozen = tree.partition(lp, finetune.strategy("lora", model))
    trainable = tree.cast(trainable, torch.float32)

    def loss_fn(tr: Any, fr: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
        logits = model.apply(tree.combine(tr, fr), batch, checkpoint=checkpoint or None)
        return losses.causal_lm(logits.float(), batch)

    opt = optim.adamw(LR)
    step = train.make_step(loss_fn, opt, compile=False)
    own = {"tr": tree.map(torch.clone, trainable)}  # donated from step to step, as fit does
    own["state"] = opt.init(own["tr"])

    def run() -> torch.Tensor:
        own["tr"], own["state"], metrics = step(
            own["tr"], frozen, own["state"], tokens, jr.key(2), donate=True
        )
        return metrics["loss"]

    def held() -> Iterable[torch.Tensor]:
        return [*tree.leaves(frozen), *tree.leaves(own["tr"]), *tree.leaves(own["state"])]

    return {"step": run, "held": held}


def _peft_step(folder: str, tokens: torch.Tensor, *, four_bit: bool) -> dict[str, Any]:
    """`transformers` + `peft` (optionally over a bitsandbytes 4-bit NF4 base), eager."""
    import peft
    import transformers

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if four_bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0)
    m = peft.get_peft_model(hf, cfg).train()
    trained = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR)
    v = hf.config.vocab_size

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = m(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    def held() -> Iterable[torch.Tensor]:
        out = [*m.parameters(), *m.buffers()]
        for p in m.parameters():  # bitsandbytes keeps absmax / code beside a 4-bit weight
            out += _tensors_in(getattr(p, "quant_state", None))
        for s in opt.state.values():
            out += [x for x in s.values() if isinstance(x, torch.Tensor)]
        return out

    return {"step": step, "held": held}


# ----------------------------------------------------------------------------- counting


def _peak(name: str, side: dict[str, Any]) -> tuple[int, int]:
    """``(bytes held by parameters and optimizer state, peak bytes one step allocates)``."""
    first = float(side["step"]())  # the first step makes the optimizer state
    t0 = time.perf_counter()
    loss, transient = memory.measure(side["step"])
    seconds = time.perf_counter() - t0  # one step, counted (a rough time: not interleaved)
    resident = _held_bytes(side["held"]())
    print(f"{name:>13}: loss {first:.4f} -> {float(loss):.4f}; resident {resident / MIB:9.1f} "
          f"MiB + step {transient / MIB:9.1f} MiB; {seconds:.1f} s")  # fmt: skip
    return resident, transient


def _held_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a quantized tensor: its inner ones)."""
    seen: set[int] = set()
    total, todo = 0, list(tensors)
    while todo:
        x = todo.pop()
        if not isinstance(x, torch.Tensor):
            continue
        if not isinstance(x, torch.nn.Parameter) and type(x) is not torch.Tensor:
            flatten = getattr(x, "__tensor_flatten__", None)
            if flatten is not None:  # torchao NF4 / int8: count what it stores
                todo += [getattr(x, n) for n in flatten()[0]]
                continue
        storage = x.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if obj is None or depth > 3:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    found: list[torch.Tensor] = []
    for value in getattr(obj, "__dict__", {}).values():
        found += _tensors_in(value, depth + 1)
    return found


if __name__ == "__main__":
    main()
