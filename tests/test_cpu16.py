"""16-bit products on a CPU without 16-bit matrix units (fnllm._cpu16): float32 inside, same
results as the 16-bit kernels up to rounding, no more memory kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import _cpu16, finetune, losses, nn, tree
from fnllm import random as jr
from fnllm.finetune import lora
from fnllm.models import Llama

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def no_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the float32 route whatever this CPU has."""
    monkeypatch.setattr(_cpu16, "_native_units", lambda dtype: False)


@pytest.fixture
def units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the plain 16-bit route (as on a CPU with AVX512-BF16 / AMX)."""
    monkeypatch.setattr(_cpu16, "_native_units", lambda dtype: True)


def _draw(seed: int, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0):
    return (jr.normal(jr.key(seed), shape) * scale).to(dtype)


def test_which_products_take_the_float32_route(no_units: None) -> None:
    a, b = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4, 3, dtype=torch.bfloat16)
    assert _cpu16.upcasts(a, b)
    assert _cpu16.upcasts(a.half(), b.half())
    assert not _cpu16.upcasts(a.float(), b.float())  # float32: nothing to do
    assert not _cpu16.upcasts(a, b.half())  # mixed dtypes: nn.linear casts before asking
    assert not _cpu16.upcasts(a.to("meta"), b.to("meta"))  # only the CPU


def test_a_cpu_with_16_bit_units_keeps_the_16_bit_kernels(units: None) -> None:
    x, w = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)
    assert not _cpu16.upcasts(x, w)
    assert torch.equal(nn.linear({"weight": w}, x), F.linear(x, w))


@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 40),
    block=st.integers(1, 64),
    dtype=st.sampled_from(HALF),
    seed=st.integers(0, 2**20),
)
def test_blocked_products_equal_float32_products_rounded(
    lead: list[int], n_in: int, n_out: int, block: int, dtype: torch.dtype, seed: int
) -> None:
    # any block size (one row of the weight per block up to all of them at once)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cpu16, "_BLOCK_VALUES", block)
        x = _draw(seed, (*lead, n_in), dtype)
        w = _draw(seed + 1, (n_out, n_in), dtype)
        g = _draw(seed + 2, (*lead, n_out), dtype)
        want = F.linear(x.float(), w.float())
        got = _cpu16.matmul_t(x, w)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want.to(dtype))  # 16-bit tolerances
        torch.testing.assert_close(_cpu16.matmul(g, w), (g.float() @ w.float()).to(dtype))
        gw = g.float().reshape(-1, n_out).T @ x.float().reshape(-1, n_in)
        torch.testing.assert_close(_cpu16.weight_grad(g, x), gw.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("trainable", [False, True])
def test_linear_gradients_match_the_16_bit_layer(
    no_units: None, dtype: torch.dtype, trainable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cpu16, "_BLOCK_VALUES", 5 * 16)  # 5 rows of the weight per block
    x = _draw(0, (3, 4, 16), dtype).requires_grad_()
    w = _draw(1, (12, 16), dtype, 0.2).requires_grad_(trainable)
    b = _draw(2, (12,), dtype)
    y = nn.linear({"weight": w, "bias": b}, x)
    g = _draw(3, tuple(y.shape), dtype)
    got = torch.autograd.grad(y, (x, w) if trainable else (x,), g)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_(trainable)
    y32 = F.linear(x32, w32)
    want = torch.autograd.grad(y32, (x32, w32) if trainable else (x32,), g.float())
    torch.testing.assert_close(y, y32.to(dtype) + b)  # the product rounded, then the bias
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.to(dtype))  # 16-bit tolerances


def test_a_frozen_weight_keeps_no_more_for_backward_than_f_linear(no_units: None) -> None:
    x = _draw(0, (8, 32), torch.bfloat16).requires_grad_()
    w = _draw(1, (64, 32), torch.bfloat16)  # frozen: F.linear keeps w only

    def saved(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
        kept: list[tuple[tuple[int, ...], torch.dtype]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return kept

    ours = saved(lambda: nn.linear({"weight": w}, x))
    assert ours == [((64, 32), torch.bfloat16)]  # the 16-bit weight, no float32 copy, no x
    trained = w.clone().requires_grad_()
    assert sorted(saved(lambda: nn.linear({"weight": trained}, x))) == sorted(
        [((64, 32), torch.bfloat16), ((8, 32), torch.bfloat16)]
    )


def test_per_example_gradients_and_compile(no_units: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu16, "_BLOCK_VALUES", 3 * 8)  # several blocks: the vmap route
    w = _draw(0, (10, 8), torch.bfloat16)
    xs = _draw(1, (4, 8), torch.bfloat16)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return nn.linear({"weight": w}, x).float().square().sum()

    per = torch.func.vmap(torch.func.grad(loss))(xs)
    loop = torch.stack([torch.func.grad(loss)(x) for x in xs])
    assert torch.equal(per, loop)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(xs[0]), loop[0])


def test_attention_in_float32_where_nothing_is_kept_for_backward(no_units: None) -> None:
    q = _draw(0, (2, 4, 6, 8), torch.bfloat16)
    k = _draw(1, (2, 2, 6, 8), torch.bfloat16)  # grouped-query
    v = _draw(2, (2, 2, 6, 8), torch.bfloat16)
    y = nn.dot_product_attention(q, k, v, causal=True, impl="sdpa")
    y32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                         enable_gqa=True)  # fmt: skip
    assert torch.equal(y, y32.to(torch.bfloat16))  # the float32 product, rounded once
    # with a backward pass: PyTorch's 16-bit kernel, which keeps half the bytes
    qg = q.clone().requires_grad_()
    yg = nn.dot_product_attention(qg, k, v, causal=True, impl="sdpa")
    native = F.scaled_dot_product_attention(qg, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(yg, native)
    g = _draw(3, tuple(yg.shape), torch.bfloat16)
    assert torch.equal(torch.autograd.grad(yg, qg, g)[0], torch.autograd.grad(native, qg, g)[0])


def test_a_bf16_llama_with_lora_trains_alike_on_both_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Llama(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                  max_len=16, tie_head=True)  # fmt: skip
    base = tree.cast(model.init(jr.key(0)), torch.bfloat16)
    lp = lora.init(jr.key(1), base, rank=4, model=model)
    trainable, frozen = tree.partition(lp, finetune.strategy("lora", model))
    seeds = iter(range(100, 1000))  # B starts at zero: give every adapter leaf a value
    trainable = tree.map(
        lambda t: jr.normal(jr.key(next(seeds)), tuple(t.shape)) * 0.1,
        tree.cast(trainable, torch.float32),
    )
    tokens = jr.randint(jr.key(2), (2, 12), 0, 96)

    def loss(tr: object) -> torch.Tensor:
        return losses.causal_lm(model.apply(tree.combine(tr, frozen), tokens).float(), tokens)

    out = {}
    for route, native in (("float32", False), ("16-bit", True)):
        monkeypatch.setattr(_cpu16, "_native_units", lambda dtype, native=native: native)
        out[route] = torch.func.grad_and_value(loss)(trainable)
    (g32, l32), (g16, l16) = out["float32"], out["16-bit"]
    assert abs(float(l32) - float(l16)) < 2e-2 * float(l16)
    for a, b in zip(tree.leaves(g32), tree.leaves(g16)):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
