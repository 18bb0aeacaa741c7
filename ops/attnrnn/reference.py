"""AttnRNN in portable `keras.ops`: the ground truth of every implementation.

Shapes: b batch, t time, d input features, e units (H), n heads, e = n * k.

One step (SPEC §3.1), from the state h (b, e) and the projected input x (b, e):
the context is the four tokens [h, x, h + x, h * x]; the query h @ Wq + bq
attends over them per head (keys = values = the tokens, scaled by 1/sqrt(k));
a = gelu(o @ Wo + bo) (exact gelu); z = sigmoid([h, a] @ Wg + bg);
h' = z * LayerNorm(a + h) + (1 - z) * h.

The attention over the four tokens needs no (b, 4, e) tensor: with
s_h = <q, h>, s_x = <q, x>, s_p = <q, h * x> per head, the scores are
(s_h, s_x, s_h + s_x, s_p) and the output is
(p1 + p3) * h + (p2 + p3) * x + p4 * (h * x).
"""

from keras import ops

LAYER_NORM_EPSILON = 1e-5


def head_sums(v, num_heads):
    """(b, e) -> (b, n): the sum of each head's contiguous slice."""
    return ops.sum(
        ops.reshape(v, (-1, num_heads, v.shape[-1] // num_heads)), axis=-1
    )


def head_expand(p, units):
    """(b, n) -> (b, e): each head's value repeated over its slice."""
    return ops.repeat(p, units // p.shape[-1], axis=-1)


def gelu(v):
    """Exact (erf) GELU. Written out: tensorflow's float64 gelu is off by 4e-9."""
    return 0.5 * v * (1.0 + ops.erf(v * 0.7071067811865476))


def layer_norm(v, gamma, beta, epsilon=LAYER_NORM_EPSILON):
    """LayerNorm over the last axis, statistics in float32 for 16-bit inputs."""
    dtype = v.dtype
    if dtype in ("float16", "bfloat16"):
        v = ops.cast(v, "float32")
    mean = ops.mean(v, axis=-1, keepdims=True)
    var = ops.mean(ops.square(v - mean), axis=-1, keepdims=True)
    v = (v - mean) * ops.rsqrt(var + epsilon)
    return ops.cast(v, dtype) * gamma + beta


def attnrnn_step_parts(
    h,
    x,
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
    num_heads,
    recurrent_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """One AttnRNN step, with what it computed on the way.

    Returns `(h_new, p, z)`: the new state (b, e), the attention weights
    (b, n, 4) over the tokens [h, x, h + x, h * x], and the gate (b, e).
    `attnrnn_step` returns only h_new; `examples/training_dynamics.py`
    reads p and z.
    """
    units = h.shape[-1]
    hd = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
    q = ops.matmul(hd, query_kernel) + query_bias
    scale = 1.0 / float(units // num_heads) ** 0.5
    hx = h * x
    s_h = head_sums(q * h, num_heads) * scale
    s_x = head_sums(q * x, num_heads) * scale
    s_p = head_sums(q * hx, num_heads) * scale
    p = ops.softmax(ops.stack([s_h, s_x, s_h + s_x, s_p], axis=-1), axis=-1)
    w_h = head_expand(p[..., 0] + p[..., 2], units)
    w_x = head_expand(p[..., 1] + p[..., 2], units)
    w_p = head_expand(p[..., 3], units)
    o = w_h * h + w_x * x + w_p * hx
    a = gelu(ops.matmul(o, output_kernel) + output_bias)
    z = ops.sigmoid(
        ops.matmul(ops.concatenate([hd, a], axis=-1), gate_kernel) + gate_bias
    )
    candidate = layer_norm(a + h, gamma, beta, epsilon)
    return z * candidate + (1.0 - z) * h, p, z


def attnrnn_step(h, x, *weights_and_heads, **kwargs):
    """One AttnRNN step from h (b, e) and the projected input x (b, e).

    Takes the arguments of `attnrnn_step_parts`: the eight step weights,
    `num_heads`, then optionally `recurrent_dropout_mask` (b, e), which
    scales h where it enters a linear map (the query and the gate), as
    Keras cells do, and `epsilon`.
    """
    return attnrnn_step_parts(h, x, *weights_and_heads, **kwargs)[0]


def project_inputs(inputs, input_kernel=None, input_bias=None):
    """(b, t, d) -> (b, t, e): the input projection, one matmul for all steps."""
    if input_kernel is None:
        return inputs
    return ops.matmul(inputs, input_kernel) + input_bias


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
    """The whole AttnRNN recurrence with `keras.ops.scan`.

    Args:
        inputs: (b, t, d).
        initial_state: (b, e).
        mask: optional (b, t) booleans; a masked step keeps the state.
        reverse: process t-1 .. 0 (outputs stay aligned with the inputs).

    Returns:
        (outputs (b, t, e), final_state (b, e)); outputs[:, i] is the state
        after step i.
    """
    x = project_inputs(inputs, input_kernel, input_bias)
    xs = ops.transpose(x, (1, 0, 2))
    if mask is not None:
        xs = (xs, ops.expand_dims(ops.transpose(ops.cast(mask, "bool")), -1))

    def step(h, xs_t):
        x_t, m_t = xs_t if mask is not None else (xs_t, None)
        h_new = attnrnn_step(
            h,
            x_t,
            query_kernel,
            query_bias,
            output_kernel,
            output_bias,
            gate_kernel,
            gate_bias,
            gamma,
            beta,
            num_heads,
            recurrent_dropout_mask,
            epsilon,
        )
        if m_t is not None:
            h_new = ops.where(m_t, h_new, h)
        return h_new, h_new

    final_state, outputs = ops.scan(step, initial_state, xs, reverse=reverse)
    return ops.transpose(outputs, (1, 0, 2)), final_state
