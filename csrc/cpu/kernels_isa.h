// The bodies of the CPU kernels of csrc/cpu/kernels.h, written once over a "lanes" policy:
// Lanes<T>::V is T itself (csrc/cpu/kernels_scalar.cpp) or a SIMD vector Vec<T>
// (kernels_avx2.cpp, kernels_avx512.cpp), and the derivative table (csrc/activations.h) is
// evaluated on it unchanged. Included by exactly those three files, each after defining
// THD_ISA_NS (and, for SIMD, its `#pragma GCC target`), so every symbol here is per build.
//
// Loops run over points i and, inside, over the width j in steps of the vector width; the last
// step of a row takes a partial vector when w is not a multiple of it. A layer's rows of one
// point are read and written in the same pass, so each element of the jet crosses memory once.
#pragma once

namespace thd {
inline namespace THD_ISA_NS {

// One lane: the table on plain scalars (the scalar CPU build, and the CUDA kernels, where a
// thread handles one element).
template <typename T_>
struct ScalarLanes {
  using T = T_;
  using V = T_;
  static constexpr int width = 1;
  static THD_HD V load(const T* p) { return *p; }
  static THD_HD V load(const T* p, int) { return *p; }
  static THD_HD void store(T* p, V v) { *p = v; }
  static THD_HD void store(T* p, V v, int) { *p = v; }
};

template <class L>
struct Lanes {
  using V = typename L::V;
  using T = typename L::T;
  static constexpr int W = L::width;
  static THD_HD V ld(const T* p, int cnt) { return cnt == W ? L::load(p) : L::load(p, cnt); }
  static THD_HD void st(T* p, V v, int cnt) {
    if (cnt == W)
      L::store(p, v);
    else
      L::store(p, v, cnt);
  }
};

// ---- the derivative table over a range --------------------------------------------------------

template <class L, class Act, int N>
void derivs_body(const cpu::DerivsJob& p, int64_t begin, int64_t end) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  constexpr int W = L::width;
  const T* z = static_cast<const T*>(p.z);
  T* out = static_cast<T*>(p.out);
  const V a = V(static_cast<T>(p.a)), b = V(static_cast<T>(p.b));
  for (int64_t i = begin; i < end; i += W) {
    const int cnt = end - i < W ? static_cast<int>(end - i) : W;
    V d[N + 1];
    Act::template eval<N>(X::ld(z + i, cnt), a, b, d);
    for (int j = 0; j < p.n_orders; ++j) X::st(out + j * p.numel + i, d[p.orders[j]], cnt);
  }
}

template <class L>
void derivs_entry(const cpu::DerivsJob& p, int64_t begin, int64_t end) {
  dispatch_act(static_cast<Act>(p.act), [&](auto tag) {
    using A = decltype(tag);
    dispatch_order(p.max_k, [&](auto n) {
      constexpr int N = decltype(n)::value;
      derivs_body<L, A, N>(p, begin, end);
    });
  });
}

// ---- one layer of the forward-mode MLP jet (csrc/mlp_ops.h) ------------------------------------
// MODE 0: summed second-order row; 1: per-direction rows; 2: the first activation (constant
// first-order rows C, zero second-order rows).

enum { kSum = 0, kDiag = 1, kConst = 2 };

// Point i, columns j..j+cnt-1 of one layer (cnt = lanes, fewer at the end of a row).
template <class L, class Act, int MODE>
THD_HD void mlp_forward_elem(const cpu::MlpActJob& p, int64_t i, int64_t j, int cnt) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  const int64_t w = p.w, S = p.S, K = p.K, plane = p.n * w;
  T* Z = static_cast<T*>(p.Z);
  T* A = static_cast<T*>(p.A);
  const T* bias = static_cast<const T*>(p.bias);
  const T* C = static_cast<const T*>(p.C);
  const T* Q = static_cast<const T*>(p.Q);
  const V pa = V(static_cast<T>(p.a)), pb = V(static_cast<T>(p.b));
  const bool want_J = p.a_rows > 1 + S;
  const int64_t o = i * w + j;
  V z = X::ld(Z + o, cnt);
  if (bias != nullptr) z = z + X::ld(bias + j, cnt);
  if (p.write_z) X::st(Z + o, z, cnt);
  V d[3];
  Act::template eval<2>(z, pa, pb, d);
  X::st(A + o, d[0], cnt);
  if constexpr (MODE == kConst) {
    for (int64_t r = 0; r < S; ++r)
      X::st(A + (1 + r) * plane + o, d[2] * X::ld(Q + r * w + j, cnt), cnt);
    if (want_J)
      for (int64_t k = 0; k < K; ++k)
        X::st(A + (1 + S + k) * plane + o, d[1] * X::ld(C + k * w + j, cnt), cnt);
  } else if constexpr (MODE == kSum) {
    V q = V(T(0));
    for (int64_t k = 0; k < K; ++k) {
      const V Jk = X::ld(Z + (1 + S + k) * plane + o, cnt);
      if (p.in_sum[k]) q = q + Jk * Jk;
      if (want_J) X::st(A + (1 + S + k) * plane + o, d[1] * Jk, cnt);
    }
    X::st(A + plane + o, d[1] * X::ld(Z + plane + o, cnt) + d[2] * q, cnt);
  } else {
    for (int64_t r = 0; r < S; ++r) {
      const V Jd = X::ld(Z + (1 + S + p.sel[r]) * plane + o, cnt);
      X::st(A + (1 + r) * plane + o, d[1] * X::ld(Z + (1 + r) * plane + o, cnt) + d[2] * Jd * Jd,
            cnt);
    }
    if (want_J)
      for (int64_t k = 0; k < K; ++k)
        X::st(A + (1 + S + k) * plane + o, d[1] * X::ld(Z + (1 + S + k) * plane + o, cnt), cnt);
  }
}

