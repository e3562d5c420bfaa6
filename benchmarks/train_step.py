"""Train-step benchmark: fnllm forward + backward vs Hugging Face `transformers`, same weights.

For each workload the fnllm model is initialised, written with ``fnllm.io.to_hf`` and loaded
into ``transformers`` with ``from_pretrained``, so both sides hold identical weights (the
benchmark checks that their losses agree). One step is: forward, the same float32
cross-entropy on both sides, backward to every parameter. fnllm takes gradients the way
``fnllm.train.make_step`` does: ``torch.autograd.grad`` of the pure loss in eager mode,
``torch.func.grad_and_value`` under ``torch.compile``; HF runs
``loss.backward()`` on its module. Both run eagerly and under ``torch.compile``
(``fullgraph=True`` for fnllm; HF's module as ``torch.compile`` takes it).

Each fnllm variant is timed interleaved with HF eager in one process
(:func:`benchmarks._harness.compare`), so the ratio column is the median of paired ratios to
HF eager. MFU is the model's matmul FLOPs (6 per parameter per token for the linear layers and
the LM head, plus attention scores) over the step time, against the peak this machine reaches
on a 2048^3 matmul in the same dtype, measured at start-up.

Workloads: ``gpt-tiny`` (4 layers, d=256, 4 heads, vocab 8192, batch 8 x 128), ``gpt2-small``
(124M, batch 4 x 256), ``bert-tiny`` (4 layers, d=256, 4 heads, d_ff 1024, vocab 8192,
batch 8 x 128, MLM + sentence-order heads as ``BertForPreTraining``).

    .venv/bin/python -m benchmarks.train_step --quick          # GPT tiny, eager, seconds
    .venv/bin/python -m benchmarks.train_step --eager-grad     # autograd.grad vs func.grad
    .venv/bin/python -m benchmarks.train_step                  # all workloads, eager + compiled
    python -m benchmarks.train_step --device cuda --dtype bf16 # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._harness import add_model_args, compare, print_table, time_fn
from fnllm import io, tree
from fnllm import random as jr
from fnllm.models.bert import BERT
from fnllm.models.gpt import GPT


@dataclass(frozen=True)
class Workload:
    """One benchmark case: a model config and a batch shape."""

    name: str
    model: Any
    batch: int
    seq: int
    runs: int  # timed runs per comparison on CPU (GPU runs use more)


WORKLOADS = {
    "gpt-tiny": Workload(
        "gpt-tiny", GPT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_len=128), 8, 128, 10
    ),
    "gpt2-small": Workload("gpt2-small", GPT(), 4, 256, 3),
    "bert-tiny": Workload(
        "bert-tiny",
        BERT(vocab_size=8192, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_len=128),
        8,
        128,
        10,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one table."""
    args = _parse(argv)
    if args.eager_grad:
        _eager_grad(args.quick)
        return
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["gpt-tiny"] if args.quick else args.workloads.split(",")
    for n in names:
        if n not in WORKLOADS:
            sys.exit(f"unknown workload {n!r}; known: {', '.join(WORKLOADS)}")
    compile_ = args.compile if args.compile is not None else not args.quick
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    peak = _matmul_peak(device, dtype, sync)
    print(
        f"device {device} ({_device_name(device)}), dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3)"
    )
    rows: list[list[Any]] = []
    for n in names:
        w = WORKLOADS[n]
        runs = args.runs or (3 if args.quick else w.runs * (5 if device.type == "cuda" else 1))
        warmup = 1 if args.quick else 2
        rows += _run_workload(w, device, dtype, peak, sync, runs, warmup, compile_)
    header = ("workload", "fnllm ms", "HF eager ms", "ratio", "fnllm MFU", "HF MFU")
    print_table(rows, header=header, title=f"train step fwd+bwd ({args.device}, {args.dtype})")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny only, eager, 3 runs")
    p.add_argument(
        "--eager-grad",
        action="store_true",
        help="only compare eager torch.autograd.grad with torch.func.grad (1 thread)",
    )
    add_model_args(p, WORKLOADS, DTYPES)
    return p.parse_args(argv)


