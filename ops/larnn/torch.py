"""LARNN on torch (CPU): a `torch.autograd.Function` with a hand-written
backward, in raw torch so that each step costs few kernel calls.

The math and the structure are those of `steps.py` (the jax and tensorflow
implementations): the loop carries the window's key/value projections, each
cell projected once when it enters the window; the forward saves only
(b, *)-sized residuals per step; the backward loop rebuilds each step's
window from the next one and the slot that dropped out, uses ATen's fused
backward kernels (`native_layer_norm_backward`, `elu_backward`,
`_softmax_backward_data`, ...), and leaves the weight gradients of the
matmuls to single large matmuls over all steps. The weight packing and the
input projections stay outside, where autograd differentiates them. 16-bit
inputs are computed in float32.

Shapes: b batch, t time, e units, k window slots, n heads, h = e / n.
"""

import math

import torch
import torch.nn.functional as F

from keras_attnrnn.ops.larnn import steps
from keras_attnrnn.ops.larnn.reference import LAYER_NORM_EPSILON

aten = torch.ops.aten

_SAVED = ("hs", "cs", "q", "p", "o", "ua", "gates", "dropped", "live")


def _keys_values(kv, kv_slots, kv_gamma, kv_beta, num_heads, epsilon):
    """K, V (b, k, n, h) from the cached projections kv (b, k, 2e).

    Also returns what the backward needs: (activated, normalized, mean,
    rstd), each (b, k, 2, *), or None without the activation.
    """
    b, k, two_e = kv.shape
    e = two_e // 2
    pre = kv + kv_slots
    if kv_gamma is None:
        both = pre.view(b, k, 2, num_heads, e // num_heads)
        return both[:, :, 0], both[:, :, 1], None
    act = F.elu(pre).view(b, k, 2, e)
    hat, mean, rstd = torch.native_layer_norm(act, (e,), None, None, epsilon)
    both = torch.addcmul(kv_beta, hat, kv_gamma)
    both = both.view(b, k, 2, num_heads, e // num_heads)
    return both[:, :, 0], both[:, :, 1], (act, hat, mean, rstd)


class _LARNN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        xqz,
        h0,
        c0,
        kv0,
        cells0,
        valid0,
        h_kernel,
        kv_kernel,
        kv_slots,
        w_o,
        b_o,
        w_att,
        kv_gamma,
        kv_beta,
        g_a,
        b_a,
        g_c,
        b_c,
        g_h,
        b_h,
        m,
        rdm,
        adm,
        meta,
    ):
        num_heads, reverse, epsilon = meta
        t_len, b, _ = xqz.shape
        e = h0.shape[-1]
        k = valid0.shape[-1]
        head = e // num_heads
        scale = 1.0 / math.sqrt(head)
        new = lambda *s: xqz.new_empty((t_len,) + s)  # noqa: E731
        saved = {
            "hs": new(b, e),
            "cs": new(b, e),
            "q": new(b, e),
            "p": new(b, k, num_heads),
            "o": new(b, e),
            "ua": new(b, e),
            "gates": new(b, 4 * e),
            "dropped": new(b, 2 * e),
            "live": torch.empty((t_len, b, k), dtype=torch.bool),
        }
        h, c, kv, cells = h0, c0, kv0, cells0
        valid = valid0 > 0.5
        newest = torch.ones((b, 1), dtype=torch.bool)
        order = range(t_len - 1, -1, -1) if reverse else range(t_len)
        for i in order:
            live = torch.cat([valid[:, :-1], newest], 1)
            hd = h if rdm is None else h * rdm
            hw = torch.mm(hd, h_kernel)
            q = F.elu(xqz[i, :, :e] + hw[:, :e])
            keys, values, _ = _keys_values(
                kv, kv_slots, kv_gamma, kv_beta, num_heads, epsilon
            )
            scores = (q.view(b, 1, num_heads, head) * keys).sum(-1) * scale
            scores.masked_fill_(~live.unsqueeze(-1), steps.MASKED_SCORE)
            p = torch.softmax(scores, dim=1)
            pd = p if adm is None else p * adm
            o = (pd.unsqueeze(-1) * values).sum(1).view(b, e)
            ua = F.elu(torch.addmm(b_o, o, w_o))
            a = F.layer_norm(ua, (e,), g_a, b_a, epsilon)
            z = torch.addmm(xqz[i, :, e:] + hw[:, e:], a, w_att)
            gates = torch.sigmoid(z)
            gates[:, 2 * e : 3 * e] = torch.tanh(z[:, 2 * e : 3 * e])
            gi, gf, gg, go = gates.split(e, 1)
            c_new = F.layer_norm(
                torch.addcmul(gi * gg, gf, c), (e,), g_c, b_c, epsilon
            )
            h_new = F.layer_norm(go * F.elu(c_new), (e,), g_h, b_h, epsilon)
            kv_new = torch.mm(c_new, kv_kernel)
            saved["dropped"][i] = kv[:, 0]
            new_kv = torch.cat([kv[:, 1:], kv_new.unsqueeze(1)], 1)
            new_cells = torch.cat([cells[:, 1:], c_new.unsqueeze(1)], 1)
            new_valid = torch.cat([live[:, 1:], newest], 1)
            if m is not None:
                keep = m[i]
                h_new = torch.where(keep, h_new, h)
                c_new = torch.where(keep, c_new, c)
                new_kv = torch.where(keep.unsqueeze(-1), new_kv, kv)
                new_cells = torch.where(keep.unsqueeze(-1), new_cells, cells)
                new_valid = torch.where(keep, new_valid, valid)
            for key, value in (
                ("hs", h_new),
                ("cs", c_new),
                ("q", q),
                ("p", p),
                ("o", o),
                ("ua", ua),
                ("gates", gates),
                ("live", live),
            ):
                saved[key][i] = value
            h, c, kv, cells, valid = h_new, c_new, new_kv, new_cells, new_valid
        ctx.meta = meta
        ctx.saved = saved
        ctx.state0 = (h0, c0)
        ctx.kv_last = kv
        ctx.masks = (m, rdm, adm)
        ctx.weights = (
            h_kernel, kv_kernel, kv_slots, w_o, w_att, kv_gamma, kv_beta,
            g_a, b_a, g_c, b_c, g_h, b_h,
        )
        return saved["hs"], h, c, cells, valid.to(xqz.dtype)

    @staticmethod
    def backward(ctx, d_hs, dh, dc, dcells, dvalid):
        num_heads, reverse, epsilon = ctx.meta
        s = ctx.saved
        h0, c0 = ctx.state0
        m, rdm, adm = ctx.masks
        (
            h_kernel, kv_kernel, kv_slots, w_o, w_att, kv_gamma, kv_beta,
            g_a, b_a, g_c, b_c, g_h, b_h,
        ) = ctx.weights
        t_len, b, e = s["hs"].shape
        k = s["live"].shape[-1]
        head = e // num_heads
        scale = 1.0 / math.sqrt(head)
        zeros = lambda v: torch.zeros_like(v)  # noqa: E731
        dh = zeros(h0) if dh is None else dh
        dc = zeros(c0) if dc is None else dc
        dcells = zeros(ctx.kv_last[..., :e]) if dcells is None else dcells
        dvalid = zeros(ctx.kv_last[..., 0]) if dvalid is None else dvalid
        d_hs = zeros(s["hs"]) if d_hs is None else d_hs
        dkv = zeros(ctx.kv_last)
        kv_next = ctx.kv_last
        kv_kernel_t, w_o_t, w_att_t = kv_kernel.t(), w_o.t(), w_att.t()
        h_kernel_t = h_kernel.t()
        sums = {
            "kv_slots": zeros(kv_slots),
            "kv_gamma": None if kv_gamma is None else zeros(kv_gamma),
            "kv_beta": None if kv_beta is None else zeros(kv_beta),
            "g_a": zeros(g_a), "b_a": zeros(b_a),
            "g_c": zeros(g_c), "b_c": zeros(b_c),
            "g_h": zeros(g_h), "b_h": zeros(b_h),
        }
        dhw_all = d_hs.new_empty((t_len, b, 5 * e))
        du_all = d_hs.new_empty((t_len, b, e))
        dkv_new_all = d_hs.new_empty((t_len, b, 2 * e))
        forward_order = range(t_len - 1, -1, -1) if reverse else range(t_len)
        for i in reversed(forward_order):
            j = i + 1 if reverse else i - 1  # the step before, in time
            c_prev = c0 if j in (-1, t_len) else s["cs"][j]
            dh = dh + d_hs[i]
            kv = torch.cat([s["dropped"][i].unsqueeze(1), kv_next[:, :-1]], 1)
            if m is not None:
                keep = m[i]
                keep3 = keep.unsqueeze(-1)
                skips = [
                    torch.where(keep, 0.0, dh),
                    torch.where(keep, 0.0, dc),
                    torch.where(keep3, 0.0, dkv),
                    torch.where(keep3, 0.0, dcells),
                ]
                dh = torch.where(keep, dh, 0.0)
                dc = torch.where(keep, dc, 0.0)
                dkv = torch.where(keep3, dkv, 0.0)
                dcells = torch.where(keep3, dcells, 0.0)
                dvalid = torch.where(keep, 0.0, dvalid)
                kv = torch.where(keep3, kv, kv_next)
            else:
                dvalid = zeros(dvalid)

            # The push.
            dkv_new = dkv[:, -1]
            dc_new = torch.addmm(dc + dcells[:, -1], dkv_new, kv_kernel_t)
            dkv_prev = torch.cat([zeros(dkv[:, :1]), dkv[:, :-1]], 1)
            dcells_prev = torch.cat([zeros(dcells[:, :1]), dcells[:, :-1]], 1)

            # h' = LN_h(o' elu(c')), c' = LN_c(i g + f c).
            c_new = s["cs"][i]
            gates = s["gates"][i]
            gi, gf, gg, go = gates.split(e, 1)
            ec = F.elu(c_new)
            y = go * ec
            _, mean, rstd = torch.native_layer_norm(y, (e,), g_h, b_h, epsilon)
            dy, dg, db = aten.native_layer_norm_backward(
                dh, y, (e,), mean, rstd, g_h, b_h, (True, True, True)
            )
            sums["g_h"] += dg
            sums["b_h"] += db
            dc_new = dc_new + aten.elu_backward(dy * go, 1.0, 1.0, 1.0, True, ec)
            cpre = torch.addcmul(gi * gg, gf, c_prev)
            _, mean, rstd = torch.native_layer_norm(cpre, (e,), g_c, b_c, epsilon)
            dcpre, dg, db = aten.native_layer_norm_backward(
                dc_new, cpre, (e,), mean, rstd, g_c, b_c, (True, True, True)
            )
            sums["g_c"] += dg
            sums["b_c"] += db
            dz = torch.cat(
                [
                    aten.sigmoid_backward(dcpre * gg, gi),
                    aten.sigmoid_backward(dcpre * c_prev, gf),
                    aten.tanh_backward(dcpre * gi, gg),
                    aten.sigmoid_backward(dy * ec, go),
                ],
                1,
            )
            dc_prev = dcpre * gf

            # a = LN_a(elu(u)), u = o @ Wo + bo.
            da = torch.mm(dz, w_att_t)
            ua = s["ua"][i]
            _, mean, rstd = torch.native_layer_norm(ua, (e,), g_a, b_a, epsilon)
            dua, dg, db = aten.native_layer_norm_backward(
                da, ua, (e,), mean, rstd, g_a, b_a, (True, True, True)
            )
            sums["g_a"] += dg
            sums["b_a"] += db
            du = aten.elu_backward(dua, 1.0, 1.0, 1.0, True, ua)
            do = torch.mm(du, w_o_t).view(b, 1, num_heads, head)

            # The attention over the window, recomputed from kv.
            keys, values, norm = _keys_values(
                kv, kv_slots, kv_gamma, kv_beta, num_heads, epsilon
            )
            p = s["p"][i]
            q = s["q"][i]
            pd = p if adm is None else p * adm
            dp = (do * values).sum(-1)
            d_values = pd.unsqueeze(-1) * do
            if adm is not None:
                dp = dp * adm
            ds = aten._softmax_backward_data(dp, p, 1, p.dtype) * scale
            dq = (ds.unsqueeze(-1) * keys).sum(1).view(b, e)
            d_keys = ds.unsqueeze(-1) * q.view(b, 1, num_heads, head)
            d_both = torch.stack(
                [d_keys.reshape(b, k, e), d_values.reshape(b, k, e)], 2
            )
            if norm is not None:
                act, hat, mean, rstd = norm
                sums["kv_gamma"] += (d_both * hat).sum((0, 1))
                sums["kv_beta"] += d_both.sum((0, 1))
                d_act = aten.native_layer_norm_backward(
                    d_both * kv_gamma, act, (e,), mean, rstd, None, None,
                    (True, False, False),
                )[0]
                d_pre = aten.elu_backward(d_act, 1.0, 1.0, 1.0, True, act)
            else:
                d_pre = d_both
            d_pre = d_pre.reshape(b, k, 2 * e)
            sums["kv_slots"] += d_pre.sum(0)
            dkv_prev += d_pre

            dhw = torch.cat([aten.elu_backward(dq, 1.0, 1.0, 1.0, True, q), dz], 1)
            dh_prev = torch.mm(dhw, h_kernel_t)
            if rdm is not None:
                dh_prev = dh_prev * rdm
            if m is not None:
                dh_prev = dh_prev + skips[0]
                dc_prev = dc_prev + skips[1]
                dkv_prev = dkv_prev + skips[2]
                dcells_prev = dcells_prev + skips[3]
            dhw_all[i] = dhw
            du_all[i] = du
            dkv_new_all[i] = dkv_new
            dh, dc, dkv, dcells, kv_next = (
                dh_prev, dc_prev, dkv_prev, dcells_prev, kv,
            )

        # Weight gradients: one matmul over all t * b rows.
        rows = lambda v: v.reshape(t_len * b, -1)  # noqa: E731
        if reverse:
            h_prev = torch.cat([s["hs"][1:], h0.unsqueeze(0)])
        else:
            h_prev = torch.cat([h0.unsqueeze(0), s["hs"][:-1]])
        if rdm is not None:
            h_prev = h_prev * rdm
        dhw_rows, du_rows = rows(dhw_all), rows(du_all)
        a = F.layer_norm(rows(s["ua"]), (e,), g_a, b_a, epsilon)
        ctx.saved = ctx.weights = None
        return (
            dhw_all,
            dh,
            dc,
            dkv,
            dcells,
            dvalid,
            torch.mm(rows(h_prev).t(), dhw_rows),
            torch.mm(rows(s["cs"]).t(), rows(dkv_new_all)),
            sums["kv_slots"],
            torch.mm(rows(s["o"]).t(), du_rows),
            du_rows.sum(0),
            torch.mm(a.t(), dhw_rows[:, e:]),
            sums["kv_gamma"],
            sums["kv_beta"],
            sums["g_a"],
            sums["b_a"],
            sums["g_c"],
            sums["b_c"],
            sums["g_h"],
            sums["b_h"],
            None,
            None,
            None,
            None,
        )


def larnn(
    inputs,
    initial_state,
    weights,
    num_heads,
    mask=None,
    reverse=False,
    recurrent_dropout_mask=None,
    attention_dropout_mask=None,
    epsilon=LAYER_NORM_EPSILON,
):
    """Same contract as `reference.larnn`."""
    dtype = inputs.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    cast = lambda v: None if v is None else v.to(compute)  # noqa: E731
    x = cast(inputs)
    weights = {name: cast(v) for name, v in weights.items()}
    h0, c0, window0, valid0 = [cast(v) for v in initial_state]
    batch, t_len, input_dim = x.shape
    slots = valid0.shape[-1]
    units = h0.shape[-1]
    w, input_kernel, input_bias = steps.prepare(weights, input_dim, slots)
    xqz = torch.addmm(
        input_bias, x.reshape(batch * t_len, input_dim), input_kernel
    ).view(batch, t_len, -1)
    cells0 = window0.reshape(batch, slots, units)
    kv0 = torch.matmul(cells0, w["kv_kernel"])
    m = None
    if mask is not None:
        m = mask.to(torch.bool).t().unsqueeze(-1)
    hs, h, c, cells, valid = _LARNN.apply(
        xqz.transpose(0, 1).contiguous(),
        h0,
        c0,
        kv0,
        cells0,
        valid0,
        w["h_kernel"],
        w["kv_kernel"],
        w["kv_slots"],
        w["output_kernel"],
        w["output_bias"],
        w["attention_kernel"],
        w.get("kv_gamma"),
        w.get("kv_beta"),
        w["attention_gamma"],
        w["attention_beta"],
        w["cell_gamma"],
        w["cell_beta"],
        w["hidden_gamma"],
        w["hidden_beta"],
        m,
        cast(recurrent_dropout_mask),
        cast(attention_dropout_mask),
        (num_heads, reverse, float(epsilon)),
    )
    final = [h, c, cells.reshape(batch, slots * units), valid]
    return hs.transpose(0, 1).to(dtype), [v.to(dtype) for v in final]
