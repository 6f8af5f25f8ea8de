"""The dropin preset's report (torchhessdiag/bench/dropin.py runs it): console lines, the
markdown tables against issue 14's targets, results.json / report.md, and reading a results.jsonl
back for --resume. Below dropin.py in the import direction (it imports nothing of it).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import OrderedDict
from typing import List, Optional

from . import measure as M

#: where torch's own double backward is a chain of composite ops: issue 14's target is 1.3x
COMPOSITE = ("silu", "gelu", "gelu_tanh", "softplus", "sigmoid", "elu", "celu")
METHODS = ("torch.nn", "thd.nn")


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else (f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}")


def block_line(r: dict) -> str:
    s = r["setting"]
    head = (f"{s['activation']:10s} {s['dtype']} d={s['d']:<3d} {s['width']}x{s['depth']} N={s['N']:<5d} "
            f"{s['mode']:9s}")
    parts = []
    for k in METHODS:
        if k in r.get("stats_s", {}):
            st = r["stats_s"][k]
            parts.append(f"{k} {_ms(st['median'])} ms ({_ms(st['min'])}-{_ms(st['max'])})")
        elif k in r["failed"]:
            parts.append(f"{k} FAILED: {r['failed'][k]}")
        elif k in r["skipped"]:
            parts.append(f"{k} skipped: {r['skipped'][k][:90]}")
    sp = f" -> {r['speedup']:.2f}x (min {r['speedup_min']:.2f}x)" if "speedup" in r else ""
    return head + ": " + ", ".join(parts) + sp


def summary_markdown(records: List[dict]) -> str:
    """Issue 14's targets: the smallest speed-up per activation, dtype and mode over the grid."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in records:
        s = r["setting"]
        groups.setdefault((s["activation"], s["dtype"], s["mode"]), []).append(r)
    rows = []
    for (act, dt, mode), rs in groups.items():
        sp = [r["speedup"] for r in rs if "speedup" in r]
        target = 1.3 if act in COMPOSITE else 1.0
        only = [r for r in rs if "speedup" not in r and "thd.nn" in r.get("stats_s", {})]
        if sp:
            worst = min(rs, key=lambda r: r.get("speedup", math.inf))["setting"]
            rows.append([act, dt, mode, len(rs), f"{min(sp):.2f}x", f"{statistics.median(sp):.2f}x",
                         f"{max(sp):.2f}x", f"{target:.1f}x", sum(v < target for v in sp),
                         f"d={worst['d']} w={worst['width']} N={worst['N']}"])
        else:
            why = next(iter(rs[0]["skipped"].values()), "") if rs else ""
            rows.append([act, dt, mode, len(rs), "-", "-", "-", f"{target:.1f}x", "-",
                         f"torch.nn cannot ({why[:60]}); drop-ins timed in {len(only)} blocks"])
    return M.markdown_table(["activation", "dtype", "mode", "blocks", "min speed-up", "median", "max",
                             "target", "blocks below", "slowest block"], rows)


def blocks_markdown(records: List[dict]) -> str:
    rows = []
    for r in records:
        s = r["setting"]
        st = r.get("stats_s", {})
        mem = r.get("memory", {})

        def t(k):
            if k in st:
                return f"{_ms(st[k]['median'])} ({_ms(st[k]['min'])}-{_ms(st[k]['max'])})"
            return "FAILED" if k in r["failed"] else "skipped"

        def mb(k):
            v = mem.get(k)
            return f"{v / 2**20:.0f}" if isinstance(v, (int, float)) else "-"

        rows.append([s["activation"], s["dtype"], s["mode"], s["d"], f"{s['width']}x{s['depth']}", s["N"],
                     t("torch.nn"), t("thd.nn"), f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                     f"{r['speedup_min']:.2f}x" if "speedup_min" in r else "-", f"{mb('torch.nn')} / {mb('thd.nn')}"])
    return M.markdown_table(["activation", "dtype", "mode", "d", "width x depth", "N", "torch.nn ms (min-max)",
                             "thd.nn ms (min-max)", "speed-up (medians)", "(minima)", "peak MiB torch.nn / thd.nn"],
                            rows)


HOW = """How: nested torch.autograd.grad (one gradient with create_graph=True, then one backward per
input dimension) through the torch.nn model and through torchhessdiag.nn.convert of it, same
weights and points, in one process; inference gives the Hessian diagonal and the Laplacian,
the training step is loss = mean((lap - 1)^2) and its backward to the weights. Checked against
float64 torch.func first. Times: round-robin samples after a warm-up (short calls batched),
median, min-max; clock: %s. Speed-up = torch.nn / thd.nn (> 1: the drop-ins are faster).
Peak MiB: live tensor bytes of one call (torch.profiler allocation events; the library's pooled
CPU buffers released first, so that they are counted)."""


def write_report(out: str, env: dict, records: List[dict], clock: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"env": env, "records": records}, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# torchhessdiag.nn drop-ins vs torch.nn: nested autograd\n\n")
        f.write(M.markdown_table(["key", "value"], [[k, v] for k, v in env.items()]) + "\n\n")
        f.write(HOW % clock + "\n\n## Targets (issue 14)\n\n" + summary_markdown(records) + "\n\n")
        f.write("## Blocks\n\n" + blocks_markdown(records) + "\n")


def load_records(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
