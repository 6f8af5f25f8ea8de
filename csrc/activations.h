// torchhessdiag derivative table: the single source of truth for every activation's value and
// derivatives of order 0..4.
//
// Used, unchanged, by the CPU kernels (csrc/act_ops.cpp), the CUDA kernels
// (csrc/cuda/act_ops.cu) and mirrored 1:1 -- same names, same branches, same algebra -- by the
// pure-PyTorch reference in torchhessdiag/reference.py, which the tests hold against this table.
//
// Every formula is written in a numerically stable form: it only ever exponentiates a
// non-positive number (exp(-|z|) and friends), never subtracts two nearly equal O(1) quantities
// to get a small one (sech^2 is 4e/(1+e)^2, not 1 - tanh^2; q - p of the sigmoid is -tanh(z/2)),
// so every entry is finite and accurate to a few ulp in float64 for |z| <= 1e4 (exp itself
// excepted: e^z overflows for z > 709, as it must).
//
// Branches follow torch's own kernels exactly where torch is piecewise (softplus' threshold,
// ELU/CELU and ReLU at 0 and at NaN), so derivatives agree with nested torch.autograd.grad of
// torch's own function, including which branch a NaN takes.
#pragma once

#include <math.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define THD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define THD_HD inline __attribute__((always_inline))
#else
#define THD_HD inline
#endif

// The table is compiled once per instruction set: the scalar build (every .cpp/.cu of the
// extension) and the SIMD builds in csrc/cpu/kernels_avx2.cpp / kernels_avx512.cpp, which define
// THD_ISA_NS before including this header. The inline namespace gives each build its own symbols,
// so code compiled for AVX-512 can never be linked in place of the scalar code (ODR).
#ifndef THD_ISA_NS
#define THD_ISA_NS base
#endif

