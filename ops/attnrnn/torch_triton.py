"""AttnRNN's recurrence as persistent Triton kernels, for torch on CUDA.

The loop-driver signature of `ops/loops/__init__.py`,
`hs, final = attnrnn(x, state0, w, mask, extras, reverse, config)`, with
the input projection already done by the op's front door. The math is
`steps.step` and `steps.backward_step`, written a second time in Triton.

Forward: one program per block of `BLOCK_B` = 16 batch rows loops over all
the steps; the recurrent weights (`hq_kernel` split into its query and gate
halves, `output_kernel`, `gate_a_kernel`, the biases and the LayerNorm's
gamma and beta) are loaded once, before the loop, and stay on chip. The
per-head sums and their expansion back to the units are products with a
(units, heads) 0/1 matrix, so any head count works. Only the states `hs`
are written.

Backward: the same programs walk the steps in the opposite order; each step
is recomputed from its input state (`hs` of the step before, or `state0`)
and backpropagated as `steps.backward_step` does; the kernel writes the
per-step gradients (of x, of the pre-activations hw and u, of the
candidate) and the recomputed o, gelu(u) and the normalized rhat, from which
`steps.packed_grads` forms the weight gradients with one matmul per weight,
as the C++ loop (`torch_cpp`) does.

Units are padded to a power of two (at least 16) inside the kernels; units
above `MAX_UNITS`, recurrent dropout, float64 and traced calls are declined
(`supports`), so the reference serves them. Matrix products use
``input_precision="ieee"`` (Triton's float32 default on NVIDIA GPUs is
TF32).

Status: run only under Triton's interpreter on a CPU so far (docs/triton.md);
the first call on a GPU compares it with the reference (`self_check`) and
declines on any disagreement.
"""

import math

import torch
import triton
import triton.language as tl

from keras_attnrnn.ops import loops
from keras_attnrnn.ops.attnrnn import TRITON_MAX_UNITS as MAX_UNITS
from keras_attnrnn.ops.attnrnn import steps

BLOCK_B = 16
SELF_CHECK_TOLERANCE = 1e-4
_WEIGHTS = (
    "hq_kernel", "hq_bias", "output_kernel", "output_bias", "gate_a_kernel",
    "gamma", "beta",
)


