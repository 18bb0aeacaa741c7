// AttnRNN forward and backward loops for torch on the CPU.
//
// Per step: three matmuls through ATen (MKL/oneDNN) and three fused loops
// over the batch rows (at::parallel_for), in place of the ~25 separate torch
// ops a step costs in Python. The math is ops/attnrnn/steps.py's; the Python
// side (torch_cpp.py) does the input projection, the packing of the weights
// and the weight gradients (large matmuls over all steps).
//
// Shapes: t time, b batch, e units, n heads, k = e / n. Time-major.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrain = 8;  // rows per parallel task

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// The step order: forward processes t-1 .. 0 when reverse.
inline int64_t step_index(int64_t j, int64_t t, bool reverse) {
  return reverse ? t - 1 - j : j;
}

// Attention over the 4 tokens [h, x, h + x, h * x] for one row.
// q, h, x: (e); writes p (n, 4) and o (e).
template <typename T>
inline void attention_row(const T* q, const T* h, const T* x, T* p, T* o,
                          int64_t n, int64_t k, T scale) {
  for (int64_t head = 0; head < n; ++head) {
    const int64_t off = head * k;
    T s_h = 0, s_x = 0, s_p = 0;
    for (int64_t i = 0; i < k; ++i) {
      const T qi = q[off + i], hi = h[off + i], xi = x[off + i];
      s_h += qi * hi;
      s_x += qi * xi;
      s_p += qi * hi * xi;
    }
    T s[4] = {s_h * scale, s_x * scale, (s_h + s_x) * scale, s_p * scale};
    T m = std::max(std::max(s[0], s[1]), std::max(s[2], s[3]));
    T sum = 0;
    for (int j = 0; j < 4; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    T* pr = p + head * 4;
    for (int j = 0; j < 4; ++j) pr[j] = s[j] / sum;
    const T w_h = pr[0] + pr[2], w_x = pr[1] + pr[2], w_p = pr[3];
    for (int64_t i = 0; i < k; ++i) {
      const T hi = h[off + i], xi = x[off + i];
      o[off + i] = w_h * hi + w_x * xi + w_p * hi * xi;
    }
  }
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& h0,
                                     const at::Tensor& w_hq,
                                     const at::Tensor& b_hq,
                                     const at::Tensor& w_o,
                                     const at::Tensor& b_o,
                                     const at::Tensor& w_ga,
                                     const at::Tensor& gamma,
                                     const at::Tensor& beta,
                                     const at::Tensor& mask, int64_t n,
                                     bool reverse, double epsilon) {
  const int64_t t = x.size(0), b = x.size(1), e = x.size(2), k = e / n;
  const T scale = T(1) / std::sqrt(T(k));
  const T eps = T(epsilon);
  auto opts = x.options();
  auto hs = at::empty({t, b, e}, opts);
  auto q_buf = at::empty({t, b, e}, opts);
  auto p_buf = at::empty({t, b, n, 4}, opts);
  auto o_buf = at::empty({t, b, e}, opts);
  auto u_buf = at::empty({t, b, e}, opts);
  auto a_buf = at::empty({t, b, e}, opts);
  auto z_buf = at::empty({t, b, e}, opts);
  auto rhat_buf = at::empty({t, b, e}, opts);
  auto rstd_buf = at::empty({t, b}, opts);
  auto hw = at::empty({b, 2 * e}, opts);
  auto g = at::empty({b, e}, opts);
  const bool masked = mask.numel() > 0;
  const T* gm = gamma.data_ptr<T>();
  const T* bt = beta.data_ptr<T>();
  at::Tensor h = h0;
  for (int64_t j = 0; j < t; ++j) {
    const int64_t i = step_index(j, t, reverse);
    at::addmm_out(hw, b_hq, h, w_hq);
    const T* hp = h.data_ptr<T>();
    const T* xp = x[i].data_ptr<T>();
    const T* hwp = hw.data_ptr<T>();
    T* qp = q_buf[i].data_ptr<T>();
    T* pp = p_buf[i].data_ptr<T>();
    T* op = o_buf[i].data_ptr<T>();
    at::parallel_for(0, b, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* q = qp + r * e;
        std::copy(hwp + r * 2 * e, hwp + r * 2 * e + e, q);
        attention_row<T>(q, hp + r * e, xp + r * e, pp + r * n * 4,
                         op + r * e, n, k, scale);
      }
    });
    at::Tensor u = u_buf[i];
    at::addmm_out(u, b_o, o_buf[i], w_o);
    const T* up = u.data_ptr<T>();
    T* ap = a_buf[i].data_ptr<T>();
    at::parallel_for(0, b * e, kGrain * e, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        ap[q] = T(0.5) * up[q] * (T(1) + std::erf(up[q] * T(M_SQRT1_2)));
      }
    });
    at::addmm_out(g, hw.narrow(1, e, e), a_buf[i], w_ga);
    const T* gp = g.data_ptr<T>();
    T* zp = z_buf[i].data_ptr<T>();
    T* rhp = rhat_buf[i].data_ptr<T>();
    T* rsp = rstd_buf[i].data_ptr<T>();
    T* hn = hs[i].data_ptr<T>();
    const bool* mp = masked ? mask[i].data_ptr<bool>() : nullptr;
    at::parallel_for(0, b, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* hr = hp + r * e;
        const T* ar = ap + r * e;
        T mean = 0;
        for (int64_t c = 0; c < e; ++c) mean += ar[c] + hr[c];
        mean /= T(e);
        T var = 0;
        for (int64_t c = 0; c < e; ++c) {
          const T d = ar[c] + hr[c] - mean;
          var += d * d;
        }
        const T rstd = T(1) / std::sqrt(var / T(e) + eps);
        rsp[r] = rstd;
        const bool keep = mp == nullptr || mp[r];
        for (int64_t c = 0; c < e; ++c) {
          const T z = sigmoid(gp[r * e + c]);
          const T rhat = (ar[c] + hr[c] - mean) * rstd;
          zp[r * e + c] = z;
          rhp[r * e + c] = rhat;
          const T cand = rhat * gm[c] + bt[c];
          hn[r * e + c] = keep ? hr[c] + z * (cand - hr[c]) : hr[c];
        }
      }
    });
    h = hs[i];
  }
  return {hs, q_buf, p_buf, o_buf, u_buf, a_buf, z_buf, rhat_buf, rstd_buf};
}

