"""Llama, Qwen2 and Mistral against `transformers`: from_hf, to_hf, logits and greedy decoding.

Reference models are built from small random configs (grouped-query attention on, llama3
rope scaling on for Llama) with weights re-drawn at std 0.2, so a wrong mapping or a wrong
rotation cannot hide under the tolerance.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import transformers

from fnllm import _cpu16, generate, io, losses, random, tree
from fnllm.finetune import lora
from fnllm.models import Llama

TOL = 1e-4
V = 61

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              {"rope_scaling": LLAMA3, "rope_theta": 500.0}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"tie_word_embeddings": True, "rope_theta": 1000.0}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": None}),
}  # fmt: skip


def _config(arch: str, **kw):
    cls, _, extra = ARCHS[arch]
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                bos_token_id=1, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return cls(**{**base, **extra, **kw})


def _hf(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A `transformers` model of ``arch`` with every weight re-drawn (norms near 1)."""
    model = ARCHS[arch][1](_config(arch, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def _batch(seed: int, pad: str, T: int = 11):
    tokens = torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    if pad == "right":
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    elif pad == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    return tokens, mask


def _maxdiff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_from_hf_logits_match_transformers(tmp_path, arch, pad):
    hf = _hf(arch)
    hf.save_pretrained(tmp_path)
    tokens, mask = _batch(1, pad)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
    for src, cfg in ((tmp_path, None), (hf.state_dict(), hf.config.to_dict()), (hf, None)):
        model, params = io.from_hf(src, cfg)
        assert isinstance(model, Llama)
        assert model.n_kv_head == 2 and model.qkv_bias == (arch == "qwen2")
        assert model.tie_head == (arch == "qwen2") and ("head" in params) != model.tie_head
        out = model.apply(params, tokens, attention_mask=mask)
        assert _maxdiff(out, ref, mask) <= TOL


def test_from_hf_reads_llama3_rope_scaling():
    model, _ = io.from_hf(_hf("llama"))
    assert (model.rope_type, model.rope_theta, model.rope_factor) == ("llama3", 500.0, 4.0)
    assert model.rope_original_max_len == 16


def test_hidden_states_match_transformers():
    hf = _hf("qwen2", 3)
    model, params = io.from_hf(hf)
    tokens, mask = _batch(4, "right")
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    out = model.apply(params, tokens, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == 3
    for ours, theirs in zip(out.hidden_states, ref):
        assert _maxdiff(ours, theirs, mask) <= TOL


@pytest.mark.parametrize("spelling", ["rope_parameters", "hub"])
def test_from_hf_reads_both_rope_spellings(tmp_path, spelling):
    hf = _hf("llama", 5)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {**LLAMA3, "rope_theta": 500.0}
    if spelling == "hub":  # what configs on the Hub say: rope_theta + rope_scaling
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
    else:
        cfg["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, params = io.from_hf(tmp_path)
    assert model == io.from_hf(hf)[0]
    tokens, mask = _batch(6, "none")
    with torch.no_grad():
        ref = hf(tokens).logits
    assert _maxdiff(model.apply(params, tokens), ref, mask) <= TOL


def test_from_hf_reads_sharded_checkpoints(tmp_path):
    hf = _hf("mistral", 7)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, params = io.from_hf(tmp_path)
    tokens, mask = _batch(8, "none")
    with torch.no_grad():
        ref = hf(tokens).logits
    assert _maxdiff(model.apply(params, tokens), ref, mask) <= TOL


def test_from_hf_reads_bf16_weights(tmp_path, monkeypatch):
    # PyTorch's own 16-bit CPU kernels, as transformers runs them (on a CPU without bf16
    # units fnllm multiplies in float32 instead: the next test)
    monkeypatch.setattr(_cpu16, "_native_units", lambda dtype: True)
    _hf("llama", 9).to(torch.bfloat16).save_pretrained(tmp_path)
    # Loaded, not cast: `.to(bfloat16)` would also round transformers' rotary frequencies.
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model, params = io.from_hf(tmp_path)
    assert {x.dtype for x in tree.leaves(params)} == {torch.bfloat16}
    tokens, mask = _batch(10, "right")
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
        ref32 = hf.float()(tokens, attention_mask=mask).logits
    out = model.apply(params, tokens, attention_mask=mask)
    assert out.dtype == torch.bfloat16
    assert _maxdiff(out.float(), ref.float(), mask) <= TOL  # the same bf16 arithmetic
    _, params32 = io.from_hf(tmp_path, dtype=torch.float32)
    assert _maxdiff(model.apply(params32, tokens, attention_mask=mask), ref32, mask) <= TOL


def test_bf16_in_float32_on_a_cpu_without_bf16_units_is_closer_to_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu16, "_native_units", lambda dtype: False)
    _hf("llama", 9).to(torch.bfloat16).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model, params = io.from_hf(tmp_path)
    tokens, mask = _batch(10, "right")
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits.float()  # bf16 kernels
        ref32 = hf.float()(tokens, attention_mask=mask).logits
    out = model.apply(params, tokens, attention_mask=mask)
    assert out.dtype == torch.bfloat16
    # each product rounded once from float32: no farther from the float32 model than
    # bf16 kernels are, and within a few bf16 steps of them
    assert _maxdiff(out.float(), ref32, mask) <= 1.05 * _maxdiff(ref, ref32, mask)
    assert _maxdiff(out.float(), ref, mask) <= 0.1


# ----------------------------------------------------------------------------- decoding


def _greedy(model, params, tokens, mask, steps: int) -> torch.Tensor:
    """Greedy decoding with the cached forward: prefill the left-padded prompts, then one
    token per step."""
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + steps)
    x, cache = model.apply_cached(params, tokens, mask.bool(), cache)
    out = []
    for _ in range(steps):
        nxt = model.logits(params, x[:, -1]).argmax(-1)
        out.append(nxt)
        x, cache = model.apply_cached(params, nxt[:, None], torch.ones_like(nxt[:, None]).bool(),
                                      cache)  # fmt: skip
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_decoding_equals_transformers_generate_on_ragged_batches(arch):
    hf = _hf(arch, 11, max_position_embeddings=64)
    model, params = io.from_hf(hf)
    tokens, mask = _batch(12, "left", T=9)
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    assert torch.equal(_greedy(model, params, tokens, mask, 10), ref[:, tokens.shape[1] :])


def test_generate_sample_equals_transformers_generate_on_ragged_prompts():
    from fnllm.models import _cache

    if not hasattr(_cache, "apply_checked"):  # generate takes any decoder with the protocol
        pytest.skip("generate.sample takes a Llama once the model protocol is merged")
    hf = _hf("qwen2", 30, max_position_embeddings=64)
    model, params = io.from_hf(hf)
    tokens, mask = _batch(31, "left", T=9)
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    rows = [t[m.bool()].tolist() for t, m in zip(tokens, mask)]  # ragged lists, unpadded
    out = generate.sample(None, model, params, rows, 10, temperature=0)
    assert torch.equal(out, ref[:, tokens.shape[1] :])


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_logits_and_gradients_equal_peft():
    peft = pytest.importorskip("peft")
    hf = _hf("llama", 20)
    model, params = io.from_hf(hf)
    lp = lora.init(random.key(1), params, rank=4, alpha=8.0, targets=list(model.lora_targets))
    flat = tree.flatten(lp)
    g = torch.Generator().manual_seed(21)
    for path in [p for p in flat if p.endswith("lora_b")]:  # B away from zero: a real delta
        flat[path] = 0.1 * torch.randn(flat[path].shape, generator=g)
    names = {f"attn.{x}": f"self_attn.{x}_proj" for x in "qkvo"}
    names.update({f"mlp.{x}": f"mlp.{x}_proj" for x in ("gate", "up", "down")})
    targets = [theirs.split(".")[-1] for theirs in names.values()]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for i in range(model.n_layer):
            for ours, hf_name in names.items():
                stem = f"base_model.model.model.layers.{i}.{hf_name}"
                theirs[f"{stem}.lora_A.default.weight"].copy_(flat[f"blocks.{i}.{ours}.lora_a"])
                theirs[f"{stem}.lora_B.default.weight"].copy_(flat[f"blocks.{i}.{ours}.lora_b"])
    adapters = {p: x.requires_grad_() for p, x in flat.items() if p.endswith(("lora_a", "lora_b"))}
    tokens, mask = _batch(22, "right")
    out = model.apply(tree.unflatten({**flat, **adapters}), tokens, attention_mask=mask)
    ref = pm(tokens, attention_mask=mask).logits
    assert _maxdiff(out.detach(), ref.detach(), mask) <= TOL
    losses.causal_lm(out, tokens).backward()
    losses.causal_lm(ref, tokens).backward()
    for i in range(model.n_layer):
        for ours, hf_name in names.items():
            stem = f"base_model.model.model.layers.{i}.{hf_name}"
            for a, b in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                want = theirs[f"{stem}.{b}.default.weight"].grad
                got = adapters[f"blocks.{i}.{ours}.{a}"].grad
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (i, ours, a)


# ----------------------------------------------------------------------------- writing


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def _load_quietly(cls, path):
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = cls.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    assert handler.records == [] and [str(w.message) for w in caught] == []
    return model.eval()


@pytest.mark.parametrize(
    ("fields", "cls"),
    [
        ({"rope_type": "llama3", "rope_original_max_len": 8, "rope_theta": 300.0},
         transformers.LlamaForCausalLM),
        ({"qkv_bias": True, "tie_head": True}, transformers.Qwen2ForCausalLM),
        ({"head_dim": 6}, transformers.LlamaForCausalLM),
    ],
)  # fmt: skip
def test_to_hf_loads_in_transformers_with_equal_logits(tmp_path, fields, cls):
    model = Llama(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24,
                  max_len=32, **fields)  # fmt: skip
    params = tree.map(lambda x: x * 10 if x.ndim == 2 else x + 0.1, model.init(random.key(0)))
    io.to_hf(model, params, tmp_path)
    hf = _load_quietly(cls, tmp_path)
    tokens, mask = _batch(13, "right")
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
    assert _maxdiff(model.apply(params, tokens, attention_mask=mask), ref, mask) <= TOL
    again, params2 = io.from_hf(tmp_path)
    assert again == model
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(params2)))


