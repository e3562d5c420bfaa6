"""``fnllm generate``: sample from a decoder (an fnllm GPT or Llama file, or a transformers
GPT-2, Llama, Qwen2 or Mistral folder), streaming."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``generate`` command to the ``fnllm`` parser's subparsers.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="fnllm")
        >>> register(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["generate", "run/", "--prompt", "Hi", "--top-k", "5"])
        >>> args.prompt, args.top_k, args.temperature
        ('Hi', 5, 0.8)

    Args:
        sub: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    p = sub.add_parser(
        "generate",
        help="sample text from a GPT checkpoint",
        description=(
            "Continue a prompt with a GPT, printing tokens as they come. SOURCE is a model "
            "file written by fnllm (fnllm pretrain's model.safetensors, io.save_model), the "
            "folder holding it, or a transformers GPT-2 folder (config.json + weights). The "
            "tokenizer is the tokenizer.json next to the model unless --tokenizer is given."
        ),
    )
    p.add_argument("source", type=Path, help="model file or folder")
    p.add_argument("--prompt", default="", help="the text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="default 64, or fewer when the model's context (max_len) is shorter",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="the sampling key (default 0)")
    p.add_argument(
        "--stop", action="append", default=None, help="stop at this token (repeatable; "
        "default: the tokenizer's end-of-text token, if any)",
    )  # fmt: skip
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or its folder")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from fnllm import generate
    from fnllm import random as jr

    _check_flags(args, parser)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model, params, folder = _load(args.source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"{args.source}: {err}")
    try:
        tok = _tokenizer(args.tokenizer or folder)
    except (OSError, ValueError) as err:
        parser.error(f"tokenizer: {err} (give --tokenizer)")
    prompt_ids = tok.encode(args.prompt, add_special_tokens=False).ids if args.prompt else []
    if not prompt_ids:
        eos = tok.token_to_id("<|endoftext|>")
        if eos is None:
            parser.error("--prompt: empty, and the tokenizer has no <|endoftext|> to start from")
        prompt_ids = [eos]
    stops = args.stop if args.stop is not None else ["<|endoftext|>"]
    stop_ids = [tok.token_to_id(s) for s in stops]
    missing = [s for s, i in zip(stops, stop_ids) if i is None]
    if missing and args.stop is not None:
        parser.error(f"--stop: {missing} not in the tokenizer's vocabulary")
    stop_ids = [i for i in stop_ids if i is not None]
    args.max_new_tokens = _new_token_count(args.max_new_tokens, len(prompt_ids), model, parser)
    try:
        steps = generate.stream(
            jr.key(args.seed), model, params, [prompt_ids], args.max_new_tokens,
            args.temperature, args.top_k, args.top_p, stop_ids, compile=args.compile,
        )  # fmt: skip
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    new: list[int] = []
    shown = ""
    for step in steps:
        token = int(step[0])
        if token in stop_ids:
            break
        new.append(token)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    out.write("\n")
    return 0


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse bad flag values before any model is read (one line each, exit 2)."""
    import math

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not args.source.exists():
        parser.error(f"{args.source}: no such file or folder")
    if args.tokenizer is not None and not args.tokenizer.exists():
        parser.error(f"--tokenizer {args.tokenizer}: no such file or folder")


DEFAULT_NEW_TOKENS = 64


def _new_token_count(
    asked: int | None, prompt_len: int, model: Any, parser: argparse.ArgumentParser
) -> int:
    """The number of tokens to generate: ``--max-new-tokens``, or the default capped so the
    prompt and the new tokens fit the model's context (with a notice on stderr)."""
    room = int(getattr(model, "max_len", prompt_len + DEFAULT_NEW_TOKENS)) - prompt_len
    if room < 1:
        parser.error(
            f"--prompt: {prompt_len} tokens leave no room in the model's context "
            f"(max_len {prompt_len + room}); give a shorter prompt"
        )
    if asked is None:
        if room < DEFAULT_NEW_TOKENS:
            print(
                f"fnllm generate: the model's context is {prompt_len + room} tokens, so "
                f"generating {room} new tokens after the {prompt_len}-token prompt "
                "(pass --max-new-tokens to choose)",
                file=sys.stderr,
            )
        return min(room, DEFAULT_NEW_TOKENS)
    if asked > room:
        parser.error(
            f"--max-new-tokens {asked}: the {prompt_len}-token prompt leaves room for {room} "
            f"new tokens in the model's context (max_len {prompt_len + room}); pass "
            f"--max-new-tokens {room} or less"
        )
    return asked


def _load(source: Path) -> tuple[Any, Any, Path]:
    """``(model, params, folder)`` from an fnllm model file, its folder or a Hugging Face
    folder of a decoder (GPT-2, ...)."""
    from fnllm import io

    if source.is_dir():
        if (source / "model.safetensors").is_file() and not (source / "config.json").is_file():
            model, params = io.load_model(source / "model.safetensors")
        else:
            model, params = io.from_hf(source)
        folder = source
    else:
        model, params = io.load_model(source)
        folder = source.parent
    if not model.is_decoder:  # the message names GPT, the decoder fnllm pretrains
        raise TypeError(
            f"the checkpoint holds a {type(model).__name__}, not a GPT (or another decoder)"
        )
    return model, params, folder


def _tokenizer(source: Path) -> Any:
    """A ``tokenizer.json`` (file or folder), or a GPT-2 folder's vocab.json + merges.txt."""
    from fnllm import data

    legacy = [source / "vocab.json", source / "merges.txt"]
    if not (source / "tokenizer.json").is_file() and all(p.is_file() for p in legacy):
        from transformers import AutoTokenizer

        return data.load_tokenizer(AutoTokenizer.from_pretrained(source))
    return data.load_tokenizer(source)
