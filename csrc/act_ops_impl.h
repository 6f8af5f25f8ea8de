// The activation ops, written once, in two halves:
//
// * Kernels<Exec>: the compute half -- dtype/activation/order dispatch and the per-element bodies
//   (every body evaluates the derivative table in csrc/activations.h), run by an executor:
//   `Exec::run(n, f)` calls f(i) for i in [0, n). csrc/act_ops.cpp instantiates it with a
//   parallel CPU loop (Kernels<CpuExec>), csrc/cuda/act_ops.cu with a grid-stride CUDA kernel
//   (CudaKernels). It takes raw pointers of already-checked tensors and never builds an error
//   message.
// * *_impl<Kernels>: the op half -- argument checks with messages, device guard, contiguity,
//   allocation -- then one call into the compute half. It is only ever instantiated in .cpp
//   files (host compiler), for both devices.
//
// Why the split: argument checks and messages are written once for both devices, and the
// CUDA translation units hold nothing but kernels and their launches on checked raw pointers --
// no error path, no message formatting, in code compiled by nvcc.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <type_traits>

#include <string>

#include "activations.h"
#include "buffer_pool.h"
#include "dispatch.h"
#include "messages.h"

namespace thd {

// Index type of every kernel: 64-bit, so tensors with more than 2^31 elements are safe.
using index_t = int64_t;

inline Act parse_act(c10::string_view name) {
  for (int i = 0; i < static_cast<int>(Act::kCount); ++i)
    if (name == act_name(i)) return static_cast<Act>(i);
  std::string known;
  for (int i = 0; i < static_cast<int>(Act::kCount); ++i)
    known += std::string(i ? ", " : "") + act_name(i);
  THD_CHECK_VALUE(false, "torchhessdiag: unknown activation '", std::string(name),
                  "'; supported: ", known);
  return Act::Identity;
}

inline void check_params(Act act, double a, double b) {
  (void)b;
  const ActInfo& info = act_info(act);
  if (info.nonzero_param != nullptr)
    THD_CHECK_VALUE(a != 0.0, "torchhessdiag: ", info.name, " needs ", info.nonzero_param,
                    " != 0 (got 0)");
}

inline void check_input(const at::Tensor& t, const char* what, const char* op) {
  THD_CHECK_VALUE(t.defined(), "torchhessdiag.", op, ": ", what, " is undefined");
  THD_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "torchhessdiag.",
                 op, ": ", what, " must be float32 or float64, got ", t.scalar_type(),
                 "; cast it with .float() or .double()");
}

inline void check_like(const at::Tensor& t, const at::Tensor& z, const char* what, const char* op) {
  check_input(t, what, op);
  THD_CHECK_VALUE(t.device() == z.device(), "torchhessdiag.", op, ": ", what, " is on ", t.device(),
                  " but z is on ", z.device(), "; move both to one device");
  THD_CHECK_TYPE(t.scalar_type() == z.scalar_type(), "torchhessdiag.", op, ": ", what,
                 " has dtype ", t.scalar_type(), " but z has ", z.scalar_type());
  THD_CHECK_VALUE(t.sizes() == z.sizes(), "torchhessdiag.", op, ": ", what, " has shape ",
                  t.sizes(), " but z has shape ", z.sizes());
}

inline void check_order(int64_t k, int64_t max_k, const char* op) {
  THD_CHECK_VALUE(k >= 0 && k <= max_k, "torchhessdiag.", op, ": derivative order ", k,
                  " is outside the table (0..", max_k,
                  "); higher orders go through torchhessdiag.activation_derivatives");
}

// ---- per-element bodies ----------------------------------------------------------------------

constexpr int kMaxOrdersPerCall = 16;

