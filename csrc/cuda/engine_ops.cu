// CUDA kernels of the engine's per-layer op (see ../engine_ops.h).
//
// Forward: one warp per row (n, k); the lanes stride over j (coalesced), reduce
// sum_j c[i,n,j] J[n,k,j]^2 with warp shuffles (no atomics, no shared memory), and write
// Ja = s1 * J in the same pass. Backward: one thread per (n, j) walks the K rows of point n, so
// the reductions over k (ds1, dc) stay in registers -- again no atomics.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../engine_ops.h"

namespace thd {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block in the forward kernel

template <typename T>
__global__ void layer_rows_kernel(const T* J, T* Ja,  // may alias (in-place)
                                  const T* __restrict__ s1,
                                  const T* __restrict__ c, T* __restrict__ acc, int64_t N,
                                  int64_t K, int64_t w, int64_t m) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N * K) return;  // whole warp leaves together
  const int64_t n = row / K, k = row % K;
  const T* Jr = J + row * w;
  for (int64_t i = 0; i < m; ++i) {
    const T* cr = c + (i * N + n) * w;
    T s = T(0);
    for (int64_t j = lane; j < w; j += kWarp) {
      const T v = Jr[j];
      s += cr[j] * v * v;
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) acc[(i * N + n) * K + k] = s;
  }
  if (Ja != nullptr) {  // after all reads of this row: Ja may alias J (in-place variant)
    __syncwarp();
    const T* sr = s1 + n * w;
    T* Jo = Ja + row * w;
    for (int64_t j = lane; j < w; j += kWarp) Jo[j] = sr[j] * Jr[j];
  }
}

template <typename T>
__global__ void layer_backward_kernel(const T* __restrict__ gJa, const T* __restrict__ gacc,
                                      const T* __restrict__ J, const T* __restrict__ s1,
                                      const T* __restrict__ c, T* __restrict__ dJ,
                                      T* __restrict__ ds1, T* __restrict__ dc, int64_t N,
                                      int64_t K, int64_t w, int64_t m) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * w) return;
  const int64_t n = idx / w, j = idx % w;
  const T s = s1[idx];
  T ds = T(0);
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

void launch_rows(const at::Tensor& J, const at::Tensor& Ja, const at::Tensor& s1,
                 const at::Tensor& c, const at::Tensor& acc, const LayerDims& d, bool write_ja) {
  const int64_t rows = d.N * d.K;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "torchhessdiag.jet_layer: too many rows");
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "torchhessdiag::jet_layer_cuda", [&] {
    layer_rows_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            J.data_ptr<scalar_t>(), write_ja ? Ja.data_ptr<scalar_t>() : nullptr,
            s1.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), acc.data_ptr<scalar_t>(), d.N, d.K,
            d.w, d.m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> jet_layer_cuda(const at::Tensor& J_, const at::Tensor& s1_,
                                                  const at::Tensor& c_, bool need_ja) {
  const LayerDims d = check_jet_layer(J_, s1_, c_, "jet_layer");
  const c10::cuda::CUDAGuard guard(J_.device());
  const at::Tensor J = J_.contiguous(), s1 = s1_.contiguous(), c = c_.contiguous();
  at::Tensor Ja = need_ja ? at::empty_like(J) : at::empty({0}, J.options());
  at::Tensor acc = at::empty({d.m, d.N, d.K}, J.options());
  if (J.numel() == 0) return {Ja, acc.zero_()};  // (m = 0 still needs Ja)
  launch_rows(J, Ja, s1, c, acc, d, need_ja);
  return {Ja, acc};
}

at::Tensor jet_layer_inplace_cuda(at::Tensor& J, const at::Tensor& s1_, const at::Tensor& c_) {
  const LayerDims d = check_jet_layer(J, s1_, c_, "jet_layer_");
  TORCH_CHECK_VALUE(J.is_contiguous(), "torchhessdiag.jet_layer_: J must be contiguous");
  const c10::cuda::CUDAGuard guard(J.device());
  const at::Tensor s1 = s1_.contiguous(), c = c_.contiguous();
  at::Tensor acc = at::empty({d.m, d.N, d.K}, J.options());
  if (J.numel() == 0) return acc.zero_();
  launch_rows(J, J, s1, c, acc, d, true);
  return acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_layer_backward_cuda(
    const c10::optional<at::Tensor>& gJa_, const at::Tensor& gacc_, const at::Tensor& J_,
    const at::Tensor& s1_, const at::Tensor& c_) {
  const LayerDims d = check_jet_layer(J_, s1_, c_, "jet_layer_backward");
  const c10::cuda::CUDAGuard guard(J_.device());
  const at::Tensor J = J_.contiguous(), s1 = s1_.contiguous(), c = c_.contiguous();
  at::Tensor gJa, gacc;  // (no structured bindings: they cannot be captured by lambdas in C++17)
  std::tie(gJa, gacc) = check_jet_layer_grads(gJa_, gacc_, J, d);
  at::Tensor dJ = at::empty_like(J), ds1 = at::empty_like(s1), dc = at::empty_like(c);
  if (J.numel() == 0) return {dJ, ds1.zero_(), dc.zero_()};
  const int64_t threads = 256, total = d.N * d.w;
  const int64_t blocks = (total + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "torchhessdiag.jet_layer_backward: too large");
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "torchhessdiag::jet_layer_backward_cuda", [&] {
    layer_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
        gJa.defined() ? gJa.data_ptr<scalar_t>() : nullptr, gacc.data_ptr<scalar_t>(),
        J.data_ptr<scalar_t>(), s1.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
        dJ.data_ptr<scalar_t>(), ds1.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), d.N, d.K,
        d.w, d.m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dJ, ds1, dc};
}

}  // namespace
}  // namespace thd

TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  m.impl("jet_layer", &thd::jet_layer_cuda);
  m.impl("jet_layer_", &thd::jet_layer_inplace_cuda);
  m.impl("jet_layer_backward", &thd::jet_layer_backward_cuda);
}
