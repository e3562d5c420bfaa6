"""BERT's Hugging Face codec (private; :class:`~fnllm.models.BERT` names it, see
:mod:`fnllm.models._hf` for the interface).

Query, key and value are concatenated into one ``qkv`` projection; the pooler, the MLM head
and the sentence-pair head are switched on exactly when their weights are present.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnllm.models import _hf as common

_BERT_ACTS = ("gelu", "gelu_python")  # exact erf GELU
MODEL_TYPES = ("bert",)
ARCHITECTURES = (
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForNextSentencePrediction",
)
LEGACY_KEY = "hidden_size"
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "max_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "ln_eps": "layer_norm_eps",
}
FAN_IN_FAN_OUT = False  # BERT's Linear layers store [out, in]


_BERT_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")


def table(model: Any) -> list[tuple[str, str, list[str]]]:
    """(fnllm path, op, HF names without 'bert.'); op: copy | cat (rows [q; k; v])."""

    def dense(ours: str, theirs: str) -> list[tuple[str, str, list[str]]]:
        return [(f"{ours}.{w}", "copy", [f"{theirs}.{w}"]) for w in ("weight", "bias")]

    rows = [
        ("embed.tokens.weight", "copy", ["embeddings.word_embeddings.weight"]),
        ("embed.positions.weight", "copy", ["embeddings.position_embeddings.weight"]),
        ("embed.token_types.weight", "copy", ["embeddings.token_type_embeddings.weight"]),
        *dense("embed.ln", "embeddings.LayerNorm"),
    ]
    for i in range(model.n_layer):
        b, h = f"blocks.{i}", f"encoder.layer.{i}"
        for w in ("weight", "bias"):
            qkv = [f"{h}.attention.self.{n}.{w}" for n in ("query", "key", "value")]
            rows.append((f"{b}.attn.qkv.{w}", "cat", qkv))
        rows += dense(f"{b}.attn.proj", f"{h}.attention.output.dense")
        rows += dense(f"{b}.ln_1", f"{h}.attention.output.LayerNorm")
        rows += dense(f"{b}.mlp.fc", f"{h}.intermediate.dense")
        rows += dense(f"{b}.mlp.proj", f"{h}.output.dense")
        rows += dense(f"{b}.ln_2", f"{h}.output.LayerNorm")
    if model.pooler:
        rows += dense("pooler", "pooler.dense")
    if model.mlm_head:
        rows += dense("mlm.transform", "cls.predictions.transform.dense")
        rows += dense("mlm.ln", "cls.predictions.transform.LayerNorm")
        rows.append(("mlm.bias", "copy", ["cls.predictions.bias"]))
    if model.pair_head:
        rows += dense("sop", "cls.seq_relationship")
    return rows


def from_hf(
    state: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    from fnllm.models.bert import BERT

    common.require(where, cfg, "hidden_act", "gelu", _BERT_ACTS, "the exact GELU")
    common.require(where, cfg, "position_embedding_type", "absolute", ("absolute",))
    for field in ("is_decoder", "add_cross_attention"):
        if cfg.get(field, False):
            common.refuse(where, field, cfg[field], False)

    has_prefix = any(k.startswith("bert.") for k in state)
    stripped: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for k, v in state.items():
        name = k.removeprefix("bert.") if has_prefix else k
        if has_prefix and not k.startswith(("bert.", "cls.")):
            name = "\0" + k
        # TensorFlow-era names
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        if name in _BERT_IGNORED:
            continue
        stripped[name] = v
        names[name] = k
    # The MLM decoder is tied to the word embeddings; its bias is cls.predictions.bias.
    decoder_w = stripped.pop("cls.predictions.decoder.weight", None)
    decoder_b = stripped.pop("cls.predictions.decoder.bias", None)
    if decoder_b is not None and "cls.predictions.bias" not in stripped:
        stripped["cls.predictions.bias"] = decoder_b
        names["cls.predictions.bias"] = names["cls.predictions.decoder.bias"]
    words = stripped.get("embeddings.word_embeddings.weight")
    if (
        decoder_w is not None
        and not cfg.get("tie_word_embeddings", True)
        and words is not None
        and not torch.equal(decoder_w, words)
    ):
        raise ValueError(
            f"from_hf: {where}: the MLM decoder is not tied to the word embeddings "
            "(tie_word_embeddings=false); fnllm's BERT always ties it"
        )
    mlm = any(k.startswith("cls.predictions.") for k in stripped) or decoder_w is not None
    model = BERT(
        **common.read_fields(cfg, CONFIG_KEYS),
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        pooler=any(k.startswith("pooler.") for k in stripped),
        mlm_head=mlm,
        pair_head=any(k.startswith("cls.seq_relationship.") for k in stripped),
    )
    prefix = "bert." if has_prefix else ""
    params = common.apply_table(model, table(model), stripped, names, prefix, where)
    return model, params


def default_arch(model: Any) -> str:
    """The `transformers` class a BERT exports to by default (the one holding its heads)."""
    if model.mlm_head and model.pair_head:
        return "BertForPreTraining"
    if model.mlm_head:
        return "BertForMaskedLM"
    if model.pair_head:
        return "BertForNextSentencePrediction"
    return "BertModel"


def export(model: Any, arch: str) -> tuple[str, common.Table, Callable[[str], bool]]:
    """``(name prefix, table, keep(hf_name))`` for writing ``model`` as ``arch``."""
    allowed = {
        "BertModel": ("pooler",),
        "BertForPreTraining": ("pooler", "mlm", "sop"),
        "BertForMaskedLM": ("mlm",),
        "BertForNextSentencePrediction": ("pooler", "sop"),
    }
    if arch not in allowed:
        raise ValueError(f"to_hf: unsupported BERT architecture {arch!r}")
    needed = {a for a in allowed[arch] if a != "pooler" or arch != "BertModel"}
    have = {"pooler": model.pooler, "mlm": model.mlm_head, "sop": model.pair_head}
    lacking = sorted(a for a in needed if not have[a])
    if lacking:
        raise ValueError(
            f"to_hf: {arch} needs the {', '.join(lacking)} weights, which this BERT "
            f"(pooler={model.pooler}, mlm_head={model.mlm_head}, pair_head={model.pair_head}) "
            "does not have"
        )
    prefix = "" if arch == "BertModel" else "bert."
    rows = table(model)
    parts = allowed[arch]
    keep = lambda hf: (
        not (
            (hf.startswith("pooler.") and "pooler" not in parts)
            or (hf.startswith("cls.predictions.") and "mlm" not in parts)
            or (hf.startswith("cls.seq_relationship.") and "sop" not in parts)
        )
    )
    return prefix, rows, keep


def config(model: Any) -> dict[str, Any]:
    """``config.json`` entries for ``model`` (``io.hf_config`` adds architecture and type)."""
    return {
        **common.write_fields(model, CONFIG_KEYS),
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "hidden_dropout_prob": model.dropout,
        "attention_probs_dropout_prob": model.dropout,
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
    }


def sequence_classification(model: Any, pooling: str) -> dict[str, Any] | str:
    """How a classifier over this BERT maps to ``BertForSequenceClassification``, or why not.

    That class pools the first token through the pooler (``cls`` pooling with a pooler) and
    names its head ``classifier``; the backbone sits under ``bert.``.
    """
    if pooling != "cls":
        return f"BertForSequenceClassification pools the [CLS] token, not {pooling!r}"
    if not model.pooler:
        return "BertForSequenceClassification pools through a pooler, which this BERT lacks"
    return {
        "architecture": "BertForSequenceClassification",
        "backbone": "BertModel",
        "prefix": "bert.",
        "head": {"weight": "classifier.weight", "bias": "classifier.bias"},
        "config": {},
    }


def peft_modules(model: Any) -> dict[str, list[str]]:
    """fnllm linear layer -> the `transformers` modules (backbone names) that peft adapts.

    The fused ``qkv`` is three modules (``query``, ``key``, ``value``), in that row order.
    """
    out: dict[str, list[str]] = {}
    for path, _op, names in table(model):
        linear = not (path.startswith("embed.") or ".ln" in path or path.startswith("ln"))
        if path.endswith(".weight") and linear:
            out[path.removesuffix(".weight")] = [n.removesuffix(".weight") for n in names]
    return out
