"""Aaren's prefix scan on tensorflow: a chunked scan.

The same algorithm as `jax.py`: exact causal softmax of the fixed query
inside blocks of `CHUNK` steps (a (C, C) weight matrix per block and head,
built from the block's running max, so every weight is <= 1 and the max has
weight 1), then a doubling scan over the block totals with the initial
state as an extra leaf in front, then one merge of the state before each
block with the block's prefix states. Works with a time dimension unknown
when the graph is traced (the padding to whole blocks is computed at run
time). Memory O(t * CHUNK); float32 accumulation for 16-bit inputs. A single
step (streaming) skips the blocks.

Shapes: b batch, t time, n heads, k head dim, N blocks, C steps per block.
"""

import numpy as np
import tensorflow as tf

CHUNK = 32  # steps per block; see the table in __init__.py


def _combine(a, b):
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = tf.maximum(m_a, m_b)
    e_a = tf.exp(m_a - m)
    e_b = tf.exp(m_b - m)
    return m, u_a * e_a + u_b * e_b, w_a * e_a[..., None] + w_b * e_b[..., None]


def _inverse(u):
    """1 / u, and 0 where u == 0 (an empty state), with finite gradients."""
    nonempty = u > 0
    ones = tf.ones_like(u)
    return tf.where(nonempty, ones / tf.where(nonempty, u, ones), tf.zeros_like(u))


def _shift_in(elems, shift, neg):
    """Each (m, u, w) moved `shift` blocks later; empty leaves in front."""
    m, u, w = elems
    front = tf.concat([tf.shape(m)[:2], [shift]], 0)
    return (
        tf.concat([tf.fill(front, tf.constant(neg, m.dtype)), m[:, :, :-shift]], 2),
        tf.concat([tf.zeros(front, u.dtype), u[:, :, :-shift]], 2),
        tf.concat(
            [tf.zeros(tf.concat([front, tf.shape(w)[3:]], 0), w.dtype), w[:, :, :-shift]],
            2,
        ),
    )


def _scan_blocks(elems, neg):
    """Inclusive scan of (m, u, w) along axis 2, by doubling (Hillis-Steele).

    log2(N) combines of whole tensors; a `tf.while_loop` when N is unknown
    when the graph is traced (`keras.ops.associative_scan` needs it static).
    """
    blocks = elems[0].shape[2]
    if blocks is not None:
        shift = 1
        while shift < blocks:
            elems = _combine(_shift_in(elems, shift, neg), elems)
            shift *= 2
        return elems
    blocks = tf.shape(elems[0])[2]
    shapes = tuple(tf.TensorShape([None] * len(e.shape)) for e in elems)

    def body(shift, *elems):
        return (shift * 2, *_combine(_shift_in(elems, shift, neg), elems))

    _, *elems = tf.while_loop(
        lambda shift, *_: shift < blocks,
        body,
        (tf.constant(1), *elems),
        shape_invariants=(tf.TensorShape([]), *shapes),
    )
    return tuple(elems)


def _running_max(m, neg):
    """cummax over the last (static) axis, by doubling (log2 C maxima)."""
    chunk = m.shape[-1]
    shift = 1
    while shift < chunk:
        filler = tf.fill(tf.concat([tf.shape(m)[:-1], [shift]], 0), neg)
        m = tf.maximum(m, tf.concat([filler, m[..., :-shift]], axis=-1))
        shift *= 2
    return m


def _block_prefix(m, w, valid, neg):
    """Every prefix state inside each block.

    m: (b, n, N, C) scores (`neg` where masked); w: (b, n, N, C, k);
    valid: (b, 1, N, C) booleans, or None when every step counts.
    """
    chunk = m.shape[-1]
    m_run = _running_max(m, neg)
    keep = tf.constant(np.tril(np.ones((chunk, chunk), bool)))
    if valid is not None:
        keep = tf.logical_and(keep, valid[..., None, :])
    # weights[..., t, i] = exp(s_i - mloc_t) for valid i <= t, else 0.
    logits = m[..., None, :] - m_run[..., :, None]
    weights = tf.exp(tf.where(keep, logits, neg))
    return m_run, tf.reduce_sum(weights, -1), tf.matmul(weights, w)


