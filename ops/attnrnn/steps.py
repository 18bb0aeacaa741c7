"""AttnRNN's step (SPEC §3.1) and its hand-written backward, in `keras.ops`.

This is the model's one written math: the portable reference differentiates
`forward_step` with the backend's autodiff, the jax and tensorflow drivers
(`ops/loops/`) run `backward_step` as its VJP, and cells call `attnrnn_step`.
The only other copy is the torch CPU kernel (`attnrnn_cpu.h`).

Shapes: b batch, e units, n heads. The weights are packed once (`prepare`):
the query and the h-part of the gate share one matmul,
`hw = h @ [query_kernel | gate_kernel[:e]] + [query_bias | gate_bias]` (b, 2e).

Forward, from h and the projected input x (both (b, e)); hd = h, or h times
the recurrent dropout mask, where h enters the query and the gate:
    hw = hd @ hq_kernel + hq_bias;  q = hw[:, :e];  c = 1/sqrt(e/n)
    s = c * (<q,h>, <q,x>, <q,h>+<q,x>, <q,h*x>) per head; p = softmax(s)
    o = (p0+p2) h + (p1+p2) x + p3 (h*x)   (attention over [h, x, h+x, h*x])
    u = o @ output_kernel + output_bias;  a = gelu(u)   (exact, erf)
    g = hw[:, e:] + a @ gate_a_kernel;  z = sigmoid(g)
    r = a + h;  rhat = (r - mean) * rstd;  cand = rhat * gamma + beta
    h' = h + z * (cand - h)   (h' = h where the step is masked)
"""

import math
import sys

from keras import ops

from keras_attnrnn.ops import loops

LAYER_NORM_EPSILON = 1e-5
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_16_BIT = ("float16", "bfloat16")


def gelu(v):
    """Exact (erf) GELU. Written out: tensorflow's float64 gelu is off by 4e-9."""
    return 0.5 * v * (1.0 + ops.erf(v * 0.7071067811865476))


