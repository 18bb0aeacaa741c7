"""AttnRNN's forward and backward step, for implementations with their own VJP.

Written in `keras.ops` and meant to be traced once inside a compiled loop
(`jax.lax.scan`, a tensorflow XLA while loop), where `keras.ops` costs
nothing at run time. The backward step returns the per-step gradients of the
pre-activations; the weight gradients are then one large matmul over all
steps (`weight_grads`) instead of a small accumulation inside the loop.

Shapes: b batch, e units, n heads. The query and the h-part of the gate share
one matmul: `hw = h @ [query_kernel | gate_kernel[:e]]` (b, 2e).

Forward, from h and the projected input x (both (b, e)):
    q = hw[:, :e] + query_bias;  c = 1/sqrt(e/n)
    s = c * (<q,h>, <q,x>, <q,h>+<q,x>, <q,h*x>) per head; p = softmax(s)
    o = (p0+p2) h + (p1+p2) x + p3 (h*x)
    u = o @ output_kernel + output_bias;  a = gelu(u)
    g = hw[:, e:] + a @ gate_kernel[e:] + gate_bias;  z = sigmoid(g)
    r = a + h;  rhat = (r - mean) * rstd;  cand = rhat * gamma + beta
    h' = h + z * (cand - h)   (h' = h where the step is masked)
"""

import math

from keras import ops

