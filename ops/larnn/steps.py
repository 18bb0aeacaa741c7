"""LARNN's step (SPEC §3.2) and its hand-written backward, in `keras.ops`.

This is the model's one written math: the portable reference differentiates
`forward_step` with the backend's autodiff, the jax and tensorflow drivers
(`ops/loops/`) run `backward_step` as its VJP, and cells call `larnn_step`.
The only other copy is the torch CPU loop (`torch.py`).

Shapes: b batch, d input features, e units, k window slots, n heads,
h = e / n, P positional features (0 without positional encoding).

The state is `[h (b, e), c (b, e), window (b, k * e), valid (b, k)]`; the
window holds the k most recent cell states, oldest first, and `valid` flags
the slots that hold a real past cell. The newest slot always counts as
valid, so the all-zeros state is the initial state: one valid zero cell.
One step, from (h, c, window, valid) and the input x (b, d):

    M = [window cells, PE(p)]                        (b, k, e + P), p = k .. 1
    q = elu([x, h] @ query_kernel + query_bias)
    K = LN_k(elu(M @ key_kernel + key_bias))         (b, k, e)
    V = LN_v(elu(M @ value_kernel + value_bias))     (b, k, e)
    per head: softmax over the valid slots of <q, K> / sqrt(h), times V
    a = LN_a(elu(heads @ attention_output_kernel + attention_output_bias))
    z = x @ kernel + h @ recurrent_kernel + a @ attention_kernel + bias
    c' = LN_c(sigmoid(z_i) * tanh(z_g) + sigmoid(z_f) * c)
    h' = LN_h(sigmoid(z_o) * elu(c'))
    window' = window without its oldest cell, then c'; the output is h'.

How it is computed: `[cell, PE(p)] @ W = cell @ W_cell + PE(p) @ W_pos`. The
loop carries the key and value projections of the window's cells (`kc`,
`vc`, (b, k, e) each), each cell projected once, when it enters the window;
the positional part plus the bias is a constant (k, e) per half
(`key_slots`, `value_slots`, one row per slot, oldest first). A step then
does O(b k e) elementwise work on the window and four (b, e) x (e, *)
matmuls:

    hw = h @ [query_kernel[d:] | recurrent_kernel]              (b, 5e)
    q = elu(xq + hw[:, :e])                                      xq, xz hoisted
    K, V = LN(elu(kc + key_slots)), LN(elu(vc + value_slots))    (b, k, e)
    p = softmax over valid slots of <q, K> / sqrt(h) per head    (b, k, n)
    o = sum_slots p V;  u = o @ Wo + bo;  a = LN_a(elu(u))
    z = xz + hw[:, e:] + a @ attention_kernel;  i, f, g, o' = gates(z)
    c' = LN_c(i g + f c);  h' = LN_h(o' elu(c'))
    [kc', vc'] = [kc, vc][:, 1:] then c' @ kv_kernel  (the oldest slot drops out)

K and V themselves are never formed (see `window_attention`). The backward
loop rebuilds each step's window from the next one and the slot that dropped
out (saved, (b, 2e) per step), so nothing of size (b, k, e) is saved per
step; the weight gradients of the matmuls are single large matmuls over all
steps afterwards (`backward_finish`).
"""

import math
import sys

import keras
import numpy as np
from keras import ops

from keras_attnrnn.ops import loops

LAYER_NORM_EPSILON = 1e-5

WEIGHT_NAMES = (
    "query_kernel",
    "query_bias",
    "key_kernel",
    "key_bias",
    "value_kernel",
    "value_bias",
    "attention_output_kernel",
    "attention_output_bias",
    "kernel",
    "recurrent_kernel",
    "attention_kernel",
    "bias",
    "key_norm_gamma",
    "key_norm_beta",
    "value_norm_gamma",
    "value_norm_beta",
    "attention_norm_gamma",
    "attention_norm_beta",
    "cell_norm_gamma",
    "cell_norm_beta",
    "hidden_norm_gamma",
    "hidden_norm_beta",
)
"""The weights of a LARNN cell, by their SPEC names.

The key and value norms exist only with `activation_on_keys_and_values=True`.
"""

KEY_VALUE_NORMS = (
    "key_norm_gamma",
    "key_norm_beta",
    "value_norm_gamma",
    "value_norm_beta",
)


