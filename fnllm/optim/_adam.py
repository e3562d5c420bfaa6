"""Adam and AdamW as chains of public transforms, run in one pass; the weight-decay mask.

``adamw(lr, b1, b2, eps, weight_decay, mask)`` is the chain ``chain(scale_by_adam(b1, b2,
eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``, and ``adam`` the
same chain without the decay. The chain checks the arguments and builds the state (that of
:func:`scale_by_adam`); the update then computes the chain's maths in one pass, in the order of
operations of ``torch.optim.AdamW`` (``-lr / bc1 * m / denom - lr * wd * p``, where the chain
rounds ``-lr * (m / bc1 / denom + wd * p)``). Eagerly on CPU that pass is torch's fused kernel
on fresh buffers (``torch._fused_adam_``; :func:`fnllm.optim.apply_gradients` runs
``torch._fused_adamw_``, which updates the parameters in the same kernel); elsewhere, and
under ``torch.compile``, it is multi-tensor ``_foreach_*`` ops (Inductor fuses them).
:func:`scale_by_adam` takes the same two routes, so its moments equal adamw's bit for bit.
Nothing the caller passed is modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from fnllm import _checks, tree
from fnllm.optim import _helpers
from fnllm.optim._helpers import Mask, Tree
from fnllm.optim.base import GradientTransformation, apply_updates, chain
from fnllm.optim.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_learning_rate,
)

__all__ = ["NO_DECAY", "adam", "adamw", "decay_mask", "scale_by_adam"]

NO_DECAY: tuple[str, ...] = ("*bias", "*emb*", "*wte*", "*wpe*", "*norm*", "*ln*")
"""Path globs that :func:`decay_mask` excludes by default: biases, embeddings, norms."""

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED_DEVICES = ("cpu", "cuda")


def decay_mask(
    exclude: Sequence[str] = NO_DECAY, *, min_ndim: int = 2
) -> Callable[[str, Tensor], bool]:
    """A weight-decay mask: decay matrices, but not biases, norm weights or embeddings.

    A leaf is decayed when it has at least ``min_ndim`` dimensions and its path matches none
    of the ``exclude`` globs (``fnllm.tree`` filter syntax). The dimension rule alone already
    spares biases and LayerNorm gains, whatever they are called; the globs catch embedding
    tables, which are matrices.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> m = optim.decay_mask()
        >>> m("blocks.0.attn.qkv.weight", torch.zeros(8, 8)), m("blocks.0.mlp.bias", torch.zeros(8))
        (True, False)
        >>> m("embed.weight", torch.zeros(8, 8)), m("blocks.0.ln_1.weight", torch.zeros(8))
        (False, False)

    Args:
        exclude: path globs never decayed.
        min_ndim: leaves with fewer dimensions are never decayed.

    Returns:
        A predicate ``(path, leaf) -> bool`` for ``adamw(..., mask=...)``.
    """
    _checks.check_int("decay_mask: min_ndim", min_ndim, low=0)
    if isinstance(exclude, str):
        exclude = (exclude,)
    excluded = tree.filter_fn(list(exclude))

    def predicate(path: str, leaf: Tensor) -> bool:
        return leaf.ndim >= min_ndim and not excluded(path, leaf)

    return predicate


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Scale the updates by Adam's ratio of bias-corrected moments, ``m_hat / (sqrt(v_hat) + eps)``.

    With ``t`` the 1-based step and ``u`` the incoming updates: ``m = b1 m + (1 - b1) u``,
    ``v = b2 v + (1 - b2) u^2``, output ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    Follow it with :func:`scale_by_learning_rate` (and, for decoupled weight decay,
    :func:`add_decayed_weights` in between): that chain is :func:`adamw`.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> t = optim.scale_by_adam()
        >>> g = {"w": torch.tensor([3.0, -0.5])}
        >>> u, state = t.update(g, t.init(g))
        >>> u["w"]  # the first step is sign(g), up to eps
        tensor([ 1.0000, -1.0000])
        >>> sorted(state), int(state["count"])
        (['count', 'mu', 'nu'], 1)

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the second moment, in ``[0, 1)``.
        eps: added to the denominator (>= 0).

    Returns:
        A transformation whose state is ``{"count": int64 tensor, "mu": tree, "nu": tree}``
        (the layout of :func:`adam` and :func:`adamw`, so their checkpoints hold the same).

    Raises:
        ValueError: a hyper-parameter is out of range.
    """
    where = "optim.scale_by_adam"
    hyper = _hyperparams(where, b1, b2, eps)

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        del params
        s = _prepare(where, "updates", updates, state)
        if not s.grads:
            return updates, _next_state(s, state["mu"], state["nu"])
        if _kernel_ok(s):  # the kernel adamw runs: the same moments, bit for bit
            minus_u, m2, v2 = _updates_fused(s, hyper)  # with lr = 1: minus the direction
            u = torch._foreach_neg(minus_u)
        else:
            m2, v2, denom, bc1 = _moments(s, hyper)
            u = torch._foreach_div(m2, denom)
            torch._foreach_div_(u, bc1)
        return _unflatten(s, u), _next_state(s, _unflatten(s, m2), _unflatten(s, v2))

    return GradientTransformation(_init_fn(where), update)


def adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Mask = None,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay, matching ``torch.optim.AdamW``.

    With ``t`` the 1-based step: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``update = -lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr * weight_decay * p``
    (the decay term only on the leaves ``mask`` selects), which is the chain of
    :func:`scale_by_adam`, :func:`add_decayed_weights` and :func:`scale_by_learning_rate`, run
    in one pass (a fused kernel in eager mode). The state is that of :func:`scale_by_adam`,
    ``{"count": int64 tensor, "mu": tree, "nu": tree}`` with ``mu``/``nu`` shaped like the
    tree given to ``init``, and nothing else: initialise on the trainable part of a partition.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.adamw(0.1, weight_decay=0.1, mask=optim.decay_mask())
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> state = opt.init(params)
        >>> grads = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> updates, state = opt.update(grads, state, params)
        >>> updates["w"][0], updates["b"]  # -0.1 * (1 + 0.1 * 1), and no decay for the bias
        (tensor([-0.1100, -0.1100]), tensor([-0.1000, -0.1000]))
        >>> int(state["count"])
        1

    Args:
        lr: learning rate, a float or a schedule ``step -> lr`` (``step`` counts from 0).
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
        weight_decay: decoupled weight-decay coefficient (multiplied by ``lr``, as in PyTorch).
        mask: which leaves decay: ``None`` (all, like PyTorch), a glob, a list of globs, a
            predicate ``(path, leaf) -> bool`` such as :func:`decay_mask`, or a tree of bools.

    Returns:
        The transformation (with a ``fused_step`` for :func:`fnllm.optim.apply_gradients`).

    Raises:
        ValueError: a hyper-parameter is out of range.
    """
    where = "optim.adamw"  # checked under the name called, before the parts check again
    hyper, lr = _hyperparams(where, b1, b2, eps, weight_decay), _helpers.check_lr(where, lr)
    definition = chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(lr),
    )
    return _one_pass(where, definition, lr, hyper, mask)


def adam(
    lr: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adam (Kingma & Ba), matching ``torch.optim.Adam`` without weight decay.

    The chain of :func:`scale_by_adam` and :func:`scale_by_learning_rate`, run in one pass.

    Example:
        >>> import torch
        >>> from fnllm import optim
        >>> opt = optim.adam(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> updates, _ = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params), params)
        >>> updates["w"]  # the first step is -lr * sign(g)
        tensor([-0.1000,  0.1000])

    Args:
        lr: learning rate, a float or a schedule.
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.

    Returns:
        The transformation; its state is that of :func:`adamw`.
    """
    where = "optim.adam"
    hyper, lr = _hyperparams(where, b1, b2, eps), _helpers.check_lr(where, lr)
    definition = chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))
    return _one_pass(where, definition, lr, hyper, None)


