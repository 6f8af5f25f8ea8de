"""The models of the ``models`` preset: PINN architectures that people train, beyond plain MLPs.

Each builder returns an ``nn.Module`` mapping x (N, d) to (N, 1), weights from a seed (torch.nn's
default initialisation, plus the architecture's own choices noted below), float32 on the CPU:

* :class:`FourierResNet` -- random Fourier features [cos(2 pi x B), sin(2 pi x B)] (B fixed,
  N(0, sigma^2)), a linear embedding, residual tanh blocks h <- h + tanh(W2 tanh(W1 h)), a
  linear head;
* :class:`ModifiedMLP` -- the "modified MLP" of Wang, Teng & Perdikaris (2021, SIAM J. Sci.
  Comput. 43(5)): two gates U = tanh(x Wu), V = tanh(x Wv) mixed into every hidden layer,
  h <- (1 - z) * U + z * V with z = tanh(h W);
* :class:`PirateNet` -- the adaptive residual network of Wang, Sankaran, Wang & Perdikaris
  (PirateNets, 2024): Fourier embedding Phi, gates U = tanh(Phi W1), V = tanh(Phi W2), and blocks
  f = tanh(h W1); z1 = f U + (1 - f) V; g = tanh(z1 W2); z2 = g U + (1 - g) V;
  h <- alpha tanh(z2 W3) + (1 - alpha) h with a trainable alpha per block (initialised to 0.5
  here, not the paper's 0, so that the blocks are not the identity at the start and the
  benchmark times the full computation);
* :class:`LNTransformerPINN` -- a transformer-style PINN: the d coordinates as d tokens (each
  embedded by its own linear map of its scalar), pre-LayerNorm self-attention
  (``nn.MultiheadAttention``, ``batch_first``) and a LayerNorm'd tanh MLP, mean over the tokens.

``MODELS`` maps a name to (builder, description). The builders take ``(d, width)``.

The ``models`` preset (``python -m torchhessdiag.bench --preset models``, or this module with more
options: ``python -m torchhessdiag.bench.models --help``) times, per model, dtype, d, N and mode
(inference: the Laplacian of all N points; training step: loss = mean((lap - 1)^2) and its
backward to the weights), in one process on the same weights and points:

* ``thd``: ``thd.laplacian(model, x)`` (the traced jet path; the program is cached by the warm-up
  call, as in a training loop);
* ``nested``: nested ``torch.autograd.grad`` (one gradient, then one backward per input
  dimension), what most PINN code does;
* ``func_hessian``: ``torch.func.vmap(torch.func.hessian)`` of the one-point function, diagonal
  summed;
* ``jet`` / ``jet_std``: jet-for-pytorch's Laplacian (collapsed / standard Taylor mode, as in its
  own benchmark: capture_graph, CSE, vmap over the points) where it imports (Python >= 3.12)
  and can trace the model (else skipped, with the reason);
* ``thd_compiled`` (only with ``--methods``): the same step as ``thd`` inside
  ``torch.compile(fullgraph=True)`` (inductor; compile time not included).

Every method is checked first against a float64 reference at ``check_n`` points: nested autograd
in float64 with layer_norm / attention replaced by their elementary definitions
(torchhessdiag.fallback_ops: torch's own nested derivatives of layer_norm are wrong from order
3, which a training gradient of a Laplacian loss needs). Norm-wise relative error <= 1e-10 for the
Laplacian (inference) and the weight gradient (training), else the method is FAILED and the
exit status is 1. Then round-robin timed calls after one warm-up call; median, min-max, IQR.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor


class FourierResNet(nn.Module):
    """Random Fourier features + residual tanh blocks (see the module docstring)."""

    def __init__(self, d: int, width: int = 128, blocks: int = 3, sigma: float = 1.0):
        super().__init__()
        self.register_buffer("B", torch.randn(d, width // 2) * sigma)
        self.embed = nn.Linear(2 * (width // 2), width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = 2 * math.pi * x @ self.B
        h = self.embed(torch.cat([torch.cos(z), torch.sin(z)], dim=-1))
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class ModifiedMLP(nn.Module):
    """The modified MLP of Wang, Teng & Perdikaris (2021) with tanh."""

    def __init__(self, d: int, width: int = 128, layers: int = 4):
        super().__init__()
        self.u = nn.Linear(d, width)
        self.v = nn.Linear(d, width)
        self.inp = nn.Linear(d, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        U = torch.tanh(self.u(x))
        V = torch.tanh(self.v(x))
        z = torch.tanh(self.inp(x))
        h = (1 - z) * U + z * V
        for lin in self.hidden:
            z = torch.tanh(lin(h))
            h = (1 - z) * U + z * V
        return self.head(h)


class PirateBlock(nn.Module):
    def __init__(self, width: int, alpha: float):
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, width)
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, h: Tensor, U: Tensor, V: Tensor) -> Tensor:
        f = torch.tanh(self.l1(h))
        z1 = f * U + (1 - f) * V
        g = torch.tanh(self.l2(z1))
        z2 = g * U + (1 - g) * V
        return self.alpha * torch.tanh(self.l3(z2)) + (1 - self.alpha) * h


class PirateNet(nn.Module):
    """A PirateNet-style adaptive residual network (see the module docstring)."""

    def __init__(self, d: int, width: int = 128, blocks: int = 3, sigma: float = 1.0, alpha: float = 0.5):
        super().__init__()
        self.register_buffer("B", torch.randn(d, width // 2) * sigma)
        fe = 2 * (width // 2)
        self.u = nn.Linear(fe, width)
        self.v = nn.Linear(fe, width)
        self.embed = nn.Linear(fe, width)
        self.blocks = nn.ModuleList(PirateBlock(width, alpha) for _ in range(blocks))
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = 2 * math.pi * x @ self.B
        phi = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
        U = torch.tanh(self.u(phi))
        V = torch.tanh(self.v(phi))
        h = torch.tanh(self.embed(phi))
        for b in self.blocks:
            h = b(h, U, V)
        return self.head(h)


class LNTransformerPINN(nn.Module):
    """The d coordinates as d tokens; pre-LayerNorm attention and MLP blocks (see the module
    docstring)."""

    def __init__(self, d: int, width: int = 32, heads: int = 4, blocks: int = 2):
        super().__init__()
        self.d, self.width = d, width
        self.tok_w = nn.Parameter(torch.randn(d, width) / math.sqrt(width))
        self.tok_b = nn.Parameter(torch.zeros(d, width))
        self.ln1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.attn = nn.ModuleList(nn.MultiheadAttention(width, heads, batch_first=True) for _ in range(blocks))
        self.ln2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(-1) * self.tok_w + self.tok_b  # (N, d, width): token i embeds x_i
        for ln1, attn, ln2, mlp in zip(self.ln1, self.attn, self.ln2, self.mlp):
            a = ln1(h)
            h = h + attn(a, a, a, need_weights=False)[0]
            h = h + mlp(ln2(h))
        return self.head(torch.tanh(h.mean(1)))


MODELS: Dict[str, Tuple[Callable[[int, int], nn.Module], str]] = {
    "fourier_resnet": (lambda d, w: FourierResNet(d, w, blocks=3), "Fourier features + 3 residual tanh blocks"),
    "modified_mlp": (lambda d, w: ModifiedMLP(d, w, layers=4), "modified MLP (gates U, V), 4 layers"),
    "piratenet": (lambda d, w: PirateNet(d, w, blocks=3), "PirateNet-style, 3 adaptive residual blocks"),
    "transformer": (lambda d, w: LNTransformerPINN(d, w, heads=4, blocks=2), "d tokens, 2 pre-LN attention blocks"),
}


def build_model(name: str, d: int, width: int, seed: int) -> nn.Module:
    """The float32 CPU model ``name`` with weights from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name][0](d, width)


