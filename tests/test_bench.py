"""The benchmark scripts run in a tiny CPU mode here, so they cannot rot. Timing is irrelevant on
this machine (pytest runs with --benchmark-disable): the checks are that every provider that can run
does, records its numbers, and a provider that cannot is reported with the reason."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_bench_lmhead_tiny(benchmark, tmp_path):
    from bench.bench_lmhead import main
    record = benchmark(main, ["--tiny", "--out", str(tmp_path)])
    files = list(tmp_path.glob("lmhead-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["results"] == record["results"]
    rows = {(r["op"], r["provider"]): r for r in record["results"]}
    for op in ("logprobs", "loss"):
        for prov in ("eager", "torch", "triton"):
            r = rows[(op, prov)]
            assert r["error"] is None, r
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["matmul_tflops"] > 0
    assert rows[("logprobs", "liger")]["error"] == "not applicable"
    assert rows[("loss", "cuda")]["error"].startswith("unavailable")
    assert record["machine"]["torch"] and "commit" in record["machine"]
    assert not list(tmp_path.glob("*.png"))                 # one N: no plot unless --plot


def _png(path: Path):
    """The image as an array; fails unless `path` is a real, non-trivial PNG."""
    import matplotlib.image as mpimg
    assert path.is_file() and path.stat().st_size > 20_000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.01
    return img


def test_bench_lmhead_tiny_sweep(tmp_path, capsys):
    """--tiny --sweep: every (op, provider, N) row is recorded, and the plot is written next to the JSON."""
    from bench.bench_lmhead import PROVIDERS, TINY_SWEEP_N, main
    record = main(["--tiny", "--sweep", "--out", str(tmp_path)])
    [js] = tmp_path.glob("lmhead-cpu-*.json")
    saved = json.loads(js.read_text())
    assert saved["results"] == record["results"] and saved["args"]["n"] == TINY_SWEEP_N
    rows = {(r["op"], r["provider"], r["N"]): r for r in saved["results"]}
    assert set(rows) == {(op, p, n) for op in ("logprobs", "loss") for p in PROVIDERS for n in TINY_SWEEP_N}
    for (op, prov, _), r in rows.items():
        assert (r["H"], r["V"], r["dtype"]) == (32, 1000, "fp32")
        if prov in ("eager", "torch", "triton"):
            assert r["error"] is None, r
            assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["tflops"] > 0
            assert r["peak_extra_mb"] is None and r["peak_reserved_mb"] is None     # CPU: not measured
        elif prov == "cuda":
            assert r["error"].startswith("unavailable"), r
        elif op == "logprobs":
            assert r["error"] == "not applicable", r
        else:                                                # liger's loss on CPU: a time or an error, recorded
            assert (r["error"] is None and r["median_ms"] > 0) or r["error"], r
    png = js.with_suffix(".png")
    _png(png)
    assert f"wrote {png}" in capsys.readouterr().out
    (tmp_path / "again").mkdir()
    from bench.plots import main as replot
    assert replot([str(js), "--out", str(tmp_path / "again" / "p.png")]) == tmp_path / "again" / "p.png"
    _png(tmp_path / "again" / "p.png")


def _gpu_record():
    """A GPU-shaped record: memory measured, triton OOMs at the largest N, cuda fails at every N."""
    ns, res = [2048, 8192, 32768], []
    for op in ("logprobs", "loss"):
        for n in ns:
            for j, p in enumerate(("eager", "torch", "triton", "cuda")):
                r = {"op": op, "provider": p, "N": n, "H": 3072, "V": 256000, "dtype": "bf16", "matmul_tflops": 600.0,
                     "error": None}
                if p == "cuda":
                    r["error"] = "unavailable: exgrpo._C is not built"
                elif p == "triton" and n == ns[-1]:
                    r["error"] = "OutOfMemoryError: CUDA out of memory. Tried to allocate 15.62 GiB"
                else:
                    t = 6 * n * 3072 * 256000 / 400e12 * 1e3 * (1 + j)
                    r.update(median_ms=t, p10_ms=0.95 * t, p90_ms=1.1 * t, peak_extra_mb=(3 - j) * n / 8,
                             peak_reserved_mb=2000 + (3 - j) * n / 6)
                res.append(r)
    machine = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "dirty": False, "triton_interpret": False}
    return {"bench": "lmhead", "machine": machine, "args": {"dtype": "bf16", "h": 3072, "v": 256000}, "results": res}


def test_plot_sweep_gaps_and_memory(tmp_path):
    """An error at one N leaves a gap in that provider's time and memory lines; measured memory is drawn, not the
    CPU note; a provider with no result at all is named; the title carries the machine and the shapes."""
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.plots import plot_record, sweep_figure
    rec = _gpu_record()
    fig = sweep_figure(rec)
    try:
        title = fig._suptitle.get_text()
        assert all(s in title for s in ("NVIDIA H100", "bf16", "H=3072", "V=256000", "abc1234"))
        for ax_t, ax_m in zip(fig.axes[0::2], fig.axes[1::2]):             # rows: logprobs, loss
            times = {c.get_label(): np.asarray(c.lines[0].get_ydata(), float) for c in ax_t.containers}
            assert set(times) == {"eager", "torch", "triton"}
            assert np.isfinite(times["eager"]).all()
            assert np.isfinite(times["triton"][:2]).all() and np.isnan(times["triton"][2])
            gaps = " ".join(ax_t.get_title().split("no result: ")[1].split())
            assert gaps == "triton at N=32768 (OutOfMemoryError); cuda (unavailable)", gaps
            mem = {ln.get_label(): np.asarray(ln.get_ydata(), float) for ln in ax_m.lines}
            assert {"eager", "torch", "triton", "triton reserved"} <= set(mem)
            assert np.isnan(mem["triton"][2]) and np.isfinite(mem["eager"]).all() and mem["eager"][0] == 3 * 2048 / 8
            assert ax_m.get_yscale() == ax_t.get_yscale() == ax_t.get_xscale() == "log"
            assert not any("not measured" in t.get_text() for t in ax_m.texts)
    finally:
        plt.close(fig)
    _png(plot_record(rec, tmp_path / "gpu.png"))


def test_bench_lmhead_sweep_survives_failures(tmp_path, monkeypatch):
    """An OOM in one provider at one N, and inputs that do not fit at another N, are recorded; the sweep goes on."""
    import torch

    import bench.bench_lmhead as B
    step_fn, make_inputs = B.step_fn, B.make_inputs

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.62 GiB")

    monkeypatch.setattr(B, "step_fn", lambda p, op, x: oom if p == "torch" and x["N"] == 96 else step_fn(p, op, x))
    monkeypatch.setattr(B, "make_inputs", lambda N, *a: oom() if N == 192 else make_inputs(N, *a))
    record = B.main(["--tiny", "--sweep", "--providers", "eager", "torch", "--out", str(tmp_path)])
    rows = {(r["op"], r["provider"], r["N"]): r for r in record["results"]}
    assert len(rows) == 2 * 2 * 3
    for op in ("logprobs", "loss"):
        assert rows[(op, "torch", 96)]["error"].startswith("OutOfMemoryError: CUDA out of memory")
        assert rows[(op, "eager", 96)]["error"] is None and rows[(op, "torch", 48)]["error"] is None
        assert all(rows[(op, p, 192)]["error"].startswith("inputs: OutOfMemoryError") for p in ("eager", "torch"))
    _png(next(tmp_path.glob("lmhead-cpu-*.png")))
    import matplotlib.pyplot as plt

    from bench.plots import sweep_figure
    fig = sweep_figure(record)
    try:
        assert " ".join(fig.axes[0].get_title().split()).endswith(     # the note is wrapped
            "no result: all at N=192 (inputs: OutOfMemoryError); torch at N=96 (OutOfMemoryError)")
    finally:
        plt.close(fig)


def test_bench_lmhead_interrupted_sweep_keeps_finished_n(tmp_path, monkeypatch):
    """The JSON is rewritten after every N: a sweep killed at the third N (a stage time limit on the GPU
    machine) keeps the first two; --profile puts each provider's top operators in its row."""
    import pytest

    import bench.bench_lmhead as B
    make_inputs = B.make_inputs

    def killed_at_192(N, *a):
        if N == 192:
            raise KeyboardInterrupt                          # not an Exception: nothing catches it
        return make_inputs(N, *a)

    monkeypatch.setattr(B, "make_inputs", killed_at_192)
    with pytest.raises(KeyboardInterrupt):
        B.main(["--tiny", "--sweep", "--providers", "torch", "--profile", "--out", str(tmp_path)])
    [js] = tmp_path.glob("lmhead-cpu-*.json")
    rows = json.loads(js.read_text())["results"]
    assert sorted({r["N"] for r in rows}) == [48, 96] and all(r["error"] is None for r in rows)
    for r in rows:
        assert r["profile"] and any("mm" in p["op"] for p in r["profile"]), r.get("profile")
