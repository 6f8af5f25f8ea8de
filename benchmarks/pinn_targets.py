"""Issue 13's targets, read off a pinn record (results.jsonl of `python -m torchhessdiag.bench
--preset pinn`): per target, how many blocks meet it, and the blocks that do not.

    python benchmarks/pinn_targets.py benchmarks/results/pinn_cpu/results.jsonl
    python benchmarks/pinn_targets.py --markdown benchmarks/results/pinn_core_cpu/results.jsonl

--markdown prints the Laplacian blocks as a table instead (the README's PINN table): per block
thd.mlp_laplacian, nested autograd, jet-for-pytorch collapsed and the best other exact method,
each median (min-max) of the block's timed calls, with the two speed-ups.

Targets (CPU, 2 threads, ratios within one block = one run):
 1a. training step >= 2x nested autograd for d in {1, 2, 3}, width 32-128, depth 3-4;
 1b. training step >= 1.3x the best other exact method for d <= 8;
 2.  inference never slower than the best other exact method (Laplacian, Hessian diagonal,
     value-gradient-Laplacian), and within 1.2x of the GEMM floor where that floor is >= 20 ms;
 3.  N = 16: training step >= 3x nested autograd.
"""

from __future__ import annotations

import json
import sys

THD = {"lap": "thd_lap", "diag": "thd_diag", "deriv": "thd_deriv"}
PEERS = {
    "lap": ["nested", "func_hessian", "func_jvp", "fwd_lap", "fwd_lap_compiled", "jet", "jet_std"],
    "diag": ["nested", "func_hessian", "func_jvp", "fwd_diag"],
    "deriv": ["nested", "fwd_deriv", "jet_deriv"],
}


def med(rec, key):
    s = rec.get("stats_s", {}).get(key)
    return None if s is None else s["median"]


def main(path: str) -> None:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    rows = {k: [] for k in ("1a", "1b", "2", "2floor", "3")}
    for r in recs:
        s = r["setting"]
        tag = f"{s['dtype']} d={s['d']} {s['widths'][0]}x{len(s['widths'])} N={s['N']}"
        if s["mode"] == "train":
            t = med(r, "thd_lap")
            if t is None:
                continue
            nested = med(r, "nested")
            peers = [(k, med(r, k)) for k in PEERS["lap"] if med(r, k) is not None]
            best = min(peers, key=lambda kv: kv[1]) if peers else None
            if s["N"] == 16:
                if nested:
                    rows["3"].append((nested / t >= 3, f"{tag}: {nested / t:.2f}x nested"))
                continue
            if s["d"] <= 3 and nested:
                rows["1a"].append((nested / t >= 2, f"{tag}: {nested / t:.2f}x nested"))
            if s["d"] <= 8 and best:
                rows["1b"].append((best[1] / t >= 1.3, f"{tag}: {best[1] / t:.2f}x best ({best[0]})"))
        else:
            for task, key in THD.items():
                t = med(r, key)
                if t is None:
                    continue
                peers = [(k, med(r, k)) for k in PEERS[task] if med(r, k) is not None]
                if peers:
                    best = min(peers, key=lambda kv: kv[1])
                    rows["2"].append((best[1] / t >= 1.0, f"{tag} {task}: {best[1] / t:.2f}x best ({best[0]})"))
                floor = med(r, "floor_lap") if task != "diag" and med(r, "floor_lap") else med(r, "floor_diag")
                if floor is not None and floor >= 0.020 and task == "lap":
                    rows["2floor"].append((t / floor <= 1.2, f"{tag} {task}: {t / floor:.2f}x floor ({floor * 1e3:.0f} ms)"))
    names = {"1a": "training >= 2x nested (d <= 3)", "1b": "training >= 1.3x best peer (d <= 8)",
             "2": "inference >= best peer", "2floor": "inference <= 1.2x GEMM floor (floor >= 20 ms)",
             "3": "N=16 training >= 3x nested"}
    for k, v in rows.items():
        ok = sum(1 for good, _ in v if good)
        print(f"## {names[k]}: {ok} of {len(v)} blocks")
        for good, msg in v:
            if not good:
                print(f"   not met: {msg}")


def _ms(rec, key):
    st = rec.get("stats_s", {}).get(key)
    if st is None:
        return "–"
    f = (lambda v: f"{v * 1e3:.3g}") if st["median"] < 0.01 else (lambda v: f"{v * 1e3:.0f}")
    if st["median"] < 0.1:
        f = (lambda v: f"{v * 1e3:.3g}")
    return f"{f(st['median'])} ({f(st['min'])}–{f(st['max'])})"


NAMES = {"nested": "nested", "func_hessian": "func hessian", "func_jvp": "func jvp",
         "fwd_lap": "fwd Laplacian", "fwd_lap_compiled": "fwd Laplacian compiled",
         "jet": "jet collapsed", "jet_std": "jet standard"}


def markdown(path: str) -> None:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    print("| dtype | d | widths | N | mode | thd.mlp_laplacian ms | nested autograd ms | "
          "jet-for-pytorch collapsed ms | best other method, ms | vs nested | vs best other |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        s = r["setting"]
        t = med(r, "thd_lap")
        if t is None:
            continue
        peers = [(k, med(r, k)) for k in PEERS["lap"] if med(r, k) is not None]
        best = min(peers, key=lambda kv: kv[1])
        nested = med(r, "nested")
        mode = "training step" if s["mode"] == "train" else "inference"
        print(f"| {s['dtype']} | {s['d']} | {len(s['widths'])}×{s['widths'][0]} | {s['N']} | {mode} "
              f"| {_ms(r, 'thd_lap')} | {_ms(r, 'nested')} | {_ms(r, 'jet')} "
              f"| {NAMES[best[0]]}: {_ms(r, best[0])} "
              f"| {nested / t:.2f}× | {best[1] / t:.2f}× |")


if __name__ == "__main__":
    if sys.argv[1] == "--markdown":
        markdown(sys.argv[2])
    else:
        main(sys.argv[1])
