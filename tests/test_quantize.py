"""fnllm.io.quantize: a frozen NF4 / int8 base (torchao tensors as leaves), checked against
torchao's own dequantize-then-matmul, a LoRA run, checkpoints and the format's error bound."""

from __future__ import annotations

import builtins
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_bert, tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor, NF4Tensor
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

from fnllm import _quant, finetune, grads, io, losses, nn, optim, train, tree
from fnllm import random as jr
from fnllm.finetune import lora
from fnllm.models import Llama

TOKENS = jr.randint(jr.key(7), (2, 12), 1, 40)


def _llama() -> Llama:
    return Llama(vocab_size=40, n_layer=2, n_head=2, n_kv_head=1, d_model=64, d_ff=128,
                 max_len=16, tie_head=False)  # fmt: skip


def _quantized_paths(params) -> list[str]:
    return [p for p, x in tree.flatten(params).items() if _quant.is_quantized(x)]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_equals_torchaos_dequantize_then_matmul(dtype) -> None:
    w = (jr.normal(jr.key(0), (96, 128)) * 0.05).to(dtype)
    x = jr.normal(jr.key(1), (3, 5, 128)).to(dtype)
    b = jr.normal(jr.key(2), (96,)).to(dtype)
    q = io.quantize({"lin": {"weight": w, "bias": b}}, "lin", "nf4")["lin"]
    assert isinstance(q["weight"], NF4Tensor) and q["weight"].dtype == dtype
    got = nn.linear(q, x)
    torch.testing.assert_close(got, F.linear(x, q["weight"].get_original_weight()) + b)
    torch.testing.assert_close(got, linear_nf4(x, q["weight"]) + b)  # torchao's own op
    assert (got - F.linear(x, w, b)).abs().max() > 0  # it really is quantized


def test_int8_linear_equals_torchaos_dequantize_then_matmul() -> None:
    w, x = jr.normal(jr.key(0), (48, 64)), jr.normal(jr.key(1), (4, 64))
    q = io.quantize({"lin": {"weight": w}}, "lin", "int8")["lin"]["weight"]
    assert isinstance(q, Int8Tensor) and q.qdata.dtype == torch.int8
    torch.testing.assert_close(nn.linear({"weight": q}, x), F.linear(x, q.dequantize()))


@pytest.mark.parametrize("model", [tiny_gpt(), tiny_bert(), _llama()], ids=type)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_models_run_a_quantized_base_as_its_dequantized_twin(model, kind) -> None:
    params = model.init(jr.key(0))
    q = io.quantize(params, "blocks.*", kind)
    paths = _quantized_paths(q)
    assert paths and all(p.startswith("blocks.") and p.endswith(".weight") for p in paths)
    assert q["embed"]["tokens"]["weight"] is params["embed"]["tokens"]["weight"]  # shared
    out, ref = model.apply(q, TOKENS), model.apply(io.dequantize(q), TOKENS)
    out, ref = (o["hidden"] if isinstance(o, dict) else o for o in (out, ref))
    torch.testing.assert_close(out, ref)


def test_gradients_through_a_quantized_base_equal_the_dense_ones() -> None:
    model = _llama()
    q = lora.init(jr.key(1), io.quantize(model.init(jr.key(0)), "blocks", "nf4"), 4, model=model)
    dense = io.dequantize(q)
    tr, fr = tree.partition(q, finetune.strategy("lora", model))
    _, fr_dense = tree.partition(dense, finetune.strategy("lora", model))
    tr = tree.map(lambda x: x + 0.01, tr)  # B != 0: gradients reach both A and B

    def loss(t, f):
        return losses.causal_lm(model.apply(tree.combine(t, f), TOKENS), TOKENS)

    g = torch.func.grad(lambda t: loss(t, fr))(tr)
    g_dense = torch.func.grad(lambda t: loss(t, fr_dense))(tr)
    for p, v in tree.flatten(g).items():
        torch.testing.assert_close(v, tree.flatten(g_dense)[p], msg=p)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("checkpoint", [None, True])
