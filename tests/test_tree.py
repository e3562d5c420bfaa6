"""Tests for fnllm.tree: property tests over random trees and filters, plus error cases."""

from __future__ import annotations

import fnmatch

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import testing, tree

# ----------------------------------------------------------------------------- strategies

_leaf = testing.tensors(testing.shapes(max_dims=2, min_side=0, max_side=3))
# any tree: a leaf, list or tuple may be the root, and empty containers sit among the leaves
_any_trees = testing.trees(_leaf, max_leaves=12, min_leaves=0, tuples=True, root="any", empty=True)
# globs over the kit's dict keys (w, b, weight, bias, embed, blocks, attn, mlp, ln_f, head, qkv):
# prefixes, list positions, exact keys, infixes, nested positions, and some that match nothing
_globs = st.lists(
    st.sampled_from(["a*", "*.0", "w", "*e*", "b.1.*", "*", "nothing", "*_f", "*z*"]), max_size=3
)


def _same_objects(a, b) -> bool:
    la, sa = optree.tree_flatten(a, none_is_leaf=False)
    lb, sb = optree.tree_flatten(b, none_is_leaf=False)
    return sa == sb and len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(_any_trees, _globs)
def test_partition_then_combine_is_identity(t, globs):
    selected, rest = tree.partition(t, globs)
    assert _same_objects(tree.combine(selected, rest), t)


@settings(max_examples=100, deadline=None)
@given(_any_trees, _globs)
def test_partition_splits_leaves_by_filter(t, globs):
    pred = tree.filter_fn(globs)
    selected, rest = tree.partition(t, globs)
    flat = tree.flatten(t)
    assert set(tree.paths(selected)) == {p for p, x in flat.items() if pred(p, x)}
    assert set(tree.paths(rest)) == {p for p, x in flat.items() if not pred(p, x)}
    # leaves keep their paths in both halves
    for p, x in tree.flatten(selected).items():
        assert flat[p] is x


@settings(max_examples=100, deadline=None)
@given(_any_trees)
def test_filter_matching_nothing_selects_no_leaf(t):
    selected, rest = tree.partition(t, lambda p, x: False)
    assert tree.leaves(selected) == []
    assert _same_objects(rest, t)
    selected, rest = tree.partition(t, "*")
    assert tree.leaves(rest) == []
    assert _same_objects(selected, t)


@settings(max_examples=100, deadline=None)
@given(_any_trees)
def test_flatten_then_unflatten_round_trips(t):
    flat = tree.flatten(t)
    back = tree.unflatten(flat)
    # unflatten rebuilds dicts and lists (tuples come back as lists; empty containers vanish)
    assert list(tree.flatten(back)) == list(flat)
    for p, x in tree.flatten(back).items():
        assert flat[p] is x


@settings(max_examples=100, deadline=None)
@given(testing.trees(_leaf, max_leaves=12, min_leaves=0))
def test_unflatten_inverts_flatten_on_dict_list_trees(t):
    back = tree.unflatten(tree.flatten(t))
    assert _same_objects(back, t)


@settings(max_examples=100, deadline=None)
@given(_any_trees)
def test_map_preserves_structure(t):
    doubled = tree.map(lambda x: x * 2, t)
    assert tree.structure_equal(doubled, t, shapes=True)
    for a, b in zip(tree.leaves(doubled), tree.leaves(t)):
        assert torch.equal(a, b * 2)


@settings(max_examples=50, deadline=None)
@given(_any_trees)
def test_map_with_path_sees_flatten_paths(t):
    seen = tree.leaves(tree.map(lambda p, x: p, t, with_path=True))
    assert seen == tree.paths(t)


@settings(max_examples=50, deadline=None)
@given(_any_trees)
def test_count_is_sum_of_numels(t):
    assert tree.count(t) == sum(x.numel() for x in tree.flatten(t).values())


@settings(max_examples=50, deadline=None)
@given(_any_trees)
def test_cast_changes_dtype_and_keeps_values(t):
    c = tree.cast(t, torch.float64)
    assert all(x.dtype == torch.float64 for x in tree.leaves(c))
    assert all(torch.equal(a.double(), b) for a, b in zip(tree.leaves(t), tree.leaves(c)))
    assert all(x.dtype == torch.float32 for x in tree.leaves(t))  # input untouched


# ----------------------------------------------------------------------------- examples


def _params():
    return {
        "embed": {"tokens": {"weight": torch.randn(5, 3)}},
        "blocks": [{"w": torch.randn(3, 3), "b": torch.randn(3)} for _ in range(3)],
        "head": {"weight": torch.randn(5, 3)},
    }


