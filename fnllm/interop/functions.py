"""Functions across PyTorch and JAX: fnllm functions under JAX transforms, and the reverse.

:func:`as_jax` runs a PyTorch function inside JAX through ``jax.pure_callback`` and gives it a
``jax.custom_vjp`` whose backward pass is PyTorch's own (``torch.func``). For a function
with one scalar float output (a loss), the forward pass used by ``jax.grad`` computes value
and gradient in a single ``torch.func.grad_and_value`` call and the backward pass only scales
that gradient, so ``jax.grad(as_jax(loss))`` costs one PyTorch forward and backward. Other
outputs get a ``torch.func.vjp`` in the backward pass (which runs the forward again).
Under ``jax.vmap`` the callback receives the batch and maps the function with
``torch.func.vmap``, so per-example gradients batch too.

:func:`as_torch` runs a JAX function inside PyTorch as a ``torch.autograd.Function`` whose
backward calls ``jax.vjp``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fnllm.interop import _common
from fnllm.interop.arrays import from_jax, to_jax

__all__ = ["as_jax", "as_torch"]


def as_jax(
    fn: Callable[..., Any], *, argnums: int | Sequence[int] | None = None
) -> Callable[..., Any]:
    """Wrap a pure PyTorch function of tensor trees as a JAX function with gradients.

    The wrapped function takes trees of JAX arrays where ``fn`` takes trees of tensors, and
    returns ``fn``'s tree of outputs as JAX arrays. It works under ``jax.grad``,
    ``jax.value_and_grad``, ``jax.vjp``, ``jax.jit`` and ``jax.vmap`` (nested too), and on
    concrete arrays without any transform. Gradients flow to every floating-point input, or
    only to those in the positional arguments ``argnums`` names; the others get zero
    cotangents without PyTorch computing them, and integer inputs (token ids) get JAX's
    ``float0`` zero cotangent.

    Example:
        >>> import jax, jax.numpy as jnp, torch
        >>> from fnllm import interop
        >>> def loss(params, x):
        ...     return ((x @ params["w"]) ** 2).sum()
        >>> jloss = interop.as_jax(loss)
        >>> params, x = {"w": jnp.ones((3, 2))}, jnp.arange(6.0).reshape(2, 3)
        >>> float(jloss(params, x))
        306.0
        >>> jax.jit(jax.grad(jloss))(params, x)["w"].tolist()
        [[72.0, 72.0], [102.0, 102.0], [132.0, 132.0]]

    A frozen half of the parameters passed as its own argument costs no gradient work when
    ``argnums`` leaves it out (``jax.grad(..., argnums=0)`` alone would still let PyTorch
    compute and then drop its gradient):

        >>> def split_loss(trainable, frozen, x):
        ...     return ((x @ frozen["w"] @ trainable["v"]) ** 2).sum()
        >>> jsplit = interop.as_jax(split_loss, argnums=0)
        >>> g = jax.grad(jsplit)({"v": jnp.ones((2, 1))}, params, x)
        >>> g["v"].tolist()
        [[612.0], [612.0]]

    Limits: ``fn`` must be pure (JAX may call it again or not at all) and its output shapes
    must depend only on its input shapes; higher-order derivatives (``jax.grad`` of
    ``jax.grad``) and forward mode (``jax.jvp``, ``jax.jacfwd``) are not supported. 64-bit
    inputs need ``jax_enable_x64``; integer ids may be int32 in JAX. Without
    ``jax_enable_x64``, int64 numpy arrays and Python ints are passed as int32 when every value
    fits and refused when one does not (JAX alone would wrap ``2**40`` to 0).

    Args:
        fn: a PyTorch function whose positional arguments are trees (dict/list/tuple) of
            tensors and whose result is a tree of tensors. It must compose with
            ``torch.func.grad``/``vjp`` (and ``torch.func.vmap`` for ``jax.vmap``).
        argnums: the positional arguments that get gradients, like ``jax.grad``'s (an index
            or a sequence of them); ``None`` (default) means every argument.

    Returns:
        The JAX function. Output shapes are found once per input signature by running ``fn``
        on meta tensors (or, if that fails, on zeros).

    Raises:
        TypeError: ``argnums`` is not an int or a sequence of ints.
        TypeError: (when called) an argument leaf is not an array, or ``fn`` returns a
            non-tensor leaf; the message names the path.
        ValueError: (when called) ``argnums`` names an argument the call does not pass.
        ValueError: (when called) an int64 argument holds a value outside int32 while
            ``jax_enable_x64`` is off; ``fn``'s output shapes depend on the input values (found
            when it is first called for a signature, by running it on zeros and on ones).
        ValueError: (when called) ``fn`` returned a shape or dtype other than the one found
            for this signature (data-dependent shapes cannot run under ``jit``); under
            ``jit`` JAX re-raises it as a ``JaxRuntimeError`` quoting this message.
    """
    if not callable(fn):
        raise TypeError(f"as_jax: fn must be a function of tensor trees, got {type(fn).__name__}")
    wanted = _argnums(argnums)
    jax = _common.jax()
    name = getattr(fn, "__name__", "fn")
    cache: dict[Any, Callable[..., Any]] = {}

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        if wanted is not None and wanted and max(wanted) >= len(args):
            raise ValueError(
                f"{name}: argnums={argnums} names argument {max(wanted)}, but the call passes "
                f"{len(args)} positional argument(s)"
            )
        leaves, treedef, positions = _jax_leaves(jax, args, name)
        chosen = tuple(wanted is None or p in wanted for p in positions)
        signature = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), chosen)
        call = cache.get(signature)
        if call is None:
            call = cache[signature] = _build(jax, fn, name, treedef, signature[1], chosen)
        return call(*leaves)

    return wrapped


def as_torch(jax_fn: Callable[..., Any], *, jit: bool = True) -> Callable[..., Any]:
    """Wrap a JAX function of array trees as a PyTorch function with autograd.

    The wrapped function takes trees of tensors where ``jax_fn`` takes trees of JAX arrays
    (they cross through DLPack, see :func:`to_jax`) and returns tensors. Its backward pass
    calls ``jax.vjp``, so ``loss.backward()``, ``torch.autograd.grad`` and
    ``torch.func.grad`` / ``torch.func.vjp`` work; floating-point outputs are differentiable,
    integer outputs are not.

    Example:
        >>> import jax.numpy as jnp, torch
        >>> from fnllm import interop
        >>> f = interop.as_torch(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2))
        >>> w = torch.tensor([0.5, 1.0])
        >>> g = torch.func.grad(lambda w: f({"w": w}))(w)
        >>> torch.allclose(g, torch.sin(2 * w))
        True

    Limits: the backward pass runs ``jax.vjp`` and so runs ``jax_fn`` forward again; it
    cannot be differentiated again (no double backward). ``torch.func.vmap`` and
    ``torch.compile`` do not see inside JAX: use ``jax.vmap`` inside ``jax_fn`` instead, and
    expect a graph break under ``torch.compile``. Int64 tensors need ``jax_enable_x64``.

    Args:
        jax_fn: a JAX function of positional array trees returning a tree of arrays.
        jit: compile ``jax_fn`` and its vjp with ``jax.jit`` (once per input signature).

    Returns:
        The PyTorch function.

    Raises:
        TypeError: (when called) an argument leaf is not a tensor or has a dtype that cannot
            cross to JAX (the message names the path).
    """
    if not callable(jax_fn):
        raise TypeError(f"as_torch: jax_fn must be a JAX function, got {type(jax_fn).__name__}")
    jax = _common.jax()

    def pullback(args: tuple[Any, ...], cts: Any) -> Any:
        return jax.vjp(jax_fn, *args)[1](cts)

    forward = jax.jit(jax_fn) if jit else jax_fn
    backward = jax.jit(pullback) if jit else pullback
    name = getattr(jax_fn, "__name__", "jax_fn")

    @functools.wraps(jax_fn)
    def wrapped(*args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
        for path, x in leaves:
            if not isinstance(x, Tensor):
                where = _arg_path(path)
                raise TypeError(f"{name}: argument {where} is a {type(x).__name__}, not a tensor")
        box = _Box(jax, treedef, forward, backward)
        outs = _JaxFunction.apply(box, *(x for _, x in leaves))
        return jax.tree_util.tree_unflatten(box.out_treedef, outs)

    return wrapped


# ----------------------------------------------------------------------------------------------
# as_jax internals


def _argnums(argnums: int | Sequence[int] | None) -> frozenset[int] | None:
    """``as_jax``'s ``argnums`` as a set of non-negative argument positions."""
    if argnums is None:
        return None
    items = (argnums,) if isinstance(argnums, int) else argnums
    if isinstance(argnums, (str, bytes)) or not isinstance(items, (tuple, list)):
        raise TypeError(f"as_jax: argnums must be an int or a sequence of ints, got {argnums!r}")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise TypeError(
                f"as_jax: argnums must hold non-negative ints (argument positions), got {i!r}"
            )
    return frozenset(items)


