// The compute half of the activation ops on CUDA (see ../act_ops_impl.h): the shared per-element
// bodies run by a grid-stride kernel on the current stream. Same derivative table as the CPU
// (csrc/activations.h). Argument checks and allocation happen in csrc/act_ops.cpp, compiled by
// the host compiler; nothing here builds an error message.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../act_ops_impl.h"
#include "launch.cuh"

namespace thd {

template <class F>
__global__ void elementwise_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

struct CudaExec {
  template <class F>
  static void run(index_t n, const F& f) {
    if (n <= 0) return;
    constexpr int kThreads = 256;
    elementwise_kernel<<<grid_for(n, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n,
                                                                                                 f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void CudaKernels::act_derivatives(const DerivsArgs& p) { Kernels<CudaExec>::act_derivatives(p); }
void CudaKernels::act_grad(const GradArgs& p) { Kernels<CudaExec>::act_grad(p); }
void CudaKernels::mul_pair(const MulPairArgs& p) { Kernels<CudaExec>::mul_pair(p); }
void CudaKernels::mul_pair_backward(const MulPairBackwardArgs& p) {
  Kernels<CudaExec>::mul_pair_backward(p);
}

}  // namespace thd
