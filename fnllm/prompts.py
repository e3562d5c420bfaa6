"""In-context learning: zero-, one- and few-shot prompts, and classification by label likelihood.

A :class:`Template` turns a labelled example (a dict of strings) into text: its ``query``
part (e.g. ``"Review: {text}\\nSentiment:"``) and its ``answer`` part (``" {label}"``). A
k-shot prompt is the instruction, ``k`` solved examples and the unsolved query, joined by the
separator; a key picks and orders the shots, so prompts are reproducible.

A GPT then classifies without training: each candidate label's answer is scored as a
continuation of the prompt (:func:`label_logprobs`, the summed log-probability of its tokens
via :func:`fnllm.losses.sequence_logprobs`) and the likeliest wins (:func:`classify`).
:func:`shot_accuracy` measures how accuracy changes with the number of shots.

Tokenization is a function ``encode(text) -> list[int]`` (``corpus.encode``, or
``lambda s: tok.encode(s).ids`` for a ``tokenizers.Tokenizer``). Prompt and answer are
encoded separately and concatenated, so the answer's tokens are the same for every prompt.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, losses, tree
from fnllm import random as jr

__all__ = [
    "Template",
    "build_prompt",
    "classify",
    "few_shot",
    "label_logprobs",
    "one_shot",
    "shot_accuracy",
    "zero_shot",
]

Encode = Callable[[str], Sequence[int]]
Example = Mapping[str, str]


@dataclass(frozen=True)
class Template:
    """How an example becomes prompt text: a query, an answer, an instruction, a separator.

    Example:
        >>> from fnllm.prompts import Template
        >>> t = Template(query="Q: {text}\\nA:", answer=" {label}")
        >>> t.format_query({"text": "2+2?"}), t.format_shot({"text": "1+1?", "label": "2"})
        ('Q: 2+2?\\nA:', 'Q: 1+1?\\nA: 2')

    Args:
        query: the unsolved example; ``{field}`` placeholders name the example's keys.
        answer: what follows the query in a solved example (and what is scored for each
            label), usually ``" {label}"``.
        instruction: text before everything else (``""``: none).
        separator: between the instruction and the examples.
    """

    query: str = "Input: {text}\nOutput:"
    answer: str = " {label}"
    instruction: str = ""
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        for name in ("query", "answer", "instruction", "separator"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Template: {name} must be a string, got {type(value).__name__}")
        for name in ("query", "answer"):
            try:
                list(string.Formatter().parse(getattr(self, name)))
            except ValueError as err:
                raise ValueError(f"Template: {name} is not a valid format string: {err}") from None

    def format_query(self, example: Example) -> str:
        """The query part of ``example`` (no answer)."""
        return _format(self.query, example, "query")

    def format_answer(self, example: Example) -> str:
        """The answer part of ``example``; ``{"label": label}`` gives a candidate's answer."""
        return _format(self.answer, example, "answer")

    def format_shot(self, example: Example) -> str:
        """A solved example: query followed by answer."""
        return self.format_query(example) + self.format_answer(example)


def build_prompt(template: Template, example: Example, shots: Sequence[Example] = ()) -> str:
    """The prompt for ``example``: instruction, the solved ``shots`` in order, then the query.

    Example:
        >>> from fnllm.prompts import Template, build_prompt
        >>> t = Template(query="{text} ->", answer=" {label}", instruction="Translate.",
        ...              separator="\\n")
        >>> build_prompt(t, {"text": "chat"}, [{"text": "chien", "label": "dog"}])
        'Translate.\\nchien -> dog\\nchat ->'

    Args:
        template: a :class:`Template`.
        example: the example to solve (its answer fields are not used).
        shots: solved examples shown first.

    Returns:
        The prompt text (it ends with the query, ready for the answer).
    """
    _check_template(template)
    parts = [template.instruction] if template.instruction else []
    parts += [template.format_shot(s) for s in shots]
    parts.append(template.format_query(example))
    return template.separator.join(parts)