def _jax_leaves(jax: Any, args: tuple[Any, ...], name: str) -> tuple[list[Any], Any, list[int]]:
    """Flatten JAX arguments, turning numbers into arrays and naming bad leaves; also return
    the positional argument each leaf belongs to."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(args)
    leaves = []
    positions = [path[0].idx for path, _ in pairs]
    x64 = _common.x64_enabled()
    for path, x in pairs:
        if isinstance(x, (bool, int, float, np.number)) and not isinstance(x, jax.Array):
            if not x64 and isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                x = _narrow_int(name, path, np.asarray(x))
            x = jax.numpy.asarray(x)
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name}: argument {_arg_path(path)} is a {type(x).__name__}, not an array"
            )
        if not x64 and isinstance(x, np.ndarray) and x.dtype.kind in "iu":
            x = _narrow_int(name, path, x)
        leaves.append(x)
    return leaves, treedef, positions


def _narrow_int(name: str, path: Any, x: np.ndarray) -> np.ndarray:
    """A 64-bit integer array as the 32-bit one JAX would make without ``jax_enable_x64``,
    after checking every value fits (JAX itself would wrap 2**40 to 0 without a word)."""
    if x.dtype.itemsize <= 4:
        return x
    target = np.dtype(np.int32 if x.dtype.kind == "i" else np.uint32)
    info = np.iinfo(target)
    if x.size and (x.min() < info.min or x.max() > info.max):
        bad = x.min() if x.min() < info.min else x.max()
        raise ValueError(
            f"{name}: argument {_arg_path(path)} holds {int(bad)}, which does not fit {target} "
            "(JAX keeps 64-bit integers only with jax_enable_x64, and would wrap it silently); "
            'call jax.config.update("jax_enable_x64", True) or pass smaller values'
        )
    return x.astype(target)


def _build(
    jax: Any,
    fn: Callable[..., Any],
    name: str,
    treedef: Any,
    avals: Sequence[tuple],
    chosen: Sequence[bool],
) -> Callable[..., Any]:
    """Make the ``custom_vjp`` function for one input signature; gradients flow to the
    floating leaves marked in ``chosen``."""
    in_dtypes = [_common.torch_dtype(name, f"input leaf {i}", d) for i, (_, d) in enumerate(avals)]
    in_shapes = [s for s, _ in avals]
    diff = [i for i, d in enumerate(in_dtypes) if d.is_floating_point and chosen[i]]
    # floating leaves outside argnums: a zero cotangent, never computed by PyTorch
    still = [i for i, d in enumerate(in_dtypes) if d.is_floating_point and not chosen[i]]

    def flat_fn(*tensors: Tensor) -> list[Tensor]:
        out = fn(*jax.tree_util.tree_unflatten(treedef, list(tensors)))
        return _torch_out_leaves(jax, out, name)[0]

    out_treedef, out_specs = _infer_outputs(jax, fn, name, treedef, in_shapes, in_dtypes)
    out_avals = [jax.ShapeDtypeStruct(s, _jax_dtype(jax, d)) for s, d in out_specs]
    diff_avals = [jax.ShapeDtypeStruct(in_shapes[i], avals[i][1]) for i in diff]
    out_ndims = [len(s) for s, _ in out_specs]
    scalar = len(out_specs) == 1 and out_specs[0][0] == () and out_specs[0][1].is_floating_point
    out_diff = [k for k, (_, d) in enumerate(out_specs) if d.is_floating_point]
    ndims = [len(s) for s in in_shapes]

    def run(*arrays: Any) -> list[Any]:
        outs = _batched(flat_fn, ndims, [_to_torch(a) for a in arrays])
        _check_outputs(name, outs, out_specs, arrays, ndims)
        return [_to_result(jax, o) for o in outs]

    def value_and_grad(*tensors: Tensor) -> list[Tensor]:
        def loss(*d: Tensor) -> Tensor:
            full = list(tensors)
            for i, t in zip(diff, d):
                full[i] = t
            return flat_fn(*full)[0]

        grads, value = torch.func.grad_and_value(loss, argnums=tuple(range(len(diff))))(
            *(tensors[i] for i in diff)
        )
        return [value, *grads]

    def run_value_and_grad(*arrays: Any) -> list[Any]:
        outs = _batched(value_and_grad, ndims, [_to_torch(a) for a in arrays])
        _check_outputs(name, outs[:1], out_specs, arrays, ndims)
        return [_to_result(jax, o) for o in outs]

    n_in = len(in_shapes)

    def pullback(*tensors: Tensor) -> list[Tensor]:
        primals, cts = tensors[:n_in], tensors[n_in:]

        def of_diff(*d: Tensor) -> list[Tensor]:
            full = list(primals)
            for i, t in zip(diff, d):
                full[i] = t
            outs = flat_fn(*full)
            return [outs[k] for k in out_diff]

        # torch's stub returns a 2- or 3-tuple (has_aux); without has_aux it is always 2
        _, vjp = torch.func.vjp(of_diff, *(primals[i] for i in diff))  # type: ignore[misc]
        return list(vjp(list(cts)))

    def run_vjp(*arrays: Any) -> list[Any]:
        nd = ndims + [out_ndims[k] for k in out_diff]
        outs = _batched(pullback, nd, [_to_torch(a) for a in arrays])
        return [_to_result(jax, o) for o in outs]

    def callback(f: Callable[..., Any], result: Any, *args: Any) -> Any:
        return jax.pure_callback(f, result, *args, vmap_method="expand_dims")

    @jax.custom_vjp
    def call(*leaves: Any) -> list[Any]:
        return callback(run, out_avals, *leaves)

    def call_fwd(*leaves: Any) -> tuple[list[Any], Any]:
        if scalar and diff:
            value, *grads = callback(run_value_and_grad, [out_avals[0], *diff_avals], *leaves)
            return [value], (True, grads, leaves)
        return callback(run, out_avals, *leaves), (False, None, leaves)

    def call_bwd(res: Any, cts: list[Any]) -> tuple[Any, ...]:
        is_scalar, grads, leaves = res
        if is_scalar:
            grads = [(g * cts[0]).astype(g.dtype) for g in grads]
        elif not out_diff or not diff:  # integer outputs only, or no input asks: none flows
            grads = [jax.numpy.zeros(a.shape, a.dtype) for a in diff_avals]
        else:
            grads = callback(run_vjp, diff_avals, *leaves, *(cts[k] for k in out_diff))
        out: list[Any] = [np.zeros(np.shape(x), dtype=jax.dtypes.float0) for x in leaves]
        for i, g in zip(diff, grads):
            out[i] = g
        for i in still:
            out[i] = jax.numpy.zeros(np.shape(leaves[i]), leaves[i].dtype)
        return tuple(out)

    call.defvjp(call_fwd, call_bwd)

    def apply(*leaves: Any) -> Any:
        return jax.tree_util.tree_unflatten(out_treedef, call(*leaves))

    return apply


def _infer_outputs(
    jax: Any,
    fn: Callable[..., Any],
    name: str,
    treedef: Any,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[torch.dtype],
) -> tuple[Any, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Run ``fn`` once on meta tensors (zeros if that fails) to learn its output tree."""
    try:
        args = [torch.empty(s, dtype=d, device="meta") for s, d in zip(shapes, dtypes)]
        out = fn(*jax.tree_util.tree_unflatten(treedef, args))
    except Exception:
        # no meta kernel (or a data-dependent op): run on zeros, and on ones to catch output
        # shapes that depend on the values (JAX would skip a callback whose output is empty)
        specs = []
        for fill in (torch.zeros, torch.ones):
            args = [fill(s, dtype=d) for s, d in zip(shapes, dtypes)]
            out = fn(*jax.tree_util.tree_unflatten(treedef, args))
            leaves, out_treedef = _torch_out_leaves(jax, out, name)
            specs.append([(tuple(t.shape), t.dtype) for t in leaves])
        if specs[0] != specs[1]:
            raise ValueError(
                f"{name}: output shapes depend on the input values ({_specs(specs[0])} for "
                f"zeros, {_specs(specs[1])} for ones); as_jax needs output shapes that depend "
                "only on input shapes (data-dependent shapes cannot run under jit)"
            ) from None
        return out_treedef, specs[0]
    leaves, out_treedef = _torch_out_leaves(jax, out, name)
    return out_treedef, [(tuple(t.shape), t.dtype) for t in leaves]


