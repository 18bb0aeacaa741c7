"""Aaren's prefix scan on torch: a chunked scan in whole-tensor ops.

The steps are cut into blocks of `CHUNK` steps. Inside a block every prefix
is exact causal softmax of the fixed query: with mloc_t the running max of
the block's scores, step i weighs exp(s_i - mloc_t) in prefix t (<= 1, and 1
for the max, so no 0/0); a (C, C) weight matrix per block and head gives the
block's prefix states (mloc, uloc, wloc). The block totals, with the initial
state as an extra leaf in front, go through a doubling scan (short: one leaf
per block). The state before each block is then merged with the block's
prefix states: with m = max(M, mloc), the output is
wloc * (e^(mloc - m) / u) + W * (e^(M - m) / u), the small factors computed
first, so the (t, k)-sized tensors see two passes.

No per-step Python loop: a forward is a fixed number of tensor ops, memory
O(t * CHUNK), float32 accumulation for 16-bit inputs. A single step
(streaming) skips the blocks.

Shapes: b batch, t time, n heads, k head dim, N blocks, C steps per block.
"""

import torch

CHUNK = 16  # steps per block; see the table in __init__.py


def _combine(a, b):
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = torch.maximum(m_a, m_b)
    e_a = torch.exp(m_a - m)
    e_b = torch.exp(m_b - m)
    return (
        m,
        u_a * e_a + u_b * e_b,
        w_a * e_a.unsqueeze(-1) + w_b * e_b.unsqueeze(-1),
    )


def _scan_blocks(elems, neg):
    """Inclusive scan of (m, u, w) along axis 2, by doubling (Hillis-Steele).

    log2(N) combines of whole (short) tensors: fewer ops than a recursive
    associative scan, which matters in eager torch.
    """
    blocks = elems[0].shape[2]
    shift = 1
    while shift < blocks:
        m, u, w = elems
        shifted = (
            torch.nn.functional.pad(m[:, :, :-shift], (shift, 0), value=neg),
            torch.nn.functional.pad(u[:, :, :-shift], (shift, 0)),
            torch.nn.functional.pad(w[:, :, :-shift], (0, 0, shift, 0)),
        )
        elems = _combine(shifted, elems)
        shift *= 2
    return elems


def _inverse(u):
    """1 / u, and 0 where u == 0 (an empty state), with finite gradients."""
    nonempty = u > 0
    return torch.where(nonempty, 1.0 / torch.where(nonempty, u, 1.0), 0.0)


def _block_prefix(m, w, valid, neg):
    """Every prefix state inside each block.

    m: (b, n, N, C) scores (`neg` where masked); w: (b, n, N, C, k);
    valid: (b, 1, N, C) booleans, or None when every step counts.
    """
    chunk = m.shape[-1]
    m_run = torch.cummax(m, dim=-1).values
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=m.device).tril()
    if valid is not None:
        keep = keep & valid.unsqueeze(-2)
    # weights[..., t, i] = exp(s_i - mloc_t) for valid i <= t, else 0.
    logits = m.unsqueeze(-2) - m_run.unsqueeze(-1)
    weights = torch.exp(logits.masked_fill(~keep, neg))
    return m_run, weights.sum(-1), torch.matmul(weights, w)


def aaren_scan(scores, values, initial_state=None, mask=None, reverse=False):
    """Same contract as `reference.aaren_scan`."""
    dtype = values.dtype
    compute = (
        torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    )
    neg = torch.finfo(compute).min
    device = values.device
    # Head-major: (b, n, t) and (b, n, t, k).
    m = scores.to(compute).transpose(1, 2)
    w = values.to(compute).permute(0, 2, 1, 3)
    valid = None
    if mask is not None:
        valid = mask.to(torch.bool).unsqueeze(1)
        m = torch.where(valid, m, neg)
    if reverse:
        m, w = m.flip(2), w.flip(2)
        valid = None if valid is None else valid.flip(2)
    batch, heads, time, head_dim = w.shape
    if initial_state is None:
        m0 = torch.full((batch, heads), neg, dtype=compute, device=device)
        u0 = torch.zeros((batch, heads), dtype=compute, device=device)
        w0 = torch.zeros((batch, heads, head_dim), dtype=compute, device=device)
    else:
        m0, u0, w0 = (x.to(compute) for x in initial_state)
        m0 = torch.where(u0 > 0, m0, neg)

    if time == 1:
        ones = torch.ones_like(m) if valid is None else valid.to(compute)
        mt, ut, wt = _combine(
            (m0.unsqueeze(-1), u0.unsqueeze(-1), w0.unsqueeze(-2)),
            (m, ones, w * ones.unsqueeze(-1)),
        )
        outputs = wt * _inverse(ut).unsqueeze(-1)
        final = (mt[..., 0], ut[..., 0], wt[..., 0, :])
    else:
        chunk = min(CHUNK, time)
        blocks = -(-time // chunk)
        pad = blocks * chunk - time
        if pad:
            if valid is None:
                valid = torch.ones(
                    (batch, 1, time), dtype=torch.bool, device=device
                )
            m = torch.nn.functional.pad(m, (0, pad), value=neg)
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
            w = torch.nn.functional.pad(w, (0, 0, 0, pad))
        m = m.reshape(batch, heads, blocks, chunk)
        w = w.reshape(batch, heads, blocks, chunk, head_dim)
        if valid is not None:
            valid = valid.reshape(batch, 1, blocks, chunk)
        m_loc, u_loc, w_loc = _block_prefix(m, w, valid, neg)
        totals = (
            torch.cat([m0.unsqueeze(-1), m_loc[..., -1]], dim=2),
            torch.cat([u0.unsqueeze(-1), u_loc[..., -1]], dim=2),
            torch.cat([w0.unsqueeze(2), w_loc[..., -1, :]], dim=2),
        )
        carry = _scan_blocks(totals, neg)
        # Merge the state before each block with the block's prefixes.
        m_in = carry[0][:, :, :-1, None]
        u_in = carry[1][:, :, :-1, None]
        m_all = torch.maximum(m_in, m_loc)
        e_in = torch.exp(m_in - m_all)
        e_loc = torch.exp(m_loc - m_all)
        inverse = _inverse(u_in * e_in + u_loc * e_loc)
        outputs = torch.addcmul(
            w_loc * (e_loc * inverse).unsqueeze(-1),
            carry[2][:, :, :-1, None, :],
            (e_in * inverse).unsqueeze(-1),
        )
        outputs = outputs.reshape(batch, heads, blocks * chunk, head_dim)
        outputs = outputs[:, :, :time]
        final = (carry[0][:, :, -1], carry[1][:, :, -1], carry[2][:, :, -1])
    if reverse:
        outputs = outputs.flip(2)
    outputs = outputs.permute(0, 2, 1, 3).to(dtype)
    m_t, u_t, w_t = final
    m_t = torch.where(u_t > 0, m_t, 0.0)
    return outputs, (m_t.to(dtype), u_t.to(dtype), w_t.to(dtype))
