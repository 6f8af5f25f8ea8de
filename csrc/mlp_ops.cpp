// The fused forward-mode MLP jet (see mlp_ops.h): the op half for both devices (checks, plan,
// allocation) and the CPU program. The CUDA program is in csrc/cuda/mlp_ops.cu.
#include "mlp_ops.h"

#include "buffer_pool.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>

#include "activations.h"
#include "cpu/kernels.h"
#include "messages.h"

// The Fortran BLAS of the BLAS torch links (MKL in the x86 wheels), declared weak: where a torch
// build does not export them the GEMMs go through at::mm instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace thd {
namespace {

constexpr const char* kOp = "torchhessdiag.mlp_jet";

// ---- GEMM on raw row-major matrices -----------------------------------------------------------
// C (M x N, leading dimension ldc) = op(A) op(B) + beta C, op(X) = X or X^T, all row-major.
// (Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the Fortran call swaps A/B.)

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                   const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (beta == T(0))
    at::mm_out(c, a, b);
  else
    c.addmm_(a, b, beta, 1);
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  auto* fn = std::is_same_v<T, float> ? reinterpret_cast<void*>(&sgemm_)
                                      : reinterpret_cast<void*>(&dgemm_);
  if (fn == nullptr || !fits_int(M) || !fits_int(N) || !fits_int(K) || !fits_int(lda) ||
      !fits_int(ldb) || !fits_int(ldc)) {
    gemm_fallback<T>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const char cta = tb ? 'T' : 'N', ctb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = T(1);
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&cta, &ctb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  else
    dgemm_(&cta, &ctb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

// ---- per-thread scratch, reused across calls (no page faults after the first call) ----------

template <typename T>
struct Scratch {
  std::vector<T> mem;
  int64_t each = 0;
  T* buf[5];
  void reserve(int64_t n) {
    if (static_cast<int64_t>(mem.size()) < 5 * n) mem.resize(5 * n);
    each = n;
    for (int i = 0; i < 5; ++i) buf[i] = mem.data() + i * n;
  }
  // a buffer that is none of the given ones
  T* other(const T* a, const T* b = nullptr, const T* c = nullptr, const T* d = nullptr) {
    for (int i = 0; i < 5; ++i)
      if (buf[i] != a && buf[i] != b && buf[i] != c && buf[i] != d) return buf[i];
    return nullptr;  // unreachable: at most 4 excluded
  }
};

template <typename T>
Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> s;
  return s;
}

// ---- the CPU program ----------------------------------------------------------------------------

template <typename T>
struct CpuMlp {
  const MlpPlan& P;
  const cpu::KernelTable& kt;
  int dt;  // 0 float, 1 double

  cpu::MlpActJob job(int l) const {
    const MlpLayerSpec& Ly = P.L[l];
    cpu::MlpActJob j{};
    j.act = Ly.act;
    j.a = Ly.a;
    j.b = Ly.b2;
    j.w = Ly.out;
    j.S = P.S;
    j.K = P.K;
    j.diag = P.diag;
    j.in_sum = P.in_sum.data();
    j.sel = P.sel.data();
    j.const_J = l == P.first_act;
    if (j.const_J) {
      j.C = P.Cs[l].data_ptr();
      j.Q = P.Q.data_ptr();
    }
    return j;
  }

  int64_t scratch_elems(int64_t n) const {
    int64_t e = n * std::max<int64_t>(P.d, 1) * std::max<int64_t>(P.out_rows, 1);
    for (size_t l = 0; l < P.L.size(); ++l) {
      const int64_t r = std::max(P.rows[l], P.a_rows[l]);
      e = std::max(e, r * n * std::max(P.L[l].out, P.L[l].in));
    }
    return e;
  }

  static void add_bias(T* Z, const T* b, int64_t n, int64_t w) {
    if (b == nullptr) return;
    for (int64_t i = 0; i < n; ++i) {
      T* z = Z + i * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) z[j] += b[j];
    }
  }

  static void colsum(const T* G, int64_t n, int64_t w, T* acc) {
    for (int64_t i = 0; i < n; ++i) {
      const T* g = G + i * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) acc[j] += g[j];
    }
  }