def _specs(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{list(s)}" for s, _ in specs)


def _torch_out_leaves(jax: Any, out: Any, name: str) -> tuple[list[Tensor], Any]:
    pairs, treedef = jax.tree_util.tree_flatten_with_path(out)
    for path, x in pairs:
        if not isinstance(x, Tensor):
            where = _common.keystr(path) or "<root>"
            raise TypeError(
                f"{name}: returned a {type(x).__name__} at output {where!r}; as_jax needs a "
                "tree (dict/list/tuple) of tensors"
            )
        where = _common.keystr(path) or "<root>"
        _common.check_dtype(name, f"output {where!r}", x.dtype)
    return [x for _, x in pairs], treedef


def _batched(f: Callable[..., list[Tensor]], ndims: Sequence[int], xs: list[Tensor]) -> Any:
    """Call ``f`` on per-example tensors, mapping any leading batch dims with ``torch.func.vmap``.

    Under ``jax.vmap`` (``vmap_method="expand_dims"``) every argument gains one leading dim
    per vmap level: the batch size where the argument is batched, 1 where it is not.
    """
    if not xs or xs[0].dim() == ndims[0]:
        return f(*xs)
    size = max(x.shape[0] for x in xs)
    in_dims = tuple(0 if x.shape[0] == size else None for x in xs)
    xs = [x if d == 0 else x[0] for x, d in zip(xs, in_dims)]

    def inner(*ys: Tensor) -> list[Tensor]:
        return _batched(f, ndims, list(ys))

    return list(torch.func.vmap(inner, in_dims=in_dims)(*xs))


def _check_outputs(
    name: str,
    outs: Sequence[Tensor],
    specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
    arrays: Sequence[Any],
    ndims: Sequence[int],
) -> None:
    """Raise a ValueError when ``fn`` returned other shapes or dtypes than the signature's."""
    extra = np.ndim(arrays[0]) - ndims[0] if arrays else 0
    if len(outs) != len(specs):
        raise ValueError(f"{name}: returned {len(outs)} outputs, expected {len(specs)}")
    for k, (o, (shape, dtype)) in enumerate(zip(outs, specs)):
        if tuple(o.shape[extra:]) != shape or o.dtype != dtype:
            raise ValueError(
                f"{name}: output {k} changed from {dtype}{list(shape)} to "
                f"{o.dtype}{list(o.shape[extra:])} between calls; output shapes must depend "
                "only on input shapes"
            )


def _to_torch(a: Any) -> Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a, copy=not a.flags.writeable))
    return torch.from_dlpack(a)


