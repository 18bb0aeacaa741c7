// tensorflow binding of the AttnRNN CPU loops (attnrnn_cpu.h): two custom
// ops whose matmuls are Eigen contractions on TensorFlow's intra-op thread
// pool. Built by tensorflow_cpp.py on first use.

#define EIGEN_USE_THREADS

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

#include "attnrnn_cpu.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;

template <typename T>
struct EigenOps {
  const Eigen::ThreadPoolDevice& device;

  using Matrix = Eigen::TensorMap<Eigen::Tensor<const T, 2, Eigen::RowMajor>>;

  void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
            bool trans_a, const T* b, int64_t ldb, bool trans_b, T* c,
            int64_t ldc, bool accumulate) const {
    using Index = Eigen::Index;
    // A stored (rows, lda), of which the first `cols` columns are used.
    auto view = [](const T* p, Index rows, Index cols, Index ld) {
      return Matrix(p, rows, ld).slice(Eigen::array<Index, 2>{0, 0},
                                       Eigen::array<Index, 2>{rows, cols});
    };
    auto A = trans_a ? view(a, k, m, lda) : view(a, m, k, lda);
    auto B = trans_b ? view(b, n, k, ldb) : view(b, k, n, ldb);
    Eigen::array<Eigen::IndexPair<Index>, 1> dims = {
        Eigen::IndexPair<Index>(trans_a ? 0 : 1, trans_b ? 1 : 0)};
    Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>> C(c, m, ldc);
    if (accumulate) {
      C.device(device) += A.contract(B, dims);
    } else {
      C.device(device) = A.contract(B, dims);
    }
  }

  template <typename F>
  void parallel_for(int64_t n, int64_t grain, F f) const {
    // Cost of one row: a few hundred flops and a few KiB moved.
    device.parallelFor(n, Eigen::TensorOpCost(4096, 1024, 2048),
                       [&f](Eigen::Index begin, Eigen::Index end) { f(begin, end); });
  }
};

template <typename T>
attnrnn::Weights weights(OpKernelContext* ctx, int first) {
  auto at = [&](int i) { return static_cast<const void*>(ctx->input(first + i).flat<T>().data()); };
  return {at(0), at(1), at(2), at(3), at(4), at(5), at(6)};
}

// On failure these record the status in ctx (checked by the callers).
template <typename T>
T* allocate(OpKernelContext* ctx, int index, const TensorShape& shape) {
  Tensor* out = nullptr;
  const auto status = ctx->allocate_output(index, shape, &out);
  if (!status.ok()) {
    ctx->SetStatus(status);
    return nullptr;
  }
  return out->flat<T>().data();
}

template <typename T>
T* scratch(OpKernelContext* ctx, Tensor* holder, const TensorShape& shape) {
  const auto status =
      ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value, shape, holder);
  if (!status.ok()) {
    ctx->SetStatus(status);
    return nullptr;
  }
  return holder->flat<T>().data();
}

const bool* mask_of(OpKernelContext* ctx, int index) {
  const Tensor& mask = ctx->input(index);
  return mask.NumElements() ? mask.flat<bool>().data() : nullptr;
}

template <typename T>
class ForwardOp : public OpKernel {
 public:
  explicit ForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_heads", &num_heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const int64_t t = x.dim_size(0), b = x.dim_size(1), e = x.dim_size(2);
    const TensorShape tbe({t, b, e});
    attnrnn::Saved<T> out;
    T** slots[] = {&out.hs, &out.q, &out.p, &out.o, &out.u, &out.a, &out.z, &out.rhat, &out.rstd};
    const TensorShape shapes[] = {tbe, tbe, TensorShape({t, b, num_heads_, 4}), tbe, tbe,
                                  tbe, tbe, tbe, TensorShape({t, b})};
    for (int i = 0; i < 9; ++i) {
      *slots[i] = allocate<T>(ctx, i, shapes[i]);
      if (!ctx->status().ok()) return;
    }
    Tensor hw_holder, g_holder;
    T* hw = scratch<T>(ctx, &hw_holder, TensorShape({b, 2 * e}));
    T* g = scratch<T>(ctx, &g_holder, TensorShape({b, e}));
    if (!ctx->status().ok()) return;
    attnrnn::forward<T>(EigenOps<T>{ctx->eigen_device<Eigen::ThreadPoolDevice>()},
                        {t, b, e, num_heads_}, reverse_, static_cast<T>(epsilon_),
                        x.flat<T>().data(), ctx->input(1).flat<T>().data(),
                        weights<T>(ctx, 2), mask_of(ctx, 9), out, hw, g);
  }

 private:
  int64_t num_heads_;
  bool reverse_;
  float epsilon_;
};

