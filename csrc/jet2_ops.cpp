// The collapsed second-order jet ops of the traced path (torchhessdiag/jet2.py explains them and
// holds their autograd, reference and fake kernels): jet2_mul (the product of two jets) and
// jet2_act (an activation of a jet), forward and backward, CPU kernels (csrc/cpu/kernels.h,
// cpu::Jet2Job). Shapes: a value x0 is (N, *S), its first-order rows x1 (N, K, *S), its summed
// second-order row sx (N, *S); weights (K) or None (all ones).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "cpu/kernels.h"
#include "act_ops_impl.h"

namespace thd {
namespace {

struct Jet2Shape {
  int64_t n, K, w;
};

// x0, x1, sx of one jet: dtype, device (CPU), and shapes as above; returns (N, K, w).
Jet2Shape check_jet(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& sx,
                    const char* names, const char* op, const at::Tensor* like) {
  const at::Tensor* ts[3] = {&x0, &x1, &sx};
  for (const at::Tensor* t : ts) check_input(*t, names, op);
  for (const at::Tensor* t : ts) {
    THD_CHECK_VALUE(t->device().is_cpu(), "torchhessdiag.", op, ": ", names,
                    " must be CPU tensors (the op has CPU kernels only), got ", t->device());
    THD_CHECK_TYPE(t->scalar_type() == x0.scalar_type(), "torchhessdiag.", op, ": ", names,
                   " must share one dtype, got ", x0.scalar_type(), " and ", t->scalar_type());
  }
  THD_CHECK_VALUE(x0.dim() >= 1 && x1.dim() == x0.dim() + 1 && sx.sizes() == x0.sizes(),
                  "torchhessdiag.", op, ": ", names,
                  " must be shaped (N, *S), (N, K, *S), (N, *S), got ", x0.sizes(), ", ",
                  x1.sizes(), ", ", sx.sizes());
  THD_CHECK_VALUE(x1.size(0) == x0.size(0) && x1.sizes().slice(2) == x0.sizes().slice(1),
                  "torchhessdiag.", op, ": ", names,
                  " must be shaped (N, *S), (N, K, *S), (N, *S), got ", x0.sizes(), ", ",
                  x1.sizes(), ", ", sx.sizes());
  if (like != nullptr) {
    THD_CHECK_VALUE(x0.sizes() == like->sizes(), "torchhessdiag.", op,
                    ": the two jets must have one shape, got values ", like->sizes(), " and ",
                    x0.sizes());
    THD_CHECK_TYPE(x0.scalar_type() == like->scalar_type(), "torchhessdiag.", op,
                   ": the two jets must share one dtype, got ", like->scalar_type(), " and ",
                   x0.scalar_type());
  }
  const int64_t n = x0.size(0);
  return {n, x1.size(1), n == 0 ? 0 : x0.numel() / n};
}

at::Tensor check_weights(const c10::optional<at::Tensor>& weights, int64_t K, const at::Tensor& x0,
                         const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const at::Tensor& wt = *weights;
  THD_CHECK_VALUE(wt.dim() == 1 && wt.size(0) == K, "torchhessdiag.", op,
                  ": weights must be a (K,) = (", K, ",) tensor, got shape ", wt.sizes());
  THD_CHECK_TYPE(at::isFloatingType(wt.scalar_type()), "torchhessdiag.", op,
                 ": weights must be floating point, got ", wt.scalar_type());
  return wt.to(x0.options()).contiguous();
}

// Optional gradients: undefined means zero; a defined one must be shaped like its output.
at::Tensor grad_or_none(const c10::optional<at::Tensor>& g, const at::Tensor& like,
                        const char* what, const char* op) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  THD_CHECK_VALUE(g->sizes() == like.sizes(), "torchhessdiag.", op, ": ", what, " must have shape ",
                  like.sizes(), ", got ", g->sizes());
  THD_CHECK_TYPE(g->scalar_type() == like.scalar_type(), "torchhessdiag.", op, ": ", what,
                 " must have dtype ", like.scalar_type(), ", got ", g->scalar_type());
  return g->contiguous();
}

// Points per task: about 32k elements of every row together (at::internal::GRAIN_SIZE).
int64_t grain(const Jet2Shape& s) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.w * (s.K + 2)));
}

