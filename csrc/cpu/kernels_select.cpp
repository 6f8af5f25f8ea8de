// Chooses the CPU kernel build (csrc/cpu/kernels.h) at run time: the widest instruction set this
// CPU and the loaded torch support, limited by TORCHHESSDIAG_CPU_ISA (scalar|avx2|avx512) or by
// set_max_isa (tests compare the builds against each other).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace thd {
namespace cpu {
namespace {

Isa env_limit() {
  const char* e = std::getenv("TORCHHESSDIAG_CPU_ISA");
  if (e == nullptr || *e == '\0') return Isa::AVX512;
  if (std::strcmp(e, "scalar") == 0) return Isa::Scalar;
  if (std::strcmp(e, "avx2") == 0) return Isa::AVX2;
  return Isa::AVX512;
}

const KernelTable* best(Isa limit) {
  if (limit >= Isa::AVX512)
    if (const KernelTable* t = table_avx512()) return t;
  if (limit >= Isa::AVX2)
    if (const KernelTable* t = table_avx2()) return t;
  return table_scalar();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> t{best(env_limit())};
  return t;
}

}  // namespace

const KernelTable& kernels() { return *current().load(std::memory_order_acquire); }

const KernelTable& set_max_isa(Isa isa) {
  current().store(best(isa), std::memory_order_release);
  return kernels();
}

}  // namespace cpu
}  // namespace thd
