"""The model protocol (issue 22 item 1): only fnllm/models knows an architecture.

Other modules ask the config (block/head/final-norm paths, pooling, LoRA targets, the cached
forward, the Hugging Face codec); one glob dialect lives in ``tree``; adapters reach layers
through ``nn``'s adapter protocol.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import finetune, generate, io, models, nn, optim, testing, tree
from fnllm import random as jr
from fnllm.finetune import lora
from tests._tiny import tiny_bert, tiny_gpt

PACKAGE = Path(__file__).resolve().parents[1] / "fnllm"
CONCRETE = {"GPT", "BERT", "Llama"}
CHECKS = ("isinstance", "issubclass")
# Modules outside models/ that may import a concrete config class: they *build* one (the
# package's re-exports, ``fnllm pretrain --model NAME``, the hypothesis strategies), and the
# test below checks that none of them dispatches on it.
BUILDERS = {"__init__.py", "pretraining.py", "cli/pretrain_demo.py", "testing/_models.py"}


def _outside_models() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "models"]


def _names(node: ast.AST) -> set[str]:
    """Class names a type argument mentions: ``GPT``, ``models.GPT``, ``(GPT, BERT)``."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
    return out


def test_no_module_outside_models_dispatches_on_a_concrete_model_class() -> None:
    offenders = []
    for path in _outside_models():
        rel = str(path.relative_to(PACKAGE))
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            is_check = getattr(getattr(node, "func", None), "id", "") in CHECKS
            if is_check and len(node.args) == 2 and _names(node.args[1]) & CONCRETE:
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) for op in node.ops
            ):
                sides = [node.left, *node.comparators]
                typed = any(
                    isinstance(s, ast.Call) and getattr(s.func, "id", "") == "type" for s in sides
                )
                if typed and set().union(*map(_names, sides)) & CONCRETE:
                    offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fnllm.models"):
                imported = {a.name for a in node.names} & CONCRETE
                if imported and rel not in BUILDERS:
                    offenders.append(f"{rel}:{node.lineno}: imports {sorted(imported)}")
    assert not offenders, "architecture knowledge outside fnllm/models:\n" + "\n".join(offenders)


def test_the_grep_sees_a_dispatch(tmp_path: Path) -> None:
    # the detector itself: a file with the patterns it must flag
    bad = "from fnllm.models import GPT\nif isinstance(m, (models.GPT, BERT)): pass\n"
    tree_ = ast.parse(bad)
    calls = [n for n in ast.walk(tree_) if isinstance(n, ast.Call)]
    assert _names(calls[0].args[1]) & CONCRETE == {"GPT", "BERT"}


def test_layering_models_do_not_import_io_and_globs_and_adapters_have_one_home() -> None:
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from fnllm\.io\b|from fnllm import .*\bio\b)", text, re.M), path
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        code = "\n".join(
            line for line in path.read_text(encoding="utf-8").splitlines()
            if not line.lstrip().startswith((">>>", "...", "#"))
        )  # fmt: skip
        if rel != "tree.py":
            assert not re.search(r"^\s*(import fnmatch|from fnmatch)", code, re.M), (
                f"{rel}: glob matching outside tree.glob_match"
            )
        if rel not in ("nn/_adapters.py", "finetune/lora.py"):
            assert not re.search(r"[\"']lora_(a|b|scale)[\"']", code), f"{rel}: adapter leaf names"


# ----------------------------------------------------------------------------- protocol answers


def test_configs_answer_the_protocol() -> None:
    gpt, untied, bert = tiny_gpt(), tiny_gpt(tie_head=False), tiny_bert()
    assert gpt.is_decoder and not bert.is_decoder
    assert gpt.block_paths() == ("blocks.0", "blocks.1") == bert.block_paths()
    assert (gpt.head_paths(), untied.head_paths()) == (("ln_f",), ("ln_f", "head"))
    assert bert.head_paths() == ("pooler", "mlm", "sop")
    assert tiny_bert(pooler=False, pair_head=False).pool_first_paths() == ()
    assert (gpt.final_norm, bert.final_norm) == ("ln_f", None)
    assert (gpt.default_pooling, bert.default_pooling) == ("last", "mean")
    assert gpt.lora_targets == bert.lora_targets == lora.DEFAULT_TARGETS
    assert gpt.kv_shape() == (2, 8)
    shapes = gpt.param_shapes()
    for model in (gpt, untied, bert):  # every named path is a real sub-tree
        paths = model.param_shapes()
        named = (*model.block_paths(), *model.head_paths(), *model.pool_first_paths())
        for p in named:
            assert any(q == p or q.startswith(p + ".") for q in paths), (model, p)
    assert "ln_f.weight" in shapes


