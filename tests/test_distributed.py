"""fnllm.distributed on 2 real processes (gloo, CPU, 127.0.0.1) against 1 process.

Each scenario starts its ranks once (module fixtures) with `multiprocessing` spawn, a free
port, a process-group timeout and a deadline on every process, then the tests compare what the
ranks wrote with a single-process run on the same global batch.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import fnllm
from fnllm import distributed, grads, io, losses, optim, random, train, tree

WORLD = 2
STEPS = 3
DEADLINE_S = 240.0  # per scenario, start-up included (the machine is shared)
GPT = fnllm.GPT(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_len=16)
FROZEN = ["blocks.0.*", "embed.positions.*"]  # a partition: these leaves get no update


# ----------------------------------------------------------------------------- the workload


def _loss_fn(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
    logits = GPT.apply(tree.combine(trainable, frozen), batch)
    return losses.causal_lm(logits, batch)


def _global_batch(step: int) -> torch.Tensor:
    return random.randint(random.fold_in(random.key(7), step), (8, 12), 0, GPT.vocab_size)


def _start() -> tuple[Any, Any, Any]:
    trainable, frozen = tree.partition(GPT.init(random.key(0)), lambda p, x: not _frozen(p))
    # eps well above zero: the gradient of the attention's key bias is 0 up to rounding, and
    # Adam with a tiny eps would turn that rounding noise into full-size steps.
    return trainable, frozen, optim.adamw(1e-2, eps=1e-4, weight_decay=0.1)


def _frozen(path: str) -> bool:
    return any(path.startswith(f[:-1]) for f in FROZEN)


def _linear_loss(params: Any, x: torch.Tensor) -> torch.Tensor:
    return ((x @ params["w"] + params["b"]) ** 2).mean()


def _dp_inputs() -> tuple[Any, torch.Tensor]:
    params = {"w": random.normal(random.key(3), (5, 3)), "b": torch.zeros(3)}
    return params, random.normal(random.key(4), (8, 5))


# ----------------------------------------------------------------------------- the ranks


def _main_worker(rank: int, out: Path) -> None:
    """Data parallel, DP-SGD, collectives, bad input, sharded training and checkpoint."""
    trainable, frozen, opt = _start()
    if rank == 1:  # fit starts every rank from rank 0's params, as DDP does
        trainable = tree.map(lambda x: x + 1.0, trainable)
    res = distributed.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, key=random.key(1), steps=STEPS,
        clip=1.0, progress=False,
    )  # fmt: skip
    if rank == 0:
        io.save(out / "dp.safetensors", {"trainable": res.trainable})
        (out / "dp_losses.json").write_text(json.dumps([h["loss"] for h in res.history]))

    # DP-SGD: per-example gradients of the local slice, privatized over both ranks
    params, x = _dp_inputs()
    local = distributed.shard_batch(x, rank, WORLD)
    per_ex = grads.per_example(_linear_loss)(params, local)
    noisy = distributed.privatize(random.key(5), per_ex, clip=0.5, noise_multiplier=1.0)
    io.save(out / f"privatize_{rank}.safetensors", {"g": noisy, "per_ex": per_ex})

    # bucketed all-reduce: rank-dependent values, several dtypes, tiny and large buckets
    many = {
        "f32": [torch.full((3, 4), float(i + rank)) for i in range(40)],
        "f64": torch.arange(5, dtype=torch.float64) * (rank + 1),
        "bf16": torch.full((7,), 2.0 * (rank + 1), dtype=torch.bfloat16),
        "empty": [(), {}],
    }
    calls: list[int] = []
    real = torch.distributed.all_reduce

    def counting(buf: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append(buf.numel())
        return real(buf, *a, **k)

    torch.distributed.all_reduce = counting
    try:
        big = distributed.all_reduce_mean(many)
        n_big = len(calls)
        small = distributed.all_reduce_mean(many, bucket_mb=200 / 2**20)  # 200-byte buckets
        n_small = len(calls) - n_big
    finally:
        torch.distributed.all_reduce = real
    for got in (big, small):
        for i, t in enumerate(got["f32"]):
            assert torch.equal(t, torch.full((3, 4), i + 0.5)), (i, t)
        assert torch.equal(got["f64"], torch.arange(5, dtype=torch.float64) * 1.5)
        assert torch.equal(got["bf16"], torch.full((7,), 3.0, dtype=torch.bfloat16))
        assert got["empty"] == [(), {}]
    assert n_big == 3, f"one bucket per dtype expected, got {n_big}"
    assert n_small > 10, f"200-byte buckets should make many calls, got {n_small}"
    assert torch.equal(many["f32"][1], torch.full((3, 4), float(1 + rank)))  # input untouched
    (out / f"buckets_{rank}.json").write_text(json.dumps({"big": n_big, "small": n_small}))

    # bad input: every rank must get the same clear error
    errors: dict[str, str] = {}
    extra = {"w": torch.ones(2)} if rank == 0 else {"w": torch.ones(2), "v": torch.ones(1)}
    shape = {"w": torch.ones(2 + rank)}
    for name, fn in (
        ("structure", lambda: distributed.all_reduce_mean(extra)),
        ("shape", lambda: distributed.all_reduce_mean(shape)),
        ("indivisible", lambda: distributed.shard_data(lambda s: torch.zeros(3, 2))(0)),
        ("mesh", lambda: distributed.make_mesh(3)),
    ):
        try:
            fn()
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    # a compiled step would drop the gradient all-reduce: it must refuse, not train apart
    try:
        step = train.make_step(distributed.data_parallel(_loss_fn), optim.sgd(0.1))
        step(trainable, frozen, optim.sgd(0.1).init(trainable), _global_batch(0), None)
        errors["compile"] = "no error"
    except Exception as e:  # dynamo wraps the error raised while tracing
        errors["compile"] = str(e)
    (out / f"errors_{rank}.json").write_text(json.dumps(errors))

    # sharded: params and optimizer state as DTensor Shard(0) leaves on a 2-rank mesh
    mesh = distributed.make_mesh()
    trainable, frozen, opt = _start()
    s_tr, s_fr = distributed.shard(trainable, mesh), distributed.shard(frozen, mesh)
    state = opt.init(s_tr)
    local_rows = s_tr["embed"]["tokens"]["weight"].to_local().shape[0]
    assert local_rows == GPT.vocab_size // WORLD, local_rows
    assert distributed.is_sharded(state), "the optimizer state must be sharded like the params"
    ck_dir = out / "sharded_ck"
    res = distributed.fit(
        _loss_fn, opt, s_tr, s_fr, _global_batch, key=random.key(1), steps=STEPS, clip=1.0,
        opt_state=state, checkpoint_dir=ck_dir, progress=False,
    )  # fmt: skip
    whole_tr, whole_state = distributed.unshard((res.trainable, res.opt_state))
    if rank == 0:
        io.save(out / "sharded.safetensors", {"trainable": whole_tr, "opt_state": whole_state})


def _dying_worker(rank: int, out: Path) -> None:
    """Rank 1 dies at step 3; rank 0 must fail with a clear error, not hang."""
    trainable, frozen, opt = _start()

    def data(step: int) -> torch.Tensor:
        if rank == 1 and step == 3:
            (out / "death.txt").write_text(repr(time.time()))
            os._exit(3)
        return _global_batch(step)

    try:
        distributed.fit(
            _loss_fn, opt, trainable, frozen, data, key=random.key(1), steps=6,
            checkpoint=train.Checkpointing(out / "ck", every=2), progress=False,
        )  # fmt: skip
        msg = "no error"
    except distributed.CollectiveError as e:
        msg = str(e)
    (out / f"died_{rank}.json").write_text(json.dumps({"error": msg, "at": time.time()}))
    os._exit(0)  # skip the group's teardown: its peer is gone


def _hanging_worker(rank: int, out: Path) -> None:
    """Rank 1 stays alive but never joins the collective; rank 0 must time out, not hang."""
    # a short timeout on a group of its own: the default group's rendezvous keeps a long one,
    # so a rank that is slow to start on a busy machine is not mistaken for a hung one
    short = torch.distributed.new_group(timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(8)  # longer than the group's 2 s timeout, and bounded
        os._exit(0)
    t0 = time.monotonic()
    try:
        distributed.all_reduce_mean({"w": torch.ones(3)}, group=short)
        msg = "no error"
    except distributed.CollectiveError as e:
        msg = str(e)
    (out / "hung_0.json").write_text(json.dumps({"error": msg, "seconds": time.monotonic() - t0}))
    os._exit(0)


def _single_reference(steps: int) -> train.FitResult:
    trainable, frozen, opt = _start()
    return train.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, key=random.key(1), steps=steps,
        clip=1.0, compile=False, progress=False, donate=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_main")
    codes = _launch(_main_worker, out, timeout_s=60.0)
    _raise_failures(out, codes)
    return out


@pytest.fixture(scope="module")
def dying_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    out = tmp_path_factory.mktemp("dist_dying")
    return out, _launch(_dying_worker, out, timeout_s=60.0)  # a death is seen without waiting


@pytest.fixture(scope="module")
def hanging_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    out = tmp_path_factory.mktemp("dist_hanging")
    return out, _launch(_hanging_worker, out, timeout_s=60.0)


# ----------------------------------------------------------------------------- tests


def test_data_parallel_two_ranks_equal_one_process_on_the_global_batch(main_run: Path) -> None:
    ref = _single_reference(STEPS)
    got = io.load(main_run / "dp.safetensors")["trainable"]
    _assert_close_trees(got, ref.trainable, atol=1e-5)
    losses_2 = json.loads((main_run / "dp_losses.json").read_text())
    assert losses_2 == pytest.approx([h["loss"] for h in ref.history], abs=1e-5)


def test_data_parallel_keeps_frozen_partition_out_of_the_update(main_run: Path) -> None:
    got = io.load(main_run / "dp.safetensors")["trainable"]
    assert tree.paths(got) == tree.paths(_start()[0])
    assert not any(_frozen(p) for p in tree.paths(got))
    moved = [p for p, x in tree.flatten(got).items() if not torch.equal(x, _at(_start()[0], p))]
    assert moved, "training changed nothing"


def test_privatize_over_ranks_equals_privatize_on_the_global_batch(main_run: Path) -> None:
    params, x = _dp_inputs()
    want = grads.privatize(random.key(5), grads.per_example(_linear_loss)(params, x),
                           clip=0.5, noise_multiplier=1.0)  # fmt: skip
    ranks = [io.load(main_run / f"privatize_{r}.safetensors") for r in range(WORLD)]
    assert tree.structure_equal(ranks[0]["g"], ranks[1]["g"])
    for a, b in zip(tree.leaves(ranks[0]["g"]), tree.leaves(ranks[1]["g"])):
        assert torch.equal(a, b), "ranks must hold the same privatized gradient"
    _assert_close_trees(ranks[0]["g"], want, atol=1e-6)
    # per-example gradients of the slices are the global per-example gradients, in order
    whole = grads.per_example(_linear_loss)(params, x)
    stacked = tree.map(lambda a, b: torch.cat([a, b]), ranks[0]["per_ex"], ranks[1]["per_ex"])
    _assert_close_trees(stacked, whole, atol=1e-6)


def test_all_reduce_mean_buckets_leaves(main_run: Path) -> None:
    for r in range(WORLD):  # the values were checked on the ranks themselves
        counts = json.loads((main_run / f"buckets_{r}.json").read_text())
        assert counts["big"] == 3 and counts["small"] > 10


def test_bad_input_gets_clear_errors_on_every_rank(main_run: Path) -> None:
    for r in range(WORLD):
        errors = json.loads((main_run / f"errors_{r}.json").read_text())
        assert "differs across ranks" in errors["structure"]
        assert "only on rank 1: ['v']" in errors["structure"]
        assert "at 'w': rank 0 has float32[2], rank 1 has float32[3]" in errors["shape"]
        assert "batch size 3" in errors["indivisible"]
        assert "not divisible by world_size 2" in errors["indivisible"]
        assert "holds 3 ranks but the world size is 2" in errors["mesh"]
        assert "data_parallel: the data-parallel loss runs eagerly" in errors["compile"]


def test_sharded_two_ranks_equal_one_process_on_the_global_batch(main_run: Path) -> None:
    ref = _single_reference(STEPS)
    got = io.load(main_run / "sharded.safetensors")
    _assert_close_trees(got["trainable"], ref.trainable, atol=1e-5)
    _assert_close_trees(got["opt_state"], ref.opt_state, atol=1e-5)


def test_sharded_checkpoint_from_two_ranks_loads_in_one_process_bit_identically(
    main_run: Path,
) -> None:
    found = distributed.latest_sharded(main_run / "sharded_ck")
    assert found is not None and found.name == f"step_{STEPS:08d}.dcp"
    trainable, _, opt = _start()
    ck = distributed.load_sharded(found, trainable=trainable, opt_state=opt.init(trainable))
    saved = io.load(main_run / "sharded.safetensors")
    assert ck.step == STEPS and torch.equal(ck.key, random.key(1))
    for got, want in ((ck.trainable, saved["trainable"]), (ck.opt_state, saved["opt_state"])):
        flat_got, flat_want = tree.flatten(got), tree.flatten(want)
        assert list(flat_got) == list(flat_want)
        for p in flat_want:
            assert torch.equal(flat_got[p], flat_want[p]), p


def test_a_dead_rank_makes_the_other_fail_fast_with_a_clear_error(
    dying_run: tuple[Path, list[int]],
) -> None:
    out, codes = dying_run
    assert codes == [0, 3], codes
    report = json.loads((out / "died_0.json").read_text())
    assert "another rank died or did not answer" in report["error"], report
    seconds = report["at"] - float((out / "death.txt").read_text())
    assert 0 <= seconds < 20, seconds  # noticed at once, far below the group's 60 s timeout


def test_a_rank_that_never_answers_makes_the_other_time_out(
    hanging_run: tuple[Path, list[int]],
) -> None:
    out, codes = hanging_run
    assert codes == [0, 0], codes
    report = json.loads((out / "hung_0.json").read_text())
    assert "all_reduce_mean: collective failed on rank 0 of 2" in report["error"], report
    assert 1.5 < report["seconds"] < 30, report


def test_the_run_resumes_from_the_last_checkpoint(dying_run: tuple[Path, list[int]]) -> None:
    out, _ = dying_run
    assert train.latest_checkpoint(out / "ck").name == "step_00000002.safetensors"
    trainable, frozen, opt = _start()
    res = distributed.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, key=random.key(1), steps=6,
        checkpoint_dir=out / "ck", progress=False,
    )  # fmt: skip
    assert [h["step"] for h in res.history] == [3, 4, 5, 6]
    ref = train.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, key=random.key(1), steps=6,
        compile=False, progress=False, donate=False,
    )  # fmt: skip
    _assert_close_trees(res.trainable, ref.trainable, atol=5e-6)


def test_shard_batch_slices_are_disjoint_and_cover_the_batch() -> None:
    batch = {"ids": torch.arange(24).reshape(12, 2), "scale": torch.tensor(2.0)}
    parts = [distributed.shard_batch(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
    assert all(p["scale"] is batch["scale"] for p in parts)
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard_batch(batch, 4, 4)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        distributed.shard_batch({"a": torch.zeros(4), "b": torch.zeros(2)}, 0, 2)


def test_shard_requires_a_device_mesh() -> None:
    with pytest.raises(TypeError, match="mesh must be a DeviceMesh"):
        distributed.shard({"w": torch.ones(2)}, mesh=2)


def test_all_reduce_mean_checks_its_arguments_in_one_process_too() -> None:
    with pytest.raises(ValueError, match="bucket_mb must be > 0"):
        distributed.all_reduce_mean({"w": torch.ones(2)}, bucket_mb=0)
    with pytest.raises(TypeError, match=r"'n' is torch\.int64; a mean needs floating point"):
        distributed.all_reduce_mean({"w": torch.ones(2), "n": torch.tensor(3)})


# ----------------------------------------------------------------------------- helpers


def _launch(worker: Any, out: Path, *, timeout_s: float) -> list[int]:
    """Start WORLD ranks of ``worker`` (spawn), wait at most DEADLINE_S; return exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_run_rank, args=(worker, r, port, out, timeout_s), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    if hung:
        raise TimeoutError(f"ranks {hung} still ran after {DEADLINE_S} s: {_errors(out)}")
    return [p.exitcode for p in procs]


