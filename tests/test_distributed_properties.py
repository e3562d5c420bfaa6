"""Properties of fnllm.distributed's tree plumbing, in one process: bucketing and batch slices."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import distributed, random, testing, tree
from fnllm.distributed.collectives import _bucketed

# any tree fnllm's collectives may be handed: a bare leaf, lists or dicts at the root, empty
# containers, mixed dtypes and empty tensors
_TREES = testing.trees(
    testing.tensors(
        testing.shapes(max_dims=3, min_side=0, max_side=4),
        dtype=[torch.float32, torch.float64, torch.bfloat16, torch.int64],
        min_value=-3,
        max_value=3,
    ),
    max_leaves=12,
    min_leaves=0,
    root="any",
    empty=True,
)


@settings(max_examples=60)
@given(t=_TREES, bucket_bytes=st.integers(1, 200))
def test_bucketing_keeps_structure_values_and_input_for_any_bucket_size(
    t: Any, bucket_bytes: int
) -> None:
    calls: list[int] = []

    def double(buf: torch.Tensor) -> None:
        calls.append(buf.numel())
        buf.mul_(2)

    before = tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)
    out = _bucketed(t, double, bucket_bytes / 2**20, "test", divisor=None)
    assert tree.structure_equal(out, t, shapes=True)
    for p, x in tree.flatten(t).items():
        if isinstance(x, torch.Tensor):
            y = tree.flatten(out)[p]
            assert y.dtype == x.dtype and torch.equal(y, x * 2), p
            assert torch.equal(x, tree.flatten(before)[p]), f"{p}: input modified"
    leaves = [x for x in tree.leaves(t) if isinstance(x, torch.Tensor)]
    assert sum(calls) == sum(x.numel() for x in leaves)
    assert len(calls) <= len(leaves)  # never more calls than leaves
    calls.clear()
    _bucketed(t, double, 1.0, "test", divisor=None)  # 1 MB: everything fits one bucket a dtype
    assert len(calls) == len({x.dtype for x in leaves})


@settings(max_examples=60)
@given(world=st.integers(1, 5), rows=st.integers(1, 4), width=st.integers(1, 3))
def test_shard_batch_slices_concatenate_to_the_global_batch(
    world: int, rows: int, width: int
) -> None:
    batch = {
        "ids": torch.arange(world * rows * width).reshape(world * rows, width),
        "mask": torch.ones(world * rows, dtype=torch.bool),
        "scale": 0.5,
    }
    parts = [distributed.shard_batch(batch, r, world) for r in range(world)]
    assert all(p["ids"].shape == (rows, width) for p in parts)
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
    assert all(p["scale"] == 0.5 for p in parts)
    if world > 1:
        with pytest.raises(ValueError, match="not divisible by world_size"):
            distributed.shard_batch({"ids": torch.zeros(world * rows + 1)}, 0, world)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_privatize_refuses_a_bad_noise_multiplier_before_any_collective(bad: float) -> None:
    # a NaN/inf/negative multiplier must never mean "no noise": refused up front, no group needed
    g = {"w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="noise_multiplier"):
        distributed.privatize(random.key(0), g, clip=1.0, noise_multiplier=bad)


def test_privatize_refuses_a_non_number_clip() -> None:
    with pytest.raises(TypeError, match="clip"):
        distributed.privatize(
            random.key(0), {"w": torch.ones(2, 3)}, clip="1", noise_multiplier=1.0
        )


def test_fit_in_one_process_is_train_fits_loop_with_its_options() -> None:
    """distributed.fit runs train.fit's loop: epochs, eval_fn and on_nonfinite behave alike."""
    from fnllm import data, optim, train

    batches = [{"x": torch.eye(3)[i : i + 1], "y": torch.full((1,), float(i))} for i in range(3)]
    stream = data.epochs(batches, key=random.key(4), num_epochs=4)

    def loss_fn(tr: Any, fr: Any, b: Any, key: Any) -> torch.Tensor:
        return ((b["x"] @ tr["w"] - b["y"]) ** 2).mean()

    def evaluate(tr: Any, fr: Any) -> float:
        return float(tr["w"].sum())

    kw = dict(key=random.key(0), epochs=4, eval_fn=evaluate, eval_every=3, progress=False)
    ours = distributed.fit(loss_fn, optim.adamw(0.1), {"w": torch.zeros(3)}, {}, stream, **kw)
    ref = train.fit(
        loss_fn, optim.adamw(0.1), {"w": torch.zeros(3)}, {}, stream, compile=False, **kw
    )
    assert ours.step == ref.step == 12 and ours.evals == ref.evals and len(ours.evals) == 4
    assert torch.equal(ours.trainable["w"], ref.trainable["w"])
    assert [h["loss"] for h in ours.history] == [h["loss"] for h in ref.history]
    nan = lambda tr, fr, b, key: loss_fn(tr, fr, b, key) * float("nan")
    stopped = distributed.fit(
        nan, optim.sgd(0.1), {"w": torch.zeros(3)}, {}, stream, key=random.key(0), steps=5,
        on_nonfinite="stop", progress=False,
    )  # fmt: skip
    assert stopped.step == 0 and stopped.stopped and stopped.skipped == [0]
