"""Shared by the Hugging Face architecture modules (private): reading sources and files,
the model type of a checkpoint, and applying a name table in both directions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fnllm import _checks
from fnllm.io import _safetensors

PathLike = str | os.PathLike
Table = list[tuple[str, str, list[str]]]  # (fnllm path, "copy" | "t" | "cat", HF names)
INCOMPLETE = ".fnllm-export-incomplete"  # present while to_hf writes a folder


def read_source(
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
        if (directory / INCOMPLETE).exists():
            raise ValueError(
                f"from_hf: {directory} holds an unfinished fnllm.io.to_hf export (marker "
                f"{INCOMPLETE}: the writer stopped between files); export it again"
            )
        if config is None:
            cfg_file = directory / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"from_hf: {directory} has no config.json")
            cfg = read_json(cfg_file)
        else:
            cfg = config_dict(config)
        state = read_weights(weights) if weights else read_dir_weights(directory)
        return state, cfg, str(p)
    if isinstance(src, Mapping):
        if config is None:
            raise ValueError("from_hf: a state dict needs config= (the Hugging Face config)")
        return dict(src), config_dict(config), "state dict"
    if hasattr(src, "state_dict") and hasattr(src, "config"):  # a transformers model
        cfg = config_dict(config) if config is not None else src.config.to_dict()
        return dict(src.state_dict()), cfg, type(src).__name__
    raise TypeError(
        "from_hf: expected a directory, a weights file, a state dict or a transformers model, "
        f"got {type(src).__name__}"
    )


def config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_json(Path(config))
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"from_hf: config must be a dict or a path, got {type(config).__name__}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def read_dir_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return read_weights(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values()), key=str):
            state.update(read_weights(_inside(directory, shard, index)))
        return state
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        return read_weights(binary)
    raise FileNotFoundError(
        f"from_hf: {directory} has no model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _inside(directory: Path, shard: Any, index: Path) -> Path:
    """``directory / shard``, refused unless it stays inside ``directory`` (symlinks resolved)."""
    if not isinstance(shard, str) or not shard:
        raise ValueError(f"{index}: weight_map values must be shard file names, got {shard!r}")
    root = directory.resolve()
    path = (directory / shard).resolve()
    if os.path.isabs(shard) or not path.is_relative_to(root) or path == root:
        raise ValueError(
            f"{index}: shard {shard!r} lies outside the model folder {root} "
            f"(resolves to {path}); refused"
        )
    return directory / shard


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        tensors, _ = _safetensors.read_safetensors(path)
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


def model_type(cfg: Mapping[str, Any], state: Mapping[str, Any], where: str) -> str:
    mt = cfg.get("model_type")
    if mt is None:  # old configs: guess from the field names
        mt = "gpt2" if "n_embd" in cfg else "bert" if "hidden_size" in cfg else None
    if mt not in ("gpt2", "bert"):
        raise ValueError(
            f"from_hf: {where}: unsupported model_type {mt!r} (supported: 'gpt2', 'bert')"
        )
    return mt


def refuse(where: str, field: str, value: Any, allowed: Any) -> None:
    raise ValueError(
        f"from_hf: {where}: config {field}={value!r} is not supported (fnllm supports {allowed})"
    )


def require(
    where: str, cfg: Mapping[str, Any], field: str, default: Any, allowed: Any, what: str = ""
) -> None:
    """Refuse the config unless ``cfg[field]`` (``default`` when absent) is in ``allowed``;
    the message lists ``allowed``, after ``what`` (``"the exact GELU"``) when given."""
    value = cfg.get(field, default)
    if value not in allowed:
        listed = f"{what}: " + ", ".join(allowed) if what else ", ".join(map(repr, allowed))
        refuse(where, field, value, listed)


# The config fields' names in `transformers`: fnllm field -> (GPT-2's key, BERT's key).
CONFIG_KEYS: dict[str, tuple[str | None, str | None]] = {
    "vocab_size": ("vocab_size", "vocab_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "d_model": ("n_embd", "hidden_size"),
    "d_ff": ("n_inner", "intermediate_size"),
    "max_len": ("n_positions", "max_position_embeddings"),
    "type_vocab_size": (None, "type_vocab_size"),
    "ln_eps": ("layer_norm_epsilon", "layer_norm_eps"),
}


def read_fields(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The fnllm config fields a `transformers` config of ``model_type`` sets.

    A key the config lacks is left out, so the fnllm default applies: GPT's and BERT's
    defaults are GPT-2 small's and BERT-base's, as are `transformers`' own.
    """
    keys = _config_keys(model_type)
    return {ours: cfg[theirs] for ours, theirs in keys.items() if theirs in cfg}


def write_fields(model: Any, model_type: str) -> dict[str, Any]:
    """The `transformers` config entries for ``model``'s fields (inverse of read_fields)."""
    return {theirs: getattr(model, ours) for ours, theirs in _config_keys(model_type).items()}


def _config_keys(model_type: str) -> dict[str, str]:
    column = {"gpt2": 0, "bert": 1}[model_type]
    picked = {ours: keys[column] for ours, keys in CONFIG_KEYS.items()}
    return {ours: theirs for ours, theirs in picked.items() if theirs is not None}


def apply_table(
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

    def display(n: str) -> str:
        return names.get(n, n if n.startswith(("cls.", "lm_head.")) else prefix + n)

    missing = sorted(display(n) for n in wanted - set(state))
    unexpected = sorted(display(n).lstrip("\0") for n in set(state) - wanted)
    _checks.check_keys(
        f"from_hf: {where}: weights do not match the {type(model).__name__} the config "
        f"describes ({_safetensors.describe(model)}): ",
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
            f"({_safetensors.describe(model)}): " + "; ".join(bad[:8])
        )
    return out