def _run_rank(worker: Any, rank: int, port: int, out: Path, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        worker(rank, out)
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        os._exit(1)


def _raise_failures(out: Path, codes: list[int]) -> None:
    if any(codes):
        raise AssertionError(f"ranks exited with {codes}: {_errors(out)}")


def _errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("error_*.txt")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _at(t: Any, path: str) -> Any:
    return tree.flatten(t)[path]


def _assert_close_trees(got: Any, want: Any, *, atol: float) -> None:
    flat_got, flat_want = tree.flatten(got), tree.flatten(want)
    assert list(flat_got) == list(flat_want)
    for p, w in flat_want.items():
        g = flat_got[p]
        if isinstance(w, torch.Tensor):
            assert g.shape == w.shape and g.dtype == w.dtype, p
            torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=lambda m, p=p: f"{p}: {m}")


def test_launched_world_size_reads_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer, got 'two'"):
        distributed.launched_world_size()


def test_data_parallel_refuses_a_bucket_size_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="data_parallel: bucket_mb must be > 0, got 0"):
        distributed.data_parallel(_loss_fn, bucket_mb=0)


def test_fit_takes_train_checkpointing_and_the_old_keywords_alike(tmp_path: Path) -> None:
    """``checkpoint=train.Checkpointing(...)`` saves and prunes as the older keywords do, and a
    run started with one spelling resumes with the other and ends where one run ends."""
    trainable, frozen, opt = _start()
    common = {"key": random.key(1), "progress": False}
    new = distributed.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, steps=4,
        checkpoint=train.Checkpointing(tmp_path / "ck", every=2, keep=1), **common,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000004.safetensors"]
    resumed = distributed.fit(
        _loss_fn, opt, trainable, frozen, _global_batch, steps=6,
        checkpoint_dir=tmp_path / "ck", checkpoint_every=2, keep=1, **common,
    )  # fmt: skip
    assert [h["step"] for h in new.history] == [1, 2, 3, 4]
    assert [h["step"] for h in resumed.history] == [5, 6]
    assert train.latest_checkpoint(tmp_path / "ck").name == "step_00000006.safetensors"
    whole = distributed.fit(_loss_fn, opt, trainable, frozen, _global_batch, steps=6, **common)
    _assert_close_trees(resumed.trainable, whole.trainable, atol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"checkpoint": "a", "checkpoint_dir": "b"}, ValueError, "either checkpoint= or"),
        ({"checkpoint_every": 2}, ValueError, "checkpoint_every=2 has no effect"),
        ({"checkpoint_dir": "a", "keep": 0}, ValueError, "keep"),
        ({"checkpointdir": "a"}, TypeError, r"unexpected keyword arguments \['checkpointdir'\]"),
        ({"meta": {"seed": 0}}, ValueError, "meta is stored only in checkpoints"),
        ({"steps": -1}, ValueError, "steps must be an int >= 0, got -1"),
        ({"resume": "yes"}, TypeError, "resume must be a bool"),
        ({"key": 0}, TypeError, "key must be a fnllm.random key tensor"),
    ],
)
def test_fit_checks_its_arguments_as_train_fit_does(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    trainable, frozen, opt = _start()
    args = {"key": random.key(1), "steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        distributed.fit(_loss_fn, opt, trainable, frozen, _global_batch, **args)


def test_fit_refuses_to_overwrite_checkpoints(tmp_path: Path) -> None:
    trainable, frozen, opt = _start()
    ck = train.Checkpointing(tmp_path / "ck", overwrite=True)
    with pytest.raises(ValueError, match=r"Checkpointing\(overwrite=True\) is for train.fit"):
        distributed.fit(
            _loss_fn, opt, trainable, frozen, _global_batch, key=random.key(1), steps=2,
            checkpoint=ck, resume=False, progress=False,
        )  # fmt: skip
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        distributed.fit(None, opt, trainable, frozen, _global_batch, key=random.key(1), steps=2)
