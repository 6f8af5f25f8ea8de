// The CPU compute kernels that evaluate the derivative table, compiled once per instruction set
// (scalar, AVX2, AVX-512: csrc/cpu/kernels_*.cpp) and chosen at run time (kernels_select.cpp).
//
// This header is the whole interface between those translation units and the rest of the
// extension: plain structs of sizes and raw pointers, and a table of function pointers. It
// includes no torch header, so the SIMD translation units share no inline code with the others.
// Every kernel works on a range of elements or on one chunk of points; threading is the caller's
// (at::parallel_for in csrc/act_ops.cpp and csrc/mlp_ops.cpp).
#pragma once

#include <cstdint>

namespace thd {
namespace cpu {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// out[j * numel + i] = sigma^(orders[j])(z[i]), i in [begin, end); max_k = max(orders).
struct DerivsJob {
  int act;
  double a, b;
  int max_k, n_orders;
  const int* orders;
  const void* z;
  void* out;
  int64_t numel;
};

// One layer of the forward-mode MLP jet on one chunk of n points (csrc/mlp_ops.h explains the
// rows). Row blocks are (n, w) row-major; `rows` points to consecutive row blocks.
//   value row 0: z (pre-activation, bias not yet added unless stated)
//   second-order rows 1..S: s (S == 1: the sum over the directions flagged in `in_sum`;
//                              otherwise row 1+i belongs to direction sel[i])
//   first-order rows 1+S..S+K: J_k
struct MlpActJob {
  int act;
  double a, b;
  int64_t n, w, S, K;
  bool diag;              // per-direction second-order rows
  const uint8_t* in_sum;  // sum mode: K flags, direction k is in the sum
  const int64_t* sel;     // diag mode: S direction indices
  const void* bias;       // (w) added to row 0, or nullptr (row 0 already holds z)
  // forward: Z (rows in) -> A (rows out). const_J: the first-order rows are the constant C
  // (K, w) for every point and the second-order rows are zero (the first activation); then Z
  // holds row 0 only and Q (S, w) holds sum_k C_k^2 per second-order row.
  bool const_J;
  const void* C;
  const void* Q;
  void* Z;  // in: rows; row 0 gets z + bias written back when write_z
  bool write_z;
  void* A;         // out (rows 0..a_rows-1), or nullptr
  int64_t a_rows;  // 1 + S (no first-order rows needed after this layer) or 1 + S + K
  // backward only
  const void* gA;  // gradient of A's rows 0..g_rows-1 (rows beyond are zero)
  int64_t g_rows;
  void* gZ;           // out: gradient of Z (row 0 only when const_J)
  void* gC;           // const_J: (K, w) accumulated += sum over the points of dL/dC
  bool gC_per_point;  // instead: gC is (K, n, w), one term per point (the CUDA kernels,
                      // where threads of different points would race on a sum)
};

// The drop-in activations' ops (issue 14), on [begin, end) of numel elements:
//   act_grad:  out = g sigma^(k)(z)
struct GradJob {
  int act;
  double a, b;
  int k;
  const void* g;
  const void* z;
  void* out;
  int64_t numel;
};

// Their arithmetic (no table): o1 = w d1, o2 = w g d2 (mul_pair), and its backward given
// d3 = d2' with d2 = d1' (mul_pair_backward; g1 or g2 may be null = zero):
//   ow = g1 d1 + g2 g d2,  og = g2 w d2,  oz = w (g1 d2 + g2 g d3)
struct MulPairJob {
  const void* w;
  const void* g;
  const void* d1;
  const void* d2;
  void* o1;
  void* o2;
};
struct MulPairBackwardJob {
  const void* g1;
  const void* g2;
  const void* w;
  const void* g;
  const void* d1;
  const void* d2;
  const void* d3;
  void* ow;
  void* og;
  void* oz;
};

// The collapsed second-order jet of the traced path (torchhessdiag/jet2.py): per point i of n,
// feature j of w, direction k of K, a jet is (value x0 (n, w), first-order rows x1 (n, K, w),
// the weighted sum of its second-order rows sx = sum_k wts_k x2[k] (n, w)); wts (K) or nullptr
// (all ones). In[]/out[] by op:
//   jet2_mul (y = a b):  in  a0 a1 sa b0 b1 sb      out v = a0 b0, y1 = a0 b1 + a1 b0,
//                                                       s = a0 sb + b0 sa + 2 sum_k wts_k a1 b1
//   jet2_act (y = sigma(h)): in h0 h1 s             out y0 = sigma, y1 = sigma' h1,
//                                                       sy = sigma'' sum_k wts_k h1^2 + sigma' s
// Their backward: gout[] the gradients of out[] (nullptr = zero), gin[] the gradients of in[].
struct Jet2Job {
  int act;  // jet2_act
  double a, b;
  int64_t n, K, w;
  const void* wts;
  const void* in[6];
  void* out[3];
  const void* gout[3];
  void* gin[6];
};

struct KernelTable {
  Isa isa;
  const char* name;
  void (*derivs[2])(const DerivsJob&, int64_t begin, int64_t end);  // [0] float, [1] double
  void (*mlp_act_forward[2])(const MlpActJob&);
  void (*mlp_act_backward[2])(const MlpActJob&);
  // the drop-in activations' ops (filled by add_dropin_kernels, kernels_isa.h)
  void (*grad[2])(const GradJob&, int64_t begin, int64_t end);
  void (*mul_pair[2])(const MulPairJob&, int64_t begin, int64_t end);
  void (*mul_pair_backward[2])(const MulPairBackwardJob&, int64_t begin, int64_t end);
  // the collapsed second-order jet ops, over points [p0, p1) (filled by add_jet2_kernels)
  void (*jet2_mul[2])(const Jet2Job&, int64_t p0, int64_t p1);
  void (*jet2_mul_backward[2])(const Jet2Job&, int64_t p0, int64_t p1);
  void (*jet2_act[2])(const Jet2Job&, int64_t p0, int64_t p1);
  void (*jet2_act_backward[2])(const Jet2Job&, int64_t p0, int64_t p1);
};

// Each returns nullptr where that build is unusable (CPU without the instructions, or a torch
// without SLEEF's vector functions).
const KernelTable* table_scalar();
const KernelTable* table_avx2();
const KernelTable* table_avx512();

// The table in use: the widest usable one, unless limited by set_max_isa or the environment
// variable TORCHHESSDIAG_CPU_ISA=scalar|avx2|avx512.
const KernelTable& kernels();
// Limit the instruction set (tests compare the builds); returns the table now in use.
const KernelTable& set_max_isa(Isa isa);

}  // namespace cpu
}  // namespace thd
