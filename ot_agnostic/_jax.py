"""JAX arrays under ``jax.grad``: the Sinkhorn losses as one ``jax.custom_vjp``.

JAX differentiates by tracing: inside ``jax.grad`` the arrays are tracers. The Sinkhorn
losses are not traced (that would differentiate through the eps-scaling loop, which the
design forbids, and cost its memory): :func:`traced_sinkhorn` wraps the solver in one
``jax.custom_vjp`` whose forward pass runs the usual solver on the concrete values of the
tracers (an eager ``jax.grad`` has them) and keeps the envelope gradients of
``SinkhornResult.gradient()`` (the final Sinkhorn update, as for torch autograd); its backward
pass multiplies them by the cotangent of the value. The closed-form losses (kernel norms, soft
Hausdorff divergence) need none of this: JAX traces their pure Array API computation.

Abstract tracers (``jax.jit``, ``jax.vmap``, a second derivative) have no values to run the
solver on: :func:`concrete` raises a clear error for them. This module imports JAX only
inside its functions, which run once JAX tracers reach a public function (JAX is then
imported already), and nothing from the package: ``_array_api`` imports it.
"""

from __future__ import annotations

import dataclasses
import sys


def is_jax_tracer(x) -> bool:
    """True for a JAX tracer (an array inside ``jax.grad``, ``jax.jit``, ``jax.vmap``).

    Never imports JAX: without ``jax`` in ``sys.modules`` there is no tracer.
    """
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def any_tracer(*arrays) -> bool:
    """True when one of ``arrays`` is a JAX tracer (``None`` entries are skipped)."""
    return any(is_jax_tracer(arr) for arr in arrays if arr is not None)


def abstract_tracer_error(arrays, what: str = "ot_agnostic") -> Exception:
    """The error for arrays without concrete values: what to do under jit, vmap, grad of grad."""
    kinds = {type(arr).__name__ for arr in arrays if is_jax_tracer(arr)}
    if kinds & {"JVPTracer", "LinearizeTracer"}:
        return NotImplementedError(
            f"{what} on JAX arrays: one jax.grad / jax.value_and_grad / jax.vjp is supported, "
            "not jax.grad of jax.grad (nor jax.hessian): ot_agnostic computes first derivatives "
            "only. The Sinkhorn losses' gradients come from the final Sinkhorn update (envelope "
            "theorem), whose own derivative is not the loss's. Use finite differences of the "
            "gradient instead."
        )
    hint = (
        "for a batch, pass (B, N, D) arrays instead of jax.vmap"
        if "BatchTracer" in kinds else
        "call it outside jax.jit (eager jax.grad / jax.value_and_grad work: the gradients are "
        "the envelope-theorem ones), and jit the code before and after the call, not the call"
    )
    return NotImplementedError(
        f"{what} needs concrete JAX arrays, but got abstract tracers ({', '.join(sorted(kinds))}): "
        "jax.jit and jax.vmap are not supported (the solver picks its eps schedule, backend and "
        f"checks from the values, on the host; no jax.pure_callback is provided). Instead, {hint}."
    )


def concrete(arr, what: str = "ot_agnostic"):
    """The value of a JAX tracer inside an eager ``jax.grad`` (``arr`` itself if it is none),
    or the clear error of :func:`abstract_tracer_error` for an abstract tracer."""
    if arr is None or not is_jax_tracer(arr):
        return arr
    value = sys.modules["jax"].lax.stop_gradient(arr)
    if is_jax_tracer(value):  # what is left once the outermost grad is cut tells why
        raise abstract_tracer_error([value], what)
    return value


def check_concrete(*arrays, what: str = "ot_agnostic") -> None:
    """Raise :func:`abstract_tracer_error` unless every JAX tracer among ``arrays`` has a value."""
    for arr in arrays:
        concrete(arr, what)


def traced_sinkhorn(run, x, y, a, b):
    """``run(x, y, a, b)`` (a :class:`~ot_agnostic.sinkhorn.SinkhornResult` on concrete arrays)
    with its ``value`` differentiable under ``jax.grad`` with respect to the traced arrays.

    The forward pass runs the solver once on the tracers' values; the backward pass returns
    ``cotangent * gradient`` with the envelope gradients of ``result.gradient()``. The other
    fields of the result are concrete arrays (the potentials do not carry gradients).
    """
    import jax

    arrays = (x, y, a, b)
    traced = [i for i, arr in enumerate(arrays) if is_jax_tracer(arr)]
    check_concrete(*arrays, what="sinkhorn")
    solved = []

    def solve(*values):
        if any_tracer(*values):  # a second derivative: the primals are tracers themselves
            raise abstract_tracer_error(values, "sinkhorn")
        full = list(arrays)
        for i, v in zip(traced, values):
            full[i] = v
        result = run(*full)
        solved.append(result)
        return result

    @jax.custom_vjp
    def value(*values):
        return solve(*values).value

    def forward(*values):
        result = solve(*values)
        grads = result.gradient()
        return result.value, tuple(grads[i] for i in traced)

    def backward(grads, cotangent):
        out = []
        for i, grad in zip(traced, grads):
            ct = cotangent[(...,) + (None,) * (grad.ndim - cotangent.ndim)]
            out.append((ct * grad).astype(arrays[i].dtype))
        return tuple(out)

    value.defvjp(forward, backward)
    out = value(*(arrays[i] for i in traced))
    return dataclasses.replace(solved[-1], value=out)
