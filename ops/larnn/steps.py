"""LARNN's forward and backward step, for implementations with their own VJP.

Written in `keras.ops` and traced once inside a compiled loop (`jax.lax.scan`,
a tensorflow XLA while loop), where `keras.ops` costs nothing at run time.

Shapes: b batch, e units, k window slots, n heads, h = e / n.

What makes it fast: the keys and values of a slot are
`LN(elu([cell, PE(p)] @ W + bias))` and `[cell, PE(p)] @ W = cell @ W_cell +
PE(p) @ W_pos`. The loop carries `kv = cells @ [W_cell_k | W_cell_v]`
(b, k, 2e), each cell projected once, when it enters the window; the
positional part plus the biases is a constant (k, 2e) (`kv_slots`, one row per
slot, oldest first). A step then does O(b k e) elementwise work on the window
and four (b, e) x (e, *) matmuls:

    hw = h @ [query_kernel[d:] | recurrent_kernel]              (b, 5e)
    q = elu(xq + hw[:, :e])                                      xq, xz hoisted
    K, V = LN(elu(kv + kv_slots)) split in two                   (b, k, e) each
    p = softmax over valid slots of <q, K> / sqrt(h) per head    (b, k, n)
    o = sum_slots p V;  u = o @ Wo + bo;  a = LN_a(elu(u))
    z = xz + hw[:, e:] + a @ attention_kernel;  i, f, g, o' = gates(z)
    c' = LN_c(i g + f c);  h' = LN_h(o' elu(c'))
    kv' = [kv[:, 1:], c' @ kv_kernel]  (the oldest slot drops out)

The backward loop rebuilds each step's `kv` from the next one and the slot
that dropped out (saved, (b, 2e) per step), so no (b, k, 2e) tensor is saved
per step; the weight gradients of the matmuls are single large matmuls over
all steps afterwards (`weight_grads`).
"""

import math

from keras import ops

from keras_attnrnn.ops.larnn.reference import positional_features

# A score no valid slot reaches: masked slots get a softmax weight of 0.
MASKED_SCORE = -1e9