@triton.jit
def _matrix(ptr, row0, col0, stride, rows, cols, E: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The (E, E) block of a row-major matrix at (row0, col0), zero
    outside `rows` x `cols`; transposed with TRANSPOSE."""
    i = tl.arange(0, E)
    if TRANSPOSE:
        r, c = i[None, :], i[:, None]
    else:
        r, c = i[:, None], i[None, :]
    return tl.load(
        ptr + (row0 + r) * stride + col0 + c, mask=(r < rows) & (c < cols), other=0.0
    )


@triton.jit
def _heads(e, dh, E: tl.constexpr, NH: tl.constexpr):
    """The (E, NH) 0/1 matrix of which unit belongs to which head."""
    j = tl.arange(0, E)[:, None]
    i = tl.arange(0, NH)[None, :]
    return tl.where((j < e) & (j // dh == i), 1.0, 0.0)


@triton.jit
def _step(h, x, wq, wgh, bq, bgh, wo, bo, wga, gamma, beta, ind, ind_t, cols,
          e, scale, eps):
    """`steps.step` for (BLOCK_B, E) rows: h_new and what the backward reads."""
    q = tl.dot(h, wq, input_precision="ieee") + bq[None, :]
    hx = h * x
    s_h = tl.dot(q * h, ind, input_precision="ieee") * scale
    s_x = tl.dot(q * x, ind, input_precision="ieee") * scale
    s_p = tl.dot(q * hx, ind, input_precision="ieee") * scale
    s_s = s_h + s_x
    top = tl.maximum(tl.maximum(s_h, s_x), tl.maximum(s_s, s_p))
    p0 = tl.exp(s_h - top)
    p1 = tl.exp(s_x - top)
    p2 = tl.exp(s_s - top)
    p3 = tl.exp(s_p - top)
    total = p0 + p1 + p2 + p3
    p0, p1, p2, p3 = p0 / total, p1 / total, p2 / total, p3 / total
    w_h = tl.dot(p0 + p2, ind_t, input_precision="ieee")
    w_x = tl.dot(p1 + p2, ind_t, input_precision="ieee")
    w_p = tl.dot(p3, ind_t, input_precision="ieee")
    o = w_h * h + w_x * x + w_p * hx
    u = tl.dot(o, wo, input_precision="ieee") + bo[None, :]
    a = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    g = tl.dot(h, wgh, input_precision="ieee") + bgh[None, :]
    g = g + tl.dot(a, wga, input_precision="ieee")
    z = 1.0 / (1.0 + tl.exp(-g))
    r = a + h
    mean = tl.sum(tl.where(cols, r, 0.0), axis=1) / e
    centered = tl.where(cols, r - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / e + eps)
    rhat = centered * rstd[:, None]
    cand = rhat * gamma[None, :] + beta[None, :]
    h_new = h + z * (cand - h)
    return h_new, q, p0, p1, p2, p3, w_h, w_x, w_p, o, u, a, z, rstd, rhat, cand


@triton.jit
def _weights(hq_ptr, bhq_ptr, wo_ptr, bo_ptr, wga_ptr, gamma_ptr, beta_ptr, k, e, dh,
             E: tl.constexpr, NH: tl.constexpr):
    """The step's weights and biases, loaded once per program (both kernels)."""
    wq = _matrix(hq_ptr, 0, 0, 2 * e, e, e, E, False)
    wgh = _matrix(hq_ptr, 0, e, 2 * e, e, e, E, False)
    wo = _matrix(wo_ptr, 0, 0, e, e, e, E, False)
    wga = _matrix(wga_ptr, 0, 0, e, e, e, E, False)
    bq = tl.load(bhq_ptr + k, mask=k < e, other=0.0)
    bgh = tl.load(bhq_ptr + e + k, mask=k < e, other=0.0)
    bo = tl.load(bo_ptr + k, mask=k < e, other=0.0)
    gamma = tl.load(gamma_ptr + k, mask=k < e, other=0.0)
    beta = tl.load(beta_ptr + k, mask=k < e, other=0.0)
    ind = _heads(e, dh, E, NH)
    return wq, wgh, wo, wga, bq, bgh, bo, gamma, beta, ind, tl.trans(ind)


@triton.jit
def _forward_kernel(
    x_ptr, h0_ptr, mask_ptr, hq_ptr, bhq_ptr, wo_ptr, bo_ptr, wga_ptr,
    gamma_ptr, beta_ptr, hs_ptr,
    T, B, e, dh, scale, eps,
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr,
    E: tl.constexpr, NH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.arange(0, E)
    row_ok = rows < B
    cols = (k < e)[None, :]
    ok = row_ok[:, None] & cols
    # The recurrent weights, on chip for the whole loop.
    wq, wgh, wo, wga, bq, bgh, bo, gamma, beta, ind, ind_t = _weights(
        hq_ptr, bhq_ptr, wo_ptr, bo_ptr, wga_ptr, gamma_ptr, beta_ptr, k, e, dh, E, NH
    )
    offsets = rows[:, None].to(tl.int64) * e + k[None, :]
    h = tl.load(h0_ptr + offsets, mask=ok, other=0.0)
    for i in range(0, T):
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        base = t * B * e
        x = tl.load(x_ptr + base + offsets, mask=ok, other=0.0)
        h_new = _step(h, x, wq, wgh, bq, bgh, wo, bo, wga, gamma, beta, ind,
                      ind_t, cols, e, scale, eps)[0]
        if HAS_MASK:
            keep = tl.load(mask_ptr + t * B + rows, mask=row_ok, other=0)
            h_new = tl.where((keep != 0)[:, None], h_new, h)
        h = h_new
        tl.store(hs_ptr + base + offsets, h, mask=ok)


@triton.jit
def _backward_kernel(
    x_ptr, hprev_ptr, mask_ptr, hq_ptr, bhq_ptr, wo_ptr, bo_ptr, wga_ptr,
    gamma_ptr, beta_ptr, dhs_ptr, dlast_ptr,
    dx_ptr, dh0_ptr, dhw_ptr, du_ptr, dcand_ptr, o_ptr, a_ptr, rhat_ptr,
    T, B, e, dh, scale, eps,
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr,
    E: tl.constexpr, NH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.arange(0, E)
    row_ok = rows < B
    cols = (k < e)[None, :]
    ok = row_ok[:, None] & cols
    wq, wgh, wo, wga, bq, bgh, bo, gamma, beta, ind, ind_t = _weights(
        hq_ptr, bhq_ptr, wo_ptr, bo_ptr, wga_ptr, gamma_ptr, beta_ptr, k, e, dh, E, NH
    )
    wq_t = _matrix(hq_ptr, 0, 0, 2 * e, e, e, E, True)
    wgh_t = _matrix(hq_ptr, 0, e, 2 * e, e, e, E, True)
    wo_t = _matrix(wo_ptr, 0, 0, e, e, e, E, True)
    wga_t = _matrix(wga_ptr, 0, 0, e, e, e, E, True)
    offsets = rows[:, None].to(tl.int64) * e + k[None, :]
    wide = rows[:, None].to(tl.int64) * (2 * e) + k[None, :]  # rows of (b, 2e)
    carry = tl.load(dlast_ptr + offsets, mask=ok, other=0.0)
    for i in range(0, T):
        # The steps in the opposite order of the forward.
        if REVERSE:
            t = i
        else:
            t = T - 1 - i
        base = t * B * e
        x = tl.load(x_ptr + base + offsets, mask=ok, other=0.0)
        h = tl.load(hprev_ptr + base + offsets, mask=ok, other=0.0)
        (_, q, p0, p1, p2, p3, w_h, w_x, w_p, o, u, a, z, rstd, rhat,
         cand) = _step(h, x, wq, wgh, bq, bgh, wo, bo, wga, gamma, beta, ind,
                       ind_t, cols, e, scale, eps)
        dh_new = carry + tl.load(dhs_ptr + base + offsets, mask=ok, other=0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + t * B + rows, mask=row_ok, other=0)
            keep = (keep != 0)[:, None]
            dh_carry = tl.where(keep, 0.0, dh_new)
            dh_new = tl.where(keep, dh_new, 0.0)
        dcand = dh_new * z
        dg = dh_new * (cand - h) * z * (1.0 - z)
        drhat = dcand * gamma[None, :]
        mean_d = tl.sum(drhat, axis=1) / e
        mean_dr = tl.sum(drhat * rhat, axis=1) / e
        dr = tl.where(
            cols,
            rstd[:, None] * (drhat - mean_d[:, None] - rhat * mean_dr[:, None]),
            0.0,
        )
        da = dr + tl.dot(dg, wga_t, input_precision="ieee")
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        du = da * (cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327)
        do = tl.dot(du, wo_t, input_precision="ieee")
        hx = h * x
        dp0 = tl.dot(do * h, ind, input_precision="ieee")
        dp1 = tl.dot(do * x, ind, input_precision="ieee")
        dp2 = dp0 + dp1
        dp3 = tl.dot(do * hx, ind, input_precision="ieee")
        dot = p0 * dp0 + p1 * dp1 + p2 * dp2 + p3 * dp3
        ds0 = p0 * (dp0 - dot) * scale
        ds1 = p1 * (dp1 - dot) * scale
        ds2 = p2 * (dp2 - dot) * scale
        ds3 = p3 * (dp3 - dot) * scale
        e_h = tl.dot(ds0 + ds2, ind_t, input_precision="ieee")
        e_x = tl.dot(ds1 + ds2, ind_t, input_precision="ieee")
        e_p = tl.dot(ds3, ind_t, input_precision="ieee")
        dq = e_h * h + e_x * x + e_p * hx
        dh_prev = (
            dh_new * (1.0 - z)
            + dr
            + do * (w_h + w_p * x)
            + q * (e_h + e_p * x)
            + tl.dot(dq, wq_t, input_precision="ieee")
            + tl.dot(dg, wgh_t, input_precision="ieee")
        )
        dx = do * (w_x + w_p * h) + q * (e_x + e_p * h)
        if HAS_MASK:
            dh_prev = dh_prev + dh_carry
        carry = dh_prev
        tl.store(dx_ptr + base + offsets, dx, mask=ok)
        tl.store(dhw_ptr + 2 * base + wide, dq, mask=ok)
        tl.store(dhw_ptr + 2 * base + wide + e, dg, mask=ok)
        tl.store(du_ptr + base + offsets, du, mask=ok)
        tl.store(dcand_ptr + base + offsets, dcand, mask=ok)
        tl.store(o_ptr + base + offsets, o, mask=ok)
        tl.store(a_ptr + base + offsets, a, mask=ok)
        tl.store(rhat_ptr + base + offsets, rhat, mask=ok)
    tl.store(dh0_ptr + offsets, carry, mask=ok)


def _launch(kernel, grid, *args, **meta):
    """`kernel[grid](*args, **meta)` (one place, so tests can spy on it)."""
    return kernel[grid](*args, **meta)


def _meta(units, num_heads, has_mask, reverse):
    return dict(
        HAS_MASK=has_mask,
        REVERSE=reverse,
        BLOCK_B=BLOCK_B,
        E=max(16, triton.next_power_of_2(units)),
        NH=max(16, triton.next_power_of_2(num_heads)),
    )


def _scalars(x, num_heads, epsilon):
    t, b, e = x.shape
    dh = e // num_heads
    return t, b, e, dh, 1.0 / math.sqrt(dh), float(epsilon)


class _AttnRNN(torch.autograd.Function):
    """float32 contiguous time-major x (t, b, e), h0 (b, e), the packed
    weights, mask (t, b) int8 or None, meta (num_heads, reverse, epsilon)."""

    @staticmethod
    def forward(ctx, x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, mask, meta):
        num_heads, reverse, epsilon = meta
        t, b, e = x.shape
        hs = torch.empty_like(x)
        weights = (w_hq, b_hq, w_o, b_o, w_ga, gamma, beta)
        _launch(
            _forward_kernel, (triton.cdiv(b, BLOCK_B),),
            x, h0, x if mask is None else mask, *weights, hs,
            *_scalars(x, num_heads, epsilon),
            **_meta(e, num_heads, mask is not None, reverse),
        )
        ctx.meta = meta
        ctx.save_for_backward(x, h0, hs, mask, *weights)
        return hs, (hs[0] if reverse else hs[-1])

    @staticmethod
    def backward(ctx, d_hs, d_last):
        num_heads, reverse, epsilon = ctx.meta
        x, h0, hs, mask, *weights = ctx.saved_tensors
        t, b, e = x.shape
        d_hs = torch.zeros_like(hs) if d_hs is None else d_hs.contiguous()
        d_last = torch.zeros_like(h0) if d_last is None else d_last.contiguous()
        h_prev = loops.previous(hs, h0, reverse).contiguous()
        dx, du, dcand, o, a, rhat = (torch.empty_like(x) for _ in range(6))
        dh0 = torch.empty_like(h0)
        dhw = x.new_empty((t, b, 2 * e))
        _launch(
            _backward_kernel, (triton.cdiv(b, BLOCK_B),),
            x, h_prev, x if mask is None else mask, *weights, d_hs, d_last,
            dx, dh0, dhw, du, dcand, o, a, rhat,
            *_scalars(x, num_heads, epsilon),
            **_meta(e, num_heads, mask is not None, reverse),
        )
        flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
        d_w = steps.packed_grads(*map(flat, (h_prev, o, a, rhat, dhw, du, dcand)))
        return (dx, dh0, *[d_w[name] for name in _WEIGHTS], None, None)


def attnrnn(x, state0, w, mask, extras, reverse, config):
    """See `ops/loops/__init__.py` (float32, no recurrent dropout)."""
    num_heads, epsilon = config
    units = x.shape[-1]
    if units > MAX_UNITS or units % num_heads:
        raise ValueError(
            f"Received an invalid value for argument `x`: the Triton kernels "
            f"take at most {MAX_UNITS} units divisible by num_heads="
            f"{num_heads}, got shape {tuple(x.shape)}."
        )
    if extras and extras[0] is not None:
        raise ValueError(
            "Received an invalid value for argument `extras`: the Triton "
            "kernels do not apply recurrent dropout (the reference does)."
        )
    m = None if mask is None else mask[..., 0].to(torch.int8).contiguous()
    hs, h_last = _AttnRNN.apply(
        x.contiguous(),
        state0[0].contiguous(),
        *[w[name].contiguous() for name in _WEIGHTS],
        m,
        (num_heads, bool(reverse), float(epsilon)),
    )
    return hs, (h_last,)


def self_check(device):
    """Runs the kernels on a small random case (at `MAX_UNITS` units) on
    `device` and returns the relative error of the outputs, the final state
    and every gradient against `steps.reference` (a dict)."""
    from keras_attnrnn.ops import _triton

    gen = torch.Generator().manual_seed(4321)
    # The largest units served: a GPU with too little shared memory for
    # them fails here, not in a later call.
    t, b, e, heads = 5, 3, MAX_UNITS, 4

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x, h0 = rand(t, b, e), rand(b, e)
    raw = [rand(e, 2 * e, scale=0.3), rand(2 * e, scale=0.1), rand(e, e, scale=0.3),
           rand(e, scale=0.1), rand(e, e, scale=0.3), 1.0 + rand(e, scale=0.1),
           rand(e, scale=0.1)]
    mask = (torch.rand(t, b, 1, generator=gen) > 0.2).to(device)
    cotangents = [rand(t, b, e), rand(b, e)]
    results = {}
    for name, fn in (("triton", attnrnn), ("reference", steps.reference)):
        args = [v.clone().requires_grad_(True) for v in [x, h0] + raw]
        w = dict(zip(_WEIGHTS, args[2:]))
        hs, (last,) = fn(args[0], (args[1],), w, mask, (None,), True, (heads, 1e-5))
        loss = (hs * cotangents[0]).sum() + (last * cotangents[1]).sum()
        results[name] = [hs.detach(), last.detach()] + list(
            torch.autograd.grad(loss, args)
        )
    labels = ["outputs", "final state", "d x", "d state0"] + [f"d {n}" for n in _WEIGHTS]
    return {
        label: _triton.relative_error(got, want)
        for label, got, want in zip(labels, results["triton"], results["reference"])
    }
