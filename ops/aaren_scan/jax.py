"""Aaren's prefix scan on jax: a chunked scan.

The steps are cut into blocks of `CHUNK` steps. Inside a block every prefix
is exact causal softmax of the fixed query: with mloc_t the running max of
the block's scores, step i weighs exp(s_i - mloc_t) in prefix t (<= 1, and 1
for the max, so no 0/0); a (C, C) weight matrix per block and head gives the
block's prefix states (mloc, uloc, wloc). The block totals, with the initial
state as an extra leaf in front, go through a doubling scan (short: one leaf
per block). The state before each block is then merged with the
block's prefix states: with m = max(M, mloc), the output is
wloc * (e^(mloc - m) / u) + W * (e^(M - m) / u).

Work and memory O(t * CHUNK), no per-step loop, float32 accumulation for
16-bit inputs. A single step (streaming) skips the blocks.

Shapes: b batch, t time, n heads, k head dim, N blocks, C steps per block.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

CHUNK = 16  # steps per block; see the table in __init__.py


def _combine(a, b):
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = jnp.maximum(m_a, m_b)
    e_a = jnp.exp(m_a - m)
    e_b = jnp.exp(m_b - m)
    return m, u_a * e_a + u_b * e_b, w_a * e_a[..., None] + w_b * e_b[..., None]


def _scan_blocks(elems, neg):
    """Inclusive scan of (m, u, w) along axis 2, by doubling (Hillis-Steele).

    log2(N) combines of whole (short) tensors: fewer ops to compile than
    `lax.associative_scan`, for the same run time at these sizes.
    """
    blocks = elems[0].shape[2]
    shift = 1
    while shift < blocks:
        m, u, w = elems
        shifted = (
            jnp.pad(m[:, :, :-shift], ((0, 0), (0, 0), (shift, 0)), constant_values=neg),
            jnp.pad(u[:, :, :-shift], ((0, 0), (0, 0), (shift, 0))),
            jnp.pad(w[:, :, :-shift], ((0, 0), (0, 0), (shift, 0), (0, 0))),
        )
        elems = _combine(shifted, elems)
        shift *= 2
    return elems


def _inverse(u):
    """1 / u, and 0 where u == 0 (an empty state), with finite gradients."""
    nonempty = u > 0
    return jnp.where(nonempty, 1.0 / jnp.where(nonempty, u, 1.0), 0.0)


def _block_prefix(m, w, valid, neg):
    """Every prefix state inside each block.

    m: (b, n, N, C) scores (`neg` where masked); w: (b, n, N, C, k);
    valid: (b, 1, N, C) booleans, or None when every step counts.
    """
    chunk = m.shape[-1]
    m_run = lax.cummax(m, axis=m.ndim - 1)
    keep = np.tril(np.ones((chunk, chunk), bool))
    if valid is not None:
        keep = keep & valid[..., None, :]
    # weights[..., t, i] = exp(s_i - mloc_t) for valid i <= t, else 0.
    weights = jnp.exp(
        jnp.where(keep, m[..., None, :] - m_run[..., :, None], neg)
    )
    return m_run, weights.sum(-1), weights @ w


def aaren_scan(scores, values, initial_state=None, mask=None, reverse=False):
    """Same contract as `reference.aaren_scan`."""
    dtype = values.dtype
    compute = jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype
    neg = float(np.finfo(compute).min)
    # Head-major: (b, n, t) and (b, n, t, k).
    m = jnp.swapaxes(jnp.asarray(scores, compute), 1, 2)
    w = jnp.transpose(jnp.asarray(values, compute), (0, 2, 1, 3))
    valid = None
    if mask is not None:
        valid = jnp.asarray(mask, bool)[:, None, :]
        m = jnp.where(valid, m, neg)
    if reverse:
        m, w = jnp.flip(m, 2), jnp.flip(w, 2)
        valid = None if valid is None else jnp.flip(valid, 2)
    batch, heads, time, head_dim = w.shape
    if initial_state is None:
        m0 = jnp.full((batch, heads), neg, compute)
        u0 = jnp.zeros((batch, heads), compute)
        w0 = jnp.zeros((batch, heads, head_dim), compute)
    else:
        m0, u0, w0 = (jnp.asarray(x, compute) for x in initial_state)
        m0 = jnp.where(u0 > 0, m0, neg)

    if time == 1:
        ones = jnp.ones_like(m) if valid is None else valid.astype(compute)
        mt, ut, wt = _combine(
            (m0[..., None], u0[..., None], w0[..., None, :]),
            (m, ones, w * ones[..., None]),
        )
        outputs = wt * _inverse(ut)[..., None]
        final = (mt[..., 0], ut[..., 0], wt[..., 0, :])
    else:
        chunk = min(CHUNK, time)
        blocks = -(-time // chunk)
        pad = blocks * chunk - time
        if pad:
            if valid is None:
                valid = jnp.ones((batch, 1, time), bool)
            m = jnp.pad(m, ((0, 0), (0, 0), (0, pad)), constant_values=neg)
            valid = jnp.pad(valid, ((0, 0), (0, 0), (0, pad)))
            w = jnp.pad(w, ((0, 0), (0, 0), (0, pad), (0, 0)))
        m = m.reshape(batch, heads, blocks, chunk)
        w = w.reshape(batch, heads, blocks, chunk, head_dim)
        if valid is not None:
            valid = valid.reshape(batch, 1, blocks, chunk)
        m_loc, u_loc, w_loc = _block_prefix(m, w, valid, neg)
        totals = (
            jnp.concatenate([m0[..., None], m_loc[..., -1]], axis=2),
            jnp.concatenate([u0[..., None], u_loc[..., -1]], axis=2),
            jnp.concatenate([w0[:, :, None], w_loc[..., -1, :]], axis=2),
        )
        carry = _scan_blocks(totals, neg)
        # Merge the state before each block with the block's prefixes.
        m_in = carry[0][:, :, :-1, None]
        u_in = carry[1][:, :, :-1, None]
        m_all = jnp.maximum(m_in, m_loc)
        e_in = jnp.exp(m_in - m_all)
        e_loc = jnp.exp(m_loc - m_all)
        inverse = _inverse(u_in * e_in + u_loc * e_loc)
        outputs = (
            w_loc * (e_loc * inverse)[..., None]
            + carry[2][:, :, :-1, None, :] * (e_in * inverse)[..., None]
        )
        outputs = outputs.reshape(batch, heads, blocks * chunk, head_dim)
        outputs = outputs[:, :, :time]
        final = (carry[0][:, :, -1], carry[1][:, :, -1], carry[2][:, :, -1])
    if reverse:
        outputs = jnp.flip(outputs, 2)
    outputs = jnp.transpose(outputs, (0, 2, 1, 3)).astype(dtype)
    m_t, u_t, w_t = final
    m_t = jnp.where(u_t > 0, m_t, 0.0)
    return outputs, (m_t.astype(dtype), u_t.astype(dtype), w_t.astype(dtype))