def _head_sums(v, num_heads):
    """(b, e) -> (b, n): the sum of each head's contiguous slice."""
    return ops.sum(
        ops.reshape(v, (-1, num_heads, v.shape[-1] // num_heads)), axis=-1
    )


def _expand(v, units):
    """(b, n) -> (b, e): each head's value repeated over its slice.

    A broadcast product, not `ops.repeat`: torch's ONNX exporter writes
    `repeat_interleave` as a Reshape that fails in ONNX Runtime for a batch
    above 1, or gives wrong values where the batch is dynamic.
    """
    n = v.shape[-1]
    ones = ops.ones((units // n,), dtype=v.dtype)
    return ops.reshape(ops.expand_dims(v, -1) * ones, (-1, units))


def prepare(
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
):
    """The weights (SPEC names, in this order) packed as the steps use them."""
    units = query_kernel.shape[-1]
    return {
        "hq_kernel": ops.concatenate([query_kernel, gate_kernel[:units]], axis=-1),
        "hq_bias": ops.concatenate([query_bias, gate_bias], axis=-1),
        "output_kernel": output_kernel,
        "output_bias": output_bias,
        "gate_a_kernel": gate_kernel[units:],
        "gamma": gamma,
        "beta": beta,
    }


def attention_output(p, h, x):
    """o from the attention weights p (b, n, 4), h and x."""
    units = h.shape[-1]
    return (
        _expand(p[..., 0] + p[..., 2], units) * h
        + _expand(p[..., 1] + p[..., 2], units) * x
        + _expand(p[..., 3], units) * (h * x)
    )


def step(h, x, w, num_heads, epsilon=LAYER_NORM_EPSILON, dropout=None, m=None):
    """One step. `w` from `prepare`; `dropout` (b, e) or None; m (b, 1) or None.

    Returns:
        `(h_new, residuals)`, the residuals `(q, p, u, z, rhat, rstd, cand)`
        being what `backward_step` needs (p is the attention, z the gate).
    """
    units = h.shape[-1]
    scale = 1.0 / math.sqrt(units // num_heads)
    hd = h if dropout is None else h * dropout
    hw = ops.matmul(hd, w["hq_kernel"]) + w["hq_bias"]
    q = hw[:, :units]
    s_h = _head_sums(q * h, num_heads) * scale
    s_x = _head_sums(q * x, num_heads) * scale
    s_p = _head_sums(q * (h * x), num_heads) * scale
    p = ops.softmax(ops.stack([s_h, s_x, s_h + s_x, s_p], axis=-1), axis=-1)
    u = ops.matmul(attention_output(p, h, x), w["output_kernel"]) + w["output_bias"]
    a = gelu(u)
    z = ops.sigmoid(hw[:, units:] + ops.matmul(a, w["gate_a_kernel"]))
    r = a + h
    centered = r - ops.mean(r, axis=-1, keepdims=True)
    rstd = ops.rsqrt(
        ops.mean(ops.square(centered), axis=-1, keepdims=True) + epsilon
    )
    rhat = centered * rstd
    cand = rhat * w["gamma"] + w["beta"]
    h_new = h + z * (cand - h)
    if m is not None:
        h_new = ops.where(m, h_new, h)
    return h_new, (q, p, u, z, rhat, rstd, cand)


def attnrnn_step_parts(h, x, *weights, num_heads, recurrent_dropout_mask=None,
                       epsilon=LAYER_NORM_EPSILON):
    """One step from the eight SPEC weights: `(h_new, p, z)`.

    16-bit inputs are computed in float32 (h_new is cast back); p (b, n, 4)
    are the attention weights over [h, x, h + x, h * x], z (b, e) the gate.
    """
    dtype = h.dtype
    if dtype in _16_BIT:
        h, x = ops.cast(h, "float32"), ops.cast(x, "float32")
        weights = [ops.cast(v, "float32") for v in weights]
        if recurrent_dropout_mask is not None:
            recurrent_dropout_mask = ops.cast(recurrent_dropout_mask, "float32")
    h_new, (_, p, _, z, _, _, _) = step(
        h, x, prepare(*weights), num_heads, epsilon, recurrent_dropout_mask
    )
    return ops.cast(h_new, dtype), p, z


def attnrnn_step(h, x, *weights, num_heads, recurrent_dropout_mask=None,
                 epsilon=LAYER_NORM_EPSILON):
    """One AttnRNN step from h (b, e), the projected input x (b, e) and the
    eight SPEC weights (query_kernel, query_bias, output_kernel, output_bias,
    gate_kernel, gate_bias, gamma, beta): the new state (b, e).

    `recurrent_dropout_mask` (b, e) scales h where it enters a linear map
    (the query and the gate), as Keras cells do.
    """
    return attnrnn_step_parts(
        h, x, *weights, num_heads=num_heads,
        recurrent_dropout_mask=recurrent_dropout_mask, epsilon=epsilon,
    )[0]


# The driver interface (ops/loops/__init__.py). config = (num_heads, epsilon);
# extras = (recurrent_dropout_mask,); the carry is (h,).


def forward_step(carry, xs_t, w, extras, config):
    num_heads, epsilon = config
    x_t, m_t = xs_t
    h_new, residuals = step(carry[0], x_t, w, num_heads, epsilon, extras[0], m_t)
    return (h_new,), (h_new, *residuals)


def residuals(x, state0, ys, final):
    return x, state0[0], ys


def backward_setup(saved, m, w, cotangents, config, reverse):
    x, h0, (hs, *res) = saved
    d_hs, (d_last,) = cotangents
    return (d_last,), (d_hs, loops.previous(hs, h0, reverse), x, m, *res)


def backward_step(carry, xs_t, w, extras, config):
    """Backpropagates one step (no recurrent dropout: fused loops decline it).

    Returns the carry (dh,) and the step's (dx, dhw, du, dcand): the
    gradients of x, of the pre-activations hw (b, 2e) and u (b, e), and of
    the candidate, from which `backward_finish` forms the weight gradients.
    """
    num_heads = config[0]
    d_out, h, x, m, q, p, u, z, rhat, rstd, cand = xs_t
    dh_new = carry[0] + d_out
    units = h.shape[-1]
    scale = 1.0 / math.sqrt(units // num_heads)
    if m is not None:
        dh_carry = ops.where(m, ops.zeros_like(dh_new), dh_new)
        dh_new = ops.where(m, dh_new, ops.zeros_like(dh_new))
    dcand = dh_new * z
    dg = dh_new * (cand - h) * z * (1.0 - z)
    drhat = dcand * w["gamma"]
    dr = rstd * (
        drhat
        - ops.mean(drhat, axis=-1, keepdims=True)
        - rhat * ops.mean(drhat * rhat, axis=-1, keepdims=True)
    )
    da = dr + ops.matmul(dg, ops.transpose(w["gate_a_kernel"]))
    # gelu'(u) = Phi(u) + u * phi(u)
    cdf = 0.5 * (1.0 + ops.erf(u * 0.7071067811865476))
    du = da * (cdf + u * ops.exp(-0.5 * u * u) * _INV_SQRT_2PI)
    do = ops.matmul(du, ops.transpose(w["output_kernel"]))
    hx = h * x
    dp0 = _head_sums(do * h, num_heads)
    dp1 = _head_sums(do * x, num_heads)
    dp = ops.stack([dp0, dp1, dp0 + dp1, _head_sums(do * hx, num_heads)], axis=-1)
    ds = p * (dp - ops.sum(p * dp, axis=-1, keepdims=True)) * scale
    w_h = _expand(p[..., 0] + p[..., 2], units)
    w_x = _expand(p[..., 1] + p[..., 2], units)
    w_p = _expand(p[..., 3], units)
    e_h = _expand(ds[..., 0] + ds[..., 2], units)
    e_x = _expand(ds[..., 1] + ds[..., 2], units)
    e_p = _expand(ds[..., 3], units)
    dq = e_h * h + e_x * x + e_p * hx
    dhw = ops.concatenate([dq, dg], axis=-1)
    dh = (
        dh_new * (1.0 - z)
        + dr
        + do * (w_h + w_p * x)
        + q * (e_h + e_p * x)
        + ops.matmul(dhw, ops.transpose(w["hq_kernel"]))
    )
    dx = do * (w_x + w_p * h) + q * (e_x + e_p * h)
    if m is not None:
        dh = dh + dh_carry  # dx is already 0 where masked
    return (dh,), (dx, dhw, du, dcand)


def packed_grads(h_prev, o, a, rhat, dhw, du, dcand):
    """The gradients of `prepare`'s dict from all steps' rows at once.

    Every argument is (rows, ...), rows = t * b: each step's input state,
    attention output o, activation a = gelu(u), normalized rhat, and the
    per-step gradients of `backward_step`. One large matmul per kernel.
    """
    units = h_prev.shape[-1]
    t = ops.transpose
    return {
        "hq_kernel": ops.matmul(t(h_prev), dhw),
        "hq_bias": ops.sum(dhw, axis=0),
        "output_kernel": ops.matmul(t(o), du),
        "output_bias": ops.sum(du, axis=0),
        "gate_a_kernel": ops.matmul(t(a), dhw[:, units:]),
        "gamma": ops.sum(dcand * rhat, axis=0),
        "beta": ops.sum(dcand, axis=0),
    }


def backward_finish(saved, m, w, extras, carry, ys, config, reverse):
    x, h0, (hs, q, p, u, z, rhat, rstd, cand) = saved
    dx, dhw, du, dcand = ys
    h_prev = loops.rows(loops.previous(hs, h0, reverse))
    x_rows, p_rows = loops.rows(x), loops.rows(p)
    d_w = packed_grads(
        h_prev,
        attention_output(p_rows, h_prev, x_rows),
        gelu(loops.rows(u)),
        loops.rows(rhat),
        loops.rows(dhw),
        loops.rows(du),
        loops.rows(dcand),
    )
    return dx, carry, d_w


# The implementations of the op: the loop drivers bound to this module.
reference, jax_scan, tensorflow_loop = loops.drivers(sys.modules[__name__])
