// CUDA kernels of the engine's per-layer op (see ../engine_ops.h): the compute half only; the op
// half (checks, allocation, device guard) is csrc/engine_ops.cpp.
//
// Forward: one group of G lanes per row (n, k), G the smallest power of two >= w, at most a warp
// (w = 16: two rows per warp, no idle half-warp); the lanes stride over j (coalesced), reduce
// sum_j c[i,n,j] J[n,k,j]^2 with shuffles within the group (no atomics, no shared memory), and
// write Ja = s1 * J in the same pass. Backward: one thread per (n, j) walks the K rows of point
// n, so the reductions over k (ds1, dc) stay in registers -- again no atomics; for m <= 4 the m
// values of c and the m partial sums of dc live in registers, so c and J are read once.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../engine_ops.h"
#include "launch.cuh"

namespace thd {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // in the forward kernel

// Lanes per row in the forward kernel: the smallest power of two >= w, at most a warp. The tree
// reduction over a group of G lanes adds exactly the numbers the full-warp tree added (the lanes
// beyond w held +0), so results do not depend on G.
int lanes_per_row(int64_t w) {
  int g = 1;
  while (g < w && g < kWarp) g *= 2;
  return g;
}

template <typename T>
__global__ void layer_rows_kernel(const T* J, T* Ja,  // may alias (in-place)
                                  const T* __restrict__ s1, const T* __restrict__ c,
                                  T* __restrict__ acc, int64_t N, int64_t K, int64_t w, int64_t m,
                                  int G) {
  const int lane = threadIdx.x % kWarp;
  const int sub = lane % G;  // lane within the row's group
  const int64_t rows_per_warp = kWarp / G;
  const int64_t rows = N * K;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock * rows_per_warp;
  // grid-stride over the warp's rows (64-bit: any N*K); the loop condition is the same for the
  // whole warp, so every lane reaches every shuffle; a group past the last row (row >= rows)
  // reads and writes nothing
  for (int64_t base = warp * rows_per_warp; base < rows; base += stride) {
    const int64_t row = base + lane / G;
    const bool active = row < rows;
    const int64_t r = active ? row : 0;
    const int64_t n = r / K, k = r % K;
    const T* Jr = J + r * w;
    for (int64_t i = 0; i < m; ++i) {
      const T* cr = c + (i * N + n) * w;
      T s = T(0);
      if (active) {
        for (int64_t j = sub; j < w; j += G) {
          const T v = Jr[j];
          s += cr[j] * v * v;
        }
      }
      for (int off = G / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off, G);
      if (active && sub == 0) acc[(i * N + n) * K + k] = s;
    }
    if (Ja != nullptr) {  // after all reads of this row: Ja may alias J (in-place variant)
      __syncwarp();
      if (active) {
        const T* sr = s1 + n * w;
        T* Jo = Ja + r * w;
        for (int64_t j = sub; j < w; j += G) Jo[j] = sr[j] * Jr[j];
      }
    }
  }
}

// M: the number m of output components when it is 1..4 (c and the dc sums in registers: c and J
// are read once per (n, j)); 0: any m (c re-read per row k, J re-read per component i). Both
// add the same terms in the same order (t over i, dc over k), so results do not depend on M.
template <typename T, int M>
__global__ void layer_backward_kernel(const T* __restrict__ gJa, const T* __restrict__ gacc,
                                      const T* __restrict__ J, const T* __restrict__ s1,
                                      const T* __restrict__ c, T* __restrict__ dJ,
                                      T* __restrict__ ds1, T* __restrict__ dc, int64_t N, int64_t K,
                                      int64_t w, int64_t m) {
  const int64_t total = N * w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t n = idx / w, j = idx % w;
    const T s = s1[idx];
    T ds = T(0);
    if constexpr (M > 0) {
      T cv[M], a[M];
#pragma unroll
      for (int i = 0; i < M; ++i) {
        cv[i] = c[(i * N + n) * w + j];
        a[i] = T(0);
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (n * K + k) * w + j;
        const T v = J[r];
        T t = T(0);
#pragma unroll
        for (int i = 0; i < M; ++i) {
          const T ga = gacc[(i * N + n) * K + k];
          t += ga * cv[i];
          a[i] += ga * v * v;
        }
        T out = T(2) * v * t;
        if (gJa != nullptr) {
          const T g = gJa[r];
          out += g * s;
          ds += g * v;
        }
        dJ[r] = out;
      }
      ds1[idx] = ds;
#pragma unroll
      for (int i = 0; i < M; ++i) dc[(i * N + n) * w + j] = a[i];
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (n * K + k) * w + j;
        const T v = J[r];
        T t = T(0);
        for (int64_t i = 0; i < m; ++i) t += gacc[(i * N + n) * K + k] * c[(i * N + n) * w + j];
        T out = T(2) * v * t;
        if (gJa != nullptr) {
          const T g = gJa[r];
          out += g * s;
          ds += g * v;
        }
        dJ[r] = out;
      }
      ds1[idx] = ds;
      for (int64_t i = 0; i < m; ++i) {
        T a = T(0);
        for (int64_t k = 0; k < K; ++k) {
          const T v = J[(n * K + k) * w + j];
          a += gacc[(i * N + n) * K + k] * v * v;
        }
        dc[(i * N + n) * w + j] = a;
      }
    }
  }
}

template <typename T>
void rows_typed(const LayerRowsArgs& p) {
  const LayerDims& d = p.d;
  const int G = lanes_per_row(d.w);
  const int64_t rows_per_block = static_cast<int64_t>(kWarpsPerBlock) * (kWarp / G);
  layer_rows_kernel<T><<<grid_for(d.N * d.K, rows_per_block), kWarpsPerBlock * kWarp, 0,
                         at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(p.J), static_cast<T*>(p.Ja), static_cast<const T*>(p.s1),
      static_cast<const T*>(p.c), static_cast<T*>(p.acc), d.N, d.K, d.w, d.m, G);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int M>
void backward_launch(const LayerBackwardArgs& p) {
  const LayerDims& d = p.d;
  constexpr int threads = 256;
  layer_backward_kernel<T, M>
      <<<grid_for(d.N * d.w, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const T*>(p.gJa), static_cast<const T*>(p.gacc), static_cast<const T*>(p.J),
          static_cast<const T*>(p.s1), static_cast<const T*>(p.c), static_cast<T*>(p.dJ),
          static_cast<T*>(p.ds1), static_cast<T*>(p.dc), d.N, d.K, d.w, d.m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_typed(const LayerBackwardArgs& p) {
  switch (p.d.m) {
    case 1: backward_launch<T, 1>(p); break;
    case 2: backward_launch<T, 2>(p); break;
    case 3: backward_launch<T, 3>(p); break;
    case 4: backward_launch<T, 4>(p); break;
    default: backward_launch<T, 0>(p); break;
  }
}

}  // namespace

// dtype checked by the op half (float32 or float64); no error path here
void layer_rows_cuda(const LayerRowsArgs& p) {
  dispatch_float(p.dtype, [&](auto t) { rows_typed<decltype(t)>(p); });
}

void layer_backward_cuda(const LayerBackwardArgs& p) {
  dispatch_float(p.dtype, [&](auto t) { backward_typed<decltype(t)>(p); });
}

}  // namespace thd
