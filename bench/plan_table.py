"""The README's Gemma-7B plan table: `exgrpo plan` for each training setup at bench/step.py's shape.

    python bench/plan_table.py                       # writes bench/results/plan_gemma7b.json, prints the table

Every cell is planned on fake tensors by `exgrpo plan` (exgrpo.plan), not measured on a GPU. Rows: LoRA (AdamW)
and full fine-tuning (AdamW with fp32 moments, torchao's 8-bit AdamW), each with and without gradient
checkpointing; one H200 (141 GB).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from exgrpo.plan import GiB, PlanConfig, plan  # noqa: E402

ROWS = [("LoRA r=16, AdamW", dict(lora=True, optimizer="adamw")),
        ("full, AdamW (moments in bf16, as the weights)", dict(lora=False, optimizer="adamw")),
        ("full, 8-bit AdamW (torchao)", dict(lora=False, optimizer="adamw8bit"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-memory", default="141GB")
    ap.add_argument("--model-config", default="gemma-7b")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan_gemma7b.json"))
    a = ap.parse_args(argv)
    rows = []
    for name, setup in ROWS:
        for ckpt in (True, False):
            t0 = time.perf_counter()
            p = plan(PlanConfig(model_config=a.model_config, gpu_memory=a.gpu_memory, gradient_checkpointing=ckpt,
                                **setup))
            rows.append({"setup": name, "gradient_checkpointing": ckpt, **{k: p[k] for k in (
                "peak_bytes", "fits", "gpu_memory_bytes", "headroom_bytes", "overheads", "settings", "step")},
                "phases": {k: {"peak_bytes": v["peak_bytes"], "flops": v["flops"]} for k, v in p["phases"].items()}})
            print(f"{name}, checkpointing {'on' if ckpt else 'off'}: {p['peak_bytes'] / GiB:.1f} GiB "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"label": "planned on fake tensors, not measured on a GPU",
                                               "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    g = lambda n: f"{n / GiB:.1f}"      # noqa: E731
    lines = ["| setup | checkpointing | rollout | log-probs | loss fwd+bwd | optimizer | peak with overheads | "
             "fits one H200 (141 GB) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ph = r["phases"]
        ckpt = "on" if r["gradient_checkpointing"] else "off"
        lines.append(f"| {r['setup']} | {ckpt} | {g(ph['rollout']['peak_bytes'])}"
                     f" | {g(ph['logprobs']['peak_bytes'])} | {g(ph['loss']['peak_bytes'])} | "
                     f"{g(ph['optimizer']['peak_bytes'])} | {g(r['peak_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} ({g(r['headroom_bytes'])} GiB headroom) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
