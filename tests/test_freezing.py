"""Freezing is a partition: no gradient, no optimizer state and no backward work for frozen leaves.

The backward-work checks count work, not time: ``FlopCounterMode`` counts the matmul FLOPs of
a train step. If autograd stops at the lowest trainable block, adding frozen blocks *below* it
adds exactly their forward FLOPs to a step and nothing for backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fnllm import losses, optim, train, tree
from fnllm import random as jr
from fnllm.models.gpt import GPT

LAST_BLOCK_ONLY = ["blocks.{last}.*", "ln_f"]


def _model(n_layer: int, tie_head: bool = False) -> GPT:
    return GPT(vocab_size=64, n_layer=n_layer, n_head=2, d_model=32, max_len=16, tie_head=tie_head)


def _loss_fn(model: GPT):
    def loss_fn(trainable, frozen, batch, key):
        logits = model.apply(tree.combine(trainable, frozen), batch)
        return losses.causal_lm(logits, batch)

    return loss_fn


def _batch(model: GPT) -> torch.Tensor:
    return jr.randint(jr.key(1), (2, 16), 0, model.vocab_size)


def _filter(model: GPT, spec) -> list[str] | str:
    if spec == "last":
        return [g.format(last=model.n_layer - 1) for g in LAST_BLOCK_ONLY]
    return spec


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _step_flops(n_layer: int, spec, tie_head: bool = False) -> tuple[int, int]:
    """(FLOPs of one train step, FLOPs of one forward) for the given trainable filter."""
    model = _model(n_layer, tie_head)
    params = model.init(jr.key(0))
    trainable, frozen = tree.partition(params, _filter(model, spec))
    opt = optim.adamw(1e-3)
    step = train.make_step(_loss_fn(model), opt, compile=False)
    batch = _batch(model)
    state = opt.init(trainable)
    step_flops = _flops(lambda: step(trainable, frozen, state, batch, jr.key(0)))
    fwd_flops = _flops(lambda: _loss_fn(model)(trainable, frozen, batch, None))
    return step_flops, fwd_flops


def test_frozen_blocks_below_the_trainable_one_cost_no_backward_work():
    step2, fwd2 = _step_flops(2, "last")
    step4, fwd4 = _step_flops(4, "last")
    assert fwd4 > fwd2
    # two more frozen blocks below: exactly their forward work, no backward at all
    assert step4 - step2 == fwd4 - fwd2


def test_training_every_block_pays_backward_for_each():
    """The counterpart (so the test above can fail): trainable blocks do cost backward work."""
    step2, fwd2 = _step_flops(2, "*")
    step4, fwd4 = _step_flops(4, "*")
    assert step4 - step2 >= 2.5 * (fwd4 - fwd2)


def test_tied_trainable_embedding_makes_backward_run_through_every_block():
    """NOTES.md: with a tied head the embedding is trainable, so backward reaches the bottom.

    The frozen blocks then cost their forward plus an input-gradient backward (no weight
    gradients): about twice their forward work, where an untied frozen head costs once.
    """
    step2, fwd2 = _step_flops(2, ["blocks.1.*", "embed.tokens.*"], tie_head=True)
    step4, fwd4 = _step_flops(4, ["blocks.3.*", "embed.tokens.*"], tie_head=True)
    assert step4 - step2 >= 1.9 * (fwd4 - fwd2)


def test_hidden_states_below_the_lowest_trainable_block_are_outside_the_graph():
    model = _model(4)
    params = model.init(jr.key(0))
    trainable, frozen = tree.partition(params, ["blocks.2.*", "blocks.3.*", "ln_f"])
    live = tree.map(lambda x: x.detach().requires_grad_(True), trainable)
    out = model.apply(tree.combine(live, frozen), _batch(model), output_hidden_states=True)
    # hidden_states[i] is the input of block i: autograd never enters blocks 0 and 1
    flags = [h.requires_grad for h in out.hidden_states]
    assert flags == [False, False, False, True, True]


@pytest.mark.parametrize("spec", ["last", ["blocks.0.attn.*", "head"]])
def test_frozen_leaves_are_bit_identical_after_training_and_have_no_optimizer_state(spec):
    model = _model(2)
    params = model.init(jr.key(0))
    trainable, frozen = tree.partition(params, _filter(model, spec))
    frozen_copy = tree.map(torch.clone, frozen)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    data = lambda s: jr.randint(jr.fold_in(jr.key(2), s), (4, 16), 0, model.vocab_size)
    res = train.fit(
        _loss_fn(model),
        opt,
        trainable,
        frozen,
        data,
        key=jr.key(0),
        steps=5,
        compile=False,
        progress=False,
    )
    frozen_paths, trained_paths = tree.paths(frozen), tree.paths(trainable)
    for path, x in tree.flatten(frozen).items():
        assert torch.equal(x, tree.flatten(frozen_copy)[path]), path
    # the trainable leaves did move
    after = tree.flatten(res.trainable)
    assert all(not torch.equal(after[p], tree.flatten(trainable)[p]) for p in trained_paths)
    # optimizer state: no path ends in a frozen leaf's path, and it is sized by trainable only
    state_paths = [
        p
        for p, x in tree.flatten(res.opt_state).items()
        if isinstance(x, torch.Tensor) and x.numel() > 1
    ]
    assert state_paths
    for p in state_paths:
        assert not any(p == f or p.endswith("." + f) for f in frozen_paths), p
        assert any(p == t or p.endswith("." + t) for t in trained_paths), p
    assert tree.count(res.opt_state) <= 2 * tree.count(trainable) + 16
