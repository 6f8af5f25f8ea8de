// Autograd of the activation ops (act_forward, act_grad, act_derivatives) in C++, at the Autograd
// dispatch key: no Python runs per backward node. This is what makes the torchhessdiag.nn
// drop-ins cheap inside nested torch.autograd.grad loops (issue 14).
//
// Included once, by csrc/act_ops.cpp (which defines the ops).
//
// The graph of one activation y = sigma(z):
//
//   act_forward  ->  ActNode          (input z)          backward: g sigma'(z)
//   act_grad     ->  GradNode(k)      (inputs g, z)      value g sigma^(k)(z)
//                                                        backward: (w sigma^(k), w g sigma^(k+1))
//   (act_grad's backward, recorded) -> GradBackwardNode(k) (inputs gg, g, z)
//                                     value (gg sigma^(k), gg g sigma^(k+1)): the fused double
//                                     backward, one mul_pair pass on the kept derivatives
//   act_derivatives -> DerivsNode     (input z)          value sigma^(orders)(z)
//
// Every node of one activation shares one ActState: the saved z and the derivatives
// sigma^(k)(z) evaluated so far, without a graph. A nested-autograd loop visits the nodes of an
// activation once per input dimension; the table is evaluated once (sigma', sigma'', sigma''' in
// one pass, at the first backward that records a graph, i.e. the create_graph=True gradient), and
// every later visit is arithmetic on the saved derivatives: g sigma' (one ATen mul) for ActNode,
// the fused mul_pair kernel for GradNode, mul_pair_backward for GradBackwardNode. (Not in the
// forward pass: sigma itself comes from ATen's own kernel so that outputs stay bit-identical to
// torch.nn, and a forward without a second backward -- inference, or plain training -- would pay
// for derivatives it never uses.) ReLU, LeakyReLU, Identity keep nothing (sigma'' = 0; g sigma'
// is the fused act_grad pass); exp's derivatives are its output.
//
// Measured (thread CPU time, 1 thread, d = 2, 3x32, N = 512, float32, nested-autograd Laplacian
// vs torch.nn): this C++ autograd took the drop-ins from 0.48x to 0.94x (tanh, training step) and
// 0.72x to 1.48x (SiLU) of torch.nn's speed, where the Python register_autograd wrapper per node
// had made them slower than torch.nn.
//
// When a backward is itself recorded (create_graph=True, or any input requiring grad with grad
// mode on), it does not do plain arithmetic: it builds the next node of this family (GradNode,
// GradBackwardNode), whose value uses the same saved derivatives and whose backward again knows
// sigma^(k+1), sigma^(k+2): every order stays differentiable and exact. Past the table
// (order > 4) the derivative comes from the op act_beyond_table (Python, CompositeImplicitAutograd:
// exact nested autograd, see torchhessdiag/ops.py), which records its own graph.
//
// Everything a node computes goes through dispatcher ops (ATen's, ours below autograd), so
// FakeTensor / AOTAutograd tracing (torch.compile, opcheck) sees ordinary ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <atomic>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "act_ops_impl.h"

namespace thd {
namespace ag {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// ---- the ops, through the dispatcher
// -------------------------------------------------------------

using ForwardSig = at::Tensor(const at::Tensor&, c10::string_view, double, double);
using DerivsSig = at::Tensor(const at::Tensor&, c10::string_view, double, double, at::IntArrayRef);
using GradSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double, double,
                           int64_t);
using MulPairSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&);
using MulPairBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BeyondSig = at::Tensor(const at::Tensor&, c10::string_view, double, double, int64_t);

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
inline const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto h = find_op<ForwardSig>("torchhessdiag::act_forward");
  return h;
}
inline const c10::TypedOperatorHandle<DerivsSig>& derivs_op() {
  static const auto h = find_op<DerivsSig>("torchhessdiag::act_derivatives");
  return h;
}
inline const c10::TypedOperatorHandle<GradSig>& grad_op() {
  static const auto h = find_op<GradSig>("torchhessdiag::act_grad");
  return h;
}
inline const c10::TypedOperatorHandle<MulPairSig>& mul_pair_op() {
  static const auto h = find_op<MulPairSig>("torchhessdiag::mul_pair");
  return h;
}
inline const c10::TypedOperatorHandle<MulPairBackwardSig>& mul_pair_backward_op() {
  static const auto h = find_op<MulPairBackwardSig>("torchhessdiag::mul_pair_backward");
  return h;
}
inline const c10::TypedOperatorHandle<BeyondSig>& beyond_op() {
  static const auto h = find_op<BeyondSig>("torchhessdiag::act_beyond_table");
  return h;
}

