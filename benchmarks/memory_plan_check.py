"""``memory.plan`` against a measured train step at the full Qwen2-0.5B shape.

Run: ``.venv/bin/python -m benchmarks.memory_plan_check [--checkpointing none|all] [--quick]``.

The model of ``benchmarks.llm_memory`` (24 layers, d 896, 14 heads, 2 key/value heads, d_ff
4864, vocab 151936, q/k/v biases, tied embeddings), batch 4 x 512, LoRA r=16 on every linear
layer of the blocks, AdamW, a float32 base (a bf16 step takes minutes on a CPU without fast bf16
matrix products; the plan's parts do not depend on the values). The plan runs first, on fake
tensors; then two real eager steps, the second one under ``memory.measure``. Printed: the
plan's parts, the planned and the measured peak (weights + optimizer state + the most bytes
the step held at once) and their ratio. Needs about 13 GB of memory without checkpointing.
``--quick``: 2 layers, vocab 4096, batch 2 x 64.

Random values come from ``torch.randn`` with a seeded generator: initialising 0.5B parameters
through ``Llama.init``'s threefry draws takes many CPU minutes, and memory does not depend on
the values.
"""

from __future__ import annotations

import argparse
import time

import torch

import fnllm
from fnllm import finetune, losses, memory, optim, random, train, tree
from fnllm.finetune import lora

MiB = 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpointing", choices=["none", "all"], default="none")
    p.add_argument("--quick", action="store_true", help="2 layers, vocab 4096, batch 2 x 64")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ck = True if args.checkpointing == "all" else None
    n_layer, vocab, batch, seq = (2, 4096, 2, 64) if args.quick else (24, 151936, 4, 512)
    model = fnllm.Llama(vocab_size=vocab, n_layer=n_layer, n_head=14, n_kv_head=2, d_model=896,
                        d_ff=4864, max_len=seq, qkv_bias=True, tie_head=True)  # fmt: skip
    t0 = time.process_time()
    plan = memory.plan(model, torch.float32, "lora", batch=batch, seq_len=seq, lora_rank=16,
                       checkpointing=ck)  # fmt: skip
    print(f"plan: {time.process_time() - t0:.1f} CPU s")
    with torch.device("meta"):
        shapes = model.init(random.key(0))
    gen = torch.Generator().manual_seed(0)
    base = tree.map(lambda x: (torch.randn(x.shape, generator=gen) * 0.02).to(x.dtype), shapes)
    params = lora.init(random.key(1), base, rank=16, model=model)
    trainable, frozen = tree.partition(params, finetune.strategy("lora", model))

    def loss_fn(tr, fr, b, key):
        logits = model.apply(tree.combine(tr, fr), b["input_ids"], key=key, checkpoint=ck)
        return losses.causal_lm(logits, b["input_ids"])

    opt = optim.adamw(1e-4)
    state = opt.init(trainable)
    step = train.make_step(loss_fn, opt, compile=False)
    b = {"input_ids": random.randint(random.key(2), (batch, seq), 0, vocab)}
    trainable, state, _ = step(trainable, frozen, state, b, random.key(3))
    (trainable, state, metrics), transient = memory.measure(
        step, trainable, frozen, state, b, random.key(4)
    )
    measured = memory.nbytes((trainable, frozen, state)) + transient
    print(f"checkpointing: {args.checkpointing}, loss {float(metrics['loss']):.3f}")
    print(plan)
    print(f"planned peak  {plan.peak / MiB:9.1f} MiB")
    ratio = plan.peak / measured
    print(f"measured peak {measured / MiB:9.1f} MiB  (plan / measured = {ratio:.3f})")


if __name__ == "__main__":
    main()