def positional_size(window):
    """P = 2 * ceil(log2(4 * window)), the number of positional features."""
    # (int: a size is a tensor while torch.jit traces a graph.)
    return 2 * (4 * int(window) - 1).bit_length()


def positional_features(window):
    """(k, P) NumPy float64: PE(p) of each slot, oldest (p = k) first.

    PE(p) = [cos(2 pi p / 2^i), i = 1..b] ++ [sin(2 pi p / 2^i), i = 2..b+1],
    b = ceil(log2(4k)); the newest slot has p = 1.
    """
    bits = positional_size(window) // 2
    p = np.arange(window, 0, -1, dtype="float64")[:, None]
    cos = np.cos(2 * np.pi * p / 2.0 ** np.arange(1, bits + 1))
    sin = np.sin(2 * np.pi * p / 2.0 ** np.arange(2, bits + 2))
    return np.concatenate([cos, sin], axis=1)


# A score no valid slot reaches: masked slots get a softmax weight of 0.
MASKED_SCORE = -1e9

# The weights as the loops take them (see `prepare`). key_beta adds the same
# <q, beta_k> to every score of a head, which the softmax ignores: its
# gradient is 0 (exactly, in `backward_step`), but it is passed so that it
# is a 0 and not a missing one (Keras optimizers warn about variables
# without a gradient).
STEP_WEIGHTS = (
    "h_kernel",
    "kv_kernel",
    "key_slots",
    "value_slots",
    "output_kernel",
    "output_bias",
    "attention_kernel",
    "key_gamma",
    "key_beta",
    "value_gamma",
    "value_beta",
    "attention_gamma",
    "attention_beta",
    "cell_gamma",
    "cell_beta",
    "hidden_gamma",
    "hidden_beta",
)


def normalize(x, epsilon):
    """(x - mean) * rstd over the last axis, and rstd."""
    centered = x - ops.mean(x, axis=-1, keepdims=True)
    rstd = ops.rsqrt(
        ops.mean(ops.square(centered), axis=-1, keepdims=True) + epsilon
    )
    return centered * rstd, rstd


def normalize_backward(d_xhat, xhat, rstd):
    """The gradient of x from that of xhat = normalize(x)."""
    return rstd * (
        d_xhat
        - ops.mean(d_xhat, axis=-1, keepdims=True)
        - xhat * ops.mean(d_xhat * xhat, axis=-1, keepdims=True)
    )


def elu_grad(activated):
    """elu'(x) from elu(x): 1 where positive, elu(x) + 1 = exp(x) elsewhere."""
    return ops.where(activated > 0, ops.ones_like(activated), activated + 1.0)


def effective_valid(valid):
    """(b, k) booleans, the newest slot always valid."""
    newest = ops.ones_like(valid[:, -1:]) > 0
    return ops.concatenate([valid[:, :-1] > 0.5, newest], axis=-1)


