"""Microbenchmark: token_logprobs and fused_exgrpo_loss, providers side by side.

    python bench/bench_lmhead.py                         # Gemma-7B LM head: N=16384, H=3072, V=256000, bf16
    python bench/bench_lmhead.py --n 2048 8192 --op loss --providers triton liger
    python bench/bench_lmhead.py --sweep                 # N = 2048, 8192, 16384, 32768 at that H, V; writes a plot
    python bench/bench_lmhead.py --tiny [--sweep]        # CPU smoke run (what the tests execute)
    python bench/plots.py bench/results/lmhead-....json  # re-plot a saved record

Providers:
    eager   the float64 spec's formulas run in the input dtype: materialised [N, V] logits (reference.py)
    torch   exgrpo's chunked PyTorch backend
    triton  exgrpo's Triton backend (cuBLAS GEMMs + Triton epilogue)
    cuda    exgrpo's CUDA C++ backend, when built
    liger   Liger-Kernel's LigerFusedLinearGRPOLoss (loss only), when installed

Reported per provider: median and p10/p90 time, peak CUDA memory above the inputs, and useful TFLOP/s
(2·N·H·V forward, 6·N·H·V forward+backward) next to the bf16 GEMM rate measured in the same run at the
same shape. CUDA peak memory is also reported as the peak the caching allocator reserved during the call
(inputs included, cache emptied first). A provider that fails (OOM, missing) is recorded with its error, not
dropped, and the run goes on; an N whose inputs do not fit records every provider with that error.

With more than one N (e.g. --sweep) time and memory against N are plotted next to the JSON (bench/plots.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPS = ("logprobs", "loss")
PROVIDERS = ("eager", "torch", "triton", "cuda", "liger")
SWEEP_N = [2048, 8192, 16384, 32768]
TINY_N, TINY_SWEEP_N = [96], [48, 96, 192]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="token counts N (default 16384)")
    p.add_argument("--sweep", action="store_true", help=f"N = {SWEEP_N} (with --tiny: {TINY_SWEEP_N})")
    p.add_argument("--h", type=int, default=3072)
    p.add_argument("--v", type=int, default=256000)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--op", default="both", choices=[*OPS, "both"])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=1024, help="L for the loss's [B, L] layout (B = N / L)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke shapes: N=96, H=32, V=1000, fp32, 1 rep")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--profile", action="store_true",
                   help="one more call of each (op, provider) under torch.profiler: its top operators by self "
                        "(device) time go into the row, to explain a missed target with a profile")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write time/memory vs N next to the JSON (default: when more than one N is run)")
    a = p.parse_args(argv)
    if a.sweep and a.n:
        p.error("--sweep sets N itself; give --n or --sweep, not both")
    a.n = a.n or (SWEEP_N if a.sweep else [16384])
    if a.tiny:
        a.n = TINY_SWEEP_N if a.sweep else TINY_N
        a.h, a.v, a.warmup, a.reps, a.seq_len, a.device = 32, 1000, 0, 1, 24, a.device or "cpu"
        a.dtype = "fp32"
    if a.plot is None:
        a.plot = len(a.n) > 1
    return a


def make_inputs(N, H, V, L, dtype, device, seed=0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    B = max(1, N // L)
    N = B * L
    h = torch.randn(B, L, H, generator=g, device=device, dtype=dtype)
    W = torch.randn(V, H, generator=g, device=device, dtype=dtype) * H**-0.5
    t = torch.randint(0, V, (B, L), generator=g, device=device)
    # every token trained: exgrpo skips untrained rows, the peers do not, so a partial mask would flatter
    # exgrpo's time and its useful-FLOP count (6·N·H·V) would no longer be the same work for every provider
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    adv = torch.randn(B, generator=g, device=device)
    with torch.no_grad():
        from exgrpo.kernels import token_logprobs
        lp = token_logprobs(h, W, t, backend="torch")  # not a backend under test: a fault there sinks no row
    old = lp + 0.05 * torch.randn(B, L, generator=g, device=device)
    ref = lp + 0.05 * torch.randn(B, L, generator=g, device=device)
    return dict(h=h, W=W, t=t, mask=mask, adv=adv, old=old, ref=ref, N=N)


def step_fn(provider, op, x, beta=0.04):
    """A closure doing one forward+backward of `op` with `provider`; fresh leaf tensors each call."""

    import exgrpo.kernels as K
    from exgrpo.kernels import reference as R
    h, W = x["h"], x["W"]
    if provider == "liger":
        if op != "loss":
            return None
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=beta, use_ref_model=True, loss_type="dapo",
                                         compiled=h.device.type == "cuda")

    def run():
        hh = h.detach().requires_grad_()
        WW = W.detach().requires_grad_()
        if op == "logprobs":
            fn = R.token_logprobs_ref if provider == "eager" else (
                lambda *a: K.token_logprobs(*a, backend=provider))
            fn(hh, WW, x["t"]).sum().backward()
            return
        if provider == "liger":
            out = liger(hh, WW, x["t"], x["mask"].long(), x["adv"], ref_per_token_logps=x["ref"],
                        old_per_token_logps=x["old"])
            loss = out[0] if isinstance(out, tuple) else out
        elif provider == "eager":
            loss, _ = R.fused_exgrpo_loss_ref(hh, WW, x["t"], x["mask"], x["adv"], old_logp=x["old"],
                                              ref_logp=x["ref"], beta=beta)
        else:
            loss, _ = K.fused_exgrpo_loss(hh, WW, x["t"], x["mask"], x["adv"], old_logp=x["old"], ref_logp=x["ref"],
                                          beta=beta, backend=provider)
        loss.backward()

    return run


def _free(device):
    """Give back what a failed or finished provider left in the CUDA cache (called outside the except block, so
    the traceback's frames, which hold its tensors, are already gone)."""
    gc.collect()
    if device.type == "cuda":
        import torch
        torch.cuda.empty_cache()


def main(argv=None):
    a = parse(argv)
    import torch
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "triton" in a.providers:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before exgrpo.kernels creates its kernels
    import exgrpo.kernels as K

    from bench import common

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    ops = OPS if a.op == "both" else (a.op,)
    record = {"bench": "lmhead", "machine": common.machine(), "args": vars(a), "results": []}
    avail = K.available(device)
    path = common.result_path("lmhead", record, a.out)
    for N in a.n:
        x, mm, setup_error = None, None, None
        try:
            x = make_inputs(N, a.h, a.v, min(a.seq_len, N), dtype, device)
            N = x["N"]
            mm = common.matmul_tflops(N, a.h, a.v, dtype, device, warmup=a.warmup, reps=max(3, a.reps))
        except Exception as e:                                  # inputs or the GEMM do not fit: every row says so
            setup_error = f"inputs: {common.error_text(e)}"
        for op in ops:
            for prov in a.providers:
                row = {"op": op, "provider": prov, "N": N, "H": a.h, "V": a.v, "dtype": a.dtype,
                       "matmul_tflops": mm, "error": setup_error}
                record["results"].append(row)
                if setup_error:
                    continue
                if prov in avail and avail[prov] is not None:
                    row["error"] = f"unavailable: {avail[prov]}"
                    continue
                try:
                    fn = step_fn(prov, op, x)
                    if fn is None:
                        row["error"] = "not applicable"
                        continue
                    row.update(common.time_fn(fn, device, warmup=a.warmup, reps=a.reps))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()                # so the reserved peak is this call's, not a cache
                    row["peak_extra_mb"] = common.peak_extra_mb(fn, device)
                    row["peak_reserved_mb"] = (torch.cuda.max_memory_reserved() / 2**20
                                               if device.type == "cuda" else None)
                    if a.profile:
                        try:                                    # a profiler failure does not undo the timing
                            row["profile"] = common.profile_top(fn, device, n=12)
                        except Exception as e:
                            row["profile_error"] = common.error_text(e)
                except Exception as e:                          # an OOM or a peer's failure is a result
                    row["error"] = common.error_text(e)
                if row["error"]:
                    _free(device)                               # an OOM at large N must not sink the next provider
                    continue
                flops = 6 * N * a.h * a.v                       # forward + backward, useful
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                row["frac_of_matmul"] = row["tflops"] / mm
        del x
        _free(device)                                           # before the next N's inputs
        common.write_json(path, record)                        # after every N: a killed sweep keeps what it measured
        print(f"N={N}: " + ", ".join(f"{r['op']}/{r['provider']} " + (f"{r['median_ms']:.2f} ms" if not r["error"]
                                     else "error") for r in record["results"] if r["N"] == N), flush=True)
    order = lambda r: (OPS.index(r["op"]), PROVIDERS.index(r["provider"]), r["N"])
    print(common.table(sorted(record["results"], key=order), [
        ("op", "op", ""), ("provider", "provider", ""), ("N", "N", "d"), ("median ms", "median_ms", ".2f"),
        ("p10", "p10_ms", ".2f"), ("p90", "p90_ms", ".2f"), ("peak extra MiB", "peak_extra_mb", ".0f"),
        ("peak reserved MiB", "peak_reserved_mb", ".0f"), ("useful TFLOP/s", "tflops", ".3g"),
        ("of matmul", "frac_of_matmul", ".0%"), ("error", "error", "")]))
    common.write_json(path, record)
    rates = {r["N"]: r["matmul_tflops"] for r in record["results"] if r["matmul_tflops"] is not None}
    print("\nmatmul rate measured at each N (TFLOP/s): " + ", ".join(f"{n}: {v:.3g}" for n, v in rates.items()))
    for r in record["results"]:
        if r.get("profile"):
            print(f"\n{r['op']} / {r['provider']} at N={r['N']}: top operators by self time")
            print(common.profile_table(r["profile"]))
    print(f"wrote {path}")
    if a.plot:
        from bench.plots import plot_record
        print(f"wrote {plot_record(record, path.with_suffix('.png'))}")
    return record


if __name__ == "__main__":
    main()
