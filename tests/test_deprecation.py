"""Every deprecated alias still works, warns once per process with a DeprecationWarning that
names its replacement and the release that removes it, and points at the caller's line
(docs/deprecation.md lists them)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import tiny_bert

from fnllm import _deprecation, distributed, models, optim, testing, train
from fnllm import random as jr
from fnllm.models import BERT


def _warns_once(call: Callable[[], Any], old: str, new: str) -> Any:
    """Run ``call`` twice: the first run warns (from this file), the second is silent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call()
        second = call()
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert message.startswith(f"{old} is deprecated"), message
    assert f"removed in fnllm {_deprecation.REMOVAL}" in message and f"use {new}" in message
    assert ours[0].filename == __file__, f"warning points at {ours[0].filename}"
    return first, second


def test_deprecated_warns_once_per_name() -> None:
    _warns_once(lambda: _deprecation.deprecated("f(x=)", "f(y=)", stacklevel=1), "f(x=)", "f(y=)")
    with pytest.warns(DeprecationWarning, match="g is deprecated"):  # another name warns too
        _deprecation.deprecated("g", "h")


def test_optim_step_is_apply_gradients() -> None:
    opt = optim.adamw(0.1)
    params = {"w": torch.tensor([1.0, -2.0])}
    grads = {"w": torch.tensor([0.5, 0.25])}
    state = opt.init(params)
    old, _ = _warns_once(
        lambda: optim.step(opt, grads, state, params), "optim.step", "optim.apply_gradients"
    )
    testing.assert_trees_equal(old, optim.apply_gradients(opt, grads, state, params))


def test_bert_sop_names_are_pair_names() -> None:
    bert = tiny_bert()
    params = bert.init(jr.key(0))
    tokens = torch.tensor([[1, 2, 3, 4]])
    out = bert.pretrain_apply(params, tokens)
    got, _ = _warns_once(lambda: out.sop_logits, "BertPretrainOutput.sop_logits", "pair_logits")
    assert got is out.pair_logits
    pooled = bert.apply(params, tokens).pooled
    got, _ = _warns_once(
        lambda: bert.sop_logits(params, pooled), "BERT.sop_logits", "BERT.pair_logits"
    )
    assert torch.equal(got, bert.pair_logits(params, pooled))


def test_bert_sop_head_field_is_pair_head() -> None:
    shape = tiny_bert().to_config()
    del shape["type"], shape["pair_head"]
    old, _ = _warns_once(lambda: BERT(**shape, sop_head=False), "BERT(sop_head=...)", "pair_head")
    assert old == tiny_bert(pair_head=False)
    got, _ = _warns_once(lambda: old.sop_head, "BERT.sop_head", "pair_head")
    assert got is False


def test_saved_configs_with_old_field_names_load_silently() -> None:
    """Files outlive code: reading an old config is not deprecated (docs/deprecation.md)."""
    config = tiny_bert(pair_head=False).to_config()
    config["sop_head"] = config.pop("pair_head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.from_config(config) == BERT.from_config(config) == tiny_bert(pair_head=False)


def test_train_step_optimizer_is_gradient_transformation() -> None:
    from fnllm.train import step as step_module

    got, _ = _warns_once(
        lambda: step_module.Optimizer,
        "fnllm.train.step.Optimizer",
        "fnllm.optim.GradientTransformation",
    )
    assert got is optim.GradientTransformation
    with pytest.raises(AttributeError, match="no attribute 'Optimiser'"):
        step_module.Optimiser  # noqa: B018


def _loss(trainable: Any, frozen: Any, batch: torch.Tensor, key: Any) -> torch.Tensor:
    return ((trainable["w"] * batch) ** 2).mean()


@pytest.mark.parametrize("fit", [train.fit, distributed.fit], ids=["train", "distributed"])
def test_fit_old_checkpoint_keywords_warn_and_checkpoint(fit: Any, tmp_path: Path) -> None:
    opt = optim.sgd(0.1)
    runs = iter([tmp_path / "a", tmp_path / "b"])

    def run() -> Any:
        return fit(
            _loss, opt, {"w": torch.ones(3)}, {}, lambda step: torch.ones(3),
            key=jr.key(0), steps=4, progress=False, checkpoint_dir=next(runs),
            checkpoint_every=2, keep=1,
        )  # fmt: skip

    old, _ = _warns_once(
        run,
        "fit(checkpoint_dir=, checkpoint_every=, keep=)",
        "fit(checkpoint=train.Checkpointing(directory, every=..., keep=...))",
    )
    new = fit(
        _loss, opt, {"w": torch.ones(3)}, {}, lambda step: torch.ones(3), key=jr.key(0),
        steps=4, progress=False, checkpoint=train.Checkpointing(tmp_path / "c", every=2, keep=1),
    )  # fmt: skip
    assert torch.equal(old.trainable["w"], new.trainable["w"])
    for d in ("a", "b", "c"):
        assert [p.name for p in (tmp_path / d).iterdir()] == ["step_00000004.safetensors"]
