"""Atomic writes of checkpoints (fit's single file, sharded folders, HF exports) under faults,
and the distributed helpers on bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fnllm import distributed, train
from fnllm import random as jr

TRAINABLE = {"w": torch.ones(64, 64)}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _kill_when_ready(script: str, *args: str) -> None:
    """Run ``script``; SIGKILL it once it prints "ready" (mid-save)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE, env=_env()
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == b"ready", line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------- save_sharded


def test_save_sharded_with_bad_meta_fails_before_writing_and_leaves_nothing(tmp_path):
    path = distributed.sharded_checkpoint_path(tmp_path, 1)
    with pytest.raises(TypeError, match=r"meta\['when'\] is not JSON-serialisable"):
        distributed.save_sharded(
            path, trainable=TRAINABLE, opt_state=(), step=1, key=jr.key(0), meta={"when": object()}
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": "3"}, TypeError, "step must be an int, got '3'"),
        ({"step": True}, TypeError, "step must be an int"),
        ({"step": 2.0}, TypeError, "step must be an int"),
        ({"step": -1}, ValueError, "step must be >= 0"),
        ({"key": "seed"}, TypeError, "key must be a fnllm.random key"),
        ({"key": torch.zeros(2)}, TypeError, r"key must be .*torch.float32"),
        ({"meta": ["a"]}, TypeError, "meta must be a dict, got list"),
        ({"meta": {"x": float("nan")}}, None, None),  # JSON allows NaN (Python's json does)
    ],
)
def test_save_sharded_names_bad_arguments(tmp_path, kwargs, error, match):
    path = distributed.sharded_checkpoint_path(tmp_path, 3)
    args = {"trainable": TRAINABLE, "opt_state": (), "step": 3, "key": jr.key(0), **kwargs}
    if error is None:
        distributed.save_sharded(path, **args)
        return
    with pytest.raises(error, match=match):
        distributed.save_sharded(path, **args)
    assert os.listdir(tmp_path) == []


def test_save_sharded_accepts_a_numpy_step(tmp_path):
    path = distributed.sharded_checkpoint_path(tmp_path, 4)
    distributed.save_sharded(
        path, trainable=TRAINABLE, opt_state=(), step=np.int64(4), key=jr.key(0)
    )
    assert distributed.load_sharded(path, trainable=TRAINABLE, opt_state=()).step == 4