// Nothing below autograd records a graph: the kernels themselves run there.
using Below = at::AutoDispatchBelowADInplaceOrView;

inline bool any_requires_grad(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

inline at::Tensor add_opt(const at::Tensor& x, const at::Tensor& y) {
  if (!x.defined()) return y;
  if (!y.defined()) return x;
  return at::add(x, y);
}

// ---- forward-mode AD
// ------------------------------------------------------------------------------ Tangents
// (torch.autograd.forward_ad, torch.func.jvp) at level 0, as torch's generated kernels set them:
// computed from the primals with the ops themselves (with autograd, so a tangent is differentiable
// in reverse mode too). A backward node that meets a dual tensor (forward-over- reverse) does not
// use its kept derivatives, which carry no tangent: it calls the ops, whose autograd kernels set
// the tangents.

inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }
inline bool any_tangent(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (has_tangent(*t)) return true;
  return false;
}
inline at::Tensor primal(const at::Tensor& t) { return has_tangent(t) ? t._fw_primal(0) : t; }

// w sigma^(k)(z) through the ops, with autograd and forward AD (past the table: the composite op)
inline at::Tensor grad_through_op(const at::Tensor& w, const at::Tensor& z, c10::string_view act,
                                  double a, double b, int64_t k) {
  if (k <= kMaxOrder) return grad_op().call(w, z, act, a, b, k);
  return at::mul(w, beyond_op().call(z, act, a, b, k));
}

// ---- the piecewise-linear warning (once per process and activation)
// ------------------------------

inline std::atomic<bool>* pwl_warned() {
  static std::atomic<bool> flags[static_cast<int>(Act::kCount)];
  return flags;
}

inline void reset_piecewise_linear_warnings() {
  for (int i = 0; i < static_cast<int>(Act::kCount); ++i) pwl_warned()[i].store(false);
}

inline void warn_piecewise_linear(Act act) {
  if (!act_info(act).piecewise_linear) return;
  if (pwl_warned()[static_cast<int>(act)].exchange(true)) return;
  // verbatim: the message as the Python backend words it, without torch's "Triggered internally
  // at <source path>" suffix
  ::c10::warn(::c10::Warning(
      ::c10::UserWarning(),
      ::c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
      std::string("torchhessdiag: second and higher derivatives of ") + act_info(act).name +
          " are exactly 0 -- it is piecewise linear, and its true second derivative is a Dirac "
          "delta at 0 that no autograd can see. A network built only from such activations has "
          "a zero Hessian (and Laplacian) almost everywhere; use a smooth activation (Tanh, "
          "SiLU, GELU, Softplus) where second derivatives matter, e.g. in a PDE loss.",
      /*verbatim=*/true));
}

// ---- the state shared by the nodes of one activation
// ---------------------------------------------

struct ActState {
  ActState(const at::Tensor& z, Act act_, double a_, double b_)
      : z_(z, /*is_output=*/false), act(act_), a(a_), b(b_) {}

  const char* name() const { return act_info(act).name; }
  // z, with its autograd history (checks that it was not modified in place since)
  at::Tensor z() const { return z_.unpack(); }

