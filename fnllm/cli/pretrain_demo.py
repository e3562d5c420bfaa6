"""``fnllm demo --pretrain``: pretrains a small GPT on the built-in corpus, checkpoints, resumes."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "flags_given", "run"]

DEFAULT_STEPS = 200


def add_arguments(demo: Any) -> None:
    """Add the pretraining demo's flags to the ``demo`` subparser (used with ``--pretrain``).

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="fnllm demo")
        >>> add_arguments(parser)
        >>> parser.parse_args(["--steps", "3"]).steps
        3

    Args:
        demo: the ``demo`` subcommand's ``argparse`` parser.
    """
    g = demo.add_argument_group("pretraining demo (--pretrain)")
    g.add_argument("--steps", type=int, default=None, help=f"train steps (default {DEFAULT_STEPS})")
    g.add_argument("--compile", action="store_true", help="torch.compile the train step")
    g.add_argument("--no-minilm", action="store_true", help="skip the MiniLM part")


def flags_given(args: argparse.Namespace) -> dict[str, bool]:
    """Which of the pretraining demo's own flags were given (they mean nothing without it).

    Example:
        >>> import argparse
        >>> flags_given(argparse.Namespace(steps=None, compile=True, no_minilm=False))
        {'--steps': False, '--compile': True, '--no-minilm': False}

    Args:
        args: the parsed ``demo`` flags.

    Returns:
        ``{flag: given}``.
    """
    return {
        "--steps": args.steps is not None,
        "--compile": bool(args.compile),
        "--no-minilm": bool(args.no_minilm),
    }


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the pretraining demo with parsed arguments (``fnllm demo --pretrain``).

    Example:
        >>> import argparse, contextlib, io
        >>> args = argparse.Namespace(steps=2, out=None, compile=False, threads=1, seed=0,
        ...                           no_progress=True, no_minilm=True)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     status = run(args, argparse.ArgumentParser())
        >>> status, "reload equal: True" in out.getvalue()
        (0, True)

    Args:
        args: the parsed flags (``steps``, ``out``, ``compile``, ``threads``, ``seed``,
            ``no_progress``, ``no_minilm``).
        parser: the parser, for error messages.

    Returns:
        The exit status.
    """
    return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.steps is None:
        args = argparse.Namespace(**{**vars(args), "steps": DEFAULT_STEPS})
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.out is not None:
        _check_out(args.out, args.steps, parser)
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="fnllm-demo-") as tmp:
            return _demo(args, Path(tmp))
    return _demo(args, args.out)


def _check_out(out: Path, steps: int, parser: argparse.ArgumentParser) -> None:
    """Refuse an ``--out`` that is a file, or whose checkpoints are past ``--steps``."""
    from fnllm import train

    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: is a file, not a folder")
    latest = train.latest_checkpoint(out / "checkpoints") if out.is_dir() else None
    if latest is not None:
        done = int(latest.stem.split("_")[-1])  # step_00000200.safetensors
        if done > steps:
            parser.error(
                f"--out {out} holds a run trained to step {done}, past --steps {steps}: give "
                f"--steps {done} or more to resume it, or another --out"
            )