template <typename A, int N, typename T>
struct DerivsBody {
  const T* z;
  T* out;  // (n_orders, numel)
  index_t numel;
  T a, b;
  int n_orders;
  int orders[kMaxOrdersPerCall];
  // slots[o]: bit j set where orders[j] == o. The CUDA body indexes only slots (with the
  // compile-time o) and d (likewise): a runtime index into the orders array of the by-value
  // kernel argument, or into d, would copy the functor and d to local memory (stack).
  uint32_t slots[kMaxOrder + 1];
  THD_HD void operator()(index_t i) const {
    T d[N + 1];
    A::template eval<N>(z[i], a, b, d);
#ifdef __CUDA_ARCH__
#pragma unroll
    for (int o = 0; o <= N; ++o)
      for (uint32_t m = slots[o]; m != 0; m &= m - 1)
        out[static_cast<index_t>(__ffs(static_cast<int>(m)) - 1) * numel + i] = d[o];
#else
    for (int j = 0; j < n_orders; ++j) out[j * numel + i] = d[orders[j]];
#endif
  }
};

// out = g * sigma^(N)(z)
template <typename A, int N, typename T>
struct GradBody {
  const T* g;
  const T* z;
  T* out;
  T a, b;
  THD_HD void operator()(index_t i) const {
    T d[N + 1];
    A::template eval<N>(z[i], a, b, d);
    out[i] = g[i] * d[N];
  }
};

// (o1, o2) = (w * d1, w * g * d2): the double backward of an activation once sigma^(k) and
// sigma^(k+1) are known (pure arithmetic, vectorisable).
template <typename T>
struct MulPairBody {
  const T* w;
  const T* g;
  const T* d1;
  const T* d2;
  T* o1;
  T* o2;
  THD_HD void operator()(index_t i) const {
    const T v = w[i];
    o1[i] = v * d1[i];
    o2[i] = v * g[i] * d2[i];
  }
};

// The backward of the pair (w d1(z), w g d2(z)) w.r.t. (w, g, z), given d3 = d2' and d2 = d1':
//   ow = g1 d1 + g2 g d2,  og = g2 w d2,  oz = w (g1 d2 + g2 g d3)
// (g1, g2: the gradients of the two outputs; a null one counts as zero.)
template <typename T>
struct MulPairBackwardBody {
  const T* g1;
  const T* g2;
  const T* w;
  const T* g;
  const T* d1;
  const T* d2;
  const T* d3;
  T* ow;
  T* og;
  T* oz;
  THD_HD void operator()(index_t i) const {
    const T v = w[i], s2 = d2[i];
    T a = T(0), zi = T(0), b = T(0);
    if (g1 != nullptr) {
      a = g1[i] * d1[i];
      zi = g1[i] * s2;
    }
    if (g2 != nullptr) {
      const T t = g2[i] * g[i];
      a = a + t * s2;
      zi = zi + t * d3[i];
      b = g2[i] * v * s2;
    }
    ow[i] = a;
    og[i] = b;
    oz[i] = v * zi;
  }
};

// ---- the compute half ------------------------------------------------------------------------

struct DerivsArgs {
  Act act;
  at::ScalarType dtype;
  const void* z;
  void* out;
  index_t numel;
  double a, b;
  int max_k, n_orders;
  int orders[kMaxOrdersPerCall];
};
struct GradArgs {
  Act act;
  at::ScalarType dtype;
  const void *g, *z;
  void* out;
  index_t numel;
  double a, b;
  int k;
};
struct MulPairArgs {
  at::ScalarType dtype;
  const void *w, *g, *d1, *d2;
  void *o1, *o2;
  index_t numel;
};
struct MulPairBackwardArgs {
  at::ScalarType dtype;
  const void *g1, *g2, *w, *g, *d1, *d2, *d3;  // g1, g2 may be null
  void *ow, *og, *oz;
  index_t numel;
};

template <class Exec>
struct Kernels {
  static void act_derivatives(const DerivsArgs& p) {
    dispatch_float(p.dtype, [&](auto t) {
      using T = std::decay_t<decltype(t)>;
      dispatch_act(p.act, [&](auto tag) {
        using A = std::decay_t<decltype(tag)>;
        dispatch_order(p.max_k, [&](auto n) {
          constexpr int N = std::decay_t<decltype(n)>::value;
          DerivsBody<A, N, T> body{static_cast<const T*>(p.z),
                                   static_cast<T*>(p.out),
                                   p.numel,
                                   static_cast<T>(p.a),
                                   static_cast<T>(p.b),
                                   p.n_orders,
                                   {},
                                   {}};
          for (int j = 0; j < p.n_orders; ++j) {
            body.orders[j] = p.orders[j];
            body.slots[p.orders[j]] |= 1u << j;  // orders[j] <= max_k = N (checked by the op)
          }
          Exec::run(p.numel, body);
        });
      });
    });
  }