template <class L, class Act, int MODE>
void mlp_forward_body(const cpu::MlpActJob& p) {
  constexpr int W = L::width;
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.w; j += W)
      mlp_forward_elem<L, Act, MODE>(p, i, j, p.w - j < W ? static_cast<int>(p.w - j) : W);
}

// Backward of one layer: from Z (z with its bias in row 0) and the gradient gA of the layer's
// output rows, the gradient gZ of its input rows; recomputes A (rows 0..a_rows-1) on the way when
// p.A is set (the next layer's weight gradient needs it, and it is cheaper than storing it).
//   gz   = gy s1 + s2 sum_k gJ'_k J_k + sum_r gs_r (s2 s_r + s3 q_r)
//   gs_r = s1 gs'_r
//   gJ_k = s1 gJ'_k + 2 s2 J_k G_k      (G_k: the gs' of the second-order rows J_k feeds)
template <class L, class Act, int MODE>
THD_HD void mlp_backward_elem(const cpu::MlpActJob& p, int64_t i, int64_t j, int cnt) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  const int64_t w = p.w, S = p.S, K = p.K, plane = p.n * w;
  const T* Z = static_cast<const T*>(p.Z);
  const T* gA = static_cast<const T*>(p.gA);
  T* gZ = static_cast<T*>(p.gZ);
  T* A = static_cast<T*>(p.A);
  T* gC = static_cast<T*>(p.gC);
  const T* C = static_cast<const T*>(p.C);
  const T* Q = static_cast<const T*>(p.Q);
  const V pa = V(static_cast<T>(p.a)), pb = V(static_cast<T>(p.b));
  const bool has_gJ = p.g_rows > 1 + S;
  const bool want_A = A != nullptr;
  const bool want_AJ = want_A && p.a_rows > 1 + S;
  const V two = V(T(2));
  const int64_t o = i * w + j;
  V d[4];
  Act::template eval<3>(X::ld(Z + o, cnt), pa, pb, d);
  V acc = X::ld(gA + o, cnt) * d[1];
  if (want_A) X::st(A + o, d[0], cnt);
  if constexpr (MODE == kConst) {
    V gs[1] = {V(T(0))};
    for (int64_t r = 0; r < S; ++r) {
      const V g = X::ld(gA + (1 + r) * plane + o, cnt), Qr = X::ld(Q + r * w + j, cnt);
      acc = acc + g * d[3] * Qr;
      if (!p.diag) gs[0] = g;
      if (want_A) X::st(A + (1 + r) * plane + o, d[2] * Qr, cnt);
    }
    for (int64_t k = 0; k < K; ++k) {
      const V Ck = X::ld(C + k * w + j, cnt);
      V g = V(T(0));
      if (has_gJ) {
        const V gJ = X::ld(gA + (1 + S + k) * plane + o, cnt);
        acc = acc + d[2] * gJ * Ck;
        g = d[1] * gJ;
      }
      if (p.diag) {
        for (int64_t r = 0; r < S; ++r)
          if (p.sel[r] == k) g = g + two * d[2] * Ck * X::ld(gA + (1 + r) * plane + o, cnt);
      } else if (p.in_sum[k]) {
        g = g + two * d[2] * Ck * gs[0];
      }
      if (p.gC_per_point)
        X::st(gC + (k * p.n + i) * w + j, g, cnt);
      else
        X::st(gC + k * w + j, X::ld(gC + k * w + j, cnt) + g, cnt);
      if (want_AJ) X::st(A + (1 + S + k) * plane + o, d[1] * Ck, cnt);
    }
    X::st(gZ + o, acc, cnt);
  } else if constexpr (MODE == kSum) {
    const V gs = X::ld(gA + plane + o, cnt), s = X::ld(Z + plane + o, cnt);
    X::st(gZ + plane + o, d[1] * gs, cnt);
    V q = V(T(0));
    for (int64_t k = 0; k < K; ++k) {
      const V Jk = X::ld(Z + (1 + S + k) * plane + o, cnt);
      V g = V(T(0));
      if (has_gJ) {
        const V gJ = X::ld(gA + (1 + S + k) * plane + o, cnt);
        acc = acc + d[2] * gJ * Jk;
        g = d[1] * gJ;
      }
      if (p.in_sum[k]) {
        q = q + Jk * Jk;
        g = g + two * d[2] * Jk * gs;
      }
      X::st(gZ + (1 + S + k) * plane + o, g, cnt);
      if (want_AJ) X::st(A + (1 + S + k) * plane + o, d[1] * Jk, cnt);
    }
    acc = acc + gs * (d[2] * s + d[3] * q);
    if (want_A) X::st(A + plane + o, d[1] * s + d[2] * q, cnt);
    X::st(gZ + o, acc, cnt);
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const V Jk = X::ld(Z + (1 + S + k) * plane + o, cnt);
      V g = V(T(0));
      if (has_gJ) {
        const V gJ = X::ld(gA + (1 + S + k) * plane + o, cnt);
        acc = acc + d[2] * gJ * Jk;
        g = d[1] * gJ;
      }
      X::st(gZ + (1 + S + k) * plane + o, g, cnt);
      if (want_AJ) X::st(A + (1 + S + k) * plane + o, d[1] * Jk, cnt);
    }
    for (int64_t r = 0; r < S; ++r) {
      const int64_t jo = (1 + S + p.sel[r]) * plane + o;
      const V gs = X::ld(gA + (1 + r) * plane + o, cnt);
      const V s = X::ld(Z + (1 + r) * plane + o, cnt);
      const V Jd = X::ld(Z + jo, cnt);
      X::st(gZ + (1 + r) * plane + o, d[1] * gs, cnt);
      acc = acc + gs * (d[2] * s + d[3] * Jd * Jd);
      X::st(gZ + jo, X::ld(gZ + jo, cnt) + two * d[2] * Jd * gs, cnt);
      if (want_A) X::st(A + (1 + r) * plane + o, d[1] * s + d[2] * Jd * Jd, cnt);
    }
    X::st(gZ + o, acc, cnt);
  }
}

