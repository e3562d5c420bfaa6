"""Peak training memory, predicted before anything runs: :func:`plan` and :func:`measure`.

:func:`plan` runs one real train step of the model (:func:`fnllm.train.make_step`, the step
:func:`fnllm.train.fit` runs) on the ``meta`` device: every tensor has its shape and dtype
but no data, so nothing is computed and no memory is taken, whatever the model's size. While
it runs, a dispatch mode (:func:`measure`) watches every tensor storage that is created and
freed, so the activations that autograd saves for backward, the gradients, the optimizer's
temporaries and the moment of the peak all come from the step itself, not from a formula per
architecture. The result is split by part:

- ``weights``: the trainable and the frozen leaves (present before the step),
- ``optimizer``: the optimizer state (present before the step),
- ``gradients``: one per trainable leaf,
- ``activations``: everything else alive at the peak (saved activations and temporaries).

Because the same code runs on real tensors, :func:`measure` also gives the measured peak of a
real step on the CPU, allocation by allocation (the CPU allocator frees at once, so the live
bytes are the memory in use); the tests hold the plan to within 15% of it, and the guide
compares both with the process's resident-memory high-water mark.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fnllm import _checks, _quant, losses, nn, optim, remat, tree
from fnllm import random as jr

__all__ = ["MemoryPlan", "measure", "nbytes", "plan"]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak memory of one train step, in bytes, by part (see :func:`plan`).

    Example:
        >>> from fnllm import memory
        >>> p = memory.MemoryPlan(weights_trainable=4, weights_frozen=0, optimizer=8,
        ...                       gradients=4, activations=16, settings={})
        >>> p.peak, p.fits(32), p.fits(31)
        (32, True, False)

    Attributes:
        weights_trainable: bytes of the trainable leaves.
        weights_frozen: bytes of the frozen leaves.
        optimizer: bytes of the optimizer state.
        gradients: bytes of the gradients (one per trainable leaf).
        activations: bytes of everything else alive at the peak: the activations saved for
            backward and the step's temporaries.
        settings: what was planned (strategy, batch, seq_len, dtype, trainable count).
        advice: for a plan made with a ``budget`` it does not fit: the changes that make it
            fit, each with its predicted peak.
    """

    weights_trainable: int
    weights_frozen: int
    optimizer: int
    gradients: int
    activations: int
    settings: dict[str, Any]
    advice: tuple[str, ...] = ()

    @property
    def peak(self) -> int:
        """The predicted peak: the sum of the parts."""
        return (
            self.weights_trainable
            + self.weights_frozen
            + self.optimizer
            + self.gradients
            + self.activations
        )

    def fits(self, budget: int | float) -> bool:
        """Whether the predicted peak is at most ``budget`` bytes."""
        return self.peak <= budget

    def table(self) -> str:
        """The plan as a small Markdown table (MiB), the advice after it."""
        rows = [
            ("weights (trainable)", self.weights_trainable),
            ("weights (frozen)", self.weights_frozen),
            ("optimizer state", self.optimizer),
            ("gradients", self.gradients),
            ("activations", self.activations),
            ("peak", self.peak),
        ]
        lines = ["| part | MiB |", "| --- | ---: |"]
        lines += [f"| {name} | {_mib(b)} |" for name, b in rows]
        return "\n".join([*lines, *[f"\n- {a}" for a in self.advice]])

    def __str__(self) -> str:
        return self.table()


