"""Tests for fnllm.optim: step-for-step parity with torch.optim, schedules against their
formulas, composition, purity, state layout, compile, and boundary errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnllm.optim._adam as adam_impl
from fnllm import optim, testing, tree

# ----------------------------------------------------------------------------- helpers


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A small GPT-like tree: embeddings, blocks with weights/biases/norms, a head."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    block = lambda: {
        "ln_1": {"weight": r(6), "bias": r(6)},
        "attn": {"qkv": {"weight": r(18, 6), "bias": r(18)}},
        "mlp": {"fc": {"weight": r(12, 6)}},
    }
    return {
        "embed": {"weight": r(11, 6)},
        "blocks": [block(), block()],
        "head": {"weight": r(5, 6)},
    }


def _like(t: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return tree.map(lambda x: torch.randn(x.shape, generator=g).to(x.dtype), t)


def _clone(t):
    return tree.map(lambda x: x.clone(), t)


def _torch_params(params: dict) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(v.clone()) for k, v in tree.flatten(params).items()}


def _set_grads(tp: dict[str, torch.nn.Parameter], grads: dict) -> None:
    for k, g in tree.flatten(grads).items():
        tp[k].grad = g.clone()


# ----------------------------------------------------------------------------- adamw parity

MASKS = {
    "none": None,
    "decay_mask": optim.decay_mask(),
    "globs": ["blocks.*.attn.*", "head"],
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("path", ["fused", "foreach"])
@pytest.mark.parametrize("scheduled", [False, True])
def test_adamw_matches_torch_step_for_step(mask_name, path, scheduled, monkeypatch):
    if path == "foreach":
        monkeypatch.setattr(adam_impl, "_fused_ok", lambda s: False)
    mask = MASKS[mask_name]
    base_lr, wd = 3e-2, 0.1
    schedule = optim.warmup_cosine(base_lr, warmup_steps=2, total_steps=6, init=1e-3)
    opt = optim.adamw(
        schedule if scheduled else base_lr, b1=0.8, b2=0.95, weight_decay=wd, mask=mask
    )
    params = _params()
    state = opt.init(params)

    tp = _torch_params(params)
    decays = tree.flatten(_decay_flags(params, mask))
    groups = [
        {"params": [tp[k] for k in tp if decays[k]], "weight_decay": wd},
        {"params": [tp[k] for k in tp if not decays[k]], "weight_decay": 0.0},
    ]
    topt = torch.optim.AdamW([g for g in groups if g["params"]], lr=base_lr, betas=(0.8, 0.95))
    if scheduled:
        sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda i: float(schedule(i)) / base_lr)

    for i in range(5):
        grads = _like(params, 100 + i)
        _set_grads(tp, grads)
        topt.step()
        if scheduled:
            sched.step()
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        torch_params = tree.unflatten({k: v.detach() for k, v in tp.items()})
        testing.assert_trees_close(params, torch_params, rtol=1e-6, atol=1e-6)
    assert int(state["count"]) == 5


def _decay_flags(params: dict, mask) -> dict:
    if mask is None:
        return tree.map(lambda x: True, params)
    pred = tree.filter_fn(mask)
    return tree.map(lambda p, x: bool(pred(p, x)), params, with_path=True)


def test_bool_tree_mask_equals_predicate_mask():
    params, grads = _params(), _like(_params(), 1)
    pred = optim.decay_mask()
    bools = tree.map(lambda p, x: pred(p, x), params, with_path=True)
    a, b = optim.adamw(0.1, mask=pred), optim.adamw(0.1, mask=bools)
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    testing.assert_trees_equal(ua, ub, bitwise=True)


def test_decay_mask_spares_biases_norms_and_embeddings():
    flags = tree.flatten(_decay_flags(_params(), optim.decay_mask()))
    assert {k for k, v in flags.items() if v} == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.mlp.fc.weight",
        "head.weight",
    }


def test_adam_matches_torch_adam():
    params = _params(3)
    opt = optim.adam(1e-2, b1=0.9, b2=0.99, eps=1e-6)
    state = opt.init(params)
    tp = _torch_params(params)
    topt = torch.optim.Adam(list(tp.values()), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for i in range(4):
        grads = _like(params, 200 + i)
        _set_grads(tp, grads)
        topt.step()
        params, state = optim.step(opt, grads, state, params)
        torch_params = tree.unflatten({k: v.detach() for k, v in tp.items()})
        testing.assert_trees_close(params, torch_params, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("donate", [False, True])
def test_step_equals_update_then_apply(donate):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, mask=optim.decay_mask()))
    params_a = _params(4)
    params_b = _clone(params_a)
    state_a, state_b = opt.init(params_a), opt.init(params_b)
    for i in range(3):
        grads = _like(params_a, 300 + i)
        updates, state_a = opt.update(grads, state_a, params_a)
        params_a = optim.apply_updates(params_a, updates)
        params_b, state_b = optim.step(opt, grads, state_b, params_b, donate=donate)
        for x, y in zip(tree.leaves((params_a, state_a)), tree.leaves((params_b, state_b))):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_low_precision_params_keep_their_dtype():
    params = _params(5, torch.bfloat16)
    grads = _like(params, 6)
    opt = optim.adamw(1e-2)
    state = opt.init(params)
    updates, state2 = opt.update(grads, state, params)
    new = optim.apply_updates(params, updates)
    stepped, _ = optim.step(opt, grads, state, params)
    for leaf in tree.leaves((updates, state2["mu"], new, stepped)):
        assert leaf.dtype == torch.bfloat16
    for x, y in zip(tree.leaves(new), tree.leaves(stepped)):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- sgd / clipping


@pytest.mark.parametrize(
    ("momentum", "nesterov", "wd"),
    [
        (0.0, False, 0.0),
        (0.0, False, 0.01),
        (0.9, False, 0.0),
        (0.9, True, 0.05),
        (0.5, False, 0.1),
    ],
)
def test_sgd_matches_torch_sgd(momentum, nesterov, wd):
    params = _params(7)
    opt = optim.sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    state = opt.init(params)
    tp = _torch_params(params)
    topt = torch.optim.SGD(
        list(tp.values()), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd
    )
    for i in range(4):
        grads = _like(params, 400 + i)
        _set_grads(tp, grads)
        topt.step()
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        torch_params = tree.unflatten({k: v.detach() for k, v in tp.items()})
        testing.assert_trees_close(params, torch_params, rtol=1e-6, atol=1e-6)


def test_sgd_with_schedule_matches_torch_lambda_lr():
    params = _params(8)
    schedule = optim.linear_warmup(0.1, warmup_steps=3)
    opt = optim.sgd(schedule, momentum=0.9)
    state = opt.init(params)
    tp = _torch_params(params)
    topt = torch.optim.SGD(list(tp.values()), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda i: float(schedule(i)) / 0.1)
    for i in range(5):
        grads = _like(params, 500 + i)
        _set_grads(tp, grads)
        topt.step()
        sched.step()
        params, state = optim.step(opt, grads, state, params)
        torch_params = tree.unflatten({k: v.detach() for k, v in tp.items()})
        testing.assert_trees_close(params, torch_params, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    max_norm=st.floats(1e-3, 1e3),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_clip_by_global_norm_matches_torch(max_norm, scale, seed):
    grads = tree.map(lambda x: x * scale, _like(_params(), seed))
    tg = [x.clone() for x in tree.leaves(grads)]
    ref = [torch.nn.Parameter(torch.zeros_like(x)) for x in tg]
    for p, g in zip(ref, tg):
        p.grad = g
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    clip = optim.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    torch.testing.assert_close(optim.global_norm(grads), total)
    for x, p in zip(tree.leaves(clipped), ref):
        torch.testing.assert_close(x, p.grad, rtol=1e-6, atol=0)
    assert float(optim.global_norm(clipped)) <= max_norm * (1 + 1e-5)


def test_global_norm_under_vmap_is_per_example():
    batch = {"a": torch.randn(4, 3), "b": [torch.randn(4, 2, 2)]}
    got = torch.func.vmap(optim.global_norm)(batch)
    want = torch.stack([optim.global_norm(tree.map(lambda x, i=i: x[i], batch)) for i in range(4)])
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- schedules


@settings(max_examples=40, deadline=None)
@given(
    peak=st.floats(1e-5, 1.0),
    init=st.floats(0.0, 1e-3),
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
    step=st.integers(0, 700),
)
def test_schedules_match_their_formulas(peak, init, warmup, extra, step):
    total = warmup + extra
    end = peak * 0.1

    def close(got, want):
        assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-7 * max(peak, 1e-3))

    close(optim.constant(peak)(step), peak)
    w = min(step, warmup) / warmup if warmup else 1.0
    close(optim.linear_warmup(peak, warmup, init)(step), init + (peak - init) * w)
    c = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    close(optim.cosine_decay(peak, total, alpha=0.1)(step), peak * (0.9 * c + 0.1))
    if step < warmup:
        want = init + (peak - init) * step / warmup
    else:
        p = min((step - warmup) / extra, 1.0)
        want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))
    close(optim.warmup_cosine(peak, warmup, total, init=init, end=end)(step), want)
    # a tensor step (what the optimizer passes) gives the same value
    close(optim.warmup_cosine(peak, warmup, total, init=init, end=end)(torch.tensor(step)), want)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine(1e-3, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="decay_steps"):
        optim.cosine_decay(1e-3, 0)
    with pytest.raises(TypeError, match="warmup_steps"):
        optim.linear_warmup(1e-3, 2.5)


# ----------------------------------------------------------------------------- composition


@settings(max_examples=20, deadline=None)
@given(factor=st.floats(-3, 3), lr=st.floats(1e-4, 1.0), seed=st.integers(0, 100))
def test_chain_applies_transforms_in_order(factor, lr, seed):
    grads = _like(_params(), seed)
    opt = optim.chain(optim.scale(factor), optim.clip_by_global_norm(1.0), optim.sgd(lr))
    got, state = opt.update(grads, opt.init(grads))
    u = tree.map(lambda g: g * factor, grads)
    coef = min(1.0, 1.0 / (float(optim.global_norm(u)) + 1e-6))
    want = tree.map(lambda x: x * coef * -lr, u)
    for x, y in zip(tree.leaves(got), tree.leaves(want)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert isinstance(state, list) and len(state) == 3


def test_state_exists_only_for_the_initialised_leaves():
    params = _params()
    trainable, frozen = tree.partition(params, ["blocks.1.*", "head"])
    opt = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(1e-3), optim.sgd(0.1, momentum=0.9)
    )
    state = opt.init(trainable)
    want = set(tree.paths(trainable))
    assert set(tree.paths(state[1]["mu"])) == want
    assert set(tree.paths(state[1]["nu"])) == want
    assert set(tree.paths(state[2][0]["trace"])) == want
    state_tensors = {id(x) for x in tree.leaves(state)}
    assert not state_tensors & {id(x) for x in tree.leaves(frozen)}
    grads = _like(trainable, 9)
    new, state = optim.step(opt, grads, state, trainable)
    assert tree.paths(new) == tree.paths(trainable)
    combined = tree.combine(new, frozen)
    for p in tree.paths(frozen):
        assert tree.flatten(combined)[p] is tree.flatten(params)[p]


def test_update_with_another_structure_names_the_path():
    params = _params()
    trainable, _ = tree.partition(params, "head")
    opt = optim.adamw(1e-3)
    state = opt.init(trainable)
    with pytest.raises(ValueError, match=r"paths only in grads: blocks\.0\.attn\.qkv\.bias"):
        opt.update(_like(params, 1), state, params)
    bad = _like(trainable, 2)
    bad["head"]["weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"grads leaf 'head\.weight' has shape \(3, 3\)"):
        opt.update(bad, state, trainable)
    sgd = optim.sgd(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="only in the state: blocks"):
        sgd.update(_like(trainable, 3), sgd.init(params), trainable)


# ----------------------------------------------------------------------------- purity


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.adamw(optim.warmup_cosine(1e-2, 2, 10), mask=optim.decay_mask()),
        lambda: optim.chain(optim.clip_by_global_norm(0.1), optim.adam(1e-2)),
        lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
)
def test_update_and_step_leave_their_inputs_unchanged(make):
    opt = make()
    params, grads = _params(10), _like(_params(), 11)
    state = opt.init(params)
    state, params = opt.update(grads, state, params)[1], params  # a non-trivial state
    snapshot = _clone((params, grads, state))
    updates, new_state = opt.update(grads, state, params)
    new_params = optim.apply_updates(params, updates)
    stepped, stepped_state = optim.step(opt, grads, state, params)
    testing.assert_trees_equal((params, grads, state), snapshot, bitwise=True)
    inputs = {id(x) for x in tree.leaves((params, grads, state))}
    outputs = tree.leaves((updates, new_state, new_params, stepped, stepped_state))
    assert not inputs & {id(x) for x in outputs}


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_equals_eager_without_graph_breaks(backend):
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1, mask=optim.decay_mask()),
    )

    def train_step(params, grads, state):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    params = _params(12)
    state = opt.init(params)
    grads = [_like(params, 600 + i) for i in range(3)]
    # fullgraph=True raises on any graph break, so compiling at all proves there are none.
    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, backend=backend)
    eager_p, eager_s = params, state
    comp_p, comp_s = params, state
    with torch._dynamo.config.patch(error_on_recompile=True):  # the step count is a tensor
        for g in grads:
            eager_p, eager_s = train_step(eager_p, g, eager_s)
            comp_p, comp_s = compiled(comp_p, g, comp_s)
    for x, y in zip(tree.leaves((comp_p, comp_s)), tree.leaves((eager_p, eager_s))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="b1"):
        optim.adamw(1e-3, b1=1.0)
    with pytest.raises(ValueError, match="lr"):
        optim.adamw(-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_by_global_norm(0.0)
    with pytest.raises(TypeError, match="tree of Python bools"):
        optim.adamw(1e-3, mask={"w": 1})
    with pytest.raises(ValueError, match="needs at least one"):
        optim.chain()
    opt = optim.adamw(1e-3)
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="needs params"):
        opt.update({"w": torch.zeros(2)}, opt.init(params))
    with pytest.raises(ValueError, match="state must be the dict returned by init"):
        opt.update({"w": torch.zeros(2)}, {"mu": {}}, params)
    with pytest.raises(TypeError, match="'ids' is not a floating tensor"):
        opt.init({"ids": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="mask does not match params"):
        optim.adamw(1e-3, mask={"v": True}).update(params, opt.init(params), params)
    with pytest.raises(ValueError, match="list of 2 states"):
        optim.chain(optim.scale(1.0), opt).update(params, [{}], params)
    with pytest.raises(ValueError, match="paths only in updates"):
        optim.apply_updates(params, {"v": torch.zeros(2)})


def test_empty_trees_are_fine():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3), optim.sgd(0.1, 0.9))
    state = opt.init({})
    updates, state = opt.update({}, state, {})
    assert updates == {} and optim.apply_updates({}, {}) == {}
    assert optim.step(opt, {}, state, {})[0] == {}