  // ReLU, LeakyReLU, Identity: every derivative of order >= 2 is identically 0. Those products
  // are zeros without a graph (as torch's own threshold_backward gives them): nothing to
  // evaluate, no node, and no work in any later backward.
  bool zero_from_2() const { return act_info(act).piecewise_linear || act_info(act).linear; }

  // exp: every derivative is the forward's output y (ATen's exp(z), within an ulp of the
  // table's), so no table pass is needed at all. Kept without its autograd history (no
  // reference cycle through the node) and with y's version, to refuse an in-place change of y
  // as torch's ExpBackward0 does.
  void keep_output(const at::Tensor& y) {
    y_ = y.detach();
    y_version_ = y_._version();
  }
  const at::Tensor& output() const {
    TORCH_CHECK(y_._version() == y_version_,
                "one of the variables needed for gradient computation has been modified by an "
                "inplace operation: the output of a torchhessdiag.nn.Exp (ThdActivationBackward) "
                "is at version ",
                y_._version(), "; expected version ", y_version_, " instead.");
    return y_;
  }

  // sigma^(k)(z) for k in ks, without a graph. Orders of the table (<= 4) not evaluated yet are
  // evaluated together, in one pass of the table; higher ones by the exact composite path.
  std::vector<at::Tensor> derivs(std::initializer_list<int> ks) {
    if (y_.defined()) return std::vector<at::Tensor>(ks.size(), output());
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t> missing;
    for (int k : ks) {
      if (k >= static_cast<int>(d_.size())) d_.resize(k + 1);
      if (!d_[k].defined() && k <= kMaxOrder) {
        bool dup = false;
        for (int64_t m : missing) dup = dup || m == k;
        if (!dup) missing.push_back(k);
      }
    }
    if (!missing.empty()) {
      const at::Tensor zz = z();
      at::Tensor D;
      {
        Below below;
        D = derivs_op().call(zz, name(), a, b, missing);
      }
      for (size_t j = 0; j < missing.size(); ++j) d_[missing[j]] = D.select(0, j);
    }
    std::vector<at::Tensor> out;
    out.reserve(ks.size());
    for (int k : ks) {
      if (!d_[k].defined()) {  // beyond the table: nested autograd of torch's function, no graph
        at::NoGradGuard no_grad;
        d_[k] = beyond_op().call(z(), name(), a, b, k);
      }
      out.push_back(d_[k]);
    }
    return out;
  }

  // w sigma^(k)(z) without a graph. ReLU, LeakyReLU, Identity: sigma' is a compare, so the fused
  // act_grad pass (one read of z and w) costs what a product with a kept sigma' would, and keeps
  // nothing; the product is one multiply by 0, 1 or the slope either way, so every visit gives
  // the same bits. Others: the product with the kept derivative.
  at::Tensor plain_product(const at::Tensor& w, int k);

  SavedVariable z_;
  const Act act;
  const double a, b;

 private:
  std::mutex mu_;
  std::vector<at::Tensor> d_;  // d_[k] = sigma^(k)(z), once evaluated
  at::Tensor y_;               // exp only (keep_output)
  int64_t y_version_ = 0;
};

using StatePtr = std::shared_ptr<ActState>;

inline void check_state(const StatePtr& s) {
  TORCH_CHECK(s != nullptr, torch::autograd::ERR_BACKWARD_TWICE);
}

// w * sigma^(k)(z), differentiable (when grad mode is on and w or z requires grad) to any order.
at::Tensor times_deriv(const at::Tensor& w, const StatePtr& s, int k);
// (w sigma^(k)(z), w g sigma^(k+1)(z)), differentiable in the same way.
std::tuple<at::Tensor, at::Tensor> times_deriv_pair(const at::Tensor& w, const at::Tensor& g,
                                                    const StatePtr& s, int k);

// ---- nodes
// ---------------------------------------------------------------------------------------

