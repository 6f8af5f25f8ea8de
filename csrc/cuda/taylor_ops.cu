// CUDA kernels of the taylor_act op (see ../taylor_ops.h): the compute half only; the op half
// (checks, allocation, device guard) is csrc/taylor_ops.cpp. The per-element arithmetic is
// csrc/taylor.h, shared with the CPU kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../taylor.h"
#include "../taylor_ops.h"
#include "launch.cuh"

namespace thd {
namespace {

// taylor_act: one thread per (point, direction, unit), all orders at once (csrc/taylor.h). The
// element index e = (p K + k) w + j is split into (p, k, j) once per thread and then advanced by
// the grid stride with carries: no 64-bit division per element.
template <int NO, typename T>
__global__ void taylor_kernel(const T* __restrict__ D, const T* __restrict__ H, T* __restrict__ Y,
                              int64_t N, int64_t K, int64_t w) {
  const int64_t total = N * K * w, sD = N * w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  int64_t j = e % w, q = e / w;
  int64_t k = q % K, p = q / K;
  const int64_t sj = stride % w, sq = stride / w;
  const int64_t sk = sq % K, sp = sq / K;
  for (; e < total; e += stride) {
    T dv[NO], hv[NO], yv[NO];
#pragma unroll
    for (int o = 0; o < NO; ++o) {
      dv[o] = D[o * sD + p * w + j];
      hv[o] = H[o * total + e];
    }
    taylor_forward<NO, T>(dv, hv, yv);
#pragma unroll
    for (int o = 0; o < NO; ++o) Y[o * total + e] = yv[o];
    // e + stride = ((p + sp) K + (k + sk)) w + (j + sj), with j + sj < 2w and then
    // k + sk + 1 < 2K: at most one carry each
    j += sj;
    k += sk;
    p += sp;
    if (j >= w) {
      j -= w;
      ++k;
    }
    if (k >= K) {
      k -= K;
      ++p;
    }
  }
}

// Backward: one thread per (point, unit) walks the K directions, so the sums over k of dD stay in
// registers (no atomics); dH is written per element.
template <int NO, typename T>
__global__ void taylor_backward_kernel(const T* __restrict__ gY, const T* __restrict__ D,
                                       const T* __restrict__ H, T* __restrict__ dD,
                                       T* __restrict__ dH, int64_t N, int64_t K, int64_t w) {
  const int64_t sD = N * w, sH = N * K * w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < sD;
       idx += stride) {
    const int64_t p = idx / w, j = idx % w;
    T dv[NO], gd[NO];
#pragma unroll
    for (int o = 0; o < NO; ++o) {
      dv[o] = D[o * sD + idx];
      gd[o] = T(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = (p * K + k) * w + j;
      T gv[NO], hv[NO], gh[NO];
#pragma unroll
      for (int o = 0; o < NO; ++o) {
        gv[o] = gY[o * sH + e];
        hv[o] = H[o * sH + e];
      }
      taylor_backward<NO, T>(gv, dv, hv, gd, gh);
#pragma unroll
      for (int o = 0; o < NO; ++o) dH[o * sH + e] = gh[o];
    }
#pragma unroll
    for (int o = 0; o < NO; ++o) dD[o * sD + idx] = gd[o];
  }
}

}  // namespace

void taylor_cuda(const TaylorArgs& p) {
  const TaylorDims& d = p.d;
  constexpr int threads = 256;
  const unsigned blocks = grid_for(d.N * d.K * d.w, threads);
  dispatch_taylor_order(static_cast<int>(d.n), [&](auto no) {
    constexpr int NO = decltype(no)::value;
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(p.dtype, [&](auto t) {
      using T = decltype(t);
      taylor_kernel<NO, T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(p.D),
                                                           static_cast<const T*>(p.H),
                                                           static_cast<T*>(p.Y), d.N, d.K, d.w);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void taylor_backward_cuda(const TaylorBackwardArgs& p) {
  const TaylorDims& d = p.d;
  constexpr int threads = 256;
  const unsigned blocks = grid_for(d.N * d.w, threads);
  dispatch_taylor_order(static_cast<int>(d.n), [&](auto no) {
    constexpr int NO = decltype(no)::value;
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(p.dtype, [&](auto t) {
      using T = decltype(t);
      taylor_backward_kernel<NO, T><<<blocks, threads, 0, stream>>>(
          static_cast<const T*>(p.gY), static_cast<const T*>(p.D), static_cast<const T*>(p.H),
          static_cast<T*>(p.dD), static_cast<T*>(p.dH), d.N, d.K, d.w);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace thd