namespace thd {
inline namespace THD_ISA_NS {

// Highest derivative order the table holds. Higher orders are served by a slower exact path in
// Python (torchhessdiag/ops.py).
constexpr int kMaxOrder = 4;

// Activation ids; kActInfo below holds their names (the public spelling) and flags.
enum class Act : int {
  Identity = 0,
  Tanh,
  Sigmoid,
  Softplus,  // a = beta, b = threshold (torch semantics: linear where beta*z > threshold)
  SiLU,
  GELU,      // exact (erf) GELU
  GELUTanh,  // GELU with approximate='tanh'
  Sin,       // a = frequency w: sin(w z)
  Cos,       // a = frequency w: cos(w z)
  Exp,
  ELU,   // a = alpha
  CELU,  // a = alpha
  ReLU,
  LeakyReLU,  // a = negative_slope
  kCount
};

// What the C++ needs to know about each activation besides its formulas, in enum order. The
// Python registry (torchhessdiag/_registry.py) holds the same facts for Python;
// tests/test_registry.py checks the two agree through torchhessdiag._C.activation_info().
struct ActInfo {
  const char* name;           // the public spelling used by the op schemas
  bool linear;                // identity: every derivative of order >= 2 is 0
  bool piecewise_linear;      // order >= 2 is 0 almost everywhere (a Dirac delta at 0): warned
  const char* nonzero_param;  // the name of parameter a when a = 0 is refused, else nullptr
};
constexpr ActInfo kActInfo[] = {
    {"identity", true, false, nullptr},   {"tanh", false, false, nullptr},
    {"sigmoid", false, false, nullptr},   {"softplus", false, false, "beta"},
    {"silu", false, false, nullptr},      {"gelu", false, false, nullptr},
    {"gelu_tanh", false, false, nullptr}, {"sin", false, false, nullptr},
    {"cos", false, false, nullptr},       {"exp", false, false, nullptr},
    {"elu", false, false, nullptr},       {"celu", false, false, "alpha"},
    {"relu", false, true, nullptr},       {"leaky_relu", false, true, nullptr}};
static_assert(sizeof(kActInfo) / sizeof(kActInfo[0]) == static_cast<int>(Act::kCount),
              "one entry per activation");
constexpr const ActInfo& act_info(Act act) { return kActInfo[static_cast<int>(act)]; }
constexpr const char* act_name(int i) { return kActInfo[i].name; }

// ---- math wrappers: one spelling for host and device, float and double -----------------------
THD_HD float t_exp(float x) { return ::expf(x); }
THD_HD double t_exp(double x) { return ::exp(x); }
THD_HD float t_expm1(float x) { return ::expm1f(x); }
THD_HD double t_expm1(double x) { return ::expm1(x); }
THD_HD float t_log1p(float x) { return ::log1pf(x); }
THD_HD double t_log1p(double x) { return ::log1p(x); }
THD_HD float t_erfc(float x) { return ::erfcf(x); }
THD_HD double t_erfc(double x) { return ::erfc(x); }
THD_HD float t_sin(float x) { return ::sinf(x); }
THD_HD double t_sin(double x) { return ::sin(x); }
THD_HD float t_cos(float x) { return ::cosf(x); }
THD_HD double t_cos(double x) { return ::cos(x); }
THD_HD float t_abs(float x) { return ::fabsf(x); }
THD_HD double t_abs(double x) { return ::fabs(x); }
THD_HD float t_copysign(float x, float y) { return ::copysignf(x, y); }
THD_HD double t_copysign(double x, double y) { return ::copysign(x, y); }

// Branch-free selection: t_sel(c, a, b) = c ? a : b, per lane for the SIMD types of
// csrc/cpu/vec.h (where comparisons give lane masks). Every formula below that depends on the
// sign or range of its argument is written with t_sel, so one text serves scalars and vectors.
THD_HD float t_sel(bool c, float a, float b) { return c ? a : b; }
THD_HD double t_sel(bool c, double a, double b) { return c ? a : b; }

// True for the SIMD vector types (csrc/cpu/vec.h specialises it): code that would branch on a
// value takes the branch-free form for them.
template <typename T>
struct IsVec : std::false_type {};

// e = exp(-a) and em = e - 1 = expm1(-a) for a >= 0 (or NaN), both to full relative accuracy, for
// the price of one transcendental: expm1 where e is near 1 (em would cancel), exp elsewhere (e is
// at most 1/e there, so e - 1 does not cancel).
// (SIMD lanes, which cannot branch per lane, get both from one range reduction: exp_pair in
// csrc/cpu/vec.h.)
template <typename T>
struct ExpPair {
  T e, em;
  THD_HD explicit ExpPair(T a) {
    if constexpr (IsVec<T>::value) {
      exp_pair(a, e, em);  // csrc/cpu/vec.h: both from one range reduction
    } else {
      if (a < T(1)) {
        em = t_expm1(-a);
        e = T(1) + em;
      } else {
        e = t_exp(-a);
        em = e - T(1);
      }
    }
  }
};

// ---- shared building blocks ------------------------------------------------------------------

// tanh(z) = sign(z) (1 - e)/(1 + e) and sech^2(z) = 4e/(1+e)^2 with e = exp(-2|z|) in (0, 1]:
// no cancellation anywhere (1 - e is -em, computed directly), one transcendental.
template <typename T>
struct TanhParts {
  T t, s;
  THD_HD explicit TanhParts(T z) {
    const ExpPair<T> E(T(2) * t_abs(z));
    const T r = T(1) + E.e;
    t = t_copysign(-E.em / r, z);
    s = T(4) * E.e / (r * r);
  }
};

// Logistic sigmoid p = 1/(1+exp(-z)), q = 1 - p, pq = p*q and w = q - p = -tanh(z/2), each
// computed directly (never as a difference of two O(1) numbers), from e = exp(-|z|):
// tanh(|z|/2) = (1 - e)/(1 + e) = -em r. One transcendental.
template <typename T>
struct SigmoidParts {
  T p, q, pq, w;
  THD_HD explicit SigmoidParts(T z) {
    const ExpPair<T> E(t_abs(z));
    const T e = E.e;
    const T r = T(1) / (T(1) + e);
    const auto pos = z >= T(0);
    p = t_sel(pos, r, e * r);
    q = t_sel(pos, e * r, r);
    pq = e * r * r;
    w = t_copysign(-E.em * r, -z);
  }
};

// Derivatives of order 0..4 of the logistic sigmoid at z, from its parts.
template <int N, typename T>
THD_HD void sigmoid_derivs(const SigmoidParts<T>& P, T* d) {
  d[0] = P.p;
  if constexpr (N >= 1) d[1] = P.pq;
  if constexpr (N >= 2) d[2] = P.pq * P.w;
  if constexpr (N >= 3) d[3] = P.pq * (T(1) - T(6) * P.pq);
  if constexpr (N >= 4) d[4] = P.pq * P.w * (T(1) - T(12) * P.pq);
}

// (z * h)^(n) = z h^(n) + n h^(n-1), in place: h holds h^(0..N) on entry, (z h)^(0..N) on exit.
template <int N, typename T>
THD_HD void times_z(T z, T* h) {
#pragma unroll
  for (int n = N; n >= 1; --n) h[n] = z * h[n] + T(n) * h[n - 1];
  h[0] = z * h[0];
}

template <int N, typename T>
THD_HD void zero_from(int first, T* d) {
#pragma unroll
  for (int n = 0; n <= N; ++n)
    if (n >= first) d[n] = T(0);
}

template <typename T>
THD_HD T t_max0(T u) {
  return t_sel(u > T(0), u, T(0));
}

// ---- the table: one struct per activation, eval<N> fills d[0..N] -----------------------------
// a, b are the activation's parameters (see enum Act); unused ones are ignored.

struct IdentityD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    d[0] = z;
    if constexpr (N >= 1) d[1] = T(1);
    zero_from<N>(2, d);
  }
};

