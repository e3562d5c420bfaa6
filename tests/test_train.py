"""Tests for fnllm.train: the compiled step, fit (convergence, NaN guard), checkpoints, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fnllm import data, io, losses, optim, testing, train, tree
from fnllm import random as jr
from fnllm.models.bert import BERT
from fnllm.models.gpt import GPT

HERE = Path(__file__).resolve().parent
PATTERN = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])  # "1" and "5" need context


# ----------------------------------------------------------------------------- tiny GPT setup


def gpt_setup(dropout: float = 0.1, n_layer: int = 2):
    """Model, params, loss and data used in-process and by the resume subprocess alike."""
    model = GPT(vocab_size=16, n_layer=n_layer, n_head=2, d_model=32, max_len=16, dropout=dropout)
    params = model.init(jr.key(0))
    data_key = jr.key(1)

    def batch_of(step: int) -> dict:
        offsets = jr.randint(jr.fold_in(data_key, step), (8,), 0, len(PATTERN))
        idx = (offsets[:, None] + torch.arange(16)[None, :]) % len(PATTERN)
        return {"input_ids": PATTERN[idx]}

    def loss_fn(trainable, frozen, batch, key):
        logits = model.apply(tree.combine(trainable, frozen), batch["input_ids"], key=key)
        return losses.causal_lm(logits, batch["input_ids"])

    return model, params, loss_fn, batch_of


def resume_main(ckpt_dir: str, out: str, steps: int, threads: int) -> None:
    """Entry point of the NEW process in the resume test: resume from ckpt_dir, save result."""
    # bit-identical needs the same kernels and the same reduction order: same thread count
    torch.set_num_threads(threads)
    model, params, loss_fn, batch_of = gpt_setup()
    trainable, frozen = tree.partition(params, ["blocks.1.*", "ln_f"])
    res = train.fit(
        loss_fn,
        optim.adamw(3e-3, weight_decay=0.1),
        trainable,
        frozen,
        batch_of,
        key=jr.key(7),
        steps=steps,
        compile=False,
        progress=False,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=5,
        model=model,
    )
    io.save(
        out,
        {"trainable": res.trainable, "opt_state": res.opt_state},
        meta={"step": res.step, "ran": len(res.history)},
    )


def _python(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=HERE.parent, **kw)


# ----------------------------------------------------------------------------- make_step


def test_step_has_zero_graph_breaks_and_compiled_matches_eager():
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, ["blocks.0.mlp.*", "ln_f"])
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state = opt.init(trainable)
    # aot_eager: dynamo + AOTAutograd (the whole step functionalised, fullgraph) without the
    # minutes inductor's code generation takes on a small machine; see the slow test below
    step = train.make_step(loss_fn, opt, clip=1.0, compile={"backend": "aot_eager"})
    args = (trainable, frozen, state, batch_of(0), jr.key(3))
    explanation = torch._dynamo.explain(step.inner)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    tr_c, st_c, m_c = step(*args)
    tr_e, st_e, m_e = step.inner(*args)
    torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(tree.leaves((tr_c, st_c)), tree.leaves((tr_e, st_e))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert tree.paths(tr_c) == tree.paths(trainable)


@pytest.mark.slow
def test_fit_compiled_with_inductor_matches_eager():
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, ["blocks.0.*", "ln_f"])
    kw = dict(key=jr.key(0), steps=5, progress=False)
    compiled = train.fit(loss_fn, optim.adamw(1e-2), trainable, frozen, batch_of, **kw)
    eager = train.fit(loss_fn, optim.adamw(1e-2), trainable, frozen, batch_of, compile=False, **kw)
    # Adam divides by sqrt(v): where a gradient is ~0, float rounding differences between the
    # fused inductor kernel and eager move a weight by up to ~lr * 1e-2 over 5 steps. That is
    # still 1000x below the 5 * lr = 5e-2 that a wrong update would move it.
    for a, b in zip(tree.leaves(compiled.trainable), tree.leaves(eager.trainable)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


def test_step_is_pure_and_reports_metrics():
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, "blocks.*")
    before = tree.map(torch.clone, params)
    opt = optim.adamw(1e-2)
    state = opt.init(trainable)
    step = train.make_step(loss_fn, opt, compile=False)
    new_tr, _new_state, metrics = step(trainable, frozen, state, batch_of(0), jr.key(0))
    testing.assert_trees_equal(params, before)  # inputs untouched
    assert set(metrics) >= {"loss", "grad_norm", "finite"}
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    with pytest.raises(AssertionError):
        testing.assert_trees_equal(new_tr, trainable)


def test_donated_step_updates_in_place_and_matches_the_pure_step():
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, "blocks.*")
    opt = optim.adamw(1e-2, weight_decay=0.1)
    step = train.make_step(loss_fn, opt, compile=False)
    state = opt.init(trainable)
    pure_tr, pure_state, _ = step(trainable, frozen, state, batch_of(0), jr.key(0))
    frozen_before = tree.map(torch.clone, frozen)
    tr, st = tree.map(torch.clone, trainable), tree.map(torch.clone, state)
    ptrs = [x.data_ptr() for x in tree.leaves(tr)]
    new_tr, new_state, _ = step(tr, frozen, st, batch_of(0), jr.key(0), donate=True)
    testing.assert_trees_equal(new_tr, pure_tr, bitwise=True)  # bit for bit
    testing.assert_trees_equal(new_state, pure_state, bitwise=True)
    assert [x.data_ptr() for x in tree.leaves(new_tr)] == ptrs  # the donated buffers, reused
    testing.assert_trees_equal(frozen, frozen_before)  # frozen leaves are never donated


def test_donated_nonfinite_step_leaves_its_inputs_untouched():
    def loss_fn(trainable, frozen, batch, key):
        return (trainable["w"] * batch).sum()

    opt = optim.adamw(0.1)
    tr = {"w": torch.ones(3)}
    state = opt.init(tr)
    step = train.make_step(loss_fn, opt, compile=False)
    nan = torch.tensor([1.0, float("nan"), 1.0])
    new_tr, new_state, metrics = step(tr, {}, state, nan, None, donate=True)
    assert not bool(metrics["finite"])
    assert torch.equal(tr["w"], torch.ones(3)) and new_tr["w"] is tr["w"]
    testing.assert_trees_equal(new_state, opt.init(tr))


def test_compiled_donated_step_writes_into_the_donated_buffers():
    """Compiled (aot_eager: the same graph capture as inductor, fast), bit for bit the pure step."""
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, "blocks.*")
    opt = optim.adamw(1e-2, weight_decay=0.1)
    step = train.make_step(loss_fn, opt, compile={"backend": "aot_eager"})
    state = opt.init(trainable)
    pure_tr, pure_state, _ = step(trainable, frozen, state, batch_of(0), jr.key(0))
    tr, st = tree.map(torch.clone, trainable), tree.map(torch.clone, state)
    leaves = tree.leaves((tr, st))
    new_tr, new_state, metrics = step(tr, frozen, st, batch_of(0), jr.key(0), donate=True)
    assert bool(metrics["finite"])
    assert all(a is b for a, b in zip(tree.leaves((new_tr, new_state)), leaves))
    testing.assert_trees_equal(new_tr, pure_tr, bitwise=True)
    testing.assert_trees_equal(new_state, pure_state, bitwise=True)


def test_fit_donates_only_its_own_trees():
    """fit updates its own copies in place; the caller's trees stay as they were."""
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, "blocks.*")
    opt = optim.adamw(1e-2)
    state = opt.init(trainable)
    before = tree.map(torch.clone, (trainable, state))
    kw = dict(key=jr.key(3), steps=4, compile=False, progress=False, opt_state=state)
    donated = train.fit(loss_fn, opt, trainable, frozen, batch_of, **kw)
    pure = train.fit(loss_fn, opt, trainable, frozen, batch_of, donate=False, **kw)
    testing.assert_trees_equal((trainable, state), before)
    testing.assert_trees_equal(donated.trainable, pure.trainable)
    testing.assert_trees_equal(donated.opt_state, pure.opt_state)
    # an eval_fn sees fit's own tree; a snapshot it copies keeps its values
    seen = []
    train.fit(loss_fn, opt, trainable, frozen, batch_of, eval_fn=lambda tr, fr: seen.append(
        tree.map(torch.clone, tr)) or 0.0, eval_every=2, **kw)  # fmt: skip
    assert len(seen) == 2
    with pytest.raises(AssertionError):
        testing.assert_trees_equal(seen[0], seen[1])


