"""data_parallel's all-reduce overlapped with backward, on 2 gloo processes against 1 process.

The ranks run once (a module fixture, `test_distributed`'s launcher): the overlapped path, the
after-backward path (``overlap=False``) and ``torch.func.grad`` (which takes the after-backward
path) must all give one process's gradient on the global batch; buckets must start while
backward still runs; a leaf used on one rank only must be an error, not silent divergence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import WORLD, _assert_close_trees, _launch, _raise_failures

import fnllm
from fnllm import distributed, io, losses, optim, random, train, tree

STEPS = 3
GPT = fnllm.GPT(vocab_size=64, n_layer=3, n_head=2, d_model=16, max_len=16)
SMALL_MB = 4096 / 2**20  # 4 KB buckets: many of them, so the order matters


def _loss_fn(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
    return losses.causal_lm(GPT.apply(tree.combine(trainable, frozen), batch), batch)


def _batch(step: int) -> torch.Tensor:
    return random.randint(random.fold_in(random.key(7), step), (8, 12), 0, GPT.vocab_size)


def _start() -> tuple[Any, Any]:
    return tree.partition(GPT.init(random.key(0)), lambda p, x: not p.startswith("blocks.0."))


def _train(loss_fn: Any, rank: int, world: int) -> Any:
    trainable, frozen = _start()
    opt = optim.adamw(1e-2, eps=1e-4)
    step = train.make_step(loss_fn, opt, compile=False)
    state = opt.init(trainable)
    for s in range(STEPS):
        batch = distributed.shard_batch(_batch(s), rank, world)
        trainable, state, _ = step(trainable, frozen, state, batch, None)
    return trainable


def _worker(rank: int, out: Path) -> None:
    report: dict[str, Any] = {}
    launches: list[bool] = []  # async_op of each all_reduce
    real = torch.distributed.all_reduce

    def counting(buf: torch.Tensor, *a: Any, **k: Any) -> Any:
        launches.append(bool(k.get("async_op")))
        return real(buf, *a, **k)

    # the tied token embedding gets its gradient last: how many buckets had started by then?
    before_last: list[int] = []

    def watched(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
        start = sum(launches)
        w = trainable["embed"]["tokens"]["weight"]
        w.register_hook(lambda g: before_last.append(sum(launches) - start))
        return _loss_fn(trainable, frozen, batch, key)

    torch.distributed.all_reduce = counting
    try:
        over = _train(distributed.data_parallel(watched, bucket_mb=SMALL_MB), rank, WORLD)
        report["async_launches"] = sum(launches)
        report["started_before_last_gradient"] = before_last
        launches.clear()
        after = _train(distributed.data_parallel(_loss_fn, overlap=False), rank, WORLD)
        report["async_launches_after_backward"] = sum(launches)
    finally:
        torch.distributed.all_reduce = real
    io.save(out / f"trained_{rank}.safetensors", {"overlap": over, "after": after})

    # bucket memory is reused only once the last step's gradients are gone
    dp_loss = distributed.data_parallel(_loss_fn)
    trainable, frozen = _start()

    def grads_at(step: int) -> list[torch.Tensor]:
        tr = tree.map(lambda x: x.detach().requires_grad_(), trainable)
        loss = dp_loss(tr, frozen, distributed.shard_batch(_batch(step), rank, WORLD), None)
        return list(torch.autograd.grad(loss, tree.leaves(tr)))

    def memory(gs: list[torch.Tensor]) -> list[int]:
        return sorted({g.untyped_storage().data_ptr() for g in gs})

    grads_at(0)  # the first step learns the order
    kept = grads_at(1)
    copy = [g.clone() for g in kept]
    third = grads_at(2)
    report["kept_intact"] = all(torch.equal(a, b) for a, b in zip(kept, copy))
    report["kept_memory_avoided"] = not set(memory(kept)) & set(memory(third))
    before = memory(third)
    del third
    report["memory_reused"] = memory(grads_at(3)) == before

    # torch.func.grad cannot run autograd hooks: the after-backward path, same mean
    params, x = {"w": torch.ones(3), "b": torch.zeros(())}, _rows(rank)
    dp = distributed.data_parallel(lambda tr, fr, b, k: ((b @ tr["w"] + tr["b"]) ** 2).mean())
    g = torch.func.grad(lambda tr: dp(tr, {}, x, None))(params)
    io.save(out / f"func_grad_{rank}.safetensors", {"g": g})

    # "b" reaches the loss on rank 0 only
    def uneven(tr: Any, fr: Any, b: torch.Tensor, k: Any) -> torch.Tensor:
        y = b @ tr["w"] + (tr["b"] if rank == 0 else 0.0)
        return (y**2).mean()

    try:
        train.make_step(distributed.data_parallel(uneven), optim.sgd(0.1), compile=False)(
            params, {}, optim.sgd(0.1).init(params), x, None
        )
        report["uneven"] = "no error"
    except ValueError as e:
        report["uneven"] = str(e)
    even = distributed.data_parallel(uneven, overlap=False)
    g = torch.func.grad(lambda tr: even(tr, {}, x, None))(params)
    io.save(out / f"uneven_{rank}.safetensors", {"g": g})
    (out / f"report_{rank}.json").write_text(json.dumps(report))


def _rows(rank: int) -> torch.Tensor:
    return distributed.shard_batch(random.normal(random.key(4), (4, 3)), rank, WORLD)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_overlap")
    _raise_failures(out, _launch(_worker, out, timeout_s=60.0))
    return out


def test_overlapped_and_after_backward_paths_equal_one_process(run: Path) -> None:
    want = _train(_loss_fn, 0, 1)
    for r in range(WORLD):
        got = io.load(run / f"trained_{r}.safetensors")
        _assert_close_trees(got["overlap"], want, atol=1e-5)
        _assert_close_trees(got["after"], want, atol=1e-5)
        assert not any(fr in tree.paths(got["overlap"]) for fr in tree.paths(_start()[1]))


def test_buckets_start_while_backward_runs(run: Path) -> None:
    for r in range(WORLD):
        report = json.loads((run / f"report_{r}.json").read_text())
        assert report["async_launches"] > 3 * STEPS  # several buckets a step
        assert report["async_launches_after_backward"] == 0
        # from the second step on, the learned order puts the embedding's bucket last
        started = report["started_before_last_gradient"]
        assert len(started) == STEPS and all(n > 2 for n in started[1:]), started


def test_bucket_memory_is_reused_only_when_no_gradient_refers_to_it(run: Path) -> None:
    for r in range(WORLD):
        report = json.loads((run / f"report_{r}.json").read_text())
        assert report["kept_intact"] and report["kept_memory_avoided"]
        assert report["memory_reused"]


def test_func_grad_takes_the_after_backward_path(run: Path) -> None:
    x = random.normal(random.key(4), (4, 3))
    params = {"w": torch.ones(3), "b": torch.zeros(())}
    want = torch.func.grad(lambda tr: ((x @ tr["w"] + tr["b"]) ** 2).mean())(params)
    for r in range(WORLD):
        _assert_close_trees(io.load(run / f"func_grad_{r}.safetensors")["g"], want, atol=1e-6)


def test_a_leaf_used_on_one_rank_only_is_an_error_when_overlapped(run: Path) -> None:
    for r in range(WORLD):
        msg = json.loads((run / f"report_{r}.json").read_text())["uneven"]
        assert "a leaf is used by the loss on some ranks only" in msg, msg
    # the after-backward path averages the gradient that only rank 0 had
    got = [io.load(run / f"uneven_{r}.safetensors")["g"] for r in range(WORLD)]
    assert torch.equal(got[0]["b"], got[1]["b"]) and torch.equal(got[0]["w"], got[1]["w"])
    x = _rows(0)
    y = x @ torch.ones(3)
    assert torch.allclose(got[0]["b"], (2 * y).mean() / WORLD, atol=1e-6)
