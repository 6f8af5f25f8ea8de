"""Schemas of the torchhessdiag ops: their one definition.

``_backend`` defines the ops from these strings before it loads the compiled extension, whose
kernels (CPU, CUDA, and the C++ autograd) register for them by name (csrc/*.cpp hold no schema);
without the extension the pure-PyTorch reference kernels serve the same ops.
"""

SCHEMAS = {
    "act_forward": "act_forward(Tensor z, str act, float a, float b) -> Tensor",
    "act_derivatives": "act_derivatives(Tensor z, str act, float a, float b, int[] orders) -> Tensor",
    "act_grad": "act_grad(Tensor g, Tensor z, str act, float a, float b, int k) -> Tensor",
    "mul_pair": "mul_pair(Tensor w, Tensor g, Tensor d1, Tensor d2) -> (Tensor, Tensor)",
    "mul_pair_backward": (
        "mul_pair_backward(Tensor? g1, Tensor? g2, Tensor w, Tensor g, Tensor d1, Tensor d2, "
        "Tensor d3) -> (Tensor, Tensor, Tensor)"
    ),
    "act_beyond_table": "act_beyond_table(Tensor z, str act, float a, float b, int n) -> Tensor",
    "jet_layer": "jet_layer(Tensor J, Tensor s1, Tensor c, bool need_ja) -> (Tensor, Tensor)",
    "jet_layer_": "jet_layer_(Tensor(a!) J, Tensor s1, Tensor c) -> Tensor",
    "jet_layer_backward": (
        "jet_layer_backward(Tensor? gJa, Tensor gacc, Tensor J, Tensor s1, Tensor c)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    "taylor_act": "taylor_act(Tensor D, Tensor H) -> Tensor",
    "taylor_act_backward": "taylor_act_backward(Tensor gY, Tensor D, Tensor H) -> (Tensor, Tensor)",
    "jet2_mul": (
        "jet2_mul(Tensor a0, Tensor a1, Tensor sa, Tensor b0, Tensor b1, Tensor sb, "
        "Tensor? weights) -> (Tensor, Tensor, Tensor)"
    ),
    "jet2_mul_backward": (
        "jet2_mul_backward(Tensor? gv, Tensor? gy1, Tensor? gs, Tensor a0, Tensor a1, "
        "Tensor sa, Tensor b0, Tensor b1, Tensor sb, Tensor? weights) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "jet2_act": (
        "jet2_act(Tensor h0, Tensor h1, Tensor s, str act, float a, float b, Tensor? weights) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "jet2_act_backward": (
        "jet2_act_backward(Tensor? gy0, Tensor? gy1, Tensor? gsy, Tensor h0, Tensor h1, "
        "Tensor s, str act, float a, float b, Tensor? weights) -> (Tensor, Tensor, Tensor)"
    ),
    "mlp_jet": (
        "mlp_jet(Tensor x, Tensor[] weights, Tensor[] biases, int[] acts, float[] act_a, "
        "float[] act_b, Tensor? V, int[] axes, int[] sel, bool diag, bool grad_rows, int chunk, "
        "bool save) -> (Tensor, Tensor[])"
    ),
    "mlp_jet_backward": (
        "mlp_jet_backward(Tensor gout, Tensor x, Tensor[] weights, Tensor[] biases, int[] acts, "
        "float[] act_a, float[] act_b, Tensor? V, int[] axes, int[] sel, bool diag, "
        "bool grad_rows, int chunk, Tensor[] saved, bool need_gx) -> (Tensor, Tensor[], Tensor[])"
    ),
}