def _eager_grad(quick: bool) -> None:
    """Eager gradients as ``make_step`` takes them (``torch.autograd.grad``) vs ``torch.func``.

    A small GPT (4 layers, d=64, batch 2 x 16) on one thread: the two must give bit-identical
    gradients; the paired ratio is autograd / func (lower favours autograd).
    """
    torch.set_num_threads(1)
    gpt = GPT(vocab_size=256, n_layer=4, n_head=4, d_model=64, max_len=32)
    params = gpt.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 16), 0, 256)

    def fn_loss(p: Any) -> torch.Tensor:
        return _causal_loss(gpt.apply(p, tokens), tokens)

    autograd_step = _grad_and_value(fn_loss)
    func_step = torch.func.grad_and_value(fn_loss)
    a, b = autograd_step(params)[0], tree.leaves(func_step(params)[0])
    print("identical:", all(torch.equal(x, y) for x, y in zip(a, b)))
    c = compare(
        lambda: autograd_step(params),
        lambda: func_step(params),
        warmup=2 if quick else 5,
        runs=5 if quick else 41,
    )
    print(f"autograd.grad {c.a.median:.2f} ms, func.grad {c.b.median:.2f} ms, ratio {c.ratio:.3f}")


# ----------------------------------------------------------------------------- setup


def _run_workload(
    w: Workload,
    device: torch.device,
    dtype: torch.dtype,
    peak: float,
    sync: Callable[[], Any],
    runs: int,
    warmup: int,
    compile_: bool,
) -> list[list[Any]]:
    model = w.model
    params = model.init(jr.key(0))
    hf = _hf_twin(model, params)
    params = tree.map(lambda x: x.to(device=device, dtype=dtype), params)
    hf = hf.to(device=device, dtype=dtype).train()
    batch = _batch(model, w.batch, w.seq, device)
    fn_step, hf_step = _steps(model, hf, batch)

    # Same weights, same loss (to the precision of the dtype).
    fn_loss, hf_loss = fn_step(params)[1].item(), hf_step().item()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if abs(fn_loss - hf_loss) > tol * max(1.0, abs(hf_loss)):
        raise RuntimeError(f"{w.name}: losses differ: fnllm {fn_loss:.6f} vs HF {hf_loss:.6f}")

    flops = _train_flops(model, w.batch, w.seq)
    mfu = lambda ms: f"{100 * flops / (ms / 1e3) / peak:.1f}%"
    rows = []
    c = compare(lambda: fn_step(params), hf_step, warmup=warmup, runs=runs, sync=sync)
    rows.append([f"{w.name} eager", c.a.median, c.b.median, c.ratio, mfu(c.a.median),
                 mfu(c.b.median)])  # fmt: skip
    if compile_:
        fn_compiled = torch.compile(fn_step, fullgraph=True)
        hf_compiled_module = torch.compile(hf)
        _, hf_compiled_step = _steps(model, hf_compiled_module, batch)
        t0 = time.perf_counter()
        fn_compiled(params)
        sync()
        t_fn = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_compiled_step()
        sync()
        t_hf = time.perf_counter() - t0
        print(f"{w.name}: first compiled step: fnllm {t_fn:.1f} s, HF {t_hf:.1f} s")
        c = compare(lambda: fn_compiled(params), hf_step, warmup=warmup, runs=runs, sync=sync)
        rows.append([f"{w.name} compiled", c.a.median, c.b.median, c.ratio, mfu(c.a.median),
                     mfu(c.b.median)])  # fmt: skip
        c = compare(hf_compiled_step, hf_step, warmup=warmup, runs=runs, sync=sync)
        rows.append([f"{w.name} (HF compiled)", c.a.median, c.b.median, c.ratio, "",
                     mfu(c.a.median)])  # fmt: skip
    return rows


