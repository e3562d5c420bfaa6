"""The `transformers` side of ``fnllm demo --preset reference --recipe reference``.

Accuracy, not speed: the same VADER split as the demo (the demo's keys, sizes and tokenizer),
the same pretrained all-MiniLM-L6-v2 loaded by ``transformers``, trained the way a
``transformers`` script trains it: ``model.train()`` (dropout 0.1 from the checkpoint's
config, in the frozen blocks too), AdamW at one learning rate (5e-5) for every trainable
parameter, no weight decay, linear decay to 0 without warm-up, one epoch of batches of 32,
reshuffled from a key. Two heads:

- ``mean``: ``BertModel`` + mean pooling over real tokens + a fresh ``Linear(384, 2)``, the
  demo's classifier;
- ``cls``: ``BertForSequenceClassification``: ``[CLS]`` through the checkpoint's pretrained
  pooler (a 384 x 384 dense layer and tanh) into a fresh 2-way layer, which is what a
  ``transformers`` tutorial trains. ``last:2`` then also trains the pooler.

Rows: ``last:2`` (blocks 4 and 5 and the head) and ``full``. It prints test accuracy per
seed and the mean, for comparison with the demo's table on the same split:

    .venv/bin/python -m benchmarks.demo_reference --heads mean,cls --seeds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch

from fnllm import data, io
from fnllm import random as jr


def main(argv: list[str] | None = None) -> None:
    """Train each (head, strategy, seed) and print its test accuracy."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", default="mean,cls")
    p.add_argument("--strategies", default="last:2,full")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--max-len", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = io.pretrained_dir("all-MiniLM-L6-v2")
    train, test = _split(folder, args.train_size, args.test_size, args.max_len)
    n_train, n_test = (sum(len(b["labels"]) for b in split) for split in (train, test))
    print(f"train {n_train}, test {n_test}, lr {args.lr}, dropout from the config")
    for head in args.heads.split(","):
        for name in args.strategies.split(","):
            accs = []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                acc = _run(folder, head, name, seed, train, test, args.lr)
                accs.append(acc)
                print(f"{head:5s} {name:7s} seed {seed}: test acc {acc:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{head:5s} {name:7s} mean {statistics.mean(accs):.3f} ± {spread:.3f}")


def _split(folder: Any, n_train: int, n_test: int, max_len: int) -> tuple[list, list]:
    """The demo's split for these sizes (validation 1,000 as its reference preset)."""
    texts, labels, _ = data.load_vader()
    tokenizer = data.load_tokenizer(folder)
    sizes = {"train": n_train, "val": 1000, "test": n_test}
    k_split, _, k_batch, _ = jr.split(jr.key(0), 4)
    total = len(labels)
    fractions = [n / total for n in sizes.values()] + [1 - sum(sizes.values()) / total]
    parts = data.stratified_split(k_split, labels, fractions)[:3]
    out = {}
    for (split, n), idx, k in zip(sizes.items(), parts, jr.split(k_batch, 3)):
        if idx.numel() > n:
            idx = idx[jr.permutation(k, idx.numel())][:n]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = data.encode_texts(tokenizer, [texts[i] for i in idx.tolist()], max_len)
        out[split] = data.length_batches(ids, labels[idx], 32, pad_id=0, bucket=None)
    return out["train"], out["test"]


class _MeanHead(torch.nn.Module):
    """BertModel, mean pooling over real tokens, a fresh linear layer: the demo's classifier."""

    def __init__(self, folder: Any) -> None:
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel.from_pretrained(folder, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(self.bert.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


def _model(folder: Any, head: str) -> torch.nn.Module:
    if head == "mean":
        return _MeanHead(folder)
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder, num_labels=2)


def _run(folder: Any, head: str, name: str, seed: int, train: list, test: list, lr: float) -> float:
    torch.manual_seed(seed)  # transformers' own initialisation of the fresh head
    model = _model(folder, head)
    if name.startswith("last:"):
        keep = int(name[5:])
        layers = model.bert.config.num_hidden_layers
        trained = [f"bert.encoder.layer.{i}." for i in range(layers - keep, layers)]
        trained += ["classifier.", "bert.pooler."]
        for pname, param in model.named_parameters():
            param.requires_grad_(any(pname.startswith(t) for t in trained))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    model.train()
    order = jr.permutation(jr.key(seed), steps).tolist()
    for i in order:
        b = train[i]
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in test:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            right += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return right / total


if __name__ == "__main__":
    main()