# ---- the methods -----------------------------------------------------------------------------------


def _nested_laplacian(model: nn.Module, x: Tensor, create_graph: bool) -> Tensor:
    x = x.detach().requires_grad_(True)
    u = model(x).reshape(x.shape[0])
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = None
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        lap = h[:, i] if lap is None else lap + h[:, i]
    return lap


def _func_laplacian(model: nn.Module, x: Tensor) -> Tensor:
    one = lambda xi: model(xi.unsqueeze(0)).reshape(())  # noqa: E731
    return torch.func.vmap(torch.func.hessian(one))(x).diagonal(dim1=-2, dim2=-1).sum(-1)


def _thd_laplacian(model: nn.Module, x: Tensor) -> Tensor:
    import torchhessdiag as thd

    return thd.laplacian(model, x).reshape(x.shape[0])


@dataclass
class Method:
    key: str
    label: str
    laplacian: Callable[[nn.Module, Tensor, bool], Callable[[], Tensor]]  # (model, x, train) -> call
    inference_no_grad: bool = True  # inference under torch.no_grad() (False: needs a graph)
    available: Callable[[], Optional[str]] = lambda: None
    default: bool = True


def _jet_method(collapsed: bool) -> Callable:
    def make(model, x, train):
        from .methods import jet_laplacian

        f = jet_laplacian(model, x, collapsed)
        return lambda: f(x)

    return make


