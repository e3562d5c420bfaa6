"""fnllm.memory: the plan (a step on fake tensors) against the same step measured on the CPU."""

from __future__ import annotations

import resource
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import finetune, losses, memory, optim, random, train, tree
from fnllm.models import BERT, GPT, Llama

GPT_SMALL = GPT(vocab_size=500, n_layer=2, n_head=4, d_model=64, max_len=64)
BERT_SMALL = BERT(vocab_size=500, n_layer=2, n_head=4, d_model=64, d_ff=128, max_len=64,
                  mlm_head=False, pair_head=False)  # fmt: skip


LLAMA_SMALL = Llama(vocab_size=500, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                    max_len=64)  # fmt: skip


def _measured(model: Any, strategy: str, batch: int, seq_len: int, checkpoint: Any = None) -> int:
    """Weights + optimizer state + the measured peak of one real donated step on the CPU."""
    params = model.init(random.key(0))
    if strategy == "lora":
        params = finetune.lora.init(random.key(1), params, rank=8)
    trainable, frozen = tree.partition(params, finetune.strategy(strategy, model))
    opt = optim.adamw(1e-4)
    state = opt.init(trainable)
    if isinstance(model, finetune.Classifier):
        loss_fn = lambda tr, fr, b, k: losses.classification(
            model.apply(tree.combine(tr, fr), b["input_ids"], key=k, checkpoint=checkpoint),
            b["labels"],
        )
    else:
        loss_fn = lambda tr, fr, b, k: losses.causal_lm(
            model.apply(tree.combine(tr, fr), b["input_ids"], key=k, checkpoint=checkpoint),
            b["input_ids"],
        )
    data = {
        "input_ids": random.randint(random.key(2), (batch, seq_len), 0, 500),
        "labels": torch.zeros(batch, dtype=torch.long),
    }
    step = train.make_step(loss_fn, opt, compile=False, guard=False)
    step.inner(trainable, frozen, state, data, random.key(3), donate=True)  # as plan does
    _, transient = memory.measure(step.inner, trainable, frozen, state, data, random.key(3),
                                  donate=True)  # fmt: skip
    static = sum(x.numel() * x.element_size() for x in tree.leaves((params, state)))
    return static + transient


@pytest.mark.parametrize(
    ("model", "strategy"),
    [(GPT_SMALL, "full"), (GPT_SMALL, "lora"), (finetune.Classifier(BERT_SMALL, 2), "last:1")],
    ids=["gpt-full", "gpt-lora", "bert-classifier-last1"],
)
def test_plan_is_within_15_percent_of_the_measured_peak(model: Any, strategy: str) -> None:
    plan = memory.plan(model, torch.float32, strategy, batch=4, seq_len=64)
    measured = _measured(model, strategy, 4, 64)
    assert abs(plan.peak - measured) <= 0.15 * measured, (plan.peak, measured)


@pytest.mark.parametrize(
    "model",
    [GPT_SMALL, LLAMA_SMALL, finetune.Classifier(BERT_SMALL, 2)],
    ids=["gpt", "llama", "bert-classifier"],
)
@pytest.mark.parametrize("checkpointing", [None, True])
def test_plan_with_checkpointing_is_within_15_percent(model: Any, checkpointing: Any) -> None:
    plan = memory.plan(model, torch.float32, "full", batch=4, seq_len=64,
                       checkpointing=checkpointing)  # fmt: skip
    measured = _measured(model, "full", 4, 64, checkpoint=checkpointing)
    assert abs(plan.peak - measured) <= 0.15 * measured, (plan.peak, measured)
    assert plan.settings["checkpointing"] == checkpointing


def test_checkpointing_lowers_the_planned_and_measured_activations() -> None:
    deep = GPT(vocab_size=500, n_layer=6, n_head=4, d_model=64, max_len=128)
    plain = memory.plan(deep, torch.float32, "full", batch=4, seq_len=128)
    remat = memory.plan(deep, torch.float32, "full", batch=4, seq_len=128, checkpointing=True)
    assert remat.activations < 0.6 * plain.activations, (remat.activations, plain.activations)
    assert remat.weights_trainable == plain.weights_trainable
    measured_plain = _measured(deep, "full", 4, 128)
    measured_remat = _measured(deep, "full", 4, 128, checkpoint=True)
    assert measured_remat < measured_plain
    assert (measured_plain - measured_remat) > 0.3 * (plain.activations)


def test_parts_add_up_to_the_trees() -> None:
    plan = memory.plan(GPT_SMALL, torch.float32, "last:1", batch=2, seq_len=32)
    params = GPT_SMALL.init(random.key(0))
    trainable, frozen = tree.partition(params, finetune.strategy("last:1", GPT_SMALL))
    nbytes = lambda t: sum(x.numel() * x.element_size() for x in tree.leaves(t))
    assert plan.weights_trainable == nbytes(trainable)
    assert plan.weights_frozen == nbytes(frozen)
    assert plan.gradients == plan.weights_trainable
    # AdamW keeps two moments per trainable leaf, and a step count
    assert 2 * nbytes(trainable) <= plan.optimizer <= 2 * nbytes(trainable) + 64
    assert plan.settings["trainable"] == tree.count(trainable)