def test_per_example_gradients_on_a_quantized_base_equal_a_loop_of_single_ones(
    kind, checkpoint
) -> None:
    model = _llama()
    q = lora.init(jr.key(1), io.quantize(model.init(jr.key(0)), "blocks", kind), 4, model=model)
    tr, fr = tree.partition(q, finetune.strategy("lora", model))
    tr = tree.map(lambda x: x + 0.01, tr)  # B != 0: gradients reach both A and B

    def loss(t, f, x):
        logits = model.apply(tree.combine(t, f), x, checkpoint=checkpoint)
        return losses.causal_lm(logits, x)

    got = grads.per_example(loss, in_dims=(None, None, 0))(tr, fr, TOKENS)
    chunked = grads.per_example(loss, in_dims=(None, None, 0), chunk_size=1)(tr, fr, TOKENS)
    for i in range(TOKENS.shape[0]):
        one = torch.func.grad(lambda t, i=i: loss(t, fr, TOKENS[i : i + 1]))(tr)
        for p, v in tree.flatten(one).items():
            torch.testing.assert_close(tree.flatten(got)[p][i], v, msg=p)
            torch.testing.assert_close(tree.flatten(chunked)[p][i], v, msg=p)
    # accumulate carries the quantized leaves through grad_and_value the same way
    _, g_acc = grads.accumulate(loss, micro_batches=2, in_dims=(None, None, 0))(tr, fr, TOKENS)
    g_full = torch.func.grad(lambda t: loss(t, fr, TOKENS))(tr)
    for p, v in tree.flatten(g_full).items():
        torch.testing.assert_close(tree.flatten(g_acc)[p], v, msg=p)


def test_quantized_leaves_in_the_wrong_argument_are_named() -> None:
    model = _llama()
    q = lora.init(jr.key(1), io.quantize(model.init(jr.key(0)), "blocks", "nf4"), 4, model=model)
    tr, fr = tree.partition(q, finetune.strategy("lora", model))

    def loss(t, f, x):
        return losses.causal_lm(model.apply(tree.combine(t, f), x), x)

    with pytest.raises(ValueError, match="differentiated but holds quantized"):
        grads.per_example(loss, argnums=(0, 1), in_dims=(None, None, 0))(tr, fr, TOKENS)
    with pytest.raises(ValueError, match="in_dims batches it"):
        grads.per_example(loss, in_dims=(None, 0, 0))(tr, fr, TOKENS)
    # plain torch.func.grad with the quantized tree as an argument wraps (and so hides) it
    with pytest.raises(ValueError, match="close over the frozen tree"):
        torch.func.grad(loss)(tr, fr, TOKENS)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_lowers_the_loss(kind) -> None:
    model = _llama()
    base = io.quantize(model.init(jr.key(0)), "blocks.*", kind)
    lp = lora.init(jr.key(1), base, rank=4, model=model)
    tr, fr = tree.partition(lp, finetune.strategy("lora", model))
    assert not _quantized_paths(tr) and len(_quantized_paths(fr)) == 14

    def loss_fn(t, f, batch, key):
        return losses.causal_lm(model.apply(tree.combine(t, f), batch), batch)

    opt = optim.adamw(1e-2)
    step, state = train.make_step(loss_fn, opt, compile=False), opt.init(tr)
    curve = []
    for i in range(8):
        tr, state, m = step(tr, fr, state, TOKENS, jr.key(i))
        curve.append(float(m["loss"]))
    assert curve[-1] < 0.8 * curve[0], curve
    assert all(
        fr_leaf is lp_leaf
        for fr_leaf, lp_leaf in zip(
            [x for x in tree.leaves(fr) if _quant.is_quantized(x)],
            [x for x in tree.leaves(lp) if _quant.is_quantized(x)],
        )
    )  # fmt: skip  -- the base is never touched


