"""Reports of the benchmark suite: markdown tables, the raw JSON and PNG plots."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import List, Optional

from . import measure as M
from .methods import METHODS, THD_OF_TASK, primary_task, serves

# the Taylor-mode paper's setting and its published per-datum figures (another device)
PAPER = {
    "setting": {"d": 50, "widths": [768, 768, 512, 512], "activation": "tanh", "dtype": "float64"},
    "device": "NVIDIA RTX 6000 (as published)",
    "per_datum_ms": {"nested autograd": 0.61, "collapsed Taylor mode": 0.29},
}

FLOOR_LABEL = {"floor_diag": "GEMM floor, K=d", "floor_lap": "GEMM floor, K=min(d, w)",
               "floor_train": "GEMM floor (training), K=min(d, w)"}


def label(k: str) -> str:
    return METHODS[k].label if k in METHODS else FLOOR_LABEL.get(k, k)


def _floor_for(k: str, rec: dict) -> Optional[str]:
    st = rec.get("stats_s", {})
    if rec["setting"]["mode"] == "train":
        return "floor_train" if "floor_train" in st else None
    if METHODS[k].gives in ("lap", "deriv") and "floor_lap" in st:
        return "floor_lap"
    return "floor_diag" if "floor_diag" in st else None


def _thd_for(k: str, rec: dict) -> Optional[str]:
    st = rec.get("stats_s", {})
    gives = METHODS[k].gives
    if rec["setting"]["mode"] == "train" or gives == "lap":
        return "thd_lap" if "thd_lap" in st else None
    if gives == "deriv":
        return "thd_deriv" if "thd_deriv" in st else None
    return "thd_diag" if "thd_diag" in st else ("thd_lap" if "thd_lap" in st else None)


def best_peer(rec: dict, task: str, exclude: str = "") -> Optional[str]:
    """The fastest (median) method of ``task`` in the block that is not torchhessdiag's, not a
    floor, and not ``exclude`` (every method here passed the exactness checks)."""
    st, mode = rec.get("stats_s", {}), rec["setting"]["mode"]
    cands = [k for k in st if k in METHODS and not METHODS[k].is_thd and k != exclude
             and serves(k, task, mode)]
    return min(cands, key=lambda k: st[k]["median"]) if cands else None


def tasks_of(rec: dict) -> List[str]:
    """The tasks of a block that have a thd method timed in it (training: "train")."""
    if rec["setting"]["mode"] == "train":
        return ["train"]
    st = rec.get("stats_s", {})
    return [t for t in ("lap", "diag", "deriv") if THD_OF_TASK[t] in st or any(
        k in METHODS and serves(k, t, "inference") for k in st)]


def _fmt(seconds: float) -> str:
    """ms with 3 significant digits at least (N = 16 calls take ~0.1 ms)."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else (f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "" if a is None or not b else f"{a / b:.2f}x"


def _mib(mem: dict, k: str) -> str:
    r = mem.get(k)
    if not r or "peak_bytes" not in r:
        return ""
    s = M.fmt_mib(r["peak_bytes"])
    return ("~" + s) if r.get("estimated") else s


def title(s: dict) -> str:
    w = s["widths"]
    ws = f"{w[0]}x{len(w)}" if len(set(w)) == 1 else "-".join(map(str, w))
    return (f"{s['device']} {s['dtype']}, {s['activation']} MLP d={s['d']} -> {ws} -> 1, "
            f"N={s['N']}, {s['mode']}")


