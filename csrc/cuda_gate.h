// CudaGate: how every CUDA op is registered (csrc/jet_ops.cpp, csrc/engine_ops.cpp), so that a
// device this build has no kernel image for runs the reference instead; see csrc/cuda_probe.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <utility>

#include "cuda_probe.h"

namespace thd {

namespace gate {
inline void cuda_device(int& d, const at::Tensor& t) {
  if (d < 0 && t.defined() && t.is_cuda()) d = t.get_device();
}
inline void cuda_device(int& d, const c10::optional<at::Tensor>& t) {
  if (t.has_value()) cuda_device(d, *t);
}
template <class T>
inline void cuda_device(int&, const T&) {}
}  // namespace gate

// CudaGate<Fn, Name>::call has Fn's signature: the compiled kernel Fn, or, on a device without a
// kernel image, the op Name ("torchhessdiag_ref::...") through the dispatcher.
template <auto Fn, const char* Name>
struct CudaGate;

template <class R, class... A, R (*Fn)(A...), const char* Name>
struct CudaGate<Fn, Name> {
  static R call(A... args) {
    int device = -1;
    (gate::cuda_device(device, args), ...);
    if (device >= 0 && cuda_use_reference(device)) {
      static const auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<R(A...)>();
      return op.call(std::forward<A>(args)...);
    }
    return Fn(std::forward<A>(args)...);
  }
};

}  // namespace thd