template <typename T>
class BackwardOp : public OpKernel {
 public:
  explicit BackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_heads", &num_heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
  }

  void Compute(OpKernelContext* ctx) override {
    // Inputs: d_hs, d_last, x, h0, the 9 saved tensors, the 7 weights, mask.
    const Tensor& x = ctx->input(2);
    const int64_t t = x.dim_size(0), b = x.dim_size(1), e = x.dim_size(2);
    auto in = [&](int i) { return const_cast<T*>(ctx->input(i).flat<T>().data()); };
    attnrnn::Saved<T> saved{in(4), in(5), in(6), in(7), in(8), in(9), in(10), in(11), in(12)};
    const TensorShape tbe({t, b, e});
    attnrnn::Grads<T> out;
    out.dx = allocate<T>(ctx, 0, tbe);
    out.dh0 = allocate<T>(ctx, 1, TensorShape({b, e}));
    out.dhw = allocate<T>(ctx, 2, TensorShape({t, b, 2 * e}));
    out.du = allocate<T>(ctx, 3, tbe);
    out.dcand = allocate<T>(ctx, 4, tbe);
    if (!ctx->status().ok()) return;
    Tensor holders[4];
    T* buffers[4];
    for (int i = 0; i < 4; ++i) buffers[i] = scratch<T>(ctx, &holders[i], TensorShape({b, e}));
    if (!ctx->status().ok()) return;
    attnrnn::backward<T>(EigenOps<T>{ctx->eigen_device<Eigen::ThreadPoolDevice>()},
                         {t, b, e, num_heads_}, reverse_, in(0), in(1), in(2), in(3),
                         weights<T>(ctx, 13), mask_of(ctx, 20), saved, out,
                         buffers[0], buffers[1], buffers[2], buffers[3]);
  }

 private:
  int64_t num_heads_;
  bool reverse_;
};

}  // namespace

REGISTER_OP("KerasAttnrnnForward")
    .Input("x: T")
    .Input("h0: T")
    .Input("w_hq: T")
    .Input("b_hq: T")
    .Input("w_o: T")
    .Input("b_o: T")
    .Input("w_ga: T")
    .Input("gamma: T")
    .Input("beta: T")
    .Input("mask: bool")
    .Output("hs: T")
    .Output("q: T")
    .Output("p: T")
    .Output("o: T")
    .Output("u: T")
    .Output("a: T")
    .Output("z: T")
    .Output("rhat: T")
    .Output("rstd: T")
    .Attr("T: {float, double}")
    .Attr("num_heads: int")
    .Attr("reverse: bool")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      int64_t n;
      TF_RETURN_IF_ERROR(c->GetAttr("num_heads", &n));
      auto x = c->input(0);
      for (int i : {0, 1, 3, 4, 5, 6, 7}) c->set_output(i, x);
      c->set_output(2, c->MakeShape({c->Dim(x, 0), c->Dim(x, 1), n, 4}));
      c->set_output(8, c->MakeShape({c->Dim(x, 0), c->Dim(x, 1)}));
      return absl::OkStatus();
    });

REGISTER_OP("KerasAttnrnnBackward")
    .Input("d_hs: T")
    .Input("d_last: T")
    .Input("x: T")
    .Input("h0: T")
    .Input("hs: T")
    .Input("q: T")
    .Input("p: T")
    .Input("o: T")
    .Input("u: T")
    .Input("a: T")
    .Input("z: T")
    .Input("rhat: T")
    .Input("rstd: T")
    .Input("w_hq: T")
    .Input("b_hq: T")
    .Input("w_o: T")
    .Input("b_o: T")
    .Input("w_ga: T")
    .Input("gamma: T")
    .Input("beta: T")
    .Input("mask: bool")
    .Output("dx: T")
    .Output("dh0: T")
    .Output("dhw: T")
    .Output("du: T")
    .Output("dcand: T")
    .Attr("T: {float, double}")
    .Attr("num_heads: int")
    .Attr("reverse: bool")
    .SetShapeFn([](InferenceContext* c) {
      auto x = c->input(2);
      tensorflow::shape_inference::DimensionHandle two_e;
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(x, 2), 2, &two_e));
      c->set_output(0, x);
      c->set_output(1, c->input(3));
      c->set_output(2, c->MakeShape({c->Dim(x, 0), c->Dim(x, 1), two_e}));
      c->set_output(3, x);
      c->set_output(4, x);
      return absl::OkStatus();
    });

#define REGISTER(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("KerasAttnrnnForward").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      ForwardOp<T>);                                                         \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("KerasAttnrnnBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"),\
      BackwardOp<T>);

REGISTER(float)
REGISTER(double)
