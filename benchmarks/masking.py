"""Benchmark: ``fnllm.data.mlm_mask`` (eager and compiled) vs Hugging Face's MLM collator.

Both sides corrupt the same BERT-shaped token tensors (``[CLS] words [SEP] [PAD]...``, vocab
30522) with the 0.15 / 0.8 / 0.1 / 0.1 recipe: fnllm through ``mlm_mask`` with a fresh key per
call, Hugging Face through ``DataCollatorForLanguageModeling(mlm_probability=0.15).torch_call``
on the rows as tensors (the collator stacks them and asks the tokenizer for the special-token
mask row by row). Timings are interleaved (A, B, A, B, ...) in one process; the table shows
median batches per second and the median of the paired speed-ups (collator time / fnllm time).

Run: ``.venv/bin/python -m benchmarks.masking`` (``--quick``: one small shape, eager only;
``--threads 1`` for steadier numbers on a shared machine: with 2 OpenMP threads and other
load, every small tensor op of the eager path can stall, while the collator's per-row Python
work does not).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._harness import compare, print_table
from fnllm import random as jr
from fnllm.data import mlm_mask

VOCAB = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIALS = (PAD, UNK, CLS, SEP)


def bert_tokenizer(directory: str) -> Any:
    """A BERT-layout fast tokenizer (30522 ids, specials at 0/100-103) from a written vocab.

    ``BertTokenizerFast(vocab_file=...)`` silently builds a 5-token vocabulary with
    transformers 5 (see NOTES.md); loading the directory with ``from_pretrained`` works.
    """
    from transformers import BertTokenizerFast

    names = {PAD: "[PAD]", UNK: "[UNK]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}
    vocab = [names.get(i, f"[unused{i}]" if i < 104 else f"w{i}") for i in range(VOCAB)]
    (Path(directory) / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(directory)
    if len(tok) != VOCAB or tok.mask_token_id != MASK or tok.pad_token_id != PAD:
        raise RuntimeError(f"tokenizer: got {len(tok)} ids, mask {tok.mask_token_id}")
    return tok


def bert_tokens(batch: int, length: int) -> torch.Tensor:
    """``[CLS] w... [SEP] [PAD]...`` rows with lengths between half and all of ``length``."""
    k_ids, k_len = jr.split(jr.key(0), 2)
    ids = jr.randint(k_ids, (batch, length), 104, VOCAB)
    n = jr.randint(k_len, (batch, 1), length // 2, length + 1)
    pos = torch.arange(length)
    ids = torch.where(pos == 0, CLS, torch.where(pos == n - 1, SEP, ids))
    return torch.where(pos < n, ids, PAD)


def _masker(tokens: torch.Tensor, fn: Callable[..., Any]) -> Callable[[], Any]:
    # Fresh contiguous keys: views into one (64, 2) tensor differ in storage offset, which
    # makes a compiled function re-specialise.
    keys = itertools.cycle([k.clone() for k in jr.split(jr.key(1), 64)])
    return lambda: fn(next(keys), tokens)


def _mask(key: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mlm_mask(key, tokens, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, eager only")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DataCollatorForLanguageModeling

    shapes = [(32, 128)] if args.quick else [(32, 128), (256, 512)]
    runs = 5 if args.quick else args.runs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        collator = DataCollatorForLanguageModeling(bert_tokenizer(tmp), mlm_probability=0.15)
        for batch, length in shapes:
            tokens = bert_tokens(batch, length)
            examples = list(tokens)
            hf = lambda examples=examples: collator.torch_call(examples)
            variants = [("eager", _mask)]
            if not args.quick:
                variants.append(("compiled", torch.compile(_mask, fullgraph=True)))
            for name, fn in variants:
                c = compare(_masker(tokens, fn), hf, warmup=3, runs=runs)
                rows.append(
                    [f"{batch}x{length} {name}", 1e3 / c.a.median, 1e3 / c.b.median, 1 / c.ratio]
                )
    print_table(
        rows,
        header=("workload", "fnllm batches/s", "HF collator batches/s", "speed-up"),
        title=(
            "mlm_mask vs DataCollatorForLanguageModeling(mlm_probability=0.15), "
            f"{torch.get_num_threads()} threads"
        ),
    )


if __name__ == "__main__":
    main()
