"""Causal-LM data: next-token targets, packing documents into blocks, instruction masking.

Convention: targets are *aligned with the logits*. For inputs ``tokens[..., T]`` the model's
logits at position ``t`` predict ``tokens[..., t + 1]``, so ``targets[..., t] =
tokens[..., t + 1]`` and the last position (which has no next token) is -100. A loss is then
a plain per-position cross-entropy ``cross_entropy(logits.flatten(0, -2), targets.flatten(),
ignore_index=-100)`` with no further shifting. (Hugging Face's ``labels`` are the unshifted
ids and the model shifts internally; ``causal_targets`` does that shift up front.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from fnllm import _checks

__all__ = ["causal_targets", "instruction_targets", "pack"]

IGNORE_INDEX = _checks.IGNORE_INDEX


def causal_targets(tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Next-token targets aligned with the logits: ``targets[..., t] = tokens[..., t + 1]``.

    Example:
        >>> import torch
        >>> from fnllm.data import causal_targets
        >>> causal_targets(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]))
        tensor([[   6,    7, -100, -100]])

    Args:
        tokens: integer ids ``[..., T]``.
        attention_mask: optional ``[..., T]``, 0/False on padding. A position gets a target
            only when both it and the next position are real tokens, so neither a padded
            target nor a prediction made from padding (left padding) counts.

    Returns:
        Targets shaped and typed like ``tokens``, -100 on the last position and on padding.
    """
    _checks.check_int_tensor("tokens", tokens)
    fill = torch.full_like(tokens[..., :1], IGNORE_INDEX)
    targets = torch.cat([tokens[..., 1:], fill], dim=-1)
    if attention_mask is not None:
        _checks.check_mask("attention_mask", attention_mask, tokens)
        real = attention_mask.bool()
        nxt = torch.cat([real[..., 1:], torch.zeros_like(real[..., :1])], dim=-1)
        targets = torch.where(real & nxt, targets, IGNORE_INDEX)
    return targets