// y = sigma(z) (act_forward); input 0: z.
struct ActNode final : Node {
  using Node::Node;
  StatePtr st;
  std::string name() const override { return "ThdActivationBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    st.reset();
  }
  variable_list apply(variable_list&& grads) override {
    StatePtr s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s = st;
    }
    check_state(s);
    variable_list out(1);
    const at::Tensor& gy = grads[0];
    if (!gy.defined() || !task_should_compute_output(0)) return out;
    const at::Tensor z = s->z();
    if (any_tangent({&gy, &z})) {
      out[0] = grad_through_op(gy, z, s->name(), s->a, s->b, 1);
      return out;
    }
    // (the graph-free product is always g * the kept sigma': a fused g sigma'(z) pass could round
    // sigma' differently from the kept one, and a backward run twice must give the same bits)
    out[0] = times_deriv(gy, s, 1);
    return out;
  }
};

// out = g sigma^(k)(z) (act_grad); inputs 0: g, 1: z.
struct GradNode final : Node {
  using Node::Node;
  StatePtr st;
  SavedVariable g_;
  int k = 1;
  std::string name() const override { return "ThdActGradBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    st.reset();
    g_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    StatePtr s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s = st;
    }
    check_state(s);
    variable_list out(2);
    const at::Tensor& go = grads[0];
    const bool need_g = task_should_compute_output(0), need_z = task_should_compute_output(1);
    if (!go.defined() || !(need_g || need_z)) return out;
    if (need_z) warn_piecewise_linear(s->act);
    const at::Tensor z = s->z();
    if (s->zero_from_2() && k >= 1) {  // d z = go g sigma^(k+1) = 0 (g is not even kept)
      if (need_g)
        out[0] = any_tangent({&go, &z}) ? grad_through_op(go, z, s->name(), s->a, s->b, k)
                                        : times_deriv(go, s, k);
      if (need_z) out[1] = at::zeros_like(z, at::MemoryFormat::Contiguous);
      return out;
    }
    const at::Tensor g = g_.unpack();
    if (any_tangent({&go, &g, &z})) {
      if (need_g) out[0] = grad_through_op(go, z, s->name(), s->a, s->b, k);
      if (need_z) out[1] = grad_through_op(at::mul(go, g), z, s->name(), s->a, s->b, k + 1);
      return out;
    }
    if (any_requires_grad({&go, &g, &z})) {  // this backward is recorded: differentiable nodes
      if (need_g && need_z) {
        std::tie(out[0], out[1]) = times_deriv_pair(go, g, s, k);
      } else if (need_g) {
        out[0] = times_deriv(go, s, k);
      } else {
        out[1] = times_deriv(at::mul(go, g), s, k + 1);
      }
      return out;
    }
    if (need_g && need_z) {
      const auto D = s->derivs({k, k + 1});
      Below below;
      std::tie(out[0], out[1]) = mul_pair_op().call(go, g, D[0], D[1]);
    } else if (need_g) {
      out[0] = s->plain_product(go, k);
    } else {
      out[1] = at::mul(at::mul(go, g), s->derivs({k + 1})[0]);
    }
    return out;
  }
};