# ----------------------------------------------------------------------------- checkpoints


def _inner(x):
    kind, inner, meta = _quant.encode(x)
    return kind, {k: (v.dtype, v.shape, v.clone()) for k, v in inner.items()}, meta


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_save_and_load_round_trip_a_quantized_tree_bit_for_bit(kind) -> None:
    model = _llama()
    q = lora.init(jr.key(1), io.quantize(model.init(jr.key(0)), "blocks", kind), 4, model=model)
    path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
    io.save(path, q, meta={"kind": kind})
    back, meta = io.load(path, with_meta=True)
    assert meta == {"kind": kind} and tree.paths(back) == tree.paths(q)
    flat, flat_back = tree.flatten(q), tree.flatten(back)
    for p, x in flat.items():
        y = flat_back[p]
        assert type(y) is type(x) and y.dtype == x.dtype and y.shape == x.shape, p
        if _quant.is_quantized(x):
            (k1, i1, m1), (k2, i2, m2) = _inner(x), _inner(y)
            assert k1 == k2 and m1 == m2 and i1.keys() == i2.keys(), p
            for n in i1:
                assert i1[n][:2] == i2[n][:2] and torch.equal(i1[n][2], i2[n][2]), (p, n)
        else:
            assert torch.equal(x, y), p
    assert torch.equal(model.apply(back, TOKENS), model.apply(q, TOKENS))
    io.save_model(path, model, io.quantize(model.init(jr.key(0)), "blocks", kind))
    m2, p2 = io.load_model(path)
    assert m2 == model and _quantized_paths(p2) == _quantized_paths(back)


def test_a_corrupt_quantized_entry_is_named(monkeypatch) -> None:
    q = io.quantize({"lin": {"weight": torch.randn(8, 64)}}, "lin", "nf4")
    path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
    io.save(path, q)
    real = _quant.decode
    monkeypatch.setattr(_quant, "decode", lambda k, i, m: real(k, i, {**m, "dtype": "nope"}))
    with pytest.raises(ValueError, match=r"corrupt quantized leaf 'lin.weight'"):
        io.load(path)


# ----------------------------------------------------------------------------- bad inputs


def test_quantize_names_bad_inputs() -> None:
    model = _llama()
    params = model.init(jr.key(0))
    with pytest.raises(ValueError, match=r"unknown kind 'nf3'.*\['nf4', 'int8'\]"):
        io.quantize(params, "blocks.*", "nf3")
    with pytest.raises(ValueError, match=r"glob 'blokcs.\*' matches no linear layer"):
        io.quantize(params, "blokcs.*", "nf4")
    with pytest.raises(ValueError, match=r"selects blocks.0.attn_norm.weight \(shape \(64,\)\), "
                       "which is not a linear layer's 2-D weight"):  # fmt: skip
        io.quantize(params, "blocks.0.attn_norm.weight", "nf4")
    with pytest.raises(ValueError, match=r"embed.tokens is an embedding table"):
        io.quantize(params, "embed", "nf4")
    with pytest.raises(ValueError, match=r"head is an embedding table or the language-model"):
        io.quantize(params, "head", "int8")
    with pytest.raises(TypeError, match=r"globs must be a glob string"):
        io.quantize(params, [], "nf4")
    odd = {"lin": {"weight": torch.randn(3, 5)}}
    with pytest.raises(ValueError, match=r"lin.weight has 15 weights \(3, 5\), not a multiple"):
        io.quantize(odd, "lin", "nf4")
    assert _quantized_paths(io.quantize(odd, "lin", "int8")) == ["lin.weight"]  # int8: any size
    with pytest.raises(TypeError, match=r"lin.weight is torch.int64, not a floating weight"):
        io.quantize({"lin": {"weight": torch.ones(2, 64, dtype=torch.long)}}, "lin", "int8")
    q = io.quantize(params, "blocks.0", "nf4")
    with pytest.raises(ValueError, match=r"blocks.0.attn.k.weight is already quantized \(nf4\)"):
        io.quantize(q, "blocks.*", "int8")
    with pytest.raises(TypeError, match=r"floating torch.dtype"):
        io.dequantize(q, torch.int8)


