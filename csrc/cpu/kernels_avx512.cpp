// The CPU kernels of csrc/cpu/kernels.h on AVX-512 lanes (16 floats / 8 doubles), chosen at run
// time only on CPUs that have AVX-512 F/DQ/VL/BW (csrc/cpu/kernels_select.cpp).
#include <cmath>
#include <cstdint>
#include <type_traits>

// Declared before the target switch: the entry point below is compiled for every CPU.
#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define THD_BUILD_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define THD_ISA_NS isa_avx512
#define THD_VEC_BYTES 64
#include "kernels_simd.inc"
// Back to the default target: the selection code below runs on every CPU, before any check.
#pragma GCC pop_options
#endif

namespace thd {
namespace cpu {
const KernelTable* table_avx512() {
#ifdef THD_BUILD_SIMD
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")))
    return nullptr;
  if (!isa_avx512::sleef_linked()) return nullptr;
  static const KernelTable t =
      isa_avx512::make_table<isa_avx512::VecLanes<float>, isa_avx512::VecLanes<double>>(Isa::AVX512,
                                                                                        "avx512");
  return &t;
#else
  return nullptr;
#endif
}
}  // namespace cpu
}  // namespace thd