def _heads(v, num_heads):
    """(e,) -> (n, h) and (b, ..., e) -> (b, ..., n, h)."""
    split = (num_heads, v.shape[-1] // num_heads)
    if len(v.shape) == 1:
        return ops.reshape(v, split)
    return ops.reshape(v, (-1,) + tuple(v.shape[1:-1]) + split)


def _flat(v):
    """(b, ..., n, h) -> (b, ..., e)."""
    return ops.reshape(v, (-1,) + tuple(v.shape[1:-2]) + (v.shape[-2] * v.shape[-1],))


def _batch(v):
    """The shape with a free leading (batch) axis: reshape-safe when b is
    unknown at trace time."""
    return (-1,) + tuple(v.shape[1:])


def _stats(act, epsilon):
    """Per-slot LayerNorm mean and rstd over e: (b, k) each."""
    mean = ops.mean(act, axis=-1)
    var = ops.mean(ops.square(act - ops.expand_dims(mean, -1)), axis=-1)
    return mean, ops.rsqrt(var + epsilon)


def _half(cache, slots, activation, epsilon, num_heads):
    """The activated half-window (b, k, n, h) and its statistics."""
    act = cache + slots
    stats = None
    if activation:
        act = ops.elu(act)
        stats = _stats(act, epsilon)
    return _heads(act, num_heads), stats


def window_attention(kc, vc, q, live, w, num_heads, activation, epsilon, adm):
    """The attention read of one step, without forming K or V.

    With K = hat_k * gamma_k + beta_k (hat = the normalized activation), the
    score of a slot is <q * gamma_k, hat_k> per head plus <q, beta_k>, which
    is the same for every slot and drops out of the softmax; and
    sum_slots p V = gamma_v * sum_slots p hat_v + beta_v * sum_slots p.
    hat = (act - mean) * rstd is not formed either: its contractions are
    those of act, corrected with the per-slot statistics.

    Returns:
        `(o, p, u)`: the heads (b, e), the attention weights (b, k, n) before
        dropout, and u = sum_slots p hat_v (b, e) (the heads themselves
        without the activation).
    """
    e = q.shape[-1]
    scale = 1.0 / math.sqrt(e // num_heads)
    act_k, stats_k = _half(kc, w["key_slots"], activation, epsilon, num_heads)
    act_v, stats_v = _half(vc, w["value_slots"], activation, epsilon, num_heads)
    qg = _heads(q * w["key_gamma"] if activation else q, num_heads)  # (b, n, h)
    raw = ops.einsum("bjnh,bnh->bjn", act_k, qg)
    if activation:
        mean, rstd = [ops.expand_dims(v, -1) for v in stats_k]
        raw = rstd * (raw - mean * ops.expand_dims(ops.sum(qg, axis=-1), 1))
        # + <q, beta_k> per head: the same for every slot, so the softmax
        # ignores it, but autodiff then sees key_beta's (zero) gradient.
        raw = raw + ops.expand_dims(
            ops.sum(_heads(q * w["key_beta"], num_heads), axis=-1), 1
        )
    scores = ops.where(ops.expand_dims(live, -1), raw * scale, MASKED_SCORE)
    if scores.shape[1] == 1:  # one slot, always valid: its weight is 1
        p = ops.ones_like(scores)
    else:
        p = ops.softmax(scores, axis=1)
    pd = p if adm is None else p * adm
    if not activation:
        o = _flat(ops.einsum("bjn,bjnh->bnh", pd, act_v))
        return o, p, o
    mean, rstd = [ops.expand_dims(v, -1) for v in stats_v]
    weights = pd * rstd
    u = ops.einsum("bjn,bjnh->bnh", weights, act_v) - ops.expand_dims(
        ops.sum(weights * mean, axis=1), -1
    )
    o = u * _heads(w["value_gamma"], num_heads) + ops.expand_dims(
        ops.sum(pd, axis=1), -1
    ) * _heads(w["value_beta"], num_heads)
    return _flat(o), p, _flat(u)


def window_attention_backward(
    do, kc, vc, q, p, u, w, num_heads, activation, epsilon, adm
):
    """Backpropagates `window_attention`.

    The LayerNorm backward of a slot needs the means over e of d_hat and of
    d_hat * hat; with d_hat = ds * q * gamma_k (keys) or pd * do * gamma_v
    (values) per head, both come from per-head sums that the forward
    contractions already give, so the gradient of each half-window is one
    elementwise pass.

    Returns:
        `(dq, dkc, dvc, grads)`: the gradients of q (b, e), of the cached
        projections (b, k, e) each, and a dict of the gradients of
        key_slots, value_slots (summed over the batch) and, with the
        activation, key_gamma, value_gamma and value_beta.
    """
    e = q.shape[-1]
    scale = 1.0 / math.sqrt(e // num_heads)
    act_k, stats_k = _half(kc, w["key_slots"], activation, epsilon, num_heads)
    act_v, stats_v = _half(vc, w["value_slots"], activation, epsilon, num_heads)
    do_h = _heads(do, num_heads)  # (b, n, h)
    pd = p if adm is None else p * adm
    grads = {}
    if not activation:
        q_h = _heads(q, num_heads)
        dp = ops.einsum("bjnh,bnh->bjn", act_v, do_h)
        if adm is not None:
            dp = dp * adm
        ds = p * (dp - ops.sum(p * dp, axis=1, keepdims=True)) * scale
        dq = _flat(ops.einsum("bjn,bjnh->bnh", ds, act_k))
        dkc = ops.expand_dims(ds, -1) * ops.expand_dims(q_h, 1)
        dvc = ops.expand_dims(pd, -1) * ops.expand_dims(do_h, 1)
        dkc = ops.reshape(dkc, _batch(kc))
        dvc = ops.reshape(dvc, _batch(vc))
        grads["key_slots"] = ops.sum(dkc, axis=0)
        grads["value_slots"] = ops.sum(dvc, axis=0)
        return dq, dkc, dvc, grads

    mean_k, rstd_k = [ops.expand_dims(v, -1) for v in stats_k]  # (b, k, 1)
    mean_v, rstd_v = [ops.expand_dims(v, -1) for v in stats_v]
    inv_e = 1.0 / e
    # The value half: dL/d(pd) = <do * gamma_v, hat_v> + <do, beta_v> per head.
    dg = do_h * _heads(w["value_gamma"], num_heads)  # (b, n, h)
    dg_sum = ops.expand_dims(ops.sum(dg, axis=-1), 1)  # (b, 1, n)
    hv = rstd_v * (ops.einsum("bjnh,bnh->bjn", act_v, dg) - mean_v * dg_sum)
    dp = hv + ops.expand_dims(
        ops.sum(do_h * _heads(w["value_beta"], num_heads), axis=-1), 1
    )
    if adm is not None:
        dp = dp * adm
    ds = p * (dp - ops.sum(p * dp, axis=1, keepdims=True)) * scale  # (b, k, n)
    # The key half: raw = <q * gamma_k, hat_k> per head.
    qg = _heads(q * w["key_gamma"], num_heads)
    qg_sum = ops.expand_dims(ops.sum(qg, axis=-1), 1)  # (b, 1, n)
    raw = rstd_k * (ops.einsum("bjnh,bnh->bjn", act_k, qg) - mean_k * qg_sum)
    ds_r = ds * rstd_k
    t_k = ops.einsum("bjn,bjnh->bnh", ds_r, act_k) - ops.expand_dims(
        ops.sum(ds_r * mean_k, axis=1), -1
    )  # sum_slots ds * hat_k, (b, n, h)
    dq = _flat(t_k * _heads(w["key_gamma"], num_heads))

    def half_backward(act, mean, rstd, weight, row, row_sum, slot_dot):
        # rstd * (d_hat - mean(d_hat) - hat * mean(d_hat * hat)) * elu'(pre)
        a = ops.sum(weight * row_sum, axis=-1, keepdims=True) * inv_e
        b = ops.sum(weight * slot_dot, axis=-1, keepdims=True) * inv_e
        rstd4, mean4 = ops.expand_dims(rstd, -1), ops.expand_dims(mean, -1)
        hat = (act - mean4) * rstd4
        d_act = rstd4 * (
            ops.expand_dims(weight, -1) * ops.expand_dims(row, 1)
            - ops.expand_dims(a, -1)
            - hat * ops.expand_dims(b, -1)
        )
        d_pre = d_act * elu_grad(act)
        return _flat(d_pre)

    dkc = half_backward(act_k, mean_k, rstd_k, ds, qg, qg_sum, raw)
    dvc = half_backward(act_v, mean_v, rstd_v, pd, dg, dg_sum, hv)
    grads["key_slots"] = ops.sum(dkc, axis=0)
    grads["value_slots"] = ops.sum(dvc, axis=0)
    grads["key_gamma"] = ops.sum(q * _flat(t_k), axis=0)
    grads["value_gamma"] = ops.sum(do * u, axis=0)
    p_sum = ops.expand_dims(ops.sum(pd, axis=1), -1)  # (b, n, 1)
    grads["value_beta"] = ops.sum(_flat(do_h * p_sum), axis=0)
    return dq, dkc, dvc, grads


def _split_gates(gates):
    return ops.split(gates, 4, axis=-1)


def forward_step(carry, xs_t, w, extras, config):
    """One step (the driver interface of `ops/loops/`).

    Args:
        carry: (h, c, kc, vc, cells, valid): (b, e), (b, e), (b, k, e),
            (b, k, e), (b, k, e), (b, k) float 0/1.
        xs_t: (xqz, m): the hoisted input projections (b, 5e) (query part,
            then gates part) and the mask (b, 1) bool or None.
        w: the weights, a dict with the keys of `STEP_WEIGHTS`.
        extras: (rdm, adm): the (b, e) recurrent dropout mask and the
            (b, k, n) attention dropout mask, each or None.
        config: (num_heads, epsilon, activation_on_keys_and_values).

    Returns:
        `(carry, outputs)`, outputs = (h, c, q, p, o, u, ua, gates,
        dropped): the state after the step (b, e) twice, then the residuals
        of the backward: the query, the attention weights (b, k, n), the
        heads (b, e) and their normalized part (b, e) (see
        `window_attention`), elu(o @ Wo + bo) (b, e), the activated gates
        [i|f|g|o] (b, 4e) and the oldest slot's projections (b, 2e).
    """
    num_heads, epsilon, activation = config
    rdm, adm = extras
    h, c, kc, vc, cells, valid = carry
    xqz, m = xs_t
    e = h.shape[-1]
    hd = h if rdm is None else h * rdm
    hw = ops.matmul(hd, w["h_kernel"])
    q = ops.elu(xqz[:, :e] + hw[:, :e])
    live = effective_valid(valid)
    o, p, u = window_attention(
        kc, vc, q, live, w, num_heads, activation, epsilon, adm
    )
    ua = ops.elu(ops.matmul(o, w["output_kernel"]) + w["output_bias"])
    a_hat, _ = normalize(ua, epsilon)
    a = a_hat * w["attention_gamma"] + w["attention_beta"]
    z = xqz[:, e:] + hw[:, e:] + ops.matmul(a, w["attention_kernel"])
    z_i, z_f, z_g, z_o = _split_gates(z)
    i, f, g, og = ops.sigmoid(z_i), ops.sigmoid(z_f), ops.tanh(z_g), ops.sigmoid(z_o)
    c_hat, _ = normalize(i * g + f * c, epsilon)
    c_new = c_hat * w["cell_gamma"] + w["cell_beta"]
    y_hat, _ = normalize(og * ops.elu(c_new), epsilon)
    h_new = y_hat * w["hidden_gamma"] + w["hidden_beta"]
    kv_new = ops.matmul(c_new, w["kv_kernel"])
    push = lambda old, new: ops.concatenate(  # noqa: E731
        [old[:, 1:], ops.expand_dims(new, 1)], axis=1
    )
    new_kc = push(kc, kv_new[:, :e])
    new_vc = push(vc, kv_new[:, e:])
    new_cells = push(cells, c_new)
    live_f = ops.cast(live, valid.dtype)
    new_valid = ops.concatenate([live_f[:, 1:], ops.ones_like(valid[:, :1])], -1)
    if m is not None:
        m3 = ops.expand_dims(m, -1)
        h_new = ops.where(m, h_new, h)
        c_new = ops.where(m, c_new, c)
        new_kc = ops.where(m3, new_kc, kc)
        new_vc = ops.where(m3, new_vc, vc)
        new_cells = ops.where(m3, new_cells, cells)
        new_valid = ops.where(m, new_valid, valid)
    gates = ops.concatenate([i, f, g, og], axis=-1)
    dropped = ops.concatenate([kc[:, 0], vc[:, 0]], axis=-1)
    return (h_new, c_new, new_kc, new_vc, new_cells, new_valid), (
        h_new,
        c_new,
        q,
        p,
        o,
        u,
        ua,
        gates,
        dropped,
    )


def _pass_through(m, d):
    """(gradient of the step's update, gradient that skips a masked step)."""
    if m is None:
        return d, None
    if len(d.shape) == 3:
        m = ops.expand_dims(m, -1)
    zeros = ops.zeros_like(d)
    return ops.where(m, d, zeros), ops.where(m, zeros, d)


def _unshift(d):
    """The gradient of a window before a push, from the one after it."""
    return ops.concatenate([ops.zeros_like(d[:, :1]), d[:, :-1]], axis=1)


def backward_step(carry, xs_t, w, extras, config):
    """Backpropagates one step (`extras` and `config` as in `forward_step`).

    Args:
        carry: (dh, dc, dkc, dvc, dcells, dvalid, kc_next, vc_next, sums):
            the gradients of the state after the step, the cached
            projections after the step (to rebuild the ones before it) and a
            dict of running weight-gradient sums (norm scales and offsets,
            the slot constants). The flags only carry a gradient across
            masked steps, where they are passed on as they are.
        xs_t: (d_out, h_prev, c_prev, c_new, q, p, u, ua, gates, dropped,
            m): the output's cotangent, the states before and after the step
            and the residuals of `forward_step`.

    Returns:
        `(carry, (dhw, du, dkv_new))`: the carry for the step before, and the
        per-step gradients from which `backward_finish` forms the matmul weight
        gradients: of hw (b, 5e), which is also that of the hoisted input
        projections, of u (b, e) and of the new slot's projections (b, 2e).
    """
    num_heads, epsilon, activation = config
    rdm, adm = extras
    dh, dc, dkc, dvc, dcells, dvalid, kc_next, vc_next, sums = carry
    d_out, h_prev, c_prev, c_new, q, p, u, ua, gates, dropped, m = xs_t
    e = h_prev.shape[-1]
    dh, dh_skip = _pass_through(m, dh + d_out)
    dc, dc_skip = _pass_through(m, dc)
    dkc, dkc_skip = _pass_through(m, dkc)
    dvc, dvc_skip = _pass_through(m, dvc)
    dcells, dcells_skip = _pass_through(m, dcells)
    dvalid = _pass_through(m, dvalid)[1]
    if dvalid is None:
        dvalid = ops.zeros_like(dkc[:, :, 0])
    unpush = lambda old, nxt: ops.concatenate(  # noqa: E731
        [ops.expand_dims(old, 1), nxt[:, :-1]], axis=1
    )
    kc = unpush(dropped[:, :e], kc_next)
    vc = unpush(dropped[:, e:], vc_next)
    if m is not None:
        kc = ops.where(ops.expand_dims(m, -1), kc, kc_next)
        vc = ops.where(ops.expand_dims(m, -1), vc, vc_next)
    sums = dict(sums)

    # The push: the caches lose their oldest slot and gain c' @ kv_kernel.
    dkv_new = ops.concatenate([dkc[:, -1], dvc[:, -1]], axis=-1)
    dc_new = dc + dcells[:, -1] + ops.matmul(
        dkv_new, ops.transpose(w["kv_kernel"])
    )

    # h' = LN_h(o' elu(c')), c' = LN_c(i g + f c).
    i, f, g, og = _split_gates(gates)
    ec = ops.elu(c_new)
    y_hat, y_rstd = normalize(og * ec, epsilon)
    sums["hidden_gamma"] += ops.sum(dh * y_hat, axis=0)
    sums["hidden_beta"] += ops.sum(dh, axis=0)
    dy = normalize_backward(dh * w["hidden_gamma"], y_hat, y_rstd)
    d_og = dy * ec
    dc_new = dc_new + dy * og * elu_grad(ec)
    c_hat, c_rstd = normalize(i * g + f * c_prev, epsilon)
    sums["cell_gamma"] += ops.sum(dc_new * c_hat, axis=0)
    sums["cell_beta"] += ops.sum(dc_new, axis=0)
    dcpre = normalize_backward(dc_new * w["cell_gamma"], c_hat, c_rstd)
    dz = ops.concatenate(
        [
            dcpre * g * i * (1.0 - i),
            dcpre * c_prev * f * (1.0 - f),
            dcpre * i * (1.0 - g * g),
            d_og * og * (1.0 - og),
        ],
        axis=-1,
    )
    dc_prev = dcpre * f

    # a = LN_a(elu(u)), u = o @ Wo + bo.
    da = ops.matmul(dz, ops.transpose(w["attention_kernel"]))
    a_hat, a_rstd = normalize(ua, epsilon)
    sums["attention_gamma"] += ops.sum(da * a_hat, axis=0)
    sums["attention_beta"] += ops.sum(da, axis=0)
    du = normalize_backward(da * w["attention_gamma"], a_hat, a_rstd) * elu_grad(
        ua
    )
    do = ops.matmul(du, ops.transpose(w["output_kernel"]))

    # The attention over the window, recomputed from the caches.
    dq, dkc_read, dvc_read, window_grads = window_attention_backward(
        do, kc, vc, q, p, u, w, num_heads, activation, epsilon, adm
    )
    for name, grad in window_grads.items():
        sums[name] += grad
    dkc_prev = _unshift(dkc) + dkc_read
    dvc_prev = _unshift(dvc) + dvc_read
    dcells_prev = _unshift(dcells)

    dhw = ops.concatenate([dq * elu_grad(q), dz], axis=-1)
    dh_prev = ops.matmul(dhw, ops.transpose(w["h_kernel"]))
    if rdm is not None:
        dh_prev = dh_prev * rdm
    if m is not None:
        dh_prev = dh_prev + dh_skip
        dc_prev = dc_prev + dc_skip
        dkc_prev = dkc_prev + dkc_skip
        dvc_prev = dvc_prev + dvc_skip
        dcells_prev = dcells_prev + dcells_skip
    carry = (
        dh_prev, dc_prev, dkc_prev, dvc_prev, dcells_prev, dvalid, kc, vc, sums,
    )
    return carry, (dhw, du, dkv_new)


def zero_sums(w, activation):
    """The initial running sums of `backward_step`."""
    names = ["hidden_gamma", "hidden_beta", "cell_gamma", "cell_beta"]
    names += ["attention_gamma", "attention_beta", "key_slots", "value_slots"]
    if activation:
        names += ["key_gamma", "key_beta", "value_gamma", "value_beta"]
    return {name: ops.zeros_like(w[name]) for name in names}


def weight_grads(hd, c_new, o, ua, dhw, du, dkv_new, w, sums, epsilon):
    """The gradients of all step weights, as a dict like `w`.

    The per-step arguments have a leading axis of rows = t * b: the state
    before each step (times the recurrent dropout mask), the cell after it,
    the heads, elu(u), and the per-step gradients of `backward_step`. `sums`
    holds the sums `backward_step` kept.
    """
    e = hd.shape[-1]
    a_hat, _ = normalize(ua, epsilon)
    a = a_hat * w["attention_gamma"] + w["attention_beta"]
    t = ops.transpose
    grads = dict(sums)
    grads["h_kernel"] = ops.matmul(t(hd), dhw)
    grads["kv_kernel"] = ops.matmul(t(c_new), dkv_new)
    grads["output_kernel"] = ops.matmul(t(o), du)
    grads["output_bias"] = ops.sum(du, axis=0)
    grads["attention_kernel"] = ops.matmul(t(a), dhw[:, e:])
    return grads


def prepare(weights, input_dim, slots):
    """The weights of `reference.WEIGHT_NAMES` in the form the loops take.

    Returns:
        `(step_weights, input_kernel, input_bias)`: the dict of
        `STEP_WEIGHTS` (without the norm entries of the keys and values when
        there are no such norms), and the (d, 5e) kernel and (5e,) bias of
        the hoisted input projection (query part, then gates part).
    """
    units = weights["attention_output_kernel"].shape[-1]
    key_kernel, value_kernel = weights["key_kernel"], weights["value_kernel"]
    query_kernel = weights["query_kernel"]
    step = {
        "h_kernel": ops.concatenate(
            [query_kernel[input_dim:], weights["recurrent_kernel"]], axis=1
        ),
        "kv_kernel": ops.concatenate(
            [key_kernel[:units], value_kernel[:units]], axis=1
        ),
        "output_kernel": weights["attention_output_kernel"],
        "output_bias": weights["attention_output_bias"],
        "attention_kernel": weights["attention_kernel"],
        "attention_gamma": weights["attention_norm_gamma"],
        "attention_beta": weights["attention_norm_beta"],
        "cell_gamma": weights["cell_norm_gamma"],
        "cell_beta": weights["cell_norm_beta"],
        "hidden_gamma": weights["hidden_norm_gamma"],
        "hidden_beta": weights["hidden_norm_beta"],
    }
    positions = None
    if key_kernel.shape[0] > units:
        # Cast in NumPy: a float64 constant cast inside the graph made
        # litert-torch's second conversion in a process fail (a float64
        # operand where its lifted copy was float32).
        dtype = keras.backend.standardize_dtype(key_kernel.dtype)
        table = positional_features(slots)
        if dtype in ("float32", "float64"):
            table = table.astype(dtype)
        positions = ops.convert_to_tensor(table, dtype=dtype)
    for half, kernel in (("key", key_kernel), ("value", value_kernel)):
        bias = weights[f"{half}_bias"]
        constant = ops.ones((slots, 1), dtype=bias.dtype) * bias
        if positions is not None:
            constant = constant + ops.matmul(positions, kernel[units:])
        step[f"{half}_slots"] = constant
    if weights.get("key_norm_gamma") is not None:
        step["key_gamma"] = weights["key_norm_gamma"]
        step["key_beta"] = weights["key_norm_beta"]
        step["value_gamma"] = weights["value_norm_gamma"]
        step["value_beta"] = weights["value_norm_beta"]
    input_kernel = ops.concatenate(
        [query_kernel[:input_dim], weights["kernel"]], axis=1
    )
    input_bias = ops.concatenate([weights["query_bias"], weights["bias"]], 0)
    return step, input_kernel, input_bias


def initial_carry(h, c, window, valid, w):
    """The loops' carry from the state: the window's cells are projected
    once for the keys and values, (b, k, e) each."""
    units = h.shape[-1]
    cells = ops.reshape(window, (-1, valid.shape[-1], units))
    kv = ops.matmul(cells, w["kv_kernel"])
    return (h, c, kv[..., :units], kv[..., units:], cells, valid)


def final_state(carry):
    """`[h, c, window, valid]` from the loops' carry."""
    h, c, _, _, cells, valid = carry
    return [h, c, ops.reshape(cells, (-1, cells.shape[1] * cells.shape[2])), valid]


def larnn_step(x_query, x_gates, h, c, window, valid, weights, num_heads,
               recurrent_dropout_mask=None, attention_dropout_mask=None,
               epsilon=LAYER_NORM_EPSILON):
    """One LARNN step for cells: the new state `(h, c, window, valid)`.

    Args:
        x_query: (b, e), x @ query_kernel[:d] + query_bias.
        x_gates: (b, 4e), x @ kernel + bias.
        h, c: (b, e); window: (b, k * e), oldest first; valid: (b, k).
        weights: a mapping from the names of `WEIGHT_NAMES` to tensors;
            positional encoding is on when `key_kernel` has e + P rows,
            the key/value activation when the key norm is present.
        num_heads: n, dividing e.
        recurrent_dropout_mask: optional (b, e) multiplier of h where h
            enters a linear map (the query and the gates).
        attention_dropout_mask: optional (b, k, n) multiplier of the
            attention weights.

    16-bit inputs are computed in float32 and the state cast back.
    """
    dtype = h.dtype
    compute = "float32" if dtype in ("float16", "bfloat16") else dtype
    cast = lambda v: None if v is None else ops.cast(v, compute)  # noqa: E731
    weights = {name: cast(v) for name, v in weights.items() if v is not None}
    units, slots = h.shape[-1], valid.shape[-1]
    input_dim = weights["query_kernel"].shape[0] - units
    w = prepare(weights, input_dim, slots)[0]
    carry = initial_carry(cast(h), cast(c), cast(window), cast(valid), w)
    xqz = ops.concatenate([cast(x_query), cast(x_gates)], axis=-1)
    config = (num_heads, epsilon, "key_gamma" in w)
    extras = (cast(recurrent_dropout_mask), cast(attention_dropout_mask))
    carry, _ = forward_step(carry, (xqz, None), w, extras, config)
    return tuple(ops.cast(v, dtype) for v in final_state(carry))


# The rest of the driver interface (ops/loops/__init__.py).


def residuals(x, state0, ys, final):
    return state0[:2], ys, final[2:4]


def backward_setup(saved, m, w, cotangents, config, reverse):
    (h0, c0), (hs, cs, q, p, o, u, ua, gates, dropped), caches = saved
    d_hs, d_final = cotangents
    h_prev = loops.previous(hs, h0, reverse)
    c_prev = loops.previous(cs, c0, reverse)
    carry = (*d_final, *caches, zero_sums(w, config[2]))
    return carry, (d_hs, h_prev, c_prev, cs, q, p, u, ua, gates, dropped, m)


def backward_finish(saved, m, w, extras, carry, ys, config, reverse):
    (h0, _), (hs, cs, _, _, o, _, ua, _, _), _ = saved
    *d_state0, _, _, sums = carry
    dhw, du, dkv_new = ys
    hd = loops.previous(hs, h0, reverse)
    if extras[0] is not None:
        hd = hd * extras[0]
    rows = loops.rows
    grads = weight_grads(
        rows(hd), rows(cs), rows(o), rows(ua), rows(dhw), rows(du),
        rows(dkv_new), w, sums, config[1],
    )
    return dhw, tuple(d_state0), {name: grads[name] for name in w}


# The implementations of the op: the loop drivers bound to this module.
reference, jax_scan, tensorflow_loop = loops.drivers(sys.modules[__name__])
