"""Losses: the cross-entropy family for language models and the preference losses.

Every loss computes in float32 whatever the dtype of its inputs (bf16 or fp16 logits are
upcast before the softmax), so large logits neither overflow nor lose the answer to rounding,
and every loss returns a float32 tensor. The functions are pure and free of data-dependent
Python branches, so they run under ``torch.func.grad``/``vmap`` and
``torch.compile(fullgraph=True)``.

Conventions:

- ``labels`` use ``ignore_index`` (-100) for positions that do not count. A ``"mean"`` is over
  the counted positions of the whole batch (a token-level mean, as in Hugging Face); a batch in
  which nothing counts has loss 0, not NaN.
- :func:`causal_lm` and :func:`sequence_logprobs` take the *input tokens* and shift inside:
  the logits at position ``t`` predict ``tokens[..., t + 1]``. For targets that are already
  aligned with the logits (``fnllm.data.causal_targets``, ``instruction_targets``) call
  :func:`cross_entropy` directly.
- Shapes, dtypes and option values are checked at the boundary; the data-dependent checks
  (label ids in range) run only in eager mode, never under ``torch.compile`` or ``torch.func``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fnllm import _checks
from fnllm.data.causal import causal_targets

__all__ = [
    "IGNORE_INDEX",
    "causal_lm",
    "classification",
    "cross_entropy",
    "dpo",
    "mlm",
    "pairwise_reward",
    "sentence_order",
    "sequence_logprobs",
]

IGNORE_INDEX = _checks.IGNORE_INDEX

Reduction = Literal["mean", "sum", "none"]


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy between ``logits [..., C]`` and integer ``labels [...]``, in float32.

    Matches ``torch.nn.functional.cross_entropy`` on float32 inputs, except that a ``"mean"``
    over a batch whose labels are all ``ignore_index`` is 0 instead of NaN.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> round(float(losses.cross_entropy(logits, torch.tensor([0, -100]))), 4)
        0.2395
        >>> losses.cross_entropy(logits, torch.tensor([-100, -100]))
        tensor(0.)

    Args:
        logits: unnormalised scores ``[..., C]`` (any floating dtype).
        labels: class ids ``[...]`` (the shape of ``logits`` without its last dimension), in
            ``[0, C)`` or equal to ``ignore_index``.
        ignore_index: label value that contributes nothing (neither loss nor count).
        reduction: ``"mean"`` over the counted positions, ``"sum"``, or ``"none"`` (a loss
            per position shaped like ``labels``, 0 where ignored).
        label_smoothing: ``eps`` in ``[0, 1]``: the target is ``1 - eps`` on the label plus
            ``eps / C`` spread over all classes (as in PyTorch).

    Returns:
        A float32 scalar, or a float32 tensor shaped like ``labels`` for ``"none"``.

    Raises:
        TypeError: ``logits`` is not floating or ``labels`` is not integer.
        ValueError: shapes disagree, an option is out of range, or (eager only) a label is
            neither in ``[0, C)`` nor ``ignore_index``; the message names the first bad label.
    """
    _check_logits_labels(logits, labels, "logits", "labels")
    _check_reduction(reduction)
    _checks.check_int("ignore_index", ignore_index)
    label_smoothing = _checks.check_range("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_label_range("labels", labels, logits.shape[-1], ignore_index)
    loss, valid = _token_nll(logits, labels, ignore_index, label_smoothing)
    return _reduce(loss, valid, reduction)


def causal_lm(
    logits: Tensor,
    tokens: Tensor,
    *,
    attention_mask: Tensor | None = None,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Next-token cross-entropy of a causal LM: logits at ``t`` predict ``tokens[..., t + 1]``.

    The shift happens inside, so pass the same ``tokens`` the model was applied to. The last
    position has no target. With an ``attention_mask``, a position counts only when both it and
    the next position are real tokens (so neither padding targets nor predictions made from
    left padding count); the mean is over all counted positions of the batch.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> tokens = torch.tensor([[1, 2, 0]])
        >>> logits = torch.zeros(1, 3, 4)                      # uniform over 4 classes
        >>> round(float(losses.causal_lm(logits, tokens)), 4)  # log(4)
        1.3863
        >>> float(losses.causal_lm(logits, tokens, attention_mask=torch.tensor([[1, 0, 0]])))
        0.0

    Args:
        logits: ``[..., T, V]`` model outputs.
        tokens: ``[..., T]`` the input token ids, in ``[0, V)``.
        attention_mask: optional ``[..., T]`` bool/int, 0 (False) on padding.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[..., T]``, 0 where not counted,
            including the last position).
        label_smoothing: as in :func:`cross_entropy`.

    Returns:
        A float32 scalar (or ``[..., T]`` for ``"none"``).

    Raises:
        TypeError: wrong dtypes.
        ValueError: shapes disagree, ``T < 1``, or (eager only) a token id is out of range.
    """
    _check_logits_labels(logits, tokens, "logits", "tokens")
    if logits.ndim < 2:
        raise ValueError(f"logits: expected [..., T, V], got shape {tuple(logits.shape)}")
    _check_reduction(reduction)
    label_smoothing = _checks.check_range("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_label_range("tokens", tokens, logits.shape[-1], None)
    targets = _shift_targets(tokens, attention_mask)
    loss, valid = _token_nll(logits, targets, IGNORE_INDEX, label_smoothing)
    return _reduce(loss, valid, reduction)


def mlm(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Masked-LM loss: cross-entropy over the picked positions (labels != ``ignore_index``).

    ``labels`` come from ``fnllm.data.mlm_mask``: the original id at the positions picked for
    prediction and -100 elsewhere.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> logits = torch.zeros(1, 3, 5)
        >>> round(float(losses.mlm(logits, torch.tensor([[-100, 4, -100]]))), 4)  # log(5)
        1.6094

    Args:
        logits: ``[..., T, V]``.
        labels: ``[..., T]`` ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: the value of positions that were not picked.

    Returns:
        The float32 mean over picked positions (0 when none was picked).

    Raises:
        TypeError: wrong dtypes.
        ValueError: shapes disagree or (eager only) a label is out of range.
    """
    return cross_entropy(logits, labels, ignore_index=ignore_index)


def sentence_order(logits: Tensor, labels: Tensor) -> Tensor:
    """Two-way sentence-order (SOP) or next-sentence (NSP) loss: cross-entropy over 2 classes.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> round(float(losses.sentence_order(torch.zeros(2, 2), torch.tensor([0, 1]))), 4)
        0.6931

    Args:
        logits: ``[B, 2]`` (or ``[..., 2]``) scores for "in order" (0) and "swapped" (1).
        labels: ``[B]`` in ``{0, 1}``.

    Returns:
        The float32 mean loss.

    Raises:
        ValueError: the last dimension of ``logits`` is not 2, shapes disagree, or (eager only)
            a label is not 0 or 1.
    """
    if isinstance(logits, Tensor) and (logits.ndim == 0 or logits.shape[-1] != 2):
        raise ValueError(f"logits: expected [..., 2] for a 2-way loss, got {tuple(logits.shape)}")
    return cross_entropy(logits, labels)


def classification(
    logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0, reduction: Reduction = "mean"
) -> Tensor:
    """Sequence-classification loss: cross-entropy of ``logits [B, C]`` against ``labels [B]``.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> logits = torch.tensor([[3.0, 0.0, 0.0]])
        >>> round(float(losses.classification(logits, torch.tensor([0]))), 4)
        0.0949

    Args:
        logits: ``[..., C]`` class scores.
        labels: ``[...]`` class ids in ``[0, C)`` (-100 to skip an example).
        label_smoothing: as in :func:`cross_entropy`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The float32 loss.

    Raises:
        ValueError: shapes disagree or (eager only) a label is out of range.
    """
    return cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)


