"""The Llama family's Hugging Face codec (private; :class:`~fnllm.models.Llama` names it, see
:mod:`fnllm.models._hf` for the interface): ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and
``MistralForCausalLM`` (and their bare ``*Model`` backbones) read, Llama and Qwen2 written.

The three share one layout, ``model.layers.0.self_attn.q_proj.weight`` and so on, with
weights already ``[out, in]`` and q/k in the "rotate half" order fnllm's rotary embedding
uses, so every row is a plain copy. They differ in config only: Qwen2 has q/k/v biases and
an optional sliding window, Mistral a sliding window. A sliding window narrower than the
longest sequence would make a different model, so it is refused, as are rope types other
than ``default`` and ``llama3``, biases on Llama's o-projection or MLP and activations other
than SiLU: a checkpoint loads exactly or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnllm.models import _hf as common

MODEL_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURES = (
    "LlamaForCausalLM",
    "LlamaModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "MistralForCausalLM",
    "MistralModel",
)
MODEL_TYPE = "llama"  # what an untyped export is written as (see config for Qwen2)
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "max_len": "max_position_embeddings",
    "head_dim": "head_dim",
    "norm_eps": "rms_norm_eps",
}
_PREFIX = "model."
# Buffers older checkpoints saved next to the weights: recomputed, never read.
_IGNORED = re.compile(r"^(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
_LLAMA3_KEYS = {
    "rope_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_len": "original_max_position_embeddings",
}


def table(model: Any) -> common.Table:
    """(fnllm path, op, HF names without ``model.``); every row a copy."""
    rows: common.Table = [("embed.tokens.weight", "copy", ["embed_tokens.weight"])]
    for i in range(model.n_layer):
        b, h = f"blocks.{i}", f"layers.{i}"
        rows.append((f"{b}.attn_norm.weight", "copy", [f"{h}.input_layernorm.weight"]))
        for x in ("q", "k", "v", "o"):
            rows.append((f"{b}.attn.{x}.weight", "copy", [f"{h}.self_attn.{x}_proj.weight"]))
            if model.qkv_bias and x != "o":
                rows.append((f"{b}.attn.{x}.bias", "copy", [f"{h}.self_attn.{x}_proj.bias"]))
        rows.append((f"{b}.mlp_norm.weight", "copy", [f"{h}.post_attention_layernorm.weight"]))
        for x in ("gate", "up", "down"):
            rows.append((f"{b}.mlp.{x}.weight", "copy", [f"{h}.mlp.{x}_proj.weight"]))
    rows.append(("norm.weight", "copy", ["norm.weight"]))
    if not model.tie_head:
        rows.append(("head.weight", "copy", ["lm_head.weight"]))
    return rows


def from_hf(
    state: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    from fnllm.models.llama import Llama

    model_type = cfg.get("model_type", "llama")
    unknown = [a for a in cfg.get("architectures") or [] if a not in ARCHITECTURES]
    if unknown:
        common.refuse(where, "architectures", unknown, ", ".join(ARCHITECTURES))
    common.require(where, cfg, "hidden_act", "silu", ("silu",), "the SwiGLU MLP")
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if cfg.get(field):
                common.refuse(where, field, cfg[field], "False (Llama without biases)")
    fields = common.read_fields(cfg, CONFIG_KEYS)
    _check_window(cfg, model_type, fields.get("max_len", 2048), where)
    try:
        model = Llama(
            **fields,
            **_read_rope(cfg, where),
            qkv_bias=model_type == "qwen2",
            tie_head=bool(cfg.get("tie_word_embeddings", False)),
            dropout=float(cfg.get("attention_dropout", 0.0)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"from_hf: {where}: {e}") from None
    stripped: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    has_prefix = any(k.startswith(_PREFIX) for k in state)
    for k, v in state.items():
        name = k.removeprefix(_PREFIX) if has_prefix else k
        if has_prefix and not k.startswith((_PREFIX, "lm_head.")):
            name = "\0" + k  # a bare backbone name next to prefixed ones: unexpected
        if _IGNORED.match(name) or (model.tie_head and name == "lm_head.weight"):
            continue
        stripped[name] = v
        names[name] = k
    prefix = _PREFIX if has_prefix else ""
    params = common.apply_table(model, table(model), stripped, names, prefix, where)
    return model, params


def default_arch(model: Any) -> str:
    """``Qwen2ForCausalLM`` for a model with q/k/v biases, else ``LlamaForCausalLM``."""
    return "Qwen2ForCausalLM" if model.qkv_bias else "LlamaForCausalLM"


def export(model: Any, arch: str) -> tuple[str, common.Table, Callable[[str], bool]]:
    """``(name prefix, table, keep(hf_name))`` for writing ``model`` as ``arch``."""
    family = "Qwen2" if model.qkv_bias else "Llama"
    allowed = (f"{family}ForCausalLM", f"{family}Model")
    if arch not in allowed:
        why = "q/k/v biases" if model.qkv_bias else "no q/k/v biases"
        raise ValueError(
            f"to_hf: a Llama config with {why} is written as {' or '.join(allowed)}, not "
            f"{arch!r} (the same computation under another name would need its own config)"
        )
    if arch.endswith("ForCausalLM"):
        return _PREFIX, table(model), lambda hf: True
    return "", table(model), lambda hf: not hf.startswith("lm_head.")


def config(model: Any) -> dict[str, Any]:
    """``config.json`` entries for ``model`` (``io.hf_config`` adds the architecture)."""
    rope: dict[str, Any] | None = None
    if model.rope_type == "llama3":
        rope = {"rope_type": "llama3"}
        rope.update({theirs: getattr(model, ours) for ours, theirs in _LLAMA3_KEYS.items()})
    out = {
        "model_type": "qwen2" if model.qkv_bias else "llama",
        **common.write_fields(model, CONFIG_KEYS),
        "hidden_act": "silu",
        "rope_theta": model.rope_theta,
        "rope_scaling": rope,  # the Hub's spelling; transformers 5 reads it too
        "tie_word_embeddings": bool(model.tie_head),
        "attention_dropout": model.dropout,
        "use_cache": True,
    }
    if model.qkv_bias:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.n_layer)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _read_rope(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Llama's rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` and
    ``rope_scaling`` (the Hub's configs)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        common.refuse(where, "rope_parameters", rope, "a dict")
    if rope and all(isinstance(v, Mapping) for v in rope.values()):  # one per layer type
        kinds = list(rope.values())
        if any(k != kinds[0] for k in kinds):
            common.refuse(where, "rope_parameters", dict(rope), "one rope for every layer")
        rope = kinds[0]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        common.refuse(where, "rope_type", rope_type, "'default' and 'llama3'")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        common.refuse(where, "partial_rotary_factor", partial, "1.0 (rotate whole heads)")
    theta = rope.get("rope_theta", cfg.get("rope_theta")) or 10000.0
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    if rope_type == "llama3":
        for ours, theirs in _LLAMA3_KEYS.items():
            if theirs in rope:
                out[ours] = rope[theirs]
            elif theirs == "original_max_position_embeddings":
                out[ours] = cfg.get("max_position_embeddings", 2048)
            else:
                common.refuse(where, "rope_scaling", dict(rope), f"llama3 scaling with {theirs}")
    return out


def _check_window(cfg: Mapping[str, Any], model_type: str, max_len: int, where: str) -> None:
    """Refuse a sliding window narrower than ``max_len``: it would change the results.

    Query ``i`` sees key ``j`` when ``i - j < window``; with ``window >= max_len`` every
    sequence fnllm accepts is inside the window, so attention is plain causal attention.
    """
    window = cfg.get("sliding_window", 4096 if model_type == "mistral" else None)
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            window = None
    elif model_type == "llama":
        window = None
    if window is not None and window < max_len:
        common.refuse(
            where,
            "sliding_window",
            window,
            f"no sliding window, or one at least max_position_embeddings ({max_len}); to "
            "use the checkpoint on shorter sequences, pass config= with "
            f"max_position_embeddings <= {window}",
        )


FAN_IN_FAN_OUT = False  # nn.Linear stores [out, in], as fnllm does


def peft_modules(model: Any) -> dict[str, list[str]]:
    """fnllm linear layer -> the `transformers` module (backbone name) that peft adapts.

    Every attention and MLP projection is its own module on both sides (``blocks.0.attn.q``
    is ``layers.0.self_attn.q_proj``), so each adapter maps one to one.
    """
    out: dict[str, list[str]] = {}
    for path, _op, names in table(model):
        if re.search(r"\.(attn|mlp)\.[a-z]+\.weight$", path):
            out[path.removesuffix(".weight")] = [n.removesuffix(".weight") for n in names]
    return out
