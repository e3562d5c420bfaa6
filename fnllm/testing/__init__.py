"""Property-based testing for code built on fnllm: hypothesis strategies and tree assertions.

Strategies draw what fnllm code consumes (keys, parameter trees, token batches, small model
configs with their params, filters, data-transform arguments); assertions compare trees and
check transforms, and every failure names the leaf path, the index and the values.

Needs the optional extra ``testing`` (``pip install 'fnllm[testing]'``, which installs
hypothesis); ``import fnllm`` alone never imports hypothesis.

Example:
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from fnllm import testing, tree
    >>> @settings(max_examples=10)
    ... @given(testing.trees())
    ... def test_cast_keeps_structure(params):
    ...     testing.assert_same_structure(tree.cast(params, torch.float64), params, shapes=False)
    >>> test_cast_keeps_structure()
"""

try:
    import hypothesis  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "fnllm.testing needs hypothesis, from the optional extra 'testing': "
        "pip install 'fnllm[testing]'"
    ) from err

from fnllm.testing._assert import (
    assert_frozen_unchanged,
    assert_same_structure,
    assert_trees_close,
    assert_trees_equal,
)
from fnllm.testing._models import (
    bert_configs,
    gpt_configs,
    llama_configs,
    mlm_args,
    sentence_pair_args,
    token_batches,
    with_params,
)
from fnllm.testing._transforms import (
    assert_compiles,
    assert_deterministic,
    assert_per_example_grads,
    assert_transforms_agree,
)
from fnllm.testing._trees import filters, keys, shapes, tensors, trees, trees_like

__all__ = [
    "assert_compiles",
    "assert_deterministic",
    "assert_frozen_unchanged",
    "assert_per_example_grads",
    "assert_same_structure",
    "assert_transforms_agree",
    "assert_trees_close",
    "assert_trees_equal",
    "bert_configs",
    "filters",
    "gpt_configs",
    "keys",
    "llama_configs",
    "mlm_args",
    "sentence_pair_args",
    "shapes",
    "tensors",
    "token_batches",
    "trees",
    "trees_like",
    "with_params",
]