struct TanhD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    const TanhParts<T> P(z);
    const T t = P.t, s = P.s;
    d[0] = t;
    if constexpr (N >= 1) d[1] = s;
    if constexpr (N >= 2) d[2] = T(-2) * t * s;
    if constexpr (N >= 3) d[3] = s * (T(4) - T(6) * s);
    if constexpr (N >= 4) d[4] = T(8) * t * s * (T(3) * s - T(1));
  }
};

struct SigmoidD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    sigmoid_derivs<N>(SigmoidParts<T>(z), d);
  }
};

// softplus(z) = log(1 + exp(beta z)) / beta where beta z <= threshold, z above it (torch).
// Below the threshold: d1 = sigmoid(beta z), d(n) = beta^(n-1) sigmoid^(n-1)(beta z). torch's
// branches: value and first derivative are linear for beta z > threshold, the second and higher
// derivatives are zero unless beta z < threshold (so at beta z == threshold exactly they are 0).
struct SoftplusD {
  template <int N, typename T>
  static THD_HD void eval(T z, T beta, T threshold, T* d) {
    const T u = beta * z;
    const auto above = u > threshold;   // linear branch: z, 1, 0, ...
    const auto curved = u < threshold;  // second and higher derivatives nonzero
    const SigmoidParts<T> P(u);
    T sg[N + 1];
    sigmoid_derivs<(N >= 1 ? N - 1 : 0)>(P, sg);
    d[0] = t_sel(above, z, (t_max0(u) + t_log1p(t_exp(-t_abs(u)))) / beta);
    if constexpr (N >= 1) d[1] = t_sel(above, T(1), sg[0]);
    T bp = beta;
#pragma unroll
    for (int n = 2; n <= N; ++n) {
      d[n] = t_sel(curved, bp * sg[n - 1], T(0));
      bp *= beta;
    }
  }
};

// silu(z) = z sigmoid(z)
struct SiLUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    sigmoid_derivs<N>(SigmoidParts<T>(z), d);
    times_z<N>(z, d);
  }
};