def _demo(args: argparse.Namespace, out: Path) -> int:
    import torch

    from fnllm import data, io, losses, optim, random, train, tree
    from fnllm.models import GPT

    torch.set_num_threads(max(1, args.threads or 1))  # a tiny model: 1 thread
    progress = not args.no_progress
    root = random.key(args.seed)
    k_init, k_data, k_train = random.split(root, 3)

    print(f"fnllm demo: torch {torch.__version__}, key {args.seed}, output in {out}")
    corpus = data.Corpus(kind="bpe", vocab_size=384)
    n_tokens = sum(len(d) for d in corpus.documents)
    n_docs = len(corpus.documents)
    print(f"corpus: {n_docs} documents, {n_tokens} tokens, BPE vocab {corpus.vocab_size}")

    gpt = GPT(vocab_size=corpus.vocab_size, n_layer=2, n_head=4, d_model=128, max_len=64)
    params = gpt.init(k_init)
    print(f"model: {gpt}")
    print(f"params: {tree.count(params):,} in {len(tree.paths(params))} tensors")

    block, batch_size = 32, 8
    # epoch e has its own shuffle; the batch of a step depends only on (key, step)
    batches = data.epochs(
        lambda e: data.gpt_batches(corpus, k_data, batch_size=batch_size, block_size=block, epoch=e)
    )
    batch_at = batches.batch

    def loss_fn(trainable: Any, frozen: Any, batch: dict[str, torch.Tensor], key: Any) -> Any:
        logits = gpt.apply(tree.combine(trainable, frozen), batch["input_ids"])
        return losses.cross_entropy(logits, batch["targets"])

    # Freezing is a partition: here everything trains; "blocks.1.*" would train one block only.
    trainable, frozen = tree.partition(params, "*")
    warmup = min(10, args.steps // 10)
    opt = optim.adamw(optim.warmup_cosine(3e-3, warmup, args.steps + 1), weight_decay=0.01)
    ckpt = out / "checkpoints"
    first_half = max(1, args.steps // 2)
    print(f"\ntraining {first_half} steps, checkpoint, then resuming to {args.steps}:")
    common = dict(
        key=k_train,
        compile=args.compile,
        checkpoint=train.Checkpointing(ckpt, every=max(1, args.steps // 4)),
        model=gpt,
        progress=progress,
    )
    part1 = train.fit(loss_fn, opt, trainable, frozen, batch_at, steps=first_half, **common)
    # a fresh call resumes from the newest checkpoint in `ckpt`, as after a crash
    result = train.fit(loss_fn, opt, trainable, frozen, batch_at, steps=args.steps, **common)
    losses_seen = part1.history + result.history
    if losses_seen:
        first, last = losses_seen[0], losses_seen[-1]
        print(
            f"loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
            f"{last['step']}"
        )
    else:  # a re-run of a finished run: everything came from its checkpoint
        print(f"resumed at step {result.step}: already trained to --steps, nothing to train")

    trained = tree.combine(result.trainable, frozen)
    model_file = out / "gpt.safetensors"
    io.save_model(model_file, gpt, trained, meta={"steps": result.step})
    gpt2, reloaded = io.load_model(model_file)
    probe = batch_at(0)["input_ids"][:2]
    same = torch.equal(gpt.apply(trained, probe), gpt2.apply(reloaded, probe))
    print(
        f"saved {model_file.name} ({model_file.stat().st_size / 1e6:.1f} MB); reload equal: {same}"
    )

    prompt = "The river"
    print(f"\ngreedy continuation of {prompt!r}:")
    print("  " + _greedy(gpt, trained, corpus, prompt, 24))

    if not args.no_minilm:
        _minilm()
    return 0


def _greedy(gpt: Any, params: Any, corpus: Any, prompt: str, n: int) -> str:
    import torch

    ids = torch.tensor([corpus.encode(prompt)])
    for _ in range(n):
        logits = gpt.apply(params, ids[:, -gpt.max_len :])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return corpus.decode(ids[0])


def _minilm() -> None:
    import torch

    from fnllm import io
    from fnllm.finetune import mean_pool

    try:
        directory = io.pretrained_dir("all-MiniLM-L6-v2")
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"\n(MiniLM part skipped: {err})")
        return
    from fnllm import data

    bert, params = io.from_hf(directory)
    tok = data.load_tokenizer(directory)
    sentences = [
        "Toast is a simple yet delicious food.",
        "It's often served with butter, jam, or honey.",
        "The curious kitten deftly climbed the bookshelf.",
    ]
    ids, lengths = data.pad_sequences([tok.encode(s).ids for s in sentences], pad_id=0)
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    with torch.no_grad():
        hidden = bert.apply(params, ids, attention_mask=mask).last_hidden_state
        emb = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
    sim = emb @ emb.T
    print("\nall-MiniLM-L6-v2 (pretrained BERT, loaded with fnllm.io.from_hf): cosine similarity")
    for i, s in enumerate(sentences):
        row = " ".join(f"{sim[i, j]:5.2f}" for j in range(len(sentences)))
        print(f"  {row}  {s}")
