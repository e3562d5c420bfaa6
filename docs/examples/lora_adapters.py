"""LoRA: adapter files and one adapter set per example

One frozen base model, two small LoRA adapters trained for two kinds of text, each saved to a
file of its own; then both loaded back and stacked, so that one batch runs every row with its
own adapter set, in one forward pass and in one generation call. Adapters are ordinary leaves
of the parameter tree: the model's own `apply` runs the adapted model.
"""

# %% [markdown]
# ## 1. A base model
#
# A tiny GPT over bytes, trained briefly on both kinds of text: the base the adapters start
# from. In practice the base is a pretrained checkpoint (`io.from_hf(folder)`).

# %%
import torch

from fnllm import generate, losses, optim, plot, train, tree
from fnllm import random as jr
from fnllm.finetune import lora
from fnllm.models import GPT

texts = {
    "cats": b"the cat sat on the mat and the cat slept. " * 12,
    "river": b"the river ran past the mill to the sea. " * 12,
}
gpt = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=48, max_len=32)


def batches(text, key, batch_size=8, block=32):
    data = torch.tensor(list(text))

    def batch_at(step):
        starts = jr.randint(
            jr.fold_in(key, step), (batch_size,), 0, len(data) - block
        )
        return torch.stack([data[s : s + block] for s in starts.tolist()])

    return batch_at


def next_token(trainable, frozen, tokens, key):
    return losses.causal_lm(
        gpt.apply(tree.combine(trainable, frozen), tokens), tokens
    )


both = batches(texts["cats"] + texts["river"], jr.key(1))
base = train.fit(
    next_token,
    optim.adamw(5e-3),
    gpt.init(jr.key(0)),
    {},
    both,
    key=jr.key(2),
    steps=120,
    compile=False,
    progress=False,
).trainable
print(f"base model: {tree.count(base):,} parameters")

# %% [markdown]
# ## 2. Two adapters, two files
#
# `lora.init` adds `lora_a`, `lora_b` (zeros, so the adapted model starts as the base) and a
# `lora_scale` next to each targeted weight. The partition trains the adapters only; the base
# stays frozen. `lora.save` writes the adapter leaves alone: a few kilobytes per adapter.

# %%
histories = {}
for i, name in enumerate(texts):
    adapted = lora.init(
        jr.key(10 + i), base, rank=4, alpha=8, targets=["*.attn.qkv", "*.mlp.*"]
    )
    trainable, frozen = tree.partition(adapted, ["*.lora_a", "*.lora_b"])
    result = train.fit(
        next_token,
        optim.adamw(1e-2),
        trainable,
        frozen,
        batches(texts[name], jr.key(3 + i)),
        key=jr.key(5),
        steps=60,
        compile=False,
        progress=False,
    )
    lora.save(f"{name}.safetensors", tree.combine(result.trainable, frozen))
    histories[f"adapter '{name}'"] = result.history
    print(
        f"{name}.safetensors: {tree.count(trainable):,} trained parameters, "
        f"loss {result.history[0]['loss']:.2f} -> {result.history[-1]['loss']:.2f}"
    )
plot.loss_curve(histories, smooth=4, title="LoRA adapters (base frozen)").savefig(
    "adapters.png"
)

# %% [markdown]
# ## 3. Load, attach, stack, pick
#
# `lora.load` reads an adapter file, `lora.attach` puts it on the base tree. `lora.stack`
# stacks several adapter sets into one tree, and `lora.pick` gives each row of a batch its own
# set. The table is the loss of each row's text under each adapter set: each adapter is best on
# the text it was trained for.

# %%
sets = [lora.attach(base, lora.load(f"{name}.safetensors")) for name in texts]
stacked = lora.stack(sets)
rows = torch.stack(
    [batches(texts[n], jr.key(99))(0)[0] for n in texts]
)  # one row per text
print(f"{'':14s}" + "".join(f"{'text ' + n:>14s}" for n in texts))
for k, name in enumerate(texts):
    picked = lora.pick(stacked, torch.tensor([k] * len(rows)))
    logits = gpt.apply(picked, rows)
    row_loss = [
        float(losses.causal_lm(logits[r : r + 1], rows[r : r + 1]))
        for r in range(len(rows))
    ]
    print(f"{'adapter ' + name:14s}" + "".join(f"{v:14.3f}" for v in row_loss))

# %% [markdown]
# One generation call, four rows, the adapter set chosen per row:

# %%
index = torch.tensor([0, 1, 0, 1])
prompts = [list(b"the ")] * 4
out = generate.sample(
    None, gpt, lora.pick(stacked, index), prompts, 20, temperature=0
)
for k, row in zip(index.tolist(), out):
    print(
        f"adapter {list(texts)[k]!r:8s} -> {bytes(b'the ' + bytes(row.tolist()))!r}"
    )
merged = lora.merge(
    sets[0]
)  # a plain tree with the base paths, for io.save or io.to_hf
assert tree.paths(merged) == tree.paths(base)
