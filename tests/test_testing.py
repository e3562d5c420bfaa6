"""Tests for fnllm.testing: strategies only draw valid values; every assertion passes on its
positive case and fails, naming the path and the values, on a case built to break it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnllm import data, grads, random, testing, tree
from fnllm.models import BERT, GPT

_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_DTYPES = [*_FLOATS, torch.int8, torch.int32, torch.int64, torch.bool]


# ----------------------------------------------------------------------------- import guard


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_importing_fnllm_does_not_import_hypothesis() -> None:
    proc = _python("""
        import sys, fnllm
        assert "hypothesis" not in sys.modules, "import fnllm pulled in hypothesis"
        assert "fnllm.testing" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr


def test_testing_without_hypothesis_names_the_extra() -> None:
    proc = _python("""
        import sys

        # what an environment without hypothesis looks like: `import hypothesis` fails and
        # importlib.util.find_spec("hypothesis") (which torch._dynamo asks) returns None
        sys.modules["hypothesis"] = None
        import fnllm  # works without hypothesis
        try:
            import fnllm.testing
        except ImportError as err:
            print("MESSAGE:", err)
        else:
            raise SystemExit("fnllm.testing imported without hypothesis")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "fnllm[testing]" in proc.stdout and "hypothesis" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- tree strategies


@settings(max_examples=40)
@given(testing.keys())
def test_keys_are_valid_keys(key):
    assert key.shape == (2,) and key.dtype == torch.int64
    assert random.split(key, 3).shape == (3, 2)


@settings(max_examples=60)
@given(st.data(), testing.shapes(min_side=0), st.sampled_from(_DTYPES))
def test_tensors_have_the_requested_shape_dtype_and_range(data_, shape, dtype):
    x = data_.draw(testing.tensors(shape, dtype, min_value=-3, max_value=5))
    assert tuple(x.shape) == shape and x.dtype == dtype
    if dtype != torch.bool and x.numel():
        assert bool((x.double() >= -3).all() and (x.double() <= 5).all())
        assert bool(x.double().isfinite().all())


@settings(max_examples=60)
@given(testing.trees(testing.tensors(dtype=[torch.float32, torch.int64]), max_leaves=6))
def test_trees_have_a_dict_root_unambiguous_paths_and_bounded_leaves(t):
    assert isinstance(t, dict)
    assert 1 <= len(tree.leaves(t)) <= 6
    testing.assert_trees_equal(tree.unflatten(tree.flatten(t)), tree.unflatten(tree.flatten(t)))
    assert all(isinstance(x, torch.Tensor) for x in tree.leaves(t))
    assert len(set(tree.paths(t))) == len(tree.paths(t))


@settings(max_examples=30)
@given(st.data(), testing.trees(testing.tensors(dtype=_DTYPES)))
def test_trees_like_keep_structure_shapes_and_dtypes(data_, template):
    drawn = data_.draw(testing.trees_like(template))
    testing.assert_same_structure(drawn, template)


@settings(max_examples=60)
@given(st.data(), testing.trees(min_leaves=2), st.sampled_from(["any", "globs", "predicate"]))
def test_filters_select_a_nonempty_part(data_, t, kind):
    f = data_.draw(testing.filters(t, kind=kind))
    trainable, _ = tree.partition(t, f)
    assert tree.leaves(trainable), f"{f!r} selects nothing of {tree.paths(t)}"
    assert (kind != "globs") or all(isinstance(g, str) for g in f)
    proper = data_.draw(testing.filters(t, kind=kind, proper=True))
    trainable, frozen = tree.partition(t, proper)
    assert tree.leaves(trainable) and tree.leaves(frozen)


# ----------------------------------------------------------------------------- model strategies


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), testing.with_params(testing.gpt_configs()))
def test_every_drawn_gpt_builds_and_runs_every_drawn_batch(data_, model_params):
    model, params = model_params
    assert isinstance(model, GPT)
    model.check_params(params)
    batch = data_.draw(
        testing.token_batches(
            model.vocab_size,
            model.max_len,
            padding=data_.draw(st.sampled_from(["right", "left", "none"])),
        )
    )
    logits = model.apply(params, batch["input_ids"], attention_mask=batch["attention_mask"])
    assert logits.shape == (*batch["input_ids"].shape, model.vocab_size)
    assert bool(logits.isfinite().all())


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), testing.with_params(testing.bert_configs()))
def test_every_drawn_bert_builds_and_runs_every_drawn_batch(data_, model_params):
    model, params = model_params
    assert isinstance(model, BERT)
    model.check_params(params)
    batch = data_.draw(testing.token_batches(model.vocab_size, model.max_len))
    types = data_.draw(
        testing.tensors(
            tuple(batch["input_ids"].shape),
            torch.int64,
            min_value=0,
            max_value=model.type_vocab_size - 1,
        )
    )
    out = model.apply(
        params, batch["input_ids"], token_type_ids=types, attention_mask=batch["attention_mask"]
    )
    assert out.last_hidden_state.shape == (*batch["input_ids"].shape, model.d_model)
    assert bool(out.last_hidden_state.isfinite().all())


@settings(max_examples=60)
@given(
    st.data(),
    st.integers(1, 30),
    st.integers(1, 12),
    st.sampled_from(["right", "left", "none"]),
)
def test_token_batches_pad_with_pad_id_and_keep_min_tokens_per_row(data_, vocab, t, padding):
    pad_id = data_.draw(st.integers(0, vocab - 1))
    exclude = tuple(data_.draw(st.lists(st.integers(0, vocab - 1), max_size=2)))
    least = data_.draw(st.integers(0, t))
    b = data_.draw(
        testing.token_batches(
            vocab, t, pad_id=pad_id, padding=padding, exclude=exclude, min_tokens=least
        )
    )
    tokens, mask = b["input_ids"], b["attention_mask"].bool()
    assert b["tokens"] is b["input_ids"]  # the old key, until 0.2
    assert tokens.dtype == torch.int64 and tokens.shape == mask.shape and tokens.shape[1] <= t
    assert bool((mask.sum(dim=1) >= least).all())
    assert bool((tokens[~mask] == pad_id).all())
    assert bool(((tokens >= 0) & (tokens < vocab)).all())
    allowed = [i for i in range(vocab) if i != pad_id and i not in exclude]
    if allowed:
        assert not set(tokens[mask].tolist()) - set(allowed)
    if padding == "none":
        assert bool(mask.all())
    if padding == "left":  # the mask is 0...0 1...1 in every row
        assert torch.equal(mask, mask.sort(dim=1).values)
    if padding == "right":
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)


@settings(max_examples=40)
@given(testing.mlm_args())
def test_mlm_args_are_accepted_by_mlm_mask(args):
    inputs, labels = data.mlm_mask(**args)
    assert inputs.shape == labels.shape == args["tokens"].shape


@settings(max_examples=40)
@given(testing.sentence_pair_args())
def test_sentence_pair_args_are_accepted_by_sentence_pairs(args):
    batch = data.sentence_pairs(**args)
    assert batch["input_ids"].shape == (len(args["first"]), args["max_len"])


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: testing.tensors(min_value=1, max_value=0), "min_value 1 > max_value 0"),
        (lambda: testing.tensors((2, -1)), "shape must be a tuple of ints >= 0"),
        (lambda: testing.tensors(dtype=["f32"]), "dtype must be a torch.dtype"),
        (lambda: testing.shapes(min_dims=3, max_dims=2), "shapes: dims"),
        (lambda: testing.trees(min_leaves=3, max_leaves=2), "trees: leaves"),
        (lambda: testing.trees(root="list"), "trees: root 'list'"),
        (lambda: testing.trees(names=["a", "b"]), "names must be a strategy of str"),
        (lambda: testing.filters({}), "params has 0 leaves"),
        (lambda: testing.filters({"a": torch.ones(1)}, proper=True), "need 2 for proper=True"),
        (lambda: testing.filters({"a": torch.ones(1)}, kind="glob"), "kind 'glob'"),
        (lambda: testing.trees_like({"a": [1.0]}), "leaf a.0 is float"),
        (lambda: testing.token_batches(10, 4, pad_id=10), "pad_id 10 outside"),
        (lambda: testing.token_batches(10, 0), "max_len must be an int >= 1"),
        (lambda: testing.token_batches(10, 4, min_tokens=5), "min_tokens 5 outside [0, max_len 4]"),
        (lambda: testing.token_batches(10, 4, padding="both"), "padding 'both'"),
        (lambda: testing.gpt_configs(max_heads=0), "max_heads must be an int >= 1"),
        (lambda: testing.mlm_args(max_vocab=3), "max_vocab must be >= 4"),
        (lambda: testing.mlm_args(max_len=4, min_tokens=5), "min_tokens 5 outside [0, max_len 4]"),
        (lambda: testing.sentence_pair_args(max_vocab=2), "max_vocab must be >= 4"),
    ],
)
def test_bad_strategy_arguments_raise_naming_the_argument(make, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        make()


# ----------------------------------------------------------------------------- tree assertions


def _perturb(t, path: str, index: int):
    """A copy of ``t`` whose leaf at ``path`` differs at flat ``index``."""

    def edit(p, x):
        if p != path:
            return x
        y = x.clone().reshape(-1)
        y[index] = (~y[index]) if y.dtype == torch.bool else y[index] + 1
        return y.reshape(x.shape)

    return tree.map(edit, t, with_path=True)


_nonempty = testing.tensors(testing.shapes(min_dims=1), dtype=_DTYPES, min_value=-50, max_value=50)


@settings(max_examples=60)
@given(st.data(), testing.trees(_nonempty))
def test_assert_trees_equal_passes_on_a_copy_and_names_a_changed_element(data_, t):
    testing.assert_trees_equal(tree.map(torch.clone, t), t)
    path = data_.draw(st.sampled_from(tree.paths(t)))
    leaf = tree.flatten(t)[path]
    index = data_.draw(st.integers(0, leaf.numel() - 1))
    changed = _perturb(t, path, index)
    with pytest.raises(AssertionError) as err:
        testing.assert_trees_equal(changed, t)
    where = [int(i) for i in torch.unravel_index(torch.tensor(index), leaf.shape)]
    msg = str(err.value)
    head = f"trees differ at {path}: 1 of {leaf.numel()} elements differ; first at {where}: "
    assert msg.startswith(head), msg
    shown = msg[len(head) :].split(" vs ")
    values = [tree.flatten(changed)[path].reshape(-1)[index], leaf.reshape(-1)[index]]
    for text, value in zip(shown, values):  # each printed value reads back as the element
        if value.dtype == torch.bool:
            assert text == repr(value.item())
        else:
            assert torch.tensor(float(text), dtype=value.dtype) == value, (text, value)


@pytest.mark.parametrize(
    "a, b, text",
    [
        (
            {"a": torch.ones(1)},
            {"b": torch.ones(1)},
            "keys only in actual ['a'], only in expected ['b']",
        ),
        ({"a": [torch.ones(1)]}, {"a": [torch.ones(1)] * 2}, "at a: length 1 vs 2"),
        ({"a": [torch.ones(1)]}, {"a": (torch.ones(1),)}, "at a: list vs tuple"),
        ({"a": {"w": torch.ones(2)}}, {"a": {"w": torch.ones(3)}}, "at a.w: shape (2,) vs (3,)"),
        (
            {"w": torch.ones(2)},
            {"w": torch.ones(2, dtype=torch.float64)},
            "at w: dtype torch.float32 vs torch.float64",
        ),
        ({"w": [1.0]}, {"w": [torch.ones(1)]}, "at w.0: float vs tensor(1,) torch.float32"),
    ],
)
def test_structure_mismatches_name_the_path(a, b, text):
    for check in (
        testing.assert_same_structure,
        testing.assert_trees_equal,
        testing.assert_trees_close,
    ):
        with pytest.raises(AssertionError, match=re.escape(text)):
            check(a, b)


def test_same_structure_can_ignore_shapes_and_equal_treats_nan_as_equal():
    testing.assert_same_structure({"w": torch.ones(2)}, {"w": torch.ones(3)}, shapes=False)
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    testing.assert_trees_equal(nan, tree.map(torch.clone, nan))
    testing.assert_trees_close(nan, tree.map(torch.clone, nan))
    with pytest.raises(
        AssertionError, match=r"at w: 1 of 2 elements differ; first at \[0\]: nan vs 0.0"
    ):
        testing.assert_trees_equal(nan, {"w": torch.tensor([0.0, 1.0])})


@pytest.mark.parametrize(
    "dtype, rel_ok, rel_bad",
    [
        (torch.float64, 1e-8, 1e-6),
        (torch.float32, 5e-7, 1e-5),
        (torch.bfloat16, 7e-3, 1e-1),
        (torch.float16, 4e-4, 1e-2),
    ],
)
def test_assert_trees_close_uses_per_dtype_defaults(dtype, rel_ok, rel_bad):
    x = torch.full((3,), 100.0, dtype=torch.float64)
    want = {"p": [x.to(dtype)]}
    testing.assert_trees_close({"p": [(x * (1 + rel_ok)).to(dtype)]}, want)
    with pytest.raises(AssertionError, match=r"trees differ at p\.0: 3 of 3 elements not close"):
        testing.assert_trees_close({"p": [(x * (1 + rel_bad)).to(dtype)]}, want)


def test_assert_trees_close_reports_the_worst_element_and_explicit_tolerances():
    want = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    got = {"w": torch.tensor([[1.01, 2.0], [3.0, 4.5]])}
    testing.assert_trees_close(got, want, rtol=0.2, atol=0)
    with pytest.raises(AssertionError) as err:
        testing.assert_trees_close(got, want, rtol=0.001, atol=0)
    assert str(err.value) == (
        "trees differ at w: 2 of 4 elements not close (rtol=0.001, atol=0); "
        "worst at [1, 1]: 4.5 vs 4.0 (abs diff 0.5)"
    )
    with pytest.raises(
        AssertionError, match=r"at n: 1 of 2 elements differ; first at \[1\]: 3 vs 2"
    ):
        testing.assert_trees_close(
            {"n": torch.tensor([1, 3])}, {"n": torch.tensor([1, 2])}, atol=10
        )


@settings(max_examples=40)
@given(st.data(), testing.trees(_nonempty, min_leaves=2))
def test_assert_frozen_unchanged_names_a_changed_frozen_leaf(data_, t):
    trainable = data_.draw(testing.filters(t, proper=True))
    selected = tree.filter_fn(trainable)
    flat = tree.flatten(t)
    frozen_paths = [p for p, x in flat.items() if not selected(p, x)]
    trainable_paths = [p for p, x in flat.items() if selected(p, x)]
    # changing trainable leaves is fine
    stepped = t
    for p in trainable_paths:
        stepped = _perturb(stepped, p, 0)
    testing.assert_frozen_unchanged(t, stepped, trainable, trainable_changed=True)
    # changing a frozen one is not
    path = data_.draw(st.sampled_from(frozen_paths))
    with pytest.raises(AssertionError, match=rf"^frozen leaf {re.escape(path)} changed: 1 of"):
        testing.assert_frozen_unchanged(t, _perturb(stepped, path, 0), trainable)
    # and an untouched trainable leaf fails when a change is required
    with pytest.raises(AssertionError, match=r"^trainable leaf .* did not change"):
        testing.assert_frozen_unchanged(t, t, trainable, trainable_changed=True)


# ----------------------------------------------------------------------------- function assertions


def _mlp_loss(params, batch):
    h = torch.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
    return ((h @ params["l2"] - batch["y"]) ** 2).sum(-1).mean()


def _mlp(key):
    k = random.split(key, 5)
    params = {
        "l1": {"w": random.normal(k[0], (3, 4)), "b": random.normal(k[1], (4,))},
        "l2": random.normal(k[2], (4, 2)),
    }
    return params, {"x": random.normal(k[3], (5, 3)), "y": random.normal(k[4], (5, 2))}


@settings(max_examples=10)
@given(testing.keys())
def test_assert_per_example_grads_passes_for_fnllm_grads(key):
    params, batch = _mlp(key)
    testing.assert_per_example_grads(_mlp_loss, params, batch)
    (frozen_l1,) = [{"l1": params["l1"]}]
    loss_l2 = lambda tr, b: _mlp_loss({**frozen_l1, **tr}, b)
    testing.assert_per_example_grads(
        loss_l2,
        {"l2": params["l2"]},
        batch,
        per_example_grads=grads.per_example(loss_l2)({"l2": params["l2"]}, batch),
    )


def test_assert_per_example_grads_names_the_example_and_path():
    params, batch = _mlp(random.key(3))
    good = grads.per_example(_mlp_loss)(params, batch)
    swapped = tree.map(lambda g: g.clone(), good)
    swapped["l1"]["b"][[1, 2]] = good["l1"]["b"][[2, 1]]
    with pytest.raises(
        AssertionError, match=r"^per-example gradient of example 1: trees differ at l1\.b: "
    ):
        testing.assert_per_example_grads(_mlp_loss, params, batch, per_example_grads=swapped)
    batch_mean = tree.map(lambda g: g.mean(0, keepdim=True).expand_as(g), good)
    with pytest.raises(
        AssertionError, match=r"^per-example gradient of example 0: trees differ at l1\.b"
    ):
        testing.assert_per_example_grads(_mlp_loss, params, batch, per_example_grads=batch_mean)
    with pytest.raises(
        AssertionError, match=r"with batch 5: trees differ at l2: shape \(4, 2\) vs \(5, 4, 2\)"
    ):
        testing.assert_per_example_grads(
            _mlp_loss, params, batch, per_example_grads={**good, "l2": good["l2"][0]}
        )
    with pytest.raises(ValueError, match="one shared leading dimension"):
        testing.assert_per_example_grads(_mlp_loss, params, {"x": batch["x"], "y": batch["y"][:2]})


def test_assert_deterministic_passes_for_key_functions_and_names_what_fails():
    sample = lambda k, shape: {"u": random.uniform(k, shape), "n": [random.normal(k, shape)]}
    testing.assert_deterministic(sample, random.key(7), (2, 3))
    with pytest.raises(
        AssertionError, match=r"^not deterministic for key \[0, 7\]: trees differ at n\.0: "
    ):
        testing.assert_deterministic(
            lambda k, s: {"u": random.uniform(k, s), "n": [torch.randn(s)]}, random.key(7), (2, 3)
        )
    with pytest.raises(
        AssertionError, match=r"does not change with the key: .*\(leaves: n\.0, u\)"
    ):
        testing.assert_deterministic(
            lambda k, s: {"u": torch.ones(s), "n": [torch.zeros(s)]}, random.key(7), (2, 3)
        )


def test_assert_compiles_passes_and_catches_breaks_and_recompiles():
    testing.assert_compiles(
        lambda x, y: (x * y).sum(-1),
        (torch.ones(2, 3), torch.ones(3)),
        (torch.zeros(2, 3), torch.arange(3.0)),
    )

    def branchy(x):
        return x.relu() if x.sum() > 0 else x

    with pytest.raises(
        AssertionError, match=r"^branchy: 1 graph break\(s\): .*test_testing\.py:\d+"
    ):
        testing.assert_compiles(branchy, (torch.ones(3),))

    def scaled(x, n):
        return x * n

    with pytest.raises(AssertionError, match=r"^scaled: recompiled on call 1 \(2 graphs\)"):
        testing.assert_compiles(scaled, (torch.ones(3), 2), (torch.ones(3), 3))


def test_assert_transforms_agree_passes_and_names_the_failing_variant():
    x = random.normal(random.key(0), (3, 4))
    testing.assert_transforms_agree(lambda x: {"s": x.softmax(-1), "n": [x.norm(dim=-1)]}, x)
    with pytest.raises(AssertionError, match=r"^vmap differs from eager: trees differ at c: "):
        testing.assert_transforms_agree(lambda x: {"c": x - x.mean()}, x)
    with pytest.raises(
        AssertionError, match=r"^compiled differs from eager: trees differ at <root>"
    ):
        testing.assert_transforms_agree(lambda x: x + 1 if torch.compiler.is_compiling() else x, x)


def test_tiny_gpt_apply_compiles_once_and_agrees_across_transforms():
    gpt = GPT(vocab_size=11, n_layer=1, n_head=2, d_model=8, max_len=6)
    params = gpt.init(random.key(0))
    tokens = random.randint(random.key(1), (2, 5), 0, 11)

    def logits(t):
        return gpt.apply(params, t, impl="math")

    testing.assert_compiles(logits, (tokens,), (tokens.flip(0),))
    testing.assert_transforms_agree(logits, tokens)


def test_assert_trees_equal_bitwise_tells_signed_zeros_and_nan_payloads_apart():
    zeros = {"w": [torch.tensor([0.0, 1.0], dtype=torch.bfloat16)]}
    negative = {"w": [torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)]}
    testing.assert_trees_equal(negative, zeros)
    with pytest.raises(
        AssertionError, match=r"at w\.0: 1 of 2 elements differ; first at \[0\]: -0\.0 vs 0\.0"
    ):
        testing.assert_trees_equal(negative, zeros, bitwise=True)
    nan = torch.tensor([float("nan")])
    other_nan = nan.view(torch.int32).add(1).view(torch.float32)
    testing.assert_trees_equal({"n": other_nan}, {"n": nan})
    with pytest.raises(
        AssertionError, match=r"at n: 1 of 1 elements differ; first at \[0\]: nan vs nan"
    ):
        testing.assert_trees_equal({"n": other_nan}, {"n": nan}, bitwise=True)
    testing.assert_trees_equal(
        {"b": torch.tensor([True])}, {"b": torch.tensor([True])}, bitwise=True
    )


# ----------------------------------------------------------------------------- any-tree options


def _containers(t, kinds=(dict, list, tuple)):
    """Every container of ``t`` (the root included), depth first."""
    if not isinstance(t, kinds):
        return []
    children = t.values() if isinstance(t, dict) else t
    return [t, *(c for child in children for c in _containers(child, kinds))]


@settings(max_examples=150)
@given(
    testing.trees(
        testing.tensors(dtype=[torch.float32, torch.int64]),
        max_leaves=6,
        min_leaves=0,
        tuples=True,
        root="any",
        empty=True,
        names=st.text(alphabet="ab0_", min_size=1, max_size=3),
    )
)
def test_any_trees_keep_their_leaves_and_draw_from_the_names(t):
    flat = tree.flatten(t)
    assert len(flat) <= 6 and all(isinstance(x, torch.Tensor) for x in flat.values())
    for c in _containers(t, dict):
        assert all(set(k) <= set("ab0_") and 1 <= len(k) <= 3 for k in c)
    assert all(len(c) <= 4 for c in _containers(t))


def test_any_trees_reach_every_root_kind_and_empty_containers():
    from hypothesis import find

    any_trees = testing.trees(min_leaves=0, tuples=True, root="any", empty=True)
    assert isinstance(find(any_trees, lambda t: isinstance(t, torch.Tensor)), torch.Tensor)
    # reachability, not shrinking (find's shrink budget varies): empty list and tuple roots
    assert find(any_trees, lambda t: isinstance(t, list) and len(t) == 0) == []
    assert find(any_trees, lambda t: isinstance(t, tuple) and len(t) == 0) == ()
    nested_empty = find(
        any_trees,
        lambda t: tree.count(t) > 0 and any(len(c) == 0 for c in _containers(t)),
    )
    assert tree.count(nested_empty) > 0
    digit_key = find(
        testing.trees(names=st.text(alphabet="01", min_size=1, max_size=2)),
        lambda t: any(k.isdigit() for c in _containers(t, dict) for k in c),
    )
    assert all(
        k in ("0", "1", "00", "01", "10", "11") for c in _containers(digit_key, dict) for k in c
    )
    # default trees keep a dict root and no empty container: with no leaf, only {} remains
    assert find(testing.trees(min_leaves=0), lambda t: tree.count(t) == 0) == {}


def test_ordered_comparisons_name_the_key_order():
    a = {"x": torch.ones(1), "y": [{"p": torch.ones(1), "q": torch.ones(1)}]}
    b = {"x": torch.ones(1), "y": [{"q": torch.ones(1), "p": torch.ones(1)}]}
    for check in (
        testing.assert_same_structure,
        testing.assert_trees_equal,
        testing.assert_trees_close,
    ):
        check(a, b)  # key order is ignored by default
        check(a, a, ordered=True)
        with pytest.raises(
            AssertionError, match=re.escape("at y.0: key order ['p', 'q'] vs ['q', 'p']")
        ):
            check(a, b, ordered=True)


@pytest.mark.parametrize(
    "a, b, text",
    [
        (True, 1, "at <root>: True (bool) vs 1 (int)"),
        ({"m": 1.0}, {"m": 1}, "at m: 1.0 (float) vs 1 (int)"),
        ({"m": [-0.0]}, {"m": [0.0]}, "at m.0: -0.0 (float) vs 0.0 (float)"),
        ({"m": 0}, {"m": False}, "at m: 0 (int) vs False (bool)"),
    ],
)
def test_bitwise_equality_tells_plain_leaf_types_and_signed_zeros_apart(a, b, text):
    testing.assert_trees_equal(a, b)  # equal values
    testing.assert_trees_equal(a, a, bitwise=True)
    with pytest.raises(AssertionError, match=re.escape(text)):
        testing.assert_trees_equal(a, b, bitwise=True)


@settings(max_examples=40)
@given(testing.mlm_args(max_len=6, min_tokens=0))
def test_mlm_args_with_min_tokens_zero_may_pad_whole_rows_and_stay_valid(args):
    inputs, labels = data.mlm_mask(**args)
    empty = ~args["attention_mask"].bool().any(1)
    assert bool((labels[empty] == -100).all()) and torch.equal(inputs[empty], args["tokens"][empty])


def test_mlm_args_with_min_tokens_zero_reach_a_fully_padded_row():
    from hypothesis import find

    args = find(
        testing.mlm_args(min_tokens=0), lambda a: bool((a["attention_mask"].sum(1) == 0).any())
    )
    assert args["tokens"].shape[1] >= 1
