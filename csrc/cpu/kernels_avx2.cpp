// The CPU kernels of csrc/cpu/kernels.h on AVX2 + FMA lanes (8 floats / 4 doubles), chosen at run
// time only on CPUs that have them (csrc/cpu/kernels_select.cpp).
#include <cmath>
#include <cstdint>
#include <type_traits>

// Declared before the target switch: the entry point below is compiled for every CPU.
#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define THD_BUILD_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define THD_ISA_NS isa_avx2
#define THD_VEC_BYTES 32
#include "kernels_simd.inc"
// Back to the default target: the selection code below runs on every CPU, before any check.
#pragma GCC pop_options
#endif

namespace thd {
namespace cpu {
const KernelTable* table_avx2() {
#ifdef THD_BUILD_SIMD
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return nullptr;
  if (!isa_avx2::sleef_linked()) return nullptr;
  static const KernelTable t =
      isa_avx2::make_table<isa_avx2::VecLanes<float>, isa_avx2::VecLanes<double>>(Isa::AVX2,
                                                                                  "avx2");
  return &t;
#else
  return nullptr;
#endif
}
}  // namespace cpu
}  // namespace thd