def instruction_targets(
    tokens: Tensor,
    *,
    prompt_len: int | Tensor | None = None,
    prompt_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Causal targets with the prompt part removed from the loss (instruction tuning).

    A target is dropped (-100) when the token it predicts belongs to the prompt, so only the
    response tokens are learned; the prompt still conditions them.

    Example:
        >>> import torch
        >>> from fnllm.data import instruction_targets
        >>> tokens = torch.tensor([[11, 12, 13, 21, 22, 2]])     # 3 prompt tokens, then answer
        >>> instruction_targets(tokens, prompt_len=3)
        tensor([[-100, -100,   21,   22,    2, -100]])

    Args:
        tokens: integer ids ``[..., T]``: prompt followed by response.
        prompt_len: prompt length, an int or an integer tensor ``[...]`` (one per row).
        prompt_mask: alternatively a bool ``[..., T]`` mask, True on prompt tokens (for
            multi-turn layouts). Give exactly one of ``prompt_len`` and ``prompt_mask``.
        attention_mask: optional ``[..., T]`` padding mask, as in :func:`causal_targets`.

    Returns:
        Targets aligned with the logits, -100 where the predicted token is in the prompt, on
        padding and on the last position. A row whose prompt covers all its real tokens keeps
        no target; a ``UserWarning`` names such rows (eager mode).

    Raises:
        ValueError: both or neither of ``prompt_len`` and ``prompt_mask``; a length outside
            ``[0, T]``; a ``prompt_len`` tensor whose shape is not ``tokens.shape[:-1]`` (a
            ``[B, 1]`` column is refused rather than broadcast to ``[B, B, T]``).
        TypeError: a float ``prompt_len``.
    """
    if (prompt_len is None) == (prompt_mask is None):
        raise ValueError("instruction_targets: give exactly one of prompt_len and prompt_mask")
    targets = causal_targets(tokens, attention_mask)
    if prompt_mask is not None:
        _checks.check_mask("prompt_mask", prompt_mask, tokens)
        in_prompt = prompt_mask.bool()
    else:
        if not isinstance(prompt_len, Tensor):
            _checks.check_int("prompt_len", prompt_len, low=0)
        length = torch.as_tensor(prompt_len, device=tokens.device)
        if length.dtype.is_floating_point or length.dtype == torch.bool:
            raise ValueError(f"prompt_len: expected integers, got {length.dtype}")
        if length.ndim and tuple(length.shape) != tuple(tokens.shape[:-1]):
            hint = " (squeeze the last dim)" if length.shape[-1:] == (1,) else ""
            rows = ", ".join(map(str, tokens.shape[:-1]))
            raise ValueError(
                f"prompt_len: shape {tuple(length.shape)} does not match the rows of tokens "
                f"{tuple(tokens.shape)}: expected an int or a [{rows}] tensor, one length per "
                f"row{hint}"
            )
        _check_prompt_len(length, tokens.shape[-1])
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        in_prompt = positions < length[..., None]
    # targets[t] predicts tokens[t + 1]: drop it when position t + 1 is in the prompt.
    next_in_prompt = torch.cat([in_prompt[..., 1:], torch.zeros_like(in_prompt[..., :1])], -1)
    out = torch.where(next_in_prompt, IGNORE_INDEX, targets)
    _warn_empty_rows(out, targets, tokens)
    return out


def _warn_empty_rows(out: Tensor, targets: Tensor, tokens: Tensor) -> None:
    """Warn, naming them, about rows that had targets but have none once the prompt is cut."""
    if _checks.tracing(out, tokens) or out.ndim < 1 or out.numel() == 0:
        return
    lost = ((targets != IGNORE_INDEX).any(-1) & (out == IGNORE_INDEX).all(-1)).reshape(-1)
    if bool(lost.any()):
        rows = lost.nonzero()[:, 0].tolist()
        warnings.warn(
            f"instruction_targets: rows {_checks.few([str(r) for r in rows])} (flat index) have "
            "no target left: the prompt covers every real token, so they add nothing to the "
            "loss (is prompt_len past the row's length?)",
            stacklevel=3,
        )


def pack(
    sequences: Iterable[Sequence[int] | Tensor],
    block_size: int,
    eos_id: int,
    *,
    drop_remainder: bool = True,
    pad_id: int | None = None,
) -> Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into blocks.

    This is GPT-style pretraining packing: blocks may span document boundaries; the EOS
    token tells the model where one document ends.

    Example:
        >>> from fnllm.data import pack
        >>> pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
        tensor([[1, 2, 3, 0],
                [4, 5, 0, 6],
                [7, 8, 9, 0]])

    Args:
        sequences: token-id lists (or 1-D tensors), one per document.
        block_size: length of each block.
        eos_id: id appended after every document.
        drop_remainder: drop the last partial block (default); otherwise pad it with
            ``pad_id`` (which must then be given).
        pad_id: the padding id for the last block when ``drop_remainder=False``.

    Returns:
        An int64 tensor ``[num_blocks, block_size]``.
    """
    _checks.check_int("block_size", block_size, low=1)
    _checks.check_int("eos_id", eos_id, low=0)
    if not drop_remainder and pad_id is None:
        raise ValueError("pack: drop_remainder=False needs a pad_id for the last block")
    if pad_id is not None:
        _checks.check_int("pad_id", pad_id, low=0)
    stream: list[int] = []
    for i, seq in enumerate(sequences):
        ids = seq.tolist() if isinstance(seq, Tensor) else list(seq)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise TypeError(f"sequences[{i}]: expected integer token ids")
        stream.extend(ids)
        stream.append(eos_id)
    n_full = len(stream) // block_size
    rest = len(stream) - n_full * block_size
    if rest and not drop_remainder:
        stream.extend([pad_id] * (block_size - rest))  # type: ignore[list-item]
        n_full += 1
    out = torch.tensor(stream[: n_full * block_size], dtype=torch.int64)
    return out.reshape(n_full, block_size)


def _check_prompt_len(length: Tensor, width: int) -> None:
    """Prompt lengths must lie in ``[0, width]`` (values read eagerly only)."""
    if _checks.tracing(length) or length.numel() == 0:
        return
    bad = (length < 0) | (length > width)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]] if length.ndim else []
        value = int(length[tuple(where)]) if length.ndim else int(length)
        raise ValueError(
            f"prompt_len: {value} at {where} is outside [0, {width}] (the sequence length): "
            "a prompt longer than the sequence leaves the row with no target"
        )