template <typename T>
std::vector<at::Tensor> backward_impl(
    const at::Tensor& d_hs, const at::Tensor& d_last, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& hs, const at::Tensor& q_buf,
    const at::Tensor& p_buf, const at::Tensor& u_buf, const at::Tensor& z_buf,
    const at::Tensor& rhat_buf, const at::Tensor& rstd_buf,
    const at::Tensor& w_hq_t, const at::Tensor& w_o_t,
    const at::Tensor& w_ga_t, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mask, int64_t n, bool reverse) {
  const int64_t t = x.size(0), b = x.size(1), e = x.size(2), k = e / n;
  const T scale = T(1) / std::sqrt(T(k));
  auto opts = x.options();
  auto dx = at::empty({t, b, e}, opts);
  auto dhw_buf = at::empty({t, b, 2 * e}, opts);
  auto du_buf = at::empty({t, b, e}, opts);
  auto dcand_buf = at::empty({t, b, e}, opts);
  auto dh = d_last.clone();
  auto dh_acc = at::empty({b, e}, opts);
  auto dr = at::empty({b, e}, opts);
  auto da = at::empty({b, e}, opts);
  auto d_o = at::empty({b, e}, opts);
  const bool masked = mask.numel() > 0;
  const T* gm = gamma.data_ptr<T>();
  const T* bt = beta.data_ptr<T>();
  for (int64_t j = t - 1; j >= 0; --j) {
    const int64_t i = step_index(j, t, reverse);
    const at::Tensor h = j == 0 ? h0 : hs[step_index(j - 1, t, reverse)];
    const T* hp = h.data_ptr<T>();
    const T* xp = x[i].data_ptr<T>();
    const T* dop_in = d_hs[i].data_ptr<T>();
    const T* zp = z_buf[i].data_ptr<T>();
    const T* rhp = rhat_buf[i].data_ptr<T>();
    const T* rsp = rstd_buf[i].data_ptr<T>();
    const bool* mp = masked ? mask[i].data_ptr<bool>() : nullptr;
    T* dhp = dh.data_ptr<T>();
    T* accp = dh_acc.data_ptr<T>();
    T* drp = dr.data_ptr<T>();
    T* dhwp = dhw_buf[i].data_ptr<T>();
    T* dcp = dcand_buf[i].data_ptr<T>();
    // The gate and the norm: dh_acc = dh_new (1 - z) + dr, dg, dr, dcand.
    at::parallel_for(0, b, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * e;
        if (mp != nullptr && !mp[r]) {
          for (int64_t c = 0; c < e; ++c) {
            accp[o + c] = dhp[o + c] + dop_in[o + c];
            drp[o + c] = 0;
            dcp[o + c] = 0;
            dhwp[r * 2 * e + e + c] = 0;
          }
          continue;
        }
        const T rstd = rsp[r];
        T m1 = 0, m2 = 0;
        for (int64_t c = 0; c < e; ++c) {
          const T dhn = dhp[o + c] + dop_in[o + c];
          const T z = zp[o + c];
          const T rhat = rhp[o + c];
          const T cand = rhat * gm[c] + bt[c];
          const T dcand = dhn * z;
          dcp[o + c] = dcand;
          dhwp[r * 2 * e + e + c] = dhn * (cand - hp[o + c]) * z * (T(1) - z);
          accp[o + c] = dhn - dcand;
          const T drhat = dcand * gm[c];
          m1 += drhat;
          m2 += drhat * rhat;
        }
        m1 /= T(e);
        m2 /= T(e);
        for (int64_t c = 0; c < e; ++c) {
          const T d = rstd * (dcp[o + c] * gm[c] - m1 - rhp[o + c] * m2);
          drp[o + c] = d;
          accp[o + c] += d;
        }
      }
    });
    at::addmm_out(da, dr, dhw_buf[i].narrow(1, e, e), w_ga_t);
    const T* dap = da.data_ptr<T>();
    const T* up = u_buf[i].data_ptr<T>();
    T* dup = du_buf[i].data_ptr<T>();
    at::parallel_for(0, b * e, kGrain * e, [&](int64_t begin, int64_t end) {
      constexpr T kInvSqrt2Pi = T(0.3989422804014327);
      for (int64_t q = begin; q < end; ++q) {
        const T u = up[q];
        const T cdf = T(0.5) * (T(1) + std::erf(u * T(M_SQRT1_2)));
        dup[q] = dap[q] * (cdf + u * std::exp(T(-0.5) * u * u) * kInvSqrt2Pi);
      }
    });
    at::mm_out(d_o, du_buf[i], w_o_t);
    const T* dop = d_o.data_ptr<T>();
    const T* qp = q_buf[i].data_ptr<T>();
    const T* pp = p_buf[i].data_ptr<T>();
    T* dxp = dx[i].data_ptr<T>();
    // The attention: dq, dx, and the token gradients into dh_acc.
    at::parallel_for(0, b, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * e;
        if (mp != nullptr && !mp[r]) {
          for (int64_t c = 0; c < e; ++c) {
            dxp[o + c] = 0;
            dhwp[r * 2 * e + c] = 0;
          }
          continue;
        }
        for (int64_t head = 0; head < n; ++head) {
          const int64_t off = o + head * k;
          const T* p = pp + (r * n + head) * 4;
          T dm0 = 0, dm1 = 0, dm2 = 0;
          for (int64_t c = 0; c < k; ++c) {
            const T d = dop[off + c], hi = hp[off + c], xi = xp[off + c];
            dm0 += d * hi;
            dm1 += d * xi;
            dm2 += d * hi * xi;
          }
          const T dp[4] = {dm0, dm1, dm0 + dm1, dm2};
          T dot = 0;
          for (int q = 0; q < 4; ++q) dot += p[q] * dp[q];
          T ds[4];
          for (int q = 0; q < 4; ++q) ds[q] = p[q] * (dp[q] - dot) * scale;
          const T e_h = ds[0] + ds[2], e_x = ds[1] + ds[2], e_p = ds[3];
          const T w_h = p[0] + p[2], w_x = p[1] + p[2], w_p = p[3];
          for (int64_t c = 0; c < k; ++c) {
            const T d = dop[off + c], hi = hp[off + c], xi = xp[off + c];
            const T q = qp[off + c];
            dhwp[r * 2 * e + head * k + c] = e_h * hi + e_x * xi + e_p * hi * xi;
            const T d_tok_h = d * w_h + e_h * q;
            const T d_tok_x = d * w_x + e_x * q;
            const T d_tok_p = d * w_p + e_p * q;
            accp[off + c] += d_tok_h + d_tok_p * xi;
            dxp[off + c] = d_tok_x + d_tok_p * hi;
          }
        }
      }
    });
    at::addmm_out(dh, dh_acc, dhw_buf[i], w_hq_t);
  }
  return {dx, dh, dhw_buf, du_buf, dcand_buf};
}

}  // namespace