def pairwise_reward(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: float | Tensor = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Bradley-Terry reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    The loss of an InstructGPT-style reward model trained on human comparisons; the optional
    ``margin`` is Llama 2's preference-strength margin.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> round(float(losses.pairwise_reward(torch.tensor([1.0]), torch.tensor([1.0]))), 4)
        0.6931
        >>> chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> losses.pairwise_reward(chosen, rejected, reduction="none")
        tensor([0.1269, 2.1269])

    Args:
        chosen_rewards: ``[...]`` scalar rewards of the preferred responses.
        rejected_rewards: ``[...]`` rewards of the rejected responses, same shape.
        margin: a float or a tensor broadcastable to the rewards, finite and >= 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The float32 loss.

    Raises:
        ValueError: the shapes differ or ``reduction`` is unknown.
    """
    _check_same_float_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    _check_reduction(reduction)
    margin = _checks.check_range("margin", margin, low=0.0)
    diff = chosen_rewards.float() - rejected_rewards.float()
    if isinstance(margin, Tensor):
        diff = diff - margin.float()
    elif margin != 0.0:
        diff = diff - margin
    return _reduce_all(-F.logsigmoid(diff), reduction)


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Direct Preference Optimization loss (Rafailov et al. 2023), with conservative smoothing.

    With ``z = beta * ((pc - rc) - (pr - rr))`` (log-ratios of policy to reference on the
    chosen and rejected responses) the loss is
    ``-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``. The implicit rewards are
    ``beta * (pc - rc)`` and ``beta * (pr - rr)``. Get the log-probabilities with
    :func:`sequence_logprobs`; the reference ones are computed without gradient.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> z = torch.zeros(2)
        >>> round(float(losses.dpo(z, z, z, z)), 4)  # policy == reference: log 2
        0.6931
        >>> round(float(losses.dpo(torch.tensor([-1.0]), torch.tensor([-9.0]), z[:1], z[:1])), 4)
        0.3711

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        ref_chosen_logps: ``[B]`` chosen responses under the frozen reference model.
        ref_rejected_logps: ``[B]`` rejected responses under the reference model.
        beta: inverse temperature (> 0) of the implicit reward.
        label_smoothing: ``eps`` in ``[0, 0.5]``, the assumed probability that a preference
            label is flipped (cDPO); 0 is plain DPO.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The float32 loss.

    Raises:
        ValueError: the shapes differ or an option is out of range.
    """
    _check_same_float_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_reduction(reduction)
    beta = _checks.check_range("beta", beta, low=0.0, low_open=True)
    label_smoothing = _checks.check_range("label_smoothing", label_smoothing, low=0.0, high=0.5)
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    z = beta * (chosen - rejected)
    loss = -F.logsigmoid(z)
    if isinstance(label_smoothing, Tensor) or label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return _reduce_all(loss, reduction)


def sequence_logprobs(
    logits: Tensor, tokens: Tensor, mask: Tensor | None = None, *, average: bool = False
) -> Tensor:
    """Log-probability of each sequence under a causal LM: ``sum_t log p(tokens[t] | tokens[<t])``.

    The sum runs over target positions ``t >= 1`` (the first token has no prediction) where
    ``mask[..., t]`` is true, e.g. a response mask that leaves the prompt and padding out.

    Example:
        >>> import torch
        >>> from fnllm import losses
        >>> logits = torch.zeros(1, 3, 4)                     # uniform: log p = -log 4 per token
        >>> losses.sequence_logprobs(logits, torch.tensor([[0, 1, 2]]))
        tensor([-2.7726])
        >>> losses.sequence_logprobs(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[0, 0, 1]]))
        tensor([-1.3863])

    Args:
        logits: ``[..., T, V]`` model outputs for ``tokens``.
        tokens: ``[..., T]`` the token ids the model was applied to.
        mask: optional ``[..., T]`` bool/int marking the tokens to score (aligned with
            ``tokens``, not shifted); default all.
        average: divide by the number of scored tokens (a length-normalised log-prob; 0 for a
            sequence with none).

    Returns:
        Float32 log-probabilities ``[...]``.

    Raises:
        TypeError: wrong dtypes.
        ValueError: shapes disagree or (eager only) a token id is out of range.
    """
    _check_logits_labels(logits, tokens, "logits", "tokens")
    if logits.ndim < 2:
        raise ValueError(f"logits: expected [..., T, V], got shape {tuple(logits.shape)}")
    if mask is not None:
        _check_mask("mask", mask, tokens)
    _check_label_range("tokens", tokens, logits.shape[-1], None)
    logp = logits.float().log_softmax(dim=-1)[..., :-1, :]
    targets = tokens[..., 1:].long()
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if mask is None:
        total = picked.sum(dim=-1)
        return total / picked.shape[-1] if average and picked.shape[-1] > 0 else total
    keep = mask[..., 1:].bool()
    total = torch.where(keep, picked, 0.0).sum(dim=-1)
    if average:
        total = total / keep.sum(dim=-1).clamp(min=1)
    return total


# ----------------------------------------------------------------------------- helpers

_REDUCTIONS = ("mean", "sum", "none")


def _token_nll(
    logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """Per-position float32 loss (0 where ignored) and the bool mask of counted positions."""
    logp = logits.float().log_softmax(dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    loss = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if isinstance(label_smoothing, Tensor) or label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * logp.mean(dim=-1)
    return torch.where(valid, loss, 0.0), valid


def _reduce(loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def _reduce_all(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _shift_targets(tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is not None:
        _check_mask("attention_mask", attention_mask, tokens)  # losses refuse float masks
    return causal_targets(tokens, attention_mask)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _check_logits_labels(logits: object, labels: object, lname: str, yname: str) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        what = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"{lname}: expected a floating-point tensor, got {what}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{yname}: expected an integer tensor, got {what}")
    if labels.dtype == torch.bool:
        raise TypeError(f"{yname}: expected an integer tensor, got torch.bool")
    if logits.ndim < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{yname}: shape {tuple(labels.shape)} does not match {lname} shape "
            f"{tuple(logits.shape)} (expected {yname} of shape {tuple(logits.shape[:-1])})"
        )


def _check_mask(name: str, mask: object, like: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name}: expected a bool or integer tensor, got {what}")
    if mask.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(mask.shape)} != tokens shape {tuple(like.shape)}")


def _check_same_float_shapes(**tensors: object) -> None:
    shape = None
    first = ""
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected a floating-point tensor, got {what}")
        if shape is None:
            shape, first = tuple(t.shape), name
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {first} shape {shape}")


def _check_label_range(name: str, labels: Tensor, num_classes: int, ignore: int | None) -> None:
    """Raise naming the first label outside ``[0, num_classes)`` (eager only; one host sync)."""
    if not _checks.tracing(labels):
        _checks.check_id_range(name, labels, num_classes, bound="num_classes", ignore=ignore)
