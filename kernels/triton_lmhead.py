"""Triton epilogue for the chunked LM head: log-sum-exp, target logit and entropy in one read of the
chunk's logits, then ∂loss/∂x written over the logits in place. The GEMMs around it are cuBLAS
(_lmhead.py); this file only touches the `[n, V]` chunk.

Bytes, per chunk row of V logits of b bytes (bf16: b = 2):
    stats: reads V·b          grad_: reads V·b, writes V·b
At V = 256000, bf16, n = 16384 rows that is 3 × 8.4 GB ≈ 6 ms at 4.3 TB/s (H200), against ~100 ms
for the 6·N·H·V GEMM FLOPs at H = 3072: the epilogue is a few percent of the step.

One program per row, looping over V in BLOCK_V blocks with the online log-sum-exp recurrence kept in
fp32 scalars relative to the running max m:
    s = Σ e^{z−m},  u = Σ e^{z−m}(z−m)
    on a new max m':  α = e^{m−m'},  s ← α·s + Σ_blk e^{z−m'},  u ← α·(u + s·(m−m')) + Σ_blk e^{z−m'}(z−m')
    lse = m + log s,  H = log s − u/s
H is formed from O(1) quantities, so it keeps its relative precision when the logits are large
(lse − Σpz would cancel).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .reference import IGNORE_INDEX

_IGNORE = tl.constexpr(IGNORE_INDEX)


@triton.jit
def _tanh(x):
    # tl has no tanh on every supported Triton, and libdevice does not run in the interpreter.
    # 1 − 2/(e^{2x} + 1) saturates correctly at ±inf. The non-IEEE division (≤ 2 ulp) avoids the
    # precise-division subroutine, whose call frame made ptxas spill in the gradient kernel.
    return 1.0 - tl.fdiv(2.0, tl.exp(2.0 * x) + 1.0, ieee_rounding=False)


@triton.jit
def _lse_stats_kernel(X, stride_x, TGT, LSE, ZT, ENT, V, inv_temp, softcap, inv_softcap,
                      HAS_SOFTCAP: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    u = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(x_row + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z * inv_softcap)
        z = tl.where(inb, z * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)                               # 0 on the first block (m = −inf)
        e = tl.exp(z - m_new)                                   # 0 outside the row
        if WANT_ENT:
            shift = s * tl.where(s > 0.0, m - m_new, 0.0)       # no 0·(−inf) on the first block
            u = alpha * (u + shift) + tl.sum(e * tl.where(inb, z - m_new, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    tl.store(LSE + row, m + tl.log(s))
    tgt = tl.load(TGT + row)
    zt = tl.load(x_row + tl.where(tgt == _IGNORE, 0, tgt)).to(tl.float32)
    if HAS_SOFTCAP:
        zt = softcap * _tanh(zt * inv_softcap)
    tl.store(ZT + row, zt * inv_temp)
    if WANT_ENT:
        tl.store(ENT + row, tl.log(s) - u / s)


@triton.jit
def _grad_inplace_kernel(X, stride_x, TGT, LSE, ENT, GLP, GENT, V, inv_temp, softcap, inv_softcap,
                         HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    # x := ∂loss/∂x = [g_lp·(1[j=t] − p_j) + g_ent·p_j·(Ez − z_j)] · cap'(x) / T
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    tgt = tl.load(TGT + row)
    valid = tgt != _IGNORE
    lse = tl.load(LSE + row)
    g_lp = tl.where(valid, tl.load(GLP + row), 0.0)
    if HAS_GENT:
        g_ent = tl.where(valid, tl.load(GENT + row), 0.0)
        ez = lse - tl.load(ENT + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = tl.load(x_row + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x * inv_softcap)
            z = softcap * t * inv_temp
            dzdx = (1.0 - t * t) * inv_temp
        else:
            z = x * inv_temp
            dzdx = inv_temp
        p = tl.exp(z - lse)
        dz = tl.where(offs == tgt, g_lp, 0.0) - g_lp * p
        if HAS_GENT:
            dz += g_ent * p * (ez - z)
        dx = tl.where(valid, dz * dzdx, 0.0)                    # ignored rows: exact zeros, even from NaN
        tl.store(x_row + offs, dx.to(X.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launchers

def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_cfg(V: int):
    if interpreted():
        # ~1.5 ms per (program × block iteration) in the interpreter: take the row in as few blocks as possible.
        return min(triton.next_power_of_2(V), 32768), 1
    # 4096 fp32 values across 8 warps = 16 per thread: enough loads in flight to stream at HBM rate.
    return min(triton.next_power_of_2(V), 4096), 8


class TritonEpilogue:
    name = "triton"
    extra_bytes_per_logit = 0                                   # in place: the chunk buffer is all

    def stats(self, x, targets, lse, zt, ent, inv_temp, softcap):
        n, V = x.shape
        if n == 0:
            return
        block, warps = _launch_cfg(V)
        _lse_stats_kernel[(n,)](
            x, x.stride(0), targets, lse, zt, lse if ent is None else ent, V, float(inv_temp),
            float(softcap or 1.0), 1.0 / float(softcap or 1.0), HAS_SOFTCAP=softcap is not None,
            WANT_ENT=ent is not None, BLOCK_V=block, num_warps=warps)

    def grad_(self, x, targets, lse, ent, g_lp, g_ent, inv_temp, softcap):
        n, V = x.shape
        if n == 0:
            return
        block, warps = _launch_cfg(V)
        has_gent = g_ent is not None
        _grad_inplace_kernel[(n,)](
            x, x.stride(0), targets, lse, ent if has_gent else lse, g_lp.contiguous(),
            g_ent.contiguous() if has_gent else g_lp, V, float(inv_temp), float(softcap or 1.0),
            1.0 / float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, HAS_GENT=has_gent, BLOCK_V=block,
            num_warps=warps)


# For the sm_80/sm_90 compile check (tests/test_kernels_compile.py): every @triton.jit kernel of this file.
JIT_KERNELS = (_lse_stats_kernel, _grad_inplace_kernel)

