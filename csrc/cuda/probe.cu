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
  if (e == cudaSuccess) {
    (void)cudaGetLastError();  // a stale non-sticky error is not this launch's
    probe_kernel<<<1, 1>>>();
    e = cudaGetLastError();  // a missing image fails the launch itself: no synchronisation
    if (prev >= 0) (void)cudaSetDevice(prev);
  }
  if (e != cudaSuccess) r = ProbeResult{static_cast<int>(e), cudaGetErrorName(e), cudaGetErrorString(e)};
  return r;
}

}  // namespace thd
