// The fused forward-mode MLP jet on CUDA (see ../mlp_ops.h): the whole network on all points at
// once -- cuBLAS GEMMs over all rows of a layer, and one kernel per activation whose threads each
// run the per-element body shared with the CPU (csrc/cpu/kernels_isa.h, on scalars). Checks,
// the plan and allocation of the outputs happen in csrc/mlp_ops.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <vector>

#include "../activations.h"
#include "../cpu/kernels.h"
#include "../cpu/kernels_isa.h"
#include "../mlp_ops.h"

namespace thd {
namespace {

// Row-major C (M x N) = op(A) op(B) + beta C, through torch's own addmm on views of the buffers
// (at::cuda::blas::gemm is not exported from libtorch_cuda, and linking cuBLAS ourselves could
// pick a different cuBLAS than torch's). The GEMMs follow torch's TF32 setting for float32, like
// torch.matmul (README: "CUDA").
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const auto opt = at::TensorOptions()
                       .dtype(c10::CppTypeToScalarType<T>::value)
                       .device(at::kCUDA, c10::cuda::current_device());
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (K == 0) {
    c.mul_(beta);
    return;
  }
  auto view = [&](const T* p, bool t, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is rows x cols; X itself is stored row-major with leading dimension ld.
    at::Tensor x = t ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opt)
                     : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opt);
    return t ? x.t() : x;
  };
  c.addmm_(view(A, ta, M, K, lda), view(B, tb, K, N, ldb), beta, T(1));
}

// Threads: x over the columns j of a layer, y over points (grid-stride).
template <typename T, class Act, int MODE, bool BACKWARD>
__global__ void mlp_act_kernel(cpu::MlpActJob p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.w) return;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < p.n;
       i += step) {
    if constexpr (BACKWARD)
      mlp_backward_elem<ScalarLanes<T>, Act, MODE>(p, i, j, 1);
    else
      mlp_forward_elem<ScalarLanes<T>, Act, MODE>(p, i, j, 1);
  }
}

