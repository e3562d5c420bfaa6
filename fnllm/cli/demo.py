"""``fnllm demo``: every way of adapting a pretrained transformer, compared on real data.

By default: the pretrained all-MiniLM-L6-v2 on the VADER study's human-rated movie-review
sentences (positive vs negative). Feature-based probes (logistic regression, boosted trees)
and finetuning strategies (``head``, ``bitfit``, ``last:1``, ``last:2``, ``full``, ``lora``)
each train on the same split; one table compares trainable parameters, time and accuracy.
``fnllm demo --pretrain`` runs the earlier demo (a small GPT pretrained from scratch).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fnllm.cli import pretrain_demo

__all__ = ["DEFAULT_STRATEGIES", "register"]

DEFAULT_STRATEGIES = (
    "features+logreg",
    "features+boosting",
    "head",
    "bitfit",
    "last:1",
    "last:2",
    "full",
    "lora",
)
HEAD_EPOCHS = 10  # an epoch of `head` on cached features costs next to nothing
_COLUMNS = (
    "strategy",
    "trainable",
    "epochs",
    "frozen pass reused",
    "time (s)",
    "val acc",
    "val F1",
    "test acc",
    "test F1",
)


def register(sub: Any) -> None:
    """Add the ``demo`` command to the ``fnllm`` parser's subparsers.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="fnllm")
        >>> register(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["demo", "--quick", "--strategies", "head,lora"])
        >>> args.quick, args.strategies
        (True, 'head,lora')

    Args:
        sub: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    demo = sub.add_parser(
        "demo",
        help="compare ways of adapting a pretrained model (feature-based, head, last:N, LoRA...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a BERT or GPT-2 Hugging Face folder (default: all-MiniLM-L6-v2)",
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a .csv or .jsonl file of texts and labels (default: VADER movie reviews)",
    )
    demo.add_argument("--text-column", default="text", help="text column of --data (text)")
    demo.add_argument("--label-column", default="label", help="label column of --data (label)")
    demo.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help="comma-separated rows (default: all eight)",
    )
    demo.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"finetuning epochs (default 1; head trains x{HEAD_EPOCHS})",
    )
    demo.add_argument("--train-size", type=int, default=None, help="training examples (1600)")
    demo.add_argument("--val-size", type=int, default=None, help="validation examples (400)")
    demo.add_argument("--test-size", type=int, default=None, help="test examples (800)")
    demo.add_argument("--max-len", type=int, default=None, help="tokens per text (40)")
    demo.add_argument("--batch-size", type=int, default=None, help="batch size (32)")
    demo.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (8; alpha = 2 x rank)")
    demo.add_argument("--quick", action="store_true", help="a tiny run that takes seconds")
    demo.add_argument("--seed", type=int, default=0, help="the run's key (default 0)")
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder for results.md/.png/.json (default ./fnllm-demo)",
    )
    demo.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--pretrain",
        action="store_true",
        help="run the pretraining demo instead (a small GPT from scratch)",
    )
    pretrain_demo.add_arguments(demo)
    demo.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.pretrain:
        return pretrain_demo.run(args, parser)
    quick = args.quick

    def pick(value: int | None, quick_value: int, full_value: int) -> int:
        return value if value is not None else (quick_value if quick else full_value)

    sizes = {
        "train": pick(args.train_size, 32, 1600),
        "val": pick(args.val_size, 16, 400),
        "test": pick(args.test_size, 32, 800),
    }
    max_len = pick(args.max_len, 24, 40)
    batch_size = pick(args.batch_size, 16, 32)
    epochs = pick(args.epochs, 1, 1)
    for flag, value in (
        ("--epochs", epochs),
        ("--batch-size", batch_size),
        ("--lora-rank", args.lora_rank),
        *((f"--{k}-size", v) for k, v in sizes.items()),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if max_len < 2:
        parser.error(f"--max-len must be >= 2, got {max_len}")
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not names:
        parser.error("--strategies: give at least one")
    out = args.out or Path("fnllm-demo")
    try:
        return _demo(args, names, sizes, max_len, epochs, batch_size, out, parser)
    except (FileNotFoundError, KeyError) as err:
        parser.error(str(err).strip("'\""))
    return 2  # pragma: no cover


def _demo(
    args: argparse.Namespace,
    names: list[str],
    sizes: dict[str, int],
    max_len: int,
    epochs: int,
    batch_size: int,
    out: Path,
    parser: argparse.ArgumentParser,
) -> int:
    import torch

    from fnllm import data, distributed, io
    from fnllm import random as jr
    from fnllm.cli import _compare
    from fnllm.finetune import Classifier, strategy
    from fnllm.finetune.classifier import Pooling
    from fnllm.models import BERT

    if args.threads:
        torch.set_num_threads(args.threads)
    ranks = distributed.launched_world_size()
    if ranks > 1:  # under torchrun: the finetuning rows train data parallel over the ranks
        distributed.init()
    main = distributed.is_main()  # rank 0 alone prints, draws and writes files
    say = print if main else _quiet
    progress = not args.no_progress and main
    t0 = time.perf_counter()
    model_dir = args.model_dir or io.pretrained_dir("all-MiniLM-L6-v2")
    try:
        base, base_params = io.from_hf(model_dir)
    except (ValueError, TypeError) as err:
        parser.error(f"--model-dir {model_dir}: {err}")
    tokenizer = data.load_tokenizer(model_dir)
    if args.data is None:
        texts, labels, _ = data.load_vader()
        classes: list[Any] = ["negative", "positive"]
        source = "VADER movie-review sentences (Hutto & Gilbert 2014), |rating| >= 0.5"
    else:
        try:
            texts, labels, classes = data.read_labelled(
                args.data, args.text_column, args.label_column
            )
        except (ValueError, TypeError) as err:
            parser.error(f"--data: {err}")
        source = str(args.data)
    pooling: Pooling = "mean" if isinstance(base, BERT) else "last"
    model = Classifier(base, n_classes=len(classes), pooling=pooling)
    for name in names:
        if name in _compare.PROBES:
            continue
        try:
            strategy(name, model)
        except ValueError as err:
            parser.error(f"--strategies: {err}; or one of {list(_compare.PROBES)}")
    root = jr.key(args.seed)
    k_split, k_head, k_batch, k_train = jr.split(root, 4)
    total_n, wanted = len(labels), sum(sizes.values())
    if wanted < total_n:  # stratified subsamples of the wanted sizes, drawn in one go
        fractions = [n / total_n for n in sizes.values()] + [1 - wanted / total_n]
        parts = data.stratified_split(k_split, labels, fractions)[:3]
    else:
        parts = data.stratified_split(k_split, labels, (0.8, 0.1, 0.1))
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    width = min(max_len, base.max_len)
    batches, truncated = {}, 0
    for (split, n), idx, k in zip(sizes.items(), parts, jr.split(k_batch, 3)):
        if idx.numel() > n:  # a random subsample of the split
            idx = idx[jr.permutation(k, idx.numel())][:n]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = data.encode_texts(tokenizer, [texts[i] for i in idx.tolist()], width)
        # "encode_texts: N of M texts were longer than max_len ..." -> N
        truncated += sum(
            int(str(w.message).split()[1]) for w in caught if "truncated" in str(w.message)
        )
        # the demo trains eagerly (no compile), so each batch is padded to its own longest text
        # only; with train.fit(compile=True) keep length_batches' default buckets
        batches[split] = data.length_batches(
            ids, labels[idx], batch_size, pad_id=pad_id, bucket=None
        )
    uneven = [len(b["labels"]) for b in batches["train"] if len(b["labels"]) % ranks]
    if uneven:
        parser.error(
            f"--batch-size {batch_size}, --train-size {sizes['train']}: under torchrun every "
            f"training batch is split over the {ranks} ranks, but a batch of {uneven[0]} "
            f"examples does not divide; pick sizes that are multiples of {ranks}"
        )
    params = model.init(k_head, base_params=base_params)
    setup = _compare.Setup(model, params, batches)
    counts = {s: sum(len(b["labels"]) for b in bs) for s, bs in batches.items()}
    say(
        f"fnllm demo: {args.model_dir or 'all-MiniLM-L6-v2'} ({type(base).__name__}, "
        f"{base.n_layer} layers, "
        f"d={base.d_model}), {pooling} pooling, {torch.get_num_threads()} threads"
        + (f", {ranks} ranks (finetuning rows data parallel)" if ranks > 1 else "")
    )
    say(f"data: {source}; {len(texts)} texts, classes {classes}")
    say(
        f"      train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"(stratified split, key {args.seed}), at most {width} tokens ({truncated} truncated)"
    )

    layers = {_compare.resume_layer(setup, n, args.lora_rank) for n in names}
    _compare.frozen_pass(setup, layers, progress)
    if setup.cache:
        say(
            f"frozen pass: {setup.cache_seconds:.1f} s for layers {sorted(setup.cache)} "
            "(run once, reused by the rows that say so)"
        )
    rows = []
    for i, name in enumerate(names):
        if name in _compare.PROBES:
            if not main:  # scikit-learn/XGBoost in one process: rank 0 alone fits the probe
                continue
            rows.append(_compare.run_probe(setup, name, args.quick))
        else:  # under torchrun: every rank trains, on its slice of each batch
            key = jr.fold_in(k_train, i)
            n_epochs = epochs * HEAD_EPOCHS if name == "head" else epochs
            rows.append(_compare.run_strategy(setup, name, n_epochs, args.lora_rank, key, progress))
        if not main:
            continue
        r = rows[-1]
        say(
            f"  {r.name}: test acc {r.test_acc:.3f} in {r.seconds:.1f} s "
            f"(process CPU so far {time.process_time():.0f} s)",
            flush=True,
        )
    if not main:
        distributed.barrier()  # until rank 0 has written its files
        return 0
    total = time.perf_counter() - t0
    table = _table(rows)
    say()
    say(table)
    say(
        f"\ntotal {total:.0f} s wall, {time.process_time():.0f} s CPU "
        f"(frozen pass {setup.cache_seconds:.0f} s)"
    )
    out.mkdir(parents=True, exist_ok=True)
    command = (
        "fnllm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "fnllm demo"
    )
    _write_markdown(
        out / "results.md",
        rows,
        command,
        args.model_dir or "all-MiniLM-L6-v2",
        source,
        counts,
        width,
        total,
        setup,
    )
    _write_plot(out / "results.png", rows)
    (out / "results.json").write_text(
        json.dumps({"rows": [r.__dict__ for r in rows], "total_seconds": total}, indent=1)
    )
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'}")
    distributed.barrier()
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on the ranks that do not report."""


def _cells(r: Any) -> list[str]:
    return [
        r.name,
        f"{r.trainable:,}",
        str(r.epochs),
        r.reused,
        f"{r.seconds:.1f}",
        f"{r.val_acc:.3f}",
        f"{r.val_f1:.3f}",
        f"{r.test_acc:.3f}",
        f"{r.test_f1:.3f}",
    ]


def _table(rows: list[Any]) -> str:
    cells = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_markdown(
    path: Path,
    rows: list[Any],
    command: str,
    model_dir: Any,
    source: str,
    counts: dict[str, int],
    width: int,
    total: float,
    setup: Any,
) -> None:
    import torch

    lines = [
        "# fnllm demo results",
        "",
        f"Command: `{command}` ({torch.get_num_threads()} threads, total {total:.0f} s, of which "
        f"the shared frozen pass {setup.cache_seconds:.0f} s).",
        "",
        f"Model: `{model_dir}`. Data: {source}; train {counts['train']}, validation "
        f"{counts['val']}, test {counts['test']}, at most {width} tokens per text.",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(_COLUMNS))) + " |",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += [
        "",
        "*frozen pass reused*: the row starts its forward at that layer from hidden states "
        "computed "
        "once for all rows. *trainable* for boosting counts tree nodes. Learning rates (AdamW, "
        "warm-up + cosine): `head` 1e-2, `bitfit` and `lora` 2e-3, `full` 1e-4; `last:N` "
        "trains its blocks at 1e-4 and its fresh head at its own 1e-2 (two optimizers over "
        "the partition).",
        "",
    ]
    path.write_text("\n".join(lines))


def _write_plot(path: Path, rows: list[Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnllm._figure_parts import _moving_average

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {r.name: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(rows)}
    for r in rows:
        left.scatter(max(r.trainable, 1), r.test_acc, s=30, color=colors[r.name])
        left.annotate(
            r.name,
            (max(r.trainable, 1), r.test_acc),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    left.set_xscale("log")
    low, high = left.get_xlim()
    left.set_xlim(low, high * 4)  # room for the rightmost point's label
    left.set_xlabel("trainable parameters (log)")
    left.set_ylabel("test accuracy")
    left.set_title("accuracy vs trainable parameters")
    left.grid(alpha=0.3)
    for r in rows:
        if r.losses:
            x = [(i + 1) / r.steps_per_epoch for i in range(len(r.losses))]
            right.plot(x, _moving_average(r.losses, 8), label=r.name, lw=1.2, color=colors[r.name])
    right.set_xlabel("epoch")
    right.set_ylabel("training loss (smoothed)")
    right.set_title("training loss")
    right.grid(alpha=0.3)
    if any(r.losses for r in rows):
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
