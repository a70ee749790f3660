"""Intercept the contraction of a module's kernel: how LoRA attaches to any NNX projection.

A projection is any module that holds a kernel (an ``nnx.Param`` of rank >= 2) and contracts it
with its input: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, or a model's own module that
calls ``jnp.einsum`` / ``jax.lax.dot_general`` / ``@`` on ``self.w``. Rather than patching those
Python functions (Qwix's route), the module's own ``__call__`` is traced once to a jaxpr with the
kernel as an explicit input, and the jaxpr is evaluated again with one change: at every
``dot_general`` that consumes the kernel, the LoRA term of the same contraction is added. Whatever
spelling the module uses, every contraction lowers to ``dot_general``, so nothing about the module
has to be known in advance; the kernel may be cast or transposed on its way there (tracked), any
other use of it is an error naming the primitive.

The LoRA term of a contraction ``y = x . W`` over the kernel's ``in_axes`` (contracted) and
``out_axes`` (free), with ``A`` [*in, r], ``B`` [r, *out] and coefficients ``c`` [r]::

    y += ((x . A) * c) . B        laid out exactly as y (the module's own output order)

Tracing happens while the enclosing function is traced (under ``jit``, ``grad`` or ``nnx.scan``),
so it costs compile time only; the compiled program is the module's plus two thin contractions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from flexora_jax.errors import ConfigError

#: Primitives that keep the kernel's layout (the kernel may pass through them before the contraction).
LAYOUT_PRIMITIVES = frozenset(
    {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reshard", "mesh_cast", "reduce_precision"}
)
#: Call primitives whose body is evaluated inline when the kernel enters them.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})

#: ``hook(operands, kernel_index, kernel_axes, dimension_numbers, out) -> out`` at each kernel contraction.
ContractionHook = Callable[[Sequence[jax.Array], int, tuple[int, ...], Any, jax.Array], jax.Array]


class ContractionError(ConfigError):
    """A module's kernel is used in a way LoRA cannot follow (not a contraction, or a batched one)."""


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def call_intercepted(
    module: nnx.Module,
    call: Callable[..., Any],
    kernel: str,
    args: tuple,
    kwargs: dict,
    hook: ContractionHook,
    path: str,
) -> Any:
    """``call(module, *args, **kwargs)`` with ``hook`` applied at every contraction of ``module.<kernel>``.

    The module is split, traced with the kernel as the jaxpr's first input (a copy is merged inside the
    trace, so the module itself is never mutated) and the jaxpr is re-evaluated by :func:`eval_jaxpr`.
    """
    graphdef, kernel_state, rest = nnx.split(module, lambda p, _: p == (kernel,), ...)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def pure(k_state, rest_state, dyn):
        filled = list(leaves)
        for i, value in zip(dynamic, dyn):
            filled[i] = value
        a, kw = jax.tree.unflatten(treedef, filled)
        return call(nnx.merge(graphdef, k_state, rest_state), *a, **kw)

    inputs = (kernel_state, rest, [leaves[i] for i in dynamic])
    closed, out_shape = jax.make_jaxpr(pure, return_shape=True)(*inputs)
    kernel_var = closed.jaxpr.invars[0]
    outs = eval_jaxpr(
        closed.jaxpr,
        closed.consts,
        jax.tree.leaves(inputs),
        {kernel_var: tuple(range(kernel_var.aval.ndim))},
        hook,
        path,
    )
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def eval_jaxpr(
    jaxpr: jcore.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    kernel_axes: dict[Any, tuple[int, ...]],
    hook: ContractionHook,
    path: str,
) -> list[Any]:
    """Evaluate ``jaxpr`` like ``jax.core.eval_jaxpr``, calling ``hook`` where a kernel value is contracted.

    ``kernel_axes`` maps each jaxpr variable that holds the kernel (possibly cast or transposed) to the
    original kernel axis of each of its dimensions.
    """
    env: dict[Any, Any] = {}
    axes = dict(kernel_axes)

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        hits = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in axes]
        name = eqn.primitive.name
        if hits and name in CALL_PRIMITIVES:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
            inner_axes = {inner_jaxpr.invars[i]: axes[eqn.invars[i]] for i in hits}
            env.update(zip(eqn.outvars, eval_jaxpr(inner_jaxpr, inner_consts, invals, inner_axes, hook, path)))
            continue
        if hits and name not in LAYOUT_PRIMITIVES | {"transpose", "dot_general"}:
            raise ContractionError(
                f"module {path!r}: its kernel enters `{name}` on the way to its contraction; LoRA can follow "
                "a kernel that is cast or transposed and then contracted by dot_general (jnp.einsum, "
                "jax.lax.dot_general, @), nothing else"
            )
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not hits:
            env.update(zip(eqn.outvars, out) if eqn.primitive.multiple_results else [(eqn.outvars[0], out)])
            continue
        source = axes[eqn.invars[hits[0]]]
        if name == "dot_general":
            if len(hits) > 1:
                raise ContractionError(f"module {path!r} contracts its kernel with itself; LoRA needs kernel x input")
            out = hook(invals, hits[0], source, eqn.params["dimension_numbers"], out)
        elif name == "transpose":
            axes[eqn.outvars[0]] = tuple(source[i] for i in eqn.params["permutation"])
        else:
            axes[eqn.outvars[0]] = source
        env[eqn.outvars[0]] = out
    return [read(v) for v in jaxpr.outvars]