template <typename T, bool BACKWARD>
void launch_act(const cpu::MlpActJob& p) {
  if (p.n == 0 || p.w == 0) return;
  const int bx = static_cast<int>(std::min<int64_t>(128, ((p.w + 31) / 32) * 32));
  const int by = std::max(1, 256 / bx);
  const int64_t gx = (p.w + bx - 1) / bx;
  const int64_t gy = std::min<int64_t>((p.n + by - 1) / by, 65535);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const dim3 block(bx, by);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_act(static_cast<Act>(p.act), [&](auto tag) {
    using A = decltype(tag);
    if (p.const_J)
      mlp_act_kernel<T, A, kConst, BACKWARD><<<grid, block, 0, stream>>>(p);
    else if (p.diag)
      mlp_act_kernel<T, A, kDiag, BACKWARD><<<grid, block, 0, stream>>>(p);
    else
      mlp_act_kernel<T, A, kSum, BACKWARD><<<grid, block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct DeviceSel {
  at::Tensor in_sum, sel;
};

DeviceSel device_sel(const MlpPlan& P) {
  const auto dev = at::TensorOptions().device(P.device);
  at::Tensor in_sum = at::empty({static_cast<int64_t>(P.in_sum.size())}, at::kByte);
  std::copy(P.in_sum.begin(), P.in_sum.end(), in_sum.data_ptr<uint8_t>());
  at::Tensor sel = at::empty({static_cast<int64_t>(P.sel.size())}, at::kLong);
  std::copy(P.sel.begin(), P.sel.end(), sel.data_ptr<int64_t>());
  return {in_sum.to(dev.dtype(at::kByte)), sel.to(dev.dtype(at::kLong))};
}

cpu::MlpActJob base_job(const MlpPlan& P, const DeviceSel& ds, int l) {
  const MlpLayerSpec& Ly = P.L[l];
  cpu::MlpActJob j{};
  j.act = Ly.act;
  j.a = Ly.a;
  j.b = Ly.b2;
  j.n = P.N;
  j.w = Ly.out;
  j.S = P.S;
  j.K = P.K;
  j.diag = P.diag;
  j.in_sum = ds.in_sum.data_ptr<uint8_t>();
  j.sel = ds.sel.data_ptr<int64_t>();
  j.const_J = l == P.first_act;
  if (j.const_J) {
    j.C = P.Cs[l].data_ptr();
    j.Q = P.Q.data_ptr();
  }
  return j;
}

at::Tensor plane0(const at::Tensor& flat, int64_t N, int64_t w) {
  return flat.narrow(0, 0, N * w).view({N, w});
}

template <typename T>
void forward(const MlpPlan& P, const at::Tensor& x, at::Tensor& out, std::vector<at::Tensor>& saved,
             bool save) {
  const int L = static_cast<int>(P.L.size());
  const DeviceSel ds = device_sel(P);
  const int64_t N = P.N;
  at::Tensor in = x;
  int64_t in_w = P.d;
  for (int l = 0; l < L; ++l) {
    const MlpLayerSpec& Ly = P.L[l];
    const int64_t rows = P.rows[l], w = Ly.out;
    const bool keep = save && saved[l].numel() > 0;
    at::Tensor Z = keep ? saved[l] : at::empty({rows * N * w}, x.options());
    gemm_rm<T>(false, true, rows * N, w, in_w, in.data_ptr<T>(), in_w, static_cast<const T*>(Ly.W),
               in_w, T(0), Z.data_ptr<T>(), w);
    if (Ly.act >= 0) {
      at::Tensor A = at::empty({P.a_rows[l] * N * w}, x.options());
      cpu::MlpActJob j = base_job(P, ds, l);
      j.bias = Ly.b;
      j.Z = Z.data_ptr();
      j.write_z = keep;
      j.A = A.data_ptr();
      j.a_rows = P.a_rows[l];
      launch_act<T, false>(j);
      in = A;
    } else {
      if (Ly.b != nullptr)
        plane0(Z, N, w).add_(at::from_blob(const_cast<void*>(Ly.b), {w}, x.options()));
      in = Z;
    }
    in_w = w;
  }
  out.copy_(in.narrow(0, 0, P.out_rows * N * P.m).view({P.out_rows, N, P.m}));
}

template <typename T>
void backward(const MlpPlan& P, const at::Tensor& gout, const at::Tensor& x,
              const std::vector<at::Tensor>& saved, at::Tensor& gx, std::vector<at::Tensor>& gW,
              std::vector<at::Tensor>& gb, at::Tensor& gC) {
  const int L = static_cast<int>(P.L.size());
  const DeviceSel ds = device_sel(P);
  const int64_t N = P.N;
  const auto opt = x.options();
  // const_J layers write one term of dL/dC per point; summed over the points here
  auto const_terms = [&](cpu::MlpActJob& j) -> at::Tensor {
    if (!j.const_J) return at::Tensor();
    at::Tensor t = at::empty({P.K, N, j.w}, opt);
    j.gC = t.data_ptr();
    j.gC_per_point = true;
    return t;
  };
  at::Tensor gZ = gout.reshape({-1});
  if (P.L[L - 1].act >= 0) {
    at::Tensor gZn = at::empty({P.rows[L - 1] * N * P.L[L - 1].out}, opt);
    cpu::MlpActJob j = base_job(P, ds, L - 1);
    j.Z = const_cast<void*>(saved[L - 1].data_ptr());
    j.gA = gZ.data_ptr();
    j.g_rows = P.out_rows;
    j.gZ = gZn.data_ptr();
    j.A = nullptr;
    at::Tensor terms = const_terms(j);
    launch_act<T, true>(j);
    if (terms.defined()) gC.add_(terms.sum(1));
    gZ = gZn;
  }
  for (int l = L - 1; l >= 0; --l) {
    const MlpLayerSpec& Ly = P.L[l];
    const int64_t rows = P.rows[l], w = Ly.out, win = Ly.in;
    if (Ly.b != nullptr) gb[l].add_(plane0(gZ, N, w).sum(0));
    if (l == 0) {
      gemm_rm<T>(true, false, w, P.d, N, gZ.data_ptr<T>(), w, x.data_ptr<T>(), P.d, T(1),
                 gW[0].data_ptr<T>(), P.d);
      if (gx.numel())
        gemm_rm<T>(false, false, N, P.d, w, gZ.data_ptr<T>(), w, static_cast<const T*>(Ly.W), P.d,
                   T(0), gx.data_ptr<T>(), P.d);
      break;
    }
    at::Tensor gA = at::empty({rows * N * win}, opt);
    gemm_rm<T>(false, false, rows * N, win, w, gZ.data_ptr<T>(), w, static_cast<const T*>(Ly.W),
               win, T(0), gA.data_ptr<T>(), win);
    const int pv = l - 1;
    at::Tensor Aprev, gZp;
    if (P.L[pv].act >= 0) {
      Aprev = at::empty({rows * N * win}, opt);
      gZp = at::empty({P.rows[pv] * N * win}, opt);
      cpu::MlpActJob j = base_job(P, ds, pv);
      j.Z = const_cast<void*>(saved[pv].data_ptr());
      j.gA = gA.data_ptr();
      j.g_rows = rows;
      j.gZ = gZp.data_ptr();
      j.A = Aprev.data_ptr();
      j.a_rows = rows;
      at::Tensor terms = const_terms(j);
      launch_act<T, true>(j);
      if (terms.defined()) gC.add_(terms.sum(1));
    } else {
      Aprev = saved[pv];
      gZp = gA;
    }
    gemm_rm<T>(true, false, w, win, rows * N, gZ.data_ptr<T>(), w, Aprev.data_ptr<T>(), win, T(1),
               gW[l].data_ptr<T>(), win);
    gZ = gZp;
  }
}

}  // namespace

void mlp_forward_cuda(const MlpPlan& P, const at::Tensor& x, at::Tensor& out,
                      std::vector<at::Tensor>& saved, bool save) {
  dispatch_float(P.dtype, [&](auto t) { forward<decltype(t)>(P, x, out, saved, save); });
}

void mlp_backward_cuda(const MlpPlan& P, const at::Tensor& gout, const at::Tensor& x,
                       const std::vector<at::Tensor>& saved, at::Tensor& gx,
                       std::vector<at::Tensor>& gW, std::vector<at::Tensor>& gb, at::Tensor& gC) {
  dispatch_float(P.dtype,
                 [&](auto t) { backward<decltype(t)>(P, gout, x, saved, gx, gW, gb, gC); });
}

}  // namespace thd
