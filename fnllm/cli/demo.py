"""``fnllm demo``: every way of adapting a pretrained transformer, compared on real data.

By default: the pretrained all-MiniLM-L6-v2 on the VADER study's human-rated movie-review
sentences (positive vs negative). Feature-based probes (logistic regression, boosted trees)
and finetuning strategies (``head``, ``bitfit``, ``last:1``, ``last:2``, ``full``, ``lora``)
each train on the same split; one table compares trainable parameters, time and accuracy.
Every finetuning row trains with ``--seeds`` keys (default 3): the table shows mean ± sample
standard deviation, the figure error bars, and the closing lines say which differences are
larger than that spread. ``--recipe reference`` trains as a ``transformers`` script does;
``--preset reference`` runs 4,000/1,000/2,000 sentences of 64 tokens.
``fnllm demo --pretrain`` runs the earlier demo (a small GPT pretrained from scratch).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
# 3 keys per finetuning row, the fewest that give a usable spread. The finetuning rows are ~85%
# of the demo's CPU time (measured: 1 seed at 1,600 sentences, 511 of 592 s CPU), so 3 seeds
# at 1,600 sentences would take ~9 min on 2 cores; 1,000 training sentences: 304 s (2026-12-06).
DEFAULT_SEEDS = 3
RECIPES_HELP = ("default", "reference")
# data sizes (train, val, test sentences; tokens per text)
PRESETS = {
    "default": {"train": 1000, "val": 400, "test": 800, "max_len": 40},
    "quick": {"train": 32, "val": 16, "test": 32, "max_len": 24},
    "reference": {"train": 4000, "val": 1000, "test": 2000, "max_len": 64},
}
_COLUMNS = (
    "strategy",
    "trainable",
    "epochs",
    "seeds",
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
        help="finetuning epochs (default 1; the default recipe trains head x10)",
    )
    demo.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"keys per finetuning row, for the spread (default {DEFAULT_SEEDS}; --quick: 1)",
    )
    demo.add_argument(
        "--recipe",
        choices=sorted(RECIPES_HELP),
        default="default",
        help="how rows train: 'default' (the demo's, see results.json) or 'reference' "
        "(as a transformers script: dropout on, lr 5e-5 for every leaf, linear decay)",
    )
    demo.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="data sizes: 'default' (1000/400/800 sentences, 40 tokens), 'quick' (as --quick) "
        "or 'reference' (4000/1000/2000 sentences, 64 tokens); the size flags override it",
    )
    demo.add_argument("--train-size", type=int, default=None, help="training examples (1000)")
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
    # errors name the subcommand: "fnllm demo: error: ..."
    demo.set_defaults(run=lambda args, parser: _run(args, demo))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.pretrain:
        for flag, value in (("--seeds", args.seeds), ("--preset", args.preset)):
            if value is not None:
                parser.error(f"{flag} is for the finetuning comparison, not --pretrain")
        return pretrain_demo.run(args, parser)
    given = [f for f, v in pretrain_demo.flags_given(args).items() if v]
    if given:
        parser.error(f"{given[0]} is for --pretrain (the pretraining demo); add --pretrain")
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick and --preset {args.preset}: give one")
    preset = PRESETS[args.preset or ("quick" if args.quick else "default")]
    quick = preset is PRESETS["quick"]

    def pick(value: int | None, default: int) -> int:
        return value if value is not None else default

    sizes = {
        "train": pick(args.train_size, preset["train"]),
        "val": pick(args.val_size, preset["val"]),
        "test": pick(args.test_size, preset["test"]),
    }
    max_len = pick(args.max_len, preset["max_len"])
    batch_size = pick(args.batch_size, 16 if quick else 32)
    epochs = pick(args.epochs, 1)
    seeds = pick(args.seeds, 1 if quick else DEFAULT_SEEDS)
    for flag, value in (
        ("--epochs", epochs),
        ("--seeds", seeds),
        ("--batch-size", batch_size),
        ("--lora-rank", args.lora_rank),
        *((f"--{k}-size", v) for k, v in sizes.items()),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if max_len < 2:
        parser.error(f"--max-len must be >= 2, got {max_len}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not names:
        parser.error("--strategies: give at least one")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        parser.error(f"--strategies: {repeated[0]!r} is given twice")
    out = args.out or Path("fnllm-demo")
    _check_out(out, parser)
    for flag, column in (
        ("--text-column", args.text_column),
        ("--label-column", args.label_column),
    ):
        if not column.strip():
            parser.error(f"{flag} must name a column, got {column!r}")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.model_dir is not None and not args.model_dir.is_dir():
        parser.error(f"--model-dir {args.model_dir}: no such folder")
    options = {"epochs": epochs, "seeds": seeds, "batch_size": batch_size, "quick": quick}
    try:
        return _demo(args, names, sizes, max_len, options, out, parser)
    except (FileNotFoundError, KeyError) as err:
        parser.error(str(err).strip("'\""))
    return 2  # pragma: no cover


def _check_out(out: Path, parser: argparse.ArgumentParser) -> None:
    """Refuse an output folder that cannot be written before anything runs."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fnllm-demo-write-test-{os.getpid()}"  # one per rank under torchrun
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        parser.error(f"--out {out}: cannot write there ({err.strerror or err})")


