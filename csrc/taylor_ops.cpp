// The taylor_act op (see taylor_ops.h): the op half for both devices (checks, allocation) and the
// CPU kernels, parallel over points with the inner loop over units unit-stride in every tensor.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_gate.h"
#include "taylor.h"
#include "taylor_ops.h"

namespace thd {
namespace {

// taylor_act on the CPU: parallel over points; for each (k, j) gather the n coefficients, apply
// Faa di Bruno (csrc/taylor.h), scatter. The inner loop over j is unit-stride in every tensor.
template <int NO, typename T>
void taylor_cpu(const T* D, const T* H, T* Y, const TaylorDims& d) {
  const int64_t N = d.N, K = d.K, w = d.w, sD = N * w, sH = N * K * w;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, NO * K * w));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t p = n0; p < n1; ++p) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t off = (p * K + k) * w;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          T dv[NO], hv[NO], yv[NO];
          for (int o = 0; o < NO; ++o) {
            dv[o] = D[o * sD + p * w + j];
            hv[o] = H[o * sH + off + j];
          }
          taylor_forward<NO, T>(dv, hv, yv);
          for (int o = 0; o < NO; ++o) Y[o * sH + off + j] = yv[o];
        }
      }
    }
  });
}

// Backward: dH per element; dD sums over the K directions of each point, accumulated in place
// (the point's rows of dD belong to one thread), so no atomics.
template <int NO, typename T>
void taylor_backward_cpu(const T* gY, const T* D, const T* H, T* dD, T* dH, const TaylorDims& d) {
  const int64_t N = d.N, K = d.K, w = d.w, sD = N * w, sH = N * K * w;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, NO * K * w));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t p = n0; p < n1; ++p) {
      for (int o = 0; o < NO; ++o)
        for (int64_t j = 0; j < w; ++j) dD[o * sD + p * w + j] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t off = (p * K + k) * w;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          T gv[NO], dv[NO], hv[NO], gd[NO], gh[NO];
          for (int o = 0; o < NO; ++o) {
            gv[o] = gY[o * sH + off + j];
            dv[o] = D[o * sD + p * w + j];
            hv[o] = H[o * sH + off + j];
            gd[o] = T(0);
          }
          taylor_backward<NO, T>(gv, dv, hv, gd, gh);
          for (int o = 0; o < NO; ++o) {
            dD[o * sD + p * w + j] += gd[o];
            dH[o * sH + off + j] = gh[o];
          }
        }
      }
    }
  });
}

void taylor_host(const TaylorArgs& p) {
  dispatch_taylor_order(static_cast<int>(p.d.n), [&](auto no) {
    constexpr int NO = decltype(no)::value;
    dispatch_float(p.dtype, [&](auto t) {
      using T = decltype(t);
      taylor_cpu<NO, T>(static_cast<const T*>(p.D), static_cast<const T*>(p.H),
                        static_cast<T*>(p.Y), p.d);
    });
  });
}

void taylor_backward_host(const TaylorBackwardArgs& p) {
  dispatch_taylor_order(static_cast<int>(p.d.n), [&](auto no) {
    constexpr int NO = decltype(no)::value;
    dispatch_float(p.dtype, [&](auto t) {
      using T = decltype(t);
      taylor_backward_cpu<NO, T>(static_cast<const T*>(p.gY), static_cast<const T*>(p.D),
                                 static_cast<const T*>(p.H), static_cast<T*>(p.dD),
                                 static_cast<T*>(p.dH), p.d);
    });
  });
}

// ---- the op, for both devices: checks and allocation here, compute in Fwd / Bwd ----------------

template <void (*Fwd)(const TaylorArgs&)>
at::Tensor taylor_act_op(const at::Tensor& D_, const at::Tensor& H_) {
  const TaylorDims d = check_taylor(D_, H_, "taylor_act");
  const at::OptionalDeviceGuard guard(at::device_of(H_));
  const at::Tensor D = D_.contiguous(), H = H_.contiguous();
  at::Tensor Y = at::empty_like(H, at::MemoryFormat::Contiguous);
  if (H.numel() == 0) return Y;
  Fwd({d, H.scalar_type(), D.data_ptr(), H.data_ptr(), Y.data_ptr()});
  return Y;
}

template <void (*Bwd)(const TaylorBackwardArgs&)>
std::tuple<at::Tensor, at::Tensor> taylor_act_backward_op(const at::Tensor& gY_,
                                                          const at::Tensor& D_,
                                                          const at::Tensor& H_) {
  const TaylorDims d = check_taylor(D_, H_, "taylor_act_backward");
  THD_CHECK_TYPE(gY_.scalar_type() == H_.scalar_type(),
                 "torchhessdiag.taylor_act_backward: gY has dtype ", gY_.scalar_type(),
                 " but H has ", H_.scalar_type());
  THD_CHECK_VALUE(gY_.device() == H_.device(), "torchhessdiag.taylor_act_backward: gY is on ",
                  gY_.device(), " but H is on ", H_.device());
  THD_CHECK_VALUE(gY_.sizes() == H_.sizes(),
                  "torchhessdiag.taylor_act_backward: gY must have H's shape ", H_.sizes(),
                  ", got ", gY_.sizes());
  const at::OptionalDeviceGuard guard(at::device_of(H_));
  const at::Tensor gY = gY_.contiguous(), D = D_.contiguous(), H = H_.contiguous();
  at::Tensor dD = at::empty_like(D, at::MemoryFormat::Contiguous);
  at::Tensor dH = at::empty_like(H, at::MemoryFormat::Contiguous);
  if (H.numel() == 0) return {dD.zero_(), dH};
  Bwd({d, H.scalar_type(), gY.data_ptr(), D.data_ptr(), H.data_ptr(), dD.data_ptr(),
       dH.data_ptr()});
  return {dD, dH};
}

}  // namespace

// The reference ops a CUDA device without a kernel image falls back to (csrc/cuda_gate.h).
constexpr char kRefTaylorAct[] = "torchhessdiag_ref::taylor_act";
constexpr char kRefTaylorActBackward[] = "torchhessdiag_ref::taylor_act_backward";
}  // namespace thd

// Schemas: torchhessdiag/_schemas.py, the one definition (the package defines the ops from it
// before this library is loaded; the kernels below attach to them).

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  m.impl("taylor_act", &thd::taylor_act_op<thd::taylor_host>);
  m.impl("taylor_act_backward", &thd::taylor_act_backward_op<thd::taylor_backward_host>);
}

// The gate's fallback path on the CPU, for tests.
TORCH_LIBRARY_IMPL(torchhessdiag_gatetest, CPU, m) {
  using thd::TestGate;
  m.impl("taylor_act", &TestGate<&thd::taylor_act_op<thd::taylor_host>, thd::kRefTaylorAct>::call);
  m.impl("taylor_act_backward", &TestGate<&thd::taylor_act_backward_op<thd::taylor_backward_host>,
                                          thd::kRefTaylorActBackward>::call);
}

#ifdef THD_WITH_CUDA
TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  using thd::CudaGate;
  m.impl("taylor_act", &CudaGate<&thd::taylor_act_op<thd::taylor_cuda>, thd::kRefTaylorAct>::call);
  m.impl("taylor_act_backward", &CudaGate<&thd::taylor_act_backward_op<thd::taylor_backward_cuda>,
                                          thd::kRefTaylorActBackward>::call);
}
#endif
