"""AttnRNN on torch (CPU): a `torch.autograd.Function` with a hand-written
backward, in raw torch so that each step costs few kernel calls.

The generic Keras loop runs each step through `keras.ops` and autograd, tens of
small ops with Python and autograd overhead each. Here the input projection is
done once, the step uses fused ATen kernels (`addmm`, `native_layer_norm`,
`lerp`, `gelu`, and their backward kernels), the forward saves what the
backward needs, and the backward loop only propagates the state's gradient;
the weight gradients are large matmuls over all steps after it. 16-bit inputs
are computed in float32.

Shapes: b batch, t time, e units, n heads, k = e / n.
"""

import math

import torch
import torch.nn.functional as F

from keras_attnrnn.ops.attnrnn.reference import LAYER_NORM_EPSILON

aten = torch.ops.aten


def _attention(q, tokens, num_heads, scale):
    """The 4-token attention of one step.

    tokens: (b, 3, e) = [h, x, h*x]; the 4 context tokens are h, x, h + x,
    h * x, so the scores and output need only these three.

    Returns:
        `(p, mix, o)`: p (b, 4, n) the softmax, mix (b, 3, e) the weight of
        each of h, x, h*x in o, and o (b, e).
    """
    b, _, e = tokens.shape
    s = (tokens * q.unsqueeze(1)).view(b, 3, num_heads, -1).sum(-1) * scale
    scores = torch.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 1], s[:, 2]], 1)
    p = torch.softmax(scores, dim=1)
    mix = torch.stack([p[:, 0] + p[:, 2], p[:, 1] + p[:, 2], p[:, 3]], 1)
    mix = mix.repeat_interleave(e // num_heads, dim=-1)
    return p, mix, (mix * tokens).sum(1)


class _AttnRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_hq, b_hq, w_o, b_o, w_ga, gamma, beta, m, meta):
        num_heads, reverse, epsilon = meta
        t_len, _, e = x.shape
        scale = 1.0 / math.sqrt(e // num_heads)
        h = h0
        saved = {k: [] for k in ("h", "tok", "q", "p", "mix", "u", "r", "mu", "rstd", "z", "cand")}
        hs = [None] * t_len
        order = range(t_len - 1, -1, -1) if reverse else range(t_len)
        for i in order:
            x_t = x[i]
            hw = torch.addmm(b_hq, h, w_hq)
            q = hw[:, :e]
            tokens = torch.stack([h, x_t, h * x_t], 1)
            p, mix, o = _attention(q, tokens, num_heads, scale)
            u = torch.addmm(b_o, o, w_o)
            a = F.gelu(u)
            z = torch.sigmoid(torch.addmm(hw[:, e:], a, w_ga))
            r = a + h
            cand, mu, rstd = torch.native_layer_norm(r, (e,), gamma, beta, epsilon)
            h_new = torch.lerp(h, cand, z)
            if m is not None:
                h_new = torch.where(m[i], h_new, h)
            for key, value in (("h", h), ("tok", tokens), ("q", q), ("p", p), ("mix", mix), ("u", u), ("r", r), ("mu", mu), ("rstd", rstd), ("z", z), ("cand", cand)):
                saved[key].append(value)
            hs[i] = h = h_new
        ctx.meta = (num_heads, reverse, epsilon, scale)
        ctx.saved = saved
        ctx.save_for_backward(x, w_hq, w_o, w_ga, gamma, m)
        return torch.stack(hs), h

    @staticmethod
    def backward(ctx, d_hs, d_last):
        num_heads, reverse, epsilon, scale = ctx.meta
        x, w_hq, w_o, w_ga, gamma, m = ctx.saved_tensors
        saved = ctx.saved
        t_len, b, e = x.shape
        k = e // num_heads
        w_hq_t, w_o_t, w_ga_t = w_hq.t(), w_o.t(), w_ga.t()
        # Processing order of the forward; the saved lists are in that order.
        steps = list(range(t_len - 1, -1, -1)) if reverse else list(range(t_len))
        dx = torch.empty_like(x)
        d_hw_all, du_all, dcand_all = [], [], []
        dh = d_last
        for j in range(t_len - 1, -1, -1):
            i = steps[j]
            dh_new = dh + d_hs[i]
            h, tokens, q, p, mix = (saved[key][j] for key in ("h", "tok", "q", "p", "mix"))
            z, cand = saved["z"][j], saved["cand"][j]
            if m is not None:
                keep = m[i]
                dh_carry = torch.where(keep, torch.zeros_like(dh_new), dh_new)
                dh_new = torch.where(keep, dh_new, torch.zeros_like(dh_new))
            dcand = dh_new * z
            dg = aten.sigmoid_backward(dh_new * (cand - h), z)
            dr = aten.native_layer_norm_backward(
                dcand, saved["r"][j], (e,), saved["mu"][j], saved["rstd"][j],
                gamma, None, (True, False, False),
            )[0]
            du = aten.gelu_backward(torch.addmm(dr, dg, w_ga_t), saved["u"][j])
            do = torch.mm(du, w_o_t)
            d_mix = (do.unsqueeze(1) * tokens).view(b, 3, num_heads, k).sum(-1)
            dp = torch.stack([d_mix[:, 0], d_mix[:, 1], d_mix[:, 0] + d_mix[:, 1], d_mix[:, 2]], 1)
            ds = aten._softmax_backward_data(dp, p, 1, p.dtype) * scale
            ds3 = torch.stack([ds[:, 0] + ds[:, 2], ds[:, 1] + ds[:, 2], ds[:, 3]], 1)
            ds3 = ds3.repeat_interleave(k, dim=-1)
            dq = (ds3 * tokens).sum(1)
            d_tok = do.unsqueeze(1) * mix + ds3 * q.unsqueeze(1)
            x_t = x[i]
            dx[i] = d_tok[:, 1] + d_tok[:, 2] * h
            d_hw = torch.cat([dq, dg], 1)
            dh = torch.addmm(dh_new - dcand + dr + d_tok[:, 0] + d_tok[:, 2] * x_t, d_hw, w_hq_t)
            if m is not None:
                dh = dh + dh_carry
            d_hw_all.append(d_hw)
            du_all.append(du)
            dcand_all.append(dcand)
        # Weight gradients: one matmul over all t * b rows (backward order).
        d_hw_all = torch.cat(d_hw_all[::-1])
        du_all = torch.cat(du_all[::-1])
        dcand_all = torch.cat(dcand_all[::-1])
        rows = lambda key: torch.cat(saved[key])  # noqa: E731
        h_all = rows("h")
        tok = rows("tok")
        o_all = (rows("mix") * tok).sum(1)
        a_all = F.gelu(rows("u"))
        rhat = (rows("r") - rows("mu")) * rows("rstd")
        d_w_hq = torch.mm(h_all.t(), d_hw_all)
        d_b_hq = d_hw_all.sum(0)
        d_w_o = torch.mm(o_all.t(), du_all)
        d_w_ga = torch.mm(a_all.t(), d_hw_all[:, e:])
        d_gamma = (dcand_all * rhat).sum(0)
        d_beta = dcand_all.sum(0)
        ctx.saved = None
        return (dx, dh, d_w_hq, d_b_hq, d_w_o, du_all.sum(0), d_w_ga, d_gamma, d_beta, None, None)


def attnrnn(
    inputs,
    initial_state,
    query_kernel,
    query_bias,
    output_kernel,
    output_bias,
    gate_kernel,
    gate_bias,
    gamma,
    beta,
    num_heads,
    input_kernel=None,
    input_bias=None,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.attnrnn` (no recurrent dropout)."""
    dtype = inputs.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    cast = lambda v: v.to(compute)  # noqa: E731
    x = cast(inputs)
    if input_kernel is not None:
        x = torch.addmm(cast(input_bias), x.reshape(-1, x.shape[-1]), cast(input_kernel)).view(x.shape[0], x.shape[1], -1)
    units = query_kernel.shape[-1]
    gate_kernel = cast(gate_kernel)
    w_hq = torch.cat([cast(query_kernel), gate_kernel[:units]], 1)
    b_hq = torch.cat([cast(query_bias), cast(gate_bias)])
    m = None
    if mask is not None:
        m = mask.to(torch.bool).t().unsqueeze(-1)
    hs, h_last = _AttnRNN.apply(
        x.transpose(0, 1).contiguous(),
        cast(initial_state),
        w_hq,
        b_hq,
        cast(output_kernel),
        cast(output_bias),
        gate_kernel[units:],
        cast(gamma),
        cast(beta),
        m,
        (num_heads, reverse, float(epsilon)),
    )
    return hs.transpose(0, 1).to(dtype), h_last.to(dtype)