def block_markdown(rec: dict, env: dict) -> str:
    s = rec["setting"]
    st = rec.get("stats_s", {})
    mem = rec.get("memory", {})
    mode = s["mode"]
    lines = [f"### {title(s)}", ""]
    chk = rec.get("check_float64", {})
    fc = rec.get("full_check", {})
    lines.append(f"Checks: float64 vs torch.func at N={chk.get('n')}: max rel. error "
                 f"{chk.get('max', float('nan')):.1e} (tol {chk.get('tol', 0):g}); full size "
                 f"{s['dtype']} vs {fc.get('against', '-')}: max "
                 f"{max(fc.get('errors', {}).values(), default=0):.1e} (tol {fc.get('tol', 0):.1e}; "
                 f"torch's own error there {fc.get('torch_error', float('nan')):.1e}).")
    lines.append("")
    mem_head = "peak MiB (CUDA)" if s["device"].startswith("cuda") else "peak MiB (tensors)"
    rss = any("rss" in v for v in mem.values())
    headers = ["method", "gives", "n", "median ms", "min-max ms", "IQR ms", "/ floor",
               "/ thd", "/ nested", "/ best peer", mem_head] + (["peak RSS MiB"] if rss else [])
    rows = []
    reps = rec.get("calls_per_sample", {})
    nested = st.get("nested", {}).get("median")
    for k in METHODS:
        if k not in st:
            continue
        x = st[k]
        fl, th = _floor_for(k, rec), _thd_for(k, rec)
        bp = best_peer(rec, primary_task(k, mode), exclude=k)
        n = f"{x['n']}{'*' if k in rec.get('warmup_counted', ()) else ''}"
        if reps.get(k, 1) > 1:
            n += f"x{reps[k]}"
        row = [label(k), METHODS[k].gives if mode == "inference" else "lap", n, _fmt(x["median"]),
               f"{_fmt(x['min'])}-{_fmt(x['max'])}", _fmt(x["iqr"]),
               _ratio(x["median"], st[fl]["median"] if fl else None),
               _ratio(x["median"], st[th]["median"] if th else None),
               _ratio(x["median"], nested if k != "nested" else None),
               _ratio(x["median"], st[bp]["median"] if bp else None), _mib(mem, k)]
        if rss:
            r = mem.get(k, {}).get("rss", {})
            row.append(M.fmt_mib(r["peak_bytes"]) if "peak_bytes" in r else "")
        rows.append(row)
    for fk in ("floor_diag", "floor_lap", "floor_train"):
        if fk in st:
            x = st[fk]
            n = f"{x['n']}" + (f"x{reps[fk]}" if reps.get(fk, 1) > 1 else "")
            rows.append([label(fk), "GEMMs", n, _fmt(x["median"]),
                         f"{_fmt(x['min'])}-{_fmt(x['max'])}", _fmt(x["iqr"]),
                         "1.00x", "", "", "", ""] + ([""] if rss else []))
    lines.append(M.markdown_table(headers, rows))
    lines.append("")
    for k, why in rec.get("failed", {}).items():
        lines.append(f"- **FAILED** {label(k)}: {why}")
    for k, why in rec.get("skipped", {}).items():
        lines.append(f"- skipped {label(k)}: {why}")
    if rec.get("warmup_counted"):
        lines.append("- n*: the warm-up call (over half the method budget) is one of the samples")
    if any(v > 1 for v in reps.values()):
        lines.append("- n x c: n samples of c calls each (calls under --min-sample-ms), times per "
                     "call")
    for k, c in rec.get("compile_s", {}).items():
        lines.append(f"- {label(k)}: " + (f"compiled in {c:.1f} s before its warm-up (not in its "
                                           f"times)" if c > 0 else "its graph (dynamic in N) was "
                                           "compiled in an earlier block"))
    lines.append("- / best peer: over the fastest other method of the same task that is not "
                 "torchhessdiag's and not a floor")
    lines.append(f"- load average (1 min) {rec.get('loadavg_before', ['?'])[0]} before, "
                 f"{rec.get('loadavg_after', ['?'])[0]} after; {rec.get('threads')} threads; "
                 f"{rec.get('elapsed_s', 0):.0f} s")
    lines.append("")
    return "\n".join(lines)


def _group_key(s: dict) -> tuple:
    return (s["device"], s["dtype"], s["activation"], tuple(s["widths"]), s["N"], s["mode"])


def groups(records: List[dict]) -> "OrderedDict[tuple, List[dict]]":
    g: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in records:
        g.setdefault(_group_key(r["setting"]), []).append(r)
    for v in g.values():
        v.sort(key=lambda r: r["setting"]["d"])
    return g


