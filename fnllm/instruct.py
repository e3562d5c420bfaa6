"""Instruction tuning (supervised finetuning): a JSONL format, prompt-masked batches, the loss.

One record per line, ``{"instruction": ..., "response": ...}`` with an optional ``"input"``
(the InstructGPT/Alpaca layout). :class:`InstructionFormat` renders a record's prompt; the
response follows it and ends with EOS. :func:`sft_batch` builds right-padded batches whose
targets skip the prompt (:func:`fnllm.data.instruction_targets`), so the model learns to answer,
not to repeat instructions; :func:`sft_loss` is the loss for :func:`~fnllm.train.fit.fit`.

:func:`read_jsonl` is shared with :mod:`fnllm.preference`: a corrupt line is reported with its
line number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, data, losses, tree
from fnllm.data._jsonl import json_objects

__all__ = ["InstructionFormat", "read_jsonl", "sft_batch", "sft_loss"]

Encode = Callable[[str], Sequence[int]]


def read_jsonl(
    path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = ()
) -> list[dict[str, str]]:
    """Read a JSONL file of records whose ``required`` (and ``optional``) fields are strings.

    Blank lines are skipped; anything else that is not a JSON object with the required string
    fields raises a ``ValueError`` naming the file and the line number.

    Example:
        >>> import os, tempfile
        >>> from fnllm.instruct import read_jsonl
        >>> path = os.path.join(tempfile.mkdtemp(), "sft.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"instruction": "Say hi", "response": "hi"}\\n\\n{"oops"\\n')
        >>> try:
        ...     read_jsonl(path, ["instruction", "response"])
        ... except ValueError as err:
        ...     print(str(err).split("sft.jsonl")[1])
        :3: not valid JSON (Expecting ':' delimiter: line 2 column 1 (char 8))

    Args:
        path: the file.
        required: fields every record must have, as strings.
        optional: fields a record may have (strings when present); others are ignored.

    Returns:
        One dict per record with the required and present optional fields.

    Raises:
        ValueError: a line that is not UTF-8, not JSON, not an object, lacks a required field
            or holds a non-string field (the message names ``path:line``); a file with no
            record; no ``required`` field.
        FileNotFoundError: no such file.
        TypeError: ``path`` is not a path; ``required``/``optional`` is one string.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_jsonl: expected a file path (str or os.PathLike), got {path!r:.60}")
    if isinstance(required, str) or isinstance(optional, str):
        raise TypeError("read_jsonl: required and optional are lists of field names, not a str")
    for arg, names in (("required", required), ("optional", optional)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"read_jsonl: {arg} must be a list of field names, got {names!r:.60}")
    if not required:
        raise ValueError("read_jsonl: required is empty: name the fields every record must have")
    records = []
    where = os.fspath(path)
    for lineno, obj in json_objects(path):
        record = {}
        for name in (*required, *optional):
            if name not in obj:
                if name in required:
                    raise ValueError(f"{where}:{lineno}: missing field {name!r}")
                continue
            if not isinstance(obj[name], str):
                raise ValueError(
                    f"{where}:{lineno}: field {name!r} must be a string, "
                    f"got {type(obj[name]).__name__}"
                )
            record[name] = obj[name]
        records.append(record)
    if not records:
        raise ValueError(f"read_jsonl: {where} holds no records (an empty file?)")
    return records


@dataclass(frozen=True)
class InstructionFormat:
    """How an instruction record becomes a prompt (the response is appended as is).

    Example:
        >>> from fnllm.instruct import InstructionFormat
        >>> fmt = InstructionFormat()
        >>> fmt.prompt({"instruction": "Add 2 and 3.", "response": "5"})
        '### Instruction:\\nAdd 2 and 3.\\n\\n### Response:\\n'
        >>> fmt.prompt({"instruction": "Translate.", "input": "chat", "response": "cat"})
        '### Instruction:\\nTranslate.\\n\\n### Input:\\nchat\\n\\n### Response:\\n'

    Args:
        template: the prompt without an input, with ``{instruction}``.
        template_with_input: the prompt for records with a non-empty ``"input"``.
    """

    template: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    template_with_input: str = (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )

    def prompt(self, record: Mapping[str, str]) -> str:
        """The prompt text of ``record`` (``instruction`` and optional ``input``)."""
        if "instruction" not in record:
            raise KeyError(f"record: missing 'instruction' (has {sorted(record)})")
        if record.get("input"):
            return self.template_with_input.format(**record)
        return self.template.format(**record)


def sft_batch(
    records: Sequence[Mapping[str, str]],
    encode: Encode,
    *,
    eos_id: int,
    max_len: int,
    pad_id: int = 0,
    fmt: InstructionFormat = InstructionFormat(),
) -> dict[str, Tensor]:
    """A right-padded batch whose targets are the response tokens (and EOS) only.

    Row ``i`` is ``encode(prompt) + encode(response) + [eos_id]``, cut to ``max_len`` tokens.

    Example:
        >>> from fnllm.instruct import InstructionFormat, sft_batch
        >>> fmt = InstructionFormat(template="{instruction}=")
        >>> batch = sft_batch([{"instruction": "1+1", "response": "2"}],
        ...                   lambda s: list(s.encode()), eos_id=0, max_len=8, fmt=fmt)
        >>> batch["input_ids"]
        tensor([[49, 43, 49, 61, 50,  0]])
        >>> batch["targets"]                       # only "2" and EOS are learned
        tensor([[-100, -100, -100,   50,    0, -100]])

    Args:
        records: dicts with ``instruction``, ``response`` and optionally ``input``.
        encode: text to token ids.
        eos_id: appended after every response.
        max_len: the longest row (the model's ``max_len``).
        pad_id: the id written into padding.
        fmt: the :class:`InstructionFormat`.

    Returns:
        ``{"input_ids", "attention_mask", "targets"}``, each ``[B, T]``; ``targets`` are aligned
        with the logits (-100 on the prompt, on padding and on the last position).

    Raises:
        ValueError: no records, a prompt that leaves no room for the response, or a negative
            ``eos_id``/``pad_id`` or ``max_len`` < 2.
        KeyError: a record without ``instruction`` or ``response``.
        TypeError: ``records`` is not a list of dicts (one dict is refused), a field is not a
            string, ``encode`` returns anything but token ids (named by record), an id
            argument is not an int, or ``fmt`` is not an :class:`InstructionFormat`.
    """
    _check_batch_args(
        records, encode, eos_id, max_len, pad_id, ("instruction", "input", "response")
    )
    if not isinstance(fmt, InstructionFormat):
        raise TypeError(
            f"fmt: expected an instruct.InstructionFormat, got {type(fmt).__name__} (build "
            "one: InstructionFormat(template=...))"
        )
    rows, prompt_lens = [], []
    for i, rec in enumerate(records):
        if "response" not in rec:
            raise KeyError(f"records[{i}]: missing 'response' (has {sorted(rec)})")
        prompt = _ids(i, "prompt", encode(fmt.prompt(rec)))
        rows.append(_row(i, prompt, encode(rec["response"]), eos_id, max_len))
        prompt_lens.append(len(prompt))
    ids, mask = _right_pad(rows, pad_id)
    targets = data.instruction_targets(
        ids, prompt_len=torch.tensor(prompt_lens), attention_mask=mask
    )
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def sft_loss(model: Any) -> Callable[..., Tensor]:
    """The supervised-finetuning loss for :func:`~fnllm.train.fit.fit`: cross-entropy on responses.

    Example:
        >>> from fnllm import random, tree
        >>> from fnllm.instruct import sft_batch, sft_loss
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=64)
        >>> batch = sft_batch([{"instruction": "hi", "response": "hello"}],
        ...                   lambda s: list(s.encode()), eos_id=0, max_len=64)
        >>> loss = sft_loss(gpt)(gpt.init(random.key(0)), {}, batch, None)
        >>> round(float(loss), 1)                # about log(128) before training
        4.8

    Args:
        model: a causal LM with ``apply(params, tokens, attention_mask=...) -> logits``.

    Returns:
        ``loss_fn(trainable, frozen, batch, key) -> loss`` (the token mean over response
        tokens of the batch).

    Raises:
        TypeError: ``model`` is an encoder (BERT) or not a model; (from ``loss_fn``) a batch
            that is not a dict with ``input_ids``, ``attention_mask`` and ``targets``.
    """
    _checks.check_decoder("sft_loss", model)

    def loss_fn(trainable: Any, frozen: Any, batch: Mapping[str, Tensor], key: Any) -> Tensor:
        _checks.check_batch_keys("sft_loss", batch, ("input_ids", "attention_mask", "targets"))
        params = tree.combine(trainable, frozen)
        logits = model.apply(params, batch["input_ids"], attention_mask=batch["attention_mask"])
        return losses.cross_entropy(logits, batch["targets"])

    return loss_fn


def _check_batch_args(
    records: Any, encode: Any, eos_id: Any, max_len: Any, pad_id: Any, fields: Sequence[str]
) -> None:
    """The checks :func:`sft_batch` and ``preference.preference_batch`` share (private):
    ``fields`` of every record, where present, must be strings."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(
            f"records: expected a list of dicts, got {type(records).__name__} (one record? wrap "
            "it: [record])"
        )
    if not records:
        raise ValueError("records: empty batch")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
        for k, v in rec.items():
            if k in fields and not isinstance(v, str):
                raise TypeError(f"records[{i}]: field {k!r} must be a string, got {v!r:.40}")
    if not callable(encode):
        raise TypeError(f"encode: expected a function text -> ids, got {type(encode).__name__}")
    _checks.check_int("eos_id", eos_id, low=0, high=_checks.INT64_MAX)
    _checks.check_int("pad_id", pad_id, low=0, high=_checks.INT64_MAX)
    _checks.check_int("max_len", max_len, low=2)


def _ids(i: int, what: str, ids: Any) -> list[int]:
    """``encode``'s output for record ``i`` as a list of non-negative ints, or a named error."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"records[{i}]: encode returned a {type(ids).__name__} for the {what}")
    out = list(ids.tolist() if isinstance(ids, Tensor) else ids)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TypeError(
                f"records[{i}]: encode returned {t!r} in the {what}; expected token ids (ints >= 0)"
            )
    return out


def _row(
    i: int, prompt: list[int], response: Sequence[int], eos_id: int, max_len: int
) -> list[int]:
    """``prompt + response + [eos_id]`` cut to ``max_len``, for record ``i``, whose prompt must
    leave room for at least one response token."""
    prompt, response = _ids(i, "prompt", prompt), _ids(i, "response", response)
    if len(prompt) >= max_len:
        raise ValueError(
            f"records[{i}]: the prompt has {len(prompt)} tokens, no room for a response "
            f"within max_len {max_len}"
        )
    return (prompt + list(response) + [eos_id])[:max_len]


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to ``[B, T]`` and return them with the bool mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.int64)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, mask
