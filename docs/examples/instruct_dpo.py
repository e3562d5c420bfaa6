"""Instruction tuning, then DPO

The two finetuning stages after pretraining, as InstructGPT-style models are made: supervised
finetuning on instruction/response records (only the response tokens are learned), then
Direct Preference Optimization on comparisons of a chosen and a rejected response, with the
instruction-tuned model as the frozen reference. Records are JSONL files, as you would keep
them.
"""

# %% [markdown]
# ## 1. Instruction records
#
# JSONL, one `{"instruction", "response"}` record a line; `instruct.read_jsonl` names the line
# of a corrupt record. The greeting has two answers in the data, a polite and a rude one: an
# instruction-tuned model learns both.

# %%
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: figures go to PNG files
import matplotlib.pyplot as plt

from fnllm import generate, instruct, optim, preference, train
from fnllm import random as jr
from fnllm.models import GPT

records = [
    {"instruction": "capital of France?", "response": " Paris."},
    {"instruction": "capital of Italy?", "response": " Rome."},
    {"instruction": "capital of Spain?", "response": " Madrid."},
    {"instruction": "2+2?", "response": " four."},
    {"instruction": "3+3?", "response": " six."},
    {"instruction": "greet the guest", "response": " Welcome, come in!"},
    {"instruction": "greet the guest", "response": " Go away."},
]
Path("sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
records = instruct.read_jsonl("sft.jsonl", required=["instruction", "response"])


def encode(text):
    return list(text.encode())


def decode(ids):
    return bytes(ids).decode(errors="replace")


fmt = instruct.InstructionFormat(template="Q: {instruction}\nA:")
sft = instruct.sft_batch(records, encode, eos_id=0, max_len=48, fmt=fmt)
print(len(records), "records; batch", tuple(sft["input_ids"].shape))
print(repr(fmt.prompt(records[0]) + records[0]["response"]))

# %% [markdown]
# ## 2. Supervised finetuning
#
# `instruct.sft_loss` is a `train.fit` loss: cross-entropy on the response tokens and the end
# token, the prompt masked out. A tiny GPT over bytes, from scratch here; in practice the
# pretrained model you start from.

# %%
gpt = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=48, max_len=48)
sft_run = train.fit(
    instruct.sft_loss(gpt),
    optim.adamw(1e-2),
    gpt.init(jr.key(0)),
    {},
    lambda step: sft,
    key=jr.key(1),
    steps=60,
    compile=False,
    progress=False,
)
tuned = sft_run.trainable
print(
    f"SFT loss {sft_run.history[0]['loss']:.2f} -> {sft_run.history[-1]['loss']:.3f}"
)


def answer(params, instruction, key=None, n=4):
    prompt = [encode(fmt.prompt({"instruction": instruction}))] * n
    out = generate.sample(
        key,
        gpt,
        params,
        prompt,
        20,
        temperature=0 if key is None else 1.0,
        stop_ids=[0],
    )
    return [decode([t for t in row.tolist() if t != 0]) for row in out]


print("capital of Italy? ->", answer(tuned, "capital of Italy?", n=1))
print("greet the guest   ->", answer(tuned, "greet the guest", key=jr.key(2)))

# %% [markdown]
# ## 3. Preferences, and DPO
#
# A preference record holds a prompt, the chosen and the rejected response
# (`preference.read_preferences`): here the polite greeting over the rude one, and the right
# facts over wrong ones, so that DPO has something to keep as well as something to change. DPO raises the policy's log-probability ratio to the
# reference on chosen responses relative to rejected ones; `preference.with_reference` adds
# the frozen reference's log-probabilities to every batch.

# %%
comparisons = [  # (instruction, chosen, rejected)
    ("greet the guest", " Welcome, come in!", " Go away."),
    ("capital of France?", " Paris.", " Rome."),
    ("capital of Italy?", " Rome.", " Madrid."),
    ("2+2?", " four.", " six."),
]
pairs = [
    {"prompt": fmt.prompt({"instruction": i}), "chosen": c, "rejected": r}
    for i, c, r in comparisons
]
Path("prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
pairs = preference.read_preferences("prefs.jsonl")
pref = preference.preference_batch(pairs, encode, eos_id=0, max_len=48)
data = preference.with_reference(lambda step: pref, gpt, tuned)
dpo = preference.dpo_loss(gpt, beta=0.5)
dpo_run = train.fit(
    dpo,
    optim.adamw(3e-4),
    tuned,
    {},
    data,
    key=jr.key(3),
    steps=20,
    compile=False,
    progress=False,
)
loss, aux = dpo(dpo_run.trainable, {}, data(0), None)
print(
    f"DPO loss {dpo_run.history[0]['loss']:.3f} -> {float(loss):.3f} "
    f"(log 2 = 0.693 at the start: policy = reference)"
)
print(
    f"log-ratio to the reference: chosen {float(aux['chosen_logratio']):+.2f}, "
    f"rejected {float(aux['rejected_logratio']):+.2f}"
)
print(
    "greet the guest   ->",
    answer(dpo_run.trainable, "greet the guest", key=jr.key(2)),
)
print("capital of Italy? ->", answer(dpo_run.trainable, "capital of Italy?", n=1))

fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 2.8), layout="constrained")
left.plot([h["loss"] for h in sft_run.history], color="#0072b2")
left.set(title="instruction tuning", xlabel="step", ylabel="loss on responses")
right.plot([h["loss"] for h in dpo_run.history], color="#d55e00")
right.axhline(0.693, color="grey", linestyle=":", linewidth=1)
right.set(title="DPO (dotted: log 2)", xlabel="step", ylabel="DPO loss")
for ax in (left, right):
    ax.grid(alpha=0.3)
fig.savefig("sft-dpo.png", dpi=110)

# %% [markdown]
# After DPO the sampled greetings are the polite one (a few bytes still slip at temperature 1),
# and the facts survive. DPO optimises the *margin*: here the rejected responses fell far
# below the reference while the chosen ones fell a little too, a known trait of DPO on few
# pairs; a small learning rate and few steps keep it in check, and `preference.dpo_loss`
# reports both log-ratios so that you can watch it.
