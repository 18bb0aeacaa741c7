// AttnRNN's forward and backward time loops on the CPU, framework-agnostic.
//
// Per step: three matmuls through the framework's GEMM and three fused loops
// over the batch rows, in place of the ~25 separate ops a step costs when run
// op by op. The math is ops/attnrnn/steps.py's. The bindings (torch_cpu.cpp,
// tensorflow_cpu.cc) provide `Ops`:
//
//   void gemm(int64_t m, int64_t n, int64_t k,
//             const T* a, int64_t lda, bool trans_a,
//             const T* b, int64_t ldb, bool trans_b,
//             T* c, int64_t ldc, bool accumulate) const;
//       C[m, n] (+)= op(A)[m, k] @ op(B)[k, n], all row-major; op(A) = A^T
//       when trans_a (then A is [k, m] with leading dimension lda).
//   template <typename F> void parallel_for(int64_t n, int64_t grain, F f) const;
//       calls f(begin, end) over [0, n) in chunks, possibly in parallel.
//
// and do the input projection and the weight gradients (one large matmul
// over all steps each) themselves.
//
// Shapes: t time, b batch, e units, n heads, k = e / n. Everything is
// time-major and row-major contiguous. `mask` is (t, b) or null.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace attnrnn {

struct Shape {
  int64_t t, b, e, n;
};

struct Weights {  // pointers to the packed weights
  const void* w_hq;   // (e, 2e) [query_kernel | gate_kernel[:e]]
  const void* b_hq;   // (2e)    [query_bias | gate_bias]
  const void* w_o;    // (e, e)
  const void* b_o;    // (e)
  const void* w_ga;   // (e, e)  gate_kernel[e:]
  const void* gamma;  // (e)
  const void* beta;   // (e)
};

template <typename T>
struct Saved {  // what the forward keeps for the backward, all (t, b, ...)
  T* hs;    // (t, b, e) the state after each step (the outputs)
  T* q;     // (t, b, e)
  T* p;     // (t, b, n, 4) the attention weights
  T* o;     // (t, b, e) attention output
  T* u;     // (t, b, e) pre-gelu
  T* a;     // (t, b, e) gelu(u)
  T* z;     // (t, b, e) the gate
  T* rhat;  // (t, b, e) normalized a + h
  T* rstd;  // (t, b)
};

