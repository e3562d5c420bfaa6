"""Tests for fnllm.interop's functions: as_jax, as_torch and training from JAX with optax."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fnllm import interop, losses, optim, tree  # noqa: E402
from fnllm import random as jr  # noqa: E402
from fnllm.models import GPT  # noqa: E402

GPT_TINY = GPT(vocab_size=48, n_layer=2, n_head=2, d_model=16, max_len=12)


def _loss(params, tokens):
    return losses.causal_lm(GPT_TINY.apply(params, tokens), tokens)


@pytest.fixture(scope="module")
def setup():
    params = GPT_TINY.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (3, 12), 0, GPT_TINY.vocab_size).to(torch.int32)
    return params, tokens


def _close(jax_tree, torch_tree, tol=1e-5):
    got = interop.from_jax(jax_tree)
    assert tree.structure_equal(got, torch_tree, shapes=True)
    for (path, a), b in zip(tree.flatten(got).items(), tree.leaves(torch_tree)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=path)


# ----------------------------------------------------------------------------- as_jax


def test_as_jax_grad_equals_torch_func_grad_eager_and_jitted(setup) -> None:
    params, tokens = setup
    expected_value = _loss(params, tokens)
    expected = torch.func.grad(_loss)(params, tokens)
    jloss = interop.as_jax(_loss)
    jp, jt = interop.to_jax(params), interop.to_jax(tokens)
    value, grads = jax.value_and_grad(jloss)(jp, jt)
    assert abs(float(value) - float(expected_value)) < 1e-6
    _close(grads, expected)
    _close(jax.jit(jax.grad(jloss))(jp, jt), expected)
    # without a transform it is just the function
    assert abs(float(jloss(jp, jt)) - float(expected_value)) < 1e-6


def test_as_jax_vjp_of_a_tree_output_equals_torch_func_vjp(setup) -> None:
    params, tokens = setup

    def heads(p, t):
        out = GPT_TINY.apply(p, t, output_hidden_states=True)
        return {"logits": out.logits, "last": out.hidden_states[-1], "n": (t > 3).sum().int()}

    ct = {
        "logits": jr.normal(jr.key(5), (3, 12, 48)),
        "last": jr.normal(jr.key(6), (3, 12, 16)),
    }

    def of_params(p):
        out = heads(p, tokens)
        return out["logits"], out["last"]

    out, vjp = torch.func.vjp(of_params, params)
    (expected,) = vjp((ct["logits"], ct["last"]))
    jheads = interop.as_jax(heads)
    jout, jvjp = jax.vjp(lambda p: jheads(p, interop.to_jax(tokens)), interop.to_jax(params))
    assert jout["n"].dtype == jnp.int32 and int(jout["n"]) == int((tokens > 3).sum())
    np.testing.assert_allclose(np.asarray(jout["logits"]), out[0].numpy(), rtol=1e-6)
    jct = {**interop.to_jax(ct), "n": np.zeros((), jax.dtypes.float0)}
    (grads,) = jvjp(jct)
    _close(grads, expected)


def test_as_jax_under_vmap_gives_per_example_gradients(setup) -> None:
    params, tokens = setup
    jloss = interop.as_jax(_loss)
    per_example = jax.vmap(jax.grad(jloss), in_axes=(None, 0))(
        interop.to_jax(params), interop.to_jax(tokens[:, None, :])
    )
    for i in range(tokens.shape[0]):  # a loop of single-example gradients in torch
        expected = torch.func.grad(_loss)(params, tokens[i : i + 1])
        _close(jax.tree_util.tree_map(lambda g, i=i: g[i], per_example), expected)
    # and the forward alone batches over the tokens too
    values = jax.vmap(jloss, in_axes=(None, 0))(
        interop.to_jax(params), interop.to_jax(tokens[:, None, :])
    )
    for i in range(tokens.shape[0]):
        assert abs(float(values[i]) - float(_loss(params, tokens[i : i + 1]))) < 1e-6


def _mlp_loss(p, x):
    return (torch.tanh(x @ p["w"] + p["b"]) ** 2).sum()


_jax_mlp = interop.as_jax(_mlp_loss)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 5),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_as_jax_grad_equals_torch_grad_for_any_shapes(m: int, n: int, k: int, seed: int) -> None:
    p = {"w": jr.normal(jr.key(seed), (n, k)), "b": jr.normal(jr.fold_in(jr.key(seed), 1), (k,))}
    x = jr.normal(jr.fold_in(jr.key(seed), 2), (m, n))
    expected = torch.func.grad(_mlp_loss, argnums=(0, 1))(p, x)
    got = jax.grad(_jax_mlp, argnums=(0, 1))(*interop.to_jax((p, x)))
    _close(got[0], expected[0])
    np.testing.assert_allclose(np.asarray(got[1]), expected[1].numpy(), rtol=1e-5, atol=1e-6)


def test_as_jax_takes_a_jax_key_for_fnllm_randomness() -> None:
    def dropped(w, key):  # an fnllm sampler inside the wrapped function
        return (w * jr.bernoulli(key, 0.5, w.shape)).sum()

    key = jr.key(9)
    g = jax.grad(interop.as_jax(dropped))(jnp.ones(16), interop.key_to_jax(key))
    np.testing.assert_array_equal(np.asarray(g), jr.bernoulli(key, 0.5, (16,)).float().numpy())


def test_as_jax_integer_inputs_get_float0_cotangents() -> None:
    f = interop.as_jax(lambda w, idx: w[idx.long()].sum())
    g_w, g_idx = jax.grad(f, argnums=(0, 1), allow_int=True)(jnp.ones(4), jnp.array([0, 0, 2]))
    assert np.asarray(g_w).tolist() == [2.0, 0.0, 1.0, 0.0]
    assert g_idx.dtype == jax.dtypes.float0
    # only an integer output: the cotangent of the float input is zero
    count = interop.as_jax(lambda w: (w > 0).sum().int())
    _, pull = jax.vjp(count, jnp.ones(3))
    (g,) = pull(np.zeros((), jax.dtypes.float0))
    assert np.asarray(g).tolist() == [0.0, 0.0, 0.0]


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: proves a leaf's gradient is never computed."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("gradient of a frozen argument was computed")


def _split_loss(trainable, frozen, x):
    w = _NoBackward.apply(frozen["w"])
    return (torch.tanh(x @ w @ trainable["v"]) ** 2).sum()


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_as_jax_argnums_differentiates_only_the_named_arguments(n: int, k: int, seed: int) -> None:
    t = {"v": jr.normal(jr.key(seed), (k, 2))}
    f = {"w": jr.normal(jr.fold_in(jr.key(seed), 1), (3, k))}
    x = jr.normal(jr.fold_in(jr.key(seed), 2), (n, 3))
    expected = torch.func.grad(lambda t: _split_loss(t, f, x))(t)
    jt, jf, jx = interop.to_jax((t, f, x))
    for argnums in (0, (0,), [0]):
        fn = interop.as_jax(_split_loss, argnums=argnums)
        _close(jax.grad(fn)(jt, jf, jx), expected)
        _close(jax.jit(jax.grad(fn))(jt, jf, jx), expected)
        # the arguments left out get zero cotangents, not PyTorch gradients
        g_f = jax.grad(fn, argnums=1)(jt, jf, jx)
        assert not np.asarray(g_f["w"]).any()
    # per-example gradients through vmap honour argnums too
    per = jax.vmap(jax.grad(interop.as_jax(_split_loss, argnums=0)), in_axes=(None, None, 0))
    got = per(jt, jf, jx[:, None, :])
    for i in range(n):
        want = torch.func.grad(_split_loss)(t, f, x[i : i + 1])
        np.testing.assert_allclose(np.asarray(got["v"][i]), want["v"].numpy(), rtol=1e-5, atol=1e-6)
    # without argnums every floating argument is differentiated: the frozen backward runs
    with pytest.raises(Exception, match="frozen argument was computed"):
        jax.grad(interop.as_jax(_split_loss))(jt, jf, jx)


def test_as_jax_argnums_errors() -> None:
    with pytest.raises(TypeError, match="argnums must be an int or a sequence"):
        interop.as_jax(_mlp_loss, argnums="0")
    with pytest.raises(TypeError, match="non-negative ints"):
        interop.as_jax(_mlp_loss, argnums=(0, -1))
    with pytest.raises(ValueError, match="names argument 2, but the call passes 2"):
        p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        interop.as_jax(_mlp_loss, argnums=(0, 2))(p, jnp.ones((1, 2)))


def test_as_jax_errors_name_the_culprit() -> None:
    with pytest.raises(TypeError, match=r"returned a float at output '<root>'"):
        interop.as_jax(lambda x: 1.5)(jnp.ones(2))
    with pytest.raises(TypeError, match=r"returned a str at output 'a\.1'"):
        interop.as_jax(lambda x: {"a": [x, "s"]})(jnp.ones(2))
    with pytest.raises(TypeError, match=r"argument '0\.w' is a str"):
        interop.as_jax(lambda p: p["w"])({"w": "x"})
    with pytest.raises(TypeError, match=r"output 'n' has dtype torch.int64.*jax_enable_x64"):
        interop.as_jax(lambda x: {"n": x.long()})(jnp.ones(2))


def test_as_jax_data_dependent_shape_under_jit_is_a_clear_error() -> None:
    positive = interop.as_jax(lambda x: x[x >= 0])  # found on zeros: shape (3,)
    with pytest.raises(Exception, match=r"output 0 changed from torch.float32\[3\] to"):
        jax.block_until_ready(jax.jit(positive)(jnp.array([1.0, -1.0, 2.0])))


# ----------------------------------------------------------------------------- as_torch


def _jax_mlp_loss(p, x, labels):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


@pytest.fixture(scope="module")
def mlp():
    p = {
        "w1": jr.normal(jr.key(1), (5, 8)),
        "b1": jr.normal(jr.key(2), (8,)),
        "w2": jr.normal(jr.key(3), (8, 3)),
    }
    x = jr.normal(jr.key(4), (6, 5))
    labels = jr.randint(jr.key(5), (6,), 0, 3).to(torch.int32)
    return p, x, labels


def test_as_torch_gradients_equal_jax_grad(mlp) -> None:
    p, x, labels = mlp
    expected = jax.grad(_jax_mlp_loss)(*interop.to_jax((p, x, labels)))
    f = interop.as_torch(_jax_mlp_loss)
    # loss.backward()
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss = f(leaves, x, labels)
    assert abs(loss.item() - float(_jax_mlp_loss(*interop.to_jax((p, x, labels))))) < 1e-6
    loss.backward()
    _close(expected, {k: v.grad for k, v in leaves.items()}, tol=1e-6)
    # torch.func.grad
    _close(expected, torch.func.grad(f)(p, x, labels), tol=1e-6)


def test_as_torch_tree_outputs_and_non_differentiable_integer_outputs() -> None:
    f = interop.as_torch(lambda w: {"y": jnp.sin(w) * 2, "k": jnp.argmax(w)})
    w = torch.tensor([0.3, 1.2, -0.4], requires_grad=True)
    out = f(w)
    assert out["k"].dtype == torch.int32 and int(out["k"]) == 1 and not out["k"].requires_grad
    (out["y"] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(w.grad, 2 * torch.cos(w.detach()) * torch.tensor([1.0, 2.0, 3.0]))


def test_as_torch_integer_inputs_between_float_inputs_get_no_gradient() -> None:
    f = interop.as_torch(lambda a, idx, b: jnp.sum(a[idx] * b))
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = torch.tensor([10.0, 20.0], requires_grad=True)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    ga, gb = torch.autograd.grad(f(a, idx, b), (a, b))
    assert ga.tolist() == [20.0, 0.0, 10.0] and gb.tolist() == [3.0, 1.0]


def test_as_torch_errors() -> None:
    f = interop.as_torch(lambda w: jnp.sum(w**2), jit=False)
    with pytest.raises(TypeError, match=r"argument '0\.a' is a float, not a tensor"):
        f({"a": 1.0})
    with pytest.raises(TypeError, match="jax_enable_x64"):
        f(torch.ones(2, dtype=torch.float64))
    w = torch.ones(2, requires_grad=True)
    (g,) = torch.autograd.grad(f(w), w, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        g.sum().backward()


# ----------------------------------------------------------------------------- training


def test_optax_training_matches_fnllm_adamw() -> None:
    gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_len=12)
    params = gpt.init(jr.key(0))
    # a learnable stream: counting modulo the vocabulary from random offsets
    starts = jr.randint(jr.key(1), (4, 1), 0, 32)
    tokens = ((starts + torch.arange(12)) % 32).to(torch.int32)
    batches = [tokens] * 12

    def loss_fn(p, t):
        return losses.causal_lm(gpt.apply(p, t), t)

    run = interop.train_optax(loss_fn, params, batches, optax.adamw(3e-2, weight_decay=0.1))
    opt = optim.adamw(3e-2, weight_decay=0.1)
    state, p, ours = opt.init(params), params, []
    for batch in batches:
        g, value = torch.func.grad_and_value(loss_fn)(p, batch)
        p, state = optim.step(opt, g, state, p)
        ours.append(float(value))
    np.testing.assert_allclose(run.losses, ours, rtol=1e-4, atol=1e-5)
    assert ours[-1] < 0.8 * ours[0]  # it learns, so the curves are not trivially equal
    # Adam divides by sqrt(v): entries whose gradients are ~0 amplify rounding, so the
    # parameters agree closely on average and loosely everywhere.
    diffs = torch.cat(
        [(a - b).abs().flatten() for a, b in zip(tree.leaves(run.params), tree.leaves(p))]
    )
    assert diffs.mean() < 1e-5 and diffs.max() < 1e-2
    assert tree.leaves(params)[0].data_ptr() != tree.leaves(run.params)[0].data_ptr()


def test_plot_loss_curves_draws_each_run(tmp_path) -> None:
    path = tmp_path / "curves.png"
    fig = interop.plot_loss_curves({"optax": [3.0, 2.0], "fnllm": [3.0, 2.1]}, path)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["optax", "fnllm"]
    assert list(lines[1].get_ydata()) == [3.0, 2.1]
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="run 'b' has no values"):
        interop.plot_loss_curves({"a": [1.0], "b": []})
