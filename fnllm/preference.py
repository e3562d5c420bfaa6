"""Preference tuning: a reward model on chosen/rejected pairs, and DPO against a frozen reference.

Records are JSONL lines ``{"prompt": ..., "chosen": ..., "rejected": ...}``
(:func:`read_preferences`). :func:`preference_batch` renders each as two right-padded rows,
``prompt + chosen + EOS`` and ``prompt + rejected + EOS``, with masks of the response tokens.

- **Reward model** (InstructGPT): any scorer with ``apply(params, tokens, attention_mask)``
  returning one number per row (``[B]`` or ``[B, 1]``), e.g. a GPT with a scalar head on the
  last token; :func:`reward_loss` trains it with the pairwise loss
  :func:`fnllm.losses.pairwise_reward` so that chosen responses score higher.
- **DPO** (Rafailov et al. 2023): the policy is a causal LM; the reference is just another
  parameter tree. :func:`with_reference` adds the reference log-probabilities to every batch,
  computed once per batch without gradient; :func:`dpo_loss` is :func:`fnllm.losses.dpo` on
  the policy's response log-probabilities (:func:`response_logprobs`).

Both losses plug into :func:`~fnllm.train.fit.fit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, losses, tree
from fnllm.instruct import Encode, _check_batch_args, _ids, _right_pad, _row, read_jsonl

__all__ = [
    "dpo_loss",
    "preference_batch",
    "read_preferences",
    "response_logprobs",
    "reward_loss",
    "with_reference",
]

Batch = Mapping[str, Tensor]


def read_preferences(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read ``{"prompt", "chosen", "rejected"}`` records from a JSONL file.

    Example:
        >>> import os, tempfile
        >>> from fnllm.preference import read_preferences
        >>> path = os.path.join(tempfile.mkdtemp(), "prefs.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\\n')
        >>> read_preferences(path)
        [{'prompt': '2+2=', 'chosen': '4', 'rejected': '5'}]

    Args:
        path: the file (one JSON object per line; blank lines skipped).

    Returns:
        The records.

    Raises:
        ValueError: a line that is not JSON or lacks a field (with its line number).
    """
    return read_jsonl(path, ["prompt", "chosen", "rejected"])