def zero_shot(template: Template, example: Example) -> str:
    """A prompt with no solved examples: the instruction and the query.

    Example:
        >>> from fnllm.prompts import Template, zero_shot
        >>> zero_shot(Template(instruction="Is it positive?"), {"text": "great film"})
        'Is it positive?\\n\\nInput: great film\\nOutput:'

    Args:
        template: a :class:`Template`.
        example: the example to solve.

    Returns:
        The prompt text.
    """
    return build_prompt(template, example)


def one_shot(key: Tensor, template: Template, examples: Sequence[Example], example: Example) -> str:
    """A prompt with one solved example drawn from ``examples`` by ``key``.

    Example:
        >>> from fnllm import random
        >>> from fnllm.prompts import Template, one_shot
        >>> pool = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
        >>> print(one_shot(random.key(0), Template(), pool, {"text": "fine"}))
        Input: good
        Output: positive
        <BLANKLINE>
        Input: fine
        Output:

    Args:
        key: a ``fnllm.random`` key.
        template: a :class:`Template`.
        examples: the labelled pool to draw from.
        example: the example to solve.

    Returns:
        The prompt text.
    """
    return few_shot(key, template, examples, example, 1)


def few_shot(
    key: Tensor, template: Template, examples: Sequence[Example], example: Example, k: int
) -> str:
    """A prompt with ``k`` distinct solved examples, picked and ordered by ``key``.

    The shots are the first ``k`` of ``random.permutation(key, len(examples))``, so with one
    key the ``k``-shot prompt's shots are the first ``k`` of the ``k + 1``-shot prompt's.

    Example:
        >>> from fnllm import random
        >>> from fnllm.prompts import Template, few_shot
        >>> pool = [{"text": str(i), "label": str(i % 2)} for i in range(6)]
        >>> t = Template(query="{text}:", answer="{label}", separator=" ")
        >>> few_shot(random.key(0), t, pool, {"text": "7"}, 3)
        '0:0 1:1 5:1 7:'

    Args:
        key: a ``fnllm.random`` key.
        template: a :class:`Template`.
        examples: the labelled pool.
        example: the example to solve.
        k: the number of shots, ``0 <= k <= len(examples)``.

    Returns:
        The prompt text.
    """
    return build_prompt(template, example, _pick_shots(key, examples, k))


def label_logprobs(
    model: Any,
    params: Any,
    encode: Encode,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
) -> Tensor:
    """Log-probability of every answer as the continuation of every prompt, batched.

    Each (prompt, answer) pair is one row, ``encode(prompt) + encode(answer)``, right-padded
    in batches of ``batch_size`` rows; the score is the sum of the answer tokens'
    log-probabilities (:func:`fnllm.losses.sequence_logprobs` with an answer mask).

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.prompts import label_logprobs
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=32)
        >>> encode = lambda s: list(s.encode())                   # bytes as token ids
        >>> scores = label_logprobs(gpt, gpt.init(random.key(0)), encode,
        ...                         ["It was great.", "It was awful."], [" yes", " no"])
        >>> scores.shape
        torch.Size([2, 2])

    Args:
        model: a causal LM with ``apply(params, tokens, attention_mask=...) -> logits``
            (:class:`~fnllm.models.GPT`) and ``max_len``.
        params: its parameters.
        encode: text to token ids.
        prompts: ``N`` prompt texts.
        answers: ``C`` candidate continuations (e.g. ``template.format_answer({"label": l})``).
        batch_size: rows per forward pass.

    Returns:
        Float32 ``[N, C]`` summed log-probabilities.

    Raises:
        ValueError: no prompts or answers, an answer given twice, an answer that encodes
            to no tokens, a row longer than ``model.max_len``, or a NaN score (the message
            names the prompt and the answer).
        TypeError: ``prompts`` or ``answers`` is not a list of strings, ``batch_size`` a
            bool, ``encode`` not a function, or ``model`` an encoder (BERT).
    """
    if isinstance(prompts, str) or isinstance(answers, str):
        raise TypeError("prompts, answers: expected lists of strings, not one string")
    prompts = _checks.check_texts("label_logprobs: prompts", prompts)
    answers = _checks.check_texts("label_logprobs: answers", answers)
    _checks.check_decoder("label_logprobs", model)
    if not callable(encode):
        raise TypeError(f"encode: expected a function text -> ids, got {type(encode).__name__}")
    for j, a in enumerate(answers):
        if a in answers[:j]:
            raise ValueError(
                f"answers[{j}]: {a!r} appears twice (answers[{answers.index(a)}]): the two "
                "would always tie"
            )
    if isinstance(batch_size, bool):
        raise TypeError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    answer_ids = [_encoded(encode, a, f"answers[{j}]") for j, a in enumerate(answers)]
    for a, ids in zip(answers, answer_ids):
        if not ids:
            raise ValueError(f"answers: {a!r} encodes to no tokens")
    rows: list[tuple[list[int], int]] = []
    for i, p in enumerate(prompts):
        p_ids = _encoded(encode, p, f"prompts[{i}]")
        for ids in answer_ids:
            if len(p_ids) + len(ids) > model.max_len:
                raise ValueError(
                    f"prompts[{i}]: {len(p_ids)} prompt + {len(ids)} answer tokens > max_len "
                    f"{model.max_len}"
                )
            rows.append((p_ids + ids, len(p_ids)))
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            scores.append(_score_rows(model, params, rows[start : start + batch_size]))
    out = torch.cat(scores).reshape(len(prompts), len(answers))
    nan = torch.isnan(out)
    if bool(nan.any()):
        i, j = (int(v) for v in nan.nonzero()[0])
        raise ValueError(
            f"label_logprobs: the model scores prompts[{i}] with answers[{j}] {answers[j]!r} "
            "as NaN (do the params hold NaN or inf?); no answer can be picked"
        )
    return out