def plan(
    model: Any,
    params_or_dtype: Any = torch.float32,
    strategy: Any = "full",
    *,
    batch: int,
    seq_len: int,
    optimizer: Any = None,
    lora_rank: int = 8,
    loss_fn: Callable[..., Tensor] | None = None,
    budget: int | float | None = None,
    checkpointing: Any = None,
    quantize: tuple[str | Sequence[str], str] | None = None,
) -> MemoryPlan:
    """Predict the peak memory of one train step of ``model``, before anything runs.

    The step runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
    the CPU's kernel choices, no data), so this is fast and allocates nothing, even for a
    model far larger than the machine's memory (a Qwen2-0.5B-shaped LoRA step plans in a few
    CPU seconds: the parameters are made on the ``meta`` device, not drawn).

    Example:
        >>> import torch
        >>> from fnllm import memory
        >>> from fnllm.models import GPT
        >>> gpt = GPT(vocab_size=1000, n_layer=2, n_head=4, d_model=64, max_len=128)
        >>> full = memory.plan(gpt, torch.float32, "full", batch=8, seq_len=128)
        >>> head = memory.plan(gpt, torch.float32, "last:1", batch=8, seq_len=128)
        >>> full.peak > head.peak, full.gradients == full.weights_trainable
        (True, True)

    Args:
        model: a decoder config (GPT, Llama: trained on next-token prediction) or a
            :class:`~fnllm.finetune.Classifier` (trained on class labels); any other model
            needs ``loss_fn``.
        params_or_dtype: a parameter tree (its shapes and dtypes are used, never its values;
            LoRA adapters included) or a floating dtype to init the model in (adapters that
            ``"lora"`` adds stay float32 on a bf16 or float16 base, as mixed precision
            trains them).
        strategy: a :func:`fnllm.finetune.strategy` name (``"full"``, ``"head"``,
            ``"last:N"``, ``"bitfit"``, ``"lora"``) or any ``tree.partition`` filter.
            ``"lora"`` on a tree without adapters adds them (:func:`fnllm.finetune.lora.init`
            with ``lora_rank`` and the model's default targets).
        batch: rows per step.
        seq_len: tokens per row.
        optimizer: the optimizer (default ``optim.adamw(1e-4)``).
        lora_rank: the adapters' rank when ``"lora"`` adds them.
        loss_fn: ``loss_fn(trainable, frozen, batch, key)``, with ``batch`` a dict of
            ``input_ids`` ``[batch, seq_len]`` and ``labels`` ``[batch]``; default: the
            causal LM loss for a decoder, cross-entropy for a classifier.
        budget: bytes available; when the plan does not fit, :attr:`MemoryPlan.advice`
            lists the changes that make it fit.
        checkpointing: which blocks the default loss recomputes in the backward pass
            (the models' and ``Classifier.apply``'s ``checkpoint=``,
            :func:`fnllm.remat.selected`: ``True`` every block, ``k`` every ``k``-th,
            ``None`` none). A ``loss_fn`` of your own passes ``checkpoint=`` to the model
            itself.
        quantize: ``(globs, kind)``: plan a quantized frozen base, as
            ``io.quantize(params, globs, kind)`` would make it (``kind`` ``"nf4"`` or
            ``"int8"``, e.g. ``("blocks.*", "nf4")``), without quantizing real weights.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        TypeError: ``model`` has no default loss and ``loss_fn`` is missing; a bad dtype.
        ValueError: ``batch``/``seq_len`` not positive ints, ``seq_len`` past ``max_len``.
    """
    from fnllm import finetune

    batch = _checks.check_int("plan: batch", batch, low=1)
    seq_len = _checks.check_int("plan: seq_len", seq_len, low=1)
    max_len = getattr(getattr(model, "base", model), "max_len", None)
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"plan: seq_len {seq_len} > the model's max_len {max_len}")
    if budget is not None:
        budget = _checks.check_number("plan: budget", budget, positive=True)
    opt = optim.adamw(1e-4) if optimizer is None else optimizer
    n_layer = getattr(getattr(model, "base", model), "n_layer", 0)
    remat.selected(checkpointing, n_layer)  # a bad policy fails here, named
    step_loss = loss_fn if loss_fn is not None else _default_loss(model, checkpointing)
    filt = finetune.strategy(strategy, model) if isinstance(strategy, str) else strategy
    add_lora = strategy == "lora"
    if isinstance(params_or_dtype, torch.dtype):  # made on meta, out of the fake mode: fast
        meta = _meta_params(model, params_or_dtype, lora_rank if add_lora else None)
        add_lora = False
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        if isinstance(params_or_dtype, torch.dtype):
            params = tree.map(lambda m: torch.empty(m.shape, dtype=m.dtype), meta)
        else:
            params = _fake_params(params_or_dtype, fake)
        if add_lora and not any(nn.is_adapter_leaf(p) for p in tree.paths(params)):
            params = finetune.lora.init(jr.key(0), params, rank=lora_rank, model=model)
        if quantize is not None:
            params = _quantized(params, quantize)
        trainable, frozen = tree.partition(params, filt)
        data = {
            "input_ids": torch.zeros(batch, seq_len, dtype=torch.long),
            "labels": torch.zeros(batch, dtype=torch.long),
        }
        result = _plan_step(step_loss, opt, trainable, frozen, data)
    dtypes = sorted({str(x.dtype).removeprefix("torch.") for x in tree.leaves(params)})
    if quantize is not None:
        dtypes.append(quantize[1])
    settings = {
        "strategy": strategy if isinstance(strategy, str) else "custom",
        "batch": batch,
        "seq_len": seq_len,
        "dtype": "/".join(dtypes),
        "trainable": tree.count(trainable),
        "frozen": tree.count(frozen),
        "checkpointing": checkpointing,
        "quantize": quantize,
    }
    out = dataclasses.replace(result, settings=settings)
    if budget is not None and not out.fits(budget):
        advice = _advise(
            model, params_or_dtype, strategy, batch, seq_len, opt, loss_fn, budget,
            checkpointing, quantize, lora_rank,
        )  # fmt: skip
        out = dataclasses.replace(out, advice=advice)
    return out


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` and return ``(its result, the peak bytes it allocated)``.

    Every tensor storage created while ``fn`` runs is counted from its creation until it is
    freed; the peak is the largest total alive at once (storages that exist before the call,
    such as the arguments, are not counted). On the CPU this is the memory the step takes
    (the allocator frees at once); on fake or ``meta`` tensors it is what the step would take.

    Example:
        >>> import torch
        >>> from fnllm import memory
        >>> def f(x):
        ...     y = x * 2          # 4 KiB, freed after the sum
        ...     return y.sum()
        >>> _, peak = memory.measure(f, torch.ones(1024))
        >>> peak
        4100

    Args:
        fn: any function of tensors.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        ``(result, peak_bytes)``.
    """
    with _Tracker() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak


def nbytes(params: Any) -> int:
    """The bytes a tree of tensors holds: each distinct storage once, a quantized leaf
    (:func:`fnllm.io.quantize`) by the tensors it stores.

    Example:
        >>> import torch
        >>> from fnllm import memory
        >>> w = torch.zeros(4, 4)
        >>> memory.nbytes({"a": w, "b": w, "c": torch.zeros(2, dtype=torch.bfloat16)})
        68

    Args:
        params: any tree (other leaves count nothing).

    Returns:
        The number of bytes.
    """
    return _nbytes(params)


# ----------------------------------------------------------------------------- internals


class _Tracker(TorchDispatchMode):
    """Counts the bytes of the storages created under it, alive at each moment."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in tree.leaves(out):
            if isinstance(x, Tensor):
                self._track(x)
        return out

    def _track(self, x: Tensor) -> None:
        storage = x.untyped_storage()
        handle = storage._cdata
        if handle in self.live:
            return
        size = storage.nbytes()
        self.live[handle] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, handle)

    def _free(self, handle: int) -> None:
        self.current -= self.live.pop(handle, 0)


def _plan_step(
    loss_fn: Callable[..., Tensor], opt: Any, trainable: Any, frozen: Any, data: Any
) -> MemoryPlan:
    """One donated step of :func:`fnllm.train.make_step` under the tracker."""
    from fnllm import train

    state = opt.init(trainable)
    step = train.make_step(loss_fn, opt, compile=False, guard=False)
    key = jr.key(0)
    # the first run also counts one-off set-up (lazily made constants and dispatch caches):
    # measure the second, the step that repeats
    step.inner(trainable, frozen, state, data, key, donate=True)
    _, transient = measure(step.inner, trainable, frozen, state, data, key, donate=True)
    grads = _nbytes(trainable)
    return MemoryPlan(
        weights_trainable=_nbytes(trainable),
        weights_frozen=_nbytes(frozen),
        optimizer=_nbytes(state),
        gradients=grads,
        activations=max(transient - grads, 0),
        settings={},
    )


def _default_loss(model: Any, checkpointing: Any = None) -> Callable[..., Tensor]:
    if getattr(model, "is_decoder", False):

        def causal(trainable: Any, frozen: Any, batch: Any, key: Any) -> Tensor:
            params = tree.combine(trainable, frozen)
            ids = batch["input_ids"]
            logits = model.apply(params, ids, key=key, checkpoint=checkpointing)
            return losses.causal_lm(logits, ids)

        return causal
    if hasattr(model, "n_classes") and hasattr(model, "base"):

        def classify(trainable: Any, frozen: Any, batch: Any, key: Any) -> Tensor:
            params = tree.combine(trainable, frozen)
            logits = model.apply(params, batch["input_ids"], key=key, checkpoint=checkpointing)
            return losses.classification(logits, batch["labels"])

        return classify
    raise TypeError(
        f"plan: {type(model).__name__} has no default training loss (a decoder trains on "
        "next tokens, a finetune.Classifier on labels): pass loss_fn"
    )


def _meta_params(model: Any, dtype: torch.dtype, lora_rank: int | None) -> Any:
    """``model.init`` (and LoRA adapters) on the ``meta`` device: shapes and dtypes only.
    Meta kernels skip the fake mode's bookkeeping, which made drawing a 0.5B model's random
    weights take about a minute; the model's layout cache is filled here for the same reason."""
    from fnllm import finetune

    if not dtype.is_floating_point:
        raise TypeError(f"plan: dtype must be floating, got {dtype}")
    for m in (model, getattr(model, "base", None)):
        shapes = getattr(m, "param_shapes", None)
        if callable(shapes):
            shapes()
    key = jr.key(0).to("meta")
    params = model.init(key)
    if lora_rank is None:
        return tree.map(lambda x: x.to(dtype), params)
    # float32 adapters on a base in ``dtype``: what LoRA trains stays float32 (mixed precision)
    params = finetune.lora.init(key, params, rank=lora_rank, model=model)
    trainable, frozen = tree.partition(params, finetune.strategy("lora", model))
    return tree.combine(trainable, tree.map(lambda x: x.to(dtype), frozen))


def _quantized(params: Any, quantize: Any) -> Any:
    from fnllm import io

    if not isinstance(quantize, tuple) or len(quantize) != 2:
        raise TypeError(f"plan: quantize must be a pair (globs, kind), got {quantize!r}")
    return io.quantize(params, quantize[0], quantize[1])


def _fake_params(params_or_dtype: Any, fake: FakeTensorMode) -> Any:
    """A parameter tree as fake tensors: shapes, dtypes and devices, no data."""
    leaves = tree.leaves(params_or_dtype)
    if not leaves or not all(isinstance(x, Tensor) for x in leaves):
        raise TypeError(
            "plan: params_or_dtype must be a parameter tree of tensors or a floating "
            f"torch.dtype, got {type(params_or_dtype).__name__}"
        )
    return tree.map(fake.from_tensor, params_or_dtype)


def _advise(
    model: Any,
    params: Any,
    strategy: Any,
    batch: int,
    seq_len: int,
    opt: Any,
    loss_fn: Any,
    budget: float,
    checkpointing: Any = None,
    quantize: Any = None,
    lora_rank: int = 8,
) -> tuple[str, ...]:
    """Changes that bring the plan under ``budget``, each with its predicted peak."""
    ck = checkpointing
    tried: list[tuple[str, Any, Any, int, Any]] = []
    if strategy != "lora":
        tried.append(("finetune with LoRA (strategy='lora')", params, "lora", batch, ck))
    dtype = params if isinstance(params, torch.dtype) else tree.leaves(params)[0].dtype
    if dtype == torch.float32:
        half: Any = torch.bfloat16
        if not isinstance(params, torch.dtype):
            half = tree.map(lambda x: x.to(torch.bfloat16), params)
        tried.append(("store the weights in bf16 (tree.cast)", half, strategy, batch, ck))
    if ck is not True and loss_fn is None:
        what = "recompute every block in the backward (checkpointing=True, apply(checkpoint=))"
        tried.append((what, params, strategy, batch, True))
    smaller = batch // 2
    while smaller >= 1:
        what = f"batch {smaller} with {batch // smaller} accumulation steps"
        tried.append((what, params, strategy, smaller, ck))
        smaller //= 2
    out = []
    for what, p, s, b, c in tried:
        candidate = plan(
            model, p, s, batch=b, seq_len=seq_len, optimizer=opt, loss_fn=loss_fn,
            checkpointing=c, quantize=quantize, lora_rank=lora_rank,
        )  # fmt: skip
        if candidate.fits(budget):
            out.append(f"{what}: peak {_mib(candidate.peak)} MiB")
    if not out:
        out.append(f"nothing tried fits {_mib(int(budget))} MiB: shorten seq_len or the model")
    return tuple(out)


def _nbytes(node: Any) -> int:
    seen: set[int] = set()
    total = 0
    for x in tree.leaves(node):
        if _quant.is_quantized(x):  # NF4/int8: the tensors it stores
            _, inner, _ = _quant.encode(x)
            total += _nbytes(list(inner.values()))
        elif isinstance(x, Tensor):
            s = x.untyped_storage()
            if s._cdata not in seen:
                seen.add(s._cdata)
                total += s.nbytes()
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"