  void forward_chunk(int64_t n0, int64_t n, const T* x, T* out, const std::vector<T*>& saved,
                     bool save, Scratch<T>& s) const {
    const int L = static_cast<int>(P.L.size());
    const T* in = x + n0 * P.d;
    int64_t in_w = P.d;
    for (int l = 0; l < L; ++l) {
      const MlpLayerSpec& Ly = P.L[l];
      const int64_t rows = P.rows[l], w = Ly.out;
      const bool keep = save && saved[l] != nullptr;
      T* Z = keep ? saved[l] + rows * n0 * w : s.other(in);
      gemm_rm<T>(false, true, rows * n, w, in_w, in, in_w, static_cast<const T*>(Ly.W), in_w, T(0),
                 Z, w);
      if (Ly.act >= 0) {
        T* A = s.other(in, Z);
        cpu::MlpActJob j = job(l);
        j.n = n;
        j.bias = Ly.b;
        j.Z = Z;
        j.write_z = keep;
        j.A = A;
        j.a_rows = P.a_rows[l];
        kt.mlp_act_forward[dt](j);
        in = A;
      } else {
        add_bias(Z, static_cast<const T*>(Ly.b), n, w);
        in = Z;
      }
      in_w = w;
    }
    for (int64_t r = 0; r < P.out_rows; ++r)
      std::memcpy(out + (r * P.N + n0) * P.m, in + r * n * P.m, sizeof(T) * n * P.m);
  }

  // gW/gb/gC: this thread's accumulators (gW[l] (out, in), gb[l] (out), gC (K, w_first))
  void backward_chunk(int64_t n0, int64_t n, const T* gout, const T* x,
                      const std::vector<const T*>& saved, T* gx, const std::vector<T*>& gW,
                      const std::vector<T*>& gb, T* gC, Scratch<T>& s) const {
    const int L = static_cast<int>(P.L.size());
    T* G = s.buf[0];
    for (int64_t r = 0; r < P.out_rows; ++r)
      std::memcpy(G + r * n * P.m, gout + (r * P.N + n0) * P.m, sizeof(T) * n * P.m);
    T* gZ = G;
    if (P.L[L - 1].act >= 0) {  // the network ends with an activation
      T* gZn = s.other(G);
      cpu::MlpActJob j = job(L - 1);
      j.n = n;
      j.Z = const_cast<T*>(saved[L - 1]) + P.rows[L - 1] * n0 * P.L[L - 1].out;
      j.gA = G;
      j.g_rows = P.out_rows;
      j.gZ = gZn;
      j.A = nullptr;
      j.gC = gC;
      kt.mlp_act_backward[dt](j);
      gZ = gZn;
    }
    for (int l = L - 1; l >= 0; --l) {
      const MlpLayerSpec& Ly = P.L[l];
      const int64_t rows = P.rows[l], w = Ly.out, win = Ly.in;
      if (gb[l] != nullptr) colsum(gZ, n, w, gb[l]);
      if (l == 0) {
        const T* xc = x + n0 * P.d;
        gemm_rm<T>(true, false, w, P.d, n, gZ, w, xc, P.d, T(1), gW[0], P.d);
        if (gx != nullptr)
          gemm_rm<T>(false, false, n, P.d, w, gZ, w, static_cast<const T*>(Ly.W), P.d, T(0),
                     gx + n0 * P.d, P.d);
        break;
      }
      T* gA = s.other(gZ);
      gemm_rm<T>(false, false, rows * n, win, w, gZ, w, static_cast<const T*>(Ly.W), win, T(0), gA,
                 win);
      const int pv = l - 1;
      const T* Aprev;
      T* gZp;
      if (P.L[pv].act >= 0) {
        T* Ar = s.other(gZ, gA);
        gZp = s.other(gZ, gA, Ar);
        cpu::MlpActJob j = job(pv);
        j.n = n;
        j.Z = const_cast<T*>(saved[pv]) + P.rows[pv] * n0 * win;
        j.gA = gA;
        j.g_rows = rows;
        j.gZ = gZp;
        j.A = Ar;
        j.a_rows = rows;
        j.gC = gC;
        kt.mlp_act_backward[dt](j);
        Aprev = Ar;
      } else {
        Aprev = saved[pv] + P.rows[pv] * n0 * win;
        gZp = gA;
      }
      gemm_rm<T>(true, false, w, win, rows * n, gZ, w, Aprev, win, T(1), gW[l], win);
      gZ = gZp;
    }
  }
};

// ---- the ops
// ----------------------------------------------------------------------------------------

// The saved rows of a training step are the op's big allocations (N x rows x width per layer,
// megabytes): on the CPU they come from the buffer pool (csrc/buffer_pool.h), which spares the
// page faults of fresh ones every step.

// Per layer the rows the backward needs, then one int64 CPU scalar: the chunk the forward used
// (the saved rows are laid out chunk by chunk, so the backward must cut the points the same way).
std::vector<at::Tensor> alloc_saved(const MlpPlan& P, const at::TensorOptions& opt, bool save) {
  std::vector<at::Tensor> saved;
  const bool pool = save && P.device.is_cpu();
  for (size_t l = 0; l < P.L.size(); ++l) {
    const int64_t n = save ? P.saved_numel[l] : 0;
    saved.push_back(pool && n > 0 ? BufferPool::get().empty({n}, opt) : at::empty({n}, opt));
  }
  saved.push_back(at::full({1}, P.chunk, at::TensorOptions().dtype(at::kLong)));
  return saved;
}