def aaren_scan(scores, values, initial_state=None, mask=None, reverse=False):
    """Same contract as `reference.aaren_scan`."""
    values = tf.convert_to_tensor(values)
    dtype = values.dtype
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
    neg = compute.min
    # Head-major: (b, n, t) and (b, n, t, k).
    m = tf.transpose(tf.cast(scores, compute), (0, 2, 1))
    w = tf.transpose(tf.cast(values, compute), (0, 2, 1, 3))
    valid = None
    if mask is not None:
        valid = tf.cast(mask, tf.bool)[:, None, :]
        m = tf.where(valid, m, neg)
    if reverse:
        m, w = tf.reverse(m, [2]), tf.reverse(w, [2])
        valid = None if valid is None else tf.reverse(valid, [2])
    shape = tf.shape(w)
    batch, heads, steps, head_dim = shape[0], shape[1], shape[2], w.shape[3]
    time = w.shape[2]
    if initial_state is None:
        m0 = tf.fill([batch, heads], tf.constant(neg, compute))
        u0 = tf.zeros([batch, heads], compute)
        w0 = tf.zeros([batch, heads, head_dim], compute)
    else:
        m0, u0, w0 = (tf.cast(x, compute) for x in initial_state)
        m0 = tf.where(u0 > 0, m0, neg)

    if time == 1:
        ones = tf.ones_like(m) if valid is None else tf.cast(valid, compute)
        mt, ut, wt = _combine(
            (m0[..., None], u0[..., None], w0[..., None, :]),
            (m, ones, w * ones[..., None]),
        )
        outputs = wt * _inverse(ut)[..., None]
        final = (mt[..., 0], ut[..., 0], wt[..., 0, :])
    else:
        chunk = CHUNK if time is None else min(CHUNK, time)
        blocks = (steps + chunk - 1) // chunk
        pad = blocks * chunk - steps
        if time is None or time % chunk:
            if valid is None:
                valid = tf.ones([batch, 1, steps], tf.bool)
            m = tf.pad(m, [[0, 0], [0, 0], [0, pad]], constant_values=neg)
            valid = tf.pad(valid, [[0, 0], [0, 0], [0, pad]])
            w = tf.pad(w, [[0, 0], [0, 0], [0, pad], [0, 0]])
        m = tf.reshape(m, [batch, heads, blocks, chunk])
        w = tf.reshape(w, [batch, heads, blocks, chunk, head_dim])
        if valid is not None:
            valid = tf.reshape(valid, [batch, 1, blocks, chunk])
        m_loc, u_loc, w_loc = _block_prefix(m, w, valid, neg)
        totals = (
            tf.concat([m0[..., None], m_loc[..., -1]], axis=2),
            tf.concat([u0[..., None], u_loc[..., -1]], axis=2),
            tf.concat([w0[:, :, None], w_loc[..., -1, :]], axis=2),
        )
        carry = _scan_blocks(totals, neg)
        # Merge the state before each block with the block's prefixes.
        m_in = carry[0][:, :, :-1, None]
        u_in = carry[1][:, :, :-1, None]
        m_all = tf.maximum(m_in, m_loc)
        e_in = tf.exp(m_in - m_all)
        e_loc = tf.exp(m_loc - m_all)
        inverse = _inverse(u_in * e_in + u_loc * e_loc)
        outputs = (
            w_loc * (e_loc * inverse)[..., None]
            + carry[2][:, :, :-1, None, :] * (e_in * inverse)[..., None]
        )
        outputs = tf.reshape(outputs, [batch, heads, blocks * chunk, head_dim])
        outputs = outputs[:, :, :steps]
        final = (carry[0][:, :, -1], carry[1][:, :, -1], carry[2][:, :, -1])
    if reverse:
        outputs = tf.reverse(outputs, [2])
    outputs = tf.cast(tf.transpose(outputs, (0, 2, 1, 3)), dtype)
    m_t, u_t, w_t = final
    m_t = tf.where(u_t > 0, m_t, tf.zeros_like(m_t))
    return outputs, tuple(tf.cast(x, dtype) for x in (m_t, u_t, w_t))
