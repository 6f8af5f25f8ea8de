"""Engine benchmark: Laplacian and Hessian diagonal of an MLP, torchhessdiag vs the alternatives.

Methods, all in one process, on the same weights and inputs:

* ``thd.mlp_laplacian`` / ``thd.mlp_hessian_diag`` (inference under torch.no_grad);
* nested autograd: one ``grad(create_graph=True)``, then one backward per input dimension (gives
  the Hessian diagonal, and the Laplacian as its sum, in one go);
* ``torch.func``: vmap of hessian, diagonal taken (skipped where it would not fit the budget);
* a plain-PyTorch forward Laplacian written here as the yardstick: carry (value, Jacobian rows
  J (N, d, w), summed second derivative s (N, w)) through the layers; and its Hessian-diagonal
  variant carrying S (N, d, w);
* the "floor": the GEMMs the engine does, alone, on preallocated buffers: forward row (N rows),
  backward row (N rows), and the first-order rows through layers 2..L (N*K rows; layer 1's
  Jacobian is the constant W1; K = d for the diagonal, min(d, width) for the Laplacian).

Training step (``--modes train``): loss = mean((lap - 1)^2), backward to the weights, for the
engine, nested autograd (create_graph on every level) and the plain forward Laplacian.

Every method is checked against float64 torch.func on a small batch before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torchhessdiag as thd  # noqa: E402


def make_model(d, width, depth, dtype, device, seed=0):
    torch.manual_seed(seed)
    layers, w_in = [], d
    for _ in range(depth):
        layers += [nn.Linear(w_in, width), nn.Tanh()]
        w_in = width
    layers.append(nn.Linear(w_in, 1))
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


# ---- the alternatives ---------------------------------------------------------------------------


def nested_autograd(model, x, create_graph=False):
    """(Hessian diagonal (N, d), Laplacian (N,)) by nested reverse mode."""
    x = x.detach().requires_grad_(True)
    u = model(x).sum()
    (g,) = torch.autograd.grad(u, x, create_graph=True)
    cols = [
        torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0][:, i]
        for i in range(x.shape[1])
    ]
    hd = torch.stack(cols, 1)
    return hd, hd.sum(1)


def torch_func_diag(model, x):
    f = lambda xi: model(xi).squeeze(-1)  # noqa: E731
    return torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1)


def forward_laplacian(model, x, per_direction=False):
    """Plain PyTorch forward Laplacian (per_direction=False) or Hessian diagonal (True)."""
    N, d = x.shape
    h = x
    J = torch.eye(d, dtype=x.dtype, device=x.device).expand(N, d, d)
    s = None  # (N, w) summed, or (N, d, w) per direction
    for m in model:
        if isinstance(m, nn.Linear):
            h = torch.nn.functional.linear(h, m.weight, m.bias)
            J = J @ m.weight.t()
            if s is not None:
                s = s @ m.weight.t()
        else:  # tanh
            t = torch.tanh(h)
            s1 = 1 - t * t
            s2 = -2 * t * s1
            J2 = J * J
            if per_direction:
                new = s2.unsqueeze(1) * J2
                s = new if s is None else s1.unsqueeze(1) * s + new
            else:
                new = s2 * J2.sum(1)
                s = new if s is None else s1 * s + new
            J = s1.unsqueeze(1) * J
            h = t
    return s.squeeze(-1)  # (N,) or (N, d)


def floor_fn(model, x, K):
    """The engine's GEMMs alone, on preallocated buffers."""
    Ws = [m.weight.detach() for m in linears(model)]
    N = x.shape[0]
    width = Ws[0].shape[0]
    h_bufs = [x.new_empty(N, W.shape[0]) for W in Ws]
    g_bufs = [x.new_empty(N, W.shape[1]) for W in Ws]
    g0 = x.new_ones(N, 1)
    J_in = x.new_empty(N * K, width).normal_()
    J_out = x.new_empty(N * K, width)

    def run():
        h = x
        for W, buf in zip(Ws, h_bufs):
            torch.mm(h, W.t(), out=buf)
            h = buf
        g = g0
        for W, buf in zip(reversed(Ws), reversed(g_bufs)):
            torch.mm(g, W, out=buf)
            g = buf
        a, b = J_in, J_out
        for W in Ws[1:-1]:
            torch.mm(a, W.t(), out=b)
            a, b = b, a

    return run


# ---- checks ---------------------------------------------------------------------------------------


def check(model, d, device):
    m64 = make_model(d, linears(model)[0].weight.shape[0], len(linears(model)) - 1, torch.float64, device)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x = torch.randn(16, d, dtype=torch.float64, device=device)
    ref = torch_func_diag(m64, x)
    scale = ref.abs().max().item()
    got = {
        "mlp_hessian_diag": thd.mlp_hessian_diag(m64, x).squeeze(1),
        "mlp_laplacian": thd.mlp_laplacian(m64, x).squeeze(1),
        "nested autograd (diag)": nested_autograd(m64, x)[0],
        "forward Laplacian": forward_laplacian(m64, x),
        "forward Hessian diag": forward_laplacian(m64, x, per_direction=True),
    }
    errs = {}
    for name, val in got.items():
        want = ref.sum(1) if val.dim() == 1 else ref
        errs[name] = (val.detach() - want).abs().max().item() / scale
    bad = {k: v for k, v in errs.items() if not v <= 1e-10}
    if bad:
        raise SystemExit(f"correctness check failed (float64, relative error > 1e-10): {bad}")
    return max(errs.values())