inline int64_t step_index(int64_t j, int64_t t, bool reverse) {
  return reverse ? t - 1 - j : j;
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

constexpr int64_t kRowGrain = 8;

// Forward over the whole sequence. Scratch: hw (b, 2e), g (b, e).
template <typename T, typename Ops>
void forward(const Ops& ops, const Shape& s, bool reverse, T epsilon,
             const T* x, const T* h0, const Weights& weights,
             const bool* mask, const Saved<T>& out, T* hw, T* g) {
  const int64_t t = s.t, b = s.b, e = s.e, n = s.n, k = e / n;
  const int64_t be = b * e;
  const T scale = T(1) / std::sqrt(T(k));
  const T* w_hq = static_cast<const T*>(weights.w_hq);
  const T* b_hq = static_cast<const T*>(weights.b_hq);
  const T* w_o = static_cast<const T*>(weights.w_o);
  const T* b_o = static_cast<const T*>(weights.b_o);
  const T* w_ga = static_cast<const T*>(weights.w_ga);
  const T* gamma = static_cast<const T*>(weights.gamma);
  const T* beta = static_cast<const T*>(weights.beta);
  const T* h = h0;
  for (int64_t j = 0; j < t; ++j) {
    const int64_t i = step_index(j, t, reverse);
    const T* xi = x + i * be;
    T* qi = out.q + i * be;
    T* pi = out.p + i * b * n * 4;
    T* oi = out.o + i * be;
    T* ui = out.u + i * be;
    T* ai = out.a + i * be;
    T* zi = out.z + i * be;
    T* rhi = out.rhat + i * be;
    T* rsi = out.rstd + i * b;
    T* hn = out.hs + i * be;
    const bool* mi = mask == nullptr ? nullptr : mask + i * b;
    ops.gemm(b, 2 * e, e, h, e, false, w_hq, 2 * e, false, hw, 2 * e, false);
    // The query and the attention over [h, x, h + x, h * x].
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* hr = h + r * e;
        const T* xr = xi + r * e;
        T* q = qi + r * e;
        for (int64_t c = 0; c < e; ++c) q[c] = hw[r * 2 * e + c] + b_hq[c];
        for (int64_t head = 0; head < n; ++head) {
          const int64_t off = head * k;
          T s_h = 0, s_x = 0, s_p = 0;
          for (int64_t c = off; c < off + k; ++c) {
            s_h += q[c] * hr[c];
            s_x += q[c] * xr[c];
            s_p += q[c] * hr[c] * xr[c];
          }
          T sc[4] = {s_h * scale, s_x * scale, (s_h + s_x) * scale, s_p * scale};
          const T m = std::max(std::max(sc[0], sc[1]), std::max(sc[2], sc[3]));
          T sum = 0;
          for (int q4 = 0; q4 < 4; ++q4) sum += (sc[q4] = std::exp(sc[q4] - m));
          T* p = pi + (r * n + head) * 4;
          for (int q4 = 0; q4 < 4; ++q4) p[q4] = sc[q4] / sum;
          const T w_h = p[0] + p[2], w_x = p[1] + p[2], w_p = p[3];
          for (int64_t c = off; c < off + k; ++c) {
            oi[r * e + c] = w_h * hr[c] + w_x * xr[c] + w_p * hr[c] * xr[c];
          }
        }
      }
    });
    ops.gemm(b, e, e, oi, e, false, w_o, e, false, ui, e, false);
    // u += b_o; a = gelu(u); g = hw[:, e:] (the gate's h part).
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < e; ++c) {
          const T u = (ui[r * e + c] += b_o[c]);
          ai[r * e + c] = T(0.5) * u * (T(1) + std::erf(u * T(M_SQRT1_2)));
          g[r * e + c] = hw[r * 2 * e + e + c];
        }
      }
    });
    ops.gemm(b, e, e, ai, e, false, w_ga, e, false, g, e, true);
    // The gate, the norm of a + h and the update (h where masked).
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* hr = h + r * e;
        const T* ar = ai + r * e;
        T mean = 0;
        for (int64_t c = 0; c < e; ++c) mean += ar[c] + hr[c];
        mean /= T(e);
        T var = 0;
        for (int64_t c = 0; c < e; ++c) {
          const T d = ar[c] + hr[c] - mean;
          var += d * d;
        }
        const T rstd = T(1) / std::sqrt(var / T(e) + epsilon);
        rsi[r] = rstd;
        const bool keep = mi == nullptr || mi[r];
        for (int64_t c = 0; c < e; ++c) {
          const T z = sigmoid(g[r * e + c] + b_hq[e + c]);
          const T rhat = (ar[c] + hr[c] - mean) * rstd;
          zi[r * e + c] = z;
          rhi[r * e + c] = rhat;
          const T cand = rhat * gamma[c] + beta[c];
          hn[r * e + c] = keep ? hr[c] + z * (cand - hr[c]) : hr[c];
        }
      }
    });
    h = hn;
  }
}

template <typename T>
struct Grads {  // what the backward produces
  T* dx;     // (t, b, e)
  T* dh0;    // (b, e)
  T* dhw;    // (t, b, 2e) [dq | dg] per step
  T* du;     // (t, b, e)
  T* dcand;  // (t, b, e) the gradient of the norm's output
};