template <class L, class Act, int MODE>
void mlp_backward_body(const cpu::MlpActJob& p) {
  constexpr int W = L::width;
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.w; j += W)
      mlp_backward_elem<L, Act, MODE>(p, i, j, p.w - j < W ? static_cast<int>(p.w - j) : W);
}

template <class L, bool BACKWARD>
void mlp_entry(const cpu::MlpActJob& p) {
  dispatch_act(static_cast<Act>(p.act), [&](auto tag) {
    using A = decltype(tag);
    const int mode = p.const_J ? kConst : (p.diag ? kDiag : kSum);
    auto go = [&](auto m) {
      constexpr int M = decltype(m)::value;
      if constexpr (BACKWARD)
        mlp_backward_body<L, A, M>(p);
      else
        mlp_forward_body<L, A, M>(p);
    };
    if (mode == kConst)
      go(std::integral_constant<int, kConst>{});
    else if (mode == kDiag)
      go(std::integral_constant<int, kDiag>{});
    else
      go(std::integral_constant<int, kSum>{});
  });
}

template <class LF, class LD>
void add_dropin_kernels(cpu::KernelTable& t);  // the drop-in section at the end of this file
template <class LF, class LD>
void add_jet2_kernels(cpu::KernelTable& t);  // the collapsed jet section after it