  static void act_grad(const GradArgs& p) {
    dispatch_float(p.dtype, [&](auto t) {
      using T = std::decay_t<decltype(t)>;
      dispatch_act(p.act, [&](auto tag) {
        using A = std::decay_t<decltype(tag)>;
        dispatch_order(p.k, [&](auto n) {
          constexpr int N = std::decay_t<decltype(n)>::value;
          Exec::run(p.numel, GradBody<A, N, T>{static_cast<const T*>(p.g),
                                               static_cast<const T*>(p.z), static_cast<T*>(p.out),
                                               static_cast<T>(p.a), static_cast<T>(p.b)});
        });
      });
    });
  }

  static void mul_pair(const MulPairArgs& p) {
    dispatch_float(p.dtype, [&](auto t) {
      using T = std::decay_t<decltype(t)>;
      Exec::run(p.numel, MulPairBody<T>{static_cast<const T*>(p.w), static_cast<const T*>(p.g),
                                        static_cast<const T*>(p.d1), static_cast<const T*>(p.d2),
                                        static_cast<T*>(p.o1), static_cast<T*>(p.o2)});
    });
  }

  static void mul_pair_backward(const MulPairBackwardArgs& p) {
    dispatch_float(p.dtype, [&](auto t) {
      using T = std::decay_t<decltype(t)>;
      Exec::run(p.numel,
                MulPairBackwardBody<T>{static_cast<const T*>(p.g1), static_cast<const T*>(p.g2),
                                       static_cast<const T*>(p.w), static_cast<const T*>(p.g),
                                       static_cast<const T*>(p.d1), static_cast<const T*>(p.d2),
                                       static_cast<const T*>(p.d3), static_cast<T*>(p.ow),
                                       static_cast<T*>(p.og), static_cast<T*>(p.oz)});
    });
  }
};

// The CUDA compute half, defined in csrc/cuda/act_ops.cu as Kernels<CudaExec>.
struct CudaKernels {
  static void act_derivatives(const DerivsArgs& p);
  static void act_grad(const GradArgs& p);
  static void mul_pair(const MulPairArgs& p);
  static void mul_pair_backward(const MulPairBackwardArgs& p);
};

// ---- the op half (host compiler only) --------------------------------------------------------

// An op's output: on the CPU from the buffer pool (csrc/buffer_pool.h: no fresh pages per call),
// elsewhere from the device's allocator. Contiguous, uninitialised.
inline at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape) {
  const at::TensorOptions opt = like.options().memory_format(at::MemoryFormat::Contiguous);
  return like.is_cpu() ? BufferPool::get().empty(shape, opt) : at::empty(shape, opt);
}
inline at::Tensor new_output(const at::Tensor& like) { return new_output(like, like.sizes()); }

