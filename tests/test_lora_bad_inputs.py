"""fnllm.finetune.lora on bad inputs: each case raises the right type naming the culprit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _tiny import tiny_bert, tiny_gpt

from fnllm import random as jr
from fnllm import tree
from fnllm.finetune import Classifier, lora, strategy
from fnllm.models import GPT

TOKENS = jr.randint(jr.key(7), (2, 5), 1, 40)


def _randomise_b(params, key):
    flat = tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.endswith("lora_b"):
            flat[p] = jr.normal(jr.fold_in(key, i), tuple(v.shape)) * 0.1
    return tree.unflatten(flat)


def _untied() -> GPT:
    return tiny_gpt(tie_head=False)


@pytest.mark.parametrize(
    ("model", "target", "culprit"),
    [
        (tiny_gpt(), "embed.tokens", "embed.tokens is an embedding table"),
        (tiny_gpt(), "embed.positions", "embed.positions is an embedding table"),
        (_untied(), "head", "head is the language-model head"),
        (tiny_bert(), "embed.token_types", "embed.token_types is an embedding table"),
        (Classifier(_untied(), 2), "base.head", "base.head is the language-model head"),
        (tiny_gpt(), "*", "embed.(tokens|positions) is an embedding table"),
    ],
)
def test_targets_the_forward_does_not_run_are_refused(model, target, culprit):
    params = model.init(jr.key(0))
    with pytest.raises(ValueError, match=culprit):
        lora.init(jr.key(1), params, rank=2, targets=target)


def _every_linear_target(model):
    params = model.init(jr.key(0))
    return params, [p for p in lora._linears(params)]


@pytest.mark.parametrize(
    "model",
    [_untied(), tiny_bert(), Classifier(_untied(), 3, "mean"), Classifier(tiny_bert(), 2, "cls")],
    ids=["gpt-untied", "bert", "clf-gpt", "clf-bert"],
)
def test_apply_and_merge_agree_for_every_accepted_target(model):
    params, linears = _every_linear_target(model)
    accepted = []
    for i, target in enumerate(linears):
        try:
            lp = lora.init(jr.key(i), params, rank=2, alpha=4.0, targets=target)
        except ValueError as err:
            assert "embedding table" in str(err) or "language-model head" in str(err)
            continue
        accepted.append(target)
        lp = _randomise_b(lp, jr.key(100 + i))
        out = model.apply(lp, TOKENS)
        out = out[0] if isinstance(out, tuple) else out
        base = model.apply(params, TOKENS)
        base = base[0] if isinstance(base, tuple) else base
        if "blocks" in target:  # (a BERT's mlm/pair heads run in their own methods, not apply)
            assert not torch.allclose(out, base), f"the adapter on {target} does nothing"
        merged = model.apply(lora.merge(lp), TOKENS)
        merged = merged[0] if isinstance(merged, tuple) else merged
        torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-4, msg=target)
    assert accepted  # the blocks' linears at least


@pytest.mark.parametrize(
    ("alpha", "error", "match"),
    [
        (float("inf"), ValueError, "alpha must be a finite positive number, got inf"),
        (float("nan"), ValueError, "alpha must be a finite positive number, got nan"),
        (0.0, ValueError, "alpha"),
        (-2, ValueError, "alpha"),
        (True, TypeError, "alpha"),
        ("16", TypeError, "alpha"),
    ],
)
def test_init_refuses_bad_alpha(alpha, error, match):
    with pytest.raises(error, match=match):
        lora.init(jr.key(1), tiny_gpt().init(jr.key(0)), rank=2, alpha=alpha)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": []}, TypeError, "targets"),
        ({"targets": [3]}, TypeError, "targets"),
        ({"rank": 2.0}, TypeError, "rank for blocks.0.attn.qkv"),
        ({"rank": True}, TypeError, "rank"),
        ({"rank": 0}, ValueError, r"rank 0 for blocks.0.attn.qkv must be in \[1, 16\]"),
        ({"rank": {"*.mlp.*": 2}}, ValueError, "blocks.0.attn.qkv matches no glob"),
        ({"rslora": 1}, TypeError, "rslora"),
    ],
)
def test_init_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lora.init(jr.key(1), tiny_gpt().init(jr.key(0)), **{"rank": 2, **kwargs})


def test_init_refuses_a_non_tree_and_a_tree_with_adapters():
    with pytest.raises(TypeError, match=r"params must be a model's parameter tree .*got Tensor"):
        lora.init(jr.key(1), torch.zeros(3, 3))
    lp = lora.init(jr.key(1), tiny_gpt().init(jr.key(0)), rank=2)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv already has adapters"):
        lora.init(jr.key(1), lp, rank=2)


def test_lora_strategy_on_a_tree_without_adapters_is_refused():
    model = Classifier(tiny_bert(mlm_head=False, pair_head=False), 2)
    params = model.init(jr.key(0))
    with pytest.raises(ValueError, match=r"strategy 'lora': the tree has no '\*.lora_a' leaf"):
        tree.partition(params, strategy("lora", model))
    trainable, _ = tree.partition(lora.init(jr.key(1), params, rank=2), strategy("lora", model))
    assert any(p.endswith("lora_a") for p in tree.paths(trainable))
    # allow_unmatched lifts the check, as for glob lists
    trainable, _ = tree.partition(params, strategy("lora", model), allow_unmatched=True)
    assert tree.paths(trainable) == ["head.bias", "head.weight"]


def _stacked():
    base = tiny_gpt().init(jr.key(0))
    return lora.stack([lora.init(jr.key(i), base, rank=2) for i in (1, 2)])


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (torch.tensor([True, False]), TypeError, "bool tensor"),
        ([0, 1], TypeError, "index must be an int \\[B\\] tensor, got list"),
        (torch.tensor([0.0, 1.0]), ValueError, "torch.float32"),
        (torch.tensor([[0, 1]]), ValueError, r"\(1, 2\)"),
        (torch.tensor([0, 2]), ValueError, r"\[0, 2\)"),
        (torch.tensor([-1, 0]), ValueError, r"\[0, 2\)"),
    ],
)
def test_pick_refuses_bad_indices(index, error, match):
    with pytest.raises(error, match=match):
        lora.pick(_stacked(), index)


def test_merge_names_incomplete_misshaped_or_non_finite_adapters():
    lp = lora.init(jr.key(1), tiny_gpt().init(jr.key(0)), rank=2)
    qkv = lp["blocks"][0]["attn"]["qkv"]
    cases = [
        (
            {k: v for k, v in qkv.items() if k != "lora_b"},
            ValueError,
            "qkv has adapters but lacks lora_b",
        ),
        ({**qkv, "lora_b": torch.zeros(48, 3)}, ValueError, "qkv.*disagree on the rank"),
        (
            {**qkv, "lora_scale": torch.tensor(float("inf"))},
            ValueError,
            "qkv.lora_scale is not finite",
        ),
        ({**qkv, "lora_a": [[0.0]]}, TypeError, "qkv.lora_a is a list"),
    ]
    for node, error, match in cases:
        bad = {
            **lp,
            "blocks": [
                {**lp["blocks"][0], "attn": {**lp["blocks"][0]["attn"], "qkv": node}},
                lp["blocks"][1],
            ],
        }
        with pytest.raises(error, match=match):
            lora.merge(bad)
    with pytest.raises(ValueError, match="stacked adapters"):
        lora.merge(_stacked())


def test_attach_names_the_bad_path_or_value():
    base = tiny_gpt().init(jr.key(0))
    leaves = lora.adapters(lora.init(jr.key(1), base, rank=2))
    with pytest.raises(TypeError, match=r"expected a \{path: tensor\} mapping"):
        lora.attach(base, list(leaves.items()))
    with pytest.raises(TypeError, match=r"blocks.0.attn.qkv.lora_a"):
        lora.attach(base, {**leaves, "blocks.0.attn.qkv.lora_a": [[1.0]]})
    with pytest.raises(KeyError, match=r"blocks.9.attn.qkv"):
        lora.attach(base, {"blocks.9.attn.qkv.lora_a": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.lora_a has shape"):
        lora.attach(base, {**leaves, "blocks.0.attn.qkv.lora_a": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv has adapters but lacks lora_scale"):
        lora.attach(base, {k: v for k, v in leaves.items() if k != "blocks.0.attn.qkv.lora_scale"})
    with pytest.raises(ValueError, match=r"blocks.0.attn.(qkv|proj) already has adapters"):
        lora.attach(lora.init(jr.key(1), base, rank=2), leaves)


def test_load_names_the_file_that_is_truncated_empty_or_not_adapters(tmp_path):
    base = tiny_gpt().init(jr.key(0))
    good = tmp_path / "a.safetensors"
    lora.save(good, lora.init(jr.key(1), base, rank=2))
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "empty.safetensors": b"",
        "text.safetensors": "not safetensors \u00e9".encode("latin-1"),
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=f"lora.load: .*{name} is not a readable safetensors"):
            lora.load(tmp_path / name)
    from fnllm import io

    io.save(tmp_path / "model.safetensors", base)
    with pytest.raises(ValueError, match=r"model.safetensors holds no LoRA adapters"):
        lora.load(tmp_path / "model.safetensors")
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flipped.safetensors: tensor .* is corrupt"):
        lora.load(tmp_path / "flipped.safetensors")
    with pytest.raises(TypeError, match="path must be a str"):
        lora.load(3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        lora.load(tmp_path / "missing.safetensors")


def test_save_refuses_trees_without_adapters_and_bad_paths(tmp_path):
    base = tiny_gpt().init(jr.key(0))
    with pytest.raises(ValueError, match="no adapters"):
        lora.save(tmp_path / "a.safetensors", base)
    with pytest.raises(TypeError, match="path must be a str"):
        lora.save(None, lora.init(jr.key(1), base, rank=2))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lora.save(tmp_path, lora.init(jr.key(1), base, rank=2))
    assert os.listdir(tmp_path) == []  # no debris


_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import torch
    from fnllm.finetune import lora
    from fnllm.io import _safetensors
    import safetensors.torch as st

    real = st.save_file
    def slow(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)       # the temp file is on disk ...
        print("writing", flush=True)
        import time; time.sleep(60)                   # ... when the writer is killed
    st.save_file = slow
    leaves = {"lin": {"weight": torch.zeros(64, 64), "lora_a": torch.ones(8, 64),
              "lora_b": torch.ones(64, 8), "lora_scale": torch.tensor(2.0)}}
    lora.save(sys.argv[1], leaves)
    """
)