template <class LF, class LD>
cpu::KernelTable make_table(cpu::Isa isa, const char* name) {
  cpu::KernelTable t;
  t.isa = isa;
  t.name = name;
  t.derivs[0] = &derivs_entry<LF>;
  t.derivs[1] = &derivs_entry<LD>;
  t.mlp_act_forward[0] = &mlp_entry<LF, false>;
  t.mlp_act_forward[1] = &mlp_entry<LD, false>;
  t.mlp_act_backward[0] = &mlp_entry<LF, true>;
  t.mlp_act_backward[1] = &mlp_entry<LD, true>;
  add_dropin_kernels<LF, LD>(t);
  add_jet2_kernels<LF, LD>(t);
  return t;
}

// ---- the drop-in activations' ops (issue 14): act_grad, mul_pair, mul_pair_backward ------------
// One table evaluation per element, the products in the same pass (csrc/act_ops_impl.h has the
// scalar bodies the CUDA kernels run; these are the same arithmetic on lanes).

template <class L, class Act, int N>
void grad_body(const cpu::GradJob& p, int64_t begin, int64_t end) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  constexpr int W = L::width;
  const T* z = static_cast<const T*>(p.z);
  const T* g = static_cast<const T*>(p.g);
  T* out = static_cast<T*>(p.out);
  const V a = V(static_cast<T>(p.a)), b = V(static_cast<T>(p.b));
  for (int64_t i = begin; i < end; i += W) {
    const int cnt = end - i < W ? static_cast<int>(end - i) : W;
    V d[N + 1];
    Act::template eval<N>(X::ld(z + i, cnt), a, b, d);
    X::st(out + i, X::ld(g + i, cnt) * d[N], cnt);
  }
}

template <class L>
void grad_entry(const cpu::GradJob& p, int64_t begin, int64_t end) {
  dispatch_act(static_cast<Act>(p.act), [&](auto tag) {
    using A = decltype(tag);
    dispatch_order(p.k, [&](auto n) {
      constexpr int N = decltype(n)::value;
      grad_body<L, A, N>(p, begin, end);
    });
  });
}

template <class L>
void mul_pair_entry(const cpu::MulPairJob& p, int64_t begin, int64_t end) {
  using T = typename L::T;
  using X = Lanes<L>;
  constexpr int W = L::width;
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ d1 = static_cast<const T*>(p.d1);
  const T* __restrict__ d2 = static_cast<const T*>(p.d2);
  T* __restrict__ o1 = static_cast<T*>(p.o1);
  T* __restrict__ o2 = static_cast<T*>(p.o2);
  for (int64_t i = begin; i < end; i += W) {
    const int cnt = end - i < W ? static_cast<int>(end - i) : W;
    const auto v = X::ld(w + i, cnt);
    X::st(o1 + i, v * X::ld(d1 + i, cnt), cnt);
    X::st(o2 + i, v * X::ld(g + i, cnt) * X::ld(d2 + i, cnt), cnt);
  }
}

