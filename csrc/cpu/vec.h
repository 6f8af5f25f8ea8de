// SIMD vector types for the CPU kernels: the derivative table (csrc/activations.h) evaluated on
// AVX2 / AVX-512 lanes with SLEEF's vector math (the copy inside libtorch_cpu).
//
// Included only by csrc/cpu/kernels_avx2.cpp and kernels_avx512.cpp, after their
// `#pragma GCC target(...)` and with THD_ISA_NS / THD_VEC_BYTES defined (see kernels_isa.h).
// Nothing here includes a torch header: every function in these translation units is compiled
// for the wider instruction set and must not be shared with the rest of the extension.
//
// Vec<T> wraps a GCC vector of THD_VEC_BYTES bytes. Arithmetic is lane-wise; comparisons give a
// lane mask and t_sel(mask, a, b) selects per lane, so the table's text (written with t_sel) is
// the same for scalars, vectors and CUDA. exp, expm1, log1p, erfc, sin and cos call SLEEF's
// 1-ulp (erfc: 1.5-ulp) vector functions. They are declared weak: a torch build without them
// leaves the pointers null, kernels_isa.h then reports the instruction set as unavailable and
// the scalar kernels run instead.
#pragma once

namespace thd {
inline namespace THD_ISA_NS {

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float raw __attribute__((vector_size(THD_VEC_BYTES)));
  typedef int ints __attribute__((vector_size(THD_VEC_BYTES)));
  static constexpr int width = THD_VEC_BYTES / 4;
};
template <>
struct VecTraits<double> {
  typedef double raw __attribute__((vector_size(THD_VEC_BYTES)));
  typedef long long ints __attribute__((vector_size(THD_VEC_BYTES)));
  static constexpr int width = THD_VEC_BYTES / 8;
};

template <typename T>
struct Mask {
  typename VecTraits<T>::ints m;
};

template <typename T>
struct Vec {
  using raw = typename VecTraits<T>::raw;
  using ints = typename VecTraits<T>::ints;
  using value_type = T;
  static constexpr int width = VecTraits<T>::width;
  raw v;

  Vec() = default;
  THD_HD Vec(raw r) : v(r) {}
  // broadcast (implicit, so that `2 * x` and `T(1)` work as in scalar code); lane by lane, not
  // as raw{} + s, which would turn -0.0 into +0.0
  THD_HD Vec(float s) { fill(static_cast<T>(s)); }
  THD_HD Vec(double s) { fill(static_cast<T>(s)); }
  THD_HD Vec(int s) { fill(static_cast<T>(s)); }
  THD_HD void fill(T s) {
    for (int i = 0; i < width; ++i) v[i] = s;
  }

  static THD_HD Vec load(const T* p) {
    raw r;
    __builtin_memcpy(&r, p, sizeof(raw));
    return r;
  }
  // the first n < width lanes from p, the others 0
  static THD_HD Vec load(const T* p, int n) {
    T buf[width] = {};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    raw r;
    __builtin_memcpy(&r, buf, sizeof(raw));
    return r;
  }
  THD_HD void store(T* p) const { __builtin_memcpy(p, &v, sizeof(raw)); }
  THD_HD void store(T* p, int n) const {
    T buf[width];
    __builtin_memcpy(buf, &v, sizeof(raw));
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }
  THD_HD T sum() const {
    T buf[width];
    __builtin_memcpy(buf, &v, sizeof(raw));
    T s = T(0);
    for (int i = 0; i < width; ++i) s += buf[i];
    return s;
  }