def _compiled(model, x, train):
    import torchhessdiag as thd

    thd.laplacian(model, x)  # cache the program outside (not needed, but keeps compile time down)
    f = torch.compile(lambda z: thd.laplacian(model, z).reshape(z.shape[0]), fullgraph=True)
    return lambda: f(x)


def _jet_available() -> Optional[str]:
    from .methods import _jet_available as avail

    return avail()


METHODS: Dict[str, Method] = {
    m.key: m
    for m in [
        Method("thd", "thd.laplacian", lambda mo, x, train: (lambda: _thd_laplacian(mo, x))),
        Method("nested", "nested autograd", lambda mo, x, train: (lambda: _nested_laplacian(mo, x, train)), inference_no_grad=False),
        Method("func_hessian", "torch.func vmap(hessian)", lambda mo, x, train: (lambda: _func_laplacian(mo, x))),
        Method("jet", "jet-for-pytorch (collapsed)", _jet_method(True), available=_jet_available),
        Method("jet_std", "jet-for-pytorch (standard)", _jet_method(False), available=_jet_available),
        Method("thd_compiled", "thd.laplacian, torch.compile", _compiled, default=False),
    ]
}


def build_call(key: str, model: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    """The zero-argument call of a method: inference returns the Laplacian (N,); a training step
    zeroes the weight gradients, computes mean((lap - 1)^2) and its backward, returns the loss."""
    m = METHODS[key]
    lap = m.laplacian(model, x, mode == "train")
    if mode == "inference":
        if m.inference_no_grad:
            def call():
                with torch.no_grad():
                    return lap()
            return call
        return lambda: lap().detach()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = ((lap() - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    return step


def flat_grads(model: nn.Module) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten() for p in model.parameters()])


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    e = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    return e if e == e else float("inf")


def reference(model64: nn.Module, x64: Tensor, mode: str):
    """float64 nested autograd with exact layer_norm / attention (fallback_ops): the Laplacian
    (inference) or the weight gradient of the training loss."""
    from ..fallback_ops import ExactDerivatives

    with ExactDerivatives():
        if mode == "inference":
            return _nested_laplacian(model64, x64, False).detach()
        for p in model64.parameters():
            p.grad = None
        ((_nested_laplacian(model64, x64, True) - 1.0) ** 2).mean().backward()
    g = flat_grads(model64)
    for p in model64.parameters():
        p.grad = None
    return g


# ---- one block -----------------------------------------------------------------------------------


def _err_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


def run_block(spec: dict, keys: List[str], a) -> dict:
    from . import measure as M

    device, dtype = torch.device(spec["device"]), M.parse_dtype(spec["dtype"])
    mode = spec["mode"]
    base = build_model(spec["model"], spec["d"], spec["width"], a.seed)
    rec = {"key": block_key(spec), "setting": spec, "skipped": {}, "failed": {}, "check": {}, "times": {}}
    # 1. float64 check
    m64 = copy.deepcopy(base).to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(a.seed + 7)
    xc = torch.randn(a.check_n, spec["d"], generator=gen, dtype=torch.float64).to(device)
    ref = reference(m64, xc, mode)
    ok_keys = []
    for k in keys:
        why = METHODS[k].available()
        if why:
            rec["skipped"][k] = why
            continue
        try:
            out = build_call(k, m64, xc, mode)()
            got = out if mode == "inference" else flat_grads(m64)
            err = _rel(got, ref)
            rec["check"][k] = err
            if err <= a.tol:
                ok_keys.append(k)
            else:
                rec["failed"][k] = f"float64 check: relative error {err:.2e} > {a.tol:g}"
        except Exception as e:  # noqa: BLE001 - a method that cannot run this model: skipped with
            # torch's (or jet's) error; only thd raising, or wrong numbers, are failures
            rec["failed" if k.startswith("thd") else "skipped"][k] = "cannot run: " + _err_text(e)
        for p in m64.parameters():
            p.grad = None
    # 2. timing
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(a.seed + 1000 + spec["d"])
    x = torch.randn(spec["N"], spec["d"], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    calls = {}
    for k in ok_keys:
        try:
            fn = build_call(k, model, x, mode)
            t = M.time_once(fn, device)  # warm-up (compiles, caches the trace), also the probe
            if t > a.budget:
                rec["skipped"][k] = f"one call took {t:.1f} s > budget {a.budget:g} s"
                continue
            calls[k] = fn
        except Exception as e:  # noqa: BLE001
            rec["failed"][k] = _err_text(e)
    times = {k: [] for k in calls}
    spent = {k: 0.0 for k in calls}
    for _ in range(a.repeats):
        for k, fn in calls.items():
            if spent[k] > a.method_budget and len(times[k]) >= 1:
                continue
            t = M.time_once(fn, device)
            times[k].append(t)
            spent[k] += t
    rec["times"] = {k: M.summarize(v) for k, v in times.items() if v}
    rec["loadavg"] = M.loadavg()
    return rec


def block_key(spec: dict) -> str:
    return f"{spec['model']}|{spec['device']}|{spec['dtype']}|d={spec['d']}|w={spec['width']}|N={spec['N']}|{spec['mode']}"


# ---- reports -------------------------------------------------------------------------------------


def _med(rec: dict, k: str) -> Optional[float]:
    t = rec["times"].get(k)
    return None if t is None else t["median"]


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def block_markdown(rec: dict) -> str:
    from . import measure as M

    s = rec["setting"]
    head = (f"### {s['model']}: {s['dtype']}, d={s['d']}, width={s['width']}, N={s['N']}, {s['mode']} "
            f"(load {rec.get('loadavg', ['?'])[0]})")
    rows = []
    thd_t = _med(rec, "thd")
    for k, t in rec["times"].items():
        rows.append([METHODS[k].label, M.fmt_ms(t["median"]), f"{M.fmt_ms(t['min'])}-{M.fmt_ms(t['max'])}", t["n"],
                     _ratio(t["median"], thd_t), f"{rec['check'].get(k, float('nan')):.1e}"])
    out = [head, "", M.markdown_table(["method", "median ms", "min-max", "n", "/ thd", "float64 check"], rows)]
    for k, why in rec["skipped"].items():
        out.append(f"- {METHODS[k].label}: skipped ({why})")
    for k, why in rec["failed"].items():
        out.append(f"- {METHODS[k].label}: FAILED ({why})")
    return "\n".join(out) + "\n"


def summary_markdown(records: List[dict]) -> str:
    """One line per block: thd's median and the others' medians over it (> 1: thd is faster)."""
    from . import measure as M

    rows = []
    for r in records:
        s = r["setting"]
        thd_t = _med(r, "thd")
        cells = [s["model"], s["dtype"], s["d"], s["mode"], "-" if thd_t is None else M.fmt_ms(thd_t)]
        for k in ("nested", "func_hessian", "jet", "jet_std"):
            other = _med(r, k)
            if other is None:
                why = r["skipped"].get(k) or r["failed"].get(k)
                failed = k in r["failed"]
                cells.append("n/a" if why is None else "FAILED" if failed else "cannot run" if why.startswith("cannot run") else "skipped")
            else:
                cells.append(_ratio(other, thd_t))
        rows.append(cells)
    head = ["model", "dtype", "d", "mode", "thd ms", "nested / thd", "torch.func / thd", "jet / thd", "jet std / thd"]
    return M.markdown_table(head, rows)


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m torchhessdiag.bench.models",
        description="The models preset: thd.laplacian on PINN architectures vs nested autograd, torch.func and "
        "jet-for-pytorch (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["fourier_resnet", "modified_mlp", "piratenet"], choices=list(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--d", type=int, nargs="+", default=[2, 3])
    p.add_argument("--width", type=int, default=128, help="hidden width (the transformer uses min(width, 32))")
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all but thd_compiled")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="skip a method whose warm-up call takes longer (s)")
    p.add_argument("--method-budget", type=float, default=30.0, help="seconds per method and block")
    p.add_argument("--check-n", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="results folder (default ./bench-results/models-<time>)")
    p.add_argument("--resume", action="store_true", help="keep the blocks already in --out/results.jsonl")
    p.add_argument("--max-minutes", type=float, help="start no new block after this many minutes (exit 3 if blocks are left)")
    return p.parse_args(argv)


def grid(a) -> List[dict]:
    out = []
    for model in a.models:
        width = min(a.width, 32) if model == "transformer" else a.width
        for dt in a.dtype:
            for d in a.d:
                for n in a.n:
                    for mode in a.modes:
                        out.append(dict(model=model, device=a.device, dtype=dt, d=d, width=width, N=n, mode=mode))
    return out


def main(argv=None) -> int:
    """Run the models grid; exit status 0 ok, 1 a check failed, 3 blocks left (--max-minutes)."""
    from . import measure as M

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    keys = a.methods or [k for k, m in METHODS.items() if m.default]
    out = a.out or os.path.join("bench-results", f"models-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "results.jsonl")
    old = []
    if a.resume and os.path.exists(jsonl):
        with open(jsonl) as f:
            old = [json.loads(line) for line in f if line.strip()]
    elif os.path.exists(jsonl):
        os.replace(jsonl, jsonl + ".previous")
    done = {r["key"] for r in old}
    blocks = grid(a)
    import torchhessdiag as thd

    dev = M.pick_device(a.device)
    env = M.env_info(dev)
    env.update(device_label=M.device_label(dev), torchhessdiag=thd.__version__, git=M.git_info(), loadavg=M.loadavg(),
               jet=_jet_version(), methods=keys, argv=sys.argv[1:] if argv is None else list(argv))
    print(f"# torchhessdiag benchmark, models preset: {len(blocks)} blocks, methods {', '.join(keys)}")
    print(f"device {env['device_label']}, torch {env['torch']}, jet-for-pytorch {env['jet']}, load {env['loadavg']}\n")
    new, left = [], 0
    for i, spec in enumerate(b for b in blocks if block_key(b) not in done):
        if a.max_minutes is not None and time.perf_counter() - t0 > a.max_minutes * 60:
            left = len([b for b in blocks if block_key(b) not in done]) - i
            break
        rec = run_block(spec, keys, a)
        rec["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "git": env["git"].get("commit")}
        new.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(block_markdown(rec), flush=True)
    order = {block_key(b): i for i, b in enumerate(blocks)}
    records = sorted(old + new, key=lambda r: order.get(r["key"], len(order)))
    env["loadavg_end"] = M.loadavg()
    env["elapsed_s"] = time.perf_counter() - t0
    summary = summary_markdown(records)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"env": env, "complete": left == 0, "records": records}, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# models preset\n\n" + f"device {env['device_label']}, torch {env['torch']}, git {env['git'].get('commit')}, "
                f"jet-for-pytorch {env['jet']}, load average {env['loadavg']} -> {env['loadavg_end']}\n\n"
                "Ratios: the other method's median time over thd.laplacian's (> 1: thd is faster), same run.\n\n"
                + summary + "\n\n" + "\n".join(block_markdown(r) for r in records))
    print(summary)
    print(f"written to {out}/: report.md, results.json, results.jsonl ({env['elapsed_s']:.0f} s)")
    failed = [(r["key"], k) for r in records for k in r["failed"]]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    if left:
        print(f"{left} blocks left: run again with --resume --out {out}", file=sys.stderr)
        return 3
    return 0


def main_from_cli(a) -> int:
    """``python -m torchhessdiag.bench --preset models [options]``: the suite's options mapped
    onto this module's (``--device`` first entry, ``--width`` first entry, ``--methods`` and
    ``--activation`` of the MLP suite do not apply; this module's --help has its own)."""
    if getattr(a, "plan", False):
        b = parse_args(["--dtype", *a.dtype, "--d", *map(str, a.d), "--width", str(a.width[0]), "--n", *map(str, a.n or [4096]),
                        "--modes", *a.modes])
        blocks = grid(b)
        print(f"models preset: {len(blocks)} blocks (no cost model for this preset; measured: 6 float32 d=2 N=4096 "
              "blocks with jet, 3 repeats, in 186 s on 2 shared CPU cores at load average 4):")
        for blk in blocks:
            print("  " + block_key(blk))
        return 0
    argv = ["--device", str(a.device[0]), "--dtype", *a.dtype, "--d", *map(str, a.d), "--width", str(a.width[0]),
            "--n", *map(str, a.n or [4096]), "--modes", *a.modes, "--repeats", str(a.repeats),
            "--budget", str(a.budget), "--method-budget", str(a.method_budget), "--check-n", str(a.check_n),
            "--seed", str(a.seed)]
    if a.threads:
        argv += ["--threads", str(a.threads)]
    if a.out:
        argv += ["--out", a.out]
    if a.resume:
        argv.append("--resume")
    if a.max_minutes is not None:
        argv += ["--max-minutes", str(a.max_minutes)]
    return main(argv)


def _jet_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("jet-for-pytorch")
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