// gelu(z) = z Phi(z); Phi(z) = erfc(-z/sqrt2)/2, phi(z) = exp(-z^2/2)/sqrt(2 pi).
// Phi^(n) = phi^(n-1), phi' = -z phi, phi'' = (z^2-1) phi, phi''' = (3z - z^3) phi.
struct GELUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    const T kInvSqrt2 = T(0.70710678118654752440);
    const T kInvSqrt2Pi = T(0.39894228040143267794);
    const T phi = t_exp(T(-0.5) * z * z) * kInvSqrt2Pi;
    const T z2 = z * z;
    T h[N + 1];
    h[0] = T(0.5) * t_erfc(-z * kInvSqrt2);
    if constexpr (N >= 1) h[1] = phi;
    if constexpr (N >= 2) h[2] = -z * phi;
    if constexpr (N >= 3) h[3] = (z2 - T(1)) * phi;
    if constexpr (N >= 4) h[4] = z * (T(3) - z2) * phi;
#pragma unroll
    for (int n = 0; n <= N; ++n) d[n] = h[n];
    times_z<N>(z, d);
  }
};

// gelu_tanh(z) = z H(z), H(z) = (1 + tanh(u))/2 = sigmoid(2u), u = k0 (z + k1 z^3).
// H^(n) by Faa di Bruno with u' = k0(1 + 3 k1 z^2), u'' = 6 k0 k1 z, u''' = 6 k0 k1, u'''' = 0,
// and d^n/du^n sigmoid(2u) = 2^n sigmoid^(n)(2u).
struct GELUTanhD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    const T k0 = T(0.79788456080286535588);  // sqrt(2/pi)
    const T k1 = T(0.044715);
    const T z2 = z * z;
    const T u = k0 * (z + k1 * z2 * z);
    const T u1 = k0 * (T(1) + T(3) * k1 * z2);
    const T u2 = T(6) * k0 * k1 * z;
    const T u3 = T(6) * k0 * k1;
    T S[N + 1];
    sigmoid_derivs<N>(SigmoidParts<T>(T(2) * u), S);
    T h[N + 1];
    h[0] = S[0];
    if constexpr (N >= 1) h[1] = T(2) * S[1] * u1;
    if constexpr (N >= 2) h[2] = T(4) * S[2] * u1 * u1 + T(2) * S[1] * u2;
    if constexpr (N >= 3)
      h[3] = T(8) * S[3] * u1 * u1 * u1 + T(3) * T(4) * S[2] * u1 * u2 + T(2) * S[1] * u3;
    if constexpr (N >= 4)
      h[4] = T(16) * S[4] * u1 * u1 * u1 * u1 + T(6) * T(8) * S[3] * u1 * u1 * u2 +
             T(4) * S[2] * (T(3) * u2 * u2 + T(4) * u1 * u3);
#pragma unroll
    for (int n = 0; n <= N; ++n) d[n] = h[n];
    times_z<N>(z, d);
  }
};

// sin(w z): d(n) = w^n sin(w z + n pi/2)
struct SinD {
  template <int N, typename T>
  static THD_HD void eval(T z, T w, T, T* d) {
    const T s = t_sin(w * z), c = t_cos(w * z);
    d[0] = s;
    if constexpr (N >= 1) d[1] = w * c;
    if constexpr (N >= 2) d[2] = -w * w * s;
    if constexpr (N >= 3) d[3] = -w * w * w * c;
    if constexpr (N >= 4) d[4] = w * w * w * w * s;
  }
};

// cos(w z): d(n) = w^n cos(w z + n pi/2)
struct CosD {
  template <int N, typename T>
  static THD_HD void eval(T z, T w, T, T* d) {
    const T s = t_sin(w * z), c = t_cos(w * z);
    d[0] = c;
    if constexpr (N >= 1) d[1] = -w * s;
    if constexpr (N >= 2) d[2] = -w * w * c;
    if constexpr (N >= 3) d[3] = w * w * w * s;
    if constexpr (N >= 4) d[4] = w * w * w * w * c;
  }
};