def classify(
    model: Any,
    params: Any,
    encode: Encode,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
) -> Tensor:
    """Pick, for every prompt, the answer with the highest :func:`label_logprobs`.

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.prompts import classify
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=32)
        >>> encode = lambda s: list(s.encode())
        >>> classify(gpt, gpt.init(random.key(0)), encode, ["a", "b", "c"], [" x", " y"]).shape
        torch.Size([3])

    Args:
        model: a causal LM (see :func:`label_logprobs`).
        params: its parameters.
        encode: text to token ids.
        prompts: ``N`` prompt texts.
        answers: ``C`` candidate continuations.
        batch_size: rows per forward pass.

    Returns:
        int64 ``[N]`` indices into ``answers`` (the first on ties).

    Raises:
        ValueError: as :func:`label_logprobs`, including NaN scores: with NaN params no
            answer is picked rather than the first.
    """
    return label_logprobs(model, params, encode, prompts, answers, batch_size=batch_size).argmax(-1)


def shot_accuracy(
    key: Tensor,
    model: Any,
    params: Any,
    encode: Encode,
    template: Template,
    train: Sequence[Example],
    test: Sequence[Example],
    labels: Sequence[str],
    *,
    shots: Sequence[int] = (0, 1, 2, 4),
    label_key: str = "label",
    batch_size: int = 32,
) -> dict[int, float]:
    """Accuracy of label-likelihood classification on ``test`` for each number of shots.

    Test example ``i`` draws its shots from ``train`` with ``fold_in(key, i)``, the same key
    for every ``k``, so the shots of a smaller ``k`` are a prefix of a larger one's: the runs
    differ only in how many solved examples the prompt shows.

    Example:
        >>> from fnllm import random
        >>> from fnllm.models import GPT
        >>> from fnllm.prompts import Template, shot_accuracy
        >>> gpt = GPT(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_len=64)
        >>> data = [{"text": w, "label": w[0]} for w in ["ant", "bee", "asp", "bug"]]
        >>> acc = shot_accuracy(random.key(0), gpt, gpt.init(random.key(1)),
        ...                     lambda s: list(s.encode()), Template(), data, data, ["a", "b"],
        ...                     shots=(0, 2))
        >>> sorted(acc), all(0.0 <= a <= 1.0 for a in acc.values())
        ([0, 2], True)

    Args:
        key: a ``fnllm.random`` key.
        model: a causal LM (see :func:`label_logprobs`).
        params: its parameters.
        encode: text to token ids.
        template: a :class:`Template`; candidate ``l``'s answer is
            ``template.format_answer({label_key: l})``.
        train: the pool of solved examples for the shots.
        test: the examples to classify; each has ``example[label_key]`` in ``labels``.
        labels: the candidate labels.
        shots: the numbers of shots to try.
        label_key: the field holding the label.
        batch_size: rows per forward pass.

    Returns:
        ``{k: accuracy}`` for each ``k`` in ``shots``.

    Raises:
        ValueError: a test label not among ``labels``, or more shots than ``train`` holds.
        KeyError: an example lacks a field the template uses.
    """
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels: expected a list of label strings, got {labels!r:.40}")
    labels = list(labels)
    if len(set(labels)) != len(labels):
        dup = next(lab for lab in labels if labels.count(lab) > 1)
        raise ValueError(f"labels: {dup!r} appears twice in {labels}")
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise TypeError(f"shots: expected a list of shot counts such as (0, 1, 2), got {shots!r}")
    if not test:
        raise ValueError("test: no examples to score")
    truth = []
    for i, ex in enumerate(test):
        if ex.get(label_key) not in labels:
            raise ValueError(f"test[{i}]: label {ex.get(label_key)!r} is not one of {labels}")
        truth.append(labels.index(ex[label_key]))
    answers = [template.format_answer({label_key: lab}) for lab in labels]
    keys = [jr.fold_in(key, i) for i in range(len(test))]
    out = {}
    for k in shots:
        prompts = [few_shot(kk, template, train, ex, k) for kk, ex in zip(keys, test)]
        pred = classify(model, params, encode, prompts, answers, batch_size=batch_size)
        out[int(k)] = float((pred == torch.tensor(truth)).float().mean())
    return out


