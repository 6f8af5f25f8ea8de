// Serving a CUDA device that this build has no kernel image for (issue 17).
//
// A build covers the architectures in TORCH_CUDA_ARCH_LIST (setup.py); a GPU outside them (a T4
// under an "8.0;9.0" build) would fail every launch with "no kernel image is available". So every
// CUDA op is registered through CudaGate: on the first call that reaches a device, the gate asks
// torchhessdiag/_cuda_probe.py (with the GIL), which launches one empty kernel there (once per
// compute capability, csrc/cuda/probe.cu) and decides; the answer is cached per device in an
// atomic, so later calls cost one load. When the device has no image the call, and every later
// one on that device, runs the pure-PyTorch reference of the same op (registered by the probe as
// torchhessdiag_ref::<op>), and the probe warns once, naming the device, its sm_XY, the
// architectures built and the rebuild command. Devices that fit keep the compiled kernels.
#pragma once

namespace thd {

struct ProbeResult {
  int code;  // cudaError_t
  const char* name;
  const char* message;
};

#ifdef THD_WITH_CUDA
ProbeResult cuda_probe_launch(int device);  // csrc/cuda/probe.cu
#endif

// module.cpp: true when calls on this CUDA device must run the reference (asks Python once).
bool cuda_use_reference(int device);

}  // namespace thd
