"""Compiled steps with dropout: masks drawn by ``fnllm::keep_mask`` (bit-identical to eager and
to the op path), the native random kernel, and compile caches reused by a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import vmap

from fnllm import losses, nn, optim, train, tree
from fnllm import random as jr
from fnllm.random import _fast, _keys, _native
from tests._tiny import tiny_bert, tiny_gpt

ROOT = Path(__file__).resolve().parents[1]


def _reference_keep(k: torch.Tensor, shape: tuple, p: float) -> torch.Tensor:
    """The keep mask by the plain op path, whatever the size: uniform < float32(p)."""
    bits = _keys._random_bits32(k[0], k[1], shape, k.device)
    return (bits >> 9).to(torch.float32) * 2.0**-23 < torch.tensor(p, dtype=torch.float32)


def _graph_targets(fn, *args) -> list[str]:
    """Run ``fn`` under torch.compile (AOT graph, no codegen) and list the graph's ops."""
    from torch._functorch.aot_autograd import aot_module_simplified

    seen: list[str] = []

    def fw(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    out = torch.compile(
        fn, fullgraph=True, backend=lambda gm, ins: aot_module_simplified(gm, ins, fw_compiler=fw)
    )(*args)
    return seen, out


@pytest.mark.parametrize("rate", [0.1, 0.5, 1 / 3])
def test_compiled_dropout_mask_is_one_op_with_the_eager_bits(rate: float) -> None:
    x = torch.randn(70, 80)  # 5600 values: the eager side runs the native kernel
    k = jr.key(11)
    want = _reference_keep(k, tuple(x.shape), 1.0 - rate)
    eager = nn.dropout(k, x, rate)
    targets, compiled = _graph_targets(lambda k, x: nn.dropout(k, x, rate), k, x)
    assert targets.count("fnllm.keep_mask.default") == 1
    assert not any("shift" in t for t in targets)  # no threefry rounds over the tensor
    assert torch.equal(eager != 0, want) and torch.equal(compiled != 0, want)
    assert torch.equal(compiled, eager)


def test_inline_mode_traces_the_hash_with_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FNLLM_COMPILED_SAMPLER", "inline")
    x, k = torch.randn(9, 7), jr.key(3)
    targets, compiled = _graph_targets(lambda k, x: nn.dropout(k, x, 0.25), k, x)
    assert "fnllm.keep_mask.default" not in targets and any("shift" in t for t in targets)
    assert torch.equal(compiled, nn.dropout(k, x, 0.25))
    monkeypatch.setenv("FNLLM_COMPILED_SAMPLER", "fused please")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="FNLLM_COMPILED_SAMPLER"):
        torch.compile(lambda k: jr.bernoulli(k, 0.5, (3,)), fullgraph=True, backend="eager")(k)


def test_keep_mask_under_vmap_and_compile_equals_a_loop() -> None:
    keys = jr.split(jr.key(5), 3)
    f = lambda k: jr.bernoulli(k, 0.7, (6, 5))
    loop = torch.stack([f(k) for k in keys])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(vmap(f), fullgraph=True, backend="aot_eager")(keys), loop)
    assert torch.equal(_fast.keep_mask(keys[1], [6, 5], _fast.below_threshold(0.7)), loop[1])


@pytest.mark.parametrize("p", [0.0, 1.0, 0.9, 0.1, 1e-9, 1 - 2**-24, 0.3333333])
def test_threshold_matches_the_float32_comparison(p: float) -> None:
    k = jr.key(2)
    bits = _keys._random_bits32(k[0], k[1], (3000,), k.device)
    t = _fast.below_threshold(p)
    assert torch.equal((bits >> 9) < t, _reference_keep(k, (3000,), p))