def summary_markdown(records: List[dict]) -> str:
    out = []
    for gk, recs in groups(records).items():
        s = dict(recs[0]["setting"])
        s.pop("d")
        keys = [k for k in [*METHODS, "floor_diag", "floor_lap", "floor_train"]
                if any(k in r.get("stats_s", {}) for r in recs)]
        if not keys:
            continue
        out.append(f"### Summary: {title({**s, 'd': 'various'})} (median ms per call)")
        out.append("")
        rows = []
        for r in recs:
            st = r.get("stats_s", {})
            row = [r["setting"]["d"]]
            for k in keys:
                if k in st:
                    row.append(_fmt(st[k]["median"]))
                elif k in r.get("failed", {}):
                    row.append("FAILED")
                elif k in r.get("skipped", {}):
                    row.append("skipped")
                else:
                    row.append("-")
            rows.append(row)
        out.append(M.markdown_table(["d"] + [label(k) for k in keys], rows))
        out.append("")
    return "\n".join(out)


def thd_vs_peers(records: List[dict]) -> List[dict]:
    """One row per block and task: torchhessdiag's method, nested autograd and the best other
    method (medians) -- what issue 13's targets are about."""
    rows = []
    for r in records:
        st, s = r.get("stats_s", {}), r["setting"]
        for t in tasks_of(r):
            th = THD_OF_TASK[t]
            bp = best_peer(r, t)
            fl = "floor_train" if t == "train" else ("floor_diag" if t == "diag" else
                                                     ("floor_lap" if "floor_lap" in st else
                                                      "floor_diag"))
            rows.append(dict(
                setting=s, task=t, thd=th if th in st else None,
                thd_s=st[th]["median"] if th in st else None, peer=bp,
                peer_s=st[bp]["median"] if bp else None,
                nested_s=st["nested"]["median"] if "nested" in st else None,
                floor_s=st[fl]["median"] if fl in st else None,
                thd_status=("FAILED" if th in r.get("failed", {}) else
                            "skipped" if th in r.get("skipped", {}) else None)))
    return rows


def thd_summary_markdown(records: List[dict]) -> str:
    """The table of torchhessdiag vs the best peer across the grid (and vs nested autograd)."""
    rows = thd_vs_peers(records)
    if not rows:
        return ""
    out = ["### torchhessdiag vs the best other exact method (median ms per call)", "",
           "speed-up = peer / thd (> 1: thd faster). Best peer: the fastest method of the task that "
           "is not torchhessdiag's and not the GEMM floor, in the same block.", ""]
    table = []
    for x in rows:
        s = x["setting"]
        w = s["widths"]
        ws = f"{w[0]}x{len(w)}" if len(set(w)) == 1 else "-".join(map(str, w))
        thd = _fmt(x["thd_s"]) if x["thd_s"] else (x["thd_status"] or "-")
        table.append([
            s["mode"], x["task"], s["dtype"], s["d"], ws, s["N"], thd,
            f"{label(x['peer'])}: {_fmt(x['peer_s'])}" if x["peer"] else "-",
            f"{x['peer_s'] / x['thd_s']:.2f}x" if x["peer_s"] and x["thd_s"] else "",
            _fmt(x["nested_s"]) if x["nested_s"] else "-",
            f"{x['nested_s'] / x['thd_s']:.2f}x" if x["nested_s"] and x["thd_s"] else "",
            f"{x['thd_s'] / x['floor_s']:.2f}x" if x["floor_s"] and x["thd_s"] else ""])
    out.append(M.markdown_table(["mode", "task", "dtype", "d", "widths", "N", "thd ms",
                                 "best peer ms", "speed-up vs best peer", "nested ms",
                                 "speed-up vs nested", "thd / floor"], table))
    out.append("")
    return "\n".join(out)


