"""Plots of a bench_lmhead record: per op, forward+backward time and peak memory against N, one line per provider.

    python bench/plots.py bench/results/lmhead-gpu-....json      # writes lmhead-gpu-....png next to it

Time: median ms per call, error bars p10–p90, next to the time three N·H·V GEMMs take at the matmul rate
measured in the same run (about the floor for forward+backward). Memory: peak CUDA memory above the inputs
(solid) and, when recorded, the peak the allocator reserved, inputs included (dotted). Log-log axes. A provider
with an error at some N has no point there (its line breaks), and every gap is named, with its reason, in the
panel's title. Without CUDA the memory panels say so instead of staying empty.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path

COLOURS = {"eager": "C0", "torch": "C1", "triton": "C2", "cuda": "C3", "liger": "C4"}   # same in every panel
NAN = math.nan


def _ok(r: dict | None, key: str) -> bool:
    v = None if r is None or r.get("error") else r.get(key)
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0         # log axes: no zeros


def _reason(err: str) -> str:
    """'OutOfMemoryError: CUDA out of ...' -> 'OutOfMemoryError'; 'inputs: X: ...' -> 'inputs: X'."""
    parts = err.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "inputs" else parts[0]


def _commit(machine: dict) -> str:
    return (machine.get("commit") or "unknown commit") + ("+dirty" if machine.get("dirty") else "")


def title(record: dict) -> str:
    m, r0, a = record.get("machine", {}), record["results"][0], record.get("args", {})
    dev = m.get("gpu") or ("CPU, Triton interpreted" if m.get("triton_interpret") else "CPU")
    commit = _commit(m)
    return (f"LM head forward+backward vs N — {dev} · {r0.get('dtype', a.get('dtype'))} · H={r0.get('H', a.get('h'))} "
            f"· V={r0.get('V', a.get('v'))} · {commit}")


def sweep_figure(record: dict):
    """The figure: one row per op, [time, memory] panels, one legend below. The caller closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    rows = record["results"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    colour = {p: COLOURS.get(p, f"C{5 + i}") for i, p in enumerate(provs)}
    ns = sorted({r["N"] for r in rows})
    gpu = record.get("machine", {}).get("gpu")
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 4.2 * len(ops) + 0.6), squeeze=False)
    legend = {}
    for (ax_t, ax_m), op in zip(axes, ops):
        by = {(r["provider"], r["N"]): r for r in rows if r["op"] == op}
        at_n = {n: [r for (_, m), r in by.items() if m == n] for n in ns}
        dead = [n for n in ns if at_n[n] and all((r["error"] or "").startswith("inputs:") for r in at_n[n])]
        gaps = [f"all at N={n} ({_reason(at_n[n][0]['error'])})" for n in dead]   # the inputs did not fit
        for p in provs:                                     # "cuda (unavailable)", "triton at N=32768 (OOM)"
            mine = [n for n in ns if (p, n) in by and n not in dead]
            good = [n for n in mine if _ok(by[(p, n)], "median_ms")]
            bad = [n for n in mine if n not in good]
            why = ", ".join(sorted({_reason(by[(p, n)]["error"] or "no time") for n in bad}))
            if bad:
                gaps.append(f"{p} ({why})" if not good else f"{p} at N={', '.join(map(str, bad))} ({why})")
            if not good:
                continue
            med, p10, p90 = ([by[(p, n)][k] if n in good else NAN for n in ns]
                             for k in ("median_ms", "p10_ms", "p90_ms"))
            ax_t.errorbar(ns, med, yerr=[[m - lo for m, lo in zip(med, p10)], [hi - m for m, hi in zip(med, p90)]],
                          marker="o", ms=4, capsize=3, color=colour[p], label=p)
            legend[p] = Line2D([], [], color=colour[p], marker="o", ms=4, label=p)
            mem = [by[(p, n)]["peak_extra_mb"] if _ok(by.get((p, n)), "peak_extra_mb") else NAN for n in ns]
            res = [by[(p, n)]["peak_reserved_mb"] if _ok(by.get((p, n)), "peak_reserved_mb") else NAN for n in ns]
            if any(math.isfinite(v) for v in mem):
                ax_m.plot(ns, mem, marker="o", ms=4, color=colour[p], label=p)
            if any(math.isfinite(v) for v in res):
                ax_m.plot(ns, res, ls=":", marker=".", color=colour[p], label=f"{p} reserved")
        at = {r["N"]: r for r in by.values() if _ok({"mm": r.get("matmul_tflops")}, "mm")}
        floor = [6 * n * at[n]["H"] * at[n]["V"] / (at[n]["matmul_tflops"] * 1e12) * 1e3 if n in at else NAN
                 for n in ns]
        if any(math.isfinite(v) for v in floor):
            ax_t.plot(ns, floor, "k--", lw=1, alpha=0.5, label="3 GEMMs")
            legend["gemm"] = Line2D([], [], color="k", ls="--", lw=1, alpha=0.5,
                                    label="3 N·H·V GEMMs at the matmul rate measured at that N")
        note = "\n" + textwrap.fill("no result: " + "; ".join(gaps), 80) if gaps else ""
        ax_t.set_title(f"{op}: time per call (median, p10–p90){note}", fontsize=9 if gaps else 10)
        ax_t.set_ylabel("ms")
        if not ax_m.lines:
            ax_m.set_title(f"{op}: peak memory", fontsize=10)
            ax_m.text(0.5, 0.5, "not measured on CPU" if not gpu else "no memory measured", transform=ax_m.transAxes,
                      ha="center", va="center", fontsize=12, color="0.4")
            ax_m.set_xticks([])
            ax_m.set_yticks([])
        else:
            dotted = any(ln.get_linestyle() == ":" for ln in ax_m.lines)
            ax_m.set_title(f"{op}: peak memory — solid: allocated above the inputs"
                           + ("\ndotted: reserved by the allocator, inputs included" if dotted else ""), fontsize=9)
            ax_m.set_ylabel("MiB")
        for ax in ([ax_t, ax_m] if ax_m.lines else [ax_t]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("N (tokens)")
            ax.grid(alpha=0.3)
    fig.suptitle(title(record), fontsize=10)
    handles = [legend[k] for k in [*provs, "gemm"] if k in legend]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    return fig


STEP_PHASES = ("rollout", "logprobs", "loss", "optimizer")


def step_figure(record: dict):
    """bench/step.py's record: per case, the step's phases as stacked time bars, and each phase's peak
    allocated memory. A case that failed is drawn as its error. The caller closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = record["results"]
    cases = [r["case"] for r in res]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * len(cases)), sharey=True)
    y = list(range(len(cases)))[::-1]
    mem_seen, longest = False, 0.0
    for yi, r in zip(y, res):
        if r.get("error"):
            ax_t.text(0.01, yi, textwrap.shorten("failed: " + r["error"], 90), transform=ax_t.get_yaxis_transform(),
                      va="center", fontsize=8, color="C3")
            continue
        left = 0.0
        for i, ph in enumerate(STEP_PHASES):
            sec = r["phases"].get(ph, {}).get("ms", 0.0) / 1e3
            ax_t.barh(yi, sec, left=left, color=f"C{i}")
            left += sec
        longest = max(longest, left)
        upd = r["phases"].get("update", {})
        if upd.get("tokens_per_s"):
            ax_t.text(left, yi, f"  update {upd['tokens_per_s']:.4g} tok/s", va="center", fontsize=8)
        for i, ph in enumerate(STEP_PHASES):
            gb = r["phases"].get(ph, {}).get("peak_alloc_gb")
            if gb is not None:
                mem_seen = True
                ax_m.barh(yi + (1.5 - i) * 0.2, gb, height=0.2, color=f"C{i}")
    ax_t.set_yticks(y, cases)
    ax_t.set_ylim(-0.6, len(cases) - 0.4)
    ax_t.set_xlabel("seconds per step (median)")
    if longest > 0:
        ax_t.set_xlim(0, longest * 1.35)                    # room for the tokens/s labels
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(STEP_PHASES))]
    fig.legend(handles, STEP_PHASES, fontsize=8, loc="lower center", ncol=len(STEP_PHASES), frameon=False)
    ax_t.set_title("time per phase", fontsize=10)
    if mem_seen:
        ax_m.set_xlabel("GB")
        ax_m.set_title("peak allocated memory per phase", fontsize=10)
    else:
        ax_m.text(0.5, 0.5, "memory not measured on CPU", transform=ax_m.transAxes, ha="center", va="center",
                  fontsize=12, color="0.4")
        ax_m.set_xticks([])
    m, a = record.get("machine", {}), record.get("args", {})
    dev = m.get("gpu") or "CPU"
    commit = _commit(m)
    fig.suptitle(f"one ExGRPO step — {dev} · hidden {a.get('shape', {}).get('hidden_size')} · "
                 f"{a.get('questions')}×2×{a.get('group')} dialogues of ≤ {a.get('k_probes')} probes + Q, "
                 f"{a.get('completion')} tokens per turn · {commit}", fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    return fig


def plot_record(record: dict, path: Path) -> Path:
    """Draw a bench_lmhead sweep or a bench/step.py record to the PNG `path`."""
    import matplotlib.pyplot as plt
    fig = step_figure(record) if record.get("bench") == "step" else sweep_figure(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Re-plot a saved bench_lmhead or bench/step.py record.")
    p.add_argument("record", help="lmhead-*.json or step-*.json from bench/")
    p.add_argument("--out", default=None, help="PNG path (default: next to the JSON, same stem)")
    a = p.parse_args(argv)
    src = Path(a.record)
    path = plot_record(json.loads(src.read_text()), Path(a.out) if a.out else src.with_suffix(".png"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
