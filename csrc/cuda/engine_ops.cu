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
#include "../taylor.h"

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

// Blocks for a grid-stride launch: enough to fill the GPU, never more than the work needs.
unsigned grid_for(int64_t work_items, int64_t per_block) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work_items + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<unsigned>(want < cap ? want : cap);
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