def test_bf16_weights_halve_the_weights() -> None:
    full = memory.plan(GPT_SMALL, torch.float32, "full", batch=2, seq_len=32)
    half = memory.plan(GPT_SMALL, torch.bfloat16, "full", batch=2, seq_len=32)
    assert 2 * half.weights_frozen == full.weights_frozen
    assert 2 * half.weights_trainable == full.weights_trainable
    assert half.settings["dtype"] == "bfloat16"


def test_a_given_tree_is_planned_from_its_shapes() -> None:
    params = finetune.lora.init(random.key(1), GPT_SMALL.init(random.key(0)), rank=4)
    from_tree = memory.plan(GPT_SMALL, params, "lora", batch=2, seq_len=32)
    from_dtype = memory.plan(GPT_SMALL, torch.float32, "lora", batch=2, seq_len=32, lora_rank=4)
    assert from_tree.peak == from_dtype.peak
    trainable, _ = tree.partition(params, finetune.strategy("lora", GPT_SMALL))
    assert from_tree.settings["trainable"] == tree.count(trainable)


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 6))
def test_peak_grows_with_the_batch(batch: int) -> None:
    small = memory.plan(GPT_SMALL, torch.float32, "full", batch=batch, seq_len=32)
    large = memory.plan(GPT_SMALL, torch.float32, "full", batch=batch + 1, seq_len=32)
    assert large.activations > small.activations
    assert large.weights_trainable == small.weights_trainable


def test_plan_of_a_large_model_allocates_nothing() -> None:
    gpt2_xl = GPT(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_len=1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = memory.plan(gpt2_xl, torch.float32, "full", batch=1, seq_len=128)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert plan.weights_trainable > 5.5 * 2**30  # 1.56B float32 parameters
    assert grown_kib < 200 * 1024  # far less than one copy of the weights


def test_budget_advice_lists_changes_that_fit() -> None:
    full = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64)
    budget = int(full.peak * 0.7)
    plan = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64, budget=budget)
    assert not plan.fits(budget) and plan.advice
    assert any("LoRA" in a or "batch" in a for a in plan.advice)
    assert "| peak |" in plan.table() and plan.advice[0] in str(plan)
    roomy = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64, budget=2**40)
    assert roomy.advice == ()


def test_budget_advice_names_checkpointing_when_it_fits() -> None:
    full = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64)
    remat = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64, checkpointing=True)
    budget = (full.peak + remat.peak) // 2  # checkpointing fits, the plain step does not
    plan = memory.plan(GPT_SMALL, torch.float32, "full", batch=8, seq_len=64, budget=budget)
    assert any("checkpointing=True" in a for a in plan.advice), plan.advice
    with pytest.raises(ValueError, match="k >= 1"):
        memory.plan(GPT_SMALL, batch=1, seq_len=8, checkpointing=0)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="batch"):
        memory.plan(GPT_SMALL, batch=0, seq_len=8)
    with pytest.raises(TypeError, match="seq_len"):
        memory.plan(GPT_SMALL, batch=1, seq_len=8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len 64"):
        memory.plan(GPT_SMALL, batch=1, seq_len=65)
    with pytest.raises(TypeError, match="loss_fn"):
        memory.plan(BERT_SMALL, batch=1, seq_len=8)
    with pytest.raises(TypeError, match="floating"):
        memory.plan(GPT_SMALL, torch.int64, batch=1, seq_len=8)
    with pytest.raises(TypeError, match="parameter tree"):
        memory.plan(GPT_SMALL, "float32", batch=1, seq_len=8)
    with pytest.raises(ValueError, match="budget"):
        memory.plan(GPT_SMALL, batch=1, seq_len=8, budget=-1)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_plan_of_a_quantized_bf16_base_with_float32_adapters_is_within_15_percent(kind) -> None:
    pytest.importorskip("torchao")
    from fnllm import io

    params = finetune.lora.init(random.key(1), LLAMA_SMALL.init(random.key(0)), rank=8,
                                model=LLAMA_SMALL)  # fmt: skip
    trainable, frozen = tree.partition(params, finetune.strategy("lora", LLAMA_SMALL))
    frozen = io.quantize(tree.cast(frozen, torch.bfloat16), "blocks.*", kind)
    opt = optim.adamw(1e-4)
    state = opt.init(trainable)

    def loss_fn(tr: Any, fr: Any, b: Any, k: Any) -> torch.Tensor:
        logits = LLAMA_SMALL.apply(tree.combine(tr, fr), b["input_ids"], key=k, checkpoint=True)
        return losses.causal_lm(logits, b["input_ids"])

    data = {"input_ids": random.randint(random.key(2), (4, 64), 0, 500)}
    step = train.make_step(loss_fn, opt, compile=False, guard=False)
    step.inner(trainable, frozen, state, data, random.key(3), donate=True)
    _, transient = memory.measure(step.inner, trainable, frozen, state, data, random.key(3),
                                  donate=True)  # fmt: skip
    measured = memory.nbytes((trainable, frozen, state)) + transient
    plan = memory.plan(LLAMA_SMALL, torch.bfloat16, "lora", batch=4, seq_len=64,
                       checkpointing=True, quantize=("blocks.*", kind))  # fmt: skip
    assert plan.weights_frozen == memory.nbytes(frozen)  # the quantized bytes, not dense ones
    assert {x.dtype for x in tree.leaves(trainable)} == {torch.float32}
    assert plan.weights_trainable == memory.nbytes(trainable)
    assert abs(plan.peak - measured) <= 0.15 * measured, (plan.peak, measured)
