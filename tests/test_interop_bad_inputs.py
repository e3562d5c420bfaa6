"""fnllm.interop on bad inputs: no silent narrowing, named data-dependent shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = jax.numpy

from fnllm import interop  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(jax.config.jax_enable_x64), reason="these cases are about jax_enable_x64 off"
)


def _double(x):
    return x.float() * 2


@pytest.mark.parametrize(
    "value",
    [
        np.array([1, 2**40], dtype=np.int64),
        np.int64(2**40),
        2**40,
        np.array([-(2**33)]),
        np.array([2**32], dtype=np.uint64),
    ],
    ids=["array", "np-scalar", "python-int", "negative", "uint64"],
)
def test_int64_values_that_do_not_fit_int32_are_refused_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"argument '0' holds -?\d+, which does not fit u?int32"):
        interop.as_jax(_double)(value)


def test_int64_values_that_fit_are_passed_as_int32_exactly():
    got = interop.as_jax(lambda x: x)(np.array([3, -(2**31), 2**31 - 1], dtype=np.int64))
    assert got.dtype == jnp.int32 and np.asarray(got).tolist() == [3, -(2**31), 2**31 - 1]
    assert float(interop.as_jax(_double)(np.int64(7))) == 14.0


def test_a_nested_argument_is_named_by_its_path():
    def f(tree):
        return tree["ids"].float().sum()

    with pytest.raises(ValueError, match=r"argument \"0\['ids'\]\"|argument '0.ids'|ids"):
        interop.as_jax(f)({"ids": np.array([2**40])})


def test_data_dependent_output_shapes_raise_the_documented_error():
    with pytest.raises(ValueError, match="output shapes depend on the input values"):
        interop.as_jax(lambda x: x[x > 0])(jnp.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="output shapes depend on the input values"):
        interop.as_jax(lambda x: torch.nonzero(x).int())(jnp.array([1.0, 0.0]))


def test_non_array_arguments_are_named():
    with pytest.raises(TypeError, match=r"argument .*1.* is a str, not an array"):
        interop.as_jax(lambda a, b: a)(jnp.zeros(2), "x")


def test_to_jax_refuses_int64_without_x64_naming_the_leaf():
    with pytest.raises(TypeError, match="int64"):
        interop.to_jax({"ids": torch.tensor([2**40])})


def test_as_jax_refuses_a_non_callable():
    with pytest.raises(TypeError, match="as_jax: fn must be a function"):
        interop.as_jax(3)


def test_train_optax_refuses_an_empty_batch_list():
    optax = pytest.importorskip("optax")
    with pytest.raises(ValueError, match="train_optax: batches is empty"):
        interop.train_optax(
            lambda p, x: (p["w"] ** 2).sum(), {"w": torch.zeros(2)}, [], optax.sgd(0.1)
        )


def test_as_torch_refuses_a_non_callable():
    with pytest.raises(TypeError, match="as_torch: jax_fn must be a JAX function"):
        interop.as_torch("f")


def test_train_optax_names_a_bad_optimizer_and_a_bad_batch():
    optax = pytest.importorskip("optax")

    def loss(p, x):
        return (p["w"] ** 2).sum() * x.sum()

    with pytest.raises(TypeError, match="train_optax: optimizer must be an optax"):
        interop.train_optax(loss, {"w": torch.zeros(2)}, [torch.ones(1)], None)
    with pytest.raises(TypeError, match="train_optax: batches must be an iterable"):
        interop.train_optax(loss, {"w": torch.zeros(2)}, {"x": torch.ones(1)}, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"train_optax: batch 1: to_jax: leaf .* is a int"):
        interop.train_optax(loss, {"w": torch.zeros(2)}, [torch.ones(1), 3], optax.sgd(0.1))


def test_plot_loss_curves_refuses_one_list_of_losses():
    with pytest.raises(TypeError, match=r"curves: expected a \{run name: losses\} dict, got list"):
        interop.plot_loss_curves([1.0, 2.0])
