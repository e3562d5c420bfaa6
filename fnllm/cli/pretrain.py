"""``fnllm pretrain``: a GPT or BERT from scratch on the Python documentation, resumable."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import typing
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``pretrain`` command to the ``fnllm`` parser's subparsers.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="fnllm")
        >>> sub = parser.add_subparsers(dest="command")
        >>> register(sub)
        >>> parser.parse_args(["pretrain", "--out", "run", "--model", "bert"]).model
        'bert'

    Args:
        sub: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    help_text = "pretrain a GPT or BERT from scratch on the Python docs"
    p = sub.add_parser("pretrain", help=help_text, description=_DESCRIPTION)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", choices=("gpt", "llama", "bert"), default="gpt", help="default gpt")
    p.add_argument("--quick", action="store_true", help="a tiny run that takes seconds")
    for name, kind, default, text in _numbers():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default {default})")
    p.add_argument("--no-docstrings", action="store_true", help="pydoc topics only")
    p.add_argument("--cache-dir", type=Path, default=None, help="tokenizer cache (default OUT)")
    p.add_argument("--compile", action="store_true", help="torch.compile the train step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run)


_DESCRIPTION = (
    "Train a GPT (next token) or a BERT (MLM + sentence order) from scratch on the "
    "Python documentation topics (pydoc_data) and standard-library docstrings, with a "
    "BPE/WordPiece tokenizer trained on them and cached. Rerunning the same command "
    "resumes from the newest checkpoint in OUT/checkpoints."
)


def _numbers() -> list[tuple[str, type, Any, str]]:
    """``(name, type, default, help)`` of each number in ``PretrainConfig``, one flag each: its
    help is the first line of the field's entry in the ``PretrainConfig`` docstring."""
    from fnllm.pretraining import PretrainConfig

    types = typing.get_type_hints(PretrainConfig)
    docs = dict(re.findall(r"^    (\w+): (.+)$", inspect.getdoc(PretrainConfig) or "", re.M))
    return [
        (f.name, types[f.name], f.default, docs[f.name].rstrip("."))
        for f in dataclasses.fields(PretrainConfig)
        if types[f.name] in (int, float)
    ]


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from fnllm.pretraining import PretrainConfig, pretrain

    cfg = PretrainConfig(out=args.out, model=args.model)
    if args.quick:
        cfg = cfg.quick()
    given = {name: getattr(args, name) for name, *_ in _numbers()}
    given = {name: value for name, value in given.items() if value is not None}
    for name, value in given.items():
        low = 0 if name in ("seed", "eval_every") else 1
        if name not in ("lr", "val_fraction") and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not (math.isfinite(given.get("lr", 1.0)) and given.get("lr", 1.0) > 0):
        parser.error(f"--lr must be a finite number > 0, got {given['lr']}")
    if "val_fraction" in given and not 0.0 < given["val_fraction"] < 1.0:
        parser.error(f"--val-fraction must be in (0, 1), got {given['val_fraction']}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for flag, path in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"{flag} {path}: exists and is not a folder")
    cfg = dataclasses.replace(
        cfg,
        **given,
        docstrings=cfg.docstrings and not args.no_docstrings,
        cache_dir=args.cache_dir,
        compile=args.compile,
        progress=not args.no_progress,
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif args.quick:
        torch.set_num_threads(1)  # a tiny model: one thread is fastest
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    world = os.environ.get("WORLD_SIZE", "1")
    if main_rank:
        ranks = f" on {world} ranks (data parallel)" if world != "1" else ""
        print(f"fnllm pretrain: {cfg.model}, {cfg.steps} steps{ranks}, output in {cfg.out}")
    try:
        summary = pretrain(cfg)
    except ValueError as err:  # name the flag: "n_head 3" -> "--n-head 3"
        names = "|".join(name for name, *_ in _numbers())
        parser.error(re.sub(rf"\b({names})\b", lambda m: "--" + m[1].replace("_", "-"), str(err)))
    if not main_rank:
        return 0
    print(
        f"step {summary['step']}: train loss {summary['train_loss']:.3f}, validation loss "
        f"{summary['val_loss']:.3f} (perplexity {summary['val_ppl']:.1f}); unigram entropy of "
        f"the validation text {summary['unigram_entropy']:.3f}"
    )
    if "val_sop_accuracy" in summary:
        print(f"validation sentence-order accuracy {summary['val_sop_accuracy']:.3f}")
    out = Path(cfg.out)
    print(f"model: {out / 'model.safetensors'}  loss curve: {out / 'loss.png'}")
    return 0
