"""LARNN on torch (CPU): a `torch.autograd.Function` with a hand-written
backward, in raw torch so that each step costs few kernel calls.

The math is that of `steps.py` (the jax and tensorflow implementations): each
cell is projected for the keys and values once, when it enters the window,
and K and V are never formed. The window lives on tapes: (b, k + t, e)
tensors holding the initial window then every pushed cell, so that a step
reads its window as a slice (a view, or a gather per row when rows are masked
differently) and a push writes one (b, e) row; no window is copied or shifted
per step, and the backward accumulates the window's gradient into the same
positions. The forward saves only (b, *)-sized residuals per step besides
the tapes; the backward uses ATen's fused kernels
(`native_layer_norm_backward`, `elu_backward`, `_softmax_backward_data`, ...)
and leaves the weight gradients of the matmuls to single large matmuls over
all steps. The weight packing and the input projections stay outside, where
autograd differentiates them. 16-bit inputs are computed in float32.

Shapes: b batch, t time, e units, k window slots, n heads, h = e / n.
"""

import math

import torch
import torch.nn.functional as F

from keras_attnrnn.ops.larnn import steps

aten = torch.ops.aten


class _Tapes:
    """Where each row's window lies on the tapes at each step.

    A row's window before step j (in processing order) is tape[:, n_j : n_j
    + k], n_j being the number of pushes before it (j itself without a mask).
    """

    def __init__(self, m, t_len, batch, k, device):
        self.k = k
        self.masked = m is not None
        if self.masked:
            zero = torch.zeros((1, batch), dtype=torch.long, device=device)
            counts = torch.cumsum(m.squeeze(-1).long(), 0)
            self.n = torch.cat([zero, counts])  # (t + 1, b), processing order
            self.rows = torch.arange(batch, device=device)
            self.slots = torch.arange(k, device=device)

    def _index(self, j, e):
        index = self.n[j].unsqueeze(1) + self.slots  # (b, k)
        return index.unsqueeze(-1).expand(-1, -1, e)

    def read(self, tape, j):
        if not self.masked:
            return tape[:, j : j + self.k]
        return tape.gather(1, self._index(j, tape.shape[-1]))

    def add(self, tape, j, value):
        if not self.masked:
            tape[:, j : j + self.k] += value
        else:
            tape.scatter_add_(1, self._index(j, tape.shape[-1]), value)

    def write(self, tape, j, value):
        """The push of step j (rows masked at j write a row no window reads
        before the row's next push overwrites it)."""
        if not self.masked:
            tape[:, self.k + j] = value
        else:
            tape[self.rows, self.k + self.n[j]] = value

    def pushed(self, tape, j):
        """The row step j pushed (or would have)."""
        if not self.masked:
            return tape[:, self.k + j]
        return tape[self.rows, self.k + self.n[j]]


def _window(cache, slots, activation, epsilon):
    """(act, hat, mean, rstd) of a half-window: elu(cache + slots) (b, k, e),
    its LayerNorm without scale and offset, and the per-slot statistics
    (b, k, 1). Without the activation, act = hat = cache + slots."""
    act = cache + slots
    if not activation:
        return act, act, None, None
    act = F.elu(act)
    hat, mean, rstd = torch.native_layer_norm(act, act.shape[-1:], None, None, epsilon)
    return act, hat, mean, rstd