def _to_result(jax: Any, t: Tensor) -> Any:
    """A callback result as a numpy view of the tensor (JAX copies it into its own buffer)."""
    t = t.detach().contiguous()
    if t.dtype in _NUMPY_NATIVE:
        return t.numpy()
    # bfloat16 and float8: reinterpret the bytes with the ml_dtypes type JAX uses
    bits = t.view(_SAME_WIDTH_INT[t.element_size()]).numpy()
    return bits.view(jax.numpy.dtype(_common.DTYPES[t.dtype]))


_NUMPY_NATIVE = frozenset(
    d for d in _common.DTYPES if d not in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16}


def _jax_dtype(jax: Any, dtype: torch.dtype) -> Any:
    return jax.numpy.dtype(_common.DTYPES[dtype])


def _arg_path(path: tuple[Any, ...]) -> str:
    """``args[1]['w']``-style path of an argument leaf, as a dotted ``1.w``."""
    return repr(_common.keystr(path))


# ----------------------------------------------------------------------------------------------
# as_torch internals


class _Box:
    """Carries the JAX side of one ``as_torch`` call through ``torch.autograd.Function``."""

    def __init__(self, jax: Any, treedef: Any, forward: Callable, backward: Callable) -> None:
        self.jax, self.treedef, self.forward, self.backward = jax, treedef, forward, backward
        self.out_treedef: Any = None
        self.outs: list[Tensor] = []  # meta tensors: the outputs' shapes and dtypes