template <class Fn>
void run(const Fn& fn, const cpu::Jet2Job& job) {
  const Jet2Shape s{job.n, job.K, job.w};
  at::parallel_for(0, job.n, grain(s), [&](int64_t p0, int64_t p1) { fn(job, p0, p1); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet2_mul_cpu(
    const at::Tensor& a0_, const at::Tensor& a1_, const at::Tensor& sa_, const at::Tensor& b0_,
    const at::Tensor& b1_, const at::Tensor& sb_, const c10::optional<at::Tensor>& weights) {
  const char* op = "jet2_mul";
  const Jet2Shape s = check_jet(a0_, a1_, sa_, "a0, a1, sa", op, nullptr);
  const Jet2Shape sb = check_jet(b0_, b1_, sb_, "b0, b1, sb", op, &a0_);
  THD_CHECK_VALUE(sb.K == s.K, "torchhessdiag.", op, ": a1 and b1 must have one K, got ", s.K,
                  " and ", sb.K);
  const at::Tensor wt = check_weights(weights, s.K, a0_, op);
  const std::array<at::Tensor, 6> in{a0_.contiguous(), a1_.contiguous(), sa_.contiguous(),
                                     b0_.contiguous(), b1_.contiguous(), sb_.contiguous()};
  at::Tensor v = new_output(in[0]), y1 = new_output(in[1]), sy = new_output(in[0]);
  if (s.n * s.w == 0) return {v, y1, sy};
  cpu::Jet2Job job{0,
                   0.0,
                   0.0,
                   s.n,
                   s.K,
                   s.w,
                   wt.defined() ? wt.data_ptr() : nullptr,
                   {},
                   {v.data_ptr(), y1.data_ptr(), sy.data_ptr()},
                   {},
                   {}};
  for (int i = 0; i < 6; ++i) job.in[i] = in[i].data_ptr();
  run(cpu::kernels().jet2_mul[dtype_slot(v.scalar_type())], job);
  return {v, y1, sy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
jet2_mul_backward_cpu(const c10::optional<at::Tensor>& gv, const c10::optional<at::Tensor>& gy1,
                      const c10::optional<at::Tensor>& gs, const at::Tensor& a0_,
                      const at::Tensor& a1_, const at::Tensor& sa_, const at::Tensor& b0_,
                      const at::Tensor& b1_, const at::Tensor& sb_,
                      const c10::optional<at::Tensor>& weights) {
  const char* op = "jet2_mul_backward";
  const Jet2Shape s = check_jet(a0_, a1_, sa_, "a0, a1, sa", op, nullptr);
  const Jet2Shape sb = check_jet(b0_, b1_, sb_, "b0, b1, sb", op, &a0_);
  THD_CHECK_VALUE(sb.K == s.K, "torchhessdiag.", op, ": a1 and b1 must have one K, got ", s.K,
                  " and ", sb.K);
  const at::Tensor wt = check_weights(weights, s.K, a0_, op);
  const std::array<at::Tensor, 6> in{a0_.contiguous(), a1_.contiguous(), sa_.contiguous(),
                                     b0_.contiguous(), b1_.contiguous(), sb_.contiguous()};
  const std::array<at::Tensor, 3> g{grad_or_none(gv, a0_, "gv", op),
                                    grad_or_none(gy1, a1_, "gy1", op),
                                    grad_or_none(gs, a0_, "gs", op)};
  std::array<at::Tensor, 6> gin;
  for (int i = 0; i < 6; ++i) gin[i] = new_output(in[i]);
  if (s.n * s.w > 0) {
    cpu::Jet2Job job{0,  0.0, 0.0, s.n, s.K, s.w, wt.defined() ? wt.data_ptr() : nullptr,
                     {}, {},  {},  {}};
    for (int i = 0; i < 6; ++i) {
      job.in[i] = in[i].data_ptr();
      job.gin[i] = gin[i].data_ptr();
    }
    for (int i = 0; i < 3; ++i) job.gout[i] = g[i].defined() ? g[i].data_ptr() : nullptr;
    run(cpu::kernels().jet2_mul_backward[dtype_slot(in[0].scalar_type())], job);
  }
  return {gin[0], gin[1], gin[2], gin[3], gin[4], gin[5]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet2_act_cpu(
    const at::Tensor& h0_, const at::Tensor& h1_, const at::Tensor& s_, c10::string_view act_name,
    double a, double b, const c10::optional<at::Tensor>& weights) {
  const char* op = "jet2_act";
  const Jet2Shape s = check_jet(h0_, h1_, s_, "h0, h1, s", op, nullptr);
  const Act act = parse_act(act_name);
  check_params(act, a, b);
  const at::Tensor wt = check_weights(weights, s.K, h0_, op);
  const std::array<at::Tensor, 3> in{h0_.contiguous(), h1_.contiguous(), s_.contiguous()};
  at::Tensor y0 = new_output(in[0]), y1 = new_output(in[1]), sy = new_output(in[0]);
  if (s.n * s.w == 0) return {y0, y1, sy};
  cpu::Jet2Job job{static_cast<int>(act),
                   a,
                   b,
                   s.n,
                   s.K,
                   s.w,
                   wt.defined() ? wt.data_ptr() : nullptr,
                   {in[0].data_ptr(), in[1].data_ptr(), in[2].data_ptr()},
                   {y0.data_ptr(), y1.data_ptr(), sy.data_ptr()},
                   {},
                   {}};
  run(cpu::kernels().jet2_act[dtype_slot(y0.scalar_type())], job);
  return {y0, y1, sy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet2_act_backward_cpu(
    const c10::optional<at::Tensor>& gy0, const c10::optional<at::Tensor>& gy1,
    const c10::optional<at::Tensor>& gsy, const at::Tensor& h0_, const at::Tensor& h1_,
    const at::Tensor& s_, c10::string_view act_name, double a, double b,
    const c10::optional<at::Tensor>& weights) {
  const char* op = "jet2_act_backward";
  const Jet2Shape s = check_jet(h0_, h1_, s_, "h0, h1, s", op, nullptr);
  const Act act = parse_act(act_name);
  check_params(act, a, b);
  const at::Tensor wt = check_weights(weights, s.K, h0_, op);
  const std::array<at::Tensor, 3> in{h0_.contiguous(), h1_.contiguous(), s_.contiguous()};
  const std::array<at::Tensor, 3> g{grad_or_none(gy0, h0_, "gy0", op),
                                    grad_or_none(gy1, h1_, "gy1", op),
                                    grad_or_none(gsy, h0_, "gsy", op)};
  at::Tensor gh0 = new_output(in[0]), gh1 = new_output(in[1]), gs = new_output(in[0]);
  if (s.n * s.w == 0) return {gh0, gh1, gs};
  cpu::Jet2Job job{static_cast<int>(act),
                   a,
                   b,
                   s.n,
                   s.K,
                   s.w,
                   wt.defined() ? wt.data_ptr() : nullptr,
                   {in[0].data_ptr(), in[1].data_ptr(), in[2].data_ptr()},
                   {},
                   {},
                   {gh0.data_ptr(), gh1.data_ptr(), gs.data_ptr()}};
  for (int i = 0; i < 3; ++i) job.gout[i] = g[i].defined() ? g[i].data_ptr() : nullptr;
  run(cpu::kernels().jet2_act_backward[dtype_slot(gh0.scalar_type())], job);
  return {gh0, gh1, gs};
}

}  // namespace thd

// Schemas: torchhessdiag/_schemas.py, the one definition (the package defines the ops from it
// before this library is loaded; the kernels below attach to them).

TORCH_LIBRARY_IMPL(torchhessdiag, CPU, m) {
  m.impl("jet2_mul", &thd::jet2_mul_cpu);
  m.impl("jet2_mul_backward", &thd::jet2_mul_backward_cpu);
  m.impl("jet2_act", &thd::jet2_act_cpu);
  m.impl("jet2_act_backward", &thd::jet2_act_backward_cpu);
}