// Points per chunk (CPU): each thread runs the whole network on one chunk at a time, so a chunk's
// rows (R x chunk x width) should stay in the core's cache from layer to layer while the GEMMs
// still see a few hundred rows; at least one chunk per thread once there is enough work. One
// chunk on a GPU. `limit` (> 0) caps it (the user's chunk_size).
int64_t auto_chunk(const MlpPlan& P, int64_t limit) {
  int64_t c;
  if (P.device.is_cpu()) {
    int64_t width = P.d;
    for (const auto& Ly : P.L) width = std::max(width, Ly.out);
    const int64_t per_point = (1 + P.S + P.K) * width;
    // 2^14 elements per row block (measured against 2^13 .. 2^20: 2^14 is best or within noise
    // for d = 1..3, widths 32-128, N 512-8192, float32 and float64, 1 thread);
    // TORCHHESSDIAG_CHUNK_ELEMENTS overrides it (tuning, not an API)
    static const int64_t kElems = [] {
      const char* e = std::getenv("TORCHHESSDIAG_CHUNK_ELEMENTS");
      const long long v = e ? std::atoll(e) : 0;
      return v > 0 ? static_cast<int64_t>(v) : (int64_t(1) << 14);
    }();
    c = std::max<int64_t>(8, kElems / std::max<int64_t>(1, per_point));
    const int64_t threads = at::get_num_threads();
    if (threads > 1 && P.N * per_point >= kElems / 2)
      c = std::min(c, (P.N + threads - 1) / threads);
  } else {
    c = P.N;
  }
  if (limit > 0) c = std::min(c, limit);
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(P.N, 1)));
}

template <typename T>
void forward_cpu(const MlpPlan& P, const at::Tensor& x, at::Tensor& out,
                 std::vector<at::Tensor>& saved, bool save) {
  const cpu::KernelTable& kt = cpu::kernels();
  CpuMlp<T> prog{P, kt, std::is_same_v<T, double> ? 1 : 0};
  std::vector<T*> sp;
  for (size_t l = 0; l < P.L.size(); ++l)
    sp.push_back(saved[l].numel() ? saved[l].data_ptr<T>() : nullptr);
  const int64_t chunks = (P.N + P.chunk - 1) / P.chunk;
  const int64_t scratch = prog.scratch_elems(P.chunk);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch<T>& s = thread_scratch<T>();
    s.reserve(scratch);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * P.chunk, n = std::min(P.chunk, P.N - n0);
      prog.forward_chunk(n0, n, xp, op, sp, save, s);
    }
  });
}

template <typename T>
void backward_cpu(const MlpPlan& P, const at::Tensor& gout, const at::Tensor& x,
                  const std::vector<at::Tensor>& saved, at::Tensor& gx, std::vector<at::Tensor>& gW,
                  std::vector<at::Tensor>& gb, at::Tensor& gC) {
  const cpu::KernelTable& kt = cpu::kernels();
  CpuMlp<T> prog{P, kt, std::is_same_v<T, double> ? 1 : 0};
  const int L = static_cast<int>(P.L.size());
  std::vector<const T*> sp;
  for (size_t l = 0; l < P.L.size(); ++l)
    sp.push_back(saved[l].numel() ? saved[l].data_ptr<T>() : nullptr);
  const int64_t chunks = (P.N + P.chunk - 1) / P.chunk;
  const int nthreads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  // per-thread accumulators, one flat block per thread: gW..., gb..., gC
  std::vector<int64_t> offW(L), offb(L);
  int64_t tot = 0;
  for (int l = 0; l < L; ++l) {
    offW[l] = tot;
    tot += P.L[l].out * P.L[l].in;
  }
  for (int l = 0; l < L; ++l) {
    offb[l] = tot;
    tot += P.L[l].b != nullptr ? P.L[l].out : 0;
  }
  const int64_t offC = tot;
  tot += gC.numel();
  // per-thread accumulators, summed into the outputs at the end (plain loops: no ATen op per
  // layer on the path of a small network's training step)
  std::vector<std::vector<T>> accs(std::max(nthreads, 1), std::vector<T>(tot, T(0)));
  const int64_t scratch = prog.scratch_elems(P.chunk);
  const T* gop = gout.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* gxp = gx.numel() ? gx.data_ptr<T>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int t = std::min(at::get_thread_num(), std::max(nthreads, 1) - 1);
    T* a = accs[t].data();
    std::vector<T*> gWp(L), gbp(L);
    for (int l = 0; l < L; ++l) {
      gWp[l] = a + offW[l];
      gbp[l] = P.L[l].b != nullptr ? a + offb[l] : nullptr;
    }
    Scratch<T>& s = thread_scratch<T>();
    s.reserve(scratch);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * P.chunk, n = std::min(P.chunk, P.N - n0);
      prog.backward_chunk(n0, n, gop, xp, sp, gxp, gWp, gbp, a + offC, s);
    }
  });
  for (size_t t = 1; t < accs.size(); ++t)
    for (int64_t i = 0; i < tot; ++i) accs[0][i] += accs[t][i];
  const T* total = accs[0].data();
  for (int l = 0; l < L; ++l) {
    std::memcpy(gW[l].data_ptr<T>(), total + offW[l], sizeof(T) * P.L[l].out * P.L[l].in);
    if (P.L[l].b != nullptr)
      std::memcpy(gb[l].data_ptr<T>(), total + offb[l], sizeof(T) * P.L[l].out);
  }
  if (gC.numel()) std::memcpy(gC.data_ptr<T>(), total + offC, sizeof(T) * gC.numel());
}