std::vector<at::Tensor> forward(at::Tensor x, at::Tensor h0, at::Tensor w_hq,
                                at::Tensor b_hq, at::Tensor w_o, at::Tensor b_o,
                                at::Tensor w_ga, at::Tensor gamma,
                                at::Tensor beta, at::Tensor mask,
                                int64_t num_heads, bool reverse,
                                double epsilon) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be contiguous (t, b, e)");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnrnn_forward", [&] {
    out = forward_impl<scalar_t>(x, h0.contiguous(), w_hq.contiguous(), b_hq,
                                 w_o.contiguous(), b_o, w_ga.contiguous(),
                                 gamma.contiguous(), beta.contiguous(), mask,
                                 num_heads, reverse, epsilon);
  });
  return out;
}

std::vector<at::Tensor> backward(
    at::Tensor d_hs, at::Tensor d_last, at::Tensor x, at::Tensor h0,
    at::Tensor hs, at::Tensor q_buf, at::Tensor p_buf, at::Tensor u_buf,
    at::Tensor z_buf, at::Tensor rhat_buf, at::Tensor rstd_buf,
    at::Tensor w_hq, at::Tensor w_o, at::Tensor w_ga, at::Tensor gamma,
    at::Tensor beta, at::Tensor mask, int64_t num_heads, bool reverse) {
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnrnn_backward", [&] {
    out = backward_impl<scalar_t>(
        d_hs.contiguous(), d_last.contiguous(), x, h0.contiguous(), hs, q_buf,
        p_buf, u_buf, z_buf, rhat_buf, rstd_buf, w_hq.t().contiguous(),
        w_o.t().contiguous(), w_ga.t().contiguous(), gamma.contiguous(),
        beta.contiguous(), mask, num_heads, reverse);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "AttnRNN forward loop (CPU)");
  m.def("backward", &backward, "AttnRNN backward loop (CPU)");
}