def preference_batch(
    records: Sequence[Mapping[str, str]],
    encode: Encode,
    *,
    eos_id: int,
    max_len: int,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Chosen and rejected rows of ``B`` preference records, padded to one width.

    Example:
        >>> from fnllm.preference import preference_batch
        >>> batch = preference_batch([{"prompt": "a", "chosen": "bc", "rejected": "d"}],
        ...                          lambda s: list(s.encode()), eos_id=0, max_len=8)
        >>> batch["chosen_ids"], batch["rejected_ids"]
        (tensor([[97, 98, 99,  0]]), tensor([[ 97, 100,   0,   0]]))
        >>> batch["chosen_response"].int()
        tensor([[0, 1, 1, 1]], dtype=torch.int32)

    Args:
        records: dicts with ``prompt``, ``chosen`` and ``rejected``.
        encode: text to token ids.
        eos_id: appended after each response.
        max_len: the longest row; longer rows are cut at the end.
        pad_id: the padding id.

    Returns:
        ``chosen_ids``, ``chosen_mask``, ``chosen_response``, ``rejected_ids``,
        ``rejected_mask``, ``rejected_response``: ``[B, T]`` (ids int64, masks bool; a
        ``*_response`` mask is True on the response tokens and EOS).

    Raises:
        ValueError: no records, a prompt that leaves no room for a response, or a record
            whose chosen and rejected rows are identical (the same text, or cut to the same
            tokens by ``max_len``): the message names the record.
        KeyError: a record lacks a field.
        TypeError: ``records`` is not a list of dicts, a field is not a string, ``encode``
            returns anything but token ids, or an id argument is not an int.
    """
    _check_batch_args(records, encode, eos_id, max_len, pad_id, ("prompt", "chosen", "rejected"))
    rows: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    starts = []
    for i, rec in enumerate(records):
        for name in ("prompt", "chosen", "rejected"):
            if name not in rec:
                raise KeyError(f"records[{i}]: missing {name!r} (has {sorted(rec)})")
        prompt = _ids(i, "prompt", encode(rec["prompt"]))
        starts.append(len(prompt))
        for name in ("chosen", "rejected"):
            rows[name].append(_row(i, prompt, encode(rec[name]), eos_id, max_len))
        if rows["chosen"][-1] == rows["rejected"][-1]:
            cut = "" if rec["chosen"] != rec["rejected"] else " (the same text)"
            raise ValueError(
                f"records[{i}]: chosen and rejected are the same {len(rows['chosen'][-1])} "
                f"tokens{cut or ' after cutting to max_len ' + str(max_len)}: the pair carries "
                "no preference (raise max_len or shorten the prompt)"
            )
    # chosen and rejected rows padded together, to one width
    ids, mask = _right_pad(rows["chosen"] + rows["rejected"], pad_id)
    response = mask & (torch.arange(ids.shape[1]) >= torch.tensor(starts * 2)[:, None])
    out: dict[str, Tensor] = {}
    for name, half in (("chosen", slice(0, len(records))), ("rejected", slice(len(records), None))):
        out[f"{name}_ids"] = ids[half]
        out[f"{name}_mask"] = mask[half]
        out[f"{name}_response"] = response[half]
    return out


def response_logprobs(
    model: Any, params: Any, ids: Tensor, mask: Tensor, response: Tensor
) -> Tensor:
    """Summed log-probability of each row's response tokens under a causal LM.

    Example:
        >>> import torch
        >>> from fnllm import models, random
        >>> from fnllm.preference import response_logprobs
        >>> gpt = models.GPT(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_len=8)
        >>> ids, mask = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 1, 1, 0]])
        >>> response_logprobs(gpt, gpt.init(random.key(0)), ids, mask, torch.tensor([[0, 1, 1, 0]]))
        tensor([-5.4455])

    Args:
        model: a causal LM with ``apply(params, tokens, attention_mask=...) -> logits``.
        params: its parameters.
        ids: ``[B, T]`` token ids.
        mask: ``[B, T]`` real tokens.
        response: ``[B, T]`` the tokens to score.

    Returns:
        Float32 ``[B]``.
    """
    logits = model.apply(params, ids, attention_mask=mask)
    return losses.sequence_logprobs(logits, ids, response)


def reward_loss(scorer: Any, *, margin: float = 0.0) -> Callable[..., tuple[Tensor, dict]]:
    """The pairwise reward-model loss for :func:`~fnllm.train.fit.fit`.

    ``scorer`` is a model with ``apply(params, tokens, attention_mask)`` or a function
    ``scorer(params, tokens, attention_mask)``, returning a reward per row (``[B]`` or
    ``[B, 1]``). Chosen and rejected rows run in one forward pass.

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.finetune import Classifier
        >>> from fnllm.preference import preference_batch, reward_loss
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
        >>> rm = Classifier(gpt, n_classes=1, pooling="last", head_std=0.0)   # reward model
        >>> batch = preference_batch([{"prompt": "Q", "chosen": "yes", "rejected": "no"}],
        ...                          lambda s: list(s.encode()), eos_id=0, max_len=16)
        >>> loss, aux = reward_loss(rm)(rm.init(random.key(0)), {}, batch, None)
        >>> round(float(loss), 2), sorted(aux)              # log 2 at a zero head
        (0.69, ['accuracy', 'margin'])

    Args:
        scorer: the reward model or scoring function.
        margin: the margin of :func:`fnllm.losses.pairwise_reward`.

    Returns:
        ``loss_fn(trainable, frozen, batch, key) -> (loss, {"accuracy", "margin"})`` for a
        :func:`preference_batch`; accuracy is the fraction of pairs ranked right, margin the
        mean ``r_chosen - r_rejected``.

    Raises:
        ValueError: (when called) the scorer returns anything but one reward per row,
            ``[2B]`` or ``[2B, 1]``: a ``[2B, C]`` classifier (use ``n_classes=1``) or
            ``[2B, T, V]`` language-model logits would otherwise be silently cut to one
            column.
    """
    margin = _checks.check_range("reward_loss: margin", margin)
    score = _scoring_fn(scorer)

    def loss_fn(trainable: Any, frozen: Any, batch: Batch, key: Any) -> tuple[Tensor, dict]:
        params = tree.combine(trainable, frozen)
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        rewards = _check_rewards(score(params, ids, mask), ids.shape[0])
        chosen, rejected = rewards.chunk(2)
        loss = losses.pairwise_reward(chosen, rejected, margin=margin)
        diff = (chosen - rejected).detach()
        return loss, {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}

    return loss_fn


def with_reference(
    data: Callable[[int], Batch] | Any, model: Any, ref_params: Any
) -> Callable[[int], dict[str, Tensor]]:
    """Wrap a batch source so each batch also carries the reference model's log-probabilities.

    They are computed once per batch, under ``torch.no_grad``, from ``ref_params`` (a frozen
    copy of the starting policy, or any other tree for ``model``).

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.preference import preference_batch, with_reference
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
        >>> batch = preference_batch([{"prompt": "Q", "chosen": "yes", "rejected": "no"}],
        ...                          lambda s: list(s.encode()), eos_id=0, max_len=16)
        >>> data = with_reference(lambda step: batch, gpt, gpt.init(random.key(0)))
        >>> data(0)["ref_chosen_logps"].shape
        torch.Size([1])

    Args:
        data: ``data(step) -> batch`` or a loader with ``.batch(step)``, giving
            :func:`preference_batch` dicts.
        model: the policy's causal LM config.
        ref_params: the reference parameters (never modified).

    Returns:
        ``step -> batch`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` ``[B]`` added.

    Raises:
        TypeError: ``data`` is not callable, ``model`` is an encoder.
        KeyError: ``ref_params`` is not ``model``'s tree (missing or unexpected paths).
        ValueError: (per batch) non-finite reference log-probabilities.
    """
    batch_of = getattr(data, "batch", data)
    if not callable(batch_of):
        raise TypeError(f"data: expected step -> batch or a loader, got {type(data).__name__}")
    _checks.check_decoder("with_reference", model)
    check_params = getattr(model, "check_params", None)
    if callable(check_params):
        try:
            check_params(ref_params)
        except (KeyError, ValueError, TypeError) as err:
            raise type(err)(f"with_reference: ref_params: {err}") from None

    def batch_at(step: int) -> dict[str, Tensor]:
        batch = dict(batch_of(step))
        with torch.no_grad():
            for name in ("chosen", "rejected"):
                logps = response_logprobs(
                    model,
                    ref_params,
                    batch[f"{name}_ids"],
                    batch[f"{name}_mask"],
                    batch[f"{name}_response"],
                )
                bad = ~torch.isfinite(logps)
                if bool(bad.any()):
                    raise ValueError(
                        f"with_reference: step {step}: the reference model scores {name} row "
                        f"{int(bad.nonzero()[0])} as {float(logps[bad][0])} (do ref_params "
                        "hold NaN or inf?)"
                    )
                batch[f"ref_{name}_logps"] = logps
        return batch

    return batch_at


def dpo_loss(
    model: Any, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> Callable[..., tuple[Tensor, dict]]:
    """The DPO loss for :func:`~fnllm.train.fit.fit` on batches from :func:`with_reference`.

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.preference import dpo_loss, preference_batch, with_reference
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=16)
        >>> params = gpt.init(random.key(0))
        >>> batch = preference_batch([{"prompt": "Q", "chosen": "yes", "rejected": "no"}],
        ...                          lambda s: list(s.encode()), eos_id=0, max_len=16)
        >>> loss, aux = dpo_loss(gpt)(params, {}, with_reference(lambda s: batch, gpt, params)(0),
        ...                           None)
        >>> round(float(loss), 4), sorted(aux)       # policy == reference: log 2
        (0.6931, ['chosen_logratio', 'margin', 'rejected_logratio'])

    Args:
        model: the policy's causal LM config (``apply(params, tokens, attention_mask=...)``).
        beta: the DPO inverse temperature.
        label_smoothing: conservative-DPO label noise (see :func:`fnllm.losses.dpo`).

    Returns:
        ``loss_fn(trainable, frozen, batch, key) -> (loss, aux)`` where aux holds the mean
        log-ratios (policy minus reference) of chosen and rejected responses and the mean
        implicit-reward margin ``beta * (chosen - rejected)``.

    Raises:
        TypeError: ``model`` is an encoder (BERT); ``beta``/``label_smoothing`` not numbers.
        ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)``, or non-finite.
    """
    _checks.check_decoder("dpo_loss", model)
    beta = _checks.check_range("dpo_loss: beta", beta, low=0.0, low_open=True)
    label_smoothing = _checks.check_range(
        "dpo_loss: label_smoothing (0.5 would leave no gradient)",
        label_smoothing, low=0.0, high=0.5, high_open=True,
    )  # fmt: skip

    def loss_fn(trainable: Any, frozen: Any, batch: Batch, key: Any) -> tuple[Tensor, dict]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"dpo_loss: batch must be a dict, got {type(batch).__name__}")
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name not in batch:
                raise KeyError(f"batch: missing {name!r} (wrap the data with with_reference)")
        params = tree.combine(trainable, frozen)
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        resp = torch.cat([batch["chosen_response"], batch["rejected_response"]])
        chosen, rejected = response_logprobs(model, params, ids, mask, resp).chunk(2)
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        loss = losses.dpo(
            chosen, rejected, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing
        )
        c_ratio, r_ratio = (chosen - ref_c).detach(), (rejected - ref_r).detach()
        aux = {
            "chosen_logratio": c_ratio.mean(),
            "rejected_logratio": r_ratio.mean(),
            "margin": beta * (c_ratio - r_ratio).mean(),
        }
        return loss, aux

    return loss_fn


# ----------------------------------------------------------------------------- helpers


def _check_rewards(rewards: Any, rows: int) -> Tensor:
    """One reward per row: ``[2B]`` or ``[2B, 1]`` (flattened to ``[2B]``); else a named error."""
    if not isinstance(rewards, Tensor):
        raise TypeError(
            f"reward_loss: the scorer returned a {type(rewards).__name__}, expected a [2B] "
            "tensor of rewards"
        )
    shape = tuple(rewards.shape)
    if shape not in ((rows,), (rows, 1)):
        raise ValueError(
            f"reward_loss: the scorer returned shape {shape} for {rows} rows (chosen + "
            f"rejected); expected one reward per row, [{rows}] or [{rows}, 1] (a classifier "
            "reward model needs n_classes=1; language-model logits are not rewards)"
        )
    if not rewards.is_floating_point():
        raise TypeError(f"reward_loss: the scorer returned {rewards.dtype} rewards, not floats")
    return rewards.reshape(rows)


def _scoring_fn(scorer: Any) -> Callable[[Any, Tensor, Tensor], Tensor]:
    if hasattr(scorer, "apply"):
        return lambda params, ids, mask: scorer.apply(params, ids, attention_mask=mask)
    if callable(scorer):
        return scorer
    raise TypeError(f"scorer: expected a model with apply() or a function, got {scorer!r}")