// (o1, o2) = (gg sigma^(k)(z), gg g sigma^(k+1)(z)), the recorded backward of GradNode; inputs
// gg, g, z.
//   d gg = g1 sigma^(k) + g2 g sigma^(k+1)
//   d g  = g2 gg sigma^(k+1)
//   d z  = g1 gg sigma^(k+1) + g2 gg g sigma^(k+2)
struct GradBackwardNode final : Node {
  using Node::Node;
  StatePtr st;
  SavedVariable gg_, g_;
  int k = 1;
  std::string name() const override { return "ThdActGradBackwardBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    st.reset();
    gg_.reset_data();
    g_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    StatePtr s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s = st;
    }
    check_state(s);
    variable_list out(3);
    const at::Tensor& g1 = grads[0];
    const at::Tensor& g2 = grads[1];
    const bool need_gg = task_should_compute_output(0), need_g = task_should_compute_output(1),
               need_z = task_should_compute_output(2);
    if (!(g1.defined() || g2.defined()) || !(need_gg || need_g || need_z)) return out;
    if (need_z) warn_piecewise_linear(s->act);
    const at::Tensor gg = gg_.unpack(), g = g_.unpack();
    const at::Tensor z = s->z();
    at::Tensor d_gg, d_g, d_z;
    if (any_tangent({&g1, &g2, &gg, &g, &z})) {
      auto op = [&](const at::Tensor& w, int64_t j) {
        return grad_through_op(w, z, s->name(), s->a, s->b, j);
      };
      if (g1.defined()) {
        if (need_gg) d_gg = op(g1, k);
        if (need_z) d_z = op(at::mul(g1, gg), k + 1);
      }
      if (g2.defined()) {
        const at::Tensor t = at::mul(g2, g);
        if (need_gg) d_gg = add_opt(d_gg, op(t, k + 1));
        if (need_z) d_z = add_opt(d_z, op(at::mul(t, gg), k + 2));
        if (need_g) d_g = op(at::mul(g2, gg), k + 1);
      }
    } else if (any_requires_grad({&g1, &g2, &gg, &g, &z})) {
      if (g1.defined()) {  // (g1 sigma^(k), g1 gg sigma^(k+1))
        if (need_gg && need_z) {
          std::tie(d_gg, d_z) = times_deriv_pair(g1, gg, s, k);
        } else if (need_gg) {
          d_gg = times_deriv(g1, s, k);
        } else if (need_z) {
          d_z = times_deriv(at::mul(g1, gg), s, k + 1);
        }
      }
      if (g2.defined()) {  // (g2 g sigma^(k+1), g2 g gg sigma^(k+2)) and g2 gg sigma^(k+1)
        if (need_gg || need_z) {
          const at::Tensor t = at::mul(g2, g);
          at::Tensor u, v;
          if (need_gg && need_z) {
            std::tie(u, v) = times_deriv_pair(t, gg, s, k + 1);
          } else if (need_gg) {
            u = times_deriv(t, s, k + 1);
          } else {
            v = times_deriv(at::mul(t, gg), s, k + 2);
          }
          d_gg = add_opt(d_gg, u);
          d_z = add_opt(d_z, v);
        }
        if (need_g) d_g = times_deriv(at::mul(g2, gg), s, k + 1);
      }
    } else {  // one fused pass (mul_pair_backward) on the kept derivatives
      const auto D = s->derivs({k, k + 1, k + 2});
      Below below;
      std::tie(d_gg, d_g, d_z) = mul_pair_backward_op().call(
          g1.defined() ? c10::optional<at::Tensor>(g1) : c10::nullopt,
          g2.defined() ? c10::optional<at::Tensor>(g2) : c10::nullopt, gg, g, D[0], D[1], D[2]);
      if (!g2.defined()) d_g = at::Tensor();  // zeros: no gradient reached o2
    }
    out[0] = need_gg ? d_gg : at::Tensor();
    out[1] = need_g ? d_g : at::Tensor();
    out[2] = need_z ? d_z : at::Tensor();
    return out;
  }
};