  friend THD_HD Vec operator+(Vec a, Vec b) { return Vec(a.v + b.v); }
  friend THD_HD Vec operator-(Vec a, Vec b) { return Vec(a.v - b.v); }
  friend THD_HD Vec operator*(Vec a, Vec b) { return Vec(a.v * b.v); }
  friend THD_HD Vec operator/(Vec a, Vec b) { return Vec(a.v / b.v); }
  friend THD_HD Vec operator-(Vec a) { return Vec(-a.v); }
  THD_HD Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
  THD_HD Vec& operator-=(Vec b) {
    v -= b.v;
    return *this;
  }
  THD_HD Vec& operator*=(Vec b) {
    v *= b.v;
    return *this;
  }
  friend THD_HD Mask<T> operator<(Vec a, Vec b) { return {a.v < b.v}; }
  friend THD_HD Mask<T> operator<=(Vec a, Vec b) { return {a.v <= b.v}; }
  friend THD_HD Mask<T> operator>(Vec a, Vec b) { return {a.v > b.v}; }
  friend THD_HD Mask<T> operator>=(Vec a, Vec b) { return {a.v >= b.v}; }
};

template <typename T>
struct IsVec<Vec<T>> : std::true_type {};

template <typename T>
THD_HD Vec<T> t_sel(Mask<T> c, Vec<T> a, Vec<T> b) {
  return Vec<T>(c.m ? a.v : b.v);
}

template <typename T>
THD_HD Vec<T> t_abs(Vec<T> x) {
  using I = typename VecTraits<T>::ints;
  const I sign = (I)(Vec<T>(T(-0.0)).v);
  return Vec<T>((typename Vec<T>::raw)(((I)x.v) & ~sign));
}

template <typename T>
THD_HD Vec<T> t_copysign(Vec<T> x, Vec<T> y) {
  using I = typename VecTraits<T>::ints;
  const I sign = (I)(Vec<T>(T(-0.0)).v);
  return Vec<T>((typename Vec<T>::raw)((((I)x.v) & ~sign) | (((I)y.v) & sign)));
}

}  // namespace THD_ISA_NS
}  // namespace thd

// ---- SLEEF (inside libtorch_cpu), declared weak ---------------------------------------------
#define THD_SLEEF_DECL(RET, NAME) extern "C" __attribute__((weak)) RET NAME(RET);
#if THD_VEC_BYTES == 64
#define THD_SLEEF_F(fn, u) Sleef_##fn##f16_##u##avx512f
#define THD_SLEEF_D(fn, u) Sleef_##fn##d8_##u##avx512f
#else
#define THD_SLEEF_F(fn, u) Sleef_##fn##f8_##u##avx2
#define THD_SLEEF_D(fn, u) Sleef_##fn##d4_##u##avx2
#endif
#define THD_SLEEF_BOTH(fn, u)                                                \
  THD_SLEEF_DECL(thd::THD_ISA_NS::VecTraits<float>::raw, THD_SLEEF_F(fn, u)) \
  THD_SLEEF_DECL(thd::THD_ISA_NS::VecTraits<double>::raw, THD_SLEEF_D(fn, u))
THD_SLEEF_BOTH(exp, u10)
THD_SLEEF_BOTH(expm1, u10)
THD_SLEEF_BOTH(log1p, u10)
THD_SLEEF_BOTH(erfc, u15)
THD_SLEEF_BOTH(sin, u10)
THD_SLEEF_BOTH(cos, u10)

