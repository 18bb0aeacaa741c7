"""LARNN on jax: `lax.scan` over cached key/value projections, hand-written VJP.

The forward scan carries the window's key/value projections (see `steps.py`)
and saves only (b, *)-sized residuals per step; the backward is a reverse
scan that rebuilds each step's window from the next, and the weight
gradients of the matmuls are single large matmuls over all steps. The input
projections, the weight packing and the window's initial projection stay
outside the custom VJP, where jax differentiates them. 16-bit inputs are
computed in float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from keras_attnrnn.ops.larnn import steps
from keras_attnrnn.ops.larnn.reference import LAYER_NORM_EPSILON


def _time_major(v):
    return jnp.swapaxes(v, 0, 1)


def _previous(values, first, reverse):
    """The value before each step, time-major, from the values after."""
    if reverse:
        return jnp.concatenate([values[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], values[:-1]], axis=0)


def _flat(v):
    return v.reshape((-1,) + v.shape[2:])


def _forward(xqz, state0, w, m, masks, config):
    num_heads, reverse, epsilon, activation = config
    rdm, adm = masks
    mb = None if m is None else m > 0

    def body(carry, xs_t):
        return steps.forward_step(
            carry, xs_t, w, num_heads, activation, epsilon, rdm, adm
        )

    return lax.scan(body, state0, (xqz, mb), reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(xqz, state0, w, m, masks, config):
    """hs (t, b, e) and the final (h, c, kc, vc, cells, valid)."""
    final, per_step = _forward(xqz, state0, w, m, masks, config)
    return per_step[0], final


def _recurrence_fwd(xqz, state0, w, m, masks, config):
    final, per_step = _forward(xqz, state0, w, m, masks, config)
    return (per_step[0], final), (state0, w, m, masks, per_step, final[2:4])


def _recurrence_bwd(config, saved, cotangents):
    num_heads, reverse, epsilon, activation = config
    state0, w, m, masks, per_step, caches = saved
    rdm, adm = masks
    d_hs, (dh, dc, dkc, dvc, dcells, dvalid) = cotangents
    h0, c0 = state0[:2]
    hs, cs, q, p, o, u, ua, gates, dropped = per_step
    h_prev = _previous(hs, h0, reverse)
    c_prev = _previous(cs, c0, reverse)
    mb = None if m is None else m > 0

    def body(carry, xs_t):
        return steps.backward_step(
            carry, xs_t, w, num_heads, activation, epsilon, rdm, adm
        )

    carry = (dh, dc, dkc, dvc, dcells, dvalid, *caches, steps.zero_sums(w, activation))
    xs = (d_hs, h_prev, c_prev, cs, q, p, u, ua, gates, dropped, mb)
    carry, (dhw, du, dkv_new) = lax.scan(body, carry, xs, reverse=not reverse)
    *d_state0, _, _, sums = carry
    hd = h_prev if rdm is None else h_prev * rdm
    grads = steps.weight_grads(
        _flat(hd),
        _flat(cs),
        _flat(o),
        _flat(ua),
        _flat(dhw),
        _flat(du),
        _flat(dkv_new),
        w,
        sums,
        epsilon,
    )
    d_state0 = tuple(d_state0)
    d_w = {name: grads[name] for name in w}
    d_masks = tuple(None if v is None else jnp.zeros_like(v) for v in masks)
    return dhw, d_state0, d_w, None if m is None else jnp.zeros_like(m), d_masks


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


@functools.partial(
    jax.jit, static_argnames=("num_heads", "reverse", "epsilon")
)
def _larnn(inputs, initial_state, weights, mask, masks, num_heads, reverse, epsilon):
    # Compiled as a whole: inside a compiled Keras step it is inlined, and
    # eager calls with the same shapes reuse one executable instead of
    # compiling their scans again.
    dtype = inputs.dtype
    compute = jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype
    cast = lambda v: None if v is None else jnp.asarray(v, compute)  # noqa
    x = cast(inputs)
    weights = {name: cast(v) for name, v in weights.items()}
    h0, c0, window0, valid0 = [cast(v) for v in initial_state]
    batch, _, input_dim = x.shape
    slots = valid0.shape[-1]
    units = h0.shape[-1]
    w, input_kernel, input_bias = steps.prepare(weights, input_dim, slots)
    xqz = _time_major(x @ input_kernel + input_bias)
    cells0 = window0.reshape(batch, slots, units)
    kv0 = cells0 @ w["kv_kernel"]
    state0 = (h0, c0, kv0[..., :units], kv0[..., units:], cells0, valid0)
    m = None
    if mask is not None:
        m = _time_major(jnp.asarray(mask, bool))[..., None].astype(compute)
    masks = tuple(cast(v) for v in masks)
    config = (num_heads, reverse, epsilon, "key_gamma" in w)
    hs, (h, c, _, _, cells, valid) = _recurrence(xqz, state0, w, m, masks, config)
    final = [h, c, cells.reshape(batch, slots * units), valid]
    return _time_major(hs).astype(dtype), [v.astype(dtype) for v in final]


def larnn(
    inputs,
    initial_state,
    weights,
    num_heads,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    attention_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.larnn`."""
    return _larnn(
        inputs,
        list(initial_state),
        dict(weights),
        mask,
        (recurrent_dropout_mask, attention_dropout_mask),
        num_heads=num_heads,
        reverse=bool(reverse),
        epsilon=float(epsilon),
    )
