"""Pretraining from scratch on real text: the Python-documentation corpus and one run function.

Every Python install carries real English prose about Python: the documentation topics in
``pydoc_data.topics`` (79 topics, about 465 KB) and the docstrings of the standard library.
:func:`python_docs` collects them; :func:`cached_tokenizer` trains a tokenizer on them once
(with :func:`fnllm.data.train_tokenizer`) and reloads it afterwards; :func:`unigram_entropy`
gives the baseline a model must beat (a model that ignores context cannot do better than the
entropy of the token frequencies); :func:`pretrain` is the whole run behind ``fnllm pretrain``
(GPT next-token or BERT MLM + sentence order, on :func:`~fnllm.train.fit.fit` with checkpoints,
resume, held-out validation and a loss-curve PNG).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fnllm import data, io, losses, optim, train, tree
from fnllm import random as jr
from fnllm.models import BERT, GPT, Llama

__all__ = ["PretrainConfig", "cached_tokenizer", "pretrain", "python_docs", "unigram_entropy"]

# Standard-library modules whose docstrings join the corpus: documented, importable everywhere,
# and free of import-time side effects.
_DOC_MODULES = " ".join(
    (
        "abc argparse array base64 bisect calendar collections contextlib copy csv",
        "dataclasses datetime decimal difflib doctest email enum fnmatch fractions functools",
        "gettext glob hashlib heapq html inspect io itertools json locale logging math",
        "operator os pathlib pprint queue random re shlex shutil socket statistics string",
        "struct subprocess tarfile tempfile textwrap threading time typing unittest zipfile",
    )
).split()


def python_docs(*, docstrings: bool = True, min_chars: int = 200) -> list[str]:
    """Documents of real English text every Python install has: pydoc topics and docstrings.

    Example:
        >>> from fnllm.pretraining import python_docs
        >>> topics = python_docs(docstrings=False)
        >>> len(topics), "assignment" in topics[0].lower()
        (79, True)

    Args:
        docstrings: add the docstrings of a fixed list of standard-library modules (each
            module's docstring, and those of its public classes and functions).
        min_chars: drop documents shorter than this.

    Returns:
        The documents, in a fixed order (topics sorted by name, then modules by name).
    """
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    if docstrings:
        for name in sorted(_DOC_MODULES):
            try:
                mod = importlib.import_module(name)
            except ImportError:  # pragma: no cover - a trimmed Python
                continue
            docs.append(inspect.getdoc(mod) or "")
            for attr in sorted(vars(mod)):
                obj = getattr(mod, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    docs.append(inspect.getdoc(obj) or "")
    return [d.strip() for d in docs if len(d.strip()) >= min_chars]


def cached_tokenizer(
    texts: Sequence[str], kind: str, vocab_size: int, cache_dir: str | os.PathLike
) -> Any:
    """Train a tokenizer on ``texts`` once; later calls with the same inputs load the file.

    The file name holds a hash of the texts, the kind and the size, so a changed corpus gets
    a new tokenizer.

    Example:
        >>> import tempfile
        >>> from fnllm.data import default_documents
        >>> from fnllm.pretraining import cached_tokenizer
        >>> cache = tempfile.mkdtemp()
        >>> tok = cached_tokenizer(default_documents(), "bpe", 300, cache)
        >>> again = cached_tokenizer(default_documents(), "bpe", 300, cache)
        >>> tok.encode("the river").ids == again.encode("the river").ids
        True

    Args:
        texts: the training documents.
        kind: ``"bpe"`` (GPT) or ``"wordpiece"`` (BERT).
        vocab_size: the vocabulary size.
        cache_dir: where ``tokenizer-<kind>-<size>-<hash>.json`` is kept (created if needed).

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    digest = hashlib.sha256(f"{kind}\0{vocab_size}\0".encode())
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass") + b"\0")
    path = Path(cache_dir) / f"tokenizer-{kind}-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return data.load_tokenizer(path)
    tok = data.train_tokenizer(texts, kind, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def unigram_entropy(tokens: Iterable[int] | torch.Tensor) -> float:
    """Entropy in nats of the token frequencies: the loss of the best context-free model.

    Example:
        >>> from fnllm.pretraining import unigram_entropy
        >>> round(unigram_entropy([1, 2, 3, 4]), 4), unigram_entropy([7, 7, 7])
        (1.3863, 0.0)

    Args:
        tokens: token ids (a tensor's entries equal to -100 are ignored).

    Returns:
        ``-sum p log p`` over the ids' empirical distribution.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens[tokens != losses.IGNORE_INDEX].tolist()
    counts = Counter(tokens)
    n = sum(counts.values())
    if n == 0:
        raise ValueError("tokens: empty")
    return -sum(c / n * math.log(c / n) for c in counts.values()) + 0.0


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of a :func:`pretrain` run (the ``fnllm pretrain`` flags).

    Example:
        >>> from fnllm.pretraining import PretrainConfig
        >>> PretrainConfig(out="run").quick().steps
        60

    Args:
        out: the output folder (checkpoints, model, tokenizer, metrics, loss curve).
        model: ``"gpt"`` or ``"llama"`` (next token) or ``"bert"`` (MLM + sentence order).
        steps: train steps in total (a rerun resumes and continues up to this).
        batch_size: sequences per step.
        block_size: tokens per sequence.
        vocab_size: tokenizer vocabulary size.
        n_layer: transformer blocks.
        n_head: attention heads.
        d_model: width.
        lr: peak learning rate (linear warm-up, cosine decay).
        seed: the run's key.
        checkpoint_every: save the train state every this many steps.
        eval_every: validation loss every this many steps (0: only at the end).
        val_fraction: share of the documents held out for validation.
        docstrings: add standard-library docstrings to the pydoc topics.
        compile: ``torch.compile`` the train step.
        progress: show progress bars.
        cache_dir: where the tokenizer is cached (default: ``out``).
        texts: train on these documents instead of the Python docs.
    """

    out: str | os.PathLike = "pretrain-out"
    model: str = "gpt"
    steps: int = 2000
    batch_size: int = 16
    block_size: int = 128
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    val_fraction: float = 0.05
    docstrings: bool = True
    compile: bool = False
    progress: bool = True
    cache_dir: str | os.PathLike | None = None
    texts: tuple[str, ...] | None = field(default=None, repr=False)

    def quick(self) -> PretrainConfig:
        """A few-second version: a tiny model on the pydoc topics alone."""
        small: dict[str, Any] = dict(
            steps=60, batch_size=16, block_size=32, vocab_size=384, n_layer=2
        )
        small |= dict(n_head=2, d_model=128, lr=2e-3, checkpoint_every=30, eval_every=30)
        return PretrainConfig(**{**asdict(self), **small, "docstrings": False})


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train a GPT or BERT from scratch on the Python docs; resumable; writes its outputs.

    Writes to ``config.out``: ``tokenizer.json``, ``checkpoints/`` (the train state, every
    ``checkpoint_every`` steps; a rerun resumes from the newest), ``model.safetensors``
    (:func:`fnllm.io.save_model`, readable by ``fnllm generate``), ``metrics.json`` and
    ``loss.png``.

    Example:
        >>> import tempfile
        >>> from fnllm.data import default_documents
        >>> from fnllm.pretraining import PretrainConfig, pretrain
        >>> cfg = PretrainConfig(out=tempfile.mkdtemp(), steps=4, batch_size=2, block_size=16,
        ...                      vocab_size=300, n_layer=1, n_head=2, d_model=16,
        ...                      val_fraction=0.25, progress=False,
        ...                      texts=tuple(default_documents()))
        >>> summary = pretrain(cfg)
        >>> summary["step"], sorted(summary)[:3]
        (4, ['step', 'train_loss', 'unigram_entropy'])

    Args:
        config: the :class:`PretrainConfig`.

    Returns:
        A summary dict: ``step``, ``train_loss``, ``val_loss``, ``val_ppl``,
        ``unigram_entropy`` (of the validation targets, nats/token) and, for BERT,
        ``val_sop_accuracy``.
    """
    cfg = config
    if cfg.model not in ("gpt", "llama", "bert"):
        raise ValueError(f"model: expected 'gpt', 'llama' or 'bert', got {cfg.model!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {cfg.val_fraction}")
    _check_shape(cfg)  # before the tokenizer and the data: minutes of work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    k_split, k_init, k_data, k_val, k_train = jr.split(jr.key(cfg.seed), 5)
    texts = list(cfg.texts) if cfg.texts is not None else python_docs(docstrings=cfg.docstrings)
    n_val = max(1, round(len(texts) * cfg.val_fraction))
    order = jr.permutation(k_split, len(texts)).tolist()
    val_texts = [texts[i] for i in sorted(order[:n_val])]
    train_texts = [texts[i] for i in sorted(order[n_val:])]
    kind = "wordpiece" if cfg.model == "bert" else "bpe"
    from fnllm import distributed

    ranks = distributed.launched_world_size()
    if ranks > 1:  # under torchrun: data parallel over the ranks, rank 0 writes the files
        distributed.init()
        if not distributed.is_main():
            distributed.barrier()  # rank 0 trains and caches the tokenizer first
    tok = cached_tokenizer(train_texts, kind, cfg.vocab_size, cfg.cache_dir or out)
    if ranks > 1 and distributed.is_main():
        tok.save(str(out / "tokenizer.json"))
        distributed.barrier()
    elif ranks == 1:
        tok.save(str(out / "tokenizer.json"))
    corpus = data.Corpus(train_texts, tokenizer=tok)
    val_corpus = data.Corpus(val_texts, tokenizer=tok)

    sizes: dict[str, Any] = {
        "vocab_size": corpus.vocab_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "d_model": cfg.d_model,
        "max_len": cfg.block_size,
    }
    if cfg.model in ("gpt", "llama"):
        model: Any = GPT(**sizes) if cfg.model == "gpt" else Llama(**sizes, **_llama_shape(cfg))
        loss_fn, targets = _gpt_loss(model), "targets"
        batches = functools.partial(
            data.gpt_batches, batch_size=cfg.batch_size, block_size=cfg.block_size
        )
    else:
        model = BERT(**sizes, d_ff=4 * cfg.d_model)
        loss_fn, targets = _bert_loss(model), "labels"
        batches = functools.partial(
            data.bert_batches, batch_size=cfg.batch_size, max_len=cfg.block_size
        )
    loader = data.epochs(lambda e: batches(corpus, k_data, epoch=e))
    val_batches = _val_batches(batches(val_corpus, k_val))
    baseline = unigram_entropy(torch.cat([b[targets].flatten() for b in val_batches]))

    def evaluate(trainable: Any, frozen: Any) -> dict[str, float]:
        params = tree.combine(trainable, frozen)
        with torch.no_grad():
            aux = [loss_fn(params, {}, b, None)[1] for b in val_batches]
        # GPT: next-token loss; BERT: the MLM part (both comparable with the unigram entropy)
        val = sum(float(a["lm"]) for a in aux) / len(aux)
        metrics = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if cfg.model == "bert":
            metrics["val_sop_accuracy"] = sum(float(a["sop_accuracy"]) for a in aux) / len(aux)
        return metrics

    params = model.init(k_init)
    trainable, frozen = tree.partition(params, "*")
    warmup = max(1, min(100, cfg.steps // 10))
    opt = optim.adamw(optim.warmup_cosine(cfg.lr, warmup, cfg.steps + 1), weight_decay=0.01)
    ckpt = train.Checkpointing(out / "checkpoints", every=cfg.checkpoint_every)
    if ranks > 1:
        # each rank takes its slice of the global batch; gradients are averaged over ranks
        result = distributed.fit(
            loss_fn, opt, trainable, frozen, loader, key=k_train, steps=cfg.steps, clip=1.0,
            checkpoint=ckpt, model=model, progress=cfg.progress, meta={"seed": cfg.seed},
        )  # fmt: skip
        if not distributed.is_main():
            return {"step": result.step, "rank": distributed.rank()}
    else:
        result = train.fit(
            loss_fn, opt, trainable, frozen, loader, key=k_train, steps=cfg.steps,
            compile=cfg.compile, clip=1.0, eval_fn=evaluate,
            eval_every=cfg.eval_every or cfg.steps, checkpoint=ckpt, model=model,
            progress=cfg.progress, meta={"seed": cfg.seed},
        )  # fmt: skip
    trained = tree.combine(result.trainable, frozen)
    last = result.evals[-1] if result.evals else {}
    if last.get("step") == result.step:
        final = {k: v for k, v in last.items() if k != "step"}
    else:
        final = evaluate(result.trainable, frozen)
    io.save_model(out / "model.safetensors", model, trained, meta={"step": result.step})
    metrics = _merge_metrics(out / "metrics.json", result, final, baseline)
    _plot(metrics, out / "loss.png", baseline, cfg.model)
    train_loss = metrics["train"][-1]["loss"] if metrics["train"] else float("nan")
    return {"step": result.step, "train_loss": train_loss, "unigram_entropy": baseline, **final}


# ----------------------------------------------------------------------------- helpers


def _check_shape(cfg: PretrainConfig) -> None:
    """Refuse sizes no model or tokenizer can take, naming the field, before any work."""
    low = 3 if cfg.model == "bert" else 2  # [CLS] A [SEP] B [SEP]; or a token and its target
    if cfg.block_size < low:
        raise ValueError(
            f"block_size: {cfg.block_size} < {low}, too short for a {cfg.model} training row"
        )
    if cfg.model in ("gpt", "llama") and cfg.vocab_size < 257:
        raise ValueError(f"vocab_size: {cfg.vocab_size} < 257, the byte alphabet plus EOS")
    sizes: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "d_model": cfg.d_model,
        "max_len": cfg.block_size,
    }
    if cfg.model == "gpt":
        GPT(**sizes)
    elif cfg.model == "llama":
        Llama(**sizes, **_llama_shape(cfg))
    else:
        BERT(**sizes, d_ff=4 * cfg.d_model)


def _llama_shape(cfg: PretrainConfig) -> dict[str, Any]:
    """Llama's extra sizes for a small model: half as many key/value heads (grouped-query
    attention, where ``n_head`` is even) and a SwiGLU width of about 8/3 ``d_model``."""
    n_kv = cfg.n_head // 2 if cfg.n_head % 2 == 0 else cfg.n_head
    return {"n_kv_head": n_kv, "d_ff": max(8, (8 * cfg.d_model // 3) // 8 * 8)}


def _gpt_loss(model: Any) -> Any:
    def loss_fn(trainable: Any, frozen: Any, batch: dict, key: Any) -> Any:
        logits = model.apply(tree.combine(trainable, frozen), batch["input_ids"])
        loss = losses.cross_entropy(logits, batch["targets"])
        return loss, {"lm": loss.detach()}

    return loss_fn


def _bert_loss(model: BERT) -> Any:
    def loss_fn(trainable: Any, frozen: Any, batch: dict, key: Any) -> Any:
        mlm, sop = model.pretrain_apply(
            tree.combine(trainable, frozen),
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        )
        mlm_loss = losses.mlm(mlm, batch["labels"])
        sop_loss = losses.sentence_order(sop, batch["next_sentence_label"])
        correct = (sop.argmax(-1) == batch["next_sentence_label"]).float().mean()
        return mlm_loss + sop_loss, {"lm": mlm_loss.detach(), "sop_accuracy": correct.detach()}

    return loss_fn


def _val_batches(loader: Any, limit: int = 16) -> list[dict]:
    return [loader.batch(i) for i in range(min(limit, loader.num_steps))]


def _merge_metrics(path: Path, result: Any, final: dict, baseline: float) -> dict:
    """Add this run's steps and evals to ``metrics.json`` (a resumed run keeps the earlier)."""
    old = json.loads(path.read_text()) if path.is_file() else {"train": [], "eval": []}
    train_rows = {r["step"]: r for r in old["train"]}
    train_rows |= {h["step"]: {"step": h["step"], "loss": h["loss"]} for h in result.history}
    evals = {r["step"]: r for r in old["eval"]}
    evals |= {e["step"]: e for e in result.evals}
    evals[result.step] = {"step": result.step, **final}
    metrics = {
        "train": [train_rows[s] for s in sorted(train_rows)],
        "eval": [evals[s] for s in sorted(evals)],
        "unigram_entropy": baseline,
    }
    path.write_text(json.dumps(metrics, indent=1))
    return metrics


def _plot(metrics: dict, path: Path, baseline: float, kind: str) -> None:
    """Train and validation loss against steps, with the unigram baseline, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in metrics["train"]]
    ax.plot(steps, [r["loss"] for r in metrics["train"]], lw=1, label="train loss")
    ax.plot(
        [e["step"] for e in metrics["eval"]],
        [e["val_loss"] for e in metrics["eval"]],
        "o-",
        label="validation loss",
    )
    ax.axhline(baseline, ls="--", color="gray", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("MLM + SOP loss" if kind == "bert" else "loss (nats/token)")
    ax.set_title(f"fnllm pretrain ({kind})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
