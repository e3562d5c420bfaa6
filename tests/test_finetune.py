"""fnllm.finetune: the Classifier and the strategies (which leaves train, and what that costs)."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from fnllm import losses, optim, train, tree
from fnllm import random as jr
from fnllm.finetune import Classifier, frozen_prefix, lora, strategy
from fnllm.models import BERT, GPT


def _gpt(n_layer: int = 3, tie_head: bool = True) -> GPT:
    return tiny_gpt(n_layer=n_layer, tie_head=tie_head)


def _bert(n_layer: int = 3, heads: bool = True) -> BERT:
    return tiny_bert(n_layer=n_layer, mlm_head=heads, pair_head=heads)


def _selected(model, params, name) -> set[str]:
    trainable, frozen = tree.partition(params, strategy(name, model))
    assert set(tree.paths(trainable)) | set(tree.paths(frozen)) == set(tree.paths(params))
    return set(tree.paths(trainable))


def _expected(paths, keep) -> set[str]:
    return {p for p in paths if keep(p.split("."))}


MODELS = {
    "gpt": _gpt(),
    "gpt_untied": _gpt(tie_head=False),
    "bert": _bert(),
    "clf_bert_cls": Classifier(_bert(heads=False), n_classes=3, pooling="cls"),
    "clf_bert_mean": Classifier(_bert(heads=False), n_classes=3, pooling="mean"),
    "clf_gpt_last": Classifier(_gpt(), n_classes=1, pooling="last"),
}


def _head_of(model, parts: list[str]) -> bool:
    if isinstance(model, Classifier):
        return parts[0] == "head"
    if isinstance(model, GPT):
        return parts[0] in ("ln_f", "head")
    return parts[0] in ("pooler", "mlm", "sop")


@pytest.mark.parametrize("which", sorted(MODELS))
@pytest.mark.parametrize("name", ["full", "head", "last:1", "last:2", "bitfit", "lora"])
def test_each_strategy_selects_exactly_the_intended_leaves(which, name):
    model = MODELS[which]
    params = model.init(jr.key(0))
    if name == "lora":
        params = lora.init(jr.key(1), params, rank=2, targets=["*.attn.qkv"])
    paths = tree.paths(params)
    clf = isinstance(model, Classifier)
    base = model.base if clf else model

    def block_of(parts):
        rest = parts[1:] if clf and parts[0] == "base" else parts
        return int(rest[1]) if rest[0] == "blocks" else None

    def is_head(parts):
        return _head_of(model, parts)

    if name == "full":
        want = _expected(paths, lambda p: p[-1] != "lora_scale")
    elif name == "head":
        want = _expected(paths, is_head)
    elif name.startswith("last:"):
        n = int(name[5:])

        def keep(p):
            b = block_of(p)
            if b is not None:
                return b >= base.n_layer - n
            core = p[1:] if clf and p[0] == "base" else p
            if clf and p[0] == "base":
                pooler = model.pooling == "cls" and core[0] == "pooler"
                return core[0] == "ln_f" or pooler
            return is_head(p)

        want = _expected(paths, keep)
    elif name == "bitfit":
        want = _expected(paths, lambda p: p[-1] == "bias" or is_head(p))
    else:
        want = _expected(paths, lambda p: p[-1] in ("lora_a", "lora_b") or is_head(p))
    assert _selected(model, params, name) == want
    assert want  # the comparison is not vacuous


def test_glob_lists_pass_through():
    model = MODELS["clf_gpt_last"]
    params = model.init(jr.key(0))
    assert _selected(model, params, ["head", "base.ln_f"]) == {
        "head.weight",
        "head.bias",
        "base.ln_f.weight",
        "base.ln_f.bias",
    }
    assert _selected(model, params, "base.blocks.0.attn.*") == {
        "base.blocks.0.attn.qkv.weight",
        "base.blocks.0.attn.qkv.bias",
        "base.blocks.0.attn.proj.weight",
        "base.blocks.0.attn.proj.bias",
    }


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fulll", "unknown name 'fulll'; choose one of"),
        ("last:0", "N must be in [1, 3]"),
        ("last:4", "N must be in [1, 3]"),
        ("last:-1", "N must be in [1, 3]"),
        ("last:x", "N must be an integer"),
        ([], "non-empty"),
    ],
)
def test_bad_strategy_names_raise_naming_the_choices(name, message):
    with pytest.raises(ValueError, match="strategy: ") as err:
        strategy(name, MODELS["clf_bert_cls"])
    assert message in str(err.value)


def test_strategy_refuses_a_non_model():
    with pytest.raises(TypeError, match="Classifier, GPT or BERT"):
        strategy("full", object())


# ----------------------------------------------------------------------------- the Classifier


@pytest.mark.parametrize("which", ["clf_bert_cls", "clf_bert_mean", "clf_gpt_last"])
def test_prefix_then_apply_from_equals_apply_at_every_layer(which):
    model = MODELS[which]
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (3, 7), 1, 40)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    full = model.apply(params, tokens, mask)
    for k in range(model.n_layer + 1):
        h = model.prefix(params, tokens, k, mask)
        torch.testing.assert_close(model.apply_from(params, h, k, mask), full)


@given(st.integers(1, 6), st.integers(0, 4))
def test_pooling_ignores_padding_like_a_loop_over_unpadded_rows(n_real, n_pad):
    """A padded row gives the logits of the same row alone, unpadded (GPT last, BERT mean)."""
    for which in ("clf_gpt_last", "clf_bert_mean"):
        model = MODELS[which]
        params = model.init(jr.key(0))
        ids = jr.randint(jr.key(n_real), (1, n_real), 1, 40)
        alone = model.apply(params, ids)
        padded = torch.cat([ids, torch.zeros(1, n_pad, dtype=ids.dtype)], 1)
        mask = (torch.arange(n_real + n_pad) < n_real)[None]
        torch.testing.assert_close(model.apply(params, padded, mask), alone)


def test_bert_cls_pooling_matches_transformers_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fnllm import io

    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.bert.save_pretrained(tmp_path)
    bert, base = io.from_hf(tmp_path)
    clf = Classifier(bert, n_classes=3, pooling="cls")
    params = clf.init(jr.key(0), base_params=base)
    params["head"] = {
        "weight": hf.classifier.weight.detach().clone(),
        "bias": hf.classifier.bias.detach().clone(),
    }
    tokens = jr.randint(jr.key(1), (2, 6), 1, 40)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
    torch.testing.assert_close(clf.apply(params, tokens, mask), want, atol=1e-5, rtol=1e-5)


def test_classifier_rejects_bad_input():
    model = MODELS["clf_bert_cls"]
    params = model.init(jr.key(0))
    with pytest.raises(ValueError, match="tokens: id 40 at"):
        model.apply(params, torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="sequence length 17 > max_len 16"):
        model.apply(params, torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: shape"):
        model.apply(params, torch.ones(1, 4, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(KeyError, match="expected keys"):
        model.apply(params["base"], torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pooling must be one of"):
        Classifier(_gpt(), pooling="max")
    with pytest.raises(ValueError, match="n_classes"):
        Classifier(_gpt(), n_classes=0)


def test_init_keeps_the_pretrained_base_and_checks_it():
    gpt = _gpt()
    base = gpt.init(jr.key(3))
    params = Classifier(gpt).init(jr.key(0), base_params=base)
    assert params["base"] is base
    del base["ln_f"]
    with pytest.raises(KeyError, match="ln_f"):
        Classifier(gpt).init(jr.key(0), base_params=base)


# ----------------------------------------------------------------------------- cost and training


def _clf(n_layer: int) -> Classifier:
    return Classifier(_bert(n_layer, heads=False), n_classes=2, pooling="mean")


def _loss_fn(model):
    def loss_fn(trainable, frozen, batch, key):
        logits = model.apply(tree.combine(trainable, frozen), batch["tokens"])
        return losses.classification(logits, batch["labels"])

    return loss_fn


def _batch(step: int = 0) -> dict[str, torch.Tensor]:
    k = jr.fold_in(jr.key(5), step)
    return {"tokens": jr.randint(k, (4, 12), 1, 40), "labels": jr.randint(k, (4,), 0, 2)}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _step_and_forward_flops(n_layer: int, name: str) -> tuple[int, int]:
    model = _clf(n_layer)
    params = model.init(jr.key(0))
    trainable, frozen = tree.partition(params, strategy(name, model))
    opt = optim.adamw(1e-3)
    step = train.make_step(_loss_fn(model), opt, compile=False)
    state = opt.init(trainable)
    batch = _batch()
    return (
        _flops(lambda: step(trainable, frozen, state, batch, jr.key(0))),
        _flops(lambda: _loss_fn(model)(trainable, frozen, batch, None)),
    )


def test_frozen_blocks_below_last_n_cost_only_their_forward():
    step2, fwd2 = _step_and_forward_flops(2, "last:1")
    step4, fwd4 = _step_and_forward_flops(4, "last:1")
    assert fwd4 > fwd2
    assert step4 - step2 == fwd4 - fwd2


def test_full_finetuning_pays_backward_for_every_block():
    step2, fwd2 = _step_and_forward_flops(2, "full")
    step4, fwd4 = _step_and_forward_flops(4, "full")
    assert step4 - step2 >= 2.5 * (fwd4 - fwd2)


@pytest.mark.parametrize("name", ["head", "last:1", "bitfit", "lora"])
def test_frozen_leaves_are_bit_identical_after_training(name):
    model = _clf(2)
    params = model.init(jr.key(0))
    if name == "lora":
        params = lora.init(jr.key(1), params, rank=2)
    trainable, frozen = tree.partition(params, strategy(name, model))
    before = {p: x.clone() for p, x in tree.flatten(frozen).items()}
    res = train.fit(
        _loss_fn(model),
        optim.adamw(1e-2, weight_decay=0.1),
        trainable,
        frozen,
        _batch,
        key=jr.key(0),
        steps=3,
        compile=False,
        progress=False,
    )
    for path, x in tree.flatten(frozen).items():
        assert torch.equal(x, before[path]), path
    moved = [
        p
        for p, x in tree.flatten(res.trainable).items()
        if not torch.equal(x, tree.flatten(trainable)[p])
    ]
    assert moved


def test_frozen_prefix_counts_the_untouched_bottom_blocks():
    model = _clf(4)
    params = model.init(jr.key(0))
    got = {n: frozen_prefix(model, params, strategy(n, model)) for n in ("head", "last:2", "full")}
    assert got == {"head": 4, "last:2": 2, "full": 0}
    assert frozen_prefix(model, params, strategy("bitfit", model)) == 0  # embed.ln.bias
    lp = lora.init(jr.key(1), params, rank=2, targets=["*.blocks.3.attn.qkv"])
    assert frozen_prefix(model, lp, strategy("lora", model)) == 3


@pytest.mark.parametrize("model", [_gpt(), _bert()])
def test_apply_blocks_resumes_the_forward_and_checks_its_range(model):
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 5), 1, 40)
    out = model.apply(params, tokens, output_hidden_states=True)
    x = model.embed(params, tokens)
    torch.testing.assert_close(x, out.hidden_states[0])
    h1 = model.apply_blocks(params, x, stop=1)
    torch.testing.assert_close(h1, out.hidden_states[1])
    torch.testing.assert_close(
        model.apply_blocks(params, h1, start=1, stop=2), out.hidden_states[2]
    )
    with pytest.raises(ValueError, match="start 2 <= stop 1"):
        model.apply_blocks(params, x, start=2, stop=1)
    with pytest.raises(ValueError, match="stop 9"):
        model.apply_blocks(params, x, stop=9)