def split_dimensions(
    kernel_index: int, kernel_axes: tuple[int, ...], dimension_numbers: Any, path: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(contracted kernel axes, free kernel axes in output order, the input's contracted dims) of one dot_general."""
    (lc, rc), (lb, rb) = dimension_numbers
    k_contract, x_contract = (rc, lc) if kernel_index == 1 else (lc, rc)
    if lb or rb:
        raise ContractionError(
            f"module {path!r} contracts its kernel with batch dimensions {tuple(rb or lb)}; "
            "LoRA supports kernels contracted over input features only"
        )
    contracted = tuple(kernel_axes[j] for j in k_contract)
    free = tuple(kernel_axes[j] for j in range(len(kernel_axes)) if j not in k_contract)
    return contracted, free, tuple(x_contract)


def lora_contraction(
    operands: Sequence[jax.Array],
    kernel_index: int,
    kernel_axes: tuple[int, ...],
    dimension_numbers: Any,
    out: jax.Array,
    a: jax.Array,
    b: jax.Array,
    coeff: jax.Array,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    path: str,
) -> jax.Array:
    """``out`` plus the LoRA term of the same contraction, in ``out``'s layout.

    ``a`` [*kernel dims at in_axes, r], ``b`` [r, *kernel dims at out_axes], ``coeff`` [r] (scale x gates).
    """
    contracted, free, x_contract = split_dimensions(kernel_index, kernel_axes, dimension_numbers, path)
    if sorted(contracted) != list(in_axes):
        raise ContractionError(
            f"module {path!r} contracts kernel axes {tuple(sorted(contracted))}, but its LoRA "
            f"was built for input axes {in_axes}"
        )
    x = operands[1 - kernel_index]
    dt = x.dtype
    a_dims = tuple(in_axes.index(ax) for ax in contracted)
    down = jax.lax.dot_general(x, a.astype(dt), ((x_contract, a_dims), ((), ())))  # [x free..., r]
    down = down * coeff.astype(dt)
    delta = jax.lax.dot_general(down, b.astype(dt), (((down.ndim - 1,), (0,)), ((), ())))  # [x free..., *out]
    n_x = down.ndim - 1
    order = [n_x + out_axes.index(ax) for ax in free]
    perm = (*order, *range(n_x)) if kernel_index == 0 else (*range(n_x), *order)
    return out + jnp.transpose(delta, perm).astype(out.dtype)