class _JaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(box: _Box, *leaves: Tensor) -> tuple[Tensor, ...]:
        jax = box.jax
        args = jax.tree_util.tree_unflatten(box.treedef, list(to_jax(list(leaves))))
        out = box.forward(*args)
        outs, box.out_treedef = jax.tree_util.tree_flatten(out)
        tensors = tuple(from_jax(list(outs)))
        box.outs = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
        # a fresh tensor per output: autograd must own what it returns
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        box, *leaves = inputs
        ctx.box = box
        ctx.save_for_backward(*leaves)
        ctx.mark_non_differentiable(*(o for o in output if not o.is_floating_point()))

    @staticmethod
    def backward(ctx: Any, *cts: Tensor) -> tuple[Any, ...]:
        # Under torch.func the cotangents arrive wrapped; a second Function's forward
        # receives them (and the primals) unwrapped, as plain tensors DLPack can read.
        leaves = ctx.saved_tensors
        grads = _JaxPullback.apply(ctx.box, len(leaves), *leaves, *cts)
        return (None, *grads)


class _JaxPullback(torch.autograd.Function):
    @staticmethod
    def forward(box: _Box, n: int, *tensors: Tensor | None) -> tuple[Any, ...]:
        jax = box.jax
        leaves, cts = tensors[:n], tensors[n:]
        args = jax.tree_util.tree_unflatten(box.treedef, to_jax(list(leaves)))
        jcts = []
        for ct, spec in zip(cts, box.outs):
            if not spec.is_floating_point():
                jcts.append(np.zeros(tuple(spec.shape), dtype=jax.dtypes.float0))
            elif ct is None:
                jcts.append(to_jax(torch.zeros_like(spec)))
            else:
                jcts.append(to_jax(ct.to(spec.dtype).contiguous()))
        grads = box.backward(tuple(args), jax.tree_util.tree_unflatten(box.out_treedef, jcts))
        flat = jax.tree_util.tree_leaves(grads)
        # float0 cotangents of integer inputs are dropped from the leaves; refill with None
        out: list[Any] = []
        for x, g in zip(leaves, flat):  # one cotangent per input leaf (float0 for integers)
            keep = x is not None and x.is_floating_point() and str(g.dtype) != "float0"
            out.append(from_jax(g).clone() if keep else None)
        return tuple(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        raise RuntimeError("as_torch: the backward pass of a JAX function cannot be differentiated")