def test_a_save_killed_mid_write_leaves_the_old_file_and_the_next_save_sweeps_debris(tmp_path):
    target = tmp_path / "adapters.safetensors"
    old = {"lin": {"weight": torch.zeros(64, 64), "lora_a": torch.zeros(8, 64),
                   "lora_b": torch.zeros(64, 8), "lora_scale": torch.tensor(1.0)}}  # fmt: skip
    lora.save(target, old)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_FOREVER, str(target)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    debris = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(debris) == 1  # the killed writer's temp file
    assert float(lora.load(target)["lin.lora_scale"]) == 1.0  # the old file is intact
    time.sleep(0.01)
    lora.save(target, old)  # the next save to the same folder removes it
    assert sorted(os.listdir(tmp_path)) == ["adapters.safetensors"]


def test_extract_features_refuses_one_batch_instead_of_a_list():
    from fnllm.finetune import extract_features

    bert = tiny_bert()
    params = bert.init(jr.key(0))
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3)}
    with pytest.raises(TypeError, match=r"got one dict \(wrap it: \[batch\]\)"):
        extract_features(bert, params, batch, progress=False)
    with pytest.raises(TypeError, match=r"got one Tensor"):
        extract_features(bert, params, batch["input_ids"], progress=False)


def test_stack_names_sets_without_adapters_or_that_differ():
    base = tiny_gpt().init(jr.key(0))
    lp = lora.init(jr.key(1), base, rank=2)
    with pytest.raises(ValueError, match="set 1 has no adapters"):
        lora.stack([lp, base])
    with pytest.raises(TypeError, match="trees must be a list of adapted trees, got dict"):
        lora.stack(lp)
    with pytest.raises(ValueError, match=r"differs between set 0 and set 1|set 1 has other"):
        lora.stack([lp, tree.map(lambda x: x.double(), lp)])
    with pytest.raises(ValueError, match="set 1 has other"):
        lora.stack([lp, lora.init(jr.key(1), base, rank=1)])
    with pytest.raises(ValueError, match="no adapter sets"):
        lora.stack([])


