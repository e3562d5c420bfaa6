"""Adam and AdamW (decoupled weight decay), plus the usual weight-decay mask.

``update`` is computed with multi-tensor ``_foreach_*`` ops (under ``torch.compile`` Inductor
fuses them into a few kernels), or on CPU in eager mode with torch's fused kernel
(``torch._fused_adam_``) run on fresh buffers, whichever measured faster. Nothing the caller
passed is modified. :func:`fnllm.optim.step` runs ``torch._fused_adamw_`` in eager mode and
updates the parameters in the same kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnllm import _checks, tree
from fnllm.optim import _helpers
from fnllm.optim._helpers import Mask, Tree
from fnllm.optim.base import GradientTransformation, apply_updates
from fnllm.optim.transforms import ScalarOrSchedule

__all__ = ["NO_DECAY", "adam", "adamw", "decay_mask"]

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
    excluded = tree.filter_fn(list(exclude))

    def predicate(path: str, leaf: Tensor) -> bool:
        return leaf.ndim >= min_ndim and not excluded(path, leaf)

    return predicate


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
    (the decay term only on the leaves ``mask`` selects). The state is
    ``{"count": int64 tensor, "mu": tree, "nu": tree}`` with ``mu``/``nu`` shaped like the tree
    given to ``init``, and nothing else: initialise on the trainable part of a partition.

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
        The transformation (with a ``fused_step`` for :func:`fnllm.optim.step`).

    Raises:
        ValueError: a hyper-parameter is out of range.
    """
    return _adam("optim.adamw", lr, b1, b2, eps, weight_decay, mask)


