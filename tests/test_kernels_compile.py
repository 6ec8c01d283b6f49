"""Every Triton kernel compiles for sm_90 and sm_80 with the real compiler (Triton's bundled ptxas).

The interpreter accepts code the compiler rejects (types of loop-carried scalars, constexpr globals,
pointer arithmetic), so CI compiles each kernel in every constexpr variant the launchers use, in a
subprocess without TRITON_INTERPRET. No GPU is needed to compile; `ptxas -v` then reports registers
and spills, and a spill fails the test.

Twice: with the installed Triton (the CPU pin, which the CUDA torch of the same release uses) and with
the GPU machine's Triton 3.6.0 (../shared/PLATFORM.md), fetched once into a cache folder with pip, so a
kernel that only the newer compiler accepts is caught before a GPU is lent.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GPU_MACHINE_TRITON = "3.6.0"

SCRIPT = textwrap.dedent(r'''
    import json, os, subprocess, sys, tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    want = os.environ.get("EXGRPO_EXPECT_TRITON")
    assert want in (None, triton.__version__), f"compiling with Triton {triton.__version__}, wanted {want}"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from exgrpo.kernels import triton_lmhead as TL, triton_loss as TS

    stats_sig = dict(X="*{x}", stride_x="i64", TGT="*i64", LSE="*fp32", ZT="*fp32", ENT="*fp32", V="i32",
                     inv_temp="fp32", softcap="fp32", inv_softcap="fp32")
    grad_sig = dict(X="*{x}", stride_x="i64", TGT="*i64", LSE="*fp32", ENT="*fp32", GLP="*fp32", GENT="*fp32",
                    V="i32", inv_temp="fp32", softcap="fp32", inv_softcap="fp32")
    adv_sig = dict(OUTCOME="*fp32", IS_FULL="*i8", ADV="*fp32", CENTRED="*fp32", TOTAL="*fp32", FIRED="*i8",
                   G="i32", delta="fp32", nu="fp32", eps="fp32")
    loss_sig = dict(LOGP="*fp32", OLD="*fp32", REF="*fp32", ADV="*fp32", SCALE="*fp32", AUX="*fp32",
                    MASK="*i8", SFT="*i8", COEF="*fp32", PARTIAL="*fp32", N="i32", eps_low="fp32",
                    eps_high="fp32", beta="fp32")
    cases = []
    for x in ("bf16", "fp16", "fp32"):
        for cap in (False, True):
            cases.append((TL._lse_stats_kernel, stats_sig, x, dict(HAS_SOFTCAP=cap, WANT_ENT=True, BLOCK_V=4096), 8))
            cases.append((TL._grad_inplace_kernel, grad_sig, x, dict(HAS_SOFTCAP=cap, HAS_GENT=True, BLOCK_V=4096), 8))
    cases.append((TL._lse_stats_kernel, stats_sig, "bf16", dict(HAS_SOFTCAP=False, WANT_ENT=False, BLOCK_V=4096), 8))
    cases.append((TL._grad_inplace_kernel, grad_sig, "bf16", dict(HAS_SOFTCAP=False, HAS_GENT=False, BLOCK_V=4096), 8))
    for by in (False, True):
        cases.append((TS._advantages_kernel, adv_sig, "", dict(BY_SCENARIO=by, BLOCK_G=16), 4))
    for flags in ((True, True, True), (False, False, False)):
        cases.append((TS._loss_terms_kernel, loss_sig, "", dict(zip(("HAS_OLD", "HAS_REF", "HAS_SFT"), flags),
                                                                BLOCK=1024), 4))
    covered = {c[0] for c in cases}
    missing = [k.__name__ for k in TL.JIT_KERNELS + TS.JIT_KERNELS if k not in covered]
    assert not missing, f"kernels without a compile case: {missing}"
    ptxas = sys.argv[1] if len(sys.argv) > 1 else ""
    out = []
    for arch in (90, 80):
        for fn, sig, x, consts, warps in cases:
            s = {k: v.format(x=x) for k, v in sig.items()}
            assert list(s) + list(consts) == fn.arg_names, (fn.__name__, fn.arg_names)
            s.update({k: "constexpr" for k in consts})
            k = triton.compile(ASTSource(fn, s, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps})
            rec = dict(kernel=fn.__name__, arch=arch, x=x, consts=consts, shared=k.metadata.shared)
            if ptxas:
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(k.asm["ptx"]); f.flush()
                    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
                    res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                         capture_output=True, text=True)
                rec["ptxas"] = " ".join(l.split("ptxas info    :")[-1].strip() for l in res.stderr.splitlines()
                                        if "spill" in l or "registers" in l)
            out.append(rec)
    print(json.dumps(out))
''')


def _ptxas(triton_dir: str):
    """Triton ships the ptxas it compiles with; fall back to a CUDA toolkit's."""
    bundled = os.path.join(triton_dir, "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else (shutil.which("ptxas") or "")


def _triton_release(version: str) -> Path:
    """A folder holding only `triton==version` (no deps), installed by pip on first use and kept in
    EXGRPO_CACHE (default ~/.cache/exgrpo) so later runs reuse it."""
    root = Path(os.environ.get("EXGRPO_CACHE", Path.home() / ".cache" / "exgrpo"))
    target = root / f"triton-{version}"
    if (target / "triton" / "__init__.py").exists():
        return target
    tmp = root / f".triton-{version}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        f"triton=={version}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"pip could not fetch triton=={version} (PyPI is needed once): {r.stderr[-2000:]}"
    try:
        tmp.rename(target)
    except OSError:                                             # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.mark.parametrize("release", ["installed", GPU_MACHINE_TRITON])
def test_every_triton_kernel_compiles_for_sm90_and_sm80(release):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if release == "installed":
        import triton
        triton_dir = os.path.dirname(triton.__file__)
    else:
        site = _triton_release(release)
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["EXGRPO_EXPECT_TRITON"] = release
        triton_dir = str(site / "triton")
    dump = _ptxas(triton_dir)
    r = subprocess.run([sys.executable, "-c", SCRIPT, dump], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    assert {rec["arch"] for rec in recs} == {80, 90}
    for rec in recs:
        print(rec["kernel"], rec["arch"], rec["x"], rec["consts"], "shared", rec["shared"], rec.get("ptxas", ""))
        usage = rec.get("ptxas", "")
        if dump:
            assert "spill" in usage, f"ptxas -v printed no spill line for {rec['kernel']}: {usage!r}"
            assert "0 bytes spill stores, 0 bytes spill loads" in usage, (
                f"{rec['kernel']} sm_{rec['arch']} {rec['consts']} spills registers: {usage}")
    if not dump:
        print("ptxas not found: compiled, but registers/spills were not checked")
