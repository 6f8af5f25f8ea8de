// Faa di Bruno's formula for an elementwise function of a Taylor jet, orders 1..4: the per-element
// arithmetic of the taylor_act op (csrc/taylor_ops.cpp, csrc/cuda/taylor_ops.cu), shared by the
// CPU and the CUDA kernels and mirrored line by line by reference.taylor_act (tests hold them
// together).
//
// Along one direction v, h(t) = h(x + t v) has derivative coefficients h_k = d^k h / dt^k at 0
// ("derivative form", not divided by k!). For y = sigma(h) with d_j = sigma^(j)(h_0):
//
//   y1 = d1 h1
//   y2 = d2 h1^2 + d1 h2
//   y3 = d3 h1^3 + 3 d2 h1 h2 + d1 h3
//   y4 = d4 h1^4 + 6 d3 h1^2 h2 + d2 (3 h2^2 + 4 h1 h3) + d1 h4
//
// The derivatives d_j come from the derivative table (csrc/activations.h) in one pass per (point,
// unit) -- this file holds no activation formula and no transcendental function, so the per-
// (point, direction, unit) work is a few multiply-adds.
#pragma once

#include "activations.h"  // THD_HD

namespace thd {

constexpr int kMaxTaylorOrder = 4;

// y[0..n-1] = orders 1..n of sigma(h) from d[0..n-1] = sigma^(1..n)(h0), h[0..n-1] = h1..hn.
template <int N, typename T>
THD_HD void taylor_forward(const T* d, const T* h, T* y) {
  const T h1 = h[0];
  y[0] = d[0] * h1;
  if constexpr (N >= 2) {
    const T h2 = h[1];
    y[1] = d[1] * h1 * h1 + d[0] * h2;
    if constexpr (N >= 3) {
      const T h3 = h[2];
      y[2] = d[2] * h1 * h1 * h1 + T(3) * d[1] * h1 * h2 + d[0] * h3;
      if constexpr (N >= 4) {
        const T h4 = h[3];
        y[3] = d[3] * h1 * h1 * h1 * h1 + T(6) * d[2] * h1 * h1 * h2 +
               d[1] * (T(3) * h2 * h2 + T(4) * h1 * h3) + d[0] * h4;
      }
    }
  }
}

// The vector-Jacobian product of taylor_forward: given g[0..n-1] = dL/dy, *adds* dL/dd into
// gd[0..n-1] and *writes* dL/dh into gh[0..n-1].
template <int N, typename T>
THD_HD void taylor_backward(const T* g, const T* d, const T* h, T* gd, T* gh) {
  const T h1 = h[0];
  const T g1 = g[0];
  gd[0] += g1 * h1;
  T gh1 = g1 * d[0];
  if constexpr (N == 1) {
    gh[0] = gh1;
  } else {
    const T h2 = h[1], g2 = g[1];
    gd[0] += g2 * h2;
    gd[1] += g2 * h1 * h1;
    gh1 += g2 * T(2) * d[1] * h1;
    T gh2 = g2 * d[0];
    if constexpr (N == 2) {
      gh[0] = gh1;
      gh[1] = gh2;
    } else {
      const T h3 = h[2], g3 = g[2];
      gd[0] += g3 * h3;
      gd[1] += g3 * T(3) * h1 * h2;
      gd[2] += g3 * h1 * h1 * h1;
      gh1 += g3 * (T(3) * d[2] * h1 * h1 + T(3) * d[1] * h2);
      gh2 += g3 * T(3) * d[1] * h1;
      T gh3 = g3 * d[0];
      if constexpr (N == 3) {
        gh[0] = gh1;
        gh[1] = gh2;
        gh[2] = gh3;
      } else {
        const T h4 = h[3], g4 = g[3];
        gd[0] += g4 * h4;
        gd[1] += g4 * (T(3) * h2 * h2 + T(4) * h1 * h3);
        gd[2] += g4 * T(6) * h1 * h1 * h2;
        gd[3] += g4 * h1 * h1 * h1 * h1;
        gh1 += g4 * (T(4) * d[3] * h1 * h1 * h1 + T(12) * d[2] * h1 * h2 + T(4) * d[1] * h3);
        gh2 += g4 * (T(6) * d[2] * h1 * h1 + T(6) * d[1] * h2);
        gh3 += g4 * T(4) * d[1] * h1;
        gh[0] = gh1;
        gh[1] = gh2;
        gh[2] = gh3;
        gh[3] = g4 * d[0];
      }
    }
  }
}

// Calls f(std::integral_constant<int, n>) for a runtime order n in 1..kMaxTaylorOrder.
template <typename F>
inline void dispatch_taylor_order(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: break;
  }
}

}  // namespace thd