def _per_head_dot(act, row, num_heads):
    """sum over each head's h features of act (b, k, e) * row (b, e)."""
    b, k, e = act.shape
    return (act * row.unsqueeze(1)).view(b, k, num_heads, e // num_heads).sum(-1)


def _weighted_slots(weights, act, num_heads):
    """sum over slots of weights (b, k, n) * act (b, k, e) -> (b, e)."""
    b, k, e = act.shape
    heads = act.view(b, k, num_heads, e // num_heads)
    return (weights.unsqueeze(-1) * heads).sum(1).view(b, e)


def _outer(weights, row, num_heads):
    """weights (b, k, n) times row (b, e) per head -> (b, k, e)."""
    b, k, n = weights.shape
    heads = row.view(b, 1, n, -1)
    return (weights.unsqueeze(-1) * heads).view(b, k, -1)


def _heads_sum(row, num_heads):
    """(b, e) -> (b, n)."""
    return row.view(row.shape[0], num_heads, -1).sum(-1)


class _LARNN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        xqz,
        h0,
        c0,
        kc0,
        vc0,
        cells0,
        valid0,
        h_kernel,
        kv_kernel,
        key_slots,
        value_slots,
        w_o,
        b_o,
        w_att,
        key_gamma,
        key_beta,
        value_gamma,
        value_beta,
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
        activation = key_gamma is not None
        t_len, b, _ = xqz.shape
        e = h0.shape[-1]
        k = valid0.shape[-1]
        scale = 1.0 / math.sqrt(e // num_heads)
        tapes = _Tapes(m, t_len, b, k, xqz.device)
        tape_k, tape_v, tape_c = [
            torch.cat([v, v.new_empty((b, t_len, e))], 1) for v in (kc0, vc0, cells0)
        ]
        new = lambda *s: xqz.new_empty((t_len,) + s)  # noqa: E731
        saved = {
            "hs": new(b, e),
            "cs": new(b, e),
            "q": new(b, e),
            "p": new(b, k, num_heads),
            "o": new(b, e),
            "u": new(b, e),
            "ua": new(b, e),
            "gates": new(b, 4 * e),
        }
        h, c = h0, c0
        valid = valid0 > 0.5
        newest = torch.ones((b, 1), dtype=torch.bool, device=xqz.device)
        order = range(t_len - 1, -1, -1) if reverse else range(t_len)
        for j, i in enumerate(order):
            live = torch.cat([valid[:, :-1], newest], 1)
            hd = h if rdm is None else h * rdm
            hw = torch.mm(hd, h_kernel)
            q = F.elu(xqz[i, :, :e] + hw[:, :e])
            _, hat_k, _, _ = _window(
                tapes.read(tape_k, j), key_slots, activation, epsilon
            )
            _, hat_v, _, _ = _window(
                tapes.read(tape_v, j), value_slots, activation, epsilon
            )
            # K = hat_k * gamma_k + beta_k: the beta_k part of a score is the
            # same for every slot and drops out of the softmax.
            qg = q * key_gamma if activation else q
            raw = _per_head_dot(hat_k, qg, num_heads)
            scores = (raw * scale).masked_fill_(
                ~live.unsqueeze(-1), steps.MASKED_SCORE
            )
            p = torch.softmax(scores, dim=1)
            pd = p if adm is None else p * adm
            u = _weighted_slots(pd, hat_v, num_heads)
            if activation:
                p_sum = pd.sum(1).repeat_interleave(e // num_heads, -1)
                o = torch.addcmul(p_sum * value_beta, u, value_gamma)
            else:
                o = u
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
            tapes.write(tape_k, j, kv_new[:, :e])
            tapes.write(tape_v, j, kv_new[:, e:])
            tapes.write(tape_c, j, c_new)
            new_valid = torch.cat([live[:, 1:], newest], 1)
            if m is not None:
                keep = m[j]
                h_new = torch.where(keep, h_new, h)
                c_new = torch.where(keep, c_new, c)
                new_valid = torch.where(keep, new_valid, valid)
            for key, value in (
                ("hs", h_new), ("cs", c_new), ("q", q), ("p", p), ("o", o),
                ("u", u), ("ua", ua), ("gates", gates),
            ):
                saved[key][i] = value
            h, c, valid = h_new, c_new, new_valid
        ctx.meta = (num_heads, reverse, epsilon)
        ctx.saved = saved
        ctx.tapes = (tapes, tape_k, tape_v)
        ctx.state0 = (h0, c0, valid0)
        ctx.masks = (m, rdm, adm)
        ctx.weights = (
            h_kernel, kv_kernel, key_slots, value_slots, w_o, w_att,
            key_gamma, value_gamma, value_beta, g_a, b_a, g_c, b_c, g_h, b_h,
        )
        ctx.key_beta = key_beta
        cells = tapes.read(tape_c, t_len)
        return saved["hs"], h, c, cells, valid.to(xqz.dtype)

    @staticmethod
    def backward(ctx, d_hs, dh, dc, dcells, dvalid):
        num_heads, reverse, epsilon = ctx.meta
        s = ctx.saved
        tapes, tape_k, tape_v = ctx.tapes
        h0, c0, valid0 = ctx.state0
        m, rdm, adm = ctx.masks
        (
            h_kernel, kv_kernel, key_slots, value_slots, w_o, w_att,
            key_gamma, value_gamma, value_beta, g_a, b_a, g_c, b_c, g_h, b_h,
        ) = ctx.weights
        activation = key_gamma is not None
        t_len, b, e = s["hs"].shape
        k = valid0.shape[-1]
        scale = 1.0 / math.sqrt(e // num_heads)
        zeros = torch.zeros_like
        dh = zeros(h0) if dh is None else dh.clone()
        dc = zeros(c0) if dc is None else dc.clone()
        dvalid = zeros(valid0) if dvalid is None else dvalid.clone()
        d_hs = zeros(s["hs"]) if d_hs is None else d_hs
        d_tape_k, d_tape_v, d_tape_c = (
            zeros(tape_k), zeros(tape_v), zeros(tape_k)
        )
        if dcells is not None:
            tapes.add(d_tape_c, t_len, dcells)
        kv_kernel_t, w_o_t, w_att_t = kv_kernel.t(), w_o.t(), w_att.t()
        h_kernel_t = h_kernel.t()
        sums = {
            "key_slots": zeros(key_slots), "value_slots": zeros(value_slots),
            "g_a": zeros(g_a), "b_a": zeros(b_a), "g_c": zeros(g_c),
            "b_c": zeros(b_c), "g_h": zeros(g_h), "b_h": zeros(b_h),
        }
        if activation:
            sums["key_gamma"] = zeros(key_gamma)
            sums["value_gamma"] = zeros(value_gamma)
            sums["value_beta"] = zeros(value_beta)
        dhw_all = d_hs.new_empty((t_len, b, 5 * e))
        du_all = d_hs.new_empty((t_len, b, e))
        dkv_new_all = d_hs.new_empty((t_len, b, 2 * e))
        order = list(range(t_len - 1, -1, -1) if reverse else range(t_len))
        for j in range(t_len - 1, -1, -1):
            i = order[j]
            c_prev = c0 if j == 0 else s["cs"][order[j - 1]]
            dh_out = dh + d_hs[i]
            dh_new = dh_out
            if m is not None:
                keep = m[j]
                dh_new = torch.where(keep, dh_out, 0.0)
                dc_new = torch.where(keep, dc, 0.0)
                dvalid = torch.where(keep, 0.0, dvalid)
            else:
                dc_new = dc
                dvalid = zeros(dvalid)

            # The push: c' @ kv_kernel onto the key and value tapes, c' onto
            # the cells tape.
            dkv_new = torch.cat(
                [tapes.pushed(d_tape_k, j), tapes.pushed(d_tape_v, j)], 1
            )
            d_pushed_cell = tapes.pushed(d_tape_c, j)
            if m is not None:
                dkv_new = dkv_new * keep
                d_pushed_cell = d_pushed_cell * keep
            dc_new = torch.addmm(dc_new + d_pushed_cell, dkv_new, kv_kernel_t)

            # h' = LN_h(o' elu(c')), c' = LN_c(i g + f c).
            c_new = s["cs"][i]
            gi, gf, gg, go = s["gates"][i].split(e, 1)
            ec = F.elu(c_new)
            y = go * ec
            _, mean, rstd = torch.native_layer_norm(y, (e,), g_h, b_h, epsilon)
            dy, dg, db = aten.native_layer_norm_backward(
                dh_new, y, (e,), mean, rstd, g_h, b_h, (True, True, True)
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
            do = torch.mm(du, w_o_t)

            # The attention over the window, recomputed from the tapes.
            q, p = s["q"][i], s["p"][i]
            pd = p if adm is None else p * adm
            act_k, hat_k, mean_k, rstd_k = _window(
                tapes.read(tape_k, j), key_slots, activation, epsilon
            )
            act_v, hat_v, mean_v, rstd_v = _window(
                tapes.read(tape_v, j), value_slots, activation, epsilon
            )
            size = e // num_heads
            if activation:
                dgv = do * value_gamma
                dp = _per_head_dot(hat_v, dgv, num_heads)
                dp = dp + _heads_sum(do * value_beta, num_heads).unsqueeze(1)
            else:
                dp = _per_head_dot(hat_v, do, num_heads)
            if adm is not None:
                dp = dp * adm
            ds = aten._softmax_backward_data(dp, p, 1, p.dtype) * scale
            if activation:
                qg = q * key_gamma
                t_k = _weighted_slots(ds, hat_k, num_heads)
                dq = t_k * key_gamma
                sums["key_gamma"] += (q * t_k).sum(0)
                sums["value_gamma"] += (do * s["u"][i]).sum(0)
                p_sum = pd.sum(1).repeat_interleave(size, -1)
                sums["value_beta"] += (do * p_sum).sum(0)
                d_hat_k = _outer(ds, qg, num_heads)
                d_hat_v = _outer(pd, dgv, num_heads)
                d_k = aten.native_layer_norm_backward(
                    d_hat_k, act_k, (e,), mean_k, rstd_k, None, None,
                    (True, False, False),
                )[0]
                d_v = aten.native_layer_norm_backward(
                    d_hat_v, act_v, (e,), mean_v, rstd_v, None, None,
                    (True, False, False),
                )[0]
                d_k = aten.elu_backward(d_k, 1.0, 1.0, 1.0, True, act_k)
                d_v = aten.elu_backward(d_v, 1.0, 1.0, 1.0, True, act_v)
            else:
                dq = _weighted_slots(ds, hat_k, num_heads)
                d_k = _outer(ds, q, num_heads)
                d_v = _outer(pd, do, num_heads)
            sums["key_slots"] += d_k.sum(0)
            sums["value_slots"] += d_v.sum(0)
            tapes.add(d_tape_k, j, d_k)
            tapes.add(d_tape_v, j, d_v)

            dhw = torch.cat([aten.elu_backward(dq, 1.0, 1.0, 1.0, True, q), dz], 1)
            dh_prev = torch.mm(dhw, h_kernel_t)
            if rdm is not None:
                dh_prev = dh_prev * rdm
            if m is not None:
                dh_prev = torch.where(keep, dh_prev, dh_out)
                dc_prev = torch.where(keep, dc_prev, dc)
            dhw_all[i] = dhw
            du_all[i] = du
            dkv_new_all[i] = dkv_new
            dh, dc = dh_prev, dc_prev

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
        ctx.saved = ctx.tapes = ctx.weights = None
        key_beta_grad = None if ctx.key_beta is None else zeros(ctx.key_beta)
        return (
            dhw_all,
            dh,
            dc,
            d_tape_k[:, :k],
            d_tape_v[:, :k],
            d_tape_c[:, :k],
            dvalid,
            torch.mm(rows(h_prev).t(), dhw_rows),
            torch.mm(rows(s["cs"]).t(), rows(dkv_new_all)),
            sums["key_slots"],
            sums["value_slots"],
            torch.mm(rows(s["o"]).t(), du_rows),
            du_rows.sum(0),
            torch.mm(a.t(), dhw_rows[:, e:]),
            sums.get("key_gamma"),
            key_beta_grad,  # the same for every slot: the softmax ignores it
            sums.get("value_gamma"),
            sums.get("value_beta"),
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


def larnn(x, state0, w, mask, extras, reverse, config):
    """See `ops/loops/__init__.py`."""
    num_heads, epsilon, _ = config
    m = None
    if mask is not None:
        # In processing order, as the loops and the tapes use it.
        m = mask.flip(0) if reverse else mask
    hs, h, c, cells, valid = _LARNN.apply(
        x.contiguous(),
        *state0,
        w["h_kernel"],
        w["kv_kernel"],
        w["key_slots"],
        w["value_slots"],
        w["output_kernel"],
        w["output_bias"],
        w["attention_kernel"],
        w.get("key_gamma"),
        w.get("key_beta"),
        w.get("value_gamma"),
        w.get("value_beta"),
        w["attention_gamma"],
        w["attention_beta"],
        w["cell_gamma"],
        w["cell_beta"],
        w["hidden_gamma"],
        w["hidden_beta"],
        m,
        *extras,
        (num_heads, reverse, float(epsilon)),
    )
    return hs, (h, c, None, None, cells, valid)
