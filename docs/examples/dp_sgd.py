"""Per-example gradients and DP-SGD

Differentially private SGD (Abadi et al., 2016) needs one gradient per example: each is
clipped to a norm bound, the clipped gradients are summed, and Gaussian noise scaled to the
bound is added. In fnllm the per-example gradients are `vmap(grad(loss))`
(`grads.per_example`), and clipping plus noise is one pure function of a key
(`grads.privatize`).
"""

# %% [markdown]
# ## 1. A model and a batch

# %%
import torch

from fnllm import data, grads, losses, optim, plot, tree
from fnllm import random as jr
from fnllm.models import GPT

corpus = data.Corpus(kind="bpe", vocab_size=300)
loader = data.gpt_batches(corpus, jr.key(0), batch_size=16, block_size=24)
gpt = GPT(
    vocab_size=corpus.vocab_size,
    n_layer=1,
    n_head=2,
    d_model=48,
    max_len=24,
)
params = gpt.init(jr.key(1))


def loss_fn(params, batch):
    return losses.cross_entropy(
        gpt.apply(params, batch["input_ids"]), batch["targets"]
    )


batch = loader.batch(0)
print(len(loader), "batches of", tuple(batch["input_ids"].shape))

# %% [markdown]
# ## 2. One gradient per example
#
# Every leaf of the result gains a leading batch dimension; each row is the gradient of the loss
# on that example alone (checked here against a single-example `torch.func.grad`). In the
# figure, blue bars are at most the clipping norm (kept as they are), orange bars are above it
# (scaled down to it):

# %%
per_ex = grads.per_example(loss_fn)(params, batch)
single = torch.func.grad(loss_fn)(params, {k: v[5:6] for k, v in batch.items()})
w = "blocks.0.mlp.fc.weight"
assert torch.allclose(
    tree.flatten(per_ex)[w][5], tree.flatten(single)[w], atol=1e-5
)

norms = grads.per_example_norm(per_ex)
clip = round(float(norms.median()), 2)
print(
    f"norms from {norms.min():.2f} to {norms.max():.2f}; clip at the median, {clip}"
)
plot.per_example_norms(norms, clip=clip).savefig("per-example-norms.png")

# %% [markdown]
# ## 3. Clip, sum, add noise
#
# `grads.privatize(key, per_ex, clip=C, noise_multiplier=sigma)` clips every example to norm
# `C`, sums, adds `N(0, (C sigma)^2)` to every coordinate and divides by the batch size. With
# `noise_multiplier=0` it is exactly the mean of the clipped gradients:

# %%
clipped = grads.clip_per_example(per_ex, clip)
print(
    "largest clipped norm:",
    round(float(grads.per_example_norm(clipped).max()), 4),
)
mean_clipped = grads.privatize(jr.key(2), per_ex, clip=clip, noise_multiplier=0.0)
assert torch.allclose(
    tree.flatten(mean_clipped)[w],
    tree.flatten(clipped)[w].mean(0),
    atol=1e-6,
)

# %% [markdown]
# ## 4. A private run next to a plain one
#
# The same model, data and learning rate, trained with plain SGD on the batch gradient and with
# DP-SGD (clip 1.0, noise multiplier 1.0). Noise and clipping cost accuracy, the price of the
# privacy guarantee; each step's noise comes from `fold_in(key, step)`, so the private run is
# reproducible too.


# %%
def run(private, steps=40):
    opt = optim.sgd(0.5)
    p, state, curve = params, opt.init(params), []
    for s in range(steps):
        b = loader.batch(s % len(loader))
        if private:
            g = grads.privatize(
                jr.fold_in(jr.key(3), s),
                grads.per_example(loss_fn)(p, b),
                clip=1.0,
                noise_multiplier=1.0,
            )
        else:
            g = torch.func.grad(loss_fn)(p, b)
        updates, state = opt.update(g, state, p)
        p = optim.apply_updates(p, updates)
        curve.append(loss_fn(p, b).item())
    return curve


curves = {"SGD": run(False), "DP-SGD (clip 1, noise 1)": run(True)}
for name, curve in curves.items():
    print(f"{name}: loss {curve[0]:.2f} -> {curve[-1]:.2f}")
plot.loss_curve(curves, smooth=4, title="training loss").savefig(
    "sgd-vs-dp-sgd.png"
)

# %% [markdown]
# The privacy accounting (which `(epsilon, delta)` a run of this many steps, this sampling rate
# and this noise multiplier buys) is not part of fnllm; use a moments accountant such as the one
# in Opacus or `dp-accounting` on the numbers above.
