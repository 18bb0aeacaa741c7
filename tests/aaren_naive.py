"""Ground truth for Aaren in NumPy float64: naive causal softmax attention
(a (t, t) score matrix per head) and the sequential (m, u, w) recurrence.

Shapes: b batch, t time, n heads, k head dim, d features, e units.
"""

import numpy as np


def prefix_attention(scores, values, mask=None, initial_state=None, reverse=False):
    """o_t = softmax over the valid steps i <= t of s_i, times v_i.

    A non-empty initial state (m0, u0, w0) counts as one more step in front,
    of score m0 + log(u0) and value w0 / u0. Zeros where nothing is valid.
    """
    s = np.asarray(scores, np.float64)
    v = np.asarray(values, np.float64)
    b, t, n = s.shape
    valid = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
    if reverse:
        s, v, valid = s[:, ::-1], v[:, ::-1], valid[:, ::-1]
    logits = np.where(valid[..., None], s, -np.inf).transpose(0, 2, 1)
    # (b, n, t, i): step i as seen from prefix t.
    logits = np.where(np.tril(np.ones((t, t), bool)), logits[:, :, None, :], -np.inf)
    vals = np.broadcast_to(v.transpose(0, 2, 1, 3)[:, :, None], (b, n, t, t, v.shape[-1]))
    if initial_state is not None:
        m0, u0, w0 = (np.asarray(x, np.float64) for x in initial_state)
        with np.errstate(divide="ignore", invalid="ignore"):
            first = np.where(u0 > 0, m0 + np.log(np.where(u0 > 0, u0, 1)), -np.inf)
            v0 = np.where(u0[..., None] > 0, w0 / np.where(u0 > 0, u0, 1)[..., None], 0)
        logits = np.concatenate(
            [np.broadcast_to(first[:, :, None, None], (b, n, t, 1)), logits], -1
        )
        vals = np.concatenate(
            [np.broadcast_to(v0[:, :, None, None], (b, n, t, 1, v.shape[-1])), vals], 3
        )
    top = logits.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        p = np.where(np.isfinite(logits), np.exp(logits - np.where(np.isfinite(top), top, 0)), 0)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bnti,bntik->bntk", p / np.where(total > 0, total, 1), vals)
    out = out.transpose(0, 2, 1, 3)
    return out[:, ::-1] if reverse else out


def recurrence(scores, values, mask=None, initial_state=None, reverse=False):
    """The sequential (m, u, w) recurrence: outputs and the final state.

    The final m is 0 for an empty head (the op's convention).
    """
    s = np.asarray(scores, np.float64)
    v = np.asarray(values, np.float64)
    b, t, n = s.shape
    valid = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
    order = range(t - 1, -1, -1) if reverse else range(t)
    if initial_state is None:
        m = np.full((b, n), -np.inf)
        u = np.zeros((b, n))
        w = np.zeros((b, n, v.shape[-1]))
    else:
        m, u, w = (np.array(x, np.float64) for x in initial_state)
        m = np.where(u > 0, m, -np.inf)
    out = np.zeros(v.shape)
    for i in order:
        keep = valid[:, i, None]
        m_new = np.maximum(m, s[:, i])
        with np.errstate(invalid="ignore"):
            decay = np.where(np.isfinite(m), np.exp(m - m_new), 0.0)
        fresh = np.exp(s[:, i] - m_new)
        u_new = u * decay + fresh
        w_new = w * decay[..., None] + v[:, i] * fresh[..., None]
        m = np.where(keep, m_new, m)
        u = np.where(keep, u_new, u)
        w = np.where(keep[..., None], w_new, w)
        out[:, i] = np.where(u[..., None] > 0, w / np.where(u > 0, u, 1)[..., None], 0)
    return out, (np.where(u > 0, m, 0.0), u, w)


def aaren_layer(x, weights, num_heads, mask=None, go_backwards=False):
    """What `keras.layers.RNN(AarenCell)` returns (with return_sequences).

    `weights`: dict by weight name. Outputs are in processing order (as Keras
    returns them with `go_backwards`); a masked step repeats the previous
    output, zeros before the first valid step.
    """
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    if go_backwards:
        x, valid = x[:, ::-1], valid[:, ::-1]
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    b, t, _ = x.shape
    units = w["value_bias"].shape[0]
    head_dim = units // num_heads
    keys = (x @ w["key_kernel"] + w["key_bias"]).reshape(b, t, num_heads, head_dim)
    scores = (keys * w["query"]).sum(-1) / np.sqrt(head_dim)
    values = (x @ w["value_kernel"] + w["value_bias"]).reshape(b, t, num_heads, head_dim)
    o = prefix_attention(scores, values, valid).reshape(b, t, units)
    y = o @ w["output_kernel"] + w["output_bias"]
    seen = np.cumsum(valid, axis=1) > 0
    return np.where(seen[..., None], y, 0.0)
