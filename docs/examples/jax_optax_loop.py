"""Train an fnllm GPT with JAX and optax

The training loop in JAX, the model in PyTorch: the parameter tree crosses to JAX without a
copy (`interop.to_jax`), the loss runs in PyTorch under `jax.value_and_grad` (`interop.as_jax`),
and an `optax` optimizer updates the tree inside one `jax.jit` step. The trained tree comes back
as tensors and generates text with fnllm. Needs `pip install 'fnllm[jax]'`.
"""

# %% [markdown]
# ## 1. A model, a text and a loss in PyTorch
#
# A tiny GPT over bytes, and a next-token loss written with ordinary fnllm calls. Token ids
# cross to JAX as int32 (JAX has no int64 unless `jax_enable_x64` is on).

# %%
import jax
import optax
import torch

from fnllm import generate, interop, losses, plot
from fnllm import random as jr
from fnllm.models import GPT

text = b"the cat sat on the mat. the dog sat on the log. " * 8
data = torch.tensor(list(text), dtype=torch.int32)
gpt = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=32, max_len=32)
params = gpt.init(jr.key(0))


def loss_fn(params, tokens):
    return losses.causal_lm(gpt.apply(params, tokens.long()), tokens.long())


def batch_at(step, batch_size=8, block=32):
    starts = jr.randint(
        jr.fold_in(jr.key(1), step), (batch_size,), 0, len(data) - block
    )
    return torch.stack([data[s : s + block] for s in starts.tolist()])


print(f"{len(text)} bytes of text; a batch: {tuple(batch_at(0).shape)}")

# %% [markdown]
# ## 2. The loop, in JAX
#
# `as_jax(loss_fn)` is a JAX function whose gradient is PyTorch's backward pass, so
# `jax.value_and_grad`, `optax` and `jax.jit` treat it like any other loss. The optimizer's
# state is an optax state over the same tree of arrays.

# %%
loss_jax = interop.as_jax(loss_fn)
optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.01)
)


@jax.jit
def step(p, state, tokens):
    value, grads = jax.value_and_grad(loss_jax)(p, tokens)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value


p = interop.to_jax(params)  # shares memory with the tensors: no copy
state = optimizer.init(p)
history = []
for s in range(60):
    p, state, value = step(p, state, interop.to_jax(batch_at(s)))
    history.append(float(value))
print(
    f"loss {history[0]:.2f} -> {history[-1]:.2f} after {len(history)} optax steps"
)
plot.loss_curve(history, smooth=5, title="GPT trained by optax.adamw").savefig(
    "optax-loss.png"
)

# %% [markdown]
# ## 3. Back to PyTorch
#
# `from_jax` turns the trained arrays into tensors (again without a copy); the tree is an
# ordinary fnllm parameter tree, so fnllm's sampler continues a prompt with it.

# %%
trained = interop.from_jax(p)
prompt = [list(b"the cat ")]
out = generate.sample(None, gpt, trained, prompt, max_new_tokens=24, temperature=0)
print(repr(bytes(prompt[0] + out[0].tolist()).decode("ascii", "replace")))
