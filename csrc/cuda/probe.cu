// The kernel-image probe (torchhessdiag/_cuda_probe.py): launch one empty kernel on a device and
// report what the launch returned. It is compiled with the same -gencode targets as every other
// kernel of the extension, so "no kernel image is available" here means the same for all of them.
// Plain CUDA runtime, no torch headers: nothing here depends on the caller's state beyond the
// current device, which is restored.
#include <cuda_runtime.h>

#include "../cuda_probe.h"

namespace thd {
namespace {
__global__ void probe_kernel() {}
}  // namespace

ProbeResult cuda_probe_launch(int device) {
  ProbeResult r{0, "cudaSuccess", ""};
  int prev = -1;
  cudaError_t e = cudaGetDevice(&prev);
  if (e == cudaSuccess) e = cudaSetDevice(device);
  // An error already pending is not this launch's: report it (inconclusive: the caller keeps the
  // compiled kernels) and leave it for its owner.
  if (e == cudaSuccess) e = cudaPeekAtLastError();
  if (e == cudaSuccess) {
    // The per-thread default stream: no implicit synchronisation with the caller's streams, and
    // allowed while another stream is being captured into a CUDA graph (the legacy default
    // stream would invalidate that capture).
    probe_kernel<<<1, 1, 0, cudaStreamPerThread>>>();
    e = cudaGetLastError();  // a missing image fails the launch itself: no synchronisation
  }
  if (prev >= 0) (void)cudaSetDevice(prev);
  if (e != cudaSuccess)
    r = ProbeResult{static_cast<int>(e), cudaGetErrorName(e), cudaGetErrorString(e)};
  return r;
}

}  // namespace thd
