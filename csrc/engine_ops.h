// The per-layer op of the second-order engine (torchhessdiag/engine.py), shared by the CPU and the
// CUDA implementations: argument checks, and the compute-half interface. The ops themselves
// (checks, allocation) live in csrc/engine_ops.cpp for both devices; csrc/cuda/engine_ops.cu
// only launches kernels on checked raw pointers (see the note at the top of act_ops_impl.h).
//
//   jet_layer(J, s1, c, need_ja) -> (Ja, acc)
//     J   (N, K, w)  first-order rows J_l v_k at the pre-activation z_l of one layer
//     s1  (N, w)     sigma'(z_l)
//     c   (m, N, w)  c_l = delta_l * sigma''(z_l), one row per output component
//     Ja  (N, K, w)  s1 * J, the rows after the activation (input of the next GEMM);
//                    shape (0,) when need_ja is false (last layer)
//     acc (m, N, K)  sum_j c[i,n,j] * J[n,k,j]^2 -- this layer's share of v_k^T (Hess u_i) v_k
//
//   jet_layer_(J, s1, c) -> acc          the same, overwriting J with Ja (inference, no copy)
//
//   jet_layer_backward(gJa?, gacc, J, s1, c) -> (dJ, ds1, dc)
//     dJ  = gJa * s1 + 2 J * sum_i gacc[i] c[i]
//     ds1 = sum_k gJa * J
//     dc  = sum_k gacc * J^2
//
// The layer needs no transcendental function: sigma' and sigma'' come once per (n, j) from the
// derivative table (act_derivatives) in the forward row, not once per (n, k, j).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

#include "dispatch.h"
#include "messages.h"

namespace thd {

struct LayerDims {
  int64_t N, K, w, m;
};

inline LayerDims check_jet_layer(const at::Tensor& J, const at::Tensor& s1, const at::Tensor& c,
                                 const char* op) {
  for (const at::Tensor* t : {&J, &s1, &c}) {
    THD_CHECK_VALUE(t->defined(), "torchhessdiag.", op, ": undefined tensor argument");
    THD_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
                   "torchhessdiag.", op, ": tensors must be float32 or float64, got ",
                   t->scalar_type());
    THD_CHECK_TYPE(t->scalar_type() == J.scalar_type(), "torchhessdiag.", op, ": dtypes differ (",
                   t->scalar_type(), " vs ", J.scalar_type(), ")");
    THD_CHECK_VALUE(t->device() == J.device(), "torchhessdiag.", op, ": devices differ (",
                    t->device(), " vs ", J.device(), ")");
  }
  THD_CHECK_VALUE(J.dim() == 3, "torchhessdiag.", op, ": J must be (N, K, w), got shape ",
                  J.sizes());
  const int64_t N = J.size(0), K = J.size(1), w = J.size(2);
  THD_CHECK_VALUE(s1.dim() == 2 && s1.size(0) == N && s1.size(1) == w, "torchhessdiag.", op,
                  ": s1 must be (N, w) = (", N, ", ", w, "), got ", s1.sizes());
  THD_CHECK_VALUE(c.dim() == 3 && c.size(1) == N && c.size(2) == w, "torchhessdiag.", op,
                  ": c must be (m, N, w) with N=", N, ", w=", w, ", got ", c.sizes());
  return {N, K, w, c.size(0)};
}

// Checks of jet_layer_backward's gradient arguments; returns (gJa or undefined, gacc), contiguous.
inline std::pair<at::Tensor, at::Tensor> check_jet_layer_grads(
    const c10::optional<at::Tensor>& gJa_, const at::Tensor& gacc_, const at::Tensor& J,
    const LayerDims& d) {
  auto check_grad = [&](const at::Tensor& t, const char* what) {
    THD_CHECK_TYPE(t.scalar_type() == J.scalar_type(), "torchhessdiag.jet_layer_backward: ", what,
                   " has dtype ", t.scalar_type(), " but J has ", J.scalar_type());
    THD_CHECK_VALUE(t.device() == J.device(), "torchhessdiag.jet_layer_backward: ", what, " is on ",
                    t.device(), " but J is on ", J.device());
  };
  check_grad(gacc_, "gacc");
  const at::Tensor gacc = gacc_.contiguous();
  THD_CHECK_VALUE(gacc.sizes() == at::IntArrayRef({d.m, d.N, d.K}),
                  "torchhessdiag.jet_layer_backward: gacc must be (m, N, K)");
  at::Tensor gJa;
  if (gJa_.has_value() && gJa_->defined()) {
    check_grad(*gJa_, "gJa");
    gJa = gJa_->contiguous();
    THD_CHECK_VALUE(gJa.sizes() == J.sizes(),
                    "torchhessdiag.jet_layer_backward: gJa must have J's shape");
  }
  return {gJa, gacc};
}

// Raw pointers of checked, contiguous tensors of dtype `dtype` (float32 or float64).
struct LayerRowsArgs {
  LayerDims d;
  at::ScalarType dtype;
  const void* J;
  void* Ja;  // nullptr: do not write Ja; may equal J (in place)
  const void *s1, *c;
  void* acc;
};
struct LayerBackwardArgs {
  LayerDims d;
  at::ScalarType dtype;
  const void* gJa;  // may be nullptr
  const void *gacc, *J, *s1, *c;
  void *dJ, *ds1, *dc;
};

#ifdef THD_WITH_CUDA
// csrc/cuda/engine_ops.cu
void layer_rows_cuda(const LayerRowsArgs& p);
void layer_backward_cuda(const LayerBackwardArgs& p);
#endif

}  // namespace thd