template <class L, bool G1, bool G2>
void mul_pair_backward_body(const cpu::MulPairBackwardJob& p, int64_t begin, int64_t end) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  constexpr int W = L::width;
  const T* __restrict__ g1 = static_cast<const T*>(p.g1);
  const T* __restrict__ g2 = static_cast<const T*>(p.g2);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ d1 = static_cast<const T*>(p.d1);
  const T* __restrict__ d2 = static_cast<const T*>(p.d2);
  const T* __restrict__ d3 = static_cast<const T*>(p.d3);
  T* __restrict__ ow = static_cast<T*>(p.ow);
  T* __restrict__ og = static_cast<T*>(p.og);
  T* __restrict__ oz = static_cast<T*>(p.oz);
  for (int64_t i = begin; i < end; i += W) {
    const int cnt = end - i < W ? static_cast<int>(end - i) : W;
    const V vw = X::ld(w + i, cnt), s2 = X::ld(d2 + i, cnt);
    V a = V(T(0)), zi = V(T(0)), b = V(T(0));
    if constexpr (G1) {
      const V v1 = X::ld(g1 + i, cnt);
      a = v1 * X::ld(d1 + i, cnt);
      zi = v1 * s2;
    }
    if constexpr (G2) {
      const V v2 = X::ld(g2 + i, cnt);
      const V t = v2 * X::ld(g + i, cnt);
      a = G1 ? a + t * s2 : t * s2;
      zi = G1 ? zi + t * X::ld(d3 + i, cnt) : t * X::ld(d3 + i, cnt);
      b = v2 * vw * s2;
    }
    X::st(ow + i, a, cnt);
    X::st(og + i, b, cnt);
    X::st(oz + i, vw * zi, cnt);
  }
}

template <class L>
void mul_pair_backward_entry(const cpu::MulPairBackwardJob& p, int64_t begin, int64_t end) {
  if (p.g1 != nullptr && p.g2 != nullptr)
    mul_pair_backward_body<L, true, true>(p, begin, end);
  else if (p.g1 != nullptr)
    mul_pair_backward_body<L, true, false>(p, begin, end);
  else if (p.g2 != nullptr)
    mul_pair_backward_body<L, false, true>(p, begin, end);
  else
    mul_pair_backward_body<L, false, false>(p, begin, end);
}

template <class LF, class LD>
void add_dropin_kernels(cpu::KernelTable& t) {
  t.mul_pair[0] = &mul_pair_entry<LF>;
  t.mul_pair[1] = &mul_pair_entry<LD>;
  t.mul_pair_backward[0] = &mul_pair_backward_entry<LF>;
  t.mul_pair_backward[1] = &mul_pair_backward_entry<LD>;
  t.grad[0] = &grad_entry<LF>;
  t.grad[1] = &grad_entry<LD>;
}

// ---- the collapsed second-order jet ops (cpu::Jet2Job)
// -------------------------------------------- Each point's value, K first-order rows and summed
// second-order row are read and written in one pass; the sum over the directions is a register
// accumulator.

template <class L>
struct Jet2Ptrs {
  using T = typename L::T;
  static const T* in(const cpu::Jet2Job& p, int i) { return static_cast<const T*>(p.in[i]); }
  static T* out(const cpu::Jet2Job& p, int i) { return static_cast<T*>(p.out[i]); }
  static const T* gout(const cpu::Jet2Job& p, int i) { return static_cast<const T*>(p.gout[i]); }
  static T* gin(const cpu::Jet2Job& p, int i) { return static_cast<T*>(p.gin[i]); }
  static T wt(const cpu::Jet2Job& p, int64_t k) {
    return p.wts == nullptr ? T(1) : static_cast<const T*>(p.wts)[k];
  }
};