def test_a_quantized_leaf_can_not_be_trainable() -> None:
    model = _llama()
    q = io.quantize(model.init(jr.key(0)), "blocks.*.mlp", "nf4")
    with pytest.raises(ValueError, match=r"selects quantized weights, which can not train "
                       r"\(blocks.0.mlp.down.weight"):  # fmt: skip
        tree.partition(q, "*")
    with pytest.raises(ValueError, match=r"quantized weights"):
        tree.partition(q, finetune.strategy("last:1", model))
    tr, _ = tree.partition(q, "head")  # what is not quantized still trains
    assert tree.paths(tr) == ["head.weight"]


def test_lora_merge_refuses_a_quantized_base_and_names_the_explicit_way() -> None:
    model = _llama()
    q = lora.init(jr.key(1), io.quantize(model.init(jr.key(0)), "blocks", "nf4"), 4, model=model)
    with pytest.raises(ValueError, match=r"is quantized \(nf4\).*lora.merge\(io.dequantize"):
        lora.merge(q)
    merged = lora.merge(io.dequantize(q))
    assert not _quantized_paths(merged)
    torch.testing.assert_close(model.apply(merged, TOKENS), model.apply(q, TOKENS))


def test_tree_cast_keeps_quantized_leaves_packed() -> None:
    q = io.quantize({"lin": {"weight": torch.randn(8, 64), "bias": torch.zeros(8)}}, "lin", "nf4")
    cast = tree.cast(q, torch.bfloat16)
    assert cast["lin"]["weight"] is q["lin"]["weight"]
    assert cast["lin"]["bias"].dtype == torch.bfloat16


def test_without_torchao_quantize_names_the_extra(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ImportError, match=r"pip install 'fnllm\[quant\]'"):
        io.quantize({"lin": {"weight": torch.randn(8, 64)}}, "lin", "nf4")


# ----------------------------------------------------------------------------- properties

_SHAPES = st.tuples(st.integers(1, 6), st.sampled_from([64, 128, 192]))


@settings(max_examples=25, deadline=None)
@given(_SHAPES, st.integers(0, 2**31 - 1), st.floats(1e-3, 10.0))
def test_nf4_error_is_within_the_formats_bound(shape, seed, scale) -> None:
    w = jr.normal(jr.key(seed), shape) * scale
    q = io.quantize({"l": {"weight": w}}, "l", "nf4")["l"]["weight"]
    err = (io.dequantize({"w": q})["w"] - w).abs().reshape(-1, _quant.NF4_BLOCK)
    absmax = w.abs().reshape(-1, _quant.NF4_BLOCK).amax(dim=1, keepdim=True)  # the block scale
    stored = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor,
                                  q.scaler_block_size).reshape(-1, 1)  # fmt: skip
    # half the widest gap between NF4 levels (-1 and -0.6962), plus the 8-bit scale's error
    bound = 0.1519 * absmax + (absmax - stored).abs() + 1e-6 * absmax
    assert bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=25, deadline=None)
@given(_SHAPES, st.integers(0, 2**31 - 1), st.floats(1e-3, 10.0))
def test_int8_error_is_within_half_a_step_per_row(shape, seed, scale) -> None:
    w = jr.normal(jr.key(seed), shape) * scale
    q = io.quantize({"l": {"weight": w}}, "l", "int8")["l"]["weight"]
    err = (io.dequantize({"w": q})["w"] - w).abs()
    step = w.abs().amax(dim=1, keepdim=True) / 127.5  # symmetric: [-max, max] over 255 steps
    # float32 rounding of w / scale and q * scale: a few ulps of values up to 127.5 steps
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-7).all()), float((err / step).max())
