"""Pretrain a GPT on your own text

Your text files in, a trained GPT and its loss curve out: write some text to disk, train a
byte-level BPE tokenizer on it, pack it into batches, pretrain with `train.fit` (warmup-cosine
learning rate, gradient clipping, checkpoints), save the model, load it back and let it
continue a prompt.

docs-thumbnail: loss.png
"""

# %% [markdown]
# ## 1. Your text
#
# Any list of strings works; here three small files written on the spot stand in for yours.

# %%
from pathlib import Path

import torch

from fnllm import data, io, losses, optim, plot, train, tree
from fnllm import random as jr
from fnllm.models import GPT

Path("text").mkdir(exist_ok=True)
Path("text/cats.txt").write_text(
    "The cat sat on the mat. The cat saw a bird. The bird flew over the cat. "
    "The cat sat on the mat again and slept in the sun. " * 6
)
Path("text/river.txt").write_text(
    "The river runs past the old mill. The mill grinds the grain. "
    "The grain feeds the "
    "village. The village sleeps by the river. " * 6
)
Path("text/keys.txt").write_text(
    "The same key gives the same numbers. Split a key to get new keys. "
    "Fold a step into a "
    "key to get the key of that step. " * 6
)
texts = [p.read_text() for p in sorted(Path("text").glob("*.txt"))]
print(len(texts), "documents,", sum(len(t) for t in texts), "characters")

# %% [markdown]
# ## 2. A tokenizer trained on it
#
# `data.train_tokenizer` trains a Hugging Face `tokenizers` tokenizer (byte-level BPE here);
# save it next to the model, and `data.Corpus` tokenizes the documents with it once.

# %%
tokenizer = data.train_tokenizer(texts, kind="bpe", vocab_size=320)
tokenizer.save("tokenizer.json")
corpus = data.Corpus(texts, tokenizer="tokenizer.json")
print(corpus)
print(tokenizer.encode("The cat sat by the river.").tokens)

# %% [markdown]
# ## 3. Batches
#
# Documents are packed (end-of-text between them) and cut into blocks; each epoch is shuffled
# by the key, so a batch is a pure function of `(key, epoch, step)` and a resumed run sees the
# same data as an uninterrupted one.

# %%
block, batch_size = 32, 8
loader = data.gpt_batches(
    corpus, jr.key(1), batch_size=batch_size, block_size=block
)
steps_per_epoch = len(loader)


def batch_at(step):
    """Step -> batch, epoch after epoch, each epoch in its own order."""
    epoch, i = divmod(step, steps_per_epoch)
    return data.gpt_batches(
        corpus,
        jr.key(1),
        batch_size=batch_size,
        block_size=block,
        epoch=epoch,
    ).batch(i)


b = batch_at(0)
print(
    steps_per_epoch,
    "steps per epoch;",
    {k: tuple(v.shape) for k, v in b.items()},
)
print(repr(corpus.decode(b["input_ids"][0].tolist())))

# %% [markdown]
# ## 4. Model, loss and schedule

# %%
gpt = GPT(
    vocab_size=corpus.vocab_size,
    n_layer=2,
    n_head=2,
    d_model=64,
    max_len=block,
)
params = gpt.init(jr.key(2))
print(f"{tree.count(params):,} parameters")


def next_token_loss(trainable, frozen, batch, key):
    logits = gpt.apply(tree.combine(trainable, frozen), batch["input_ids"], key=key)
    return losses.cross_entropy(logits, batch["targets"])


steps = 80
lr = optim.warmup_cosine(3e-3, warmup_steps=8, total_steps=steps, end=3e-4)
opt = optim.adamw(lr, weight_decay=0.01, mask=optim.decay_mask())
plot.schedule(lr, steps, marks=[8], title="learning rate").savefig("schedule.png")

# %% [markdown]
# ## 5. Train
#
# `train.fit` runs the steps, clips gradients, skips non-finite steps and writes checkpoints
# from which a rerun resumes exactly. Its default, `compile="auto"`, compiles the step only for
# runs long enough to repay a compile; `compile=False` says so explicitly for this short run.

# %%
result = train.fit(
    next_token_loss,
    opt,
    params,
    {},
    batch_at,
    key=jr.key(3),
    steps=steps,
    clip=1.0,
    compile=False,
    progress=False,
    checkpoint=train.Checkpointing("run", every=40),
    model=gpt,
)
losses_seen = [h["loss"] for h in result.history]
print(
    f"loss {losses_seen[0]:.2f} -> {losses_seen[-1]:.2f} after {result.step} steps"
)
plot.loss_curve(result.history, smooth=8).savefig("loss.png")

# %% [markdown]
# ## 6. Save, reload, use
#
# `io.save_model` writes the config and the parameters into one safetensors file;
# `io.load_model` rebuilds both. Greedy decoding is a loop over `apply`:

# %%
io.save_model("gpt.safetensors", gpt, result.trainable)
model, loaded = io.load_model("gpt.safetensors")
assert model == gpt


def continue_text(prompt, n_new=12):
    ids = corpus.encode(prompt)
    for _ in range(n_new):
        window = torch.tensor([ids[-block:]])
        logits = model.apply(loaded, window)
        ids.append(int(logits[0, -1].argmax()))
    return corpus.decode(ids)


print(continue_text("The river runs"))
print(continue_text("The cat"))