template <class L>
void jet2_mul_entry(const cpu::Jet2Job& p, int64_t p0, int64_t p1) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  using P = Jet2Ptrs<L>;
  constexpr int W = L::width;
  const int64_t w = p.w, K = p.K;
  const T *A0 = P::in(p, 0), *A1 = P::in(p, 1), *SA = P::in(p, 2);
  const T *B0 = P::in(p, 3), *B1 = P::in(p, 4), *SB = P::in(p, 5);
  T *Vo = P::out(p, 0), *Y1 = P::out(p, 1), *S = P::out(p, 2);
  for (int64_t i = p0; i < p1; ++i)
    for (int64_t j = 0; j < w; j += W) {
      const int cnt = w - j < W ? static_cast<int>(w - j) : W;
      const int64_t o = i * w + j;
      const V a0 = X::ld(A0 + o, cnt), b0 = X::ld(B0 + o, cnt);
      X::st(Vo + o, a0 * b0, cnt);
      V cross = V(T(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (i * K + k) * w + j;
        const V a1 = X::ld(A1 + r, cnt), b1 = X::ld(B1 + r, cnt);
        X::st(Y1 + r, a0 * b1 + a1 * b0, cnt);
        cross = cross + V(P::wt(p, k)) * (a1 * b1);
      }
      const V s = a0 * X::ld(SB + o, cnt) + b0 * X::ld(SA + o, cnt) + V(T(2)) * cross;
      X::st(S + o, s, cnt);
    }
}

//   ga0 = gv b0 + sum_k gy1_k b1_k + gs sb      gb0 = gv a0 + sum_k gy1_k a1_k + gs sa
//   ga1_k = gy1_k b0 + 2 wts_k gs b1_k           gb1_k = gy1_k a0 + 2 wts_k gs a1_k
//   gsa = gs b0                                  gsb = gs a0
template <class L>
void jet2_mul_backward_entry(const cpu::Jet2Job& p, int64_t p0, int64_t p1) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  using P = Jet2Ptrs<L>;
  constexpr int W = L::width;
  const int64_t w = p.w, K = p.K;
  const T *A0 = P::in(p, 0), *A1 = P::in(p, 1), *SA = P::in(p, 2);
  const T *B0 = P::in(p, 3), *B1 = P::in(p, 4), *SB = P::in(p, 5);
  const T *GV = P::gout(p, 0), *GY1 = P::gout(p, 1), *GS = P::gout(p, 2);
  T *GA0 = P::gin(p, 0), *GA1 = P::gin(p, 1), *GSA = P::gin(p, 2);
  T *GB0 = P::gin(p, 3), *GB1 = P::gin(p, 4), *GSB = P::gin(p, 5);
  const V zero = V(T(0));
  for (int64_t i = p0; i < p1; ++i)
    for (int64_t j = 0; j < w; j += W) {
      const int cnt = w - j < W ? static_cast<int>(w - j) : W;
      const int64_t o = i * w + j;
      const V a0 = X::ld(A0 + o, cnt), b0 = X::ld(B0 + o, cnt);
      const V gv = GV ? X::ld(GV + o, cnt) : zero, gs = GS ? X::ld(GS + o, cnt) : zero;
      V ga0 = gv * b0 + gs * X::ld(SB + o, cnt);
      V gb0 = gv * a0 + gs * X::ld(SA + o, cnt);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (i * K + k) * w + j;
        const V a1 = X::ld(A1 + r, cnt), b1 = X::ld(B1 + r, cnt);
        const V gy1 = GY1 ? X::ld(GY1 + r, cnt) : zero;
        const V t = V(T(2) * P::wt(p, k)) * gs;
        ga0 = ga0 + gy1 * b1;
        gb0 = gb0 + gy1 * a1;
        X::st(GA1 + r, gy1 * b0 + t * b1, cnt);
        X::st(GB1 + r, gy1 * a0 + t * a1, cnt);
      }
      X::st(GA0 + o, ga0, cnt);
      X::st(GB0 + o, gb0, cnt);
      X::st(GSA + o, gs * b0, cnt);
      X::st(GSB + o, gs * a0, cnt);
    }
}

template <class L, class Act>
void jet2_act_body(const cpu::Jet2Job& p, int64_t p0, int64_t p1) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  using P = Jet2Ptrs<L>;
  constexpr int W = L::width;
  const int64_t w = p.w, K = p.K;
  const T *H0 = P::in(p, 0), *H1 = P::in(p, 1), *S = P::in(p, 2);
  T *Y0 = P::out(p, 0), *Y1 = P::out(p, 1), *SY = P::out(p, 2);
  const V pa = V(static_cast<T>(p.a)), pb = V(static_cast<T>(p.b));
  for (int64_t i = p0; i < p1; ++i)
    for (int64_t j = 0; j < w; j += W) {
      const int cnt = w - j < W ? static_cast<int>(w - j) : W;
      const int64_t o = i * w + j;
      V d[3];
      Act::template eval<2>(X::ld(H0 + o, cnt), pa, pb, d);
      X::st(Y0 + o, d[0], cnt);
      V q = V(T(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (i * K + k) * w + j;
        const V h1 = X::ld(H1 + r, cnt);
        X::st(Y1 + r, d[1] * h1, cnt);
        q = q + V(P::wt(p, k)) * (h1 * h1);
      }
      X::st(SY + o, d[2] * q + d[1] * X::ld(S + o, cnt), cnt);
    }
}

