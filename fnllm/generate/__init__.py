"""Decoding from any decoder (GPT, ...): a preallocated KV cache, ``prefill``/``decode_step``,
sampling. The forward is the model's own cached forward (``model.apply_cached``).

- :mod:`fnllm.generate.cache`: :class:`KVCache` (a pytree of preallocated tensors with a
  fixed number of slots), :func:`init_cache`, :func:`prefill` and :func:`decode_step`; the
  decode step has static shapes, so ``torch.compile`` compiles it once.
- :mod:`fnllm.generate.sampling`: :func:`next_token` (greedy at temperature 0, else
  temperature, top-k and top-p sampling with an explicit key), :func:`sample` and its
  streaming form :func:`stream` for a batch of prompts of any lengths (left-padded by
  :func:`pad_prompts`).

Example:
    >>> from fnllm import generate, random
    >>> from fnllm.models import GPT
    >>> gpt = GPT(vocab_size=32, n_layer=1, n_head=2, d_model=8, max_len=16)
    >>> out = generate.sample(random.key(1), gpt, gpt.init(random.key(0)), [[1, 2], [3]], 4,
    ...                       temperature=0.8, top_k=10)
    >>> out.shape
    torch.Size([2, 4])
"""

from fnllm.generate.cache import KVCache, decode_step, init_cache, prefill
from fnllm.generate.sampling import next_token, pad_prompts, sample, stream

__all__ = [
    "KVCache",
    "decode_step",
    "init_cache",
    "next_token",
    "pad_prompts",
    "prefill",
    "sample",
    "stream",
]