// D = stack(sigma^(o)(z) for o in orders) (act_derivatives); input z.
//   d z = sum_j gD[j] sigma^(o_j + 1)(z)
struct DerivsNode final : Node {
  using Node::Node;
  StatePtr st;
  std::vector<int64_t> orders;
  std::string name() const override { return "ThdActDerivativesBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    st.reset();
  }
  variable_list apply(variable_list&& grads) override {
    StatePtr s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s = st;
    }
    check_state(s);
    variable_list out(1);
    const at::Tensor& gD = grads[0];
    if (!gD.defined() || !task_should_compute_output(0)) return out;
    const at::Tensor z = s->z();
    const bool dual = any_tangent({&gD, &z});
    const bool graph = any_requires_grad({&gD, &z});
    at::Tensor dz;
    for (size_t j = 0; j < orders.size(); ++j) {
      const int up = static_cast<int>(orders[j]) + 1;
      const at::Tensor gj = gD.select(0, static_cast<int64_t>(j));
      if (dual) {
        dz = add_opt(dz, grad_through_op(gj, z, s->name(), s->a, s->b, up));
      } else if (graph) {
        dz = add_opt(dz, times_deriv(gj, s, up));
      } else {
        const at::Tensor d = s->derivs({up})[0];
        dz = dz.defined() ? at::addcmul(dz, gj, d) : at::mul(gj, d);
      }
    }
    out[0] = dz;
    return out;
  }
};

// ---- making nodes
// --------------------------------------------------------------------------------

template <class N>
c10::intrusive_ptr<N> new_node(torch::autograd::edge_list&& edges) {
  return c10::make_intrusive<N>(std::move(edges));
}

