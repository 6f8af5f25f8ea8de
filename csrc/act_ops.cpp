// Op schemas (namespace torchhessdiag), the value op, the CPU kernels of the activation ops, and
// the op half (argument checks, allocation) of their CUDA implementation (see act_ops_impl.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cuda_gate.h"
#include "act_autograd.h"
#include "act_ops_impl.h"

namespace thd {

// CPU executor: at::parallel_for over contiguous chunks; the body is branch-light scalar code
// over contiguous arrays, so the compiler vectorises the arithmetic around the libm calls.
struct CpuExec {
  template <class F>
  static void run(index_t n, const F& f) {
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

// The CPU compute half: every op runs the SIMD build chosen at run time (csrc/cpu/kernels.h):
// the table passes (act_derivatives, act_grad) and the arithmetic of the
// backward passes (mul_pair, mul_pair_backward; this file itself is compiled for the baseline
// instruction set only).
struct CpuKernels : Kernels<CpuExec> {
  static void act_derivatives(const DerivsArgs& p) {
    const cpu::KernelTable& kt = cpu::kernels();
    cpu::DerivsJob job{
        static_cast<int>(p.act), p.a, p.b, p.max_k, p.n_orders, p.orders, p.z, p.out, p.numel};
    auto fn = kt.derivs[dtype_slot(p.dtype)];
    // chunks of whole SIMD vectors, so only the last chunk has a partial one
    at::parallel_for(0, (p.numel + 63) / 64, 64, [&](int64_t b, int64_t e) {
      fn(job, b * 64, std::min<int64_t>(e * 64, p.numel));
    });
  }

  static void act_grad(const GradArgs& p) {
    cpu::GradJob job{static_cast<int>(p.act), p.a, p.b, p.k, p.g, p.z, p.out, p.numel};
    auto fn = cpu::kernels().grad[dtype_slot(p.dtype)];
    at::parallel_for(0, (p.numel + 63) / 64, 64, [&](int64_t b, int64_t e) {
      fn(job, b * 64, std::min<int64_t>(e * 64, p.numel));
    });
  }

  static void mul_pair(const MulPairArgs& p) {
    cpu::MulPairJob job{p.w, p.g, p.d1, p.d2, p.o1, p.o2};
    auto fn = cpu::kernels().mul_pair[dtype_slot(p.dtype)];
    at::parallel_for(0, (p.numel + 63) / 64, 256, [&](int64_t b, int64_t e) {
      fn(job, b * 64, std::min<int64_t>(e * 64, p.numel));
    });
  }

  static void mul_pair_backward(const MulPairBackwardArgs& p) {
    cpu::MulPairBackwardJob job{p.g1, p.g2, p.w, p.g, p.d1, p.d2, p.d3, p.ow, p.og, p.oz};
    auto fn = cpu::kernels().mul_pair_backward[dtype_slot(p.dtype)];
    at::parallel_for(0, (p.numel + 63) / 64, 256, [&](int64_t b, int64_t e) {
      fn(job, b * 64, std::min<int64_t>(e * 64, p.numel));
    });
  }
};

// The activation's value, from ATen's own kernel for that function, so that a model converted to
// torchhessdiag.nn gives bit-for-bit the outputs it gave before. Every derivative comes from the
// table (act_grad and friends). One kernel for all devices (CompositeExplicitAutograd).
at::Tensor act_forward(const at::Tensor& z, c10::string_view act_name, double a, double b) {
  check_input(z, "z", "act_forward");
  const Act act = parse_act(act_name);
  check_params(act, a, b);
  switch (act) {
    case Act::Identity: return z.clone();
    case Act::Tanh: return at::tanh(z);
    case Act::Sigmoid: return at::sigmoid(z);
    case Act::Softplus: return at::softplus(z, a, b);
    case Act::SiLU: return at::silu(z);
    case Act::GELU: return at::gelu(z, "none");
    case Act::GELUTanh: return at::gelu(z, "tanh");
    case Act::Sin: return a == 1.0 ? at::sin(z) : at::sin(z * a);
    case Act::Cos: return a == 1.0 ? at::cos(z) : at::cos(z * a);
    case Act::Exp: return at::exp(z);
    case Act::ELU: return at::elu(z, a);
    case Act::CELU: return at::celu(z, a);
    case Act::ReLU: return at::relu(z);
    case Act::LeakyReLU: return at::leaky_relu(z, a);
    default: break;
  }
  TORCH_CHECK(false, "torchhessdiag: internal error, unhandled activation");
}

}  // namespace thd

// Schemas: torchhessdiag/_schemas.py, the one definition (the package defines the ops from it
// before this library is loaded; the kernels below attach to them).
// act_beyond_table (sigma^(n) past the table) is implemented in Python (torchhessdiag/ops.py,
// CompositeImplicitAutograd); the C++ autograd calls it.
TORCH_LIBRARY_IMPL(torchhessdiag, CompositeExplicitAutograd, m) {
  m.impl("act_forward", &thd::act_forward);
}

// The autograd of the activation ops, in C++ (csrc/act_autograd.h): no Python per backward node.
TORCH_LIBRARY_IMPL(torchhessdiag, Autograd, m) {
  m.impl("act_forward", &thd::ag::act_forward_autograd);
  m.impl("act_grad", &thd::ag::act_grad_autograd);
  m.impl("act_derivatives", &thd::ag::act_derivatives_autograd);
}

namespace thd {
// for torchhessdiag._C._reset_piecewise_linear_warnings (csrc/module.cpp; tests)
void reset_piecewise_linear_warnings() { ag::reset_piecewise_linear_warnings(); }
}  // namespace thd

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  using K = thd::CpuKernels;
  m.impl("act_derivatives", &thd::act_derivatives_impl<K>);
  m.impl("act_grad", &thd::act_grad_impl<K>);
  m.impl("mul_pair", &thd::mul_pair_impl<K>);
  m.impl("mul_pair_backward", &thd::mul_pair_backward_impl<K>);
}

namespace thd {
// The reference ops a CUDA device without a kernel image falls back to (csrc/cuda_gate.h).
constexpr char kRefActDerivatives[] = "torchhessdiag_ref::act_derivatives";
constexpr char kRefActGrad[] = "torchhessdiag_ref::act_grad";
constexpr char kRefMulPair[] = "torchhessdiag_ref::mul_pair";
constexpr char kRefMulPairBackward[] = "torchhessdiag_ref::mul_pair_backward";
}  // namespace thd

// The gate's fallback path on the CPU, for tests (schemas defined by torchhessdiag/ops.py).
TORCH_LIBRARY_IMPL(torchhessdiag_gatetest, CPU, m) {
  using K = thd::Kernels<thd::CpuExec>;
  using thd::TestGate;
  m.impl("act_derivatives",
         &TestGate<&thd::act_derivatives_impl<K>, thd::kRefActDerivatives>::call);
  m.impl("act_grad", &TestGate<&thd::act_grad_impl<K>, thd::kRefActGrad>::call);
  m.impl("mul_pair", &TestGate<&thd::mul_pair_impl<K>, thd::kRefMulPair>::call);
  m.impl("mul_pair_backward",
         &TestGate<&thd::mul_pair_backward_impl<K>, thd::kRefMulPairBackward>::call);
}

#ifdef THD_WITH_CUDA
TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  using K = thd::CudaKernels;  // compute half in csrc/cuda/act_ops.cu
  using thd::CudaGate;
  m.impl("act_derivatives",
         &CudaGate<&thd::act_derivatives_impl<K>, thd::kRefActDerivatives>::call);
  m.impl("act_grad", &CudaGate<&thd::act_grad_impl<K>, thd::kRefActGrad>::call);
  m.impl("mul_pair", &CudaGate<&thd::mul_pair_impl<K>, thd::kRefMulPair>::call);
  m.impl("mul_pair_backward",
         &CudaGate<&thd::mul_pair_backward_impl<K>, thd::kRefMulPairBackward>::call);
}
#endif
