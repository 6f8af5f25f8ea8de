// Gate: how every CUDA op is registered (csrc/act_ops.cpp, csrc/engine_ops.cpp), so that a GPU
// this build has no kernel image for runs the reference instead; see csrc/cuda_probe.h.
//
// Gate<Fn, Name, UseReference>::call has Fn's signature. It finds the device of the first tensor
// argument and asks UseReference(device): false -> the compiled kernel Fn; true -> the op Name
// ("torchhessdiag_ref::<op>", the pure-PyTorch reference kernel of the same op, defined by
// torchhessdiag/ops.py) through the dispatcher, with the same arguments. CudaGate decides with
// the kernel-image probe (cuda_use_reference); the same template with an always-true decision
// serves the CPU ops torchhessdiag_gatetest::<op>, so the whole path (arguments boxed to the
// Python kernel and back, the in-place op, the optional gradient) is tested without a GPU
// (tests/test_cuda_probe.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <utility>

#include "cuda_probe.h"

namespace thd {

namespace gate {
inline void device_of(c10::optional<c10::Device>& d, const at::Tensor& t) {
  if (!d.has_value() && t.defined()) d = t.device();
}
inline void device_of(c10::optional<c10::Device>& d, const c10::optional<at::Tensor>& t) {
  if (t.has_value()) device_of(d, *t);
}
template <class T>
inline void device_of(c10::optional<c10::Device>&, const T&) {}
}  // namespace gate

template <auto Fn, const char* Name, bool (*UseReference)(const c10::Device&)>
struct Gate;

template <class R, class... A, R (*Fn)(A...), const char* Name,
          bool (*UseReference)(const c10::Device&)>
struct Gate<Fn, Name, UseReference> {
  static R call(A... args) {
    c10::optional<c10::Device> device;
    (gate::device_of(device, args), ...);
    if (device.has_value() && UseReference(*device)) {
      static const auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<R(A...)>();
      return op.call(std::forward<A>(args)...);
    }
    return Fn(std::forward<A>(args)...);
  }
};

inline bool cuda_device_uses_reference(const c10::Device& d) {
  return d.is_cuda() && cuda_use_reference(d.index());
}
inline bool always_reference(const c10::Device&) { return true; }

template <auto Fn, const char* Name>
using CudaGate = Gate<Fn, Name, &cuda_device_uses_reference>;
template <auto Fn, const char* Name>
using TestGate = Gate<Fn, Name, &always_reference>;

}  // namespace thd