def test_a_failing_sharded_save_removes_its_tmp_folder(tmp_path, monkeypatch):
    path = distributed.sharded_checkpoint_path(tmp_path, 2)

    def broken(*args, **kwargs):
        Path(kwargs["checkpoint_id"]).mkdir()
        (Path(kwargs["checkpoint_id"]) / "half.distcp").write_bytes(b"x" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(distributed.checkpoint.dcp, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        distributed.save_sharded(path, trainable=TRAINABLE, opt_state=(), step=2, key=jr.key(0))
    assert os.listdir(tmp_path) == []


_SHARDED_KILLED = """
    import sys, torch
    import torch.distributed.checkpoint as dcp
    from fnllm import distributed, random
    real = dcp.save
    def slow(*args, **kwargs):
        real(*args, **kwargs)            # the .tmp folder is complete on disk ...
        print("ready", flush=True)
        import time; time.sleep(60)      # ... and the writer dies before the rename
    dcp.save = slow
    distributed.save_sharded(sys.argv[1], trainable={"w": torch.zeros(64, 64)}, opt_state=(),
                             step=int(sys.argv[2]), key=random.key(0))
"""


def test_a_sharded_save_killed_mid_way_keeps_the_old_one_and_the_next_save_sweeps(tmp_path):
    path = distributed.sharded_checkpoint_path(tmp_path, 5)
    distributed.save_sharded(path, trainable=TRAINABLE, opt_state=(), step=5, key=jr.key(0))
    _kill_when_ready(_SHARDED_KILLED, str(path), "6")
    assert sorted(os.listdir(tmp_path)) == [path.name, path.name + ".tmp"]  # the debris
    got = distributed.load_sharded(path, trainable={"w": torch.zeros(64, 64)}, opt_state=())
    assert got.step == 5 and torch.equal(got.trainable["w"], TRAINABLE["w"])  # old one intact
    distributed.save_sharded(path, trainable=TRAINABLE, opt_state=(), step=7, key=jr.key(0))
    assert os.listdir(tmp_path) == [path.name]  # swept


def test_a_save_killed_between_the_renames_is_restored_by_the_next_save(tmp_path):
    path = distributed.sharded_checkpoint_path(tmp_path, 5)
    distributed.save_sharded(path, trainable=TRAINABLE, opt_state=(), step=5, key=jr.key(0))
    os.replace(path, path.with_name(path.name + ".old"))  # where a kill mid-swap leaves it
    distributed.save_sharded(
        distributed.sharded_checkpoint_path(tmp_path, 5), trainable=TRAINABLE, opt_state=(),
        step=5, key=jr.key(1),
    )  # fmt: skip
    assert os.listdir(tmp_path) == [path.name]
    assert json.loads((path / "fnllm.json").read_text())["key"] == jr.key(1).tolist()


# ---------------------------------------------------------------- fit's single-file checkpoint

_TRAIN_KILLED = """
    import sys, torch
    import safetensors.torch as st
    from fnllm import train, random
    real = st.save_file
    def slow(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)   # the temp file is written ...
        print("ready", flush=True)
        import time; time.sleep(60)              # ... when the writer is killed
    st.save_file = slow
    train.save_checkpoint(sys.argv[1], trainable={"w": torch.zeros(256, 256)}, opt_state=(),
                          step=2, key=random.key(0))
"""


def test_a_checkpoint_save_killed_mid_write_is_swept_by_the_next_save(tmp_path):
    path = train.checkpoint_path(tmp_path, 1)
    train.save_checkpoint(path, trainable=TRAINABLE, opt_state=(), step=1, key=jr.key(0))
    _kill_when_ready(_TRAIN_KILLED, str(train.checkpoint_path(tmp_path, 2)))
    debris = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(debris) == 1 and os.path.getsize(tmp_path / debris[0]) > 256 * 256 * 4
    assert train.latest_checkpoint(tmp_path) == path  # the debris is not a checkpoint
    train.save_checkpoint(
        train.checkpoint_path(tmp_path, 3), trainable=TRAINABLE, opt_state=(), step=3, key=jr.key(0)
    )
    assert sorted(os.listdir(tmp_path)) == [path.name, train.checkpoint_path(tmp_path, 3).name]


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        ("7", TypeError, "step must be an int, got '7'"),
        (-2, ValueError, "step must be >= 0"),
        (1.0, TypeError, "step must be an int"),
    ],
)
def test_checkpoint_paths_name_a_bad_step(step, error, match):
    with pytest.raises(error, match=match):
        train.checkpoint_path("ckpt", step)
    with pytest.raises(error, match=match):
        distributed.sharded_checkpoint_path("ckpt", step)
    assert train.checkpoint_path("ckpt", np.int32(7)).name == "step_00000007.safetensors"


# ------------------------------------------------------------------------- shard_batch


@pytest.mark.parametrize(
    ("rank", "world", "error", "match"),
    [
        ("0", 2, TypeError, "rank must be an int, got '0'"),
        (0, "2", TypeError, "world_size must be an int, got '2'"),
        (True, 2, TypeError, "rank must be an int"),
        (0.0, 2, TypeError, "rank must be an int"),
        (2, 2, ValueError, r"rank must be in \[0, 2\)"),
        (0, 0, ValueError, "world_size must be an int >= 1"),
    ],
)
def test_shard_batch_names_bad_rank_and_world_size(rank, world, error, match):
    with pytest.raises(error, match=match):
        distributed.shard_batch({"x": torch.zeros(4, 2)}, rank=rank, world_size=world)


def test_shard_batch_accepts_numpy_and_0d_tensor_integers():
    out = distributed.shard_batch(
        {"x": torch.arange(4)}, rank=np.int64(1), world_size=torch.tensor(2)
    )
    assert out["x"].tolist() == [2, 3]


# --------------------------------------------------------------------------- to_hf exports

_EXPORT_KILLED = """
    import sys
    import safetensors.torch as st
    from fnllm import io, random
    from fnllm.models import GPT
    real = st.save_file
    def slow(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("ready", flush=True)
        import time; time.sleep(60)
    st.save_file = slow
    gpt = GPT(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_len=16)
    io.to_hf(gpt, gpt.init(random.key(1)), sys.argv[1])
"""


