"""What every exgrpo benchmark reports the same way: the machine, timings as median and spread,
peak memory above the inputs, the matmul rate measured in the same run, a table and a JSON record.

Run from the repository root: `python -m bench.<script>` or `python bench/<script>.py`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import transformers
    import triton
    info = {
        "host_cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        root = Path(__file__).resolve().parent.parent
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, *, warmup: int, reps: int) -> dict:
    """Wall time per call in ms: median, p10/p90 and min over `reps` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    q = lambda p: ms[min(len(ms) - 1, int(p * (len(ms) - 1) + 0.5))]
    return {"median_ms": statistics.median(ms), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": ms[0], "reps": reps}


def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak CUDA memory above what was allocated before the call (None on CPU: no allocator stats)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_tflops(M: int, K: int, N: int, dtype, device, *, warmup=3, reps=10) -> float:
    """The measured rate of one [M, K] @ [K, N] GEMM: the peak the kernels are held against."""
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device)
    t = time_fn(lambda: a @ b.T, device, warmup=warmup, reps=reps)
    return 2 * M * K * N / (t["median_ms"] * 1e-3) / 1e12


def result_path(name: str, record: dict, out_dir: Path | None = None) -> Path:
    """Where this run's JSON goes: out_dir (default bench/results)/name-{gpu|cpu}-timestamp.json."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev = "gpu" if record["machine"].get("gpu") else "cpu"
    return out_dir / f"{name}-{dev}-{stamp}.json"


def write_json(path: Path, record: dict) -> None:
    """Replace path's contents atomically: a kill mid-write leaves the previous version, not half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; cols = (header, key, format)."""
    fmt = lambda v, f: "—" if v is None else (format(v, f) if f else str(v))
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k), f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def error_text(e: BaseException, limit: int = 300) -> str:
    """A failure as one line for a result row: "Type: first line of the message" (cut at `limit`)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


def profile_top(fn, device, n: int = 25) -> list[dict]:
    """Run fn once under torch.profiler; the n operators with the most self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    self_us = lambda e: getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total
    total_us = lambda e: getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total
    events = sorted(prof.key_averages(), key=self_us, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_ms": self_us(e) / 1e3, "total_ms": total_us(e) / 1e3}
            for e in events]


def profile_table(top: list[dict]) -> str:
    """profile_top's rows as a table."""
    return table(top, [("op", "op", ""), ("calls", "calls", "d"), ("self ms", "self_ms", ".2f"),
                       ("total ms", "total_ms", ".2f")])