# ----------------------------------------------------------------------------- implementation


def _one_pass(
    where: str,
    definition: GradientTransformation,
    lr: ScalarOrSchedule,
    hyper: _AdamHyperparams,
    mask: Mask,
) -> GradientTransformation:
    """``definition``, a chain ``scale_by_adam [-> add_decayed_weights] -> scale_by_learning_rate``
    (arguments checked by the caller under its own name, then by the parts), in one pass.

    Its state is the first part's: the decay and a float learning rate keep none, and a
    schedule's count is the Adam count.
    """
    wd = hyper.wd
    resolve = _helpers.make_mask(where, mask)

    def init(params: Tree) -> dict[str, Any]:
        state = definition.init(params)[0]  # the first part's; the others keep none
        leaves, spec = _helpers.flatten(params)
        if wd > 0.0 and leaves:
            # Resolve this closure's mask now, eagerly: a compiled update reuses it (make_mask).
            resolve(params, spec, leaves)
        return state

    def prepare(grads: Tree, state: Any, params: Tree | None, need_params: bool) -> _Step:
        s = _prepare(where, "grads", grads, state)
        if wd > 0.0 or need_params:
            if params is None:
                raise ValueError(f"{where}: update needs params when weight_decay > 0")
            s.params = _helpers.leaves_like(
                where, "params", params, s.spec, state["mu"], "the optimizer state"
            )
            _helpers.check_shapes(where, "params", s.params, s.mu, s.spec, "the optimizer state")
            if wd > 0.0:
                s.flags = resolve(params, s.spec, s.params)
        s.lr = _helpers.check_lr_value(where, lr(s.count) if callable(lr) else lr, s.count)
        return s

    def update(grads: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        s = prepare(grads, state, params, need_params=False)
        if not s.grads:
            return grads, _next_state(s, state["mu"], state["nu"])
        if _kernel_ok(s):
            u, m2, v2 = _updates_fused(s, hyper)
        else:
            u, m2, v2 = _updates_foreach(s, hyper)
        return _unflatten(s, u), _next_state(s, _unflatten(s, m2), _unflatten(s, v2))

    def fused_step(grads: Tree, state: Any, params: Tree, donate: bool) -> tuple[Tree, Any]:
        s = prepare(grads, state, params, need_params=True)
        if not s.grads or not _fused_ok(s):
            updates, new_state = update(grads, state, params)
            return apply_updates(params, updates), new_state
        assert s.params is not None
        if donate:
            p2, m2, v2 = list(s.params), list(s.mu), list(s.nu)
        else:
            p2, m2, v2 = _clone(s.params), _clone(s.mu), _clone(s.nu)
        _run_kernel(torch._fused_adamw_, p2, m2, v2, s, hyper, split_decay=True)
        return _unflatten(s, p2), _next_state(s, _unflatten(s, m2), _unflatten(s, v2))

    return GradientTransformation(init, update, fused_step)


class _AdamHyperparams(NamedTuple):
    b1: float
    b2: float
    eps: float
    wd: float


def _hyperparams(
    where: str, b1: float, b2: float, eps: float, weight_decay: float = 0.0
) -> _AdamHyperparams:
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= _checks.check_number(f"{where}: {name}", beta) < 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1), got {beta}")
    eps = _checks.check_number(f"{where}: eps", eps, nonnegative=True)
    wd = _checks.check_number(f"{where}: weight_decay", weight_decay, nonnegative=True)
    return _AdamHyperparams(float(b1), float(b2), float(eps), float(wd))


class _Step:
    """The flattened inputs of one update."""

    __slots__ = ("count", "flags", "grads", "lr", "mu", "nu", "params", "spec")

    def __init__(
        self,
        spec: tree.TreeSpec,
        grads: list[Tensor],
        mu: list[Tensor],
        nu: list[Tensor],
        count: Tensor,
    ) -> None:
        self.spec, self.grads, self.mu, self.nu, self.count = spec, grads, mu, nu, count
        self.params: list[Tensor] | None = None  # set where weight decay needs them
        self.flags: tuple[bool, ...] = (False,) * len(grads)  # which leaves decay
        self.lr: float | Tensor = 1.0  # this step's learning rate