def test_step_clip_bounds_the_gradient_norm():
    class Sgd:  # updates = -grads, so the update norm is the (clipped) gradient norm
        def init(self, params):
            return ()

        def update(self, grads, state, params):
            return tree.map(lambda g: -g, grads), state

    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    step = train.make_step(loss_fn, Sgd(), compile=False, clip=1e-3)
    new, _, metrics = step(params, {}, (), batch_of(0), jr.key(0))
    delta = torch.sqrt(
        sum(((a - b) ** 2).sum() for a, b in zip(tree.leaves(new), tree.leaves(params)))
    )
    assert float(metrics["grad_norm"]) > 1e-3
    assert abs(float(delta) - 1e-3) < 1e-6


def test_step_aux_and_bf16_autocast():
    model, params, _, batch_of = gpt_setup(n_layer=1, dropout=0.0)

    def loss_fn(trainable, frozen, batch, key):
        logits = model.apply(tree.combine(trainable, frozen), batch["input_ids"])
        return losses.causal_lm(logits, batch["input_ids"]), {
            "logits_dtype": torch.tensor(float(logits.dtype == torch.bfloat16))
        }

    opt = optim.adamw(1e-3)
    step = train.make_step(loss_fn, opt, compile=False, autocast=torch.bfloat16)
    new, _, metrics = step(params, {}, opt.init(params), batch_of(0), jr.key(0))
    assert float(metrics["logits_dtype"]) == 1.0  # the model ran in bf16
    assert all(x.dtype == torch.float32 for x in tree.leaves(new))  # params stay fp32
    assert bool(metrics["finite"])