def test_to_hf_bare_backbone_leaves_the_head_out(tmp_path):
    model = Llama(vocab_size=V, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
    sd = io.to_hf_state_dict(model, model.init(random.key(0)), architecture="LlamaModel")
    assert "layers.0.self_attn.q_proj.weight" in sd and not any("lm_head" in k for k in sd)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("arch", "kw", "match"),
    [
        ("mistral", {"sliding_window": 16}, "sliding_window=16 is not supported"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
         "sliding_window=8"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_by_name(arch, kw, match):
    hf = ARCHS[arch][1](_config(arch, **kw))
    with pytest.raises(ValueError, match=match):
        io.from_hf(hf.state_dict(), hf.config.to_dict())


def test_a_wide_sliding_window_loads():
    hf = _hf("mistral", 14, sliding_window=32)  # = max_position_embeddings: no effect
    model, params = io.from_hf(hf)
    tokens, mask = _batch(15, "none")
    with torch.no_grad():
        ref = hf(tokens).logits
    assert _maxdiff(model.apply(params, tokens), ref, mask) <= TOL


def test_a_checkpoint_missing_a_layer_is_named():
    hf = _hf("llama", 16)
    state = {k: v for k, v in hf.state_dict().items() if ".layers.1.mlp." not in k}
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        io.from_hf(state, hf.config.to_dict())


def test_unsupported_architectures_are_named():
    hf = _hf("llama", 17)
    cfg = {**hf.config.to_dict(), "architectures": ["LlamaForSequenceClassification"]}
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        io.from_hf(hf.state_dict(), cfg)


def test_exporting_under_another_family_is_refused():
    model = Llama(vocab_size=V, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        io.to_hf_state_dict(model, model.init(random.key(0)), architecture="MistralForCausalLM")
