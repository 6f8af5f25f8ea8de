// CUDA kernels of the activation ops: the shared op bodies of csrc/jet_ops_impl.h run by a
// grid-stride kernel on the current stream. Same derivative table as the CPU (csrc/activations.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../jet_ops_impl.h"

namespace thd {

template <class F>
__global__ void elementwise_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    f(i);
}

struct CudaExec {
  template <class F>
  static void run(index_t n, const F& f) {
    if (n <= 0) return;
    constexpr int kThreads = 256;
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const index_t want = (n + kThreads - 1) / kThreads;
    const index_t cap = static_cast<index_t>(sms) * 32;  // enough blocks to fill the GPU
    const unsigned blocks = static_cast<unsigned>(want < cap ? want : cap);
    elementwise_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace thd

TORCH_LIBRARY_IMPL(torchhessdiag, CUDA, m) {
  m.impl("act_derivatives", &thd::act_derivatives_impl<thd::CudaExec>);
  m.impl("act_grad", &thd::act_grad_impl<thd::CudaExec>);
  m.impl("act_grad_backward", &thd::act_grad_backward_impl<thd::CudaExec>);
  m.impl("mul_pair", &thd::mul_pair_impl<thd::CudaExec>);
}
