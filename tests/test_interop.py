"""Tests for fnllm.interop's arrays and keys: DLPack trees, key conversion, checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.flax  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fnllm import interop, io, tree  # noqa: E402
from fnllm import random as jr  # noqa: E402
from fnllm.data import mlm_mask  # noqa: E402
from fnllm.models import GPT  # noqa: E402

# The dtype table of the issue: each crosses bit for bit and shares memory.
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.uint32,
]


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """JAX's 64-bit mode, on for the block only."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    key = jr.key(seed)
    if dtype == torch.bool:
        return jr.bernoulli(key, 0.5, shape)
    if dtype.is_floating_point:
        return jr.normal(key, shape).to(dtype)
    words = jr.bits(key, shape)  # uint32 values in int64
    if dtype == torch.int32:
        words = words - 2**31
    return words.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 and NaN payloads compare too)."""
    return t.reshape(-1).contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------- trees


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_identical_and_shares_memory(dtype: torch.dtype) -> None:
    ctx = x64() if dtype == torch.int64 else contextlib.nullcontext()
    with ctx:
        t = _sample(dtype, (3, 5), 1)
        j = interop.to_jax({"x": [t]})
        assert j["x"][0].dtype == jnp.dtype(str(dtype).removeprefix("torch."))
        assert j["x"][0].unsafe_buffer_pointer() == t.data_ptr()
        back = interop.from_jax(j)["x"][0]
        assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
        assert torch.equal(_bits(back), _bits(t))


def test_write_through_one_view_is_visible_through_the_other() -> None:
    t = torch.zeros(4)
    j = interop.to_jax(t)
    back = interop.from_jax(j)
    back[1] = 7.0
    assert t[1] == 7.0 and float(np.asarray(j)[1]) == 7.0
    # and the other way: a JAX array seen from torch
    a = jnp.arange(3.0)
    seen = interop.from_jax({"a": a})["a"]
    assert seen.data_ptr() == a.unsafe_buffer_pointer()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([d for d in DTYPES if d != torch.int64]),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
    structure=st.sampled_from(["dict", "list", "tuple", "nested"]),
)
def test_from_jax_inverts_to_jax_and_keeps_structure(dtype, shape, seed, structure) -> None:
    t = _sample(dtype, shape, seed)
    src = {
        "dict": {"a": t, "b": t[..., :1] if t.dim() else t},
        "list": [t, t],
        "tuple": (t,),
        "nested": {"blocks": [{"w": t}, {}], "head": ()},
    }[structure]
    j = interop.to_jax(src)
    assert jax.tree_util.tree_structure(j) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda _: 0, src)
    )
    back = interop.from_jax(j)
    assert tree.structure_equal(back, src, shapes=True)
    for a, b in zip(tree.leaves(back), tree.leaves(src)):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def test_non_contiguous_tensors_cross_as_copies_with_the_right_values() -> None:
    t = torch.arange(12.0).reshape(3, 4)
    j = interop.to_jax({"t": t.T, "s": t[:, ::2]})
    np.testing.assert_array_equal(np.asarray(j["t"]), t.T.numpy())
    np.testing.assert_array_equal(np.asarray(j["s"]), t[:, ::2].numpy())


def test_params_tree_works_with_jax_tree_util_and_optax() -> None:
    import optax

    gpt = GPT(vocab_size=32, n_layer=1, n_head=2, d_model=16, max_len=8)
    params = gpt.init(jr.key(0))
    jp = interop.to_jax(params)
    assert len(jax.tree_util.tree_leaves(jp)) == len(tree.leaves(params))
    assert sum(x.size for x in jax.tree_util.tree_leaves(jp)) == tree.count(params)
    opt = optax.sgd(0.5)
    grads = jax.tree_util.tree_map(jnp.ones_like, jp)
    updates, _ = opt.update(grads, opt.init(jp))
    new = interop.from_jax(optax.apply_updates(jp, updates))
    for a, b in zip(tree.leaves(new), tree.leaves(params)):
        torch.testing.assert_close(a, b - 0.5)


def test_requires_grad_tensors_are_detached() -> None:
    w = torch.ones(2, requires_grad=True)
    assert np.asarray(interop.to_jax(w)).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- tree errors


def test_to_jax_names_a_non_tensor_leaf() -> None:
    with pytest.raises(TypeError, match=r"'blocks\.0\.w' is a int"):
        interop.to_jax({"blocks": [{"w": 3}]})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.complex32, torch.float8_e4m3fnuz, torch.qint8], ids=str)
def test_to_jax_rejects_dtypes_dlpack_cannot_carry(dtype: torch.dtype) -> None:
    t = (
        torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, dtype)
        if dtype == torch.qint8
        else torch.zeros(2, dtype=dtype)
    )
    with pytest.raises(TypeError, match=r"leaf 'a\.w' has dtype"):
        interop.to_jax({"a": {"w": t}})


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=str)
def test_to_jax_refuses_to_narrow_64_bit_dtypes_without_x64(dtype: torch.dtype) -> None:
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match=r"'tokens'.*jax_enable_x64"):
        interop.to_jax({"tokens": torch.zeros(2, dtype=dtype)})


def test_from_jax_takes_numpy_arrays_including_bfloat16_and_read_only_ones() -> None:
    bf = np.asarray(jnp.array([1.5, -2.0], jnp.bfloat16))  # a read-only ml_dtypes view
    writable = np.arange(3, dtype=np.uint32)
    out = interop.from_jax({"bf": bf, "u": writable})
    assert out["bf"].dtype == torch.bfloat16 and out["bf"].tolist() == [1.5, -2.0]
    assert out["u"].dtype == torch.uint32 and out["u"].data_ptr() == writable.ctypes.data


def test_from_jax_errors_name_the_leaf() -> None:
    with pytest.raises(TypeError, match=r"leaf 'a\.1' is a str"):
        interop.from_jax({"a": [jnp.zeros(1), "x"]})
    with pytest.raises(TypeError, match=r"'k' is a typed JAX key; use key_from_jax"):
        interop.from_jax({"k": jax.random.key(0)})
    with pytest.raises(TypeError, match="tracer"):
        jax.jit(lambda x: interop.from_jax({"x": x}))(jnp.zeros(2))


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_key_to_jax_draws_the_same_bits_as_jax(seed: int) -> None:
    key = jr.key(seed)
    raw = interop.key_to_jax(key)
    typed = interop.key_to_jax(key, typed=True)
    assert raw.dtype == jnp.uint32 and raw.shape == (2,)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(typed)),
        np.asarray(jax.random.key_data(jax.random.key(seed))),
    )
    ours = jr.bits(jr.split(key)[1], (5,)).numpy()
    theirs = np.asarray(jax.random.bits(jax.random.split(typed)[1], (5,)))
    np.testing.assert_array_equal(ours, theirs.astype(np.int64))


def test_key_round_trips_raw_typed_and_batched() -> None:
    keys = jr.split(jr.key(3), 4)
    for typed in (False, True):
        j = interop.key_to_jax(keys, typed=typed)
        assert j.shape == ((4,) if typed else (4, 2))
        assert torch.equal(interop.key_from_jax(j), keys)
    assert torch.equal(interop.key_from_jax(np.array([0, 42], dtype=np.uint32)), jr.key(42))


def test_key_errors() -> None:
    with pytest.raises(TypeError, match="key_to_jax: key must be an integer tensor"):
        interop.key_to_jax(torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\), got \(3,\)"):
        interop.key_to_jax(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        interop.key_to_jax(torch.tensor([0, 2**32]))
    with pytest.raises(ValueError, match="uint32"):
        interop.key_from_jax(np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="'rbg'"):
        interop.key_from_jax(jax.random.key(0, impl="rbg"))


def _jax_mlm_mask(key, tokens, *, mask_id, vocab_size, special_ids, prob, mask_frac, random_frac):
    """BERT's 80/10/10 corruption, the rule of fnllm.data.mlm_mask written in plain JAX.

    One uniform 32-bit word per token: picked when word < prob * 2**32; a picked word is
    uniform on [0, cut), whose first mask_frac part means [MASK], next random_frac part a
    random id (its offset scaled to the ids that are not excluded), the rest keep.
    """
    excluded = sorted({*special_ids, mask_id})
    word = jax.random.bits(key, tokens.shape, jnp.uint32).astype(jnp.int64)
    cut = min(max(round(prob * 2**32), 0), 2**32)
    candidates = jnp.ones(tokens.shape, bool)
    for s in excluded:
        candidates &= tokens != s
    picked = candidates & (word < cut)
    mask_cut = round(mask_frac * cut)
    random_cut = min(round((mask_frac + random_frac) * cut), cut)
    inputs = jnp.where(picked & (word < mask_cut), mask_id, tokens)
    to_random = picked & (word >= mask_cut) & (word < random_cut)
    nth = ((word - mask_cut) * (vocab_size - len(excluded))) // (random_cut - mask_cut)
    for s in excluded:
        nth = nth + (nth >= s)
    inputs = jnp.where(to_random, nth, inputs)
    return inputs, jnp.where(picked, tokens, -100)


@pytest.mark.parametrize("typed", [False, True])
def test_same_key_gives_the_same_mlm_mask_in_fnllm_and_jax(typed: bool) -> None:
    key = jr.fold_in(jr.key(11), 5)
    tokens = jr.randint(jr.key(2), (6, 40), 0, 1000)
    tokens[:, 0], tokens[:, -1] = 101, 102
    args = dict(mask_id=103, vocab_size=1000, special_ids=(0, 101, 102), prob=0.3)
    inputs, labels = mlm_mask(key, tokens, **args, mask_frac=0.8, random_frac=0.1)
    assert (labels != -100).sum() > 30 and (inputs != tokens).any()
    with x64():
        j_inputs, j_labels = _jax_mlm_mask(
            interop.key_to_jax(key, typed=typed),
            jnp.asarray(tokens.numpy()),
            **args,
            mask_frac=0.8,
            random_frac=0.1,
        )
    np.testing.assert_array_equal(np.asarray(j_inputs), inputs.numpy())
    np.testing.assert_array_equal(np.asarray(j_labels), labels.numpy())


# ----------------------------------------------------------------------------- checkpoints


def test_fnllm_checkpoint_loads_with_safetensors_flax_into_the_same_tree(tmp_path) -> None:
    gpt = GPT(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_len=8)
    params = tree.cast(gpt.init(jr.key(0)), torch.bfloat16)
    path = tmp_path / "ckpt.safetensors"
    io.save(path, params)
    flat = safetensors.flax.load_file(str(path))
    loaded = tree.unflatten(flat)
    expected = interop.to_jax(params)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_tree_saved_from_jax_loads_in_fnllm(tmp_path) -> None:
    jp = {"blocks": [{"w": jnp.arange(6.0).reshape(2, 3)}, {"w": jnp.ones((2, 3))}]}
    jp["emb"] = jnp.full((4,), 2, jnp.bfloat16)
    path = tmp_path / "from_jax.safetensors"
    safetensors.flax.save_file(tree.flatten(jp), str(path))
    loaded = io.load(path)
    assert tree.structure_equal(loaded, interop.from_jax(jp), shapes=True)
    for a, b in zip(tree.leaves(loaded), tree.leaves(interop.from_jax(jp))):
        assert a.dtype == b.dtype and torch.equal(a, b)
