"""fnllm.optim outside fit: NaN/inf gradients and negative schedule rates refused."""

from __future__ import annotations

import pytest
import torch

from fnllm import optim


@pytest.mark.parametrize("make", [optim.adamw, optim.adam], ids=["adamw", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_eager_adam_step_refuses_a_non_finite_gradient(make, bad):
    params = {"a": torch.ones(2), "b": {"w": torch.ones(3)}}
    opt = make(1e-3)
    state = opt.init(params)
    grads = {"a": torch.ones(2), "b": {"w": torch.tensor([0.0, bad, 1.0])}}
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"grads b\.w holds {kind}"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match=rf"grads b\.w holds {kind}"):
        optim.apply_gradients(opt, grads, state, params)
    assert torch.equal(params["b"]["w"], torch.ones(3))  # untouched


@pytest.mark.parametrize("make", [optim.adamw, optim.adam, optim.sgd], ids=["adamw", "adam", "sgd"])
@pytest.mark.parametrize("rate", [-0.1, float("nan"), -1])
def test_a_schedule_returning_a_bad_python_number_is_refused(make, rate):
    params = {"w": torch.ones(2)}
    opt = make(lambda count: rate)
    with pytest.raises(ValueError, match="lr at step 0"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)


def test_a_schedule_returning_a_function_is_refused():
    params = {"w": torch.ones(2)}
    opt = optim.adamw(lambda count: lambda: 0.1)
    with pytest.raises(TypeError, match="the schedule returned a function"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)
