"""Eager train step: torch.autograd.grad (what make_step uses eagerly) vs torch.func.grad.

Run: .venv/bin/python -m benchmarks.eager_grad  (tiny GPT, 1 thread; prints the paired ratio)
"""

import torch

import fnllm.train.step as st
from benchmarks._harness import compare
from fnllm import GPT, losses, optim, random, train, tree

torch.set_num_threads(1)
gpt = GPT(vocab_size=256, n_layer=4, n_head=4, d_model=64, max_len=32)
params = gpt.init(random.key(0))
tok = random.randint(random.key(1), (2, 16), 0, 256)


def loss_fn(tr, fr, b, k):
    return losses.causal_lm(gpt.apply(tree.combine(tr, fr), b), b)


tr, fr = tree.partition(params, "*")
opt = optim.adamw(1e-3)
s0 = opt.init(tr)
new = train.make_step(loss_fn, opt, compile=False)
orig = st._autograd_grad


def via_func(objective, trainable):
    return torch.func.grad(objective, has_aux=True)(trainable)


def run_new():
    new(tr, fr, s0, tok, random.key(2))


def run_old():
    st._autograd_grad = via_func
    try:
        new(tr, fr, s0, tok, random.key(2))
    finally:
        st._autograd_grad = orig


a = new(tr, fr, s0, tok, random.key(2))
st._autograd_grad = via_func
b = new(tr, fr, s0, tok, random.key(2))
st._autograd_grad = orig
print("identical:", all(torch.equal(x, y) for x, y in zip(tree.leaves(a[0]), tree.leaves(b[0]))))
c = compare(run_new, run_old, warmup=5, runs=41)
print(f"autograd.grad {c.a.median:.2f} ms, func.grad {c.b.median:.2f} ms, ratio {c.ratio:.3f}")