// The constant first-order rows' share of the weight gradients: C_l = C_{l-1} W_l^T for
// l <= first_act (C_{-1} = V^T), so dL/dW_l += gC_l^T C_{l-1} and gC_{l-1} = gC_l W_l.
void const_rows_backward(const MlpPlan& P, const at::TensorList& Ws, at::Tensor gC,
                         std::vector<at::Tensor>& gW) {
  for (int l = P.first_act; l >= 0; --l) {
    if (l > 0)
      gW[l].addmm_(gC.t(), P.Cs[l - 1]);
    else if (P.VT.defined())
      gW[0].addmm_(gC.t(), P.VT);
    else
      for (size_t k = 0; k < P.axes.size(); ++k) gW[0].select(1, P.axes[k]).add_(gC[k]);
    if (l > 0) gC = at::mm(gC, Ws[l]);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_jet_op(
    const at::Tensor& x, at::TensorList Ws, at::TensorList bs, at::IntArrayRef acts,
    at::ArrayRef<double> act_a, at::ArrayRef<double> act_b, const c10::optional<at::Tensor>& V,
    at::IntArrayRef axes, at::IntArrayRef sel, bool diag, bool grad_rows, int64_t chunk,
    bool save) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  THD_CHECK_VALUE(chunk >= 0, kOp, ": chunk must be >= 0 (0: automatic), got ", chunk);
  MlpPlan P = make_mlp_plan(x, Ws, bs, acts, act_a, act_b, V, axes, sel, diag, grad_rows, 1, kOp);
  P.chunk = auto_chunk(P, chunk);
  at::Tensor out = at::empty({P.out_rows, P.N, P.m}, x.options());
  std::vector<at::Tensor> saved = alloc_saved(P, x.options(), save);
  if (P.N == 0) return {out, saved};
  if (x.is_cuda()) {
#ifdef THD_WITH_CUDA
    mlp_forward_cuda(P, x, out, saved, save);
#endif
  } else {
    dispatch_float(P.dtype, [&](auto t) { forward_cpu<decltype(t)>(P, x, out, saved, save); });
  }
  return {out, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_jet_backward_op(
    const at::Tensor& gout_, const at::Tensor& x, at::TensorList Ws, at::TensorList bs,
    at::IntArrayRef acts, at::ArrayRef<double> act_a, at::ArrayRef<double> act_b,
    const c10::optional<at::Tensor>& V, at::IntArrayRef axes, at::IntArrayRef sel, bool diag,
    bool grad_rows, int64_t chunk, at::TensorList saved_, bool need_gx) {
  const char* op = "torchhessdiag.mlp_jet_backward";
  const at::OptionalDeviceGuard guard(at::device_of(x));
  (void)chunk;  // the forward's chunk comes with the saved tensors
  THD_CHECK_VALUE(!saved_.empty() && saved_.back().numel() == 1 &&
                      saved_.back().scalar_type() == at::kLong && saved_.back().is_cpu(),
                  op, ": saved must end with the forward's chunk (an int64 CPU scalar)");
  const int64_t fchunk = saved_.back().item<int64_t>();
  const MlpPlan P =
      make_mlp_plan(x, Ws, bs, acts, act_a, act_b, V, axes, sel, diag, grad_rows, fchunk, op);
  THD_CHECK_TYPE(gout_.scalar_type() == x.scalar_type() && gout_.device() == x.device(), op,
                 ": gout must have x's dtype and device");
  THD_CHECK_VALUE(gout_.sizes() == at::IntArrayRef({P.out_rows, P.N, P.m}), op,
                  ": gout must have shape ", at::IntArrayRef({P.out_rows, P.N, P.m}), ", got ",
                  gout_.sizes());
  THD_CHECK_VALUE(saved_.size() == P.L.size() + 1, op, ": expected ", P.L.size() + 1,
                  " saved tensors, got ", saved_.size());
  std::vector<at::Tensor> saved;
  for (size_t l = 0; l < P.L.size(); ++l) {
    const at::Tensor& t = saved_[l];
    THD_CHECK_VALUE(t.dim() == 1 && t.numel() == P.saved_numel[l] && t.is_contiguous() &&
                        t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                    op, ": saved tensor ", static_cast<int64_t>(l),
                    " does not match the network (was it produced by mlp_jet with save=True "
                    "and the same arguments?)");
    saved.push_back(t);
  }
  const at::Tensor gout = gout_.contiguous();
  // CPU: every element is written by the program (gx row by row, the rest from the summed
  // accumulators); CUDA accumulates into them
  auto alloc = [&](at::IntArrayRef shape) {
    return x.is_cpu() ? at::empty(shape, x.options()) : at::zeros(shape, x.options());
  };
  at::Tensor gx = need_gx ? alloc({P.N, P.d}) : at::empty({0}, x.options());
  std::vector<at::Tensor> gW, gb;
  for (size_t l = 0; l < P.L.size(); ++l) {
    gW.push_back(alloc({P.L[l].out, P.L[l].in}));
    gb.push_back(P.L[l].b != nullptr ? alloc({P.L[l].out}) : at::empty({0}, x.options()));
  }
  at::Tensor gC = alloc({P.K, P.L[P.first_act].out});
  if (P.N > 0) {
    if (x.is_cuda()) {
#ifdef THD_WITH_CUDA
      mlp_backward_cuda(P, gout, x, saved, gx, gW, gb, gC);
#endif
    } else {
      dispatch_float(P.dtype,
                     [&](auto t) { backward_cpu<decltype(t)>(P, gout, x, saved, gx, gW, gb, gC); });
    }
  } else {  // no points: zero gradients
    for (auto& t : gW) t.zero_();
    for (auto& t : gb) t.zero_();
    gC.zero_();
  }
  const_rows_backward(P, Ws, gC, gW);
  return {gx, gW, gb};
}

// ---- autograd (C++: no Python on the training path)
// ----------------------------------------------
//
// The forward runs the op below autograd and saves its inputs and the saved rows; the backward is
// mlp_jet_backward. When the backward itself is being recorded (create_graph=True), it calls
// mlp_jet_backward through the dispatcher with autograd on, whose (Python) derivative in
// torchhessdiag/fused.py recomputes the jet with torch ops and differentiates it: every order stays
// exact, and only double backward pays for Python.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using JetSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, at::ArrayRef<double>,
    at::ArrayRef<double>, const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, bool,
    bool, int64_t, bool);
using JetBackwardSig = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
    at::ArrayRef<double>, at::ArrayRef<double>, const c10::optional<at::Tensor>&, at::IntArrayRef,
    at::IntArrayRef, bool, bool, int64_t, at::TensorList, bool);

const c10::TypedOperatorHandle<JetSig>& jet_handle() {
  static const auto h =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchhessdiag::mlp_jet", "").typed<JetSig>();
  return h;
}

const c10::TypedOperatorHandle<JetBackwardSig>& jet_backward_handle() {
  static const auto h = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("torchhessdiag::mlp_jet_backward", "")
                            .typed<JetBackwardSig>();
  return h;
}

struct MlpJetFunction : public torch::autograd::Function<MlpJetFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList Ws,
                               at::TensorList bs, const c10::optional<at::Tensor>& V,
                               std::vector<int64_t> acts, std::vector<double> act_a,
                               std::vector<double> act_b, std::vector<int64_t> axes,
                               std::vector<int64_t> sel, bool diag, bool grad_rows, int64_t chunk) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto res = jet_handle().call(x, Ws, bs, acts, act_a, act_b, V, axes, sel, diag, grad_rows,
                                 chunk, /*save=*/true);
    at::Tensor out = std::get<0>(res);
    std::vector<at::Tensor>& saved = std::get<1>(res);
    const bool has_V = V.has_value() && V->defined();
    variable_list keep{x};
    if (has_V) keep.push_back(*V);
    keep.insert(keep.end(), Ws.begin(), Ws.end());
    keep.insert(keep.end(), bs.begin(), bs.end());
    keep.insert(keep.end(), saved.begin(), saved.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["L"] = static_cast<int64_t>(Ws.size());
    ctx->saved_data["has_V"] = has_V;
    ctx->saved_data["acts"] = acts;
    ctx->saved_data["act_a"] = act_a;
    ctx->saved_data["act_b"] = act_b;
    ctx->saved_data["axes"] = axes;
    ctx->saved_data["sel"] = sel;
    ctx->saved_data["diag"] = diag;
    ctx->saved_data["grad_rows"] = grad_rows;
    ctx->saved_data["chunk"] = chunk;
    ctx->set_materialize_grads(false);
    variable_list outs{out};
    outs.insert(outs.end(), saved.begin(), saved.end());
    ctx->mark_non_differentiable(variable_list(saved.begin(), saved.end()));
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t L = ctx->saved_data["L"].toInt();
    const bool has_V = ctx->saved_data["has_V"].toBool();
    // one gradient per forward argument: x, the L weights, the L biases, V, and the 8 others
    variable_list result(1 + 2 * L + 1 + 8);
    const at::Tensor& gout = grads[0];
    if (!gout.defined()) return result;
    const variable_list t = ctx->get_saved_variables();
    size_t i = 0;
    const at::Tensor x = t[i++];
    c10::optional<at::Tensor> V;
    if (has_V) V = t[i++];
    const std::vector<at::Tensor> Ws(t.begin() + i, t.begin() + i + L);
    i += L;
    const std::vector<at::Tensor> bs(t.begin() + i, t.begin() + i + L);
    i += L;
    const std::vector<at::Tensor> saved(t.begin() + i, t.end());
    const auto acts = ctx->saved_data["acts"].toIntVector();
    const auto act_a = ctx->saved_data["act_a"].toDoubleVector();
    const auto act_b = ctx->saved_data["act_b"].toDoubleVector();
    const auto axes = ctx->saved_data["axes"].toIntVector();
    const auto sel = ctx->saved_data["sel"].toIntVector();
    const bool diag = ctx->saved_data["diag"].toBool();
    const bool grad_rows = ctx->saved_data["grad_rows"].toBool();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool need_gx = x.requires_grad();
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> g;
    if (at::GradMode::is_enabled()) {  // double backward: through the op's own autograd
      g = jet_backward_handle().call(gout.contiguous(), x, Ws, bs, acts, act_a, act_b, V, axes, sel,
                                     diag, grad_rows, chunk, saved, need_gx);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      g = jet_backward_handle().call(gout.contiguous(), x, Ws, bs, acts, act_a, act_b, V, axes, sel,
                                     diag, grad_rows, chunk, saved, need_gx);
    }
    if (need_gx) result[0] = std::get<0>(g);
    for (int64_t l = 0; l < L; ++l) {
      if (Ws[l].requires_grad()) result[1 + l] = std::get<1>(g)[l];
      if (bs[l].requires_grad() && bs[l].sym_numel() != 0) result[1 + L + l] = std::get<2>(g)[l];
    }
    return result;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_jet_autograd(
    const at::Tensor& x, at::TensorList Ws, at::TensorList bs, at::IntArrayRef acts,
    at::ArrayRef<double> act_a, at::ArrayRef<double> act_b, const c10::optional<at::Tensor>& V,
    at::IntArrayRef axes, at::IntArrayRef sel, bool diag, bool grad_rows, int64_t chunk,
    bool save) {
  bool needs = false;
  if (at::GradMode::is_enabled()) {
    needs = x.requires_grad();
    for (const auto& W : Ws) needs = needs || W.requires_grad();
    for (const auto& b : bs) needs = needs || b.requires_grad();
  }
  if (!needs) {
    at::AutoDispatchBelowADInplaceOrView below;
    return jet_handle().call(x, Ws, bs, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk,
                             save);
  }
  variable_list outs = MlpJetFunction::apply(x, Ws, bs, V, acts.vec(), act_a.vec(), act_b.vec(),
                                             axes.vec(), sel.vec(), diag, grad_rows, chunk);
  return {outs[0], std::vector<at::Tensor>(outs.begin() + 1, outs.end())};
}

}  // namespace