// Backward over the whole sequence. Scratch: acc, dr, da, d_o (b, e) each.
template <typename T, typename Ops>
void backward(const Ops& ops, const Shape& s, bool reverse, const T* d_hs,
              const T* d_last, const T* x, const T* h0,
              const Weights& weights, const bool* mask, const Saved<T>& saved,
              const Grads<T>& out, T* acc, T* dr, T* da, T* d_o) {
  const int64_t t = s.t, b = s.b, e = s.e, n = s.n, k = e / n;
  const int64_t be = b * e;
  const T scale = T(1) / std::sqrt(T(k));
  const T* w_hq = static_cast<const T*>(weights.w_hq);
  const T* w_o = static_cast<const T*>(weights.w_o);
  const T* w_ga = static_cast<const T*>(weights.w_ga);
  const T* gamma = static_cast<const T*>(weights.gamma);
  const T* beta = static_cast<const T*>(weights.beta);
  T* dh = out.dh0;  // the running state gradient; ends as dh0
  std::copy(d_last, d_last + be, dh);
  for (int64_t j = t - 1; j >= 0; --j) {
    const int64_t i = step_index(j, t, reverse);
    const T* h = j == 0 ? h0 : saved.hs + step_index(j - 1, t, reverse) * be;
    const T* xi = x + i * be;
    const T* dout = d_hs + i * be;
    const T* zi = saved.z + i * be;
    const T* rhi = saved.rhat + i * be;
    const T* rsi = saved.rstd + i * b;
    const T* ui = saved.u + i * be;
    const T* qi = saved.q + i * be;
    const T* pi = saved.p + i * b * n * 4;
    const bool* mi = mask == nullptr ? nullptr : mask + i * b;
    T* dhw = out.dhw + i * 2 * be;
    T* dci = out.dcand + i * be;
    T* dui = out.du + i * be;
    T* dxi = out.dx + i * be;
    // The update, the gate and the norm: acc = dh_new (1 - z) + dr, da = dr.
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * e;
        if (mi != nullptr && !mi[r]) {  // a masked step passes dh through
          for (int64_t c = 0; c < e; ++c) {
            acc[o + c] = dh[o + c] + dout[o + c];
            dr[o + c] = da[o + c] = dci[o + c] = dhw[r * 2 * e + e + c] = 0;
          }
          continue;
        }
        T m1 = 0, m2 = 0;
        for (int64_t c = 0; c < e; ++c) {
          const T dhn = dh[o + c] + dout[o + c];
          const T z = zi[o + c];
          const T cand = rhi[o + c] * gamma[c] + beta[c];
          const T dcand = dhn * z;
          dci[o + c] = dcand;
          dhw[r * 2 * e + e + c] = dhn * (cand - h[o + c]) * z * (T(1) - z);
          acc[o + c] = dhn - dcand;
          const T drhat = dcand * gamma[c];
          m1 += drhat;
          m2 += drhat * rhi[o + c];
        }
        m1 /= T(e);
        m2 /= T(e);
        const T rstd = rsi[r];
        for (int64_t c = 0; c < e; ++c) {
          const T d = rstd * (dci[o + c] * gamma[c] - m1 - rhi[o + c] * m2);
          dr[o + c] = da[o + c] = d;
          acc[o + c] += d;
        }
      }
    });
    // da += dg @ w_ga^T
    ops.gemm(b, e, e, dhw + e, 2 * e, false, w_ga, e, true, da, e, true);
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      constexpr T kInvSqrt2Pi = T(0.3989422804014327);
      for (int64_t q = begin * e; q < end * e; ++q) {
        const T u = ui[q];
        const T cdf = T(0.5) * (T(1) + std::erf(u * T(M_SQRT1_2)));
        dui[q] = da[q] * (cdf + u * std::exp(T(-0.5) * u * u) * kInvSqrt2Pi);
      }
    });
    ops.gemm(b, e, e, dui, e, false, w_o, e, true, d_o, e, false);
    // The attention: dq into dhw[:, :e], dx, and the token terms into acc.
    ops.parallel_for(b, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * e;
        if (mi != nullptr && !mi[r]) {
          for (int64_t c = 0; c < e; ++c) dxi[o + c] = dhw[r * 2 * e + c] = 0;
          continue;
        }
        for (int64_t head = 0; head < n; ++head) {
          const int64_t off = o + head * k;
          const T* p = pi + (r * n + head) * 4;
          T dm0 = 0, dm1 = 0, dm2 = 0;
          for (int64_t c = off; c < off + k; ++c) {
            dm0 += d_o[c] * h[c];
            dm1 += d_o[c] * xi[c];
            dm2 += d_o[c] * h[c] * xi[c];
          }
          const T dp[4] = {dm0, dm1, dm0 + dm1, dm2};
          T dot = 0;
          for (int q4 = 0; q4 < 4; ++q4) dot += p[q4] * dp[q4];
          T ds[4];
          for (int q4 = 0; q4 < 4; ++q4) ds[q4] = p[q4] * (dp[q4] - dot) * scale;
          const T e_h = ds[0] + ds[2], e_x = ds[1] + ds[2], e_p = ds[3];
          const T w_h = p[0] + p[2], w_x = p[1] + p[2], w_p = p[3];
          for (int64_t c = off; c < off + k; ++c) {
            const T hi = h[c], xv = xi[c], q = qi[c], d = d_o[c];
            dhw[r * 2 * e + (c - o)] = e_h * hi + e_x * xv + e_p * hi * xv;
            const T d_tok_p = d * w_p + e_p * q;
            acc[c] += d * w_h + e_h * q + d_tok_p * xv;
            dxi[c] = d * w_x + e_x * q + d_tok_p * hi;
          }
        }
      }
    });
    // dh = acc + [dq | dg] @ w_hq^T
    ops.gemm(b, e, 2 * e, dhw, 2 * e, false, w_hq, 2 * e, true, acc, e, true);
    std::copy(acc, acc + be, dh);
  }
}

}  // namespace attnrnn
