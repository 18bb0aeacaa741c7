"""Aaren's prefix scan as Triton kernels, for torch tensors on CUDA devices.

Same contract as `reference.aaren_scan` (SPEC §3.3). One program per (batch
row, head) walks the steps in blocks of `CHUNK` = 16, carrying the state
(M, U, W) of the prefix before the block:

    mloc_t = max(M, s_i for valid i <= t in the block)      (running max)
    P[t, i] = exp(s_i - mloc_t) for valid i <= t, else 0      (C, C)
    u_t = U exp(M - mloc_t) + sum_i P[t, i]
    o_t = (W exp(M - mloc_t) + (P @ V)_t) / u_t   (0 while u_t == 0)

Every exponent is <= 0 (the running max bounds it, as in
`reference.combine`), so no score, however large or far apart, overflows;
an empty state (u == 0) has M = the lowest float and weighs nothing. The
forward kernel keeps, per step, mloc_t and 1 / u_t (two floats, not the
(t, k) states); the backward kernel walks the blocks from last to first with
the carry

    R = sum over later steps t of exp(M_end - mloc_t) / u_t * g_t + exp(M_end - m_T) g_w
    Rc = sum over later steps t of exp(M_end - mloc_t) / u_t * <g_t, o_t> - exp(M_end - m_T) g_u

(M_end: the running max after the block), from which

    d v_i = (P^T @ G)_i + exp(s_i - M_end) R,    d s_i = <d v_i, v_i> - (P^T c)_i - exp(s_i - M_end) Rc,

and, after the first block, the gradients of the initial state's w and u
(R and -Rc). The derivative of the final m (a max: it goes to the one step,
or the initial state, that holds the max; ties to the first) is added by a
few torch ops after the kernel.

Matrix products use ``input_precision="ieee"``: Triton's default for
float32 on NVIDIA GPUs is TF32, about 1e-3 relative error.

Shapes: b batch, t time, n heads, k head dim (at most `MAX_HEAD_DIM`).
Inputs are computed in float32 (16-bit ones are cast, results cast back);
`reverse` flips the time axis around the kernels.

Status: run only under Triton's interpreter on a CPU so far (see
docs/triton.md); the first call on a GPU compares it with the reference
(`self_check`) and declines on any disagreement.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from keras_attnrnn.ops.aaren_scan import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM

CHUNK = 16
SELF_CHECK_TOLERANCE = 1e-4
_LOWEST = float(np.finfo(np.float32).min)


@triton.jit
def _forward_kernel(
    s_ptr, v_ptr, valid_ptr, m0_ptr, u0_ptr, w0_ptr,
    o_ptr, mloc_ptr, inv_ptr, m_ptr, u_ptr, w_ptr,
    T, N, K,
    LOWEST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one (batch row, head)
    row = pid // N
    head = pid % N
    j = tl.arange(0, CHUNK)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    causal = j[None, :] <= j[:, None]  # [t, i]: step i is in prefix t
    last = j == CHUNK - 1
    if HAS_STATE:
        u = tl.load(u0_ptr + pid)
        m = tl.where(u > 0, tl.load(m0_ptr + pid), LOWEST)
        w = tl.load(w0_ptr + pid * K + kk, mask=k_ok, other=0.0)
    else:
        u = tl.full([], 0.0, tl.float32)
        m = tl.full([], LOWEST, tl.float32)
        w = tl.full([BLOCK_K], 0.0, tl.float32)
    for start in range(0, T, CHUNK):
        t = start + j
        t_ok = t < T
        ok = t_ok
        if HAS_MASK:
            ok = ok & (tl.load(valid_ptr + row * T + t, mask=t_ok, other=0) != 0)
        idx = (row * T + t) * N + head  # flat (b, t, n)
        tk = idx[:, None] * K + kk[None, :]  # flat (b, t, n, k)
        tk_ok = t_ok[:, None] & k_ok[None, :]
        s = tl.where(ok, tl.load(s_ptr + idx, mask=ok, other=0.0), LOWEST)
        v = tl.load(v_ptr + tk, mask=ok[:, None] & k_ok[None, :], other=0.0)
        keep = causal & ok[None, :]
        mloc = tl.maximum(tl.max(tl.where(keep, s[None, :], LOWEST), axis=1), m)
        p = tl.exp(tl.where(keep, s[None, :] - mloc[:, None], LOWEST))
        e0 = tl.exp(m - mloc)
        u_loc = u * e0 + tl.sum(p, axis=1)
        num = e0[:, None] * w[None, :] + tl.dot(p, v, input_precision="ieee")
        inv = tl.where(u_loc > 0, 1.0 / tl.where(u_loc > 0, u_loc, 1.0), 0.0)
        tl.store(o_ptr + tk, num * inv[:, None], mask=tk_ok)
        tl.store(mloc_ptr + idx, mloc, mask=t_ok)
        tl.store(inv_ptr + idx, inv, mask=t_ok)
        # The block's last prefix (padding steps are empty leaves).
        m = tl.max(mloc, axis=0)
        u = tl.sum(tl.where(last, u_loc, 0.0), axis=0)
        w = tl.sum(tl.where(last[:, None], num, 0.0), axis=0)
    tl.store(m_ptr + pid, m)
    tl.store(u_ptr + pid, u)
    tl.store(w_ptr + pid * K + kk, w, mask=k_ok)


@triton.jit
def _backward_kernel(
    s_ptr, v_ptr, valid_ptr, m0_ptr, u0_ptr, o_ptr, mloc_ptr, inv_ptr, m_ptr,
    go_ptr, gu_ptr, gw_ptr,
    ds_ptr, dv_ptr, du0_ptr, dw0_ptr,
    T, N, K,
    LOWEST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // N
    head = pid % N
    j = tl.arange(0, CHUNK)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    causal = j[None, :] <= j[:, None]
    if HAS_STATE:
        m_first = tl.where(
            tl.load(u0_ptr + pid) > 0, tl.load(m0_ptr + pid), LOWEST
        )
    else:
        m_first = tl.full([], LOWEST, tl.float32)
    m_end = tl.load(m_ptr + pid)  # the final running max (lowest if empty)
    r = tl.load(gw_ptr + pid * K + kk, mask=k_ok, other=0.0)
    rc = -tl.load(gu_ptr + pid)
    blocks = (T + CHUNK - 1) // CHUNK
    for back in range(0, blocks):
        start = (blocks - 1 - back) * CHUNK
        t = start + j
        t_ok = t < T
        ok = t_ok
        if HAS_MASK:
            ok = ok & (tl.load(valid_ptr + row * T + t, mask=t_ok, other=0) != 0)
        idx = (row * T + t) * N + head
        tk = idx[:, None] * K + kk[None, :]
        tk_ok = t_ok[:, None] & k_ok[None, :]
        s = tl.where(ok, tl.load(s_ptr + idx, mask=ok, other=0.0), LOWEST)
        v = tl.load(v_ptr + tk, mask=ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(go_ptr + tk, mask=tk_ok, other=0.0)
        c = tl.sum(g * tl.load(o_ptr + tk, mask=tk_ok, other=0.0), axis=1)
        mloc = tl.load(mloc_ptr + idx, mask=t_ok, other=0.0)
        inv = tl.load(inv_ptr + idx, mask=t_ok, other=0.0)
        # The running max before the block.
        before = (row * T + tl.maximum(start - 1, 0)) * N + head
        m_start = tl.where(start > 0, tl.load(mloc_ptr + before), m_first)
        # (Padding rows t >= T too: their mloc is not a bound.)
        keep = causal & ok[None, :] & t_ok[:, None]
        p = tl.exp(tl.where(keep, s[None, :] - mloc[:, None], LOWEST)) * inv[:, None]
        es = tl.exp(tl.where(ok, s - m_end, LOWEST))
        dv = tl.dot(tl.trans(p), g, input_precision="ieee") + es[:, None] * r[None, :]
        ec = tl.sum(p * c[:, None], axis=0) + es * rc
        tl.store(dv_ptr + tk, dv, mask=tk_ok)
        tl.store(ds_ptr + idx, tl.sum(dv * v, axis=1) - ec, mask=t_ok)
        f = tl.exp(tl.where(t_ok, m_start - mloc, LOWEST)) * inv
        scale = tl.exp(m_start - m_end)
        r = tl.sum(f[:, None] * g, axis=0) + scale * r
        rc = tl.sum(f * c, axis=0) + scale * rc
        m_end = m_start
    if HAS_STATE:
        tl.store(dw0_ptr + pid * K + kk, r, mask=k_ok)
        tl.store(du0_ptr + pid, -rc)


def _launch(kernel, grid, *args, **meta):
    """`kernel[grid](*args, **meta)` (one place, so tests can spy on it)."""
    return kernel[grid](*args, **meta)


def _meta(k, has_mask, has_state):
    return dict(
        LOWEST=_LOWEST,
        HAS_MASK=has_mask,
        HAS_STATE=has_state,
        CHUNK=CHUNK,
        BLOCK_K=max(16, triton.next_power_of_2(k)),
    )


class _AarenScan(torch.autograd.Function):
    """float32, contiguous, time in order: s (b, t, n), v (b, t, n, k),
    valid (b, t) int8 or None, m0, u0 (b, n), w0 (b, n, k) or None."""

    @staticmethod
    def forward(ctx, s, v, valid, m0, u0, w0):
        b, t, n, k = v.shape
        has_mask, has_state = valid is not None, u0 is not None
        o = torch.empty_like(v)
        mloc = torch.empty_like(s)
        inv = torch.empty_like(s)
        m = s.new_empty((b, n))
        u = s.new_empty((b, n))
        w = v.new_empty((b, n, k))
        _launch(
            _forward_kernel, (b * n,),
            s, v, valid if has_mask else s, *((m0, u0, w0) if has_state else (s, s, s)),
            o, mloc, inv, m, u, w, t, n, k, **_meta(k, has_mask, has_state),
        )
        ctx.has = (has_mask, has_state)
        ctx.save_for_backward(s, v, valid, m0, u0, w0, o, mloc, inv, m, u, w)
        # The internal m is the lowest float for an empty head; 0 outside.
        return o, torch.where(u > 0, m, torch.zeros_like(m)), u, w

    @staticmethod
    def backward(ctx, d_o, d_m, d_u, d_w):
        has_mask, has_state = ctx.has
        s, v, valid, m0, u0, w0, o, mloc, inv, m, u, w = ctx.saved_tensors
        b, t, n, k = v.shape
        zeros = lambda x: torch.zeros_like(x)  # noqa: E731
        d_o = zeros(o) if d_o is None else d_o.contiguous()
        d_m = zeros(m) if d_m is None else d_m
        d_u = zeros(u) if d_u is None else d_u.contiguous()
        d_w = zeros(w) if d_w is None else d_w.contiguous()
        ds, dv = torch.empty_like(s), torch.empty_like(v)
        du0 = torch.empty_like(u) if has_state else None
        dw0 = torch.empty_like(w) if has_state else None
        _launch(
            _backward_kernel, (b * n,),
            s, v, valid if has_mask else s, *((m0, u0) if has_state else (s, s)),
            o, mloc, inv, m, d_o, d_u, d_w,
            ds, dv, *((du0, dw0) if has_state else (ds, ds)),
            t, n, k, **_meta(k, has_mask, has_state),
        )
        # The final m is a max: its derivative (with u and w's through
        # their e^(-m)) goes to the step, or initial state, holding it.
        nonempty = u > 0
        d_max = torch.where(nonempty, d_m, zeros(d_m)) - d_u * u - (d_w * w).sum(-1)
        scores = s if valid is None else s.masked_fill(valid[..., None] == 0, -torch.inf)
        best, where = scores.max(dim=1)  # (b, n); the first of ties
        init_wins = (u0 > 0) & (m0 >= best) if has_state else torch.zeros_like(nonempty)
        to_step = nonempty & ~init_wins & (best > -torch.inf)
        ds.scatter_add_(
            1, where[:, None], torch.where(to_step, d_max, zeros(d_max))[:, None]
        )
        dm0 = None
        if has_state:
            dm0 = (dw0 * w0).sum(-1) + du0 * u0
            dm0 = torch.where(init_wins & nonempty, dm0 + d_max, dm0)
            dm0 = torch.where(u0 > 0, dm0, zeros(dm0))
        return ds, dv, None, dm0, du0, dw0


def aaren_scan(scores, values, initial_state=None, mask=None, reverse=False):
    """Same contract as `reference.aaren_scan` (torch tensors, one device)."""
    dtype = values.dtype
    if values.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"Received an invalid value for argument `values`: the Triton "
            f"scan takes a head dim of at most {MAX_HEAD_DIM}, got shape "
            f"{tuple(values.shape)}."
        )
    s = scores.to(torch.float32)
    v = values.to(torch.float32)
    valid = None if mask is None else mask.to(torch.bool)
    if reverse:
        s, v = s.flip(1), v.flip(1)
        valid = None if valid is None else valid.flip(1)
    state = (None, None, None)
    if initial_state is not None:
        state = tuple(x.to(torch.float32).contiguous() for x in initial_state)
    o, m, u, w = _AarenScan.apply(
        s.contiguous(),
        v.contiguous(),
        None if valid is None else valid.to(torch.int8).contiguous(),
        *state,
    )
    if reverse:
        o = o.flip(1)
    return o.to(dtype), (m.to(dtype), u.to(dtype), w.to(dtype))


def self_check(device):
    """Runs the kernels on a small random case on `device` and returns the
    relative error of every output and gradient against
    `reference.aaren_scan` (a dict)."""
    from keras_attnrnn.ops import _triton
    from keras_attnrnn.ops.aaren_scan import reference

    gen = torch.Generator().manual_seed(1234)
    b, t, n, k = 3, 37, 2, 5

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    scores, values = rand(b, t, n) * 3, rand(b, t, n, k)
    mask = (torch.rand(b, t, generator=gen) > 0.2).to(device)
    m0, u0, w0 = rand(b, n), rand(b, n).abs() + 0.5, rand(b, n, k)
    inputs = [scores, values, m0, u0, w0]
    cotangents = [rand(b, t, n, k), rand(b, n), rand(b, n), rand(b, n, k)]
    errors = {}
    results = {}
    for name, fn in (("triton", aaren_scan), ("reference", reference.aaren_scan)):
        args = [x.clone().requires_grad_(True) for x in inputs]
        outputs, state = fn(
            args[0], args[1], initial_state=tuple(args[2:]), mask=mask,
            reverse=True,
        )
        outs = [outputs, *state]
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
        grads = torch.autograd.grad(loss, args)
        results[name] = [x.detach() for x in outs] + list(grads)
    labels = ["outputs", "final m", "final u", "final w"] + [
        f"d {x}" for x in ("scores", "values", "m0", "u0", "w0")
    ]
    for label, got, want in zip(labels, results["triton"], results["reference"]):
        errors[label] = _triton.relative_error(got, want)
    return errors