//   gh0 = gy0 s1 + s2 sum_k gy1_k h1_k + gsy (s3 q + s2 s),  q = sum_k wts_k h1_k^2
//   gh1_k = gy1_k s1 + 2 wts_k gsy s2 h1_k                    gs = gsy s1
template <class L, class Act>
void jet2_act_backward_body(const cpu::Jet2Job& p, int64_t p0, int64_t p1) {
  using T = typename L::T;
  using V = typename L::V;
  using X = Lanes<L>;
  using P = Jet2Ptrs<L>;
  constexpr int W = L::width;
  const int64_t w = p.w, K = p.K;
  const T *H0 = P::in(p, 0), *H1 = P::in(p, 1), *S = P::in(p, 2);
  const T *GY0 = P::gout(p, 0), *GY1 = P::gout(p, 1), *GSY = P::gout(p, 2);
  T *GH0 = P::gin(p, 0), *GH1 = P::gin(p, 1), *GS = P::gin(p, 2);
  const V pa = V(static_cast<T>(p.a)), pb = V(static_cast<T>(p.b));
  const V zero = V(T(0));
  for (int64_t i = p0; i < p1; ++i)
    for (int64_t j = 0; j < w; j += W) {
      const int cnt = w - j < W ? static_cast<int>(w - j) : W;
      const int64_t o = i * w + j;
      V d[4];
      Act::template eval<3>(X::ld(H0 + o, cnt), pa, pb, d);
      const V gy0 = GY0 ? X::ld(GY0 + o, cnt) : zero, gsy = GSY ? X::ld(GSY + o, cnt) : zero;
      V dot = zero, q = zero;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (i * K + k) * w + j;
        const V h1 = X::ld(H1 + r, cnt);
        const V gy1 = GY1 ? X::ld(GY1 + r, cnt) : zero;
        const V wk = V(P::wt(p, k));
        dot = dot + gy1 * h1;
        q = q + wk * (h1 * h1);
        X::st(GH1 + r, gy1 * d[1] + V(T(2)) * wk * gsy * d[2] * h1, cnt);
      }
      X::st(GH0 + o, gy0 * d[1] + d[2] * dot + gsy * (d[3] * q + d[2] * X::ld(S + o, cnt)), cnt);
      X::st(GS + o, gsy * d[1], cnt);
    }
}

template <class L, bool BACKWARD>
void jet2_act_entry(const cpu::Jet2Job& p, int64_t p0, int64_t p1) {
  dispatch_act(static_cast<Act>(p.act), [&](auto tag) {
    using A = decltype(tag);
    if constexpr (BACKWARD)
      jet2_act_backward_body<L, A>(p, p0, p1);
    else
      jet2_act_body<L, A>(p, p0, p1);
  });
}

template <class LF, class LD>
void add_jet2_kernels(cpu::KernelTable& t) {
  t.jet2_mul[0] = &jet2_mul_entry<LF>;
  t.jet2_mul[1] = &jet2_mul_entry<LD>;
  t.jet2_mul_backward[0] = &jet2_mul_backward_entry<LF>;
  t.jet2_mul_backward[1] = &jet2_mul_backward_entry<LD>;
  t.jet2_act[0] = &jet2_act_entry<LF, false>;
  t.jet2_act[1] = &jet2_act_entry<LD, false>;
  t.jet2_act_backward[0] = &jet2_act_entry<LF, true>;
  t.jet2_act_backward[1] = &jet2_act_entry<LD, true>;
}

}  // namespace THD_ISA_NS
}  // namespace thd
