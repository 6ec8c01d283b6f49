"""The README's Gemma-7B plan table: `exgrpo plan` for each training setup at bench/step.py's shape.

    python bench/plan_table.py                       # writes bench/results/plan_gemma7b.json, prints the table

Every cell is planned on fake tensors by `exgrpo plan` (exgrpo.plan), not measured on a GPU. Rows: LoRA (AdamW)
and full fine-tuning (AdamW, torchao's 8-bit AdamW), each with and without gradient checkpointing; one H200
(141 GB). Per row:

* the step at bench/step.py's shape (one question, G = 8 per scenario, 128 new tokens per turn), phase by phase;
* the same step with the loss through materialised [tokens, V] logits (`--eager-loss`, bench/step.py's
  loss_eager peer): its loss phase and whether the step then fits;
* the largest G in GROUPS that fits, with the rollout batch 2G (both scenarios of the question in one generate
  call, as at G = 8), and the largest new-token count per turn in COMPLETIONS that fits at G = 8. The search
  starts at the bench shape and walks up while it fits, or down until it does; each try is one plan, all kept
  in the JSON. A completion whose dialogue exceeds the model's context is refused as `exgrpo train` refuses it.
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
GROUPS = (1, 2, 4, 8, 16, 32, 64)            # G per scenario; the bench shape is 8
COMPLETIONS = (32, 64, 128, 256, 512, 1024, 2048)   # new tokens per turn; the bench shape is 128


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-memory", default="141GB")
    ap.add_argument("--model-config", default="gemma-7b")
    ap.add_argument("--no-search", action="store_true", help="the bench shape and its peer only, no G/length search")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan_gemma7b.json"))
    ap.add_argument("--print-only", action="store_true", help="print the table of the JSON at --out, plan nothing")
    a = ap.parse_args(argv)
    if a.print_only:
        print(table(json.loads(Path(a.out).read_text())["rows"]))
        return 0
    rows = []
    for name, setup in ROWS:
        for ckpt in (True, False):
            base = dict(model_config=a.model_config, gpu_memory=a.gpu_memory, gradient_checkpointing=ckpt, **setup)
            label = f"{name}, checkpointing {'on' if ckpt else 'off'}"
            p = timed(label, base)
            eager = timed(label + ", materialised logits", {**base, "eager_loss": True})
            row = {"setup": name, "gradient_checkpointing": ckpt, **{k: p[k] for k in (
                "peak_bytes", "fits", "gpu_memory_bytes", "headroom_bytes", "overheads", "settings", "step")},
                "phases": phases(p),
                "eager_loss": {"peak_bytes": eager["peak_bytes"], "fits": eager["fits"], "phases": phases(eager)}}
            if not a.no_search:
                row["largest_group"] = search(label, base, "group_size", GROUPS, 8, p["fits"],
                                              lambda g: {"group_size": g, "rollout_batch_size": 2 * g})
                row["largest_completion"] = search(label, base, "max_new_tokens", COMPLETIONS, 128, p["fits"],
                                                   lambda n: {"max_new_tokens": n})
            rows.append(row)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"label": "planned on fake tensors, not measured on a GPU",
                                               "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


def timed(label: str, settings: dict) -> dict:
    t0 = time.perf_counter()
    p = plan(PlanConfig(**settings))
    print(f"{label}: {p['peak_bytes'] / GiB:.1f} GiB, {'fits' if p['fits'] else 'does not fit'} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return p


def phases(p: dict) -> dict:
    return {k: {"peak_bytes": v["peak_bytes"], "flops": v["flops"]} for k, v in p["phases"].items()}


def search(label: str, base: dict, name: str, values: tuple, start, start_fits: bool, change) -> dict:
    """The largest of `values` at which the step fits: from `start` (already planned) upwards while it fits, or
    downwards until it does. Returns {"value": the largest that fits or None, "tries": [...]}."""
    i = values.index(start)
    tries = [{name: start, "fits": start_fits}]
    order = values[i + 1:] if start_fits else values[:i][::-1]
    best = start if start_fits else None
    for v in order:
        try:
            p = timed(f"{label}, {name} {v}", {**base, **change(v)})
            tries.append({name: v, "peak_bytes": p["peak_bytes"], "fits": p["fits"]})
            ok = p["fits"]
        except ValueError as e:                      # past the model's context: exgrpo train refuses it
            print(f"{label}, {name} {v}: {e}", file=sys.stderr, flush=True)
            tries.append({name: v, "fits": False, "refused": str(e)})
            ok = False
        if ok:
            best = v
            if not start_fits:
                break
        elif start_fits:
            break
    return {"value": best, "tries": tries, "tried": list(values)}


def table(rows: list[dict]) -> str:
    g = lambda n: f"{n / GiB:.1f}"      # noqa: E731
    lines = ["| setup | checkpointing | rollout | log-probs | loss fwd+bwd | loss fwd+bwd, materialised logits | "
             "optimizer | peak with overheads | fits the GPU | largest G (rollout batch 2G) | "
             "largest new tokens per turn |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ph, eager = r["phases"], r["eager_loss"]
        ckpt = "on" if r["gradient_checkpointing"] else "off"
        lines.append(f"| {r['setup']} | {ckpt} | {g(ph['rollout']['peak_bytes'])}"
                     f" | {g(ph['logprobs']['peak_bytes'])} | {g(ph['loss']['peak_bytes'])} | "
                     f"{g(eager['phases']['loss']['peak_bytes'])} (step {'fits' if eager['fits'] else 'does not fit'})"
                     f" | {g(ph['optimizer']['peak_bytes'])} | {g(r['peak_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} ({g(r['headroom_bytes'])} GiB headroom) | "
                     f"{largest(r.get('largest_group'))} | {largest(r.get('largest_completion'))} |")
    return "\n".join(lines)


def largest(found: dict | None) -> str:
    if found is None:
        return "not searched"
    v, tried = found["value"], found["tried"]
    if v is None:
        return f"none (not even {tried[0]})"
    if v == tried[-1]:
        return f"≥ {v} (the largest tried)"
    nxt = next(t for t in found["tries"] if t[next(iter(t))] == tried[tried.index(v) + 1])
    return f"{v} ({tried[tried.index(v) + 1]}: past the context)" if "refused" in nxt else str(v)


if __name__ == "__main__":
    sys.exit(main())
