"""Reading Hugging Face sources and files (private): a folder, a weights file, a state dict
or a live `transformers` model to ``(state dict, config dict, name)``. The per-architecture
name tables are the models' codecs (:mod:`fnllm.models._hf`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fnllm.io import _safetensors

PathLike = str | os.PathLike
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
