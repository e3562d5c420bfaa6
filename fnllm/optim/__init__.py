"""Functional optimizers (optax-style) on parameter trees, and learning-rate schedules.

An optimizer is a :class:`GradientTransformation`, a pair of pure functions::

    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(optim.warmup_cosine(3e-4, 100, 10_000), weight_decay=0.1,
                                  mask=optim.decay_mask()))
    state = opt.init(trainable)                       # only the leaves you will train
    updates, state = opt.update(grads, state, trainable)
    trainable = optim.apply_updates(trainable, updates)
    # or, in one fused kernel:  trainable, state = optim.apply_gradients(opt, grads, state,
    #                                                                     trainable)

``adamw`` is ``chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask),
scale_by_learning_rate(lr))``, run in one pass (a fused kernel in eager mode).

Outside :func:`fnllm.train.fit` (which skips non-finite steps itself), an eager ``adam``/``adamw``
update refuses a gradient holding NaN or inf, naming its leaf, instead of poisoning the
parameters and moments; a compiled update cannot read values, so it relies on ``fit``'s guard.
Every learning rate, a custom schedule's value included (a Python float or a tensor), must be
finite and >= 0 at each eager step.

Nothing is modified in place: every call returns new trees, and the step count is a tensor in
the state, so ``update`` and ``apply_gradients`` compile with ``torch.compile(fullgraph=True)``.
"""

from fnllm.optim._adam import NO_DECAY, adam, adamw, decay_mask, scale_by_adam
from fnllm.optim.base import GradientTransformation, apply_gradients, apply_updates, chain, step
from fnllm.optim.schedules import (
    Schedule,
    constant,
    cosine_decay,
    linear_warmup,
    warmup_cosine,
)
from fnllm.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    global_norm,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    sgd,
    trace,
)

__all__ = [
    "NO_DECAY",
    "GradientTransformation",
    "Schedule",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_gradients",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "decay_mask",
    "global_norm",
    "linear_warmup",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "sgd",
    "step",
    "trace",
    "warmup_cosine",
]
