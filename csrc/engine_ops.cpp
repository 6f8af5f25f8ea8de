// The engine's per-layer op (see engine_ops.h): the op half for both devices (checks,
// allocation) and the CPU kernels. Parallel over points n; each point's K rows are contiguous,
// the inner loops over j are unit-stride and vectorisable.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "cuda_gate.h"
#include "engine_ops.h"

namespace thd {
namespace {

template <typename T>
void layer_rows_cpu(const T* J, T* Ja, const T* s1, const T* c, T* acc, const LayerDims& d) {
  const int64_t N = d.N, K = d.K, w = d.w, m = d.m;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * w));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* sr = s1 + n * w;
      for (int64_t k = 0; k < K; ++k) {
        const T* Jr = J + (n * K + k) * w;
        for (int64_t i = 0; i < m; ++i) {
          const T* cr = c + (i * N + n) * w;
          T s = T(0);
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < w; ++j) s += cr[j] * Jr[j] * Jr[j];
          acc[(i * N + n) * K + k] = s;
        }
        if (Ja != nullptr) {  // after the reduction: Ja may alias J (in-place variant)
          T* Jo = Ja + (n * K + k) * w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) Jo[j] = sr[j] * Jr[j];
        }
      }
    }
  });
}

template <typename T>
void layer_backward_cpu(const T* gJa, const T* gacc, const T* J, const T* s1, const T* c, T* dJ,
                        T* ds1, T* dc, const LayerDims& d) {
  const int64_t N = d.N, K = d.K, w = d.w, m = d.m;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * w));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<T> t(w);
    for (int64_t n = n0; n < n1; ++n) {
      const T* sr = s1 + n * w;
      T* dsr = ds1 + n * w;
      for (int64_t j = 0; j < w; ++j) dsr[j] = T(0);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < w; ++j) dc[(i * N + n) * w + j] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T* Jr = J + (n * K + k) * w;
        T* dJr = dJ + (n * K + k) * w;
        // t = 2 * sum_i gacc[i,n,k] c[i,n,:]
        for (int64_t j = 0; j < w; ++j) t[j] = T(0);
        for (int64_t i = 0; i < m; ++i) {
          const T ga = gacc[(i * N + n) * K + k];
          const T* cr = c + (i * N + n) * w;
          T* dcr = dc + (i * N + n) * w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            t[j] += ga * cr[j];
            dcr[j] += ga * Jr[j] * Jr[j];
          }
        }
        if (gJa != nullptr) {
          const T* gr = gJa + (n * K + k) * w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            dJr[j] = gr[j] * sr[j] + T(2) * Jr[j] * t[j];
            dsr[j] += gr[j] * Jr[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) dJr[j] = T(2) * Jr[j] * t[j];
        }
      }
    }
  });
}

// The CPU compute half (same interface as layer_rows_cuda / layer_backward_cuda). The dtype was
// checked by the op half (float32 or float64), so there is no error path here.
template <typename T>
void layer_rows_typed(const LayerRowsArgs& p) {
  layer_rows_cpu<T>(static_cast<const T*>(p.J), static_cast<T*>(p.Ja), static_cast<const T*>(p.s1),
                    static_cast<const T*>(p.c), static_cast<T*>(p.acc), p.d);
}

template <typename T>
void layer_backward_typed(const LayerBackwardArgs& p) {
  layer_backward_cpu<T>(static_cast<const T*>(p.gJa), static_cast<const T*>(p.gacc),
                        static_cast<const T*>(p.J), static_cast<const T*>(p.s1),
                        static_cast<const T*>(p.c), static_cast<T*>(p.dJ), static_cast<T*>(p.ds1),
                        static_cast<T*>(p.dc), p.d);
}

void layer_rows_host(const LayerRowsArgs& p) {
  dispatch_float(p.dtype, [&](auto t) { layer_rows_typed<decltype(t)>(p); });
}

void layer_backward_host(const LayerBackwardArgs& p) {
  dispatch_float(p.dtype, [&](auto t) { layer_backward_typed<decltype(t)>(p); });
}

// ---- the ops, for both devices: checks and allocation here, compute in Rows / Backward ----------

// An in-place op's written tensor `out` must not share memory with an input it still reads
// (both contiguous here, so ATen's overlap test is exact). Mirrored by ops._check_no_overlap.
void check_no_overlap(const at::Tensor& out, const at::Tensor& in, const char* what,
                      const char* op) {
  THD_CHECK_VALUE(at::get_overlap_status(out, in) == at::MemOverlapStatus::No, "torchhessdiag.", op,
                  ": ", what,
                  " shares memory with J, which this op overwrites while it still "
                  "reads ",
                  what, "; pass ", what, ".clone(), or use the out-of-place jet_layer");
}