inline at::Tensor make_grad_node(const at::Tensor& w, const at::Tensor& z, const StatePtr& s, int k,
                                 const at::Tensor* value = nullptr) {
  at::Tensor out;
  if (value != nullptr) {
    out = *value;
  } else if (s->zero_from_2()) {
    Below below;
    out = s->plain_product(w, k);
  } else {
    // sigma^(k+1) too, in the same pass: the node's backward needs it. For the first-order node
    // (k = 1, made by the first create_graph backward through act_forward) sigma''' as well: a
    // backward of that backward (a training step through a nested-autograd loss) needs it, and
    // one more output of the table pass costs ~5 % of the pass (tanh, silu, sigmoid: 65536
    // doubles, 300 -> 313 us) where a second pass later would cost all of it.
    const auto D = k == 1               ? s->derivs({1, 2, 3})
                   : k + 1 <= kMaxOrder ? s->derivs({k, k + 1})
                                        : s->derivs({k});
    Below below;
    out = at::mul(w, D[0]);
  }
  auto node = new_node<GradNode>(torch::autograd::collect_next_edges(w, z));
  node->st = s;
  // (ReLU & co: the backward never reads g -- d z = 0 -- so it is not kept alive)
  if (!(s->zero_from_2() && k >= 1)) node->g_ = SavedVariable(w, /*is_output=*/false);
  node->k = k;
  torch::autograd::set_history(out, node);
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> make_grad_backward_node(const at::Tensor& w,
                                                                  const at::Tensor& g,
                                                                  const at::Tensor& z,
                                                                  const StatePtr& s, int k) {
  at::Tensor a1, a2;
  {
    const auto D = s->derivs({k, k + 1});
    Below below;
    std::tie(a1, a2) = mul_pair_op().call(w, g, D[0], D[1]);
  }
  auto node = new_node<GradBackwardNode>(torch::autograd::collect_next_edges(w, g, z));
  node->st = s;
  node->gg_ = SavedVariable(w, /*is_output=*/false);
  node->g_ = SavedVariable(g, /*is_output=*/false);
  node->k = k;
  torch::autograd::set_history(a1, node);
  torch::autograd::set_history(a2, node);
  return {a1, a2};
}

inline at::Tensor times_deriv(const at::Tensor& w, const StatePtr& s, int k) {
  if (s->zero_from_2() && k >= 2) return at::zeros_like(w, at::MemoryFormat::Contiguous);
  const at::Tensor z = s->z();
  if (any_requires_grad({&w, &z})) {
    if (k <= kMaxOrder) return make_grad_node(w, z, s, k);
    // beyond the table: the composite op records its own (exact) graph
    return at::mul(w, beyond_op().call(z, s->name(), s->a, s->b, k));
  }
  return s->plain_product(w, k);
}

inline at::Tensor ActState::plain_product(const at::Tensor& w, int k) {
  if (zero_from_2() && k >= 2) return at::zeros_like(w, at::MemoryFormat::Contiguous);
  if (zero_from_2()) {
    Below below;
    return grad_op().call(w, z(), name(), a, b, k);
  }
  return at::mul(w, derivs({k})[0]);
}

inline std::tuple<at::Tensor, at::Tensor> times_deriv_pair(const at::Tensor& w, const at::Tensor& g,
                                                           const StatePtr& s, int k) {
  if (s->zero_from_2() && k + 1 >= 2)
    return {times_deriv(w, s, k), at::zeros_like(w, at::MemoryFormat::Contiguous)};
  const at::Tensor z = s->z();
  if (any_requires_grad({&w, &g, &z})) {
    if (k + 1 <= kMaxOrder) return make_grad_backward_node(w, g, z, s, k);
    return {times_deriv(w, s, k), times_deriv(at::mul(w, g), s, k + 1)};
  }
  const auto D = s->derivs({k, k + 1});
  Below below;
  return mul_pair_op().call(w, g, D[0], D[1]);
}

// ---- the Autograd kernels of the ops
// -------------------------------------------------------------

inline at::Tensor act_forward_autograd(const at::Tensor& z, c10::string_view act_name, double a,
                                       double b) {
  at::Tensor y;
  {
    Below below;
    y = forward_op().call(z, act_name, a, b);
  }
  if (has_tangent(z)) {  // y' = sigma'(z) z'
    const at::Tensor t = grad_through_op(z._fw_grad(0), primal(z), act_name, a, b, 1);
    y._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (!any_requires_grad({&z})) return y;
  auto s = std::make_shared<ActState>(z, parse_act(act_name), a, b);
  if (s->act == Act::Exp) s->keep_output(y);
  auto node = new_node<ActNode>(torch::autograd::collect_next_edges(z));
  node->st = std::move(s);
  torch::autograd::set_history(y, node);
  return y;
}

inline at::Tensor act_grad_autograd(const at::Tensor& g, const at::Tensor& z,
                                    c10::string_view act_name, double a, double b, int64_t k) {
  at::Tensor out;
  {
    Below below;  // checks the arguments
    out = grad_op().call(g, z, act_name, a, b, k);
  }
  if (any_tangent({&g, &z})) {  // out' = g' sigma^(k)(z) + g sigma^(k+1)(z) z'
    const at::Tensor zp = primal(z);
    at::Tensor t;
    if (has_tangent(g)) t = grad_through_op(g._fw_grad(0), zp, act_name, a, b, k);
    if (has_tangent(z))
      t = add_opt(t, grad_through_op(at::mul(primal(g), z._fw_grad(0)), zp, act_name, a, b, k + 1));
    out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (!any_requires_grad({&g, &z})) return out;
  auto s = std::make_shared<ActState>(z, parse_act(act_name), a, b);
  return make_grad_node(g, z, s, static_cast<int>(k), &out);
}

inline at::Tensor act_derivatives_autograd(const at::Tensor& z, c10::string_view act_name, double a,
                                           double b, at::IntArrayRef orders) {
  at::Tensor D;
  {
    Below below;
    D = derivs_op().call(z, act_name, a, b, orders);
  }
  if (has_tangent(z)) {  // D[j]' = sigma^(orders[j] + 1)(z) z'
    std::vector<at::Tensor> ts;
    for (int64_t o : orders)
      ts.push_back(grad_through_op(z._fw_grad(0), primal(z), act_name, a, b, o + 1));
    D._set_fw_grad(at::stack(ts), /*level=*/0, /*is_inplace_op=*/false);
  }
  if (!any_requires_grad({&z})) return D;
  auto node = new_node<DerivsNode>(torch::autograd::collect_next_edges(z));
  node->st = std::make_shared<ActState>(z, parse_act(act_name), a, b);
  node->orders = orders.vec();
  torch::autograd::set_history(D, node);
  return D;
}

}  // namespace ag
}  // namespace thd