# ----------------------------------------------------------------------------- fit


def test_fit_tiny_gpt_learns_a_repeated_pattern():
    _model, params, loss_fn, batch_of = gpt_setup(dropout=0.0)
    trainable, frozen = tree.partition(params, "*")
    res = train.fit(
        loss_fn,
        optim.adamw(1e-2),
        trainable,
        frozen,
        batch_of,
        key=jr.key(0),
        steps=200,
        compile=False,
        progress=False,
        eval_fn=lambda tr, fr: loss_fn(tr, fr, batch_of(10_000), None),
        eval_every=100,
    )
    tail = sum(h["loss"] for h in res.history[-10:]) / 10
    assert res.history[0]["loss"] > 2.0 and tail < 0.05, (res.history[0]["loss"], tail)
    assert [e["step"] for e in res.evals] == [100, 200]
    assert res.evals[-1]["eval"] < 0.05
    assert res.step == 200 and not res.skipped and res.history[-1]["tokens_per_s"] > 0


def test_fit_tiny_bert_mlm_learns_a_repeated_pattern():
    """Each sequence repeats one random token: a masked position is its neighbours' token."""
    model = BERT(vocab_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=16)
    params = model.init(jr.key(0))
    mask_id, data_key = 15, jr.key(2)

    def batch_of(step: int) -> dict:
        k_tok, k_mask = jr.split(jr.fold_in(data_key, step))
        tokens = jr.randint(k_tok, (16, 1), 0, 12).expand(16, 16)
        inputs, labels = data.mlm_mask(
            k_mask,
            tokens,
            mask_id=mask_id,
            vocab_size=16,
            prob=0.15,
            random_frac=0.0,
            mask_frac=1.0,
        )
        return {"input_ids": inputs, "labels": labels}

    def loss_fn(trainable, frozen, batch, key):
        p = tree.combine(trainable, frozen)
        hidden = model.apply(p, batch["input_ids"], key=key).last_hidden_state
        return losses.mlm(model.mlm_logits(p, hidden), batch["labels"])

    # the pooler and the sentence-order head get no gradient from MLM: freeze them
    trainable, frozen = tree.partition(
        params, lambda path, x: path.split(".")[0] not in ("pooler", "sop")
    )
    res = train.fit(
        loss_fn,
        optim.adamw(1e-2),
        trainable,
        frozen,
        batch_of,
        key=jr.key(0),
        steps=150,
        compile=False,
        progress=False,
    )
    losses_ = [h["loss"] for h in res.history]
    assert losses_[0] > 2.0
    assert sum(losses_[-10:]) / 10 < 0.1, losses_[-10:]


