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
