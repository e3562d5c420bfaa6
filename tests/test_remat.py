"""fnllm.remat (activation checkpointing) and mixed precision (a bf16 frozen base with float32
trainable leaves): gradients equal the unchecked ones, memory goes down, bf16 tracks fp32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import finetune, grads, losses, memory, optim, remat, train, tree
from fnllm import random as jr
from fnllm.models import BERT, GPT, Llama

SHAPE = {"vocab_size": 40, "n_layer": 4, "n_head": 2, "d_model": 16, "max_len": 16}
MODELS = {
    "gpt": GPT(**SHAPE, dropout=0.1),
    "bert": BERT(**SHAPE, d_ff=32, dropout=0.1),
    "llama": Llama(**{**SHAPE, "n_head": 4}, n_kv_head=2, d_ff=32, dropout=0.1),
}
PARAMS = {name: m.init(jr.key(0)) for name, m in MODELS.items()}
TOKENS = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))

policies = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(1, 5),
    st.sets(st.integers(0, SHAPE["n_layer"] - 1)),
)


def _loss(name: str, checkpoint: Any) -> Any:
    model = MODELS[name]

    def loss(params: Any, tokens: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        out = model.apply(params, tokens, key=key, checkpoint=checkpoint)
        x = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        return x.float().square().mean()

    return loss


def _close(a: Any, b: Any) -> None:
    for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=6, deadline=None)
@given(policy=policies, seed=st.integers(0, 2**31 - 1))
def test_checkpointed_gradients_equal_the_unchecked_ones(name: str, policy: Any, seed: int) -> None:
    key = jr.key(seed)
    want = torch.func.grad(_loss(name, None))(PARAMS[name], TOKENS, key)
    got = torch.func.grad(_loss(name, policy))(PARAMS[name], TOKENS, key)
    _close(got, want)
    # plain autograd (the eager train step) gives the same numbers
    leaves, spec = tree.flatten_spec(PARAMS[name])
    inputs = [x.detach().requires_grad_() for x in leaves]
    loss = _loss(name, policy)(tree.unflatten_spec(spec, inputs), TOKENS, key)
    raw = torch.autograd.grad(loss, inputs, allow_unused=True)
    _close([torch.zeros_like(x) if g is None else g for g, x in zip(raw, inputs)], want)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_example_gradients_equal(name: str) -> None:
    key = jr.key(7)
    want = grads.per_example(_loss(name, None), in_dims=(None, 0, None))(PARAMS[name], TOKENS, key)
    got = grads.per_example(_loss(name, 2), in_dims=(None, 0, None))(PARAMS[name], TOKENS, key)
    _close(got, want)


def test_a_compiled_step_equals_the_eager_one() -> None:
    model = GPT(vocab_size=40, n_layer=2, n_head=2, d_model=16, max_len=16, dropout=0.1)
    params = model.init(jr.key(0))

    _assert_checkpointed_step_equals_eager(model, params, TOKENS, {"backend": "aot_eager"})


def _assert_checkpointed_step_equals_eager(
    model: Any, params: Any, tokens: torch.Tensor, compile: dict[str, Any]
) -> None:
    """One SGD step of a checkpointed model's LM loss, compiled (fullgraph: a graph break
    raises) against eager: equal loss and equal new params."""

    def loss_fn(tr: Any, fr: Any, tokens: torch.Tensor, key: Any) -> torch.Tensor:
        logits = model.apply(tree.combine(tr, fr), tokens, key=key, checkpoint=True)
        return losses.causal_lm(logits, tokens)

    opt = optim.sgd(0.1)
    tr, fr = tree.partition(params, "blocks.*")
    eager = train.make_step(loss_fn, opt, compile=False)
    compiled = train.make_step(loss_fn, opt, compile=compile)
    want, _, m1 = eager(tr, fr, opt.init(tr), tokens, jr.key(3))
    got, _, m2 = compiled(tr, fr, opt.init(tr), tokens, jr.key(3))
    torch.testing.assert_close(m2["loss"], m1["loss"])
    _close(got, want)


def test_a_compiled_forward_keeps_the_checkpointing_memory_saving() -> None:
    # compile={"regional": True} compiles the forward only; autograd runs outside, so
    # remat hands the blocks to torch.utils.checkpoint and AOTAutograd recomputes them
    model = GPT(vocab_size=64, n_layer=4, n_head=4, d_model=64, max_len=128, dropout=0.1)
    params = model.init(jr.key(0))
    tokens = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(1))

    def saved_and_grads(policy: Any, compiled: bool) -> tuple[int, Any]:
        def loss(p: Any) -> torch.Tensor:
            logits = model.apply(p, tokens, key=jr.key(3), checkpoint=policy)
            return losses.causal_lm(logits, tokens)

        f = torch.compile(loss, backend="aot_eager", fullgraph=True) if compiled else loss
        leaves, spec = tree.flatten_spec(params)
        inputs = [x.detach().requires_grad_() for x in leaves]
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f(tree.unflatten_spec(spec, inputs))
        return sum(saved), torch.autograd.grad(out, inputs)

    plain, want = saved_and_grads(None, False)
    compiled_plain, _ = saved_and_grads(None, True)
    compiled_remat, got = saved_and_grads(True, True)
    _close(got, want)  # dropout on: the recomputation draws the same masks
    assert compiled_remat < compiled_plain / 5, (compiled_remat, compiled_plain, plain)
    regional = {"regional": True, "backend": "aot_eager"}
    _assert_checkpointed_step_equals_eager(model, params, tokens, regional)


def test_checkpointing_lowers_the_activation_memory() -> None:
    model = GPT(vocab_size=64, n_layer=6, n_head=4, d_model=64, max_len=128)
    params = model.init(jr.key(0))
    tokens = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(1))

    def peak(policy: Any) -> int:
        def loss(p: Any) -> torch.Tensor:
            return losses.causal_lm(model.apply(p, tokens, checkpoint=policy), tokens)

        torch.func.grad(loss)(params)  # one-off set-up out of the measurement
        return memory.measure(torch.func.grad(loss), params)[1]

    none, every_other, every = peak(None), peak(2), peak(True)
    assert every < every_other < none, (every, every_other, none)
    assert every < 0.6 * none, (every, none)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_classifier_passes_checkpoint_to_its_base(name: str) -> None:
    clf = finetune.Classifier(MODELS[name], n_classes=3, pooling="mean")
    params = clf.init(jr.key(0))
    labels = torch.tensor([0, 2, 1])

    def loss(policy: Any) -> Any:
        def f(p: Any, key: torch.Tensor) -> torch.Tensor:
            logits = clf.apply(p, TOKENS, key=key, checkpoint=policy)
            return losses.classification(logits, labels)

        return f

    key = jr.key(5)  # dropout on: the recomputation must draw the same masks
    want = torch.func.grad(loss(None))(params, key)
    for policy in (True, 2, {1, 3}):
        _close(torch.func.grad(loss(policy))(params, key), want)

    def peak(policy: Any) -> int:
        torch.func.grad(loss(policy))(params, key)  # one-off set-up out of the measurement
        return memory.measure(torch.func.grad(loss(policy)), params, key)[1]

    plain, every = peak(None), peak(True)
    assert every < plain, (every, plain)


def test_selected_refuses_bad_policies() -> None:
    with pytest.raises(ValueError, match="k >= 1"):
        remat.selected(0, 3)
    with pytest.raises(ValueError, match="not in"):
        remat.selected({3}, 3)
    with pytest.raises(TypeError, match="checkpoint"):
        remat.selected("all", 3)
    with pytest.raises(ValueError, match="k >= 1"):
        MODELS["gpt"].apply(PARAMS["gpt"], TOKENS, checkpoint=-1)


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_a_bf16_frozen_base_tracks_the_fp32_lora_run(name: str) -> None:
    model = MODELS[name]
    params = finetune.lora.init(jr.key(1), PARAMS[name], rank=4, model=model)
    trainable, frozen = tree.partition(params, finetune.strategy("lora", model))
    frozen16 = tree.cast(frozen, torch.bfloat16)

    def loss_fn(tr: Any, fr: Any, tokens: torch.Tensor, key: Any) -> torch.Tensor:
        return losses.causal_lm(model.apply(tree.combine(tr, fr), tokens, key=key), tokens)

    opt = optim.adamw(1e-2)
    step = train.make_step(loss_fn, opt, compile=False)
    curves = []
    for fr in (frozen, frozen16):
        before = tree.map(torch.clone, fr)
        tr, state, curve = trainable, opt.init(trainable), []
        for i in range(12):
            tr, state, metrics = step(tr, fr, state, TOKENS, jr.key(i))
            assert metrics["loss"].dtype == torch.float32
            curve.append(float(metrics["loss"]))
        assert all(x.dtype == torch.float32 for x in tree.leaves(tr))  # trainable stay fp32
        for a, b in zip(tree.leaves(fr), tree.leaves(before), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)  # the frozen base is untouched
        curves.append(torch.tensor(curve))
    fp32, bf16 = curves
    assert fp32[-1] < fp32[0] - 0.05  # it learns
    torch.testing.assert_close(bf16, fp32, rtol=0.02, atol=0.0)


def test_cast_where_casts_only_the_selected_leaves() -> None:
    params = PARAMS["gpt"]
    half = tree.cast(params, torch.bfloat16, "blocks.*")
    for path, x in tree.flatten(half).items():
        assert x.dtype == (torch.bfloat16 if path.startswith("blocks.") else torch.float32)
    assert all(x.dtype == torch.float32 for x in tree.leaves(params))  # input unchanged
    MODELS["gpt"].check_params(half)  # float32 next to bf16 is a valid tree


def test_other_dtype_mixes_are_refused() -> None:
    model, params = MODELS["gpt"], PARAMS["gpt"]
    two_halves = tree.cast(tree.cast(params, torch.bfloat16, "blocks.0.*"), torch.float16,
                           "blocks.1.*")  # fmt: skip
    with pytest.raises(TypeError, match="cast the whole tree"):
        model.check_params(two_halves)
    # a bf16 leaf among float32 ones may be frozen, not trained
    tr, fr = tree.partition(tree.cast(params, torch.bfloat16, "blocks.0.*"), "blocks.*")
    opt = optim.sgd(0.1)
    step = train.make_step(lambda t, f, b, k: sum(x.float().sum() for x in tree.leaves(t)), opt,
                           compile=False)  # fmt: skip
    with pytest.raises(TypeError, match="keep the trainable leaves in float32"):
        step(tr, fr, opt.init(tr), None, None)