def _nan_setup():
    params = {"w": torch.tensor([0.5, -1.0, 2.0])}

    def loss_fn(trainable, frozen, batch, key):
        return ((batch["x"] @ trainable["w"]) ** 2).mean() * batch["scale"]

    def batch_of(step: int) -> dict:
        x = jr.normal(jr.fold_in(jr.key(5), step), (4, 3))
        return {"x": x, "scale": torch.tensor(float("nan") if step == 3 else 1.0)}

    return params, loss_fn, batch_of


@pytest.mark.parametrize(
    "mode, compile",
    [("skip", False), ("stop", False), ("raise", False), ("skip", {"backend": "aot_eager"})],
)
def test_fit_nonfinite_guard(mode, compile):
    """Eager steps skip with a branch, compiled ones with a branch-free select."""
    params, loss_fn, batch_of = _nan_setup()
    opt = optim.adamw(0.1)
    kw = dict(key=jr.key(0), compile=compile, progress=False)
    clean = train.fit(loss_fn, opt, params, {}, batch_of, steps=3, **kw)
    if mode == "raise":
        with pytest.raises(train.NonFiniteError, match="step 3"):
            train.fit(loss_fn, opt, params, {}, batch_of, steps=6, on_nonfinite=mode, **kw)
        return
    res = train.fit(loss_fn, opt, params, {}, batch_of, steps=4, on_nonfinite=mode, **kw)
    assert res.skipped == [3]
    # the bad step changed nothing: params and optimizer state are the clean run's, bit for bit
    testing.assert_trees_equal(res.trainable, clean.trainable, bitwise=True)
    testing.assert_trees_equal(res.opt_state, clean.opt_state, bitwise=True)
    if mode == "stop":
        assert res.step == 3 and "non-finite" in res.stopped
    else:
        assert res.step == 4 and res.stopped is None
        more = train.fit(loss_fn, opt, params, {}, batch_of, steps=6, on_nonfinite=mode, **kw)
        assert all(torch.isfinite(x).all() for x in tree.leaves(more.trainable))


def test_fit_rejects_a_filter_that_matches_nothing():
    _model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    trainable, frozen = tree.partition(params, "blocks.7.*")  # there is no block 7
    with pytest.raises(ValueError, match="matched nothing"):
        train.fit(
            loss_fn,
            optim.adamw(1e-3),
            trainable,
            frozen,
            batch_of,
            key=jr.key(0),
            steps=1,
            compile=False,
            progress=False,
        )
    step = train.make_step(loss_fn, optim.adamw(1e-3), compile=False)
    with pytest.raises(ValueError, match="matched nothing"):
        step(trainable, frozen, (), batch_of(0), jr.key(0))


