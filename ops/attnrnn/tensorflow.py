"""AttnRNN on tensorflow: a while loop with a hand-written gradient.

The same structure as the jax implementation (see `steps.py`): the forward
loop saves each step's residuals, the backward loop produces each step's
pre-activation gradients, and the weight gradients are single large matmuls
over all steps. Both loops run in TensorFlow's graph executor, which runs the
independent ops of a step in parallel (Keras leaves XLA off on CPU-only
tensorflow; under an XLA-compiled model the loops compile with it). 16-bit
inputs are computed in float32.
"""

import tensorflow as tf

from keras_attnrnn.ops.attnrnn import steps
from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON

PARALLEL_ITERATIONS = 32


def _scan(body, carry, xs, num_outputs, dtype, reverse):
    """A jax-style scan: `body(carry, xs_t) -> (carry, ys_t)` over axis 0.

    `xs` is a list of time-major tensors (or None entries); `ys` is a list of
    `num_outputs` tensors, stacked on a new leading time axis.
    """
    first = next(x for x in xs if x is not None)
    n = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
    xs_ta = [
        None if x is None else tf.TensorArray(x.dtype, size=n).unstack(x)
        for x in xs
    ]
    ys_ta = [tf.TensorArray(dtype, size=n) for _ in range(num_outputs)]

    def loop(i, carry, ys_ta):
        xs_t = [None if ta is None else ta.read(i) for ta in xs_ta]
        carry, ys_t = body(carry, xs_t)
        ys_ta = [ta.write(i, y) for ta, y in zip(ys_ta, ys_t)]
        return i + (-1 if reverse else 1), carry, ys_ta

    start = tf.constant(n - 1 if reverse else 0) if isinstance(n, int) else (
        n - 1 if reverse else tf.constant(0)
    )
    _, carry, ys_ta = tf.while_loop(
        lambda i, *_: i >= 0 if reverse else i < n,
        loop,
        (start, carry, ys_ta),
        parallel_iterations=PARALLEL_ITERATIONS,
        maximum_iterations=n,
    )
    return carry, [ta.stack() for ta in ys_ta]


def _previous_states(hs, h0, reverse):
    if reverse:
        return tf.concat([hs[1:], h0[None]], axis=0)
    return tf.concat([h0[None], hs[:-1]], axis=0)


def _flat(v):
    return tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0))


def _forward(x, h0, weights, m, num_heads, reverse, epsilon):
    w = steps.prepare(*weights)

    def body(h, xs_t):
        x_t, m_t = xs_t
        h_new, res = steps.forward_step(h, x_t, m_t, w, num_heads, epsilon)
        return h_new, [h_new, *res]

    h_last, (hs, *res) = _scan(body, h0, [x, m], 8, x.dtype, reverse)
    return hs, h_last, res


def _backward(x, h0, weights, m, hs, res, d_hs, d_last, num_heads, reverse):
    w = steps.prepare(*weights)
    h_prev = _previous_states(hs, h0, reverse)

    def back(dh, xs_t):
        d_out, h_t, x_t, m_t, *res_t = xs_t
        dh, *per_step = steps.backward_step(
            dh + d_out, h_t, x_t, m_t, res_t, w, num_heads
        )
        return dh, per_step

    dh0, (dx, dhw, du, dh_step) = _scan(
        back, d_last, [d_hs, h_prev, x, m, *res], 4, x.dtype, not reverse
    )
    d_weights = steps.weight_grads(
        _flat(h_prev),
        _flat(x),
        [_flat(v) for v in res],
        _flat(dhw),
        _flat(du),
        _flat(dh_step),
    )
    return dx, dh0, d_weights


_forward_xla = tf.function(_forward, jit_compile=True)
_backward_xla = tf.function(_backward, jit_compile=True)


def _recurrence(x, h0, weights, m, num_heads, reverse, epsilon):
    """x (t, b, e), h0 (b, e), m (t, b, 1) bool or None -> (hs, h_last)."""

    @tf.custom_gradient
    def run(x, h0, *weights):
        # The gradient is ours: stopping the tape at the compiled calls keeps
        # tensorflow from exporting their loops' internals for its own.
        x, h0, *weights = [tf.stop_gradient(v) for v in (x, h0, *weights)]
        hs, h_last, res = _forward_xla(
            x, h0, weights, m, num_heads, reverse, epsilon
        )

        def grad(d_hs, d_last):
            dx, dh0, d_weights = _backward_xla(
                x, h0, weights, m, hs, res, d_hs, d_last, num_heads, reverse
            )
            return (dx, dh0, *d_weights)

        return (hs, h_last), grad

    return run(x, h0, *weights)


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
    inputs = tf.convert_to_tensor(inputs)
    dtype = inputs.dtype
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype

    def cast(v):
        return tf.cast(tf.convert_to_tensor(v), compute)

    x = cast(inputs)
    if input_kernel is not None:
        x = tf.matmul(x, cast(input_kernel)) + cast(input_bias)
    weights = [
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
    ]
    m = None
    if mask is not None:
        m = tf.transpose(tf.cast(mask, tf.bool))[..., None]
    hs, h_last = _recurrence(
        tf.transpose(x, (1, 0, 2)),
        cast(initial_state),
        weights,
        m,
        num_heads,
        reverse,
        epsilon,
    )
    return (
        tf.cast(tf.transpose(hs, (1, 0, 2)), dtype),
        tf.cast(h_last, dtype),
    )