def _demo(
    args: argparse.Namespace,
    names: list[str],
    sizes: dict[str, int],
    max_len: int,
    options: dict[str, Any],
    out: Path,
    parser: argparse.ArgumentParser,
) -> int:
    import torch

    from fnllm import data, distributed, io, tree
    from fnllm import random as jr
    from fnllm.cli import _compare
    from fnllm.finetune import Classifier, strategy

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
    model = Classifier(base, n_classes=len(classes), pooling=base.default_pooling)
    template = model.init(jr.key(0), base_params=base_params)  # for the checks below
    defaulted = args.strategies == ",".join(DEFAULT_STRATEGIES)
    for name in list(names):
        if name in _compare.PROBES:
            continue
        if name.startswith("last:") and not name[5:].isdigit():
            parser.error(f"--strategies: {name!r}: N must be a whole number (like 'last:2')")
        if name == "lora":  # the adapters are added later (and --lora-rank checked there)
            continue
        try:
            trainable, _ = tree.partition(template, strategy(name, model))
        except ValueError as err:
            if defaulted:  # a default row this model cannot run (bitfit without biases)
                print(f"fnllm demo: skipping {name!r}: {err}", file=sys.stderr)
                names.remove(name)
                continue
            parser.error(f"--strategies: {err}; or one of {list(_compare.PROBES)}")
        if not tree.leaves(trainable):
            parser.error(f"--strategies: {name!r} selects no parameter of this model")
    epochs, seeds, batch_size = options["epochs"], options["seeds"], options["batch_size"]
    recipe = _compare.RECIPES[args.recipe]
    root = jr.key(args.seed)
    k_split, k_head, k_batch, k_train = jr.split(root, 4)
    total_n, wanted = len(labels), sum(sizes.values())
    with warnings.catch_warnings():  # an empty split is refused below, naming the flags
        warnings.filterwarnings("ignore", message="stratified_split: ")
        if wanted < total_n:  # stratified subsamples of the wanted sizes, drawn in one go
            fractions = [n / total_n for n in sizes.values()] + [1 - wanted / total_n]
            parts = data.stratified_split(k_split, labels, fractions)[:3]
        else:
            parts = data.stratified_split(k_split, labels, (0.8, 0.1, 0.1))
    got = {split: min(int(idx.numel()), n) for (split, n), idx in zip(sizes.items(), parts)}
    if min(got.values()) < 1:
        parser.error(
            f"--data: {total_n} examples split into train {got['train']}, val {got['val']}, "
            f"test {got['test']}: every split needs at least one example (give more rows)"
        )
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
    if "lora" in names:  # a rank the layers cannot take is refused before any work
        try:
            _compare.resume_layer(_compare.Setup(model, params, {}), "lora", args.lora_rank)
        except ValueError as err:
            parser.error(f"--lora-rank {args.lora_rank}: {err}")
    setup = _compare.Setup(model, params, batches)
    counts = {s: sum(len(b["labels"]) for b in bs) for s, bs in batches.items()}
    say(
        f"fnllm demo: {args.model_dir or 'all-MiniLM-L6-v2'} ({type(base).__name__}, "
        f"{base.n_layer} layers, "
        f"d={base.d_model}), {model.pooling} pooling, {torch.get_num_threads()} threads"
        + (f", {ranks} ranks (finetuning rows data parallel)" if ranks > 1 else "")
    )
    say(f"data: {source}; {len(texts)} texts, classes {classes}")
    say(
        f"      train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"(stratified split, key {args.seed}), at most {width} tokens ({truncated} truncated)"
    )
    say(
        f"recipe: {recipe.name}; finetuning rows x {seeds} seed(s)"
        + (
            " (the frozen pass and the probes' features are shared by all seeds)"
            if seeds > 1
            else ""
        )
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
            rows.append(_compare.run_probe(setup, name, options["quick"]))
        else:  # under torchrun: every rank trains, on its slice of each batch
            n_epochs = epochs * recipe.head_epochs if name == "head" else epochs
            runs, counts_per = [], None
            for seed in range(seeds):
                key = jr.fold_in(jr.fold_in(k_train, i), seed)
                run, trainable, reused, per_epoch = _compare.run_strategy(
                    setup, name, n_epochs, args.lora_rank, key, progress, recipe
                )
                runs.append(run)
                counts_per = (trainable, reused, per_epoch)
            assert counts_per is not None
            trainable, reused, per_epoch = counts_per
            rows.append(_compare.Row(name, trainable, n_epochs, reused, runs, per_epoch))
        if not main:
            continue
        r = rows[-1]
        say(
            f"  {r.name}: test acc {_cell(r, 'test_acc')} in {r.mean('seconds'):.1f} s"
            + (" a seed" if r.seeds > 1 else "")
            + f" (process CPU so far {time.process_time():.0f} s)",
            flush=True,
        )
    if not main:
        distributed.barrier()  # until rank 0 has written its files
        return 0
    total = time.perf_counter() - t0
    table = _table(rows)
    spread = _spread_note(seeds)
    verdicts = _verdicts(rows)
    say()
    say(table)
    say()
    say(spread)
    say("\n".join(verdicts))
    say(
        f"\ntotal {total:.0f} s wall ({total / 60:.1f} min), {time.process_time():.0f} s CPU "
        f"(frozen pass {setup.cache_seconds:.0f} s)"
    )
    command = (
        "fnllm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "fnllm demo"
    )
    figure = _write_plot(out / "results.png", rows)
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
        recipe,
        [spread, *verdicts],
    )
    results = {
        "command": command,
        "preset": args.preset or ("quick" if options["quick"] else "default"),
        "recipe": recipe.describe(),
        "seeds": seeds,
        "spread": "sample standard deviation over the seeds (ddof=1); min and max as well",
        "sizes": counts,
        "max_len": width,
        "rows": [r.summary() for r in rows],
        "verdicts": verdicts,
        "figure": figure,
        "total_seconds": total,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'}")
    distributed.barrier()
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on the ranks that do not report."""


def _cell(r: Any, metric: str) -> str:
    """``mean ± std`` over the seeds (the mean alone for one run)."""
    if r.seeds < 2:
        return f"{r.mean(metric):.3f}"
    return f"{r.mean(metric):.3f} ± {r.std(metric):.3f}"


def _cells(r: Any) -> list[str]:
    return [
        r.name,
        f"{r.trainable:,}",
        str(r.epochs),
        str(r.seeds),
        r.reused,
        f"{r.mean('seconds'):.1f}",
        *(_cell(r, m) for m in ("val_acc", "val_f1", "test_acc", "test_f1")),
    ]


def _spread_note(seeds: int) -> str:
    if seeds < 2:
        return "one seed per row: no spread measured (--seeds N gives mean ± std)"
    return (
        f"finetuning rows: mean ± std over {seeds} seeds (sample standard deviation; the seed "
        "draws the head, LoRA adapters and batch order, the split stays); probes: one run "
        "(they are deterministic given the split); time (s) is per seed"
    )


def _verdicts(rows: list[Any]) -> list[str]:
    """Closing lines: neighbours in the ranking by test accuracy, and whether their difference
    is larger than the spread (|difference of means| > std_a + std_b)."""
    ranked = sorted(rows, key=lambda r: -r.mean("test_acc"))
    lines = [f"best test accuracy: {ranked[0].name} {_cell(ranked[0], 'test_acc')}"]
    if not any(r.seeds > 1 for r in rows):
        return lines
    for a, b in itertools.pairwise(ranked):
        gap = a.mean("test_acc") - b.mean("test_acc")
        spread = a.std("test_acc") + b.std("test_acc")
        if a.seeds < 2 and b.seeds < 2:
            verdict = "no spread measured (one run each)"
        else:
            word = "larger than" if gap > spread else "within"
            verdict = f"{word} the spread (std sum {spread:.3f})"
        lines.append(f"  {a.name} vs {b.name}: {gap:+.3f}, {verdict}")
    return lines


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
    recipe: Any,
    closing: list[str],
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
    lines += ["", *[ln.strip() + "  " for ln in closing], ""]
    lines += [
        "*frozen pass reused*: the row starts its forward at that layer from hidden states "
        "computed once for all rows and seeds. *trainable* for boosting counts tree nodes.",
        "",
        f"Recipe `{recipe.name}` (AdamW, weight decay {recipe.weight_decay}, schedule "
        f"{recipe.schedule}, dropout {'on' if recipe.dropout else 'off'}):",
        "",
        *[f"- {note}" for note in recipe.notes],
        "",
    ]
    path.write_text("\n".join(lines))


def _write_plot(path: Path, rows: list[Any]) -> dict[str, Any]:
    """Draw the figure (``plot.finetune_results``, as the docs draw a stored ``results.json``);
    return what it shows (points with error bars, loss curves) for the JSON."""
    from matplotlib.container import ErrorbarContainer

    from fnllm import plot

    drawn = [
        {
            "name": r.name,
            "trainable": r.trainable,
            "test_acc": r.mean("test_acc"),
            "test_acc_std": r.std("test_acc"),
            "losses": r.runs[0].losses,
        }
        for r in rows
    ]
    fig = plot.finetune_results({"rows": drawn})
    fig.savefig(path, dpi=110)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    points = []
    for d, bar in zip(drawn, bars, strict=True):  # one errorbar container per row
        y, cols = d["test_acc"], bar.lines[2]
        span = cols[0].get_segments()[0][:, 1].tolist() if cols else [y, y]
        x = max(int(d["trainable"]), 1)
        points.append({"name": d["name"], "x": x, "y": y, "yerr": d["test_acc_std"], "bar": span})
    curves = [{"name": d["name"], "points": len(d["losses"])} for d in drawn if d["losses"]]
    return {"accuracy": points, "loss_curves": curves}