# ----------------------------------------------------------------------------- helpers


def _format(fmt: str, example: Example, part: str) -> str:
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a mapping of fields, got {type(example).__name__}")
    try:
        return fmt.format(**example)
    except KeyError as err:
        raise KeyError(
            f"template {part}: field {err.args[0]!r} is missing from the example "
            f"(it has {sorted(example)})"
        ) from None


def _check_template(template: Any) -> None:
    if not isinstance(template, Template):
        raise TypeError(f"template: expected a prompts.Template, got {type(template).__name__}")


def _pick_shots(key: Tensor, examples: Sequence[Example], k: int) -> list[Example]:
    if not isinstance(examples, (list, tuple)):
        raise TypeError(
            f"examples: expected a list of example dicts, got {type(examples).__name__}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    if k > len(examples):
        raise ValueError(f"k: {k} shots > the {len(examples)} examples to draw from")
    if k == 0:
        return []
    order = jr.permutation(key, len(examples))[:k].tolist()
    return [examples[i] for i in order]


def _encoded(encode: Any, text: Any, where: str) -> list[int]:
    """``encode(text)`` as a list of ints, or a TypeError naming the text and what came back."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected a string, got {type(text).__name__}")
    ids = encode(text)
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{where}: encode returned a {type(ids).__name__}, not token ids")
    out = list(ids.tolist() if isinstance(ids, Tensor) else ids)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{where}: encode returned {t!r}, not an int token id")
    return out


def _score_rows(model: Any, params: Any, rows: list[tuple[list[int], int]]) -> Tensor:
    """Answer log-probs of right-padded ``(ids, prompt_len)`` rows in one forward pass."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    answer = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (ids, n_prompt) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
        real[r, : len(ids)] = True
        answer[r, n_prompt : len(ids)] = True
    device = _device(params)
    tokens, real, answer = tokens.to(device), real.to(device), answer.to(device)
    logits = model.apply(params, tokens, attention_mask=real)
    return losses.sequence_logprobs(logits, tokens, answer)


def _device(params: Any) -> torch.device:
    """The device of the first tensor leaf of ``params`` (CPU for a tree without one)."""
    leaves = [v for v in tree.flatten(params).values() if isinstance(v, Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")