def adam(
    lr: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adam (Kingma & Ba), matching ``torch.optim.Adam`` without weight decay.

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
    return _adam("optim.adam", lr, b1, b2, eps, 0.0, None)


# ----------------------------------------------------------------------------- implementation


def _adam(
    where: str,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Mask,
) -> GradientTransformation:
    if not callable(lr):
        lr = _checks.check_number(f"{where}: lr", lr, nonnegative=True)
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= _checks.check_number(f"{where}: {name}", beta) < 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1), got {beta}")
    eps = _checks.check_number(f"{where}: eps", eps, nonnegative=True)
    wd = _checks.check_number(f"{where}: weight_decay", weight_decay, nonnegative=True)
    resolve = _helpers.make_mask(where, mask)
    hyper = _Hyper(float(b1), float(b2), eps, wd)

    def init(params: Tree) -> dict[str, Any]:
        leaves, spec = _helpers.flatten(params)
        for i, p in enumerate(leaves):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                path = tree.paths(params)[i]
                what = p.dtype if isinstance(p, Tensor) else type(p).__name__
                raise TypeError(f"{where}: init: leaf {path!r} is not a floating tensor ({what})")
        if wd > 0.0 and leaves:
            resolve(params, spec, leaves)  # resolve the mask now, eagerly (see make_mask)
        zeros = lambda: tree.unflatten_spec(spec, [torch.zeros_like(p) for p in leaves])
        return {"count": _helpers.new_count(leaves), "mu": zeros(), "nu": zeros()}

    def prepare(grads: Tree, state: Any, params: Tree | None, need_params: bool) -> _Step:
        _helpers.check_state_keys(where, state, ("count", "mu", "nu"))
        count = _helpers.check_count(where, state["count"])
        ml, spec = _helpers.flatten(state["mu"])
        gl = _helpers.leaves_like(where, "grads", grads, spec, state["mu"], "the optimizer state")
        _helpers.check_shapes(where, "grads", gl, ml, spec, "the optimizer state")
        vl = _helpers.leaves_like(
            where, "state['nu']", state["nu"], spec, state["mu"], "state['mu']"
        )
        _helpers.check_shapes(where, "state['nu']", vl, ml, spec, "state['mu']")
        pl: list[Tensor] | None = None
        flags: tuple[bool, ...] = (False,) * len(gl)
        if wd > 0.0 or need_params:
            if params is None:
                raise ValueError(f"{where}: update needs params when weight_decay > 0")
            pl = _helpers.leaves_like(
                where, "params", params, spec, state["mu"], "the optimizer state"
            )
            _helpers.check_shapes(where, "params", pl, ml, spec, "the optimizer state")
            if wd > 0.0:
                flags = resolve(params, spec, pl)
        lr_t = lr(count) if callable(lr) else lr
        return _Step(spec, gl, ml, vl, pl, flags, count, lr_t)

    def update(grads: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        s = prepare(grads, state, params, need_params=False)
        if not s.grads:
            return grads, {"count": s.count + 1, "mu": state["mu"], "nu": state["nu"]}
        if _fused_ok(s) and s.grads[0].device.type == "cpu":  # measured: on CUDA foreach wins
            u, m2, v2 = _updates_fused(s, hyper)
        else:
            u, m2, v2 = _updates_foreach(s, hyper)
        unflat = lambda xs: tree.unflatten_spec(s.spec, list(xs))
        return unflat(u), {"count": s.count + 1, "mu": unflat(m2), "nu": unflat(v2)}

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
        t = (s.count + 1).to(torch.float32)
        with torch.no_grad():
            for (device, _), idx in _groups(s.grads).items():
                for decay in (True, False):
                    sel = [i for i in idx if s.flags[i] == decay]
                    if not sel:
                        continue
                    torch._fused_adamw_(
                        [p2[i] for i in sel],
                        [s.grads[i] for i in sel],
                        [m2[i] for i in sel],
                        [v2[i] for i in sel],
                        [],
                        [t.to(device)] * len(sel),
                        lr=_on(s.lr, device),
                        beta1=hyper.b1,
                        beta2=hyper.b2,
                        weight_decay=hyper.wd if decay else 0.0,
                        eps=hyper.eps,
                        amsgrad=False,
                        maximize=False,
                    )
        unflat = lambda xs: tree.unflatten_spec(s.spec, xs)
        return unflat(p2), {"count": s.count + 1, "mu": unflat(m2), "nu": unflat(v2)}

    return GradientTransformation(init, update, fused_step)


class _Hyper:
    __slots__ = ("b1", "b2", "eps", "wd")

    def __init__(self, b1: float, b2: float, eps: float, wd: float) -> None:
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd


class _Step:
    """The flattened inputs of one update."""

    __slots__ = ("count", "flags", "grads", "lr", "mu", "nu", "params", "spec")

    def __init__(
        self,
        spec: tree.TreeSpec,
        grads: list[Tensor],
        mu: list[Tensor],
        nu: list[Tensor],
        params: list[Tensor] | None,
        flags: tuple[bool, ...],
        count: Tensor,
        lr: float | Tensor,
    ) -> None:
        self.spec, self.grads, self.mu, self.nu, self.params = spec, grads, mu, nu, params
        self.flags, self.count, self.lr = flags, count, lr


def _updates_foreach(s: _Step, h: _Hyper) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Pure multi-tensor formulation (traceable: every step-dependent scalar is a tensor)."""
    t = (s.count + 1).to(torch.float32)
    bc1 = 1.0 - torch.pow(h.b1, t)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(h.b2, t))
    m2 = list(torch._foreach_lerp(s.mu, s.grads, 1.0 - h.b1))
    v2 = list(torch._foreach_mul(s.nu, h.b2))
    torch._foreach_addcmul_(v2, s.grads, s.grads, value=1.0 - h.b2)
    denom = torch._foreach_sqrt(v2)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, h.eps)
    u = list(torch._foreach_div(m2, denom))
    torch._foreach_mul_(u, -s.lr / bc1)
    idx = [i for i, f in enumerate(s.flags) if f]
    if idx:
        # (Whole-list ops with a per-leaf coefficient list compiled to slower code on an H100.)
        assert s.params is not None
        decay = torch._foreach_mul([s.params[i] for i in idx], -s.lr * h.wd)
        torch._foreach_add_([u[i] for i in idx], decay)
    return u, m2, v2


def _updates_fused(s: _Step, h: _Hyper) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
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
    t = (s.count + 1).to(torch.float32)
    with torch.no_grad():
        for (device, _), sel in _groups(s.grads).items():
            torch._fused_adam_(
                [u[i] for i in sel],
                [s.grads[i] for i in sel],
                [m2[i] for i in sel],
                [v2[i] for i in sel],
                [],
                [t.to(device)] * len(sel),
                lr=_on(s.lr, device),
                beta1=h.b1,
                beta2=h.b2,
                weight_decay=0.0,
                eps=h.eps,
                amsgrad=False,
                maximize=False,
            )
    return u, m2, v2


def _fused_ok(s: _Step) -> bool:
    """Eager, and every leaf's grad, moments (and param) share a supported device and dtype."""
    if _checks.tracing(s.grads[0], s.mu[0], s.count) or (s.params and _checks.tracing(s.params[0])):
        return False
    if isinstance(s.lr, Tensor) and _checks.tracing(s.lr):
        return False
    lists = [s.grads, s.mu, s.nu] if s.params is None else [s.grads, s.mu, s.nu, s.params]
    for xs in lists[1:]:
        if any(x.dtype is not g.dtype for x, g in zip(xs, s.grads)):
            return False
    devices = {x.device for xs in lists for x in xs}
    if len(devices) != 1 or next(iter(devices)).type not in _FUSED_DEVICES:
        return False  # several devices: the multi-tensor path handles any placement
    return all(g.dtype in _FUSED_DTYPES for g in s.grads)


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
