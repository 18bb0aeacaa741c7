"""AttnRNN on jax: `lax.scan` with a hand-written VJP.

The forward scan saves each step's residuals; the backward is a reverse scan
that produces each step's pre-activation gradients, from which the weight
gradients are single large matmuls over all steps (see `steps.py`). 16-bit
inputs are computed in float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from keras_attnrnn.ops.attnrnn import steps
from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON


def _time_major(v):
    return jnp.swapaxes(v, 0, 1)


UNROLL = 1


def _scan_forward(x, h0, m, w, num_heads, reverse, epsilon):
    """x (t, b, e), h0 (b, e), m (t, b, 1) bool or None.

    Returns:
        `(hs, h_last, residuals)`: hs[i] is the state after step i; the
        residuals of every step are stacked on a leading time axis.
    """

    def body(h, xs):
        x_t, m_t = xs
        h_new, res = steps.forward_step(h, x_t, m_t, w, num_heads, epsilon)
        return h_new, (h_new, res)

    h_last, (hs, res) = lax.scan(
        body, h0, (x, m), reverse=reverse, unroll=UNROLL
    )
    return hs, h_last, res


def _previous_states(hs, h0, reverse):
    """The input state of each step, time-major."""
    if reverse:
        return jnp.concatenate([hs[1:], h0[None]], axis=0)
    return jnp.concatenate([h0[None], hs[:-1]], axis=0)


def _flat(v):
    return v.reshape((-1,) + v.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _recurrence(x, h0, weights, m, num_heads, reverse, epsilon):
    """hs (t, b, e) and the last state; m: float 0/1 (t, b, 1) or None."""
    return _recurrence_fwd(x, h0, weights, m, num_heads, reverse, epsilon)[0]


def _recurrence_fwd(x, h0, weights, m, num_heads, reverse, epsilon):
    w = steps.prepare(*weights)
    mb = None if m is None else m > 0
    hs, h_last, res = _scan_forward(x, h0, mb, w, num_heads, reverse, epsilon)
    return (hs, h_last), (x, h0, weights, m, hs, res)


def _recurrence_bwd(num_heads, reverse, epsilon, saved, cotangents):
    x, h0, weights, m, hs, res = saved
    d_hs, d_last = cotangents
    w = steps.prepare(*weights)
    mb = None if m is None else m > 0
    h_prev = _previous_states(hs, h0, reverse)

    def body(dh, xs):
        d_out, h_t, x_t, m_t, res_t = xs
        dh, dx, *per_step = steps.backward_step(
            dh + d_out, h_t, x_t, m_t, res_t, w, num_heads
        )
        return dh, (dx, per_step)

    dh0, (dx, per_step) = lax.scan(
        body,
        d_last,
        (d_hs, h_prev, x, mb, res),
        reverse=not reverse,
        unroll=UNROLL,
    )
    d_weights = tuple(
        steps.weight_grads(
            _flat(h_prev),
            _flat(x),
            [_flat(v) for v in res],
            *[_flat(v) for v in per_step],
        )
    )
    return dx, dh0, d_weights, None if m is None else jnp.zeros_like(m)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def attnrnn(
    inputs,
    initial_state,
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
    num_heads,
    input_kernel=None,
    input_bias=None,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.attnrnn` (no recurrent dropout)."""
    dtype = inputs.dtype
    compute = jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype
    cast = lambda v: None if v is None else jnp.asarray(v, compute)  # noqa
    x = cast(inputs)
    if input_kernel is not None:
        x = x @ cast(input_kernel) + cast(input_bias)
    weights = tuple(
        cast(v)
        for v in (
            query_kernel,
            query_bias,
            output_kernel,
            output_bias,
            gate_kernel,
            gate_bias,
            gamma,
            beta,
        )
    )
    x = _time_major(x)
    h0 = cast(initial_state)
    m = None
    if mask is not None:
        m = _time_major(jnp.asarray(mask, bool))[..., None].astype(compute)
    hs, h_last = _recurrence(
        x, h0, weights, m, num_heads, reverse, float(epsilon)
    )
    return _time_major(hs).astype(dtype), h_last.astype(dtype)
