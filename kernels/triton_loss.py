"""Triton kernels for the two small steps of ExGRPO: group advantages with the DSU bonus, and the
per-token clipped policy loss with its KL, weighting and auxiliary SFT term.

Both are memory-bound and tiny next to the LM head (a few bytes per token or per trajectory); they
are kernels so that one launch replaces a dozen elementwise PyTorch ops and their temporaries, and
so that the fused LM-head pass can turn a chunk's log-probs into its loss gradient on the device.
The arithmetic is the one written out in _loss.py; the float64 spec is reference.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._loss import N_SUMS, LossSpec, TokenTerms

# ----------------------------------------------------------------------------- advantages


@triton.jit
def _centre_scale(x, sel, eps):
    """(x − mean)/(std + eps) over the lanes in sel, Bessel-corrected; 0 for groups of one or all-equal."""
    n = tl.sum(sel.to(tl.float32), 0)
    mean = tl.sum(tl.where(sel, x, 0.0), 0) / tl.maximum(n, 1.0)
    c = tl.where(sel, x - mean, 0.0)
    std = tl.sqrt(tl.sum(c * c, 0) / tl.maximum(n - 1.0, 1.0))
    hi = tl.max(tl.where(sel, x, float("-inf")), 0)
    lo = tl.min(tl.where(sel, x, float("inf")), 0)
    flat = (n < 2.0) | (hi == lo)
    c = tl.where(flat, 0.0, c)
    return c, tl.where(flat, 0.0, c / (std + eps))


@triton.jit
def _advantages_kernel(OUTCOME, IS_FULL, ADV, CENTRED, TOTAL, FIRED, G, delta, nu, eps,
                       BY_SCENARIO: tl.constexpr, BLOCK_G: tl.constexpr):
    # One program per question: its G trajectories of both scenarios sit in one block of lanes.
    q = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    inb = offs < G
    r = tl.load(OUTCOME + q * G + offs, mask=inb, other=0.0).to(tl.float32)
    flag = tl.load(IS_FULL + q * G + offs, mask=inb, other=0)
    full = inb & (flag != 0)
    part = inb & (flag == 0)
    n_full = tl.sum(full.to(tl.float32), 0)
    n_part = tl.sum(part.to(tl.float32), 0)
    p_full = tl.sum(tl.where(full, r, 0.0), 0) / tl.maximum(n_full, 1.0)
    p_part = tl.sum(tl.where(part, r, 0.0), 0) / tl.maximum(n_part, 1.0)
    fired = (n_full > 0.0) & (p_full > nu * p_part)
    total = r + tl.where(full & (r >= 1.0), tl.where(fired, delta, 0.0), 0.0)
    if BY_SCENARIO:
        c_f, a_f = _centre_scale(total, full, eps)
        c_p, a_p = _centre_scale(total, part, eps)
        c = tl.where(full, c_f, c_p)
        a = tl.where(full, a_f, a_p)
    else:
        c, a = _centre_scale(total, inb, eps)
    tl.store(ADV + q * G + offs, a, mask=inb)
    tl.store(CENTRED + q * G + offs, c, mask=inb)
    tl.store(TOTAL + q * G + offs, total, mask=inb)
    tl.store(FIRED + q, fired.to(tl.int8))


def advantages(outcome, is_full, *, delta, nu, eps, by_scenario):
    """Same contract as _loss.advantages_torch: (centred, group-scaled, total, fired)."""
    Q, G = outcome.shape
    outcome = outcome.float().contiguous()
    flags = is_full.to(torch.int8).contiguous()
    adv, centred, total = (torch.empty_like(outcome) for _ in range(3))
    fired = torch.empty(Q, dtype=torch.int8, device=outcome.device)
    if Q:
        _advantages_kernel[(Q,)](outcome, flags, adv, centred, total, fired, G, float(delta), float(nu),
                                 float(eps), BY_SCENARIO=by_scenario, BLOCK_G=max(16, triton.next_power_of_2(G)))
    return centred, adv, total, fired.bool()


# ----------------------------------------------------------------------------- policy loss terms


@triton.jit
def _loss_terms_kernel(LOGP, OLD, REF, ADV, SCALE, AUX, MASK, SFT, COEF, PARTIAL, N,
                       eps_low, eps_high, beta,
                       HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_SFT: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    m = tl.load(MASK + offs, mask=inb, other=0) != 0
    if HAS_SFT:
        s = tl.load(SFT + offs, mask=inb, other=0) != 0
        used = m | s
    else:
        used = m
    lp = tl.where(used, tl.load(LOGP + offs, mask=inb, other=0.0), 0.0)  # masked slots may hold garbage
    if HAS_OLD:
        old = tl.where(m, tl.load(OLD + offs, mask=inb, other=0.0), lp)
    else:
        old = lp                                                # on-policy: ρ ≡ 1, ∂ρ/∂lp = 1
    ratio = tl.exp(lp - old)
    a = tl.load(ADV + offs, mask=inb, other=0.0)
    unclipped = ratio * a
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * a
    pg = -tl.minimum(unclipped, clipped)
    dpg = tl.where(clipped < unclipped, 0.0, -unclipped)       # the clipped branch carries no gradient
    if HAS_REF:
        d = tl.where(m, tl.load(REF + offs, mask=inb, other=0.0) - lp, 0.0)
        ed = tl.exp(d)
        kl = ed - d - 1.0
        dkl = 1.0 - ed
    else:
        kl = tl.zeros_like(lp)
        dkl = tl.zeros_like(lp)
    scale = tl.load(SCALE + offs, mask=inb, other=0.0)
    aux = tl.load(AUX + offs, mask=inb, other=0.0)
    tl.store(COEF + offs, scale * (dpg + beta * dkl) - aux, mask=inb)
    mf = m.to(tl.float32)
    out = PARTIAL + pid * 8
    tl.store(out + 0, tl.sum(scale * (pg + beta * kl) - aux * lp, 0))
    tl.store(out + 1, tl.sum(tl.where(m & (ratio < 1.0 - eps_low) & (a < 0.0), 1.0, 0.0), 0))
    tl.store(out + 2, tl.sum(tl.where(m & (ratio > 1.0 + eps_high) & (a > 0.0), 1.0, 0.0), 0))
    tl.store(out + 3, tl.sum(mf * kl, 0))
    tl.store(out + 4, tl.sum(mf * ratio, 0))
    if HAS_SFT:
        tl.store(out + 5, tl.sum(tl.where(s, -lp, 0.0), 0))
    else:
        tl.store(out + 5, 0.0)


def loss_terms(logp: torch.Tensor, t: TokenTerms, spec: LossSpec):
    """Same contract as _loss.loss_terms_torch: (coef [n] fp32, sums [N_SUMS] fp32)."""
    n = logp.numel()
    coef = torch.empty_like(logp)
    from .triton_lmhead import interpreted
    block = 4096 if interpreted() else 1024
    grid = triton.cdiv(n, block)
    # Per-program partial sums, reduced by torch in a fixed order: deterministic, unlike atomics.
    partial = torch.empty(max(grid, 1), 8, dtype=torch.float32, device=logp.device)
    if n == 0:
        return coef, torch.zeros(N_SUMS, dtype=torch.float32, device=logp.device)
    mask = t.mask.view(torch.int8)
    sft = t.sft.view(torch.int8) if t.sft is not None else mask
    _loss_terms_kernel[(grid,)](
        logp, t.old if t.old is not None else logp, t.ref if t.ref is not None else logp, t.adv.contiguous(),
        t.scale, t.aux, mask, sft, coef, partial, n, float(spec.eps_low), float(spec.eps_high),
        float(spec.beta), HAS_OLD=t.old is not None, HAS_REF=t.ref is not None, HAS_SFT=t.sft is not None,
        BLOCK=block, num_warps=4)
    return coef, partial[:, :N_SUMS].sum(0)


JIT_KERNELS = (_advantages_kernel, _loss_terms_kernel)