def _init_fn(where: str) -> Callable[[Tree], dict[str, Any]]:
    """``init`` of :func:`scale_by_adam`: a zero count and zero moments shaped like ``params``."""

    def init(params: Tree) -> dict[str, Any]:
        leaves, spec = _helpers.flatten(params)
        for i, p in enumerate(leaves):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                path = tree.paths(params)[i]
                what = p.dtype if isinstance(p, Tensor) else type(p).__name__
                raise TypeError(f"{where}: init: leaf {path!r} is not a floating tensor ({what})")
        zeros = lambda: tree.unflatten_spec(spec, [torch.zeros_like(p) for p in leaves])
        return {"count": _helpers.new_count(leaves), "mu": zeros(), "nu": zeros()}

    return init


def _prepare(where: str, name: str, grads: Tree, state: Any) -> _Step:
    """Check ``state`` and ``grads`` (called ``name`` in messages) and flatten them."""
    _helpers.check_state_keys(where, state, ("count", "mu", "nu"))
    count = _helpers.check_count(where, state["count"])
    ml, spec = _helpers.flatten(state["mu"])
    gl = _helpers.leaves_like(where, name, grads, spec, state["mu"], "the optimizer state")
    _helpers.check_shapes(where, name, gl, ml, spec, "the optimizer state")
    vl = _helpers.leaves_like(where, "state['nu']", state["nu"], spec, state["mu"], "state['mu']")
    _helpers.check_shapes(where, "state['nu']", vl, ml, spec, "state['mu']")
    _helpers.check_finite_grads(where, name, gl, spec)
    return _Step(spec, gl, ml, vl, count)


def _unflatten(s: _Step, leaves: Sequence[Tensor]) -> Tree:
    return tree.unflatten_spec(s.spec, list(leaves))


def _next_state(s: _Step, mu: Tree, nu: Tree) -> dict[str, Any]:
    return {"count": s.count + 1, "mu": mu, "nu": nu}


def _moments(
    s: _Step, h: _AdamHyperparams
) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """The new moments, the denominator ``sqrt(v) / sqrt(1 - b2^t) + eps`` and ``1 - b1^t``.

    Traceable: every step-dependent scalar is a tensor.
    """
    t = (s.count + 1).to(torch.float32)
    bc1 = 1.0 - torch.pow(h.b1, t)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(h.b2, t))
    m2 = list(torch._foreach_lerp(s.mu, s.grads, 1.0 - h.b1))
    v2 = list(torch._foreach_mul(s.nu, h.b2))
    torch._foreach_addcmul_(v2, s.grads, s.grads, value=1.0 - h.b2)
    denom = list(torch._foreach_sqrt(v2))
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, h.eps)
    return m2, v2, denom, bc1