def paper_markdown(records: List[dict]) -> str:
    p = PAPER["setting"]
    recs = [r for r in records if r["setting"]["d"] == p["d"]
            and list(r["setting"]["widths"]) == p["widths"]
            and r["setting"]["activation"] == p["activation"] and r["setting"]["dtype"] == p["dtype"]]
    if not recs:
        return ""
    out = ["### The Taylor-mode paper's setting (tanh MLP 50 -> 768 -> 768 -> 512 -> 512 -> 1, "
           "float64)", "",
           f"Published (Collapsing Taylor mode, {PAPER['device']}, a different device): per datum "
           + ", ".join(f"{k} {v} ms" for k, v in PAPER["per_datum_ms"].items()) + ".", ""]
    rows = []
    for r in recs:
        st, s = r.get("stats_s", {}), r["setting"]
        for k in METHODS:
            if k in st:
                rows.append([s["device"], s["mode"], s["N"], label(k), M.fmt_ms(st[k]["median"]),
                             f"{st[k]['median'] / s['N'] * 1e3:.4f}"])
    out.append(M.markdown_table(["device", "mode", "N", "method", "median ms", "ms per point"],
                                rows))
    out.append("")
    return "\n".join(out)


def write_markdown(path: str, env: dict, records: List[dict], how: str) -> str:
    parts = ["# torchhessdiag benchmark", "", env_markdown(env), "", how, ""]
    pm = paper_markdown(records)
    if pm:
        parts += [pm]
    parts += [thd_summary_markdown(records), summary_markdown(records), "## Blocks", ""]
    parts += [block_markdown(r, env) for r in records]
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text


def env_markdown(env: dict) -> str:
    rows = [["device", env.get("device_label", env.get("device"))],
            ["torch", env.get("torch")], ["torchhessdiag", f"{env.get('torchhessdiag')} "
                                                          f"({env.get('backend')})"],
            ["git commit", env.get("git", {}).get("commit")],
            ["threads (torch)", env.get("threads")], ["cpu", f"{env.get('cpu')} "
                                                               f"({env.get('cpu_count')} cores)"],
            ["python", env.get("python")], ["jet-for-pytorch", env.get("jet") or "not installed"]]
    if env.get("git", {}).get("dirty_files"):
        rows.append(["uncommitted changes", ", ".join(env["git"]["dirty_files"])[:300]])
    return M.markdown_table(["", ""], rows)


def write_json(path: str, env: dict, records: List[dict], extra: dict) -> None:
    with open(path, "w") as f:
        json.dump({"env": env, **extra, "records": records}, f, indent=1, default=str)


def write_plots(folder: str, records: List[dict]) -> List[str]:
    """time vs d (log-log) per method, and peak memory vs d, one PNG each per group of
    settings with at least two values of d. Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for gk, recs in groups(records).items():
        if len({r["setting"]["d"] for r in recs}) < 2:
            continue
        s = dict(recs[0]["setting"])
        tag = (f"{s['device'].replace(':', '')}_{s['dtype']}_{s['activation']}_"
               f"w{'-'.join(map(str, s['widths']))}_N{s['N']}_{s['mode']}")
        for what in ("time", "memory"):
            fig, ax = plt.subplots(figsize=(10, 4.8))
            any_line = False
            for k in [*METHODS, "floor_diag", "floor_lap", "floor_train"]:
                ds, ys = [], []
                for r in recs:
                    if what == "time" and k in r.get("stats_s", {}):
                        ds.append(r["setting"]["d"])
                        ys.append(r["stats_s"][k]["median"] * 1e3)
                    elif what == "memory" and "peak_bytes" in r.get("memory", {}).get(k, {}):
                        ds.append(r["setting"]["d"])
                        ys.append(r["memory"][k]["peak_bytes"] / 2**20)
                if ds:
                    any_line = True
                    style = "--" if k.startswith("floor") else "-"
                    lw = 2.5 if METHODS.get(k) is not None and METHODS[k].is_thd else 1.3
                    ax.plot(ds, ys, style, marker="o", lw=lw, label=label(k))
            if not any_line:
                plt.close(fig)
                continue
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("input dimension d")
            ax.set_ylabel("median ms per call" if what == "time" else "peak MiB")
            ax.set_title(title({**s, "d": "(x axis)"}), fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            path = os.path.join(folder, f"{what}_{tag}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files
