// The CPU kernels of csrc/cpu/kernels.h for any x86-64 / other CPU: the derivative table on
// scalars (libm), with the compiler's own vectorisation of the arithmetic around it.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels.h"
#define THD_ISA_NS isa_scalar
#include "../activations.h"

#include "kernels_isa.h"

namespace thd {
namespace cpu {
const KernelTable* table_scalar() {
  static const KernelTable t =
      make_table<ScalarLanes<float>, ScalarLanes<double>>(Isa::Scalar, "scalar");
  return &t;
}
}  // namespace cpu
}  // namespace thd
