"""Freeze and finetune

Finetune a real pretrained encoder, all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters, shipped
as a Python package), into a sentence classifier: a new linear head on the mean-pooled hidden
states, with everything frozen but the head and the top block. Freezing is nothing but a
partition of the parameter tree; the optimizer state, the gradients and the backward pass only
cover the trainable half.
"""

# %% [markdown]
# ## 1. The pretrained model and its tokenizer

# %%
import torch
from tokenizers import Tokenizer

from fnllm import io, losses, nn, optim, plot, train, tree
from fnllm import random as jr

folder = io.pretrained_dir("all-MiniLM-L6-v2")
encoder, pretrained = io.from_hf(folder)  # (BERT config, parameter tree)
tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
print(encoder)
print(f"{tree.count(pretrained):,} parameters")

# %% [markdown]
# ## 2. A small labelled data set
#
# Twenty short sentences, positive (1) or negative (0), split into train and test:

# %%
sentences = [
    ("a wonderful, warm and funny film", 1),
    ("the best meal I have had in years", 1),
    ("I loved every minute of it", 1),
    ("great acting and a clever story", 1),
    ("a delightful surprise from start to end", 1),
    ("the staff were kind and helpful", 1),
    ("beautiful music and stunning pictures", 1),
    ("I would happily go back again", 1),
    ("a joy to read", 1),
    ("it made my whole week better", 1),
    ("a dull, slow and boring film", 0),
    ("the worst meal I have had in years", 0),
    ("I hated every minute of it", 0),
    ("bad acting and a silly story", 0),
    ("a tiresome mess from start to end", 0),
    ("the staff were rude and unhelpful", 0),
    ("awful music and ugly pictures", 0),
    ("I will never go back", 0),
    ("a chore to read", 0),
    ("it ruined my whole week", 0),
]
order = jr.permutation(jr.key(0), len(sentences)).tolist()
train_set = [sentences[i] for i in order[:14]]
test_set = [sentences[i] for i in order[14:]]


def encode(pairs):
    enc = tokenizer.encode_batch([text for text, _ in pairs])
    return {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
        "labels": torch.tensor([label for _, label in pairs]),
    }


train_batch, test_batch = encode(train_set), encode(test_set)
print({k: tuple(v.shape) for k, v in train_batch.items()})

# %% [markdown]
# ## 3. A head, and the partition
#
# The classifier's parameters are one tree: the encoder's and a new head's. Train the head and
# the last block; freeze the embeddings and blocks 0-4.

# %%
params = {"encoder": pretrained, "head": nn.init_linear(jr.key(1), 384, 2)}
trainable, frozen = tree.partition(params, ["head.*", "encoder.blocks.5.*"])
print(f"{tree.count(trainable):,} of {tree.count(params):,} parameters train")
fig = plot.partition_tree(params, ["head.*", "encoder.blocks.5.*"], depth=3)
fig.savefig("partition.png")

# %% [markdown]
# ## 4. Loss and training
#
# Mean pooling over real tokens, then the head:


# %%
def logits_of(params, batch, key=None):
    out = encoder.apply(
        params["encoder"],
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        key=key,
    )
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return nn.linear(params["head"], pooled)


def classify_loss(trainable, frozen, batch, key):
    return losses.cross_entropy(
        logits_of(tree.combine(trainable, frozen), batch, key),
        batch["labels"],
    )


def accuracy(trainable, batch):
    with torch.no_grad():
        pred = logits_of(tree.combine(trainable, frozen), batch).argmax(-1)
    return (pred == batch["labels"]).float().mean().item()


print(f"test accuracy before: {accuracy(trainable, test_batch):.2f}")
result = train.fit(
    classify_loss,
    optim.adamw(3e-3),
    trainable,
    frozen,
    lambda step: train_batch,
    key=jr.key(2),
    steps=20,
    compile=False,
    progress=False,
)
print(f"test accuracy after: {accuracy(result.trainable, test_batch):.2f}")
plot.loss_curve(result.history, title="finetuning loss").savefig("loss.png")

# %% [markdown]
# The frozen leaves are untouched, and `opt_state` holds moments only for the trainable ones:

# %%
after = tree.combine(result.trainable, frozen)
w = "encoder.blocks.0.attn.qkv.weight"
assert torch.equal(tree.flatten(after)[w], tree.flatten(params)[w])
print(
    sorted(result.opt_state),
    len(tree.paths(result.opt_state["mu"])),
    "moment leaves",
)
