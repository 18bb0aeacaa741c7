"""LARNN on tensorflow: XLA-compiled while loops with a hand-written gradient.

The same structure as the jax implementation (see `steps.py`): the forward
loop carries the window's key/value projections and saves (b, *)-sized
residuals per step, the backward loop rebuilds each step's window from the
next, and the weight gradients of the matmuls are single large matmuls over
all steps. The input projections and the weight packing stay outside the
custom gradient, where tensorflow differentiates them. 16-bit inputs are
computed in float32.
"""

import tensorflow as tf

from keras_attnrnn.ops.larnn import steps
from keras_attnrnn.ops.larnn.reference import LAYER_NORM_EPSILON

PARALLEL_ITERATIONS = 32


def _scan(body, carry, xs, reverse):
    """A jax-style scan: `body(carry, xs_t) -> (carry, ys_t)` over axis 0.

    `xs` is a tuple of time-major tensors (entries may be None); the `ys` of
    all steps are stacked on a new leading axis.
    """
    first = next(x for x in xs if x is not None)
    n = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
    xs_ta = [
        None if x is None else tf.TensorArray(x.dtype, size=n).unstack(x)
        for x in xs
    ]
    # One step outside the loop gives the structure, dtypes and shapes of ys.
    ys_spec = body(carry, [None if x is None else x[0] for x in xs])[1]
    flat_spec = tf.nest.flatten(ys_spec)
    ys_ta = [tf.TensorArray(y.dtype, size=n) for y in flat_spec]

    def loop(i, carry, ys_ta):
        xs_t = [None if ta is None else ta.read(i) for ta in xs_ta]
        carry, ys_t = body(carry, xs_t)
        ys_ta = [ta.write(i, y) for ta, y in zip(ys_ta, tf.nest.flatten(ys_t))]
        return i + (-1 if reverse else 1), carry, ys_ta

    start = n - 1 if reverse else 0
    _, carry, ys_ta = tf.while_loop(
        lambda i, *_: i >= 0 if reverse else i < n,
        loop,
        (tf.constant(start) if isinstance(start, int) else start, carry, ys_ta),
        parallel_iterations=PARALLEL_ITERATIONS,
        maximum_iterations=n,
    )
    ys = tf.nest.pack_sequence_as(ys_spec, [ta.stack() for ta in ys_ta])
    return carry, ys


def _previous(values, first, reverse):
    if reverse:
        return tf.concat([values[1:], first[None]], axis=0)
    return tf.concat([first[None], values[:-1]], axis=0)


def _flat(v):
    return tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0))


def _forward(xqz, state0, w, m, masks, config):
    num_heads, reverse, epsilon, activation = config
    rdm, adm = masks

    def body(carry, xs_t):
        return steps.forward_step(
            tuple(carry), xs_t, w, num_heads, activation, epsilon, rdm, adm
        )

    final, per_step = _scan(body, tuple(state0), (xqz, m), reverse)
    return tuple(final), tuple(per_step)


def _backward(state0, w, m, masks, per_step, caches, d_hs, d_final, config):
    num_heads, reverse, epsilon, activation = config
    rdm, adm = masks
    h0, c0 = state0[:2]
    hs, cs, q, p, o, u, ua, gates, dropped = per_step
    h_prev = _previous(hs, h0, reverse)
    c_prev = _previous(cs, c0, reverse)

    def body(carry, xs_t):
        return steps.backward_step(
            tuple(carry), xs_t, w, num_heads, activation, epsilon, rdm, adm
        )

    carry = (*d_final, *caches, steps.zero_sums(w, activation))
    xs = (d_hs, h_prev, c_prev, cs, q, p, u, ua, gates, dropped, m)
    carry, (dhw, du, dkv_new) = _scan(body, carry, xs, not reverse)
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
    return dhw, tuple(d_state0), grads


_forward_xla = tf.function(_forward, jit_compile=True)
_backward_xla = tf.function(_backward, jit_compile=True)


def _recurrence(xqz, state0, w, m, masks, config):
    """hs (t, b, e) and the final (h, c, kc, vc, cells, valid)."""
    names = sorted(w)

    @tf.custom_gradient
    def run(xqz, *flat):
        # The gradient is ours: stopping the tape at the compiled calls keeps
        # tensorflow from exporting their loops' internals for its own.
        xqz = tf.stop_gradient(xqz)
        flat = [tf.stop_gradient(v) for v in flat]
        state = tuple(flat[:6])
        weights = dict(zip(names, flat[6:]))
        final, per_step = _forward_xla(xqz, state, weights, m, masks, config)

        def grad(d_hs, *d_final):
            d_final = [
                tf.zeros_like(v) if d is None else d
                for d, v in zip(d_final, final)
            ]
            dxqz, d_state, grads = _backward_xla(
                state,
                weights,
                m,
                masks,
                per_step,
                final[2:4],
                d_hs,
                tuple(d_final),
                config,
            )
            return (dxqz, *d_state, *[grads[n] for n in names])

        return (per_step[0], *final), grad

    hs, *final = run(xqz, *state0, *[w[n] for n in names])
    return hs, final


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
    inputs = tf.convert_to_tensor(inputs)
    dtype = inputs.dtype
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype

    def cast(v):
        return None if v is None else tf.cast(tf.convert_to_tensor(v), compute)

    x = cast(inputs)
    weights = {name: cast(v) for name, v in weights.items()}
    h0, c0, window0, valid0 = [cast(v) for v in initial_state]
    input_dim = x.shape[-1]
    slots = valid0.shape[-1]
    units = h0.shape[-1]
    w, input_kernel, input_bias = steps.prepare(weights, input_dim, slots)
    xqz = tf.transpose(
        tf.tensordot(x, input_kernel, axes=1) + input_bias, (1, 0, 2)
    )
    cells0 = tf.reshape(window0, (-1, slots, units))
    kv0 = tf.tensordot(cells0, w["kv_kernel"], axes=1)
    state0 = (h0, c0, kv0[..., :units], kv0[..., units:], cells0, valid0)
    m = None
    if mask is not None:
        m = tf.transpose(tf.cast(mask, tf.bool))[..., None]
    masks = (cast(recurrent_dropout_mask), cast(attention_dropout_mask))
    config = (num_heads, reverse, float(epsilon), "key_gamma" in w)
    hs, (h, c, _, _, cells, valid) = _recurrence(xqz, state0, w, m, masks, config)
    final = [h, c, tf.reshape(cells, (-1, slots * units)), valid]
    return (
        tf.cast(tf.transpose(hs, (1, 0, 2)), dtype),
        [tf.cast(v, dtype) for v in final],
    )