def test_glob_prefix_selects_subtree():
    p = _params()
    sel, _ = tree.partition(p, "head")
    assert tree.paths(sel) == ["head.weight"]
    sel, _ = tree.partition(p, "blocks.2.*")
    assert tree.paths(sel) == ["blocks.2.b", "blocks.2.w"]
    # "blocks.1*" must not pick blocks.10 etc. by accident of prefix matching: it is a glob
    assert fnmatch.fnmatchcase("blocks.10", "blocks.1*")


def test_partition_keeps_list_positions():
    sel, rest = tree.partition(_params(), "blocks.2.*")
    assert [tree.paths(b) for b in sel["blocks"]] == [[], [], ["b", "w"]]
    assert len(rest["blocks"]) == 3


def test_partition_of_bare_list_leaves_uses_empty_slots():
    t = {"xs": [torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)]}
    sel, rest = tree.partition(t, "xs.1")
    assert sel["xs"][0] == () and sel["xs"][2] == ()
    assert _same_objects(tree.combine(rest, sel), t)


def test_grad_of_trainable_half_only():
    p = _params()
    trainable, frozen = tree.partition(p, ["blocks.2.*", "head"])

    def loss(tr, fr):
        full = tree.combine(tr, fr)
        h = full["embed"]["tokens"]["weight"]
        for b in full["blocks"]:
            h = torch.tanh(h @ b["w"] + b["b"])
        return (h @ full["head"]["weight"].T).square().mean()

    g = torch.func.grad(loss)(trainable, frozen)
    assert tree.paths(g) == tree.paths(trainable)
    # reference: plain autograd on clones of the trainable leaves
    clones = tree.map(lambda x: x.detach().clone().requires_grad_(), trainable)
    ref = torch.autograd.grad(loss(clones, frozen), tree.leaves(clones))
    for a, b in zip(tree.leaves(g), ref):
        torch.testing.assert_close(a, b)
    assert not any(x.requires_grad for x in tree.leaves(frozen))


def test_combine_names_the_path_on_structure_mismatch():
    a = {"blocks": [{"w": torch.zeros(1)}, {}]}
    b = {"blocks": [{}]}
    with pytest.raises(ValueError, match="at blocks"):
        tree.combine(a, b)


def test_combine_rejects_overlapping_leaves():
    a = {"x": torch.zeros(1)}
    with pytest.raises(ValueError, match="both trees hold a leaf at x"):
        tree.combine(a, {"x": torch.ones(1)})


def test_combine_rejects_leaf_against_container():
    with pytest.raises(ValueError, match="structures differ at x"):
        tree.combine({"x": torch.zeros(1)}, {"x": {"y": torch.zeros(1)}})


@pytest.mark.parametrize("bad", [3, 1.5, {"a": 1}, [1, 2], None])
def test_filter_of_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="tree filter"):
        tree.partition(_params(), bad)


def test_map_rejects_trees_of_different_structure():
    with pytest.raises(ValueError, match="keys differ at <root>"):
        tree.map(torch.add, {"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_structure_equal_with_shapes():
    a = {"w": torch.zeros(2, 3)}
    assert tree.structure_equal(a, {"w": torch.ones(2, 3)}, shapes=True)
    assert not tree.structure_equal(a, {"w": torch.ones(3, 2)}, shapes=True)
    assert tree.structure_equal(a, {"w": torch.ones(3, 2)})


def test_flatten_rejects_dotted_keys():
    with pytest.raises(ValueError, match="dotted path"):
        tree.flatten({"a.b": torch.zeros(1)})


def test_cast_returns_same_object_when_dtype_matches():
    x = torch.zeros(2)
    assert tree.cast({"x": x}, torch.float32)["x"] is x


def test_partition_under_compile_and_vmap():
    p = _params()
    trainable, frozen = tree.partition(p, "blocks.*")

    def f(tr, fr, x):
        full = tree.combine(tr, fr)
        h = x
        for b in full["blocks"]:
            h = torch.tanh(h @ b["w"] + b["b"])
        return h.sum()

    xs = torch.randn(4, 3)
    per_ex = torch.func.vmap(torch.func.grad(f), in_dims=(None, None, 0))(trainable, frozen, xs)
    for i in range(4):
        one = torch.func.grad(f)(trainable, frozen, xs[i])
        for a, b in zip(tree.leaves(per_ex), tree.leaves(one)):
            torch.testing.assert_close(a[i], b)