@pytest.mark.parametrize("make", [tiny_gpt, tiny_bert], ids=["gpt", "bert"])
def test_compiled_step_with_dropout_equals_eager(make) -> None:
    model = make(dropout=0.3, max_len=80, n_layer=1)
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 80), 0, model.vocab_size)  # masks of 2*2*80*80 values

    def loss_fn(tr, fr, batch, key):
        out = model.apply(tree.combine(tr, fr), batch, key=key)
        logits = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        if make is tiny_gpt:
            return losses.causal_lm(logits, batch)
        return (logits[..., :3] ** 3).mean()

    opt = optim.adamw(1e-2)
    state = opt.init(params)
    key = jr.key(9)
    eager = train.make_step(loss_fn, opt, compile=False)(params, {}, state, tokens, key)
    torch._dynamo.reset()
    step = train.make_step(loss_fn, opt, compile={"backend": "aot_eager"})
    compiled = step(params, {}, state, tokens, key)
    # the same masks: the losses agree to the bit, the updates to rounding (func.grad vs
    # autograd.grad order their sums alike, but the compiled optimizer update differs)
    assert torch.equal(compiled[2]["loss"], eager[2]["loss"])
    for a, b in zip(tree.leaves(compiled[0]), tree.leaves(eager[0])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    no_drop = train.make_step(loss_fn, opt, compile=False)(params, {}, state, tokens, None)
    assert not torch.equal(no_drop[2]["loss"], eager[2]["loss"])  # dropout did act


def test_native_kernel_equals_the_op_path_in_every_kind() -> None:
    k = jr.key(2**31 + 7)
    k0, k1 = k.tolist()
    for n in (1, 4097, 3 * _native._CHUNK + 5):
        bits = _keys._random_bits32(k[0], k[1], (n,), k.device)
        assert torch.equal(_native.draw("bits", k0, k1, n), bits)
        assert torch.equal(_native.draw("unit", k0, k1, n), (bits >> 9).float() * 2.0**-23)
        got = _native.draw("below", k0, k1, n, _fast.below_threshold(0.9))
        assert torch.equal(got, _reference_keep(k, (n,), 0.9))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FNLLM_CACHE_DIR", str(tmp_path / "c"))
    assert _native.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FNLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native.cache_dir() == tmp_path / "xdg" / "fnllm"


_CHILD = textwrap.dedent(
    """
    import json, time, torch
    from torch._dynamo.utils import counters
    from fnllm import nn, random as jr
    from fnllm.random import _native
    torch.set_num_threads(1)
    built = _native.is_built()
    f = torch.compile(lambda k, x: nn.dropout(k, x * 2, 0.1).sum(), fullgraph=True)
    out = f(jr.key(1), torch.ones(64, 64))
    print(json.dumps({"built_before": built, "out": out.item(),
                      "hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"]}))
    """
)


def test_a_second_process_hits_the_caches(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "FNLLM_CACHE_DIR": str(tmp_path / "fnllm"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }

    def run() -> dict:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["miss"] >= 1 and first["hit"] == 0 and not first["built_before"]
    assert second["hit"] >= 1 and second["miss"] == 0 and second["built_before"]
    assert first["out"] == second["out"]
    assert list((tmp_path / "fnllm" / "native").glob("threefry-*"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_native_draws_work_in_a_forked_child() -> None:
    # a data-loader worker forked after the parent made its thread pool must not hang
    torch.set_num_threads(2)
    try:
        k0, k1 = jr.key(4).tolist()
        n = 4 * _native._CHUNK
        want = _native.draw("bits", k0, k1, n)  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:  # child: exit 0 only if the draw finishes with the same bits
            ok = torch.equal(_native.draw("bits", k0, k1, n), want)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(1)


def test_fake_tensors_take_the_op_path_without_disabling_the_kernel() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        k = mode.from_tensor(jr.key(1))
        out = jr.bernoulli(k, 0.9, (80, 80))
    assert out.shape == (80, 80) and out.dtype == torch.bool
    assert not _fast._FAST_CACHE.get("broken")


def _blocks_loss(model):
    """A loss through ``apply_blocks`` (the loop whose blocks are nested compile regions)."""

    def loss_fn(tr, fr, batch, key):
        params = tree.combine(tr, fr)
        k_emb, k_blocks = jr.split(key)
        x = model.embed(params, batch, key=k_emb)
        x = model.finish(params, model.apply_blocks(params, x, key=k_blocks))
        return (x[..., :3] ** 2).mean()

    return loss_fn


@pytest.mark.parametrize("make", [tiny_gpt, tiny_bert], ids=["gpt", "bert"])
def test_regional_step_traces_one_block_for_every_layer_and_equals_eager(make) -> None:
    from torch._dynamo import lookup_backend

    model = make(dropout=0.3, n_layer=3)
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 16), 0, model.vocab_size)
    loss_fn, opt = _blocks_loss(model), optim.adamw(1e-2)
    state, key = opt.init(params), jr.key(9)
    graphs: list = []

    def backend(gm, inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, inputs)

    eager = train.make_step(loss_fn, opt, compile=False)(params, {}, state, tokens, key)
    torch._dynamo.reset()
    step = train.make_step(loss_fn, opt, compile={"backend": backend, "regional": True})
    compiled = step(params, {}, state, tokens, key)
    (gm,) = graphs
    calls = [n for n in gm.graph.nodes if "invoke_subgraph" in str(n.target)]
    regions = [name for name, _ in gm.named_children() if name.startswith("subgraph")]
    assert len(calls) == 3 and len(regions) == 1  # three layers, one traced block
    # the same masks and the same arithmetic: loss, gradients and update agree to the bit
    assert torch.equal(compiled[2]["loss"], eager[2]["loss"])
    assert torch.equal(compiled[2]["grad_norm"], eager[2]["grad_norm"])
    for a, b in zip(tree.leaves(compiled[0]), tree.leaves(eager[0])):
        assert torch.equal(a, b)


def test_whole_step_compile_inlines_the_blocks() -> None:
    # torch.func.grad in the graph: no regions (Dynamo cannot trace them under a transform)
    from torch._dynamo import lookup_backend

    model = tiny_bert(dropout=0.3, n_layer=1)
    params = model.init(jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 16), 0, model.vocab_size)
    loss_fn, opt = _blocks_loss(model), optim.sgd(0.1)
    graphs: list = []

    def backend(gm, inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, inputs)

    state = opt.init(params)
    eager = train.make_step(loss_fn, opt, compile=False)(params, {}, state, tokens, jr.key(9))
    torch._dynamo.reset()
    step = train.make_step(loss_fn, opt, compile={"backend": backend})
    whole = step(params, {}, state, tokens, jr.key(9))
    assert not any("invoke_subgraph" in str(n.target) for n in graphs[0].graph.nodes)
    assert torch.equal(whole[2]["loss"], eager[2]["loss"])


def test_regional_blocks_under_vmap_and_compile() -> None:
    model = tiny_bert(dropout=0.3, n_layer=2)
    params = model.init(jr.key(0))
    x = torch.randn(3, 1, 5, 16)
    keys = jr.split(jr.key(4), 3)
    f = lambda x, k: model.apply_blocks(params, x, key=k)
    loop = torch.stack([f(x[i], keys[i]) for i in range(3)])
    torch._dynamo.reset()
    got = torch.compile(vmap(f), fullgraph=True, backend="aot_eager")(x, keys)
    assert torch.equal(got, loop)


_STEP_CHILD = textwrap.dedent(
    """
    import json, torch
    from torch._dynamo.utils import counters
    from fnllm import optim, random as jr, train, tree
    from tests._tiny import tiny_bert
    from tests.test_compile import _blocks_loss
    torch.set_num_threads(1)
    model = tiny_bert(dropout=0.1, n_layer=2)
    params, opt = model.init(jr.key(0)), optim.adamw(1e-3)
    tokens = jr.randint(jr.key(1), (2, 8), 0, model.vocab_size)
    step = train.make_step(_blocks_loss(model), opt, compile={"regional": True})
    _, _, m = step(params, {}, opt.init(params), tokens, jr.key(2))
    fx, aot = counters["inductor"], counters["aot_autograd"]
    print(json.dumps({"loss": m["loss"].item(),
                      "fx": [fx["fxgraph_cache_hit"], fx["fxgraph_cache_miss"]],
                      "aot": [aot["autograd_cache_hit"], aot["autograd_cache_miss"]]}))
    """
)


def test_a_second_process_reuses_the_compiled_regional_step(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "FNLLM_CACHE_DIR": str(tmp_path / "fnllm"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }

    def run() -> dict:
        res = subprocess.run(
            [sys.executable, "-c", _STEP_CHILD],
            env=env, capture_output=True, text=True, check=False, cwd=ROOT,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["fx"][0] == 0 and first["fx"][1] >= 2 and first["aot"] == [0, 1]
    # forward and backward kernels from the FX-graph cache, the joint graph from AOTAutograd's
    assert second["fx"] == [first["fx"][1], 0] and second["aot"] == [1, 0]
    assert second["loss"] == first["loss"]


def test_regional_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"compile\['regional'\] must be a bool"):
        train.make_step(lambda *a: 0.0, optim.sgd(0.1), compile={"regional": "yes"})
