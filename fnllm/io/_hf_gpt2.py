"""GPT-2 in `transformers` layout (private; registered in :mod:`fnllm.io.hf` as ``gpt2``).

``GPT2LMHeadModel`` names ``transformer.h.0.attn.c_attn.weight`` (``GPT2Model`` the same
without ``transformer.``). Conv1D weights are stored ``[in, out]`` and are transposed to
fnllm's ``[out, in]``; ``c_attn`` is already ``[q; k; v]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnllm.io._hf_common import Table, apply_table, refuse, require

_GPT_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


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

    tanh_gelu = "the tanh GELU: " + ", ".join(_GPT_ACTS)
    require(where, cfg, "activation_function", "gelu_new", _GPT_ACTS, tanh_gelu)
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                      ("scale_attn_weights", True)):  # fmt: skip
        if bool(cfg.get(field, ok)) != ok:
            refuse(where, field, cfg[field], ok)
    tie = bool(cfg.get("tie_word_embeddings", True))
    n_embd = cfg.get("n_embd", 768)
    model = GPT(
        vocab_size=cfg.get("vocab_size", 50257),
        n_layer=cfg.get("n_layer", 12),
        n_head=cfg.get("n_head", 12),
        d_model=n_embd,
        max_len=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
        d_ff=cfg.get("n_inner"),
        tie_head=tie,
        ln_eps=cfg.get("layer_norm_epsilon", 1e-5),
        dropout=float(cfg.get("resid_pdrop", 0.1)),
    )
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
    params = apply_table(model, table(model), stripped, extra_names, prefix, where)
    return model, params


def default_arch(model: Any) -> str:
    """The `transformers` class a GPT exports to by default."""
    return "GPT2LMHeadModel"


def export(model: Any, arch: str) -> tuple[str, Table, Callable[[str], bool]]:
    """``(name prefix, table, keep(hf_name))`` for writing ``model`` as ``arch``."""
    if arch not in ("GPT2LMHeadModel", "GPT2Model"):
        raise ValueError(f"to_hf: unsupported GPT architecture {arch!r}")
    prefix = "transformer." if arch == "GPT2LMHeadModel" else ""
    rows = table(model)
    keep = lambda hf: True
    return prefix, rows, keep


def config(model: Any, arch: str) -> dict[str, Any]:
    """The `transformers` ``config.json`` contents for ``model`` as ``arch``."""
    return {
        "architectures": [arch],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.max_len,
        "n_embd": model.d_model,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": model.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model.ln_eps,
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