namespace thd {
inline namespace THD_ISA_NS {

#define THD_VEC_MATH(name, fn, u)                                                      \
  THD_HD Vec<float> name(Vec<float> x) { return Vec<float>(THD_SLEEF_F(fn, u)(x.v)); } \
  THD_HD Vec<double> name(Vec<double> x) { return Vec<double>(THD_SLEEF_D(fn, u)(x.v)); }
THD_VEC_MATH(t_exp, exp, u10)
THD_VEC_MATH(t_expm1, expm1, u10)
THD_VEC_MATH(t_log1p, log1p, u10)
THD_VEC_MATH(t_erfc, erfc, u15)
THD_VEC_MATH(t_sin, sin, u10)
THD_VEC_MATH(t_cos, cos, u10)
#undef THD_VEC_MATH

// e = exp(-a) and em = expm1(-a) = e - 1 for a >= 0 (and NaN), both to full relative accuracy,
// from ONE range reduction (where ExpPair's scalar form calls either expm1 or exp, lanes would
// need both): -a = k ln2 + r, |r| <= ln2/2, p = expm1(r) by its Taylor polynomial (degree 13 in
// double, 8 in float: truncation below half an ulp), then e = 2^k (1 + p) and
// em = (2^k - 1) + 2^k p, where 2^k - 1 is exact and the sum never cancels (2^k <= 1). 2^k is
// applied as 2^k1 2^k2 (k1 + k2 = k) so e keeps its gradual underflow; beyond a = 1100 (double)
// or 110 (float) e is 0 and em -1 to working precision. Accuracy (tests/test_table.py, SIMD vs
// scalar builds): within a few ulp of libm's exp and expm1.
template <typename T>
THD_HD void exp_pair(Vec<T> a, Vec<T>& e, Vec<T>& em) {
  using V = Vec<T>;
  using I = typename VecTraits<T>::ints;
  using raw = typename V::raw;
  constexpr bool kDouble = sizeof(T) == 8;
  const V big = V(kDouble ? 1100.0 : 110.0);
  const auto ok = a <= big;  // false for NaN and beyond
  const V x = -t_sel(ok, a, big);
  const V magic = V(kDouble ? 6755399441055744.0 : 12582912.0);  // 1.5 * 2^52, 1.5 * 2^23
  const V t = x * V(1.4426950408889634074) + magic;              // round(x / ln2) in its bits
  const V kf = t - magic;
  const I k = (I)t.v - (I)magic.v;
  // Cody-Waite: ln2 = C1 + C2 with C1 short enough that kf * C1 is exact
  const V C1 = V(kDouble ? 6.93145751953125E-1 : 0.693359375);
  const V C2 = V(kDouble ? 1.42860682030941723212E-6 : -2.12194440E-4);
  const V r = (x - kf * C1) - kf * C2;
  V q;  // expm1(r) = r + r^2 q(r)
  if constexpr (kDouble) {
    q = V(1.0 / 6227020800.0);  // 1/13!
    q = q * r + V(1.0 / 479001600.0);
    q = q * r + V(1.0 / 39916800.0);
    q = q * r + V(1.0 / 3628800.0);
    q = q * r + V(1.0 / 362880.0);
    q = q * r + V(1.0 / 40320.0);
    q = q * r + V(1.0 / 5040.0);
    q = q * r + V(1.0 / 720.0);
    q = q * r + V(1.0 / 120.0);
    q = q * r + V(1.0 / 24.0);
    q = q * r + V(1.0 / 6.0);
    q = q * r + V(0.5);
  } else {
    q = V(1.0 / 40320.0);
    q = q * r + V(1.0 / 5040.0);
    q = q * r + V(1.0 / 720.0);
    q = q * r + V(1.0 / 120.0);
    q = q * r + V(1.0 / 24.0);
    q = q * r + V(1.0 / 6.0);
    q = q * r + V(0.5);
  }
  const V p = r + r * r * q;
  const int shift = kDouble ? 52 : 23;
  const I bias = I{} + (kDouble ? 1023 : 127);
  const I k1 = k >> 1, k2 = k - k1;
  const V s1 = V((raw)((k1 + bias) << shift)), s2 = V((raw)((k2 + bias) << shift));
  const V scale = s1 * s2;
  e = t_sel(ok, s1 * (s2 * (V(T(1)) + p)), t_sel(a > big, V(T(0)), a));
  em = t_sel(ok, (scale - V(T(1))) + scale * p, t_sel(a > big, V(T(-1)), a));
}

// Whether every SLEEF function the table uses was found in the loaded torch.
inline bool sleef_linked() {
#define THD_HAS(fn, u) (THD_SLEEF_F(fn, u) != nullptr && THD_SLEEF_D(fn, u) != nullptr)
  return THD_HAS(exp, u10) && THD_HAS(expm1, u10) && THD_HAS(log1p, u10) && THD_HAS(erfc, u15) &&
         THD_HAS(sin, u10) && THD_HAS(cos, u10);
#undef THD_HAS
}

}  // namespace THD_ISA_NS
}  // namespace thd