@pytest.mark.parametrize("key", ["k", 0, torch.zeros(2)])
def test_init_names_a_bad_key(key):
    with pytest.raises(TypeError, match=r"lora.init: key must be a fnllm.random key"):
        lora.init(key, tiny_gpt().init(jr.key(0)), rank=2)


@pytest.mark.parametrize("fn", [lora.merge, lora.adapters, lambda p: lora.init(jr.key(0), p)])
@pytest.mark.parametrize("params", [[1, 2], {"a": "b"}, None, "params"])
def test_every_entry_point_refuses_a_non_tree(fn, params):
    with pytest.raises(TypeError, match=r"lora\.\w+: params must be a model's parameter tree"):
        fn(params)


def test_save_refuses_what_would_be_silently_wrong(tmp_path):
    gpt = tiny_gpt()
    base = gpt.init(jr.key(0))
    lp = lora.init(jr.key(1), base, rank=2)
    # the "lora" strategy of a model on a tree without adapters: it would save ln_f alone
    with pytest.raises(ValueError, match=r"lora.save: strategy 'lora': the tree has no"):
        lora.save(tmp_path / "a.safetensors", base, gpt)
    with pytest.raises(TypeError, match="classes must be a list of class names, got 'ab'"):
        lora.save(tmp_path / "a.safetensors", lp, gpt, classes="ab")
    with pytest.raises(ValueError, match=r"classes .* the tree has no classifier head"):
        lora.save(tmp_path / "a.safetensors", lp, gpt, classes=["a", "b"])
    bad = tree.map(lambda x: x * float("nan"), lp)
    with pytest.raises(ValueError, match=r"lora.save: blocks.0.attn.proj.lora_a holds nan"):
        lora.save(tmp_path / "a.safetensors", bad, gpt)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lora.save(tmp_path, lp, gpt)
    assert os.listdir(tmp_path) == []  # nothing written by any refused call