def test_an_export_killed_mid_write_keeps_the_old_weights_and_the_next_export_sweeps(tmp_path):
    from fnllm import io
    from fnllm.models import GPT

    gpt = GPT(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_len=16)
    params = gpt.init(jr.key(0))
    out = tmp_path / "export"
    io.to_hf(gpt, params, out)
    before = (out / "model.safetensors").read_bytes()
    _kill_when_ready(_EXPORT_KILLED, str(out))
    assert [n for n in os.listdir(out) if n.endswith(".tmp")]  # the killed writer's debris
    assert (out / "model.safetensors").read_bytes() == before  # the old weights are intact
    io.to_hf(gpt, params, out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: distributed.all_reduce_mean("x"), TypeError, "all_reduce_mean: expected a tensor"),
        (
            lambda: distributed.all_reduce_sum({"a": "x"}),
            TypeError,
            "all_reduce_sum: leaf 'a' is 'x'",
        ),
        (lambda: distributed.broadcast(b"x"), TypeError, "broadcast: expected a tensor"),
        (
            lambda: distributed.broadcast(torch.ones(1), src="0"),
            TypeError,
            "src must be an int rank",
        ),
        (
            lambda: distributed.broadcast(torch.ones(1), src=1),
            ValueError,
            r"src must be a rank in \[0, 1\)",
        ),
        (
            lambda: distributed.all_reduce_mean({"n": torch.tensor([1])}),
            TypeError,
            "'n' is torch.int64",
        ),
    ],
)
def test_collectives_name_bad_trees_even_without_a_process_group(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------- helpers, one process


@pytest.mark.parametrize("fn", [distributed.rank, distributed.world_size, distributed.is_main,
                                distributed.barrier])  # fmt: skip
@pytest.mark.parametrize("group", ["g", 3, np.int64(0)])
def test_a_group_that_is_not_a_process_group_is_refused(fn, group):
    with pytest.raises(TypeError, match=r"group must be None .* or a torch.distributed"):
        fn(group)


def test_shard_data_checks_rank_and_world_size_up_front():
    def data(step):
        return {"x": torch.zeros(4)}

    with pytest.raises(TypeError, match="shard_data: rank must be an int, got '0'"):
        distributed.shard_data(data, rank="0", world_size=2)
    with pytest.raises(ValueError, match=r"shard_data: rank must be in \[0, world_size 2\)"):
        distributed.shard_data(data, rank=2, world_size=2)
    assert distributed.shard_data(data, rank=np.int64(1), world_size=2)(0)["x"].shape == (2,)


def test_latest_sharded_names_a_file_given_as_the_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"latest_sharded: .*f is a file"):
        distributed.latest_sharded(tmp_path / "f")
    assert distributed.latest_sharded(tmp_path / "missing") is None  # documented


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [(0, ValueError, "shape must hold sizes >= 1"), ("2", TypeError, "shape must hold ints"),
     ([2, True], TypeError, "shape must hold ints"), (-1, ValueError, "shape must hold sizes")],
)  # fmt: skip
def test_make_mesh_checks_the_shape_before_the_process_group(shape, error, match):
    with pytest.raises(error, match=f"make_mesh: {match}"):
        distributed.make_mesh(shape)


def test_wrappers_refuse_a_loss_fn_that_is_not_callable_and_log_a_bad_bar():
    with pytest.raises(TypeError, match="data_parallel: loss_fn must be a function"):
        distributed.data_parallel(3)
    with pytest.raises(ValueError, match="data_parallel: bucket_mb must be > 0, got nan"):
        distributed.data_parallel(lambda *a: 0, bucket_mb=float("nan"))
    with pytest.raises(TypeError, match="data_parallel: bucket_mb must be a number, got '1'"):
        distributed.data_parallel(lambda *a: 0, bucket_mb="1")
    with pytest.raises(TypeError, match="sharded: loss_fn must be a function"):
        distributed.sharded("loss")
    with pytest.raises(TypeError, match=r"log: bar must be a tqdm progress bar"):
        distributed.log("x", bar="bar")
