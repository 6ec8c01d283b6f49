"""The CUDA backend's arithmetic on a CPU: csrc/host_emulation.cu runs the kernels' own per-thread code.

csrc/host_emulation.cu is compiled with nvcc as a host-only shared library and stands in for the four
torch.ops.exgrpo ops. With the `backend` fixture's "cuda" parameter (tests/conftest.py), the real
kernels/cuda_backend.py then runs through the real chunk driver and the public API on CPU tensors, in
the same test bodies as the torch and triton backends. What this cannot see: the CUDA intrinsics
(__expf, __fdividef: libm on the host), shuffles and barriers, the launch and the torch binding;
tests/test_csrc_gpu.py covers those on a GPU.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_f = ctypes.c_float
_p = ctypes.c_void_p
_i64 = ctypes.c_int64


def build(out_dir: Path) -> ctypes.CDLL:
    so = Path(out_dir) / "libexgrpo_emu.so"
    r = subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-std=c++20", "-O2", "-I", str(CSRC), "-o", str(so),
                        str(CSRC / "host_emulation.cu")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.emu_lmhead_stats.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _p, _p, _p, _f, _f, ctypes.c_int]
    lib.emu_lmhead_stats_backward.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _p, _p, _p, _p, _p, _f, _f,
                                              ctypes.c_int]
    lib.emu_advantages.argtypes = [_p, _p, _i64, _i64, _f, _f, _f, ctypes.c_int, _p, _p, _p, _p]
    lib.emu_loss_terms.argtypes = [_p, _p, _p, _p, _p, _p, _p, _p, _i64, _f, _f, _f, _p, _p]
    lib.emu_loss_terms_blocks.argtypes = [_i64]
    lib.emu_loss_terms_blocks.restype = _i64
    return lib


def ptr(t):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


def threads_for(V: int, element_size: int, cap: int = 256) -> int:
    """The launcher's thread count (csrc threads_for()): 16-byte loads, whole warps, at most `cap`."""
    return min(cap, max(32, -(-V // (16 // element_size) // 32) * 32))


class EmulatedOps:
    """torch.ops.exgrpo's four ops with the C++ binding's contracts, on CPU tensors, via the emulation."""

    def __init__(self, lib, threads=256):
        self.lib, self.threads = lib, threads

    def lmhead_stats(self, x, targets, inv_temp, softcap, want_entropy):
        n, V = x.shape
        lse, zt = torch.empty(n), torch.empty(n)
        ent = torch.empty(n if want_entropy else 0)
        assert self.lib.emu_lmhead_stats(DTYPE_CODE[x.dtype], ptr(x), n, V, ptr(targets), ptr(lse), ptr(zt),
                                         ptr(ent) if want_entropy else None, inv_temp, softcap or 0.0,
                                         threads_for(V, x.element_size(), self.threads)) == 0
        return lse, zt, ent

    def lmhead_stats_backward_inplace(self, x, targets, lse, ent, g_lse, g_zt, g_ent, inv_temp, softcap):
        n, V = x.shape
        assert self.lib.emu_lmhead_stats_backward(
            DTYPE_CODE[x.dtype], ptr(x), n, V, ptr(targets), ptr(lse), ptr(ent), ptr(g_lse), ptr(g_zt), ptr(g_ent),
            inv_temp, softcap or 0.0, threads_for(V, x.element_size(), self.threads)) == 0

    def advantages(self, outcome, is_full, delta, nu, eps, by_scenario):
        Q, G = outcome.shape
        centred, scaled, total = (torch.empty(Q, G) for _ in range(3))
        fired = torch.empty(Q, dtype=torch.bool)
        assert self.lib.emu_advantages(ptr(outcome), ptr(is_full), Q, G, delta, nu, eps, int(by_scenario),
                                       ptr(centred), ptr(scaled), ptr(total), ptr(fired)) == 0
        return centred, scaled, total, fired

    def loss_terms(self, logp, adv, scale, aux, mask, old, ref, sft, eps_low, eps_high, beta):
        n = logp.numel()
        coef = torch.empty(n)
        partial = torch.zeros(max(1, self.lib.emu_loss_terms_blocks(n)), 6)
        assert self.lib.emu_loss_terms(ptr(logp), ptr(adv), ptr(scale), ptr(aux), ptr(mask), ptr(old), ptr(ref),
                                       ptr(sft), n, eps_low, eps_high, beta, ptr(coef), ptr(partial)) == 0
        return coef, partial[:, 0].sum(), partial[:, 1:].sum(0)
