"""Checkpoints and interop: safetensors trees and models, Hugging Face import/export.

- :func:`save` / :func:`load` / :func:`load_meta`: any parameter tree (or optimizer state) in
  one safetensors file, written atomically, loaded back exactly.
- :func:`save_model` / :func:`load_model`: a model's config travels in the file's metadata, so
  the file alone rebuilds ``(model, params)``.
- Every tensor's CRC-32 is stored and checked on load (``verify=False`` skips it); temp files
  of saves killed mid-write are removed by the next save (:func:`clean_temp_files`).
- :func:`from_hf` / :func:`to_hf`: GPT-2 and BERT checkpoints in `transformers` layout.
- :func:`quantize` / :func:`dequantize`: a frozen NF4 or int8 base for QLoRA-style finetuning
  (torchao tensors as leaves; the ``quant`` extra).
- :func:`pretrained_dir`: the bundled all-MiniLM-L6-v2 sentence encoder;
  :func:`mean_pool` (an alias of ``fnllm.nn.mean_pool``) turns its token vectors into
  sentence embeddings.
"""

from fnllm.io.hf import from_hf, hf_config, mean_pool, pretrained_dir, to_hf, to_hf_state_dict
from fnllm.io.quantized import dequantize, quantize
from fnllm.io.store import clean_temp_files, load, load_meta, load_model, save, save_model

__all__ = [
    "clean_temp_files",
    "dequantize",
    "from_hf",
    "hf_config",
    "load",
    "load_meta",
    "load_model",
    "mean_pool",
    "pretrained_dir",
    "quantize",
    "save",
    "save_model",
    "to_hf",
    "to_hf_state_dict",
]
