// The taylor_act op (Faa di Bruno over a Taylor jet, the traced jets' activation rule,
// torchhessdiag/_rules_activation.py), shared by the CPU and the CUDA implementations: argument
// checks and the compute-half interface. The op half (checks, allocation) lives in
// csrc/taylor_ops.cpp for both devices; csrc/cuda/taylor_ops.cu only launches kernels on checked
// raw pointers. The per-element arithmetic is csrc/taylor.h.
#pragma once

#include <ATen/ATen.h>

#include "dispatch.h"
#include "messages.h"

namespace thd {

//   taylor_act(D, H) -> Y
//     D  (n, N, w)     sigma^(1..n)(h0), from the derivative table (act_derivatives)
//     H  (n, N, K, w)  derivative coefficients h1..hn of the jet along K directions
//     Y  (n, N, K, w)  the coefficients y1..yn of sigma(h), 1 <= n <= 4
//
//   taylor_act_backward(gY, D, H) -> (dD, dH)   its vector-Jacobian product (dD sums over K)

struct TaylorDims {
  int64_t n, N, K, w;
};

inline TaylorDims check_taylor(const at::Tensor& D, const at::Tensor& H, const char* op) {
  for (const at::Tensor* t : {&D, &H}) {
    THD_CHECK_VALUE(t->defined(), "torchhessdiag.", op, ": undefined tensor argument");
    THD_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
                   "torchhessdiag.", op, ": tensors must be float32 or float64, got ",
                   t->scalar_type());
    THD_CHECK_TYPE(t->scalar_type() == D.scalar_type(), "torchhessdiag.", op, ": dtypes differ (",
                   t->scalar_type(), " vs ", D.scalar_type(), ")");
    THD_CHECK_VALUE(t->device() == D.device(), "torchhessdiag.", op, ": devices differ (",
                    t->device(), " vs ", D.device(), ")");
  }
  THD_CHECK_VALUE(H.dim() == 4, "torchhessdiag.", op, ": H must be (n, N, K, w), got shape ",
                  H.sizes());
  const int64_t n = H.size(0), N = H.size(1), K = H.size(2), w = H.size(3);
  THD_CHECK_VALUE(n >= 1 && n <= 4, "torchhessdiag.", op,
                  ": the jet order n = H.shape[0] must be 1..4, got ", n);
  THD_CHECK_VALUE(D.dim() == 3 && D.size(0) == n && D.size(1) == N && D.size(2) == w,
                  "torchhessdiag.", op, ": D must be (n, N, w) = (", n, ", ", N, ", ", w, "), got ",
                  D.sizes());
  return {n, N, K, w};
}

struct TaylorArgs {
  TaylorDims d;
  at::ScalarType dtype;
  const void *D, *H;
  void* Y;
};
struct TaylorBackwardArgs {
  TaylorDims d;
  at::ScalarType dtype;
  const void *gY, *D, *H;
  void *dD, *dH;
};

#ifdef THD_WITH_CUDA
// csrc/cuda/taylor_ops.cu
void taylor_cuda(const TaylorArgs& p);
void taylor_backward_cuda(const TaylorBackwardArgs& p);
#endif

}  // namespace thd
