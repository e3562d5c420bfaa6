"""Adapter sets: the whole trained part of a finetuned model, as one small file.

A *set* is every leaf a finetuning strategy trained on top of a frozen base: the LoRA adapters
(``lora_a``, ``lora_b`` and their fixed ``lora_scale``), a classifier's head, and whatever else
the strategy selected (norms, biases, a pooler). :func:`save` writes it as a safetensors file
whose metadata holds a *manifest* (a JSON object under the key ``"fnllm.lora_set"``):

| entry | what |
| --- | --- |
| ``format``, ``version`` | ``"fnllm.lora_set"``, ``1`` |
| ``model`` | the model's ``to_config()`` (a classifier's includes its base's) or ``null`` |
| ``base_type`` | the base architecture (``"gpt"``, ``"bert"``, ...) or ``null`` |
| ``prefix`` | where the base sits in the saved tree: ``"base."`` (a classifier) or ``""`` |
| ``fingerprint`` | ``{"digest": ..., "leaves": {path: [shape, hash]}}`` of the base (below) |
| ``strategy`` | ``{"name": ..., "globs": [...]}`` of the leaves that trained |
| ``lora`` | ``{"targets": [layer, ...], "rank": {layer: r}, "alpha": {layer: a}, "scale": ...}`` |
| ``classes`` | the class names, or ``null`` |
| ``leaves`` | the saved paths |

**The fingerprint** is cheap on purpose: for every base leaf the set does not hold (paths
relative to the base, so a classifier's ``base.blocks.0...`` reads ``blocks.0...``), its shape
and the first 12 hex digits of a SHA-256 over 16 evenly spaced values, rounded to bfloat16
(a base cast to bfloat16 keeps its fingerprint; one cast to float16 does not). It tells a set
trained on another checkpoint (every sampled value differs) or architecture (shapes differ)
from its own base and names the leaves that differ; it is no checksum of every weight.
``alpha`` is recorded as ``scale * rank`` (the plain ``alpha / r`` convention, also for a set
made with ``rslora=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import nn, tree
from fnllm.finetune import _lora_checks

__all__ = [
    "AdapterSet",
    "adapters",
    "attach",
    "fingerprint",
    "load",
    "manifest",
    "save",
]

Params = Any
MANIFEST_KEY = "fnllm.lora_set"
_LEAVES = nn.ADAPTER_LEAVES
_A, _B = nn.ADAPTER_TRAINED
_SAMPLES = 16


class AdapterSet(dict[str, Tensor]):
    """A flat ``{path: tensor}`` adapter set with its :attr:`manifest` (``None`` when unknown).

    Returned by :func:`load`; an ordinary ``dict`` otherwise, so :func:`attach` takes either.

    Example:
        >>> import torch
        >>> from fnllm.finetune.lora import AdapterSet
        >>> s = AdapterSet({"head.bias": torch.zeros(2)}, manifest={"classes": ["no", "yes"]})
        >>> list(s), s.manifest["classes"]
        (['head.bias'], ['no', 'yes'])
    """

    def __init__(
        self, leaves: Mapping[str, Tensor], manifest: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(leaves)
        self.manifest: dict[str, Any] | None = dict(manifest) if manifest is not None else None


def adapters(params: Params) -> dict[str, Tensor]:
    """The adapter leaves alone, as ``{dotted.path: tensor}``.

    Example:
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=2, n_head=2, d_model=8, max_len=8)
        >>> lp = lora.init(random.key(1), gpt.init(random.key(0)), rank=2)
        >>> len(lora.adapters(lp))
        12

    Args:
        params: a tree with adapters.

    Returns:
        A flat dict of the ``lora_a``, ``lora_b`` and ``lora_scale`` leaves.
    """
    _lora_checks.check_tree("lora.adapters", params)
    return {p: v for p, v in tree.flatten(params).items() if p.rpartition(".")[2] in _LEAVES}


def fingerprint(params: Params, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A cheap fingerprint of a base tree: shapes and a hash of 16 sampled values per leaf.

    Adapter leaves and the paths in ``exclude`` are left out. See the module docstring for
    what it does and does not detect.

    Example:
        >>> from fnllm import random
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> a, b = gpt.init(random.key(0)), gpt.init(random.key(1))
        >>> lora.fingerprint(a) == lora.fingerprint(a), lora.fingerprint(a) == lora.fingerprint(b)
        (True, False)
        >>> lora.fingerprint(a)["leaves"]["ln_f.weight"][0]
        [8]

    Args:
        params: the base model's tree.
        exclude: paths to leave out (the leaves a set replaces).

    Returns:
        ``{"digest": hex, "leaves": {path: [shape, hash]}}``, plain JSON.
    """
    skip = set(exclude)
    leaves: dict[str, list[Any]] = {}
    for path, x in sorted(tree.flatten(params).items()):
        if path in skip or path.rpartition(".")[2] in _LEAVES or not isinstance(x, Tensor):
            continue
        leaves[path] = [list(x.shape), _leaf_hash(x)]
    digest = hashlib.sha256(json.dumps(leaves, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, "leaves": leaves}


def save(
    path: str | os.PathLike,
    params: Params,
    model: Any = None,
    *,
    trainable: Any = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Save the trained part of ``params`` (adapters, head, ...) with a manifest.

    Example:
        >>> import os, tempfile
        >>> from fnllm import random
        >>> from fnllm.finetune import Classifier, lora
        >>> from fnllm.models import GPT
        >>> clf = Classifier(GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8))
        >>> lp = lora.init(random.key(1), clf.init(random.key(0)), rank=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "set.safetensors")
        >>> lora.save(path, lp, clf, classes=["neg", "pos"])
        >>> sorted(lora.load(path))[-2:]
        ['head.bias', 'head.weight']
        >>> m = lora.manifest(path)
        >>> m["base_type"], m["strategy"]["name"], m["classes"]
        ('gpt', 'lora', ['neg', 'pos'])
        >>> m["lora"]["rank"]["base.blocks.0.attn.qkv"]
        2

    Args:
        path: the file to write (atomically: a crash leaves the old file or none).
        params: the finetuned tree.
        model: its config (a ``Classifier``, ``GPT``, ``BERT``, ...): recorded in the
            manifest and used to resolve a strategy name. ``None``: no config is recorded.
        trainable: which leaves trained besides the adapters: a strategy name (needs
            ``model``), a :class:`~fnllm.finetune.Strategy`, globs or a predicate.
            Default: the ``"lora"`` strategy of ``model``; without a model, a classifier
            tree's ``head`` (a tree with keys ``base`` and ``head``), else the adapters alone.
        classes: the class names (one per output of a classifier's head).

    Raises:
        ValueError: nothing to save, a strategy whose globs select nothing (``"lora"`` on a
            tree without adapters), ``classes`` that do not match the head, or a saved
            leaf holding NaN or inf (named).
        TypeError: a strategy name without a model; ``params`` that is no tree; ``classes``
            that is not a list.
        IsADirectoryError: ``path`` is a folder.
    """
    from fnllm.io import _safetensors

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"lora.save: path must be a str or os.PathLike, got {type(path).__name__}")
    _lora_checks.check_tree("lora.save", params)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"lora.save: {os.fspath(path)} is a directory; give the file to write (e.g. "
            f"{os.path.join(os.fspath(path), 'adapters.safetensors')})"
        )
    flat = tree.flatten(params)
    chosen, strategy = _selected(params, flat, model, trainable)
    keep = {p for p in flat if p.rpartition(".")[2] in _LEAVES} | set(chosen)
    if not keep:
        raise ValueError(
            "lora.save: nothing to save: the tree has no adapters (lora.init adds them) and "
            "the strategy selects no leaf"
        )
    prefix = "base." if _is_classifier_tree(params) else ""
    base_tree = params["base"] if prefix else params
    base_keep = [p[len(prefix) :] for p in keep if p.startswith(prefix)]
    n_classes = _n_classes(params, model)
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise TypeError(
                f"lora.save: classes must be a list of class names, got {classes!r:.60}"
            )
        classes = [str(c) for c in classes]
        if n_classes is None:
            raise ValueError(
                f"lora.save: classes {classes!r:.60} given, but the tree has no classifier "
                "head to name (pass model= a Classifier, or leave classes out)"
            )
        if len(classes) != n_classes:
            raise ValueError(
                f"lora.save: {len(classes)} class names for a head with {n_classes} outputs"
            )
    config = model.to_config() if model is not None and hasattr(model, "to_config") else None
    manifest = {
        "format": MANIFEST_KEY,
        "version": 1,
        "model": config,
        "base_type": _base_type(config),
        "prefix": prefix,
        "fingerprint": fingerprint(base_tree, exclude=base_keep),
        "strategy": strategy,
        "lora": _lora_summary(flat),
        "classes": classes,
        "leaves": sorted(keep),
    }
    _lora_checks.refuse_nonfinite("lora.save", {p: flat[p] for p in sorted(keep)})
    tensors = {p: flat[p].detach().to("cpu").contiguous().clone() for p in sorted(keep)}
    meta = {"fnllm": "lora", MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}
    _safetensors.write_safetensors(os.fspath(path), tensors, meta)


def load(path: str | os.PathLike) -> AdapterSet:
    """Read a set written by :func:`save`: ``{dotted.path: tensor}`` plus its manifest.

    Example:
        >>> from fnllm.finetune import lora
        >>> lora.load("missing.safetensors")
        Traceback (most recent call last):
        ...
        FileNotFoundError: lora.load: no such file missing.safetensors

    Args:
        path: a file written by :func:`save` (files from before manifests load with
            ``manifest=None``).

    Returns:
        An :class:`AdapterSet` (a dict) for :func:`attach`.
    """
    from fnllm.io import _safetensors

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"lora.load: path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora.load: no such file {os.fspath(path)}")
    name = f"lora.load: {os.fspath(path)}"
    try:
        tensors, metadata = _safetensors.read_safetensors(path)
    except ValueError as err:
        if re.search(r"tensor \S+ is corrupt", str(err)):
            raise ValueError(f"lora.load: {err}") from None  # a checksum names the tensor
        raise ValueError(
            f"{name} is not a readable safetensors file (truncated or another format?): {err}"
        ) from None
    if MANIFEST_KEY not in metadata and (metadata.get("fnllm") != "lora" or not tensors):
        raise ValueError(
            f"{name} holds no LoRA adapters written by lora.save (metadata "
            f"{dict(metadata)!r:.80}, tensors such as {sorted(tensors)[:3]})"
        )
    return AdapterSet(tensors, _decode(metadata, os.fspath(path)))


def manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a saved set (read from the header, no tensor is loaded).

    Example:
        >>> from fnllm.finetune import lora
        >>> lora.manifest("missing.safetensors")
        Traceback (most recent call last):
        ...
        FileNotFoundError: lora.manifest: no such file missing.safetensors

    Args:
        path: a file written by :func:`save`.

    Returns:
        The manifest dict (see the module docstring), or ``None`` for an older file.
    """
    from fnllm.io import _safetensors

    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora.manifest: no such file {os.fspath(path)}")
    _, metadata = _safetensors.read_header(os.fspath(path))
    return _decode(metadata, os.fspath(path))


def attach(params: Params, adapter_set: Mapping[str, Tensor], *, check_base: bool = True) -> Params:
    """Put a saved set onto a base tree (a new tree; ``params`` is not modified).

    A set saved from a classifier (paths ``base.*`` and ``head.*``) attaches to a classifier
    tree, or to its bare encoder: then the ``base.`` prefix is dropped, and so are the leaves
    outside the base (the head), which an encoder has no place for. A set saved from a bare
    model attaches to a classifier built on it (under ``base.``). With a manifest, the base's
    fingerprint is compared first.

    Example:
        >>> from fnllm import random, testing
        >>> from fnllm.finetune import lora
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> base = gpt.init(random.key(0))
        >>> lp = lora.init(random.key(1), base, rank=2)
        >>> testing.assert_trees_equal(lora.attach(base, lora.adapters(lp)), lp)  # lp again

    Args:
        params: the base model's tree (adapters already there are replaced).
        adapter_set: ``{path: tensor}`` from :func:`load` (with its manifest) or
            :func:`adapters`.
        check_base: compare the manifest's fingerprint with ``params`` (``False``: attach to
            another base on purpose).

    Returns:
        The tree with the set's leaves in place.

    Raises:
        KeyError: a leaf has no place in ``params`` (an adapter without its linear layer).
        ValueError: a leaf's shape does not fit, the fingerprint differs (the message
            names the leaves that differ), or a leaf holds NaN or inf.
        TypeError: ``adapter_set`` is not a mapping, ``check_base`` not a bool.
    """
    if not isinstance(adapter_set, Mapping):
        raise TypeError(
            "lora.attach: adapter_set: expected a {path: tensor} mapping (lora.load's result), "
            f"got {type(adapter_set).__name__}"
        )
    if not isinstance(check_base, bool):
        raise TypeError(f"lora.attach: check_base must be a bool, got {check_base!r}")
    _lora_checks.check_tree("lora.attach", params)
    meta = getattr(adapter_set, "manifest", None)
    flat = tree.flatten(params)
    leaves, dropped = _rebase(dict(adapter_set), meta, _is_classifier_tree(params))
    del dropped  # the head of a classifier's set, attached to its bare encoder
    for path, value in leaves.items():
        _check_fits(path, value, flat)
    _lora_checks.refuse_nonfinite("lora.attach: adapter_set", leaves)
    for layer in sorted({p.rpartition(".")[0] for p in leaves if _is_adapter(p)}):
        missing = [k for k in _LEAVES if f"{layer}.{k}" not in leaves]
        if missing:
            raise ValueError(f"lora.attach: {layer} has adapters but lacks {', '.join(missing)}")
        if any(f"{layer}.{k}" in flat for k in _LEAVES):
            raise ValueError(
                f"lora.attach: {layer} already has adapters in params (attach onto the base "
                "tree, or lora.merge first)"
            )
    if check_base and meta and meta.get("fingerprint"):
        _check_fingerprint(params, meta)
    return tree.unflatten({**flat, **leaves})


# ----------------------------------------------------------------------------- helpers


def _leaf_hash(x: Tensor) -> str:
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n:
        idx = torch.linspace(0, n - 1, min(n, _SAMPLES), dtype=torch.float64).round().long()
        vals = flat[idx.to(flat.device)].to("cpu")
        if vals.is_floating_point():
            vals = vals.to(torch.bfloat16).to(torch.float32)
        data = vals.numpy().tobytes()
    else:
        data = b""
    return hashlib.sha256(data).hexdigest()[:12]


def _is_classifier_tree(params: Params) -> bool:
    return isinstance(params, dict) and set(params) == {"base", "head"}


def _is_adapter(path: str) -> bool:
    return path.rpartition(".")[2] in _LEAVES


def _selected(
    params: Params, flat: Mapping[str, Tensor], model: Any, trainable: Any
) -> tuple[list[str], dict[str, Any]]:
    """The non-adapter leaves the strategy trains, and the strategy's manifest entry."""
    from fnllm.finetune.strategies import Strategy, strategy

    if trainable is None:
        if model is not None:
            trainable = strategy("lora", model)
        elif _is_classifier_tree(params):
            trainable = Strategy("lora", ("*.lora_a", "*.lora_b", "head"))
        else:
            return [], {"name": "adapters", "globs": ["*.lora_a", "*.lora_b"]}
    if isinstance(trainable, str) and not ("*" in trainable or "." in trainable):
        if model is None:
            raise TypeError(
                f"lora.save: the strategy name {trainable!r} needs the model (lora.save(path, "
                "params, model)); or pass globs"
            )
        trainable = strategy(trainable, model)
    if isinstance(trainable, Strategy):
        try:
            trainable.check_matches(params)
        except ValueError as err:
            raise ValueError(f"lora.save: {err}") from None
        entry: dict[str, Any] = {"name": trainable.name, "globs": list(trainable.globs)}
    elif isinstance(trainable, str):
        entry = {"name": "globs", "globs": [trainable]}
    elif isinstance(trainable, (list, tuple)):
        entry = {"name": "globs", "globs": [str(g) for g in trainable]}
    else:
        entry = {"name": getattr(trainable, "__name__", "predicate"), "globs": None}
    pred: Callable[[str, Any], bool] = tree.filter_fn(trainable)
    chosen = [p for p, v in flat.items() if not _is_adapter(p) and pred(p, v)]
    return chosen, entry


def _n_classes(params: Params, model: Any) -> int | None:
    n = getattr(model, "n_classes", None)
    if isinstance(n, int):
        return n
    if _is_classifier_tree(params) and isinstance(params["head"], dict):
        w = params["head"].get("weight")
        return int(w.shape[-2]) if isinstance(w, Tensor) and w.ndim >= 2 else None
    return None


def _base_type(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("base"), dict):
        return config["base"].get("type")
    return config.get("type")


def _lora_summary(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    layers = sorted({p.rpartition(".")[0] for p in flat if p.endswith(".lora_a")})
    rank = {layer: int(flat[f"{layer}.lora_a"].shape[-2]) for layer in layers}
    scale = {}
    for layer in layers:
        s = flat[f"{layer}.lora_scale"].detach().reshape(-1)
        scale[layer] = float(s[0]) if s.numel() else None
    alpha = {layer: (scale[layer] or 0.0) * rank[layer] for layer in layers}
    return {"targets": layers, "rank": rank, "alpha": alpha, "scale": scale}


def _decode(metadata: Mapping[str, str], where: str) -> dict[str, Any] | None:
    raw = metadata.get(MANIFEST_KEY)
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the adapter set's manifest is not valid JSON: {e}") from None
    if not isinstance(out, dict) or out.get("format") != MANIFEST_KEY:
        raise ValueError(f"{where}: metadata {MANIFEST_KEY!r} is not an fnllm adapter manifest")
    return out


def _rebase(
    leaves: dict[str, Tensor], meta: Mapping[str, Any] | None, onto_classifier: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Move a set's paths between a classifier tree (``base.*``) and a bare base tree."""
    if meta is not None:
        saved_prefix = meta.get("prefix", "")
    else:  # no manifest: a classifier's set has both base.* and head.* paths
        saved_prefix = (
            "base." if leaves and all(p.startswith(("base.", "head.")) for p in leaves) else ""
        )
    if saved_prefix == "base." and not onto_classifier:
        kept = {p[len("base.") :]: v for p, v in leaves.items() if p.startswith("base.")}
        return kept, sorted(p for p in leaves if not p.startswith("base."))
    if saved_prefix == "" and onto_classifier:
        return {f"base.{p}": v for p, v in leaves.items()}, []
    return leaves, []


def _check_fits(path: str, value: Tensor, flat: Mapping[str, Tensor]) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"lora.attach: {path} is a {type(value).__name__}, not a tensor")
    layer, _, leaf = path.rpartition(".")
    if leaf in _LEAVES:
        if layer + ".weight" not in flat:
            raise KeyError(f"lora.attach: {path} has no linear layer {layer} in params")
        out_f, in_f = flat[layer + ".weight"].shape[-2:]
        bad = (leaf == _A and value.shape[-1] != in_f) or (leaf == _B and value.shape[-2] != out_f)
        if bad:
            raise ValueError(
                f"lora.attach: {path} has shape {tuple(value.shape)}, which does not fit "
                f"{layer}.weight {(out_f, in_f)}"
            )
        return
    if path not in flat:
        near = [p for p in flat if p.rpartition(".")[0] == layer][:4]
        raise KeyError(
            f"lora.attach: the set's leaf {path} has no place in params"
            + (f" (that layer holds {near})" if near else "")
        )
    if tuple(value.shape) != tuple(flat[path].shape):
        raise ValueError(
            f"lora.attach: {path} has shape {tuple(value.shape)} in the set but "
            f"{tuple(flat[path].shape)} in params (another number of classes?)"
        )


def _check_fingerprint(params: Params, meta: Mapping[str, Any]) -> None:
    recorded = meta["fingerprint"].get("leaves", {})
    base_tree = params["base"] if _is_classifier_tree(params) else params
    flat = tree.flatten(base_tree)
    problems = []
    for path, (shape, digest) in sorted(recorded.items()):
        if path not in flat:
            problems.append(f"{path} is missing")
        elif list(flat[path].shape) != list(shape):
            problems.append(f"{path} has shape {list(flat[path].shape)}, expected {shape}")
        elif _leaf_hash(flat[path]) != digest:
            problems.append(f"{path} holds other values")
    if problems:
        trained_on = meta.get("base_type") or "a model"
        raise ValueError(
            f"lora.attach: the set was trained on another base ({trained_on}, fingerprint "
            f"{meta['fingerprint'].get('digest')}): {len(problems)} of {len(recorded)} base "
            f"leaves differ: {'; '.join(problems[:5])}. Attach it to the model it was trained "
            "on, or pass check_base=False"
        )
