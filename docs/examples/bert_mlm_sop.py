"""BERT: masked LM + sentence order

Pretrain a small BERT on the two objectives of ALBERT-style pretraining at once: the masked
language model (80/10/10 corruption of 15% of the tokens) and sentence-order prediction
(`[CLS] A [SEP] B [SEP]`, A and B swapped half of the time).
"""

# %% [markdown]
# ## 1. Corpus and batches
#
# `data.Corpus` trains a WordPiece tokenizer on fnllm's sample documents (pass your own texts
# and tokenizer the same way) and splits each document into sentences; `data.bert_batches`
# turns consecutive segments into pairs and masks them, one pure function of the key per step.

# %%
import torch

from fnllm import data, losses, optim, plot, train, tree
from fnllm import random as jr
from fnllm.models import BERT

corpus = data.Corpus(vocab_size=400)
max_len, batch_size = 48, 16
loader = data.bert_batches(
    corpus, jr.key(0), batch_size=batch_size, max_len=max_len
)
batch = loader.batch(0)
print(corpus)
print({k: tuple(v.shape) for k, v in batch.items()})
print("swapped (SOP label 1):", batch["next_sentence_label"].tolist())

# %% [markdown]
# ## 2. What the model sees
#
# The first pair of the batch, drawn token by token. The original ids are the labels where a
# token was picked and the inputs elsewhere:

# %%
row = 0
n = int(batch["attention_mask"][row].sum())
inputs, labels = batch["input_ids"][row, :n], batch["labels"][row, :n]
original = torch.where(labels != -100, labels, inputs)
fig = plot.masking(
    original,
    inputs,
    labels,
    mask_id=corpus.mask_id,
    decode=corpus.tokenizer.id_to_token,
    per_row=8,
    title="one training pair",
)
fig.savefig("masking.png")

# %% [markdown]
# ## 3. Both heads, one loss
#
# `BERT.pretrain_apply` returns the MLM logits and the sentence-order logits; the loss is their
# sum, and the parts come back as auxiliary metrics.

# %%
bert = BERT(
    vocab_size=corpus.vocab_size,
    n_layer=2,
    n_head=2,
    d_model=64,
    d_ff=128,
    max_len=max_len,
)
params = bert.init(jr.key(1))


def pretrain_loss(trainable, frozen, batch, key):
    out = bert.pretrain_apply(
        tree.combine(trainable, frozen),
        batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        key=key,
    )
    mlm = losses.mlm(out.mlm_logits, batch["labels"])
    sop = losses.sentence_order(out.pair_logits, batch["next_sentence_label"])
    return mlm + sop, {"mlm": mlm.detach(), "sop": sop.detach()}


# %% [markdown]
# ## 4. Train
#
# A plain loop over `train.make_step` keeps every metric of every step (`train.fit` does the
# same with progress, checkpoints and resume). Each step has its own key for dropout, and each
# epoch its own shuffle and masks:

# %%
opt = optim.adamw(optim.warmup_cosine(3e-3, 6, 60, end=3e-4), weight_decay=0.01)
step = train.make_step(pretrain_loss, opt, compile=False, clip=1.0)
trainable, frozen, state = params, {}, opt.init(params)
curves = {"MLM": [], "SOP": []}
for s in range(60):
    epoch, i = divmod(s, len(loader))
    b = data.bert_batches(
        corpus,
        jr.key(0),
        batch_size=batch_size,
        max_len=max_len,
        epoch=epoch,
    ).batch(i)
    trainable, state, metrics = step(
        trainable, frozen, state, b, jr.fold_in(jr.key(2), s)
    )
    curves["MLM"].append(metrics["mlm"].item())
    curves["SOP"].append(metrics["sop"].item())

print(
    f"MLM {curves['MLM'][0]:.2f} -> {curves['MLM'][-1]:.2f}, "
    f"SOP {curves['SOP'][0]:.2f} -> {curves['SOP'][-1]:.2f}"
)
plot.loss_curve(curves, smooth=5, title="BERT pretraining").savefig("losses.png")

# %% [markdown]
# The MLM loss falls from `ln(vocab_size)`; sentence order needs far more data and steps than
# this page spends (its loss stays near `ln 2 = 0.69` here), which is why real runs train for
# hundreds of thousands of steps.
