"""Tests for ``optim.scale_by_adam`` and for ``adam``/``adamw`` being the chains of public
transforms they are documented as (``fnllm/optim/_adam.py``).

``adamw`` computes ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` in one
pass, in the order of operations of ``torch.optim.AdamW``: ``-lr / bc1 * (m / denom)`` plus
``-lr * wd * p``. The literal chain rounds ``m / denom / bc1``, adds ``wd * p`` and then
multiplies by ``-lr``. So the two give the same moments and count bit for bit, and updates
that differ only by that rounding: a few float32 ulps of ``lr * (|direction| + wd * |p|)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnllm.optim._adam as adam_impl
from fnllm import optim, testing, tree

ULP32 = 2.0**-23


def _params(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "embed": {"weight": r(7, 4)},
        "blocks": [{"attn": {"weight": r(12, 4), "bias": r(12)}, "ln": {"weight": r(4)}}],
        "head": {"weight": r(3, 4)},
    }


def _like(t: dict, seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return tree.map(lambda x: torch.randn(x.shape, generator=g) * scale, t)


MASKS = {"all": None, "decay_mask": optim.decay_mask(), "globs": ["blocks.*", "head"]}


@settings(max_examples=30, deadline=None)
@given(
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    lr=st.floats(1e-4, 1.0),
    scheduled=st.booleans(),
    mask=st.sampled_from(list(MASKS)),
    kernel=st.booleans(),
    grad_scale=st.sampled_from([1e-4, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_adamw_is_the_chain_of_its_parts(
    b1, b2, eps, wd, lr, scheduled, mask, kernel, grad_scale, seed
):
    with pytest.MonkeyPatch.context() as mp:
        if not kernel:  # the multi-tensor path, the one torch.compile traces
            mp.setattr(adam_impl, "_fused_ok", lambda s: False)
        _check_adamw_against_chain(b1, b2, eps, wd, lr, scheduled, mask, grad_scale, seed)


def _check_adamw_against_chain(b1, b2, eps, wd, lr, scheduled, mask, grad_scale, seed):
    rate = optim.warmup_cosine(lr, 2, 8, init=lr / 10) if scheduled else lr
    opt = optim.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=MASKS[mask])
    parts = (
        optim.scale_by_adam(b1, b2, eps),
        optim.add_decayed_weights(wd, MASKS[mask]),
        optim.scale_by_learning_rate(rate),
    )
    literal = optim.chain(*parts)
    params = _params(seed)
    state, chain_state = opt.init(params), literal.init(params)
    testing.assert_trees_equal(state, chain_state[0], bitwise=True)
    for i in range(4):
        grads = _like(params, seed + 1 + i, grad_scale)
        direction, _ = parts[0].update(grads, chain_state[0])
        want, chain_state = literal.update(grads, chain_state, params)
        got, state = opt.update(grads, state, params)
        # the same moments and count, bit for bit (the state checkpoints hold)
        testing.assert_trees_equal(state, chain_state[0], bitwise=True)
        step_lr = float(rate(torch.tensor(i))) if scheduled else lr
        decays = tree.flatten(tree.map(lambda p, x: _decays(mask, p, x), params, with_path=True))
        for path, g, w in zip(tree.paths(got), tree.leaves(got), tree.leaves(want)):
            p, d = tree.flatten(params)[path], tree.flatten(direction)[path]
            scale = d.abs() + (wd * p.abs() if decays[path] else 0.0)
            bound = 8 * ULP32 * step_lr * scale + 1e-30
            assert bool(((g - w).abs() <= bound).all()), (path, (g - w).abs().max(), i)
        params = optim.apply_updates(params, got)


def _decays(mask: str, path: str, leaf: torch.Tensor) -> bool:
    m = MASKS[mask]
    return True if m is None else bool(tree.filter_fn(m)(path, leaf))


def test_adam_is_scale_by_adam_then_the_learning_rate():
    opt = optim.adam(0.05, b1=0.8)
    parts = (optim.scale_by_adam(0.8), optim.scale_by_learning_rate(0.05))
    literal = optim.chain(*parts)
    params = _params(1)
    state, chain_state = opt.init(params), literal.init(params)
    for i in range(3):
        grads = _like(params, 10 + i)
        got, state = opt.update(grads, state, params)
        want, chain_state = literal.update(grads, chain_state, params)
        testing.assert_trees_equal(state, chain_state[0], bitwise=True)
        testing.assert_trees_close(got, want, rtol=4 * ULP32, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.0, 0.9999),
    eps=st.sampled_from([0.0, 1e-8, 1e-2]),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_scale_by_adam_matches_its_formula_element_by_element(b1, b2, eps, steps, seed):
    """Against a float64 loop over single elements of the formula in the docstring."""
    t = optim.scale_by_adam(b1, b2, eps)
    grads = [_like({"w": torch.zeros(3, 2), "b": [torch.zeros(2)]}, seed + i) for i in range(steps)]
    state = t.init(grads[0])
    for g in grads:
        out, state = t.update(g, state)
    for path, got in tree.flatten(out).items():
        for idx in range(got.numel()):
            m = v = 0.0
            for k, g in enumerate(grads, start=1):
                x = float(tree.flatten(g)[path].reshape(-1)[idx])
                m, v = b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * x * x
                want = (m / (1 - b1**k)) / (math.sqrt(v) / math.sqrt(1 - b2**k) + eps)
            assert math.isclose(float(got.reshape(-1)[idx]), want, rel_tol=1e-5, abs_tol=1e-6)
    assert int(state["count"]) == steps


def test_scale_by_adam_state_is_the_adam_layout():
    """A state saved from ``adam``/``adamw`` is a ``scale_by_adam`` state and the reverse."""
    params = _params(2)
    for opt in (optim.adam(1e-3), optim.adamw(1e-3, weight_decay=0.1)):
        testing.assert_trees_equal(
            opt.init(params), optim.scale_by_adam().init(params), bitwise=True
        )
    grads = _like(params, 3)
    opt = optim.adamw(1e-3)
    _, state = opt.update(grads, opt.init(params), params)
    _, state2 = optim.scale_by_adam().update(grads, state)  # accepts the adamw state
    assert sorted(state2) == ["count", "mu", "nu"] and int(state2["count"]) == 2


def test_scale_by_adam_composes_clips_and_compiles():
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.scale_by_adam(),
        optim.add_decayed_weights(0.1, optim.decay_mask()),
        optim.scale_by_learning_rate(optim.warmup_cosine(1e-2, 2, 10)),
    )

    def step(params, grads, state):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    params = _params(4)
    state = opt.init(params)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_p, eager_s, comp_p, comp_s = params, state, params, state
    for i in range(2):
        grads = _like(params, 40 + i)
        eager_p, eager_s = step(eager_p, grads, eager_s)
        comp_p, comp_s = compiled(comp_p, grads, comp_s)
    testing.assert_trees_close((comp_p, comp_s), (eager_p, eager_s), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_scale_by_adam_leaves_its_inputs_unchanged():
    t = optim.scale_by_adam()
    g = _like(_params(5), 6)
    state = t.update(g, t.init(g))[1]
    snapshot = tree.map(lambda x: x.clone(), (g, state))
    out, new_state = t.update(g, state)
    testing.assert_trees_equal((g, state), snapshot, bitwise=True)
    assert not {id(x) for x in tree.leaves((g, state))} & {
        id(x) for x in tree.leaves((out, new_state))
    }


def test_scale_by_adam_bad_input_is_named():
    with pytest.raises(ValueError, match="b1 must be in"):
        optim.scale_by_adam(b1=1.0)
    with pytest.raises(ValueError, match="b2 must be in"):
        optim.scale_by_adam(b2=-0.1)
    with pytest.raises(ValueError, match="eps"):
        optim.scale_by_adam(eps=-1.0)
    t = optim.scale_by_adam()
    state = t.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="paths only in updates: v"):
        t.update({"v": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match=r"updates leaf 'w' has shape \(3,\)"):
        t.update({"w": torch.zeros(3)}, state)
    with pytest.raises(ValueError, match="state must be the dict returned by init"):
        t.update({"w": torch.zeros(2)}, [state])
    with pytest.raises(TypeError, match="'ids' is not a floating tensor"):
        t.init({"ids": torch.zeros(2, dtype=torch.long)})


def test_empty_tree_counts_the_step():
    t = optim.scale_by_adam()
    updates, state = t.update({}, t.init({}))
    assert updates == {} and int(state["count"]) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: optim.adamw(1e-3, b1=1.5), "optim.adamw: b1 must be in [0, 1)"),
        (lambda: optim.adamw(1e-3, weight_decay=-1.0), "optim.adamw: weight_decay"),
        (lambda: optim.adamw(float("nan")), "optim.adamw: lr"),
        (lambda: optim.adam(1e-3, b2=1.0), "optim.adam: b2 must be in [0, 1)"),
        (lambda: optim.adam(-1.0), "optim.adam: lr"),
    ],
)
def test_adam_and_adamw_argument_errors_name_the_function_called(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message)