def test_an_encoder_gets_the_named_error_everywhere() -> None:
    bert = tiny_bert()
    params = bert.init(jr.key(0))
    match = r"BERT is an encoder: it has no next-token head or KV cache"
    with pytest.raises(TypeError, match="init_cache: .*" + match):
        generate.init_cache(bert, 1, 4)
    with pytest.raises(TypeError, match="prefill: .*" + match):
        generate.prefill(bert, params, None, torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="logits: .*" + match):
        bert.logits(params, torch.zeros(1, 16))
    with pytest.raises(TypeError, match="model config"):
        generate.init_cache(object(), 1, 4)


@settings(max_examples=12, deadline=None)
@given(
    testing.with_params(testing.gpt_configs(max_len=12)),
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
)
def test_apply_with_a_cache_equals_the_full_forward_for_any_split(
    model_params, cuts, pad, seed
) -> None:
    model, params = model_params
    T = min(sum(cuts), model.max_len)
    pad = min(pad, T - 1)
    tokens = jr.randint(jr.key(seed), (2, T), 0, model.vocab_size)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :pad] = False  # row 1 left-padded: it must decode as it would alone
    cache = model.init_cache(2, T)
    outs, start = [], 0
    for n in cuts:
        if start >= T:
            break
        stop = min(start + n, T)
        m = mask[:, start:stop]
        if not bool(m[:, -1].all()):  # a chunk may not end in padding: extend it
            continue
        logits, cache = model.apply(params, tokens[:, start:stop], attention_mask=m, cache=cache)
        outs.append(logits)
        start = stop
    if start < T:
        logits, cache = model.apply(params, tokens[:, start:], attention_mask=mask[:, start:],
                                    cache=cache)  # fmt: skip
        outs.append(logits)
    got = torch.cat(outs, dim=1)
    assert int(cache.length) == T
    full0 = model.apply(params, tokens[:1])
    alone1 = model.apply(params, tokens[1:, pad:])
    torch.testing.assert_close(got[:1], full0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:, pad:], alone1, atol=1e-5, rtol=1e-5)


def test_apply_with_a_cache_checks_its_inputs() -> None:
    gpt = tiny_gpt()
    params = gpt.init(jr.key(0))
    cache = gpt.init_cache(1, 3)
    tokens = torch.tensor([[1, 2, 3]])
    before = cache.keys[0].clone()
    logits, new = gpt.apply(params, tokens, cache=cache)
    assert torch.equal(cache.keys[0], before) and int(cache.length) == 0  # not modified
    torch.testing.assert_close(logits, gpt.apply(params, tokens))
    with pytest.raises(ValueError, match="1 tokens do not fit in the 0 free slots"):
        gpt.apply(params, tokens[:, :1], cache=new)
    with pytest.raises(ValueError, match="without dropout"):
        gpt.apply(params, tokens, cache=cache, key=jr.key(1))
    with pytest.raises(ValueError, match="pad on the left"):
        gpt.apply(params, tokens, attention_mask=torch.tensor([[1, 1, 0]]), cache=cache)
    with pytest.raises(ValueError, match="do not fit a batch of 2"):
        gpt.apply(params, tokens.repeat(2, 1), cache=cache)


# ----------------------------------------------------------------------------- HF registry


def test_the_hf_registry_finds_every_codec_through_the_configs() -> None:
    assert {"gpt2", "bert"} <= set(models.hf_model_types())
    for cls in models._TYPES.values():
        for mt in cls.hf_model_types:
            codec = models.hf_codec(mt)
            assert mt in codec.MODEL_TYPES
            for name in ("table", "from_hf", "default_arch", "export", "config", "ARCHITECTURES"):
                assert hasattr(codec, name), (mt, name)
    with pytest.raises(ValueError, match=r"model_type 'nope' \(supported: 'gpt2', 'bert'"):
        models.hf_codec("nope")


@settings(max_examples=10, deadline=None)
@given(st.one_of(testing.gpt_configs(), testing.bert_configs()))
def test_every_codec_table_covers_the_layout_exactly(model) -> None:
    codec = models.hf_codec(model.hf_model_types[0])
    rows = codec.table(model)
    assert sorted(p for p, _, _ in rows) == sorted(model.param_shapes())
    assert codec.default_arch(model) in codec.ARCHITECTURES