def _updates_foreach(
    s: _Step, h: _AdamHyperparams
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Pure multi-tensor formulation (what runs under ``torch.compile``)."""
    m2, v2, denom, bc1 = _moments(s, h)
    u = list(torch._foreach_div(m2, denom))
    torch._foreach_mul_(u, -s.lr / bc1)
    idx = [i for i, f in enumerate(s.flags) if f]
    if idx:
        # (Whole-list ops with a per-leaf coefficient list compiled to slower code on an H100.)
        assert s.params is not None
        decay = torch._foreach_mul([s.params[i] for i in idx], -s.lr * h.wd)
        torch._foreach_add_([u[i] for i in idx], decay)
    return u, m2, v2


def _updates_fused(
    s: _Step, h: _AdamHyperparams
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Eager formulation: the fused Adam kernel run on fresh buffers.

    The kernel adds ``-lr * adam_direction`` to its "parameter" argument in place; given a
    buffer holding ``-lr * wd * p`` (or zeros where nothing decays) that buffer becomes the
    update. The moments are updated in clones, so the caller's state is untouched.
    """
    m2, v2 = _clone(s.mu), _clone(s.nu)
    u = [torch.zeros_like(g) for g in s.grads]
    idx = [i for i, f in enumerate(s.flags) if f]
    if idx:
        assert s.params is not None
        for i, d in zip(idx, torch._foreach_mul([s.params[i] for i in idx], -s.lr * h.wd)):
            u[i] = d
    _run_kernel(torch._fused_adam_, u, m2, v2, s, h, split_decay=False)
    return u, m2, v2


def _run_kernel(
    kernel: Callable[..., None],
    target: list[Tensor],
    m2: list[Tensor],
    v2: list[Tensor],
    s: _Step,
    h: _AdamHyperparams,
    *,
    split_decay: bool,
) -> None:
    """Run a fused Adam(W) kernel, updating ``target``, ``m2`` and ``v2`` in place.

    One call per dtype; with ``split_decay``, one per dtype and decay flag (the leaves that
    decay get ``weight_decay=h.wd``, the others 0).
    """
    t = (s.count + 1).to(torch.float32)
    decays = (True, False) if split_decay else (False,)
    with torch.no_grad():
        for (device, _), idx in _groups(s.grads).items():
            for decay in decays:
                sel = [i for i in idx if s.flags[i] == decay] if split_decay else idx
                if not sel:
                    continue
                kernel(
                    [target[i] for i in sel],
                    [s.grads[i] for i in sel],
                    [m2[i] for i in sel],
                    [v2[i] for i in sel],
                    [],
                    [t.to(device)] * len(sel),
                    lr=_on(s.lr, device),
                    beta1=h.b1,
                    beta2=h.b2,
                    weight_decay=h.wd if decay else 0.0,
                    eps=h.eps,
                    amsgrad=False,
                    maximize=False,
                )


def _fused_ok(s: _Step) -> bool:
    """Eager, and every leaf's grad, moments (and param) share a supported device and dtype.

    Fake tensors (``fnllm.memory.plan``) take the kernel too, so that the plan counts the
    memory of the path a real step runs."""
    if _traced(s.grads[0], s.mu[0], s.count) or (s.params and _traced(s.params[0])):
        return False
    if isinstance(s.lr, Tensor) and _traced(s.lr):
        return False
    lists = [s.grads, s.mu, s.nu] if s.params is None else [s.grads, s.mu, s.nu, s.params]
    for xs in lists[1:]:
        if any(x.dtype is not g.dtype for x, g in zip(xs, s.grads)):
            return False
    devices = {x.device for xs in lists for x in xs}
    if len(devices) != 1 or next(iter(devices)).type not in _FUSED_DEVICES:
        return False  # several devices: the multi-tensor path handles any placement
    return all(g.dtype in _FUSED_DTYPES for g in s.grads)


def _traced(*tensors: object) -> bool:
    """:func:`fnllm._checks.tracing`, except that a fake tensor runs the kernel as a real one."""
    return _checks.tracing(*(t for t in tensors if not isinstance(t, FakeTensor)))


def _kernel_ok(s: _Step) -> bool:
    """Whether ``update`` runs the fused kernel: eager, on CPU (on CUDA foreach measured faster)."""
    return _fused_ok(s) and s.grads[0].device.type == "cpu"


def _groups(leaves: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Leaf indexes by (device, dtype); :func:`_fused_ok` ensured a single device."""
    device = leaves[0].device
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(leaves):
        out.setdefault((device, x.dtype), []).append(i)
    return out


def _clone(xs: Sequence[Tensor]) -> list[Tensor]:
    if hasattr(torch, "_foreach_clone"):
        return list(torch._foreach_clone(list(xs)))
    return list(torch._foreach_mul(list(xs), 1.0))  # exact copy on torch versions without it


def _on(lr: float | Tensor, device: torch.device) -> float | Tensor:
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float32)
    return float(lr)
