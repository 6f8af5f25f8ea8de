// The fused forward-mode MLP jet: a whole network's value, first-order rows and second-order
// row(s) in one op call, and its backward (to the weights, biases and x) in another. Used by the
// engine (torchhessdiag/engine.py) where the number of directions is small.
//
// Network: layers l = 0..L-1, z_l = W_l a_{l-1} + b_l, a_l = sigma_l(z_l) (or a_l = z_l where
// layer l has no activation), a_{-1} = x. Directions: V = [v_1..v_K] (d x K), or coordinate
// axes (`axes`, V absent). A layer without bias gets an empty bias tensor.
//
// Rows carried per point (row blocks of the jet, each (points, width)):
//   row 0            the value
//   rows 1..S        second-order rows: S = 1, the sum over the directions in `sel` of
//                    v_k^T (Hess a) v_k (Laplacian-like); or, `diag`, one row per entry of `sel`
//                    (Hessian-diagonal-like)
//   rows 1+S..S+K    first-order rows J_k = (d a / dx) v_k
// Through a linear layer every row is multiplied by W (one GEMM over all rows of all points; the
// bias only on row 0); through an activation (one fused pass, csrc/cpu/kernels_isa.h):
//   y = sigma(z),  J'_k = sigma'(z) J_k,  s' = sigma'(z) s + sigma''(z) sum_k J_k^2.
// Before the first activation the first-order rows are the same for every point (C = V^T W_0^T
// ...), so they are never formed per point, and the second-order rows are zero. After the last
// activation only the rows that reach the output are carried (value and second-order rows, plus
// the first-order rows when `grad_rows` asks for the gradient).
//
//   mlp_jet(x, Ws, bs, acts, act_a, act_b, V?, axes, sel, diag, grad_rows, chunk, save)
//     -> (out (R_out, N, m), saved)
//     out rows: value, S second-order rows, and (grad_rows) the K first-order rows
//     saved: per layer, the rows needed by the backward (flat; layout per chunk of points),
//            empty unless `save`
//   mlp_jet_backward(gout, x, Ws, bs, acts, act_a, act_b, V?, axes, sel, diag, grad_rows, chunk,
//                    saved, need_gx) -> (gx, gWs, gbs)
//
// CPU: the points are split into chunks of `chunk` points; each thread runs the whole network on
// its chunks (GEMMs through BLAS on the chunk, the activation pass, and in the backward the weight
// gradients accumulated per thread and summed at the end), so a chunk's jet stays in cache from
// layer to layer and nothing is allocated per layer. The backward recomputes each activation's
// output rows from the saved input rows in the same pass as its gradient, so only one jet per
// layer is stored.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "dispatch.h"

namespace thd {

struct MlpLayerSpec {
  const void* W;  // (out, in), contiguous
  const void* b;  // (out) or nullptr
  int64_t in, out;
  int act;       // Act id, or -1: no activation
  double a, b2;  // the activation's parameters
};

struct MlpPlan {
  at::ScalarType dtype;
  at::Device device{at::kCPU};
  int64_t N, d, K, S, m, chunk;
  bool diag, grad_rows;
  int first_act, last_act;
  std::vector<MlpLayerSpec> L;
  std::vector<int64_t> rows;    // rows of z_l's jet
  std::vector<int64_t> a_rows;  // rows of a_l's jet that the next layer (or the output) uses
  std::vector<int64_t> saved_numel;
  int64_t out_rows;
  std::vector<uint8_t> in_sum;  // sum mode: K flags
  std::vector<int64_t> sel;     // diag mode: S direction indices
  // constant first-order rows: Cs[l] = (K, w_l) for l <= first_act (C_{l} = C_{l-1} W_l^T,
  // C_{-1} = V^T); Q = (S, w_first) the squared sums the first activation needs
  std::vector<at::Tensor> Cs;
  at::Tensor VT, Q;           // VT = V^T (K, d) when directions were given as V
  std::vector<int64_t> axes;  // otherwise the coordinate axes (K of them)
  at::Tensor axes_t;
};

MlpPlan make_mlp_plan(const at::Tensor& x, const at::TensorList& Ws, const at::TensorList& bs,
                      at::IntArrayRef acts, at::ArrayRef<double> act_a, at::ArrayRef<double> act_b,
                      const c10::optional<at::Tensor>& V, at::IntArrayRef axes, at::IntArrayRef sel,
                      bool diag, bool grad_rows, int64_t chunk, const char* op);

// The CPU buffer pool (csrc/buffer_pool.h) that the fused op's saved rows and the activation ops'
// outputs come from, for torchhessdiag.empty_cache() / backend_info().
int64_t buffer_pool_clear();  // release them; returns the bytes released
int64_t buffer_pool_bytes();  // bytes held now

#ifdef THD_WITH_CUDA
// csrc/cuda/mlp_ops.cu: the whole network in one chunk on the GPU
void mlp_forward_cuda(const MlpPlan& P, const at::Tensor& x, at::Tensor& out,
                      std::vector<at::Tensor>& saved, bool save);
void mlp_backward_cuda(const MlpPlan& P, const at::Tensor& gout, const at::Tensor& x,
                       const std::vector<at::Tensor>& saved, at::Tensor& gx,
                       std::vector<at::Tensor>& gW, std::vector<at::Tensor>& gb, at::Tensor& gC);
#endif

}  // namespace thd
