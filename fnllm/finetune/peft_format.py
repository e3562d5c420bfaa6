"""LoRA adapters in peft's format, both ways: :func:`to_peft` and :func:`from_peft`.

A peft LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
name `transformers` modules: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
``...lora_B.weight`` ``[out, r]``, and whole modules saved next to them (``modules_to_save``,
e.g. a classifier's ``classifier.weight``). The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), per module through ``rank_pattern`` / ``alpha_pattern``.

**Fused projections.** fnllm runs query, key and value as one ``qkv`` linear. GPT-2 fuses them
too (``c_attn``), so its adapters map one to one (GPT-2's Conv1D layers store ``[in, out]``
weights: the config says ``fan_in_fan_out``, the adapters keep the usual orientation). BERT
has three modules (``query``, ``key``, ``value``):

- writing, the fused adapter ``(A [r, D], B [3D, r])`` becomes three rank-``r`` adapters that
  share ``A``, with ``B``'s rows split into thirds: ``B_q A``, ``B_k A``, ``B_v A`` are the
  rows of ``B A``, so the update is the same;
- reading, three adapters ``(A_q, B_q)``, ``(A_k, B_k)``, ``(A_v, B_v)`` of rank ``r`` become
  one fused adapter of rank ``3r`` with block structure: ``A = [A_q; A_k; A_v]`` and
  ``B = [[B_q, 0, 0], [0, B_k, 0], [0, 0, B_v]]`` (a module without an adapter leaves its
  block out, so ``query`` + ``value`` give rank ``2r`` and zero ``key`` rows). Where the three
  scales differ, ``B_k`` and ``B_v`` are multiplied by their scale over ``query``'s.

A fused adapter read from peft therefore has a larger rank than each of peft's, and writing it
back gives three adapters of that rank (the same function, not the same file).

The Llama family (Llama, Qwen2, Mistral) keeps every projection separate on both sides
(``blocks.0.attn.q`` is ``model.layers.0.self_attn.q_proj``), so its adapters map one to one;
an untied ``lm_head`` that peft saved (``modules_to_save``) is read as ``head.weight``.
Which module names a model has is its Hugging Face codec's ``peft_modules`` (in
:mod:`fnllm.models`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fnllm import tree
from fnllm.finetune.adapter_sets import MANIFEST_KEY, AdapterSet, _lora_summary

__all__ = ["from_peft", "to_peft"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_ROOT = "base_model.model."


def to_peft(
    params: Any, folder: str | os.PathLike, model: Any, *, architecture: str | None = None
) -> Path:
    """Write the adapters of ``params`` as a peft LoRA folder for the matching transformers model.

    ``peft.PeftModel.from_pretrained(hf_model, folder)`` on the model :func:`fnllm.io.to_hf`
    writes for the base gives the same outputs. A classifier's head goes into
    ``modules_to_save`` (for GPT-2, whose ``score`` has no bias, a non-zero head bias is
    folded into ``ln_f``, which is then saved too; see :func:`fnllm.io.to_hf`).

    Example:
        >>> import json, tempfile
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> lp = lora.init(random.key(1), gpt.init(random.key(0)), rank=2)
        >>> out = lora.to_peft(lp, tempfile.mkdtemp(), gpt)
        >>> cfg = json.loads((out / "adapter_config.json").read_text())
        >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"][:1], cfg["fan_in_fan_out"]
        (2, 16.0, ['transformer.h.0.attn.c_attn'], True)

    Args:
        params: an adapted tree (not stacked) of ``model``.
        folder: the folder to write (created if needed).
        model: its config: a ``GPT``/``BERT``/``Llama`` or a ``finetune.Classifier`` whose
            pooling has a `transformers` class (``BertForSequenceClassification``,
            ``GPT2ForSequenceClassification``).
        architecture: the `transformers` class the adapters are for (bare models; default as
            :func:`fnllm.io.to_hf`): it decides the module names' prefix.

    Returns:
        The folder as a ``Path``.

    Raises:
        ValueError: no adapters, stacked adapters, or a classifier without a transformers
            class.
    """
    from fnllm.io import _safetensors

    base, base_params, prefix, head, task = _layout(model, params, architecture)
    module = _peft_codec(base, "to_peft")
    names = module.peft_modules(base)
    flat = tree.flatten(base_params)
    layers = sorted({p.rpartition(".")[0] for p in flat if p.endswith(".lora_a")})
    if not layers:
        raise ValueError("to_peft: params have no LoRA adapters (lora.init adds them)")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for layer in layers:
        a, b = flat[f"{layer}.lora_a"].detach(), flat[f"{layer}.lora_b"].detach()
        if a.ndim != 2:
            raise ValueError(f"to_peft: {layer} holds stacked adapters {tuple(a.shape)}")
        if layer not in names:
            raise ValueError(f"to_peft: {layer} has no transformers module for peft")
        mods = names[layer]
        scale = float(flat[f"{layer}.lora_scale"])
        for mod, b_part in zip(mods, b.chunk(len(mods), dim=0)):
            full = prefix + mod
            tensors[f"{_ROOT}{full}.lora_A.weight"] = a.contiguous()
            tensors[f"{_ROOT}{full}.lora_B.weight"] = b_part.contiguous()
            ranks[full], alphas[full] = a.shape[0], scale * a.shape[0]
    saved: list[str] = []
    for name, value in head.items():
        tensors[_ROOT + name] = value.detach().contiguous()
        saved.append(name.rpartition(".")[0].removeprefix(prefix))
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_exact(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {_exact(m): v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(module.FAN_IN_FAN_OUT),
        "modules_to_save": sorted(set(saved)) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.to("cpu").clone() for k, v in tensors.items()}
    _safetensors.write_safetensors(out / WEIGHTS, cpu, {"format": "pt"}, checksums=False)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _safetensors.atomic_write(out / CONFIG, write)
    return out


def from_peft(folder: str | os.PathLike, model: Any) -> AdapterSet:
    """Read a peft LoRA folder into fnllm leaves (``{path: tensor}``) for :func:`lora.attach`.

    Example:
        >>> import tempfile
        >>> from fnllm import random, testing
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> lp = lora.init(random.key(1), base, rank=2)
        >>> folder = lora.to_peft(lp, tempfile.mkdtemp(), gpt)
        >>> testing.assert_trees_equal(lora.attach(base, lora.from_peft(folder, gpt)), lp)

    Args:
        folder: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``
            (``adapter_model.bin`` is read with ``torch.load(weights_only=True)``).
        model: the fnllm config the adapters are for: a ``GPT``/``BERT``/``Llama`` (module
            names with or without the backbone prefix; a saved ``lm_head`` is read as
            ``head.weight``) or a ``finetune.Classifier`` (its head is read from
            ``modules_to_save``).

    Returns:
        An :class:`~fnllm.finetune.lora.AdapterSet`: ``lora_a``/``lora_b``/``lora_scale`` per
        adapted linear layer (BERT's query/key/value fused as the module docstring says) and
        the saved modules (a head) under their fnllm paths.

    Raises:
        FileNotFoundError: the folder lacks a file.
        ValueError: not a LoRA adapter, or an option fnllm does not run (DoRA, LoRA biases).
        KeyError: a tensor names a module this model does not have.
    """
    from fnllm.io import _hf_common

    where = Path(folder)
    cfg_file = where / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"from_peft: {where} has no {CONFIG}")
    cfg = _hf_common.read_json(cfg_file)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"from_peft: {where}: peft_type {cfg.get('peft_type')!r}, not 'LORA'")
    for field in ("use_dora", "lora_bias"):
        if cfg.get(field):
            raise ValueError(f"from_peft: {where}: {field}=true is not supported by fnllm's LoRA")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"from_peft: {where}: bias={cfg['bias']!r} is not supported (only 'none')")
    weights = where / WEIGHTS
    if not weights.is_file() and (where / "adapter_model.bin").is_file():
        weights = where / "adapter_model.bin"
    if not weights.is_file():
        raise FileNotFoundError(f"from_peft: {where} has no {WEIGHTS}")
    state = _hf_common.read_weights(weights)

    classifier = _is_classifier(model)
    base = model.base if classifier else model
    out_prefix = "base." if classifier else ""
    module = _peft_codec(base, "from_peft")
    modules = module.peft_modules(base)  # fnllm layer -> [hf module names]
    owner = {m: (layer, i, len(ms)) for layer, ms in modules.items() for i, m in enumerate(ms)}
    # lora_A/lora_B per module, and the rest (modules_to_save)
    pairs: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(_ROOT)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            rest[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = value
    unknown: list[str] = []
    parts: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {}
    for full, ab in sorted(pairs.items()):
        hf_name = _match(full, owner)
        if hf_name is None:
            unknown.append(full)
            continue
        if set(ab) != {"A", "B"}:
            raise ValueError(f"from_peft: {where}: {full} has lora_{sorted(ab)[0]} alone")
        layer, index, _ = owner[hf_name]
        r = ab["A"].shape[0]
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, full, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        parts.setdefault(layer, {})[index] = (ab["A"], ab["B"], scale)
    leaves: dict[str, Tensor] = {}
    for layer, got in parts.items():
        a, b, s = _fuse(got, len(modules[layer]))
        leaves[f"{out_prefix}{layer}.lora_a"] = a
        leaves[f"{out_prefix}{layer}.lora_b"] = b
        leaves[f"{out_prefix}{layer}.lora_scale"] = torch.tensor(s, dtype=a.dtype)
    leaves.update(_saved_modules(rest, model, base, classifier, unknown))
    if unknown:
        raise KeyError(
            f"from_peft: {where}: {len(unknown)} tensors name modules this "
            f"{type(base).__name__} does not have: {unknown[:6]}"
        )
    summary = _lora_summary(leaves)
    manifest = {
        "format": MANIFEST_KEY,
        "version": 1,
        "model": model.to_config() if hasattr(model, "to_config") else None,
        "base_type": base.to_config().get("type") if hasattr(base, "to_config") else None,
        "prefix": out_prefix,
        "fingerprint": None,
        "strategy": {"name": "peft", "globs": None},
        "lora": summary,
        "classes": None,
        "leaves": sorted(leaves),
    }
    return AdapterSet(leaves, manifest)


# ----------------------------------------------------------------------------- helpers


def _is_classifier(model: Any) -> bool:
    to_config = getattr(model, "to_config", None)
    return callable(to_config) and to_config().get("type") == "classifier"


def _layout(
    model: Any, params: Any, architecture: str | None
) -> tuple[Any, Any, str, dict[str, Tensor], str | None]:
    """(base config, base params, module-name prefix, modules_to_save tensors, task_type)."""
    from fnllm.io import hf

    if not _is_classifier(model):
        module = hf._codec_of_model(model, "to_peft")
        arch = architecture or module.default_arch(model)
        prefix = module.export(model, arch)[0]
        return model, params, prefix, {}, None
    if not isinstance(params, dict) or set(params) != {"base", "head"}:
        raise KeyError("to_peft: a classifier's params must have keys ['base', 'head']")
    spec = hf._classifier_spec(model, architecture)
    if spec is None:
        codec = hf._codec_of_model(model.base, "to_peft")
        found = codec.sequence_classification(model.base, model.pooling)
        raise ValueError(
            f"to_peft: a classifier with {model.pooling!r} pooling has no transformers class "
            f"for peft to load onto ({found}); export the encoder's adapters with "
            "to_peft(params['base'], folder, model.base)"
        )
    weight, bias = params["head"]["weight"], params["head"]["bias"]
    head = {spec["head"]["weight"]: weight}
    base_params = params["base"]
    if "bias" in spec["head"]:
        head[spec["head"]["bias"]] = bias
    elif bool((bias != 0).any()):
        norm = spec["fold_bias"]
        base_params = hf._fold_head_bias(base_params, norm, weight, bias)
        layer = norm.rpartition(".")[0]
        folded = tree.flatten(base_params)
        for leaf in ("weight", "bias"):
            head[f"{spec['prefix']}{layer}.{leaf}"] = folded[f"{layer}.{leaf}"]
    return model.base, base_params, spec["prefix"], head, "SEQ_CLS"


def _exact(name: str) -> str:
    return re.escape(name)


def _pattern(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """peft's pattern lookup: a key matches when it is the name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _match(full: str, owner: Mapping[str, Any]) -> str | None:
    """The backbone module name ``full`` ends with (``bert.encoder...`` -> ``encoder...``)."""
    hits = [n for n in owner if full == n or full.endswith("." + n)]
    return max(hits, key=len) if hits else None


def _fuse(got: Mapping[int, tuple[Tensor, Tensor, float]], n: int) -> tuple[Tensor, Tensor, float]:
    """Adapters of the parts of a fused linear as one block-structured adapter."""
    if n == 1:
        a, b, s = got[0]
        return a.clone(), b.clone(), s
    first = min(got)
    scale = got[first][2]
    out_part = got[first][1].shape[0]
    rank = sum(a.shape[0] for a, _, _ in got.values())
    a_rows, b_full, col = [], None, 0
    for i in sorted(got):
        a, b, s = got[i]
        if b_full is None:
            b_full = torch.zeros(out_part * n, rank, dtype=b.dtype)
        a_rows.append(a)
        r = a.shape[0]
        b_full[i * out_part : (i + 1) * out_part, col : col + r] = b * (s / scale)
        col += r
    assert b_full is not None
    return torch.cat(a_rows), b_full, scale


def _saved_modules(
    rest: Mapping[str, Tensor], model: Any, base: Any, classifier: bool, unknown: list[str]
) -> dict[str, Tensor]:
    """modules_to_save tensors under their fnllm paths (a head, a norm, a pooler)."""
    from fnllm.io import hf

    module = hf._codec_of_model(base, "from_peft")
    by_hf = {}
    for path, op, names in module.table(base):
        if op in ("copy", "t") and len(names) == 1:
            by_hf[names[0]] = (path, op)
    spec = None
    if classifier:
        found = module.sequence_classification(base, model.pooling)
        spec = found if isinstance(found, dict) else None
    head_names = {v: k for k, v in spec["head"].items()} if spec else {}
    out: dict[str, Tensor] = {}
    for name, value in sorted(rest.items()):
        if name in head_names:
            out[f"head.{head_names[name]}"] = value
            continue
        hit = [n for n in by_hf if name == n or name.endswith("." + n)]
        if not hit:
            unknown.append(name)
            continue
        path, op = by_hf[max(hit, key=len)]
        out[("base." if classifier else "") + path] = value.t().contiguous() if op == "t" else value
    if spec and "head.weight" in out and "bias" not in spec["head"]:
        out["head.bias"] = torch.zeros(out["head.weight"].shape[0], dtype=out["head.weight"].dtype)
    return out


def _peft_codec(model: Any, where: str) -> Any:
    """The model's Hugging Face codec, which must know peft's module names."""
    from fnllm.io import hf

    codec = hf._codec_of_model(model, where)
    if not hasattr(codec, "peft_modules"):
        raise ValueError(
            f"{where}: fnllm has no peft module names for {type(model).__name__} yet "
            "(supported: GPT-2, BERT and the Llama family)"
        )
    return codec