// ---- the plan (argument checks, rows per layer, constant rows) --------------------------------

namespace {

// The constant rows on the CPU with plain loops into one buffer (small matrices: K x width; on the
// path of every call, where a handful of ATen ops would cost more than the whole network at
// small N). C_0 = columns `axes` of W_0 (or V^T W_0^T), C_l = C_{l-1} W_l^T, Q from C_first.
template <typename T>
void cpu_constants(MlpPlan& P, const at::TensorList& Ws) {
  const int64_t K = P.K, f = P.first_act;
  int64_t total = P.S * P.L[f].out;
  for (int64_t l = 0; l <= f; ++l) total += K * P.L[l].out;
  at::Tensor buf = at::empty({total}, at::TensorOptions().dtype(P.dtype));
  T* p = buf.data_ptr<T>();
  int64_t off = 0;
  const T* prev = nullptr;
  int64_t prev_w = P.d;
  for (int64_t l = 0; l <= f; ++l) {
    const int64_t w = P.L[l].out, win = P.L[l].in;
    const T* W = static_cast<const T*>(P.L[l].W);
    T* C = p + off;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < w; ++j) {
        T acc = T(0);
        if (l == 0 && !P.VT.defined()) {
          acc = W[j * win + P.axes[k]];
        } else {
          const T* a = l == 0 ? P.VT.data_ptr<T>() + k * P.d : prev + k * prev_w;
          for (int64_t i = 0; i < win; ++i) acc += a[i] * W[j * win + i];
        }
        C[k * w + j] = acc;
      }
    P.Cs.push_back(buf.narrow(0, off, K * w).view({K, w}));
    off += K * w;
    prev = C;
    prev_w = w;
  }
  const int64_t wf = P.L[f].out;
  T* Q = p + off;
  for (int64_t r = 0; r < P.S; ++r)
    for (int64_t j = 0; j < wf; ++j) {
      T q = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const bool in = P.diag ? P.sel[r] == k : P.in_sum[k] != 0;
        if (in) q += prev[k * wf + j] * prev[k * wf + j];
      }
      Q[r * wf + j] = q;
    }
  P.Q = buf.narrow(0, off, P.S * wf).view({P.S, wf});
}

}  // namespace