def test_from_hf_refuses_an_architecture_the_codec_does_not_read(tmp_path: Path) -> None:
    gpt = tiny_gpt()
    out = io.to_hf(gpt, gpt.init(jr.key(0)), tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["GPT2ForSequenceClassification"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architectures \['GPT2ForSeq"):
        io.from_hf(out)
    with pytest.raises(TypeError, match="to_hf_state_dict: expected a model config"):
        io.to_hf_state_dict(object(), {})


# ----------------------------------------------------------------------------- one glob dialect

_SEGMENT = st.sampled_from(["blocks", "0", "1", "10", "attn", "qkv", "weight", "bias", "head"])
_PATHS = st.lists(_SEGMENT, min_size=1, max_size=5).map(".".join)


@given(_PATHS, _PATHS)
def test_a_glob_matches_a_path_and_everything_under_it_at_dot_boundaries(a: str, b: str) -> None:
    assert tree.glob_match(a, a) and tree.glob_match(f"{a}.{b}", a)
    # a prefix that does not end at a dot never matches (blocks.1 is not blocks.10)
    if not (a + ".").startswith(b + ".") and not fnmatch.fnmatchcase(a, b):
        parts = a.split(".")
        assert tree.glob_match(a, b) == any(
            fnmatch.fnmatchcase(".".join(parts[:i]), b) for i in range(1, len(parts))
        )
    assert not tree.glob_match("blocks.10.attn", "blocks.1")


def test_every_filter_speaks_the_dialect_and_shares_the_nothing_check() -> None:
    gpt = tiny_gpt()
    params = gpt.init(jr.key(0))
    glob = "blocks.1"
    selected = set(tree.paths(tree.partition(params, [glob])[0]))
    assert selected == {p for p in tree.paths(params) if p.startswith("blocks.1.")}
    assert {p for p in tree.paths(params) if finetune.Strategy("s", (glob,))(p, None)} == selected
    mask = tree.filter_fn([glob])
    assert {p for p in tree.paths(params) if mask(p, None)} == selected
    adapted = lora.init(jr.key(1), params, rank=2, targets=[glob])
    assert {p.rsplit(".", 1)[0] for p in tree.paths(adapted) if nn.is_adapter_leaf(p)} == {
        "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"
    }  # fmt: skip
    for call in (
        lambda: tree.partition(params, ["blocks.9"]),
        lambda: optim.adamw(0.1, mask=["blocks.9"]).init(params),
    ):
        with pytest.raises(ValueError, match=r"glob 'blocks\.9' matches no leaf"):
            call()
    with pytest.raises(ValueError, match=r"globs \['blocks.9'\] match no linear layer"):
        lora.init(jr.key(1), params, targets=["blocks.9"])


def test_lora_keeps_its_layers_on_exact_targets_and_defaults_to_the_model() -> None:
    params = tiny_gpt().init(jr.key(0))
    linears = [p[: -len(".weight")] for p in tree.paths(params) if p.endswith("attn.qkv.weight")
               or p.endswith("proj.weight") or p.endswith("fc.weight")]  # fmt: skip
    for globs in (lora.DEFAULT_TARGETS, ("*.attn.*", "*.mlp.*"), ("*.blocks.3.attn.qkv",
                                                                   "blocks.0.mlp.fc")):  # fmt: skip
        exact = {p for p in linears if any(fnmatch.fnmatchcase(p, g) for g in globs)}
        if not exact:
            continue
        got = lora.init(jr.key(1), params, rank=2, targets=list(globs))
        assert {p.rsplit(".", 1)[0] for p in tree.paths(got) if p.endswith("lora_a")} == exact
    a = lora.init(jr.key(1), params, rank=2, model=tiny_gpt())
    b = lora.init(jr.key(1), params, rank=2, targets=tiny_gpt().lora_targets)
    assert tree.paths(a) == tree.paths(b)
    clf = finetune.Classifier(tiny_gpt(), 2, "last")
    c = lora.init(jr.key(1), clf.init(jr.key(0), base_params=params), rank=2, model=clf)
    assert [p for p in tree.paths(c) if p.startswith("base.")] == [
        "base." + p for p in tree.paths(a)
    ]


def test_adapters_reach_linear_layers_through_the_nn_protocol() -> None:
    w, a, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
    layer = {"weight": w, **nn.lora_leaves(a, b, torch.tensor(0.5))}
    x = torch.randn(5, 4)
    assert nn.has_adapter(layer) and not nn.has_adapter({"weight": w})
    torch.testing.assert_close(nn.linear(layer, x), x @ nn.adapter_weight(layer).T)
    torch.testing.assert_close(nn.adapter_delta(layer, x), 0.5 * x @ a.T @ b.T)
    assert {*nn.ADAPTER_LEAVES} == {*nn.ADAPTER_TRAINED, *nn.ADAPTER_FIXED}
    nn.check_shapes({"l": layer}, {"l.weight": (3, 4)})  # adapter leaves ride along


def test_bitfit_names_a_model_without_biases() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoBias(models.ModelConfig):
        kind = "nobias"
        vocab_size: int = 4
        n_layer: int = 1
        n_head: int = 1
        d_model: int = 2
        max_len: int = 4
        dropout: float = 0.0

        def init(self, key):
            return {"blocks": [{"w": torch.zeros(2, 2, device=key.device)}]}

        def head_paths(self):
            return ()

    with pytest.raises(ValueError, match="'bitfit' trains the biases, and this NoBias has none"):
        finetune.strategy("bitfit", NoBias())
    assert finetune.strategy("last:1", NoBias()).globs == ("blocks.0",)