def _hf_twin(model: Any, params: Any) -> torch.nn.Module:
    """The `transformers` model holding the same weights, through to_hf + from_pretrained."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        io.to_hf(model, params, d)
        cls = getattr(transformers, io.hf_config(model)["architectures"][0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            return cls.from_pretrained(d)


def _batch(model: Any, b: int, t: int, device: torch.device) -> dict[str, torch.Tensor]:
    k1, k2, k3, k4 = jr.split(jr.key(1), 4)
    tokens = jr.randint(k1, (b, t), 0, model.vocab_size).to(device)
    batch = {"tokens": tokens}
    if isinstance(model, BERT):
        types = torch.zeros_like(tokens)
        types[:, t // 2 :] = 1
        picked = jr.bernoulli(k2, 0.15, (b, t)).to(device)
        batch["token_type_ids"] = types
        batch["attention_mask"] = torch.ones_like(tokens)
        batch["labels"] = torch.where(
            picked, jr.randint(k3, (b, t), 0, model.vocab_size).to(device), -100
        )
        batch["sop"] = jr.randint(k4, (b,), 0, 2).to(device)
    return batch


def _steps(
    model: Any, hf: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[Callable[[Any], Any], Callable[[], torch.Tensor]]:
    """(fnllm step: params -> (grads, loss), HF step: () -> loss) computing the same loss."""
    tokens = batch["tokens"]
    if isinstance(model, GPT):

        def fn_loss(params: Any) -> torch.Tensor:
            return _causal_loss(model.apply(params, tokens), tokens)

        def hf_step() -> torch.Tensor:
            hf.zero_grad(set_to_none=True)
            loss = _causal_loss(hf(tokens).logits, tokens)
            loss.backward()
            return loss.detach()

    else:
        tt, am, labels, sop = (
            batch[k] for k in ("token_type_ids", "attention_mask", "labels", "sop")
        )

        def fn_loss(params: Any) -> torch.Tensor:
            mlm, sop_logits = model.pretrain_apply(
                params, tokens, token_type_ids=tt, attention_mask=am
            )
            return _bert_loss(mlm, sop_logits, labels, sop)

        def hf_step() -> torch.Tensor:
            hf.zero_grad(set_to_none=True)
            out = hf(tokens, token_type_ids=tt, attention_mask=am)
            loss = _bert_loss(out.prediction_logits, out.seq_relationship_logits, labels, sop)
            loss.backward()
            return loss.detach()

    return _grad_and_value(fn_loss), hf_step


def _grad_and_value(fn_loss: Callable[[Any], torch.Tensor]) -> Callable[[Any], Any]:
    """``params -> (grads, loss)`` as ``train.make_step`` differentiates: autograd when eager."""
    func = torch.func.grad_and_value(fn_loss)

    def step(params: Any) -> tuple[Any, torch.Tensor]:
        if torch.compiler.is_compiling():
            return func(params)
        inputs = tree.map(lambda x: x.detach().requires_grad_(), params)
        loss = fn_loss(inputs)
        return torch.autograd.grad(loss, tree.leaves(inputs)), loss.detach()

    return step


def _causal_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1))


def _bert_loss(
    mlm: torch.Tensor, sop_logits: torch.Tensor, labels: torch.Tensor, sop: torch.Tensor
) -> torch.Tensor:
    v = mlm.shape[-1]
    mlm_loss = F.cross_entropy(mlm.reshape(-1, v).float(), labels.reshape(-1), ignore_index=-100)
    return mlm_loss + F.cross_entropy(sop_logits.float(), sop)


# ----------------------------------------------------------------------------- FLOPs, peak


def _train_flops(model: Any, b: int, t: int) -> float:
    """Matmul FLOPs of one forward + backward (backward = 2x forward)."""
    d, n_layer = model.d_model, model.n_layer
    per_layer = 4 * d * d + 2 * d * model.d_ff  # qkv + proj, fc + proj (weights)
    matmul_params = n_layer * per_layer + model.vocab_size * d  # + LM head / MLM decoder
    if isinstance(model, BERT):
        matmul_params += d * d * (2 if model.pooler else 1)  # MLM transform (+ pooler)
    attn = n_layer * 2 * t * d  # q k^T and p v: 2 * T * d MACs per token and layer
    return 3 * 2 * b * t * (matmul_params + attn)


def _matmul_peak(device: torch.device, dtype: torch.dtype, sync: Callable[[], Any]) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(2048, 2048, device=device, generator=g).to(dtype)
    b = torch.randn(2048, 2048, device=device, generator=g).to(dtype)
    s = time_fn(lambda: a @ b, warmup=2, runs=5 if device.type == "cpu" else 50, sync=sync)
    return 2 * 2048**3 / (s.min / 1e3)  # the best run: a peak, least hurt by a busy machine


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} cpus"


if __name__ == "__main__":
    main()
