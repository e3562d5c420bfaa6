"""Bring your own LLM: a Llama folder in, LoRA, generation, peft adapters out

A Llama-family checkpoint folder (here a tiny random one written by `io.to_hf`, laid out
exactly as `transformers` writes `LlamaForCausalLM`) is read with `io.from_hf`, finetuned with
LoRA on every linear layer of its blocks, used for greedy generation, and exported twice: the
adapters alone as a peft folder that `peft.PeftModel.from_pretrained` loads, and the merged
weights as a plain `transformers` folder. Both give fnllm's logits in `transformers`.
"""

# %% [markdown]
# ## 1. A checkpoint folder, read back
#
# A real checkpoint is a folder with `config.json` and `model.safetensors` (or shards). This
# one has random weights and grouped-query attention (4 query heads over 2 key/value heads).
# `io.from_hf` returns the model config and a plain parameter tree.

# %%
import tempfile
from pathlib import Path

import peft
import torch
import transformers

import fnllm
from fnllm import generate, io, losses, optim, plot, train, tree
from fnllm import random as jr
from fnllm.finetune import lora

work = Path(tempfile.mkdtemp())
tiny = fnllm.Llama(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                   d_ff=64, max_len=64, tie_head=True)  # fmt: skip
io.to_hf(tiny, tiny.init(jr.key(0)), work / "base")
model, params = io.from_hf(work / "base")
print(model)
print(f"{tree.count(params):,} parameters; block 0: "
      f"{sorted({p.split('.')[2] for p in tree.paths(params) if p.startswith('blocks.0.')})}")  # fmt: skip

# %% [markdown]
# ## 2. LoRA on every linear layer
#
# `model.lora_targets` names the Llama family's usual targets (q, k, v, o, gate, up, down).
# Only the adapters train; the base stays frozen. The task is a toy one: continue a repeating
# run of ids 10, 11, ..., 21.

# %%
print(model.lora_targets)
adapted = lora.init(
    jr.key(1), params, rank=8, alpha=64.0, targets=model.lora_targets
)
trainable, frozen = tree.partition(adapted, ["*.lora_a", "*.lora_b"])
pattern = torch.arange(48) % 12 + 10


def batch_at(step):
    shifts = jr.randint(jr.fold_in(jr.key(2), step), (8,), 0, 12).tolist()
    return torch.stack([pattern.roll(-s) for s in shifts])


def next_token(trainable, frozen, tokens, key):
    logits = model.apply(tree.combine(trainable, frozen), tokens)
    return losses.causal_lm(logits, tokens)


result = train.fit(next_token, optim.adamw(2e-2), trainable, frozen, batch_at,
                   key=jr.key(3), steps=60, compile=False, progress=False)  # fmt: skip
tuned = tree.combine(result.trainable, frozen)
print(f"{tree.count(result.trainable):,} trained parameters, loss "
      f"{result.history[0]['loss']:.2f} -> {result.history[-1]['loss']:.2f}")  # fmt: skip
plot.loss_curve(result.history, smooth=4, title="LoRA on a Llama").savefig(
    "llama_lora.png"
)

# %% [markdown]
# ## 3. Generation
#
# `generate.sample` runs the model's own cached forward (`apply_cached`); temperature 0 is
# greedy. Two prompts of different lengths are left-padded, and each row decodes as it would
# alone.

# %%
out = generate.sample(
    None, model, tuned, [[13, 14, 15], [19, 20]], 10, temperature=0
)
for row in out.tolist():
    print(row)

# %% [markdown]
# ## 4. Out again: peft adapters and a merged folder
#
# `lora.to_peft` writes `adapter_config.json` and `adapter_model.safetensors` for the
# `transformers` model of the base; `lora.from_peft` reads such a folder back.
# `lora.merge` folds the adapters into the weights for a plain `io.to_hf` export.

# %%
adapter = lora.to_peft(tuned, work / "adapter", model)
print(sorted(p.name for p in adapter.iterdir()))
hf = transformers.AutoModelForCausalLM.from_pretrained(work / "base").eval()
with_adapter = peft.PeftModel.from_pretrained(hf, adapter).eval()
prompt = torch.tensor([[13, 14, 15, 16]])
ours = model.apply(tuned, prompt)
with torch.no_grad():
    theirs = with_adapter(input_ids=prompt).logits
print("peft logits equal fnllm's:", torch.allclose(ours, theirs, atol=1e-5))

back = lora.attach(params, lora.from_peft(adapter, model))
print(
    "read back, same logits:",
    torch.allclose(model.apply(back, prompt), ours, atol=1e-6),
)

merged_dir = io.to_hf(model, lora.merge(tuned), work / "merged")
merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
with torch.no_grad():
    print(
        "merged export equal:",
        torch.allclose(merged(prompt).logits, ours, atol=1e-5),
    )
