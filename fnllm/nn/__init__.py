"""Pure layers: each is an ``init_*(key, ...) -> params`` function plus ``f(params, x, ...)``.

Parameters are plain dicts of tensors (``{"weight": ..., "bias": ...}``), so a model is a
composition of these functions over a nested tree, and ``torch.func.grad``, ``vmap`` and
``torch.compile`` see nothing but tensors. Weights follow PyTorch's layout (a linear weight is
``[out, in]``), which keeps the arithmetic identical to ``torch.nn`` and the Hugging Face
checkpoints one transpose away.

The Llama family adds :func:`rms_norm`, the gated :func:`swiglu` MLP and rotary position
embeddings (:func:`rotary_frequencies`, :func:`rotary_tables`, :func:`apply_rotary`);
:func:`dot_product_attention` takes fewer key/value heads than query heads (grouped-query
attention).

Attention runs on :func:`torch.nn.functional.scaled_dot_product_attention` (``impl="sdpa"``)
or on a plain matmul-softmax-matmul path (``impl="math"``) that batches under ``vmap``;
``impl="auto"`` picks the math path inside ``torch.func.vmap`` (SDPA has no batching rule on
CPU) and when attention dropout needs a key, SDPA otherwise.

The boundary checks the models share are re-exported here: :func:`check_ids` and
:func:`check_shapes`, plus :func:`in_vmap` and :func:`checks_enabled`, which say when a
data-dependent check can run (they live in the private ``fnllm._checks``, but
:func:`check_shapes` in ``nn/_adapters.py``, as it knows the adapter leaves).

Adapters (LoRA) reach a linear layer through one small protocol: the adapter leaves beside
its weight (:data:`ADAPTER_LEAVES`), the delta they add (:func:`adapter_delta`), their
builder (:func:`lora_leaves`) and the folded weight (:func:`adapter_weight`).
"""

from fnllm._checks import check_ids, checks_enabled, in_vmap
from fnllm.nn._adapters import (
    ADAPTER_FIXED,
    ADAPTER_LEAVES,
    ADAPTER_TRAINED,
    adapter_delta,
    adapter_weight,
    check_shapes,
    has_adapter,
    is_adapter_leaf,
    lora_leaves,
)
from fnllm.nn._attention import (
    attention,
    attention_qkv,
    dot_product_attention,
    init_attention,
    make_attention_mask,
    merge_heads,
)
from fnllm.nn._layers import (
    Impl,
    Params,
    dropout,
    embedding,
    gelu,
    init_embedding,
    init_layer_norm,
    init_linear,
    init_mlp,
    layer_norm,
    linear,
    mean_pool,
    mlp,
)
from fnllm.nn._llama_layers import init_rms_norm, init_swiglu, rms_norm, swiglu
from fnllm.nn._rotary import apply_rotary, rotary_frequencies, rotary_tables

__all__ = [
    "ADAPTER_FIXED",
    "ADAPTER_LEAVES",
    "ADAPTER_TRAINED",
    "Impl",
    "Params",
    "adapter_delta",
    "adapter_weight",
    "apply_rotary",
    "attention",
    "attention_qkv",
    "check_ids",
    "check_shapes",
    "checks_enabled",
    "dot_product_attention",
    "dropout",
    "embedding",
    "gelu",
    "has_adapter",
    "in_vmap",
    "init_attention",
    "init_embedding",
    "init_layer_norm",
    "init_linear",
    "init_mlp",
    "init_rms_norm",
    "init_swiglu",
    "is_adapter_leaf",
    "layer_norm",
    "linear",
    "lora_leaves",
    "make_attention_mask",
    "mean_pool",
    "merge_heads",
    "mlp",
    "rms_norm",
    "rotary_frequencies",
    "rotary_tables",
    "swiglu",
]
