// torch binding of the AttnRNN CPU loops (attnrnn_cpu.h): ATen's matmuls
// (MKL/oneDNN) and at::parallel_for. Built by torch_cpp.py on first use.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "attnrnn_cpu.h"

namespace {

template <typename T>
struct TorchOps {
  at::TensorOptions options;

  at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t ld,
                  bool trans) const {
    auto t = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  }

  void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
            bool trans_a, const T* b, int64_t ldb, bool trans_b, T* c,
            int64_t ldc, bool accumulate) const {
    auto A = trans_a ? view(a, k, m, lda, true) : view(a, m, k, lda, false);
    auto B = trans_b ? view(b, n, k, ldb, true) : view(b, k, n, ldb, false);
    auto C = at::from_blob(c, {m, n}, {ldc, 1}, options);
    if (accumulate) {
      C.addmm_(A, B);
    } else {
      at::mm_out(C, A, B);
    }
  }

  template <typename F>
  void parallel_for(int64_t n, int64_t grain, F f) const {
    at::parallel_for(0, n, grain, f);
  }
};

attnrnn::Weights weights(const at::Tensor& w_hq, const at::Tensor& b_hq,
                         const at::Tensor& w_o, const at::Tensor& b_o,
                         const at::Tensor& w_ga, const at::Tensor& gamma,
                         const at::Tensor& beta) {
  return {w_hq.data_ptr(), b_hq.data_ptr(), w_o.data_ptr(), b_o.data_ptr(),
          w_ga.data_ptr(), gamma.data_ptr(), beta.data_ptr()};
}

}  // namespace

std::vector<at::Tensor> forward(at::Tensor x, at::Tensor h0, at::Tensor w_hq,
                                at::Tensor b_hq, at::Tensor w_o, at::Tensor b_o,
                                at::Tensor w_ga, at::Tensor gamma,
                                at::Tensor beta, at::Tensor mask,
                                int64_t num_heads, bool reverse,
                                double epsilon) {
  for (auto* v : {&x, &h0, &w_hq, &b_hq, &w_o, &b_o, &w_ga, &gamma, &beta}) {
    *v = v->contiguous();
  }
  const int64_t t = x.size(0), b = x.size(1), e = x.size(2);
  auto o = x.options();
  auto hs = at::empty({t, b, e}, o), q = at::empty({t, b, e}, o);
  auto p = at::empty({t, b, num_heads, 4}, o), attn = at::empty({t, b, e}, o);
  auto u = at::empty({t, b, e}, o), a = at::empty({t, b, e}, o);
  auto z = at::empty({t, b, e}, o), rhat = at::empty({t, b, e}, o);
  auto rstd = at::empty({t, b}, o);
  auto hw = at::empty({b, 2 * e}, o), g = at::empty({b, e}, o);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnrnn_forward", [&] {
    attnrnn::forward<scalar_t>(
        TorchOps<scalar_t>{o}, {t, b, e, num_heads}, reverse,
        static_cast<scalar_t>(epsilon), x.data_ptr<scalar_t>(),
        h0.data_ptr<scalar_t>(), weights(w_hq, b_hq, w_o, b_o, w_ga, gamma, beta),
        mask.numel() ? mask.contiguous().data_ptr<bool>() : nullptr,
        {hs.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
         attn.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
         z.data_ptr<scalar_t>(), rhat.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>()},
        hw.data_ptr<scalar_t>(), g.data_ptr<scalar_t>());
  });
  return {hs, q, p, attn, u, a, z, rhat, rstd};
}

std::vector<at::Tensor> backward(
    at::Tensor d_hs, at::Tensor d_last, at::Tensor x, at::Tensor h0,
    at::Tensor hs, at::Tensor q, at::Tensor p, at::Tensor attn, at::Tensor u,
    at::Tensor a, at::Tensor z, at::Tensor rhat, at::Tensor rstd,
    at::Tensor w_hq, at::Tensor b_hq, at::Tensor w_o, at::Tensor b_o,
    at::Tensor w_ga, at::Tensor gamma, at::Tensor beta, at::Tensor mask,
    int64_t num_heads, bool reverse) {
  d_hs = d_hs.contiguous();
  d_last = d_last.contiguous();
  const int64_t t = x.size(0), b = x.size(1), e = x.size(2);
  auto o = x.options();
  auto dx = at::empty({t, b, e}, o), dh0 = at::empty({b, e}, o);
  auto dhw = at::empty({t, b, 2 * e}, o), du = at::empty({t, b, e}, o);
  auto dcand = at::empty({t, b, e}, o);
  auto acc = at::empty({b, e}, o), dr = at::empty({b, e}, o);
  auto da = at::empty({b, e}, o), d_o = at::empty({b, e}, o);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnrnn_backward", [&] {
    attnrnn::backward<scalar_t>(
        TorchOps<scalar_t>{o}, {t, b, e, num_heads}, reverse,
        d_hs.data_ptr<scalar_t>(), d_last.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
        weights(w_hq, b_hq, w_o, b_o, w_ga, gamma, beta),
        mask.numel() ? mask.data_ptr<bool>() : nullptr,
        {hs.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
         attn.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
         z.data_ptr<scalar_t>(), rhat.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>()},
        {dx.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), dhw.data_ptr<scalar_t>(),
         du.data_ptr<scalar_t>(), dcand.data_ptr<scalar_t>()},
        acc.data_ptr<scalar_t>(), dr.data_ptr<scalar_t>(),
        da.data_ptr<scalar_t>(), d_o.data_ptr<scalar_t>());
  });
  return {dx, dh0, dhw, du, dcand};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "AttnRNN forward loop (CPU)");
  m.def("backward", &backward, "AttnRNN backward loop (CPU)");
}