template <class K>
std::tuple<at::Tensor, at::Tensor> mul_pair_impl(const at::Tensor& w_, const at::Tensor& g_,
                                                 const at::Tensor& d1_, const at::Tensor& d2_) {
  const char* op = "mul_pair";
  check_input(w_, "w", op);
  check_like(g_, w_, "g", op);
  check_like(d1_, w_, "d1", op);
  check_like(d2_, w_, "d2", op);
  const at::OptionalDeviceGuard guard(at::device_of(w_));
  const at::Tensor w = w_.contiguous(), g = g_.contiguous(), d1 = d1_.contiguous(),
                   d2 = d2_.contiguous();
  at::Tensor o1 = new_output(w);
  at::Tensor o2 = new_output(w);
  const index_t numel = w.numel();
  if (numel == 0) return {o1, o2};
  K::mul_pair({w.scalar_type(), w.data_ptr(), g.data_ptr(), d1.data_ptr(), d2.data_ptr(),
               o1.data_ptr(), o2.data_ptr(), numel});
  return {o1, o2};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mul_pair_backward_impl(
    const c10::optional<at::Tensor>& g1_, const c10::optional<at::Tensor>& g2_,
    const at::Tensor& w_, const at::Tensor& g_, const at::Tensor& d1_, const at::Tensor& d2_,
    const at::Tensor& d3_) {
  const char* op = "mul_pair_backward";
  check_input(w_, "w", op);
  const bool has1 = g1_.has_value() && g1_->defined(), has2 = g2_.has_value() && g2_->defined();
  if (has1) check_like(*g1_, w_, "g1", op);
  if (has2) check_like(*g2_, w_, "g2", op);
  check_like(g_, w_, "g", op);
  check_like(d1_, w_, "d1", op);
  check_like(d2_, w_, "d2", op);
  check_like(d3_, w_, "d3", op);
  const at::OptionalDeviceGuard guard(at::device_of(w_));
  const at::Tensor w = w_.contiguous(), g = g_.contiguous(), d1 = d1_.contiguous(),
                   d2 = d2_.contiguous(), d3 = d3_.contiguous();
  const at::Tensor g1 = has1 ? g1_->contiguous() : at::Tensor();
  const at::Tensor g2 = has2 ? g2_->contiguous() : at::Tensor();
  at::Tensor ow = new_output(w);
  at::Tensor og = new_output(w);
  at::Tensor oz = new_output(w);
  const index_t numel = w.numel();
  if (numel == 0) return {ow, og, oz};
  K::mul_pair_backward({w.scalar_type(), has1 ? g1.data_ptr() : nullptr,
                        has2 ? g2.data_ptr() : nullptr, w.data_ptr(), g.data_ptr(), d1.data_ptr(),
                        d2.data_ptr(), d3.data_ptr(), ow.data_ptr(), og.data_ptr(), oz.data_ptr(),
                        numel});
  return {ow, og, oz};
}

template <class K>
at::Tensor act_derivatives_impl(const at::Tensor& z_, c10::string_view act_name, double a, double b,
                                at::IntArrayRef orders) {
  const char* op = "act_derivatives";
  check_input(z_, "z", op);
  const Act act = parse_act(act_name);
  check_params(act, a, b);
  THD_CHECK_VALUE(orders.size() >= 1 && orders.size() <= kMaxOrdersPerCall, "torchhessdiag.", op,
                  ": orders must list 1..", kMaxOrdersPerCall, " orders, got ", orders.size());
  int64_t max_k = 0;
  for (auto k : orders) {
    check_order(k, kMaxOrder, op);
    max_k = k > max_k ? k : max_k;
  }
  const at::OptionalDeviceGuard guard(at::device_of(z_));
  const at::Tensor z = z_.contiguous();
  std::vector<int64_t> shape{static_cast<int64_t>(orders.size())};
  shape.insert(shape.end(), z.sizes().begin(), z.sizes().end());
  at::Tensor out = new_output(z, shape);
  const index_t numel = z.numel();
  if (numel == 0) return out;
  DerivsArgs p{act,
               z.scalar_type(),
               z.data_ptr(),
               out.data_ptr(),
               numel,
               a,
               b,
               static_cast<int>(max_k),
               static_cast<int>(orders.size()),
               {}};
  for (size_t j = 0; j < orders.size(); ++j) p.orders[j] = static_cast<int>(orders[j]);
  K::act_derivatives(p);
  return out;
}

template <class K>
at::Tensor act_grad_impl(const at::Tensor& g_, const at::Tensor& z_, c10::string_view act_name,
                         double a, double b, int64_t k) {
  const char* op = "act_grad";
  check_input(z_, "z", op);
  check_like(g_, z_, "g", op);
  const Act act = parse_act(act_name);
  check_params(act, a, b);
  check_order(k, kMaxOrder, op);
  const at::OptionalDeviceGuard guard(at::device_of(z_));
  const at::Tensor z = z_.contiguous(), g = g_.contiguous();
  at::Tensor out = new_output(z);
  const index_t numel = z.numel();
  if (numel == 0) return out;
  K::act_grad({act, z.scalar_type(), g.data_ptr(), z.data_ptr(), out.data_ptr(), numel, a, b,
               static_cast<int>(k)});
  return out;
}

}  // namespace thd
