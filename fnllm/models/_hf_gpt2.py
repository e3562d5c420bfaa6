"""GPT-2's Hugging Face codec (private; :class:`~fnllm.models.GPT` names it, see
:mod:`fnllm.models._hf` for the interface).

``GPT2LMHeadModel`` names ``transformer.h.0.attn.c_attn.weight`` (``GPT2Model`` the same
without ``transformer.``). Conv1D weights are stored ``[in, out]`` and are transposed to
fnllm's ``[out, in]``; ``c_attn`` is already ``[q; k; v]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnllm.models import _hf as common

_GPT_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
MODEL_TYPES = ("gpt2",)
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
LEGACY_KEY = "n_embd"
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "d_model": "n_embd",
    "d_ff": "n_inner",
    "max_len": "n_positions",
    "ln_eps": "layer_norm_epsilon",
}
FAN_IN_FAN_OUT = True  # Conv1D stores [in, out]: peft's LoRA config needs fan_in_fan_out


_GPT2_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def table(model: Any) -> list[tuple[str, str, list[str]]]:
    """(fnllm path, op, HF names without 'transformer.'); op: copy | t (transpose)."""
    rows = [
        ("embed.tokens.weight", "copy", ["wte.weight"]),
        ("embed.positions.weight", "copy", ["wpe.weight"]),
    ]
    for i in range(model.n_layer):
        b, h = f"blocks.{i}", f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            rows += [(f"{b}.{ln}.{w}", "copy", [f"{h}.{ln}.{w}"]) for w in ("weight", "bias")]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):  # fmt: skip
            rows.append((f"{b}.{ours}.weight", "t", [f"{h}.{theirs}.weight"]))
            rows.append((f"{b}.{ours}.bias", "copy", [f"{h}.{theirs}.bias"]))
    rows += [(f"ln_f.{w}", "copy", [f"ln_f.{w}"]) for w in ("weight", "bias")]
    if not model.tie_head:
        rows.append(("head.weight", "copy", ["lm_head.weight"]))
    return rows


def from_hf(
    state: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    from fnllm.models.gpt import GPT

    common.require(where, cfg, "activation_function", "gelu_new", _GPT_ACTS, "the tanh GELU")
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                      ("scale_attn_weights", True)):  # fmt: skip
        if bool(cfg.get(field, ok)) != ok:
            common.refuse(where, field, cfg[field], ok)
    tie = bool(cfg.get("tie_word_embeddings", True))
    fields = common.read_fields(cfg, CONFIG_KEYS)
    if "n_ctx" in cfg:
        fields.setdefault("max_len", cfg["n_ctx"])  # older configs: n_ctx, no n_positions
    model = GPT(**fields, tie_head=tie, dropout=float(cfg.get("resid_pdrop", 0.1)))
    stripped: dict[str, torch.Tensor] = {}
    extra_names: dict[str, str] = {}
    has_prefix = any(k.startswith("transformer.") for k in state)
    for k, v in state.items():
        name = k.removeprefix("transformer.") if has_prefix else k
        if has_prefix and not k.startswith(("transformer.", "lm_head.")):
            name = "\0" + k  # a bare backbone name next to prefixed ones: unexpected
        if _GPT2_IGNORED.match(name) or (tie and name == "lm_head.weight"):
            continue
        stripped[name] = v
        extra_names[name] = k
    prefix = "transformer." if has_prefix else ""
    params = common.apply_table(model, table(model), stripped, extra_names, prefix, where)
    return model, params


def default_arch(model: Any) -> str:
    """The `transformers` class a GPT exports to by default."""
    return "GPT2LMHeadModel"


def export(model: Any, arch: str) -> tuple[str, common.Table, Callable[[str], bool]]:
    """``(name prefix, table, keep(hf_name))`` for writing ``model`` as ``arch``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"to_hf: unsupported GPT architecture {arch!r}")
    prefix = "transformer." if arch == "GPT2LMHeadModel" else ""
    return prefix, table(model), lambda hf: True


def config(model: Any) -> dict[str, Any]:
    """``config.json`` entries for ``model`` (``io.hf_config`` adds architecture and type)."""
    return {
        **common.write_fields(model, CONFIG_KEYS),
        "activation_function": "gelu_new",
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "tie_word_embeddings": bool(model.tie_head),
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        # GPT-2's end-of-text token is the last id (50256 of 50257).
        "bos_token_id": model.vocab_size - 1,
        "eos_token_id": model.vocab_size - 1,
        "use_cache": True,
    }


def sequence_classification(model: Any, pooling: str) -> dict[str, Any] | str:
    """How a classifier over this GPT maps to ``GPT2ForSequenceClassification``, or why not.

    That class reads the last token that is not ``pad_token_id`` (``last`` pooling, right
    padding with that id) after ``ln_f``; its head ``score`` has no bias, so a bias is folded
    into ``ln_f.bias`` (``fold_bias``). The backbone sits under ``transformer.``.
    """
    if pooling != "last":
        return f"GPT2ForSequenceClassification pools the last token, not {pooling!r}"
    return {
        "architecture": "GPT2ForSequenceClassification",
        "backbone": "GPT2Model",
        "prefix": "transformer.",
        "head": {"weight": "score.weight"},
        "fold_bias": "ln_f.bias",
        "config": {"pad_token_id": model.vocab_size - 1},
    }


def peft_modules(model: Any) -> dict[str, list[str]]:
    """fnllm linear layer -> the `transformers` module (backbone name) that peft adapts.

    GPT-2's Conv1D layers store ``[in, out]`` weights (peft's ``fan_in_fan_out``); ``c_attn``
    is fused ``[q; k; v]`` like fnllm's ``qkv``.
    """
    out: dict[str, list[str]] = {}
    for path, op, names in table(model):
        if op == "t":
            out[path.removesuffix(".weight")] = [n.removesuffix(".weight") for n in names]
    return out
