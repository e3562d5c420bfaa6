"""Hugging Face codecs (private): one module per architecture maps it to `transformers` names.

:func:`fnllm.models.hf_codec` finds the codec of a Hugging Face ``model_type`` through the
registered configs (``fnllm.models._TYPES``): a config class lists the model types it reads
in ``hf_model_types`` and names its codec module in ``hf_codec_module`` (e.g.
``"fnllm.models._hf_gpt2"``, imported on first use). :mod:`fnllm.io.hf` reads and writes the
files and dispatches on the codec; the codec never touches a file, so ``models`` does not
import ``io``.

A codec module defines:

``MODEL_TYPES: tuple[str, ...]``
    the ``model_type`` values it reads (the config class's ``hf_model_types``).
``ARCHITECTURES: tuple[str, ...]``
    the `transformers` class names it reads and writes (``config.json``'s
    ``architectures``); ``io.from_hf`` refuses a folder naming another one.
``LEGACY_KEY: str`` (optional)
    a config key that marks an old ``config.json`` of this type written without a
    ``model_type`` (GPT-2's ``"n_embd"``).
``table(model) -> Table``
    rows ``(fnllm path, op, [HF names])``, one per parameter leaf, HF names without the
    backbone prefix; ``op`` is ``"copy"``, ``"t"`` (transpose a matrix) or ``"cat"``
    (concatenate the HF tensors along rows, e.g. query; key; value).
``from_hf(state, cfg, where) -> (model, {fnllm path: tensor})``
    the config and the flat parameters of a checkpoint: check ``cfg`` (refuse what fnllm does
    not compute with :func:`refuse`/:func:`require`), build the model, then map the weights
    with :func:`apply_table`, which lists missing and unexpected names and bad shapes.
    ``where`` names the source in error messages.
``default_arch(model) -> str``
    the architecture ``io.to_hf`` writes when none is given.
``export(model, arch) -> (prefix, table, keep)``
    how to write ``model`` as ``arch``: the backbone prefix (``"transformer."``,
    ``"bert."``, ``"model."``), the table, and ``keep(hf_name)``, whether ``arch`` has a
    place for that weight. Names starting with ``UNPREFIXED`` (default ``("cls.",
    "lm_head.")``) take no prefix. A ``ValueError`` names an unsupported ``arch``.
``config(model) -> dict``
    the ``config.json`` entries; ``io.hf_config`` adds ``architectures`` and
    ``model_type`` (``model.hf_model_types[0]`` unless the entries set it).

The helpers below are what every codec shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fnllm import _checks

Table = list[tuple[str, str, list[str]]]  # (fnllm path, "copy" | "t" | "cat", HF names)
UNPREFIXED = ("cls.", "lm_head.")  # HF names outside the backbone, written without its prefix


def refuse(where: str, field: str, value: Any, allowed: Any) -> None:
    """Raise the ``ValueError`` for a config value fnllm does not support."""
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


def read_fields(cfg: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """The fnllm config fields a `transformers` config sets, through ``{ours: theirs}``.

    A key the config lacks is left out, so the fnllm default applies (GPT's and BERT's
    defaults are GPT-2 small's and BERT-base's, as are `transformers`' own).
    """
    return {ours: cfg[theirs] for ours, theirs in keys.items() if theirs in cfg}


def write_fields(model: Any, keys: Mapping[str, str]) -> dict[str, Any]:
    """The `transformers` config entries for ``model``'s fields (inverse of read_fields)."""
    return {theirs: getattr(model, ours) for ours, theirs in keys.items()}


def describe(model: Any) -> str:
    """``GPT(vocab_size=..., ...)`` from the config's JSON form, for error messages."""
    cfg = model.to_config()
    return f"{type(model).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"


def apply_table(
    model: Any,
    table: Table,
    state: dict[str, torch.Tensor],
    names: dict[str, str],
    prefix: str,
    where: str,
    unprefixed: tuple[str, ...] = UNPREFIXED,
) -> dict[str, torch.Tensor]:
    """Pull every table row out of ``state``; list missing/unexpected keys and bad shapes.

    ``state`` is keyed by HF names without the backbone ``prefix`` (``names`` maps them back
    to the names in the source for messages; a name starting with ``"\\0"`` is unexpected).
    """
    expected = {p: tuple(s) for p, s in model.param_shapes().items()}
    table_paths = {p for p, _, _ in table}
    if table_paths != set(expected):  # the table and the model disagree: an fnllm bug
        raise AssertionError(
            f"fnllm HF table vs {type(model).__name__}.param_shapes(): "
            f"{sorted(table_paths ^ set(expected))}"
        )
    wanted = {n for _, _, ns in table for n in ns}

    def display(n: str) -> str:
        return names.get(n) or (n if n.startswith(unprefixed) else prefix + n)

    missing = sorted(display(n) for n in wanted - set(state))
    unexpected = sorted(display(n).lstrip("\0") for n in set(state) - wanted)
    _checks.check_keys(
        f"from_hf: {where}: weights do not match the {type(model).__name__} the config "
        f"describes ({describe(model)}): ",
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
            want = [(shape[0] // len(ns), *shape[1:])] * len(ns)
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
            f"({describe(model)}): " + "; ".join(bad[:8])
        )
    return out
