"""Few-shot prompting and generation

Use a language model without training it for the task: a template turns labelled examples
into a prompt with zero, one or a few solved examples ("shots"), the model classifies by
scoring each label's answer as the continuation, and the sampler writes new text. A tiny
byte-level GPT trained for a minute stands in for a pretrained model; with a real one
(`io.from_hf("path/to/gpt2")`) the same calls show in-context learning proper.
"""

# %% [markdown]
# ## 1. A small language model
#
# Short judgements (`the film was great -> good`) in the format the prompts will use, generated from word lists, train a tiny
# GPT over bytes. Half of the adjectives are held out: the test reviews use words the model
# saw in running text but never next to a label.

# %%
import matplotlib

matplotlib.use("Agg")  # no display needed: figures go to PNG files
import matplotlib.pyplot as plt
import torch

from fnllm import generate, losses, optim, prompts, train, tree
from fnllm import random as jr
from fnllm.models import GPT

good = [
    "great",
    "lovely",
    "superb",
    "charming",
    "moving",
    "clever",
    "warm",
    "fresh",
]
bad = ["dull", "awful", "boring", "clumsy", "tedious", "shallow", "cold", "stale"]
things = ["film", "book", "meal", "show", "song", "play"]
template = prompts.Template(query="the {thing} was {word} ->", answer=" {label}")


def example(key, words, label):
    i, j = jr.randint(key, (2,), 0, 1000).tolist()
    return {
        "thing": things[i % len(things)],
        "word": words[j % len(words)],
        "label": label,
    }


def examples(key, n, half):
    keys = jr.split(key, n)
    signs = jr.bernoulli(jr.fold_in(key, n), 0.5, (n,)).tolist()
    return [
        example(k, good[half] if s else bad[half], "good" if s else "bad")
        for k, s in zip(keys, signs)
    ]


seen, unseen = slice(0, 4), slice(4, 8)
pool = examples(jr.key(0), 64, seen)  # solved examples: the shots come from here
test = examples(jr.key(1), 48, unseen)  # held-out adjectives
text = "\n\n".join(template.format_shot(e) for e in pool)
text += "\n\n" + " ".join(
    f"the {t} was {w}." for t in things for w in good[4:] + bad[4:]
)
data = torch.tensor(list(text.encode()))
gpt = GPT(vocab_size=128, n_layer=2, n_head=2, d_model=64, max_len=128)


def batch_at(step, batch_size=8, block=128):
    starts = jr.randint(
        jr.fold_in(jr.key(2), step), (batch_size,), 0, len(data) - block
    )
    return torch.stack([data[s : s + block] for s in starts.tolist()])


def next_token(trainable, frozen, tokens, key):
    return losses.causal_lm(
        gpt.apply(tree.combine(trainable, frozen), tokens), tokens
    )


steps = 400
lr = optim.warmup_cosine(1e-2, warmup_steps=20, total_steps=steps, end=1e-3)
result = train.fit(
    next_token,
    optim.adamw(lr),
    gpt.init(jr.key(3)),
    {},
    batch_at,
    key=jr.key(4),
    steps=steps,
    compile=False,
    progress=False,
)
params = result.trainable
print(
    f"{len(data):,} bytes; loss {result.history[0]['loss']:.2f} -> {result.history[-1]['loss']:.2f}"
)

# %% [markdown]
# ## 2. Zero-, one- and few-shot prompts
#
# `prompts.zero_shot` renders the query alone; `prompts.few_shot` puts `k` solved examples
# from the pool before it, drawn and ordered by the key.

# %%
query = test[0]
print(prompts.zero_shot(template, query))
print("---")
print(prompts.few_shot(jr.key(5), template, pool, query, k=2))

# %% [markdown]
# ## 3. Classification by label likelihood
#
# `prompts.label_logprobs` scores each label's answer (`" good"`, `" bad"`) as the
# continuation of each prompt; `prompts.classify` takes the likelier; `prompts.shot_accuracy`
# does it for a whole test set and several numbers of shots.


# %%
def encode(s):
    return list(s.encode())


answers = [template.format_answer({"label": lab}) for lab in ("good", "bad")]
print(
    prompts.label_logprobs(
        gpt, params, encode, [prompts.zero_shot(template, query)], answers
    )
)
accuracy = {
    name: prompts.shot_accuracy(
        jr.key(6),
        gpt,
        params,
        encode,
        template,
        pool,
        tests,
        ["good", "bad"],
        shots=(0, 1, 2, 3),
    )
    for name, tests in (
        ("adjectives seen with labels", pool[:48]),
        ("held-out adjectives", test),
    )
}
for name, acc in accuracy.items():
    print(f"{name:28s}", {k: round(v, 2) for k, v in acc.items()})

fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
width = 0.38
for i, (name, acc) in enumerate(accuracy.items()):
    xs = [j + (i - 0.5) * width for j in range(len(acc))]
    ax.bar(
        xs, list(acc.values()), width, label=name, color=["#0072b2", "#e69f00"][i]
    )
ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
ax.set_xticks(range(len(acc)), [f"{k} shots" for k in acc])
ax.set_ylim(0, 1.05)
ax.set_ylabel("test accuracy")
ax.set_title("Label-likelihood classification against shots")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
fig.savefig("shots.png", dpi=110)

# %% [markdown]
# Blue: the adjectives the model saw with their labels while training; it has learned them.
# Orange: adjectives it saw only in running text, never labelled; it does better than chance
# (the grey line) because those words appeared near the labelled ones, but not by much, and
# shots change little. That is what a model this small does: it memorises. Learning a task
# from the shots in the prompt is what large pretrained models do, with these same calls.

# %% [markdown]
# ## 4. Generation
#
# `generate.sample` continues a batch of prompts with a KV cache: `temperature=0` is greedy,
# otherwise the key draws each token after `top_k` / `top_p` filtering, and the same key gives
# the same text. `generate.stream` yields the tokens of each step as they come.

# %%
prompt = [encode("the song was")] * 3
greedy = generate.sample(
    None, gpt, params, prompt[:1], max_new_tokens=24, temperature=0
)
sampled = generate.sample(
    jr.key(7), gpt, params, prompt, 24, temperature=0.9, top_k=10
)
print(
    "greedy :", repr(bytes(prompt[0] + greedy[0].tolist()).decode(errors="replace"))
)
for row in sampled:
    print(
        "sampled:", repr(bytes(prompt[0] + row.tolist()).decode(errors="replace"))
    )
streamed = [
    int(t[0])
    for t in generate.stream(None, gpt, params, prompt[:1], 24, temperature=0)
]
assert (
    streamed == greedy[0].tolist()
)  # stream yields what sample returns, step by step