MlpPlan make_mlp_plan(const at::Tensor& x, const at::TensorList& Ws, const at::TensorList& bs,
                      at::IntArrayRef acts, at::ArrayRef<double> act_a, at::ArrayRef<double> act_b,
                      const c10::optional<at::Tensor>& V_, at::IntArrayRef axes,
                      at::IntArrayRef sel, bool diag, bool grad_rows, int64_t chunk,
                      const char* op) {
  THD_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                 ": x must be float32 or float64, got ", x.scalar_type());
  THD_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), op,
                  ": x must be a contiguous (N, d) tensor, got shape ", x.sizes());
  const int64_t L = static_cast<int64_t>(Ws.size());
  THD_CHECK_VALUE(L >= 1, op, ": the network needs at least one layer");
  THD_CHECK_VALUE(static_cast<int64_t>(bs.size()) == L && static_cast<int64_t>(acts.size()) == L &&
                      static_cast<int64_t>(act_a.size()) == L &&
                      static_cast<int64_t>(act_b.size()) == L,
                  op, ": weights, biases, acts, act_a and act_b must have one entry per layer (", L,
                  " layers)");
  MlpPlan P;
  P.dtype = x.scalar_type();
  P.device = x.device();
  P.N = x.size(0);
  P.d = x.size(1);
  P.diag = diag;
  P.grad_rows = grad_rows;
  THD_CHECK_VALUE(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  P.chunk = chunk;
  P.first_act = -1;
  P.last_act = -1;
  int64_t width = P.d;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& W = Ws[l];
    THD_CHECK_TYPE(W.scalar_type() == P.dtype && W.device() == x.device(), op, ": weight ", l,
                   " must have x's dtype and device (", P.dtype, ", ", x.device(), "), got ",
                   W.scalar_type(), ", ", W.device());
    THD_CHECK_VALUE(W.dim() == 2 && W.is_contiguous() && W.size(1) == width, op, ": weight ", l,
                    " must be a contiguous (out, ", width, ") matrix, got shape ", W.sizes());
    MlpLayerSpec Ly{W.data_ptr(), nullptr, width, W.size(0), static_cast<int>(acts[l]),
                    act_a[l],     act_b[l]};
    const at::Tensor& b = bs[l];  // numel 0: the layer has no bias
    if (b.numel() > 0) {
      THD_CHECK_TYPE(b.scalar_type() == P.dtype && b.device() == x.device(), op, ": bias ", l,
                     " must have x's dtype and device");
      THD_CHECK_VALUE(b.dim() == 1 && b.size(0) == W.size(0) && b.is_contiguous(), op, ": bias ", l,
                      " must be a contiguous (", W.size(0), ",) vector (or empty: no bias)");
      Ly.b = b.data_ptr();
    }
    THD_CHECK_VALUE(acts[l] >= -1 && acts[l] < static_cast<int64_t>(Act::kCount), op, ": acts[", l,
                    "] = ", acts[l], " is not an activation id (-1 or 0..",
                    static_cast<int64_t>(Act::kCount) - 1, ")");
    if (acts[l] >= 0) {
      const ActInfo& info = kActInfo[acts[l]];
      if (info.nonzero_param != nullptr)
        THD_CHECK_VALUE(act_a[l] != 0.0, op, ": ", info.name, " needs ", info.nonzero_param,
                        " != 0");
    }
    if (acts[l] >= 0) {
      if (P.first_act < 0) P.first_act = static_cast<int>(l);
      P.last_act = static_cast<int>(l);
    }
    P.L.push_back(Ly);
    width = W.size(0);
  }
  THD_CHECK_VALUE(P.first_act >= 0, op,
                  ": the network has no activation (its second derivatives are 0)");
  P.m = width;
  const bool has_V = V_.has_value() && V_->defined();
  if (has_V) {
    const at::Tensor& V = *V_;
    THD_CHECK_TYPE(V.scalar_type() == P.dtype && V.device() == x.device(), op,
                   ": V must have x's dtype and device");
    THD_CHECK_VALUE(V.dim() == 2 && V.size(0) == P.d, op, ": V must be (d, K) with d = ", P.d,
                    ", got shape ", V.sizes());
    THD_CHECK_VALUE(axes.empty(), op, ": give either V or axes, not both");
    P.K = V.size(1);
  } else {
    for (int64_t a : axes)
      THD_CHECK_VALUE(a >= 0 && a < P.d, op, ": axes must lie in [0, ", P.d, "), got ", axes);
    P.K = static_cast<int64_t>(axes.size());
    P.axes.assign(axes.begin(), axes.end());
  }
  THD_CHECK_VALUE(P.K >= 1, op, ": at least one direction (V or axes) is needed");
  std::vector<uint8_t> seen(P.K, 0);
  for (int64_t k : sel) {
    THD_CHECK_VALUE(k >= 0 && k < P.K && !seen[k], op,
                    ": sel must hold distinct direction indices in [0, ", P.K, "), got ", sel);
    seen[k] = 1;
  }
  THD_CHECK_VALUE(!sel.empty(), op, ": sel is empty");
  if (diag) {
    P.S = static_cast<int64_t>(sel.size());
    P.sel.assign(sel.begin(), sel.end());
    P.in_sum.assign(P.K, 0);
  } else {
    P.S = 1;
    P.in_sum = seen;
    P.sel.assign(1, 0);
  }
  const int64_t R = 1 + P.S + P.K;
  P.out_rows = 1 + P.S + (grad_rows ? P.K : 0);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t rows = l <= P.first_act ? 1 : (l <= P.last_act ? R : P.out_rows);
    const int64_t next = l < P.last_act ? R : P.out_rows;
    P.rows.push_back(rows);
    P.a_rows.push_back(P.L[l].act >= 0 ? next : rows);
    const bool saved = P.L[l].act >= 0 || l < L - 1;
    P.saved_numel.push_back(saved ? rows * P.N * P.L[l].out : 0);
  }
  // the constant first-order rows before (and at) the first activation. Along coordinate axes
  // the first layer's rows are columns of W_0 (taken, not multiplied by the identity: an inf in
  // W_0 must not turn the other directions' rows into NaN through 0 * inf).
  if (has_V) P.VT = V_->t().contiguous();
  if (x.is_cpu()) {
    dispatch_float(P.dtype, [&](auto t) { cpu_constants<decltype(t)>(P, Ws); });
    return P;
  }
  at::Tensor C;
  if (has_V) {
    C = at::mm(P.VT, Ws[0].t()).contiguous();
  } else {
    P.axes_t = at::tensor(P.axes, at::TensorOptions().dtype(at::kLong)).to(x.device());
    C = Ws[0].index_select(1, P.axes_t).t().contiguous();
  }
  P.Cs.push_back(C);
  for (int64_t l = 1; l <= P.first_act; ++l) {
    C = at::mm(C, Ws[l].t()).contiguous();
    P.Cs.push_back(C);
  }
  at::Tensor idx = at::tensor(diag ? P.sel : std::vector<int64_t>(sel.begin(), sel.end()),
                              at::TensorOptions().dtype(at::kLong))
                       .to(x.device());
  P.Q = diag ? C.index_select(0, idx).square().contiguous()
             : C.index_select(0, idx).square().sum(0, true).contiguous();
  return P;
}

// torchhessdiag.empty_cache(): release the pooled CPU buffers; returns the bytes freed.
int64_t buffer_pool_clear() { return BufferPool::get().clear(); }
int64_t buffer_pool_bytes() { return BufferPool::get().bytes(); }

}  // namespace thd

// Schemas: torchhessdiag/_schemas.py, the one definition (the package defines the ops from it
// before this library is loaded; the kernels below attach to them).

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  m.impl("mlp_jet", &thd::mlp_jet_op);
  m.impl("mlp_jet_backward", &thd::mlp_jet_backward_op);
}

TORCH_LIBRARY_IMPL(torchhessdiag, Autograd, m) { m.impl("mlp_jet", &thd::mlp_jet_autograd); }

#ifdef THD_WITH_CUDA
TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  m.impl("mlp_jet", &thd::mlp_jet_op);
  m.impl("mlp_jet_backward", &thd::mlp_jet_backward_op);
}
#endif
