"""Measurement helpers of the benchmark suite: device selection, timing, peak memory, the
environment record, a progress bar and report formatting.

Timing
    ``time_interleaved`` runs several methods in round-robin order (A, B, A, B, ...) after a
    warm-up, so that slow drift of a shared, noisy machine hits every method alike. On CUDA each
    run is bracketed by CUDA events and synchronised; on CPU it is wall time
    (``time.perf_counter``). ``summarize`` reports median, min, max and the inter-quartile range.

Peak memory
    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
      allocated just before the run (``cuda_peak``).
    * CPU, process level (``cpu_peak_rss``): the increase of the resident set over the run, i.e.
      ``VmHWM`` after the run minus ``VmRSS`` just before it, both from ``/proc/self/status``. The
      high-water mark is reset to the current RSS right before the run by writing ``5`` to
      ``/proc/self/clear_refs`` (Linux >= 4.0), so a larger transient during setup cannot leak into
      the number. Where the reset is refused the value is flagged as an upper bound. This number is
      only sound for the *first* large run of a fresh process: afterwards the allocator keeps
      freed pages resident and a later run reuses them, so its RSS increase undercounts. Run it in
      a fresh subprocess per method (``run_worker``) after a tiny warm-up that initialises the
      libraries without touching much memory. The number includes what the allocator keeps: with
      glibc's default dynamic mmap threshold, freed multi-MiB tensors stay in the heap and
      fragment it, so the RSS peak can be ~2x the tensor peak; with ``MALLOC_MMAP_THRESHOLD_=65536``
      in the environment (large blocks always mmap'ed and unmapped on free) it matched the tensor
      peak below to within 1 % on the drop-in benchmark.
    * CPU, tensor level (``cpu_peak_tensor``): the maximum over time of the bytes held by live
      tensors above what was live at the start, from the allocation/free events that
      ``torch.profiler`` records with ``profile_memory=True`` -- the CPU analogue of
      ``max_memory_allocated``. It ignores allocator overhead/fragmentation and scratch memory of
      libraries (BLAS, oneDNN), and does not depend on which run it is.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# ---- device ----------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else is passed to torch.device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
             "float64": torch.float64, "double": torch.float64, "fp64": torch.float64}
    if name not in table:
        raise SystemExit(f"unknown dtype {name!r}; use float32 or float64")
    return table[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing ----------------------------------------------------------------------------------


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of fn (CUDA: between events, synchronised)."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
) -> Dict[str, List[float]]:
    """Time every fn ``repeats`` times, round-robin, after ``warmup`` untimed calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(time_once(fn, device))
    return out


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """median, min, max, q1, q3, iqr, mean of a list of seconds."""
    xs = sorted(times)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "mean": statistics.fmean(xs),
    }


# ---- memory ----------------------------------------------------------------------------------

_KB = 1024


def proc_status() -> Dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        text = f.read()
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * _KB
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (write 5 to /proc/self/clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    st = proc_status()
    return st.get("VmHWM", -1) <= st.get("VmRSS", -1) + 64 * _KB


def cpu_peak_rss(fn: Callable[[], object]) -> Dict[str, object]:
    """Peak RSS increase over one call of fn: VmHWM(after) - VmRSS(before), HWM reset first.

    Sound for the first large run of a fresh process only (see the module docstring).
    """
    gc.collect()
    reset_ok = reset_peak_rss()
    before = proc_status()
    fn()
    after = proc_status()
    peak = after["VmHWM"] - before["VmRSS"]
    return {
        "method": "rss",
        "peak_bytes": peak,
        "rss_before": before["VmRSS"],
        "hwm_after": after["VmHWM"],
        "hwm_reset": reset_ok,
        # without the reset, a setup transient above the run's peak would show instead
        "upper_bound": not reset_ok,
    }


def cpu_peak_tensor(fn: Callable[[], object], collect: bool = True) -> Dict[str, object]:
    """Peak bytes of live CPU tensors above the starting level during fn, from the allocation
    events of torch.profiler (profile_memory=True), the library's pooled buffers included. ``collect=False`` skips the gc.collect()
    first (slow in a large process; frees of older tensors during fn only lower the count)."""
    from torch.profiler import ProfilerActivity, profile

    import torchhessdiag

    if collect:
        gc.collect()
    # (the pooled CPU buffers report to the profiler as torch's allocator does: allocated while a
    # tensor holds them, freed when it goes; they are released first all the same, so that the
    # count starts from the same state as a fresh process)
    torchhessdiag.empty_cache()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if not str(e.device_type()).endswith("CPU"):
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return {"method": "profiler", "peak_bytes": peak, "events": len(events)}


def cuda_peak(fn: Callable[[], object], device: torch.device) -> Dict[str, object]:
    """Peak CUDA bytes allocated during fn above what was allocated just before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return {
        "method": "cuda_max_memory_allocated",
        "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
        "allocated_before": base,
    }


# ---- fresh-process workers -------------------------------------------------------------------

WORKER_TAG = "@@RESULT@@ "


def emit_worker_result(obj: dict) -> None:
    """Print a worker's result as one tagged JSON line (read by run_worker)."""
    sys.stdout.write(WORKER_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_worker(argv: Sequence[str], timeout: Optional[float] = None) -> dict:
    """Run ``python argv...`` in a fresh process; return the dict it emitted."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    raise RuntimeError(
        f"worker {' '.join(argv)} failed (rc={proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


# ---- environment and report ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info(device: torch.device) -> Dict[str, object]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_mib(nbytes: Optional[float]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ---- run record: git, load, progress -----------------------------------------------------------


def git_info() -> Dict[str, object]:
    """The git commit of the torchhessdiag sources (when they live in a git checkout) and whether
    the package or benchmark files differ from it; ``{"commit": "unknown"}`` otherwise."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": "unknown"}
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "torchhessdiag",
                                "benchmarks", "csrc"], capture_output=True, text=True, timeout=10)
        files = [ln[3:] for ln in dirty.stdout.splitlines() if ln.strip()]
        return {"commit": commit.stdout.strip(), "dirty_files": files}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown"}


def loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


class Progress:
    """A tiny progress bar on stderr (tqdm is used instead where it is installed)."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total, self.n, self.desc, self.enabled = max(total, 1), 0, desc, enabled
        self.t0 = time.perf_counter()
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm  # optional

                self._tqdm = tqdm(total=total, desc=desc, leave=True, file=sys.stderr)
            except ImportError:
                pass
        self._tty = sys.stderr.isatty()
        self.note("")

    def note(self, text: str) -> None:
        """Show what is running now."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text)
            return
        width = 24
        done = int(width * self.n / self.total)
        el = time.perf_counter() - self.t0
        line = (f"{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                f"{int(el // 60):02d}:{int(el % 60):02d} {text}")
        if self._tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def update(self, k: int = 1, text: str = "") -> None:
        self.n += k
        if self._tqdm is not None:
            self._tqdm.update(k)
        self.note(text)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self._tty:
            sys.stderr.write("\n")
