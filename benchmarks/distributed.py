"""Distributed data parallel on 2 CPU processes (gloo): fnllm against PyTorch DDP.

Two measurements, both on ``--nproc`` ranks (default 2) over 127.0.0.1, timed on rank 0:

1. **All-reduce of a gradient tree**: the GPT-2 small parameter tree (148 leaves, 124M floats;
   ``--quick``: GPT tiny, 5M), averaged with ``fnllm.distributed.all_reduce_mean`` (flat
   buckets, 1 MB with gloo) against one ``all_reduce`` per leaf (then a division), interleaved.
2. **Data-parallel train step**: Hugging Face ``GPT2LMHeadModel`` wrapped in
   ``torch.nn.parallel.DistributedDataParallel`` with ``torch.optim.AdamW(fused=True)``, against
   fnllm's ``train.make_step(distributed.data_parallel(loss_fn), optim.adamw(...))`` called with
   ``donate=True`` (as ``distributed.fit`` runs it), on the same weights and the same global
   batch, each rank on its half. Both eager. Goal: fnllm <= 1.0x DDP.

    .venv/bin/python -m benchmarks.distributed --quick              # GPT tiny, 3 runs
    .venv/bin/python -m benchmarks.distributed --threads 1          # + GPT-2 small
    torchrun --nproc-per-node 2 -m benchmarks.distributed --quick   # the same, started by torchrun

Without ``torchrun`` the script starts its ranks itself (``torch.multiprocessing`` spawn).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._harness import compare, print_table
from benchmarks.full_step import BETAS, LR, WD
from benchmarks.train_step import WORKLOADS, _hf_twin
from fnllm import distributed, losses, optim, train, tree
from fnllm import random as jr


def main(argv: list[str] | None = None) -> None:
    """Start the ranks (unless torchrun did) and run the benchmark."""
    args = _parse(argv)
    if "RANK" in os.environ:  # started by torchrun
        _rank_main(args)
        return
    port = _free_port()
    torch.multiprocessing.spawn(_spawned, args=(args, port), nprocs=args.nproc, join=True)


def _spawned(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        LOCAL_RANK=str(rank),
    )
    _rank_main(args)


def _rank_main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = distributed.init("gloo", timeout=600.0)
    names = ["gpt-tiny"] if args.quick else ["gpt-tiny", "gpt2-small"]
    runs = args.runs or (3 if args.quick else 5)
    say = distributed.log
    say(
        f"{world} ranks (gloo, 127.0.0.1), threads/rank {torch.get_num_threads()}, "
        f"torch {torch.__version__}, load average {_load()}, fnllm "
        f"{'after-backward' if args.no_overlap else 'overlapped'} all-reduce, buckets "
        f"{args.bucket_mb or distributed.collectives.BUCKET_MB['gloo']} MB"
    )
    reduce_rows = []
    for name in [names[-1]]:  # the biggest tree of the run
        model = WORKLOADS[name].model
        g = model.init(jr.key(0))
        per_leaf = lambda g=g: _per_leaf_mean(g)
        bucketed = lambda g=g: distributed.all_reduce_mean(g, check=False)
        _check_same(per_leaf(), bucketed())
        c = compare(bucketed, per_leaf, warmup=1, runs=runs, sync=distributed.barrier)
        mb = sum(x.numel() * x.element_size() for x in tree.leaves(g)) / 2**20
        reduce_rows.append(
            [f"{name} ({len(tree.leaves(g))} leaves, {mb:.0f} MB)", c.a.median, c.b.median,
             c.ratio]
        )  # fmt: skip
        say(f"all-reduce {name}: bucketed {c.a} / per-leaf {c.b}, ratio {c.ratio:.3f}")
    step_rows = []
    for name in names:
        w = WORKLOADS[name]
        fn_step, ddp_step = _steps(w, rank, world, args)
        fn_loss, ddp_loss = float(fn_step()[2]["loss"]), float(ddp_step())
        if abs(fn_loss - ddp_loss) > 1e-3 * max(1.0, abs(ddp_loss)):
            say(f"{name}: LOSSES DIFFER: fnllm {fn_loss:.6f} vs DDP {ddp_loss:.6f}")
        c = compare(fn_step, ddp_step, warmup=1, runs=runs, sync=distributed.barrier)
        step_rows.append([f"{name} ({w.batch}x{w.seq} global)", c.a.median, c.b.median, c.ratio])
        say(f"step {name}: fnllm {c.a} / DDP {c.b}, ratio {c.ratio:.3f}")
    if rank == 0:
        print_table(
            reduce_rows,
            header=("gradient tree", "bucketed ms", "per-leaf ms", "ratio"),
            title=f"all-reduce mean over {world} ranks",
        )
        print_table(
            step_rows,
            header=("workload", "fnllm DP ms", "DDP ms", "ratio"),
            title=f"data-parallel train step on {world} ranks (eager)",
        )
        print(f"goal: fnllm DP / DDP <= 1.0 (load average at the end {_load()})")
    dist.destroy_process_group()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="GPT tiny only, 3 runs")
    p.add_argument("--nproc", type=int, default=2, help="ranks to start (without torchrun)")
    p.add_argument("--runs", type=int, default=0, help="timed runs per comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads per rank")
    p.add_argument(
        "--bucket-mb", type=float, default=None, help="fnllm's bucket size (default: by backend)"
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="fnllm's after-backward all-reduce instead of the overlapped one",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the two sides


def _per_leaf_mean(g: Any) -> Any:
    """The baseline: one all_reduce call per leaf."""
    n = dist.get_world_size()

    def one(x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y)
        return y.div_(n)

    return tree.map(one, g)


def _steps(
    w: Any, rank: int, world: int, args: argparse.Namespace
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    model = w.model
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (w.batch, w.seq), 0, model.vocab_size)
    local = distributed.shard_batch(tokens, rank, world)

    def loss_fn(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
        return losses.causal_lm(model.apply(tree.combine(trainable, frozen), batch), batch)

    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
    dp = distributed.data_parallel(loss_fn, bucket_mb=args.bucket_mb, overlap=not args.no_overlap)
    step = train.make_step(dp, opt, compile=False)
    own = {"tr": tree.map(torch.clone, params)}
    own["state"] = opt.init(own["tr"])
    key = jr.key(2)

    def fn_step() -> Any:
        out = step(own["tr"], {}, own["state"], local, key, donate=True)
        own["tr"], own["state"] = out[0], out[1]
        return out

    hf = _hf_twin(model, params).train()
    ddp = torch.nn.parallel.DistributedDataParallel(hf)
    torch_opt = torch.optim.AdamW(ddp.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    v = model.vocab_size

    def ddp_step() -> torch.Tensor:
        torch_opt.zero_grad(set_to_none=True)
        logits = ddp(local).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), local[:, 1:].reshape(-1))
        loss.backward()
        torch_opt.step()
        return distributed.all_reduce_mean(loss.detach(), check=False)

    return fn_step, ddp_step


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover (not on every platform)
        return "n/a"


def _check_same(a: Any, b: Any) -> None:
    for p, x in tree.flatten(a).items():
        if not torch.allclose(x, tree.flatten(b)[p]):
            sys.exit(f"all-reduce results differ at {p}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