# The weights as the loops take them (see `prepare` in the implementations).
STEP_WEIGHTS = (
    "h_kernel",
    "kv_kernel",
    "kv_slots",
    "output_kernel",
    "output_bias",
    "attention_kernel",
    "kv_gamma",
    "kv_beta",
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


def keys_values(kv, w, num_heads, activation, epsilon):
    """K, V (b, k, n, h) from the cached projections kv (b, k, 2e).

    Also returns what the backward needs: the normalized (b, k, 2, e), rstd
    and the activated pre-norm values (None without the activation).
    """
    b, k, two_e = kv.shape
    e = two_e // 2
    pre = kv + w["kv_slots"]
    if activation:
        act = ops.reshape(ops.elu(pre), (-1, k, 2, e))
        hat, rstd = normalize(act, epsilon)
        both = hat * w["kv_gamma"] + w["kv_beta"]
    else:
        act = hat = rstd = None
        both = ops.reshape(pre, (-1, k, 2, e))
    shape = (-1, k, num_heads, e // num_heads)
    keys = ops.reshape(both[:, :, 0], shape)
    values = ops.reshape(both[:, :, 1], shape)
    return keys, values, (hat, rstd, act)


def _split_gates(gates):
    return ops.split(gates, 4, axis=-1)


def forward_step(carry, xs_t, w, num_heads, activation, epsilon, rdm, adm):
    """One step.

    Args:
        carry: (h, c, kv, cells, valid): (b, e), (b, e), (b, k, 2e),
            (b, k, e), (b, k) float 0/1.
        xs_t: (xqz, m): the hoisted input projections (b, 5e) (query part,
            then gates part) and the mask (b, 1) bool or None.
        w: the weights, a dict with the keys of `STEP_WEIGHTS`.
        rdm: (b, e) recurrent dropout mask or None; adm: (b, k, n) attention
            dropout mask or None.

    Returns:
        `(carry, outputs)`, outputs = (h, c, q, p, o, ua, gates, dropped,
        live): the state after the step (b, e) twice, then the residuals of
        the backward: the query, the attention weights (b, k, n), the heads
        (b, e), elu(u) (b, e), the activated gates [i|f|g|o] (b, 4e), the
        slot that dropped out of kv (b, 2e) and the effective validity
        (b, k) as 0/1.
    """
    h, c, kv, cells, valid = carry
    xqz, m = xs_t
    e = h.shape[-1]
    scale = 1.0 / math.sqrt(e // num_heads)
    hd = h if rdm is None else h * rdm
    hw = ops.matmul(hd, w["h_kernel"])
    q = ops.elu(xqz[:, :e] + hw[:, :e])
    live = effective_valid(valid)
    keys, values, _ = keys_values(kv, w, num_heads, activation, epsilon)
    queries = ops.reshape(q, (-1, 1, num_heads, e // num_heads))
    scores = ops.sum(queries * keys, axis=-1) * scale
    scores = ops.where(ops.expand_dims(live, -1), scores, MASKED_SCORE)
    if scores.shape[1] == 1:  # one slot, always valid: its weight is 1
        p = ops.ones_like(scores)
    else:
        p = ops.softmax(scores, axis=1)
    pd = p if adm is None else p * adm
    o = ops.reshape(ops.sum(ops.expand_dims(pd, -1) * values, axis=1), (-1, e))
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
    new_kv = ops.concatenate([kv[:, 1:], ops.expand_dims(kv_new, 1)], axis=1)
    new_cells = ops.concatenate([cells[:, 1:], ops.expand_dims(c_new, 1)], axis=1)
    live_f = ops.cast(live, valid.dtype)
    new_valid = ops.concatenate([live_f[:, 1:], ops.ones_like(valid[:, :1])], -1)
    if m is not None:
        m3 = ops.expand_dims(m, -1)
        h_new = ops.where(m, h_new, h)
        c_new = ops.where(m, c_new, c)
        new_kv = ops.where(m3, new_kv, kv)
        new_cells = ops.where(m3, new_cells, cells)
        new_valid = ops.where(m, new_valid, valid)
    gates = ops.concatenate([i, f, g, og], axis=-1)
    return (h_new, c_new, new_kv, new_cells, new_valid), (
        h_new,
        c_new,
        q,
        p,
        o,
        ua,
        gates,
        kv[:, 0],
        live_f,
    )


def _pass_through(m, d):
    """(gradient of the step's update, gradient that skips a masked step)."""
    if m is None:
        return d, None
    if len(d.shape) == 3:
        m = ops.expand_dims(m, -1)
    zeros = ops.zeros_like(d)
    return ops.where(m, d, zeros), ops.where(m, zeros, d)


def backward_step(carry, xs_t, w, num_heads, activation, epsilon, rdm, adm):
    """Backpropagates one step.

    Args:
        carry: (dh, dc, dkv, dcells, dvalid, kv_next, sums): the gradients
            of the state after the step, the kv after the step (to rebuild
            the one before it) and a dict of running weight-gradient sums
            (norm scales and offsets, `kv_slots`). The flags only carry a
            gradient across masked steps, where they are passed on as they
            are.
        xs_t: (d_out, h_prev, c_prev, c_new, q, p, ua, gates, dropped, live,
            m): the output's cotangent, the states before and after the step
            and the residuals of `forward_step`.

    Returns:
        `(carry, (dhw, du, dkv_new))`: the carry for the step before, and the
        per-step gradients from which `weight_grads` forms the matmul weight
        gradients: of hw (b, 5e), which is also that of the hoisted input
        projections, of u (b, e) and of the new slot's projection (b, 2e).
    """
    dh, dc, dkv, dcells, dvalid, kv_next, sums = carry
    d_out, h_prev, c_prev, c_new, q, p, ua, gates, dropped, live, m = xs_t
    e = h_prev.shape[-1]
    scale = 1.0 / math.sqrt(e // num_heads)
    dh, dh_skip = _pass_through(m, dh + d_out)
    dc, dc_skip = _pass_through(m, dc)
    dkv, dkv_skip = _pass_through(m, dkv)
    dcells, dcells_skip = _pass_through(m, dcells)
    dvalid = _pass_through(m, dvalid)[1]
    if dvalid is None:
        dvalid = ops.zeros_like(dkv[:, :, 0])
    kv = ops.concatenate([ops.expand_dims(dropped, 1), kv_next[:, :-1]], axis=1)
    if m is not None:
        kv = ops.where(ops.expand_dims(m, -1), kv, kv_next)
    sums = dict(sums)

    # The push: kv' = [kv[:, 1:], c' @ kv_kernel], cells' = [cells[:, 1:], c'].
    dkv_new = dkv[:, -1]
    dc_new = dc + dcells[:, -1] + ops.matmul(
        dkv_new, ops.transpose(w["kv_kernel"])
    )
    dkv_prev = ops.concatenate([ops.zeros_like(dkv[:, :1]), dkv[:, :-1]], axis=1)
    dcells_prev = ops.concatenate(
        [ops.zeros_like(dcells[:, :1]), dcells[:, :-1]], axis=1
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

    # The attention over the window, recomputed from kv.
    keys, values, (kv_hat, kv_rstd, kv_act) = keys_values(
        kv, w, num_heads, activation, epsilon
    )
    head = (-1, 1, num_heads, e // num_heads)
    do4 = ops.reshape(do, head)
    pd = p if adm is None else p * adm
    dpd = ops.sum(do4 * values, axis=-1)
    d_values = ops.expand_dims(pd, -1) * do4
    dp = dpd if adm is None else dpd * adm
    ds = p * (dp - ops.sum(p * dp, axis=1, keepdims=True)) * scale
    dq = ops.reshape(ops.sum(ops.expand_dims(ds, -1) * keys, axis=1), (-1, e))
    d_keys = ops.expand_dims(ds, -1) * ops.reshape(q, head)
    slots = kv.shape[1]
    d_both = ops.stack(
        [
            ops.reshape(d_keys, (-1, slots, e)),
            ops.reshape(d_values, (-1, slots, e)),
        ],
        axis=2,
    )
    if activation:
        sums["kv_gamma"] += ops.sum(d_both * kv_hat, axis=(0, 1))
        sums["kv_beta"] += ops.sum(d_both, axis=(0, 1))
        d_pre = normalize_backward(
            d_both * w["kv_gamma"], kv_hat, kv_rstd
        ) * elu_grad(kv_act)
    else:
        d_pre = d_both
    d_pre = ops.reshape(d_pre, (-1, slots, 2 * e))
    sums["kv_slots"] += ops.sum(d_pre, axis=0)
    dkv_prev = dkv_prev + d_pre

    dhw = ops.concatenate([dq * elu_grad(q), dz], axis=-1)
    dh_prev = ops.matmul(dhw, ops.transpose(w["h_kernel"]))
    if rdm is not None:
        dh_prev = dh_prev * rdm
    if m is not None:
        dh_prev = dh_prev + dh_skip
        dc_prev = dc_prev + dc_skip
        dkv_prev = dkv_prev + dkv_skip
        dcells_prev = dcells_prev + dcells_skip
    return (dh_prev, dc_prev, dkv_prev, dcells_prev, dvalid, kv, sums), (
        dhw,
        du,
        dkv_new,
    )


def zero_sums(w, activation):
    """The initial running sums of `backward_step`."""
    names = ["hidden_gamma", "hidden_beta", "cell_gamma", "cell_beta"]
    names += ["attention_gamma", "attention_beta", "kv_slots"]
    if activation:
        names += ["kv_gamma", "kv_beta"]
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
        `STEP_WEIGHTS` (without the key/value norm entries when there are no
        key/value norms), and the (d, 5e) kernel and (5e,) bias of the
        hoisted input projection (query part, then gates part).
    """
    units = weights["attention_output_kernel"].shape[-1]
    key_kernel, value_kernel = weights["key_kernel"], weights["value_kernel"]
    query_kernel = weights["query_kernel"]
    kv_bias = ops.concatenate([weights["key_bias"], weights["value_bias"]], 0)
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
    ones = ops.ones((slots, 1), dtype=kv_bias.dtype)
    step["kv_slots"] = ones * kv_bias
    if key_kernel.shape[0] > units:
        positions = ops.convert_to_tensor(
            positional_features(slots), dtype=kv_bias.dtype
        )
        positional_kernel = ops.concatenate(
            [key_kernel[units:], value_kernel[units:]], axis=1
        )
        step["kv_slots"] += ops.matmul(positions, positional_kernel)
    if weights.get("key_norm_gamma") is not None:
        step["kv_gamma"] = ops.stack(
            [weights["key_norm_gamma"], weights["value_norm_gamma"]]
        )
        step["kv_beta"] = ops.stack(
            [weights["key_norm_beta"], weights["value_norm_beta"]]
        )
    input_kernel = ops.concatenate(
        [query_kernel[:input_dim], weights["kernel"]], axis=1
    )
    input_bias = ops.concatenate([weights["query_bias"], weights["bias"]], 0)
    return step, input_kernel, input_bias