# ---- main -----------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, nargs="+", default=[8, 32, 100])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="hidden layers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    p.add_argument("--no-torch-func", action="store_true", help="skip torch.func (slow for large d)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.d, a.width, a.repeats = 256, [4, 16], 64, 3
    if a.threads:
        torch.set_num_threads(a.threads)
    device = C.pick_device(a.device)
    dtype = C.parse_dtype(a.dtype)
    load0 = os.getloadavg()[0]
    results = {"setting": {**vars(a), "env": C.env_info(device)}, "runs": []}
    print(f"# Engine benchmark: tanh MLP, {a.depth} hidden layers x {a.width}, N={a.n}, {a.dtype}, {C.device_label(device)}")
    for d in a.d:
        model = make_model(d, a.width, a.depth, dtype, device)
        err = check(model, d, device)
        x = torch.randn(a.n, d, dtype=dtype, device=device)
        K_diag, K_lap = d, min(d, a.width)
        row = {"d": d, "check_max_rel_err_f64": err}
        if "inference" in a.modes:
            fns = {
                "mlp_hessian_diag": lambda: _nograd(thd.mlp_hessian_diag, model, x),
                "mlp_laplacian": lambda: _nograd(thd.mlp_laplacian, model, x),
                "nested autograd": lambda: nested_autograd(model, x),
                "forward Laplacian (plain)": lambda: _nograd(forward_laplacian, model, x),
                "forward Hessian diag (plain)": lambda: _nograd(forward_laplacian, model, x, True),
                f"floor K={K_diag}": floor_fn(model, x, K_diag),
            }
            if K_lap != K_diag:
                fns[f"floor K={K_lap}"] = floor_fn(model, x, K_lap)
            if not a.no_torch_func:
                fns["torch.func vmap(hessian)"] = lambda: torch_func_diag(model, x)
            times = C.time_interleaved(fns, device, a.repeats, a.warmup)
            row["inference"] = {k: C.summarize(v) for k, v in times.items()}
        if "train" in a.modes:
            params = list(model.parameters())

            def step(lap_fn):
                def run():
                    for q in params:
                        q.grad = None
                    lap = lap_fn()
                    ((lap - 1.0) ** 2).mean().backward()
                return run

            fns = {
                "mlp_laplacian": step(lambda: thd.mlp_laplacian(model, x).squeeze(1)),
                "nested autograd": step(lambda: nested_autograd(model, x, create_graph=True)[1]),
                "forward Laplacian (plain)": step(lambda: forward_laplacian(model, x)),
            }
            times = C.time_interleaved(fns, device, a.repeats, a.warmup)
            row["train"] = {k: C.summarize(v) for k, v in times.items()}
        results["runs"].append(row)
        _report(row, d, K_diag, K_lap)
    load1 = os.getloadavg()[0]
    print(f"\nthreads {torch.get_num_threads()}; 1-min load average {load0:.2f} before, {load1:.2f} after (2 cores).")
    print("floor = forward-row + backward-row GEMMs (N rows) and the first-order-row GEMMs of layers 2..L-1 (N*K rows), preallocated outputs.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"raw results written to {a.json}")


def _nograd(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _report(row, d, K_diag, K_lap):
    print(f"\n## d = {d}  (float64 check vs torch.func: max rel err {row['check_max_rel_err_f64']:.1e})")
    if "inference" in row:
        inf = row["inference"]
        fl_d = inf[f"floor K={K_diag}"]["median"]
        fl_l = inf[f"floor K={K_lap}"]["median"]
        rows = []
        for name, s in inf.items():
            floor = fl_l if "aplacian" in name else fl_d
            rows.append([name, C.fmt_ms(s["median"]), f"{C.fmt_ms(s['min'])}-{C.fmt_ms(s['max'])}", f"{s['median'] / floor:.2f}x"])
        print(C.markdown_table(["inference", "median ms", "min-max ms", "/ floor"], rows))
        others = [k for k in ("nested autograd", "torch.func vmap(hessian)", "forward Hessian diag (plain)") if k in inf]
        best = min(others, key=lambda k: inf[k]["median"])
        print(f"mlp_hessian_diag vs fastest other diag ({best}): {inf[best]['median'] / inf['mlp_hessian_diag']['median']:.2f}x faster")
        print(f"mlp_laplacian vs plain forward Laplacian: {inf['forward Laplacian (plain)']['median'] / inf['mlp_laplacian']['median']:.2f}x faster")
    if "train" in row:
        tr = row["train"]
        rows = [[k, C.fmt_ms(s["median"]), f"{C.fmt_ms(s['min'])}-{C.fmt_ms(s['max'])}"] for k, s in tr.items()]
        print(C.markdown_table(["training step", "median ms", "min-max ms"], rows))
        best = min((k for k in tr if k != "mlp_laplacian"), key=lambda k: tr[k]["median"])
        print(f"training step: mlp_laplacian vs best other ({best}): {tr[best]['median'] / tr['mlp_laplacian']['median']:.2f}x faster")


if __name__ == "__main__":
    main()
