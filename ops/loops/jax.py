"""The jax driver: `lax.scan` forward and backward, with a `jax.custom_vjp`.

The forward scan saves each step's residuals; the backward is a reverse scan
of the model's `backward_step`, and `backward_finish` forms the weight
gradients as single large matmuls over all steps. Compiled as a whole with
`jax.jit`: inside a compiled Keras step it is inlined, and eager calls with
the same shapes reuse one executable.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def run(model, x, state0, w, mask, extras, reverse, config):
    """See `ops/loops/__init__.py`."""
    # custom_vjp differentiates every array argument: the mask travels as
    # 0/1 floats (its cotangent is a zero array).
    m = None if mask is None else jnp.asarray(mask, x.dtype)
    return _run(model, bool(reverse), config, x, tuple(state0), w, m, extras)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(model, reverse, config, x, state0, w, m, extras):
    return _recurrence(model, reverse, config, x, state0, w, m, extras)


def _forward(model, reverse, config, x, state0, w, m, extras):
    mb = None if m is None else m > 0

    def body(carry, xs_t):
        return model.forward_step(carry, xs_t, w, extras, config)

    return lax.scan(body, state0, (x, mb), reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(model, reverse, config, x, state0, w, m, extras):
    final, ys = _forward(model, reverse, config, x, state0, w, m, extras)
    return ys[0], final


def _recurrence_fwd(model, reverse, config, x, state0, w, m, extras):
    final, ys = _forward(model, reverse, config, x, state0, w, m, extras)
    saved = (model.residuals(x, state0, ys, final), w, m, extras)
    return (ys[0], final), saved


def _recurrence_bwd(model, reverse, config, saved, cotangents):
    residuals, w, m, extras = saved
    mb = None if m is None else m > 0
    carry, xs = model.backward_setup(residuals, mb, w, cotangents, config, reverse)

    def body(carry, xs_t):
        return model.backward_step(carry, xs_t, w, extras, config)

    carry, ys = lax.scan(body, carry, xs, reverse=not reverse)
    dx, d_state0, d_w = model.backward_finish(
        residuals, mb, w, extras, carry, ys, config, reverse
    )
    zeros = lambda v: jax.tree.map(jnp.zeros_like, v)  # noqa: E731
    return dx, tuple(d_state0), d_w, zeros(m), zeros(extras)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
