"""Data-parallel training under torchrun

One script that trains a GPT on one process or on several, averaging gradients over the ranks.
`python data_parallel.py` trains in a group of one, `torchrun --nproc-per-node 2
data_parallel.py` on two processes (gloo on CPU, NCCL on GPUs).
Every rank computes the same *global* batch from the step number, keeps its own slice of it,
and the gradients are averaged over ranks before the update, so two ranks end where one
process on the same global batches ends. Rank 0 alone prints, checkpoints and draws.

docs-run: torchrun 2
"""

import torch

from fnllm import distributed, losses, optim, plot, train, tree
from fnllm import random as jr
from fnllm.models import GPT

rank, world = distributed.init(timeout=120)  # gloo on CPU; NCCL when CUDA is there

text = torch.tensor(list(b"the cat sat on the mat. the dog sat on the log. " * 8))
gpt = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=32, max_len=32)
params = gpt.init(jr.key(0))


def loss_fn(trainable, frozen, tokens, key):
    return losses.causal_lm(
        gpt.apply(tree.combine(trainable, frozen), tokens), tokens
    )


def global_batch(step, batch_size=8, block=32):
    """The same 8 sequences on every rank; distributed.fit gives each rank its rows."""
    starts = jr.randint(
        jr.fold_in(jr.key(1), step), (batch_size,), 0, len(text) - block
    )
    return torch.stack([text[s : s + block] for s in starts.tolist()])


result = distributed.fit(
    loss_fn,
    optim.adamw(3e-3),
    params,
    {},
    global_batch,
    key=jr.key(2),
    steps=40,
    checkpoint=train.Checkpointing(f"ckpt-{world}", every=20),
    progress=False,
)
distributed.log(
    f"{world} rank(s), {8 // world} rows each per step: "
    f"loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}"
)
if rank == 0:
    fig = plot.loss_curve(result.history, title=f"data parallel, {world} rank(s)")
    fig.savefig(f"loss-{world}-ranks.png")
torch.distributed.destroy_process_group()