struct ExpD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    const T e = t_exp(z);
#pragma unroll
    for (int n = 0; n <= N; ++n) d[n] = e;
  }
};

// elu(z) = z for z > 0, alpha (e^z - 1) otherwise. At z == 0 the two sides differ from the second
// derivative on; we take torch's convention: the first derivative uses the negative branch for
// z <= 0 (elu_backward), the higher ones only for z < 0 (elu_double_backward), so at 0 they are
// (alpha, 0, 0, 0). NaN takes the positive branch, as in torch.
struct ELUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T alpha, T, T* d) {
    const auto neg1 = z <= T(0);
    const auto neg2 = z < T(0);
    const T e = t_sel(neg1, alpha * t_exp(z), T(0));
    d[0] = t_sel(neg1, alpha * t_expm1(z), z);
    if constexpr (N >= 1) d[1] = t_sel(neg1, e, T(1));
#pragma unroll
    for (int n = 2; n <= N; ++n) d[n] = t_sel(neg2, e, T(0));
  }
};

// celu(z) = z for z > 0, alpha (e^(z/alpha) - 1) otherwise; d(n) = alpha^(1-n) e^(z/alpha) on the
// negative side, with ELU's convention at 0 (torch computes celu through elu).
struct CELUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T alpha, T, T* d) {
    const auto neg1 = z <= T(0);
    const auto neg2 = z < T(0);
    const T inv = T(1) / alpha;
    T e = t_sel(neg1, t_exp(z * inv), T(0));
    d[0] = t_sel(neg1, alpha * t_expm1(z * inv), z);
    if constexpr (N >= 1) d[1] = t_sel(neg1, e, T(1));
#pragma unroll
    for (int n = 2; n <= N; ++n) {
      e = e * inv;
      d[n] = t_sel(neg2, e, T(0));
    }
  }
};

// relu: torch's derivative is 0 where z <= 0 and 1 elsewhere (NaN included); exact zeros above.
struct ReLUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T, T, T* d) {
    const auto neg = z <= T(0);
    d[0] = t_sel(neg, T(0), z);
    if constexpr (N >= 1) d[1] = t_sel(neg, T(0), T(1));
    zero_from<N>(2, d);
  }
};

// leaky_relu: z for z > 0, slope z otherwise (NaN takes the slope branch, as in torch).
struct LeakyReLUD {
  template <int N, typename T>
  static THD_HD void eval(T z, T slope, T, T* d) {
    const auto pos = z > T(0);
    d[0] = t_sel(pos, z, z * slope);
    if constexpr (N >= 1) d[1] = t_sel(pos, T(1), slope);
    zero_from<N>(2, d);
  }
};

// Calls f(TableStruct{}) for the activation `act`. Kernels are instantiated per activation, so the
// switch happens once per launch, never per element.
template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::Identity: f(IdentityD{}); break;
    case Act::Tanh: f(TanhD{}); break;
    case Act::Sigmoid: f(SigmoidD{}); break;
    case Act::Softplus: f(SoftplusD{}); break;
    case Act::SiLU: f(SiLUD{}); break;
    case Act::GELU: f(GELUD{}); break;
    case Act::GELUTanh: f(GELUTanhD{}); break;
    case Act::Sin: f(SinD{}); break;
    case Act::Cos: f(CosD{}); break;
    case Act::Exp: f(ExpD{}); break;
    case Act::ELU: f(ELUD{}); break;
    case Act::CELU: f(CELUD{}); break;
    case Act::ReLU: f(ReLUD{}); break;
    case Act::LeakyReLU: f(LeakyReLUD{}); break;
    default: break;
  }
}

// Calls f(std::integral_constant<int, n>) for a runtime order n in 0..kMaxOrder.
template <typename F>
inline void dispatch_order(int n, F&& f) {
  switch (n) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: break;
  }
}

}  // namespace THD_ISA_NS
}  // namespace thd