template <void (*Rows)(const LayerRowsArgs&)>
std::tuple<at::Tensor, at::Tensor> jet_layer_op(const at::Tensor& J_, const at::Tensor& s1_,
                                                const at::Tensor& c_, bool need_ja) {
  const LayerDims d = check_jet_layer(J_, s1_, c_, "jet_layer");
  const at::OptionalDeviceGuard guard(at::device_of(J_));
  const at::Tensor J = J_.contiguous(), s1 = s1_.contiguous(), c = c_.contiguous();
  at::Tensor Ja = need_ja ? at::empty_like(J) : at::empty({0}, J.options());
  at::Tensor acc = at::empty({d.m, d.N, d.K}, J.options());
  if (J.numel() == 0) return {Ja, acc.zero_()};  // (m = 0 still needs Ja)
  Rows({d, J.scalar_type(), J.data_ptr(), need_ja ? Ja.data_ptr() : nullptr, s1.data_ptr(),
        c.data_ptr(), acc.data_ptr()});
  return {Ja, acc};
}

template <void (*Rows)(const LayerRowsArgs&)>
at::Tensor jet_layer_inplace_op(at::Tensor& J, const at::Tensor& s1_, const at::Tensor& c_) {
  const LayerDims d = check_jet_layer(J, s1_, c_, "jet_layer_");
  THD_CHECK_VALUE(J.is_contiguous(), "torchhessdiag.jet_layer_: J must be contiguous");
  const at::OptionalDeviceGuard guard(at::device_of(J));
  const at::Tensor s1 = s1_.contiguous(), c = c_.contiguous();
  // J is overwritten while s1 and c are still being read (and the CUDA kernel declares them
  // __restrict__): they must not share memory with J. A non-contiguous s1 / c was copied above.
  check_no_overlap(J, s1, "s1", "jet_layer_");
  check_no_overlap(J, c, "c", "jet_layer_");
  at::Tensor acc = at::empty({d.m, d.N, d.K}, J.options());
  if (J.numel() == 0) return acc.zero_();
  Rows({d, J.scalar_type(), J.data_ptr(), J.data_ptr(), s1.data_ptr(), c.data_ptr(),
        acc.data_ptr()});
  return acc;
}

template <void (*Backward)(const LayerBackwardArgs&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_layer_backward_op(
    const c10::optional<at::Tensor>& gJa_, const at::Tensor& gacc_, const at::Tensor& J_,
    const at::Tensor& s1_, const at::Tensor& c_) {
  const LayerDims d = check_jet_layer(J_, s1_, c_, "jet_layer_backward");
  const at::OptionalDeviceGuard guard(at::device_of(J_));
  const at::Tensor J = J_.contiguous(), s1 = s1_.contiguous(), c = c_.contiguous();
  at::Tensor gJa, gacc;  // (no structured bindings: they cannot be captured by lambdas in C++17)
  std::tie(gJa, gacc) = check_jet_layer_grads(gJa_, gacc_, J, d);
  at::Tensor dJ = at::empty_like(J), ds1 = at::empty_like(s1), dc = at::empty_like(c);
  if (J.numel() == 0) return {dJ, ds1.zero_(), dc.zero_()};
  Backward({d, J.scalar_type(), gJa.defined() ? gJa.data_ptr() : nullptr, gacc.data_ptr(),
            J.data_ptr(), s1.data_ptr(), c.data_ptr(), dJ.data_ptr(), ds1.data_ptr(),
            dc.data_ptr()});
  return {dJ, ds1, dc};
}

}  // namespace
}  // namespace thd

// Schemas: torchhessdiag/_schemas.py, the one definition (the package defines the ops from it
// before this library is loaded; the kernels below attach to them).

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  m.impl("jet_layer", &thd::jet_layer_op<thd::layer_rows_host>);
  m.impl("jet_layer_", &thd::jet_layer_inplace_op<thd::layer_rows_host>);
  m.impl("jet_layer_backward", &thd::jet_layer_backward_op<thd::layer_backward_host>);
}

namespace thd {
// The reference ops a CUDA device without a kernel image falls back to (csrc/cuda_gate.h).
constexpr char kRefJetLayer[] = "torchhessdiag_ref::jet_layer";
constexpr char kRefJetLayerInplace[] = "torchhessdiag_ref::jet_layer_";
constexpr char kRefJetLayerBackward[] = "torchhessdiag_ref::jet_layer_backward";
}  // namespace thd

// The gate's fallback path on the CPU, for tests (schemas defined by torchhessdiag/ops.py).
TORCH_LIBRARY_IMPL(torchhessdiag_gatetest, CPU, m) {
  using thd::TestGate;
  m.impl("jet_layer", &TestGate<&thd::jet_layer_op<thd::layer_rows_host>, thd::kRefJetLayer>::call);
  m.impl(
      "jet_layer_",
      &TestGate<&thd::jet_layer_inplace_op<thd::layer_rows_host>, thd::kRefJetLayerInplace>::call);
  m.impl("jet_layer_backward", &TestGate<&thd::jet_layer_backward_op<thd::layer_backward_host>,
                                         thd::kRefJetLayerBackward>::call);
}

#ifdef THD_WITH_CUDA
TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  using thd::CudaGate;
  m.impl("jet_layer", &CudaGate<&thd::jet_layer_op<thd::layer_rows_cuda>, thd::kRefJetLayer>::call);
  m.impl(
      "jet_layer_",
      &CudaGate<&thd::jet_layer_inplace_op<thd::layer_rows_cuda>, thd::kRefJetLayerInplace>::call);
  m.impl("jet_layer_backward", &CudaGate<&thd::jet_layer_backward_op<thd::layer_backward_cuda>,
                                         thd::kRefJetLayerBackward>::call);
}
#endif
