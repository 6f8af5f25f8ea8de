// Op schemas (namespace torchhessdiag), the value op, the CPU kernels of the activation ops, and
// the op half (argument checks, allocation) of their CUDA implementation (see jet_ops_impl.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cuda_gate.h"
#include "jet_ops_impl.h"

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

// The CPU compute half: the generic bodies, except the table pass act_derivatives, which runs the
// SIMD build of the table chosen at run time (csrc/cpu/kernels.h).
struct CpuKernels : Kernels<CpuExec> {
  static void act_derivatives(const DerivsArgs& p) {
    const cpu::KernelTable& kt = cpu::kernels();
    cpu::DerivsJob job{static_cast<int>(p.act), p.a, p.b, p.max_k, p.n_orders, p.orders,
                       p.z, p.out, p.numel};
    auto fn = kt.derivs[p.dtype == at::kDouble ? 1 : 0];
    // chunks of whole SIMD vectors, so only the last chunk has a partial one
    at::parallel_for(0, (p.numel + 63) / 64, 64, [&](int64_t b, int64_t e) {
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

// The op schemas. torchhessdiag/_schemas.py holds the same strings for the pure-PyTorch
// fallback (used only when this extension cannot be loaded); tests/test_backend.py checks they
// agree.
TORCH_LIBRARY(torchhessdiag, m) {
  m.def("act_forward(Tensor z, str act, float a, float b) -> Tensor");
  m.def("act_derivatives(Tensor z, str act, float a, float b, int[] orders) -> Tensor");
  m.def("act_grad(Tensor g, Tensor z, str act, float a, float b, int k) -> Tensor");
  m.def(
      "act_grad_backward(Tensor gg, Tensor g, Tensor z, str act, float a, float b, int k)"
      " -> (Tensor, Tensor)");
  m.def("mul_pair(Tensor w, Tensor g, Tensor d1, Tensor d2) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchhessdiag, CompositeExplicitAutograd, m) {
  m.impl("act_forward", &thd::act_forward);
}

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  using K = thd::CpuKernels;
  m.impl("act_derivatives", &thd::act_derivatives_impl<K>);
  m.impl("act_grad", &thd::act_grad_impl<K>);
  m.impl("act_grad_backward", &thd::act_grad_backward_impl<K>);
  m.impl("mul_pair", &thd::mul_pair_impl<K>);
}

namespace thd {
// The reference ops a CUDA device without a kernel image falls back to (csrc/cuda_gate.h).
constexpr char kRefActDerivatives[] = "torchhessdiag_ref::act_derivatives";
constexpr char kRefActGrad[] = "torchhessdiag_ref::act_grad";
constexpr char kRefActGradBackward[] = "torchhessdiag_ref::act_grad_backward";
constexpr char kRefMulPair[] = "torchhessdiag_ref::mul_pair";
}  // namespace thd

// The gate's fallback path on the CPU, for tests (schemas defined by torchhessdiag/ops.py).
TORCH_LIBRARY_IMPL(torchhessdiag_gatetest, CPU, m) {
  using K = thd::Kernels<thd::CpuExec>;
  using thd::TestGate;
  m.impl("act_derivatives",
         &TestGate<&thd::act_derivatives_impl<K>, thd::kRefActDerivatives>::call);
  m.impl("act_grad", &TestGate<&thd::act_grad_impl<K>, thd::kRefActGrad>::call);
  m.impl("act_grad_backward",
         &TestGate<&thd::act_grad_backward_impl<K>, thd::kRefActGradBackward>::call);
  m.impl("mul_pair", &TestGate<&thd::mul_pair_impl<K>, thd::kRefMulPair>::call);
}

#ifdef THD_WITH_CUDA
TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  using K = thd::CudaKernels;  // compute half in csrc/cuda/jet_ops.cu
  using thd::CudaGate;
  m.impl("act_derivatives",
         &CudaGate<&thd::act_derivatives_impl<K>, thd::kRefActDerivatives>::call);
  m.impl("act_grad", &CudaGate<&thd::act_grad_impl<K>, thd::kRefActGrad>::call);
  m.impl("act_grad_backward",
         &CudaGate<&thd::act_grad_backward_impl<K>, thd::kRefActGradBackward>::call);
  m.impl("mul_pair", &CudaGate<&thd::mul_pair_impl<K>, thd::kRefMulPair>::call);
}
#endif