def test_fit_rejects_bad_arguments():
    params, loss_fn, batch_of = _nan_setup()
    kw = dict(key=jr.key(0), compile=False, progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        train.fit(
            loss_fn, optim.adamw(0.1), params, {}, batch_of, steps=1, on_nonfinite="ignore", **kw
        )
    with pytest.raises(ValueError, match="steps"):
        train.fit(loss_fn, optim.adamw(0.1), params, {}, batch_of, steps=-1, **kw)
    with pytest.raises(TypeError, match="data"):
        train.fit(loss_fn, optim.adamw(0.1), params, {}, [1, 2], steps=1, **kw)
    with pytest.raises(ValueError, match="clip"):
        train.make_step(loss_fn, optim.adamw(0.1), clip=0.0)


# ----------------------------------------------------------------------------- checkpoints


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    model, params, loss_fn, batch_of = gpt_setup()
    trainable, frozen = tree.partition(params, ["blocks.1.*", "ln_f"])
    opt = optim.adamw(3e-3, weight_decay=0.1)
    kw = dict(key=jr.key(7), compile=False, progress=False, model=model)
    straight = train.fit(loss_fn, opt, trainable, frozen, batch_of, steps=20, **kw)
    first = train.fit(
        loss_fn,
        opt,
        trainable,
        frozen,
        batch_of,
        steps=10,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        **kw,
    )
    assert first.step == 10
    assert train.latest_checkpoint(tmp_path) == train.checkpoint_path(tmp_path, 10)
    out = tmp_path / "resumed.safetensors"
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_train; "
        f"test_train.resume_main({str(tmp_path)!r}, {str(out)!r}, 20, {torch.get_num_threads()})"
    )
    proc = _python(code, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed, meta = io.load(out, with_meta=True)
    assert meta == {"step": 20, "ran": 10}  # it resumed at 10 and ran the last 10 steps
    testing.assert_trees_equal(resumed["trainable"], straight.trainable, bitwise=True)
    testing.assert_trees_equal(resumed["opt_state"], straight.opt_state, bitwise=True)
    with pytest.raises(AssertionError):
        testing.assert_trees_equal(first.trainable, straight.trainable)


_KILL_SCRIPT = """
import sys, torch
from fnllm import optim, train, random as jr
big = {{"w": torch.zeros(4), "pad": jr.normal(jr.key(1), (1_500_000,))}}
def loss_fn(tr, fr, batch, key):
    return ((batch @ tr["w"] - 1.0) ** 2).mean() + 0.0 * tr["pad"].sum()
train.fit(loss_fn, optim.adamw(1e-2), big, {{}}, lambda s: torch.eye(4) * (1 + s % 3),
          key=jr.key(0), steps=100_000, compile=False, progress=False,
          checkpoint_dir={d!r}, checkpoint_every=1, keep=3)
"""


def test_killing_during_saves_loses_no_saved_checkpoint(tmp_path):
    proc = _python(_KILL_SCRIPT.format(d=str(tmp_path)), stderr=subprocess.DEVNULL)
    seen: set[Path] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            latest = train.latest_checkpoint(tmp_path)
            if latest is not None:
                seen.add(latest)
            if latest is not None and len(seen) >= 4:
                break
            time.sleep(0.01)
        time.sleep(0.037)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = train.latest_checkpoint(tmp_path)
    assert latest is not None and len(seen) >= 4
    template = {"w": torch.zeros(4), "pad": torch.zeros(1_500_000)}
    opt = optim.adamw(1e-2)
    ck = train.load_checkpoint(latest, trainable=template, opt_state=opt.init(template))
    assert ck.step >= max(int(p.stem.split("_")[1]) for p in seen)
    # every complete checkpoint file still in the directory loads
    for p in tmp_path.glob("step_*.safetensors"):
        train.load_checkpoint(p, trainable=template, opt_state=opt.init(template))


def test_checkpoint_from_another_model_or_key_is_refused(tmp_path):
    model, params, loss_fn, batch_of = gpt_setup(n_layer=1)
    opt = optim.adamw(1e-3)
    kw = dict(compile=False, progress=False, checkpoint_dir=tmp_path)
    train.fit(loss_fn, opt, params, {}, batch_of, key=jr.key(0), steps=1, model=model, **kw)
    ckpt = train.latest_checkpoint(tmp_path)
    # a different architecture: shapes differ (caught by shapes even when no config is given)
    other, other_params, other_loss, _ = gpt_setup(n_layer=2)
    with pytest.raises(ValueError, match="does not match this model's trainable params"):
        train.fit(other_loss, opt, other_params, {}, batch_of, key=jr.key(0), steps=2, **kw)
    with pytest.raises(ValueError, match="another model"):
        train.fit(
            other_loss, opt, other_params, {}, batch_of, key=jr.key(0), steps=2, model=other, **kw
        )
    # same shapes, another config (more heads): refused by the recorded config
    same_shapes = GPT(vocab_size=16, n_layer=1, n_head=4, d_model=32, max_len=16, dropout=0.1)
    with pytest.raises(ValueError, match="another model"):
        train.load_checkpoint(ckpt, trainable=params, opt_state=opt.init(params), model=same_shapes)
    # another partition: the trainable half differs
    tr, _fr = tree.partition(params, "blocks.*")
    with pytest.raises(ValueError, match="missing"):
        train.load_checkpoint(
            ckpt, trainable=params | {"extra": torch.zeros(1)}, opt_state=opt.init(params)
        )
    with pytest.raises(ValueError, match="unexpected"):
        train.load_checkpoint(ckpt, trainable=tr, opt_state=opt.init(tr))
    # another key: resuming would not continue that run
    with pytest.raises(ValueError, match="another key"):
        train.fit(loss_fn, opt, params, {}, batch_of, key=jr.key(1), steps=2, model=model, **kw)
    # not a train checkpoint at all
    plain = tmp_path / "plain.safetensors"
    io.save(plain, params)
    with pytest.raises(ValueError, match="not an fnllm train checkpoint"):
        train.load_checkpoint(plain, trainable=params, opt_state=opt.init(params))


def test_load_checkpoint_reads_a_model_config_saved_with_sop_head(tmp_path):
    import safetensors
    import safetensors.torch

    bert = BERT(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
    params, opt = bert.init(jr.key(0)), optim.sgd(0.1)
    path = tmp_path / "ckpt.safetensors"
    train.save_checkpoint(
        path, trainable=params, opt_state=opt.init(params), step=3, key=jr.key(1), model=bert
    )
    with safetensors.safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in list(f.keys())}, f.metadata()
    old = {k: v.replace('"pair_head"', '"sop_head"') for k, v in meta.items()}
    assert old != meta  # the recorded config now uses the old name, as before the rename
    safetensors.torch.save_file(tensors, path, metadata=old)
    ck = train.load_checkpoint(path, trainable=params, opt_state=opt.init(params), model=bert)
    assert ck.step == 3
    testing.assert_trees_equal(ck.trainable, params, bitwise=True)
    other = BERT(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8, dropout=0.1)
    with pytest.raises(ValueError, match="another model"):
        train.load_checkpoint(path, trainable=params, opt_state=opt.init(params), model=other)


def test_checkpoints_are_pruned_and_temporary_files_ignored(tmp_path):
    params, loss_fn, batch_of = _nan_setup()
    batch_ok = lambda s: {**batch_of(s), "scale": torch.tensor(1.0)}
    (tmp_path / ".step_00000099.safetensors.123.abcd.tmp").write_bytes(b"partial")
    res = train.fit(
        loss_fn,
        optim.adamw(0.1),
        params,
        {},
        batch_ok,
        key=jr.key(0),
        steps=7,
        compile=False,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        keep=2,
    )
    names = sorted(p.name for p in tmp_path.glob("step_*.safetensors"))
    assert names == ["step_00000006.safetensors", "step_00000007.safetensors"]
    ck = train.load_checkpoint(
        train.latest_checkpoint(tmp_path), trainable=params, opt_state=optim.adamw(0.1).init(params)
    )
    assert ck.step == 7
    testing.assert_trees_equal(ck.trainable, res.trainable)
    # running again with the same target resumes at 7 and does nothing
    again = train.fit(
        loss_fn,
        optim.adamw(0.1),
        params,
        {},
        batch_ok,
        key=jr.key(0),
        steps=7,
        compile=False,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    assert again.step == 7 and again.history == []
    testing.assert_trees_equal(again.trainable, res.trainable)