def test_attach_refuses_nan_sets_and_a_non_bool_check_base(tmp_path):
    base = tiny_gpt().init(jr.key(0))
    leaves = lora.adapters(lora.init(jr.key(1), base, rank=2))
    with pytest.raises(TypeError, match="check_base must be a bool, got 'no'"):
        lora.attach(base, leaves, check_base="no")
    bad = {**leaves, "blocks.1.attn.qkv.lora_b": torch.full((48, 2), float("inf"))}
    with pytest.raises(ValueError, match=r"adapter_set: blocks.1.attn.qkv.lora_b holds inf"):
        lora.attach(base, bad)
    with pytest.raises(TypeError, match=r"adapter_set: expected a \{path: tensor\} mapping"):
        lora.attach(base, list(leaves.items()))


def test_per_row_sets_that_do_not_match_the_batch_are_refused_not_broadcast():
    gpt = tiny_gpt()
    base = gpt.init(jr.key(0))
    sets = lora.stack([lora.init(jr.key(i), base, rank=2) for i in (1, 2)])
    picked = lora.pick(sets, torch.tensor([1, 0, 1]))
    with pytest.raises(
        ValueError, match=r"adapter: 3 per-row adapter sets for input \(2, 5, 16\) \(batch 2\)"
    ):
        gpt.apply(picked, TOKENS)
    # the stacked sets themselves (2) with a batch of 1 would broadcast: refused as well
    with pytest.raises(ValueError, match=r"adapter: 2 per-row adapter sets .*\(batch 1\)"):
        gpt.apply(sets, TOKENS[:1])
    assert gpt.apply(lora.pick(sets, torch.tensor([1, 0])), TOKENS).shape == (2, 5, 40)