from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON
from keras_attnrnn.ops.attnrnn.reference import gelu

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _head_sums(v, num_heads):
    return ops.sum(
        ops.reshape(v, (-1, num_heads, v.shape[-1] // num_heads)), axis=-1
    )


def _expand(v, units):
    """(b, n) -> (b, e)."""
    return ops.repeat(v, units // v.shape[-1], axis=-1)


def pack_weights(query_kernel, gate_kernel):
    """[query_kernel | gate_kernel[:e]]: the one matmul applied to h."""
    units = query_kernel.shape[-1]
    return ops.concatenate([query_kernel, gate_kernel[:units]], axis=-1)


def forward_step(h, x, m, w, num_heads, epsilon=LAYER_NORM_EPSILON):
    """One step. `w` is a dict of weights (see `prepare`); m (b, 1) or None.

    Returns:
        `(h_new, residuals)`, the residuals being what `backward_step` needs.
    """
    units = h.shape[-1]
    scale = 1.0 / math.sqrt(units // num_heads)
    hw = ops.matmul(h, w["hq_kernel"])
    q = hw[:, :units] + w["query_bias"]
    hx = h * x
    s_h = _head_sums(q * h, num_heads) * scale
    s_x = _head_sums(q * x, num_heads) * scale
    s_p = _head_sums(q * hx, num_heads) * scale
    p = ops.softmax(ops.stack([s_h, s_x, s_h + s_x, s_p], axis=-1), axis=-1)
    o = attention_output(p, h, x)
    u = ops.matmul(o, w["output_kernel"]) + w["output_bias"]
    a = gelu(u)
    g = hw[:, units:] + ops.matmul(a, w["gate_a_kernel"]) + w["gate_bias"]
    z = ops.sigmoid(g)
    r = a + h
    mean = ops.mean(r, axis=-1, keepdims=True)
    centered = r - mean
    rstd = ops.rsqrt(
        ops.mean(ops.square(centered), axis=-1, keepdims=True) + epsilon
    )
    rhat = centered * rstd
    cand = rhat * w["gamma"] + w["beta"]
    h_new = h + z * (cand - h)
    if m is not None:
        h_new = ops.where(m, h_new, h)
    return h_new, (q, p, u, z, rhat, rstd, cand)


def attention_output(p, h, x):
    """o from the attention weights p (b, n, 4), h and x."""
    units = h.shape[-1]
    return (
        _expand(p[..., 0] + p[..., 2], units) * h
        + _expand(p[..., 1] + p[..., 2], units) * x
        + _expand(p[..., 3], units) * (h * x)
    )


def backward_step(dh_new, h, x, m, residuals, w, num_heads):
    """Backpropagates one step.

    Args:
        dh_new: gradient of the step's output state (b, e).
        h, x: the step's input state and projected input.
        m: the step's mask (b, 1) or None.
        residuals: from `forward_step`.

    Returns:
        `(dh, dx, dhw, du, dh_step)`: the gradients of h and x, and the
        per-step gradients from which `weight_grads` forms the weight
        gradients: of hw (b, 2e), of u (b, e), and of the step's update
        (dh_new where the step is not masked, else 0).
    """
    q, p, u, z, rhat, rstd, cand = residuals
    units = h.shape[-1]
    scale = 1.0 / math.sqrt(units // num_heads)
    if m is not None:
        dh_carry = ops.where(m, ops.zeros_like(dh_new), dh_new)
        dh_new = ops.where(m, dh_new, ops.zeros_like(dh_new))
    dz = dh_new * (cand - h)
    dcand = dh_new * z
    dh = dh_new * (1.0 - z)
    dg = dz * z * (1.0 - z)
    drhat = dcand * w["gamma"]
    dr = rstd * (
        drhat
        - ops.mean(drhat, axis=-1, keepdims=True)
        - rhat * ops.mean(drhat * rhat, axis=-1, keepdims=True)
    )
    dh = dh + dr
    da = dr + ops.matmul(dg, ops.transpose(w["gate_a_kernel"]))
    # gelu'(u) = Phi(u) + u * phi(u)
    cdf = 0.5 * (1.0 + ops.erf(u * 0.7071067811865476))
    du = da * (cdf + u * ops.exp(-0.5 * u * u) * _INV_SQRT_2PI)
    do = ops.matmul(du, ops.transpose(w["output_kernel"]))
    hx = h * x
    dp0 = _head_sums(do * h, num_heads)
    dp1 = _head_sums(do * x, num_heads)
    dp3 = _head_sums(do * hx, num_heads)
    dp = ops.stack([dp0, dp1, dp0 + dp1, dp3], axis=-1)
    ds = p * (dp - ops.sum(p * dp, axis=-1, keepdims=True))
    ds_h = (ds[..., 0] + ds[..., 2]) * scale
    ds_x = (ds[..., 1] + ds[..., 2]) * scale
    ds_p = ds[..., 3] * scale
    w_h = _expand(p[..., 0] + p[..., 2], units)
    w_x = _expand(p[..., 1] + p[..., 2], units)
    w_p = _expand(p[..., 3], units)
    e_h, e_x, e_p = _expand(ds_h, units), _expand(ds_x, units), _expand(ds_p, units)
    dq = e_h * h + e_x * x + e_p * hx
    dh = dh + do * (w_h + w_p * x) + q * (e_h + e_p * x)
    dx = do * (w_x + w_p * h) + q * (e_x + e_p * h)
    dhw = ops.concatenate([dq, dg], axis=-1)
    dh = dh + ops.matmul(dhw, ops.transpose(w["hq_kernel"]))
    if m is not None:
        dh = dh + dh_carry  # dx is already 0 where masked
    return dh, dx, dhw, du, dh_new


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
    """The weights in the form the steps use."""
    units = query_kernel.shape[-1]
    return {
        "hq_kernel": pack_weights(query_kernel, gate_kernel),
        "query_bias": query_bias,
        "output_kernel": output_kernel,
        "output_bias": output_bias,
        "gate_a_kernel": gate_kernel[units:],
        "gate_bias": gate_bias,
        "gamma": gamma,
        "beta": beta,
    }


def weight_grads(h, x, residuals, dhw, du, dh_step):
    """The weight gradients from all steps at once.

    Every argument has a leading axis of rows = t * b: the input state h and
    projected input x of every step, the residuals of `forward_step` and the
    per-step gradients of `backward_step`. What the loops did not keep (o, a,
    the gradient of the norm's output) is recomputed here, batched.

    Returns:
        (query_kernel, query_bias, output_kernel, output_bias, gate_kernel,
        gate_bias, gamma, beta) gradients.
    """
    q, p, u, z, rhat, rstd, cand = residuals
    units = h.shape[-1]
    o = attention_output(p, h, x)
    a = gelu(u)
    dg = dhw[:, units:]
    dcand = dh_step * z
    d_hq = ops.matmul(ops.transpose(h), dhw)
    d_gate_a = ops.matmul(ops.transpose(a), dg)
    d_output = ops.matmul(ops.transpose(o), du)
    sums = lambda v: ops.sum(v, axis=0)  # noqa: E731
    return (
        d_hq[:, :units],
        sums(dhw[:, :units]),
        d_output,
        sums(du),
        ops.concatenate([d_hq[:, units:], d_gate_a], axis=0),
        sums(dg),
        sums(dcand * rhat),
        sums(dcand),
    )


def packed_weight_grads(h0, hs, o, a, rhat, dhw, du, dcand, reverse):
    """The packed weights' gradients for loops that saved o, a and rhat.

    For the compiled (C++) loops: time-major hs, o, a, rhat (t, b, e) from the
    forward, and the per-step dhw (t, b, 2e), du, dcand (t, b, e) from the
    backward. Returns the gradients of (w_hq, b_hq, w_o, b_o, w_ga, gamma,
    beta), the packed weights of `prepare` (w_hq = [query_kernel | gate_kernel[:e]],
    b_hq = [query_bias | gate_bias], w_ga = gate_kernel[e:]).
    """
    units = hs.shape[-1]
    first = ops.expand_dims(h0, 0)
    h_prev = ops.concatenate(
        [hs[1:], first] if reverse else [first, hs[:-1]], axis=0
    )
    rows = lambda v: ops.reshape(v, (-1, v.shape[-1]))  # noqa: E731
    dhw, du, dcand = rows(dhw), rows(du), rows(dcand)
    return (
        ops.matmul(ops.transpose(rows(h_prev)), dhw),
        ops.sum(dhw, axis=0),
        ops.matmul(ops.transpose(rows(o)), du),
        ops.sum(du, axis=0),
        ops.matmul(ops.transpose(rows(a)), dhw[:, units:]),
        ops.sum(dcand * rows(rhat), axis=0),
        ops.sum(dcand, axis=0),
    )
