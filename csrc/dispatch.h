// The float dtype dispatch every op uses: callers have checked the dtype (float32 or float64).
#pragma once

#include <c10/core/ScalarType.h>

namespace thd {

// Calls f(T{}) with T = double or float (no error path: the dtype was checked by the op).
template <typename F>
inline void dispatch_float(c10::ScalarType st, F&& f) {
  if (st == c10::ScalarType::Double)
    f(double{});
  else
    f(float{});
}

// The slot of a [float, double] pair of kernels (csrc/cpu/kernels.h's tables).
inline int dtype_slot(c10::ScalarType st) { return st == c10::ScalarType::Double ? 1 : 0; }

}  // namespace thd
