"""The chunked LM-head driver and the autograd Functions, shared by every backend.

Shape of the work, for N tokens, hidden H, vocabulary V:

    for each chunk of n rows (n picked so that the chunk's logits fit the memory budget):
        x   = h[rows] @ Wᵀ                      GEMM            [n, V] in the input dtype
        epilogue.stats(x)                       one read of x   -> lse, z[target], entropy   ([n] fp32)
        (fused loss only) coef = ∂loss/∂logp    per token, from the chunk's log-probs (see _loss.py)
        epilogue.grad_(x)                       read + write x  -> x := ∂loss/∂x, in place
        dh[rows] = x @ W;   dW += xᵀ @ h[rows]  GEMMs

The GEMMs are the library's (cuBLAS on a GPU), which is the fastest matmul there is; the epilogue is
the backend's (torch ops, Triton, or CUDA C++). Only one `[n, V]` buffer is live at a time, so the
extra memory is the chunk buffer plus dh [N, H] and dW [V, H], never `[N, V]`.

dW: with one chunk (the usual case on a GPU) it is a single GEMM written straight into the weight's
dtype (the GEMM accumulates in fp32 and rounds once). With several chunks each chunk's GEMM adds into
an fp32 [V, H] buffer without rounding (`_addmm_fp32_`), which is cast once at the end. The fused
loss makes dW in forward and holds it in the weight's dtype until backward, which scales it by the
upstream gradient in place: at Gemma-7B shape (V = 256000, H = 3072) that is 1.6 GB held, not an
fp32 3.1 GB plus an fp32 copy in backward.

FLOPs: the fused loss does the forward GEMM once and the two gradient GEMMs once: 6·N·H·V, the
useful minimum. `token_logprobs` cannot know its upstream gradient in the forward pass, so its
backward recomputes the chunk logits: 2·N·H·V forward + 6·N·H·V backward.

Derivatives (z = cap(x)/T, cap(x) = s·tanh(x/s), p = softmax(z), Ez = Σ p z = lse − H):
    ∂logp/∂z_j = 1[j = target] − p_j
    ∂H/∂z_j    = p_j·(Ez − z_j)
    ∂z/∂x      = (1 − tanh²(x/s)) / T            (1/T without a softcap)
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ._loss import N_SUMS, LossSpec, TokenTerms, finish_metrics
from .reference import IGNORE_INDEX

# GPU: 2 GB of bf16 logits is 4096 rows at V = 256000, enough for the GEMMs to run at full rate.
# CPU: the torch epilogue's fp32 temporaries come on top, and the machine is small.
DEFAULT_CHUNK_MB = {"cuda": 2048, "cpu": 256}


def chunk_budget_bytes(chunk_mb: float | None, device: torch.device) -> int:
    """The extra-memory budget for one chunk's logits and the epilogue's temporaries."""
    if chunk_mb is None:
        chunk_mb = float(os.environ.get("EXGRPO_CHUNK_MB", DEFAULT_CHUNK_MB.get(device.type, 256)))
    if not chunk_mb > 0:
        raise ValueError(f"chunk budget must be > 0 MB, got {chunk_mb}")
    return int(chunk_mb * 2**20)


def _nvtx(name: str, on: bool):
    """An NVTX range for Nsight (nsys/ncu --nvtx) around a stage of the chunk loop; free on CPU."""
    return torch.cuda.nvtx.range(f"exgrpo.{name}") if on else contextlib.nullcontext()


def _chunks(N: int, V: int, bytes_per_logit: int, budget: int):
    n = max(1, min(N, budget // max(1, V * bytes_per_logit)))
    return [(lo, min(lo + n, N)) for lo in range(0, N, n)], n


# ----------------------------------------------------------------------------- the torch epilogue

def _capped(x32: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """z = cap(x) / T on an fp32 copy the caller owns (modified in place)."""
    if softcap is not None:
        x32.div_(softcap).tanh_().mul_(softcap)
    return x32.mul_(inv_temp)


class TorchEpilogue:
    """The epilogue in PyTorch ops: the CPU training path. Needs ~3 fp32 [n, V] temporaries."""
    name = "torch"
    extra_bytes_per_logit = 12

    def stats(self, x, targets, lse, zt, ent, inv_temp, softcap):
        z = _capped(x.to(torch.float32, copy=True), inv_temp, softcap)   # [n, V]
        torch.logsumexp(z, dim=-1, out=lse)
        safe = targets.clamp(min=0)
        zt.copy_(z.gather(1, safe.unsqueeze(1)).squeeze(1))
        if ent is not None:
            z.sub_(lse.unsqueeze(1))                            # log p
            p = z.exp()
            ent.copy_(-(p.mul_(z)).sum(-1))                     # H = −Σ p log p (no lse − Ez cancellation)

    def grad_(self, x, targets, lse, ent, g_lp, g_ent, inv_temp, softcap):
        valid = targets != IGNORE_INDEX
        z = x.to(torch.float32, copy=True)
        dcap = None
        if softcap is not None:
            z.div_(softcap).tanh_()
            dcap = 1 - z * z                                    # 1 − tanh²(x/s)
            z.mul_(softcap)
        z.mul_(inv_temp)
        p = (z - lse.unsqueeze(1)).exp_()                       # [n, V]
        g_lp = torch.where(valid, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)
        if g_ent is not None:
            g_ent = torch.where(valid, g_ent, torch.zeros_like(g_ent)).unsqueeze(1)
            ez = (lse - ent).unsqueeze(1)
            coef = z.neg_().add_(ez).mul_(g_ent).sub_(g_lp)     # g_ent·(Ez − z) − g_lp
        else:
            coef = -g_lp
        dz = p.mul_(coef)
        rows = valid.nonzero().squeeze(1)
        dz[rows, targets[rows]] += g_lp[rows, 0]
        dz.masked_fill_(~valid.unsqueeze(1), 0.0)               # ignored rows: no gradient, even from NaN
        if dcap is not None:
            dz.mul_(dcap)
        x.copy_(dz.mul_(inv_temp))


# ----------------------------------------------------------------------------- the chunk loops

def _sweep(hidden, weight, targets, epi, *, inv_temp, softcap, budget, want_entropy=False,
           grad_from=None, coef_fn=None, need_dh=True, need_dW=True):
    """One pass over the chunks. Modes:
      stats only                      (grad_from=None, coef_fn=None): returns lse, zt, ent
      backward from upstream grads    (grad_from=(lse, ent, g_lp, g_ent)): returns dh, dW
      fused forward + gradient        (coef_fn=f(logp_chunk, lo, hi) -> coef_chunk): returns lse, zt, dh, dW
    need_dh / need_dW = False skip that gradient GEMM (returned as None): a frozen LM head (LoRA) saves
    2·N·H·V FLOPs and the [V, H] gradient buffer.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    chunks, n_max = _chunks(N, V, hidden.element_size() + epi.extra_bytes_per_logit, budget)
    buf = torch.empty(n_max, V, dtype=hidden.dtype, device=dev)
    need_grad = grad_from is not None or coef_fn is not None
    if grad_from is None:
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        zt = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N, dtype=torch.float32, device=dev) if want_entropy else None
    else:
        lse, ent, g_lp_all, g_ent_all = grad_from
    dh = torch.empty_like(hidden) if need_grad and need_dh else None
    one = len(chunks) == 1                                      # one chunk: dW is one GEMM, rounded once
    dW = None
    if need_grad and need_dW:
        if one:
            dW = torch.empty(V, H, dtype=hidden.dtype, device=dev)
        else:                                                   # no rows at all: zeros, no fp32 detour
            dW = torch.zeros(V, H, dtype=torch.float32 if chunks else hidden.dtype, device=dev)
    cu = dev.type == "cuda"
    for lo, hi in chunks:
        h = hidden[lo:hi]
        x = buf[: hi - lo]
        with _nvtx("logits_gemm", cu):
            torch.mm(h, weight.T, out=x)                        # [n, V]
        tgt = targets[lo:hi]
        if grad_from is None:
            with _nvtx("epilogue_stats", cu):
                epi.stats(x, tgt, lse[lo:hi], zt[lo:hi], None if ent is None else ent[lo:hi], inv_temp, softcap)
        if not need_grad:
            continue
        if coef_fn is not None:
            with _nvtx("loss_terms", cu):
                logp = torch.where(tgt != IGNORE_INDEX, zt[lo:hi] - lse[lo:hi], torch.zeros_like(zt[lo:hi]))
                g_lp, g_ent, e = coef_fn(logp, lo, hi), None, None
        else:
            g_lp = g_lp_all[lo:hi]
            g_ent = None if g_ent_all is None else g_ent_all[lo:hi]
            e = None if ent is None else ent[lo:hi]
        with _nvtx("epilogue_grad", cu):
            epi.grad_(x, tgt, lse[lo:hi], e, g_lp, g_ent, inv_temp, softcap)   # x := ∂loss/∂x
        with _nvtx("grad_gemms", cu):
            if dh is not None:
                torch.mm(x, weight, out=dh[lo:hi])              # [n, H]
            if dW is not None and one:
                torch.mm(x.T, h, out=dW)
            elif dW is not None:                                # several chunks: fp32 accumulation
                _addmm_fp32_(dW, x.T, h)
    if dW is not None:
        buf = x = None
        dW = dW.to(weight.dtype)                                # fp32 accumulator -> weight dtype, once
    if coef_fn is not None:
        return lse, zt, dh, dW
    if grad_from is not None:
        return dh, dW
    return lse, zt, ent


# torch.addmm(acc_fp32, bf16, bf16, out_dtype=fp32) on CUDA: since torch 2.8, but 2.8/2.9 reject an fp32 `self`
# with bf16/fp16 operands (pytorch#154086, relaxed for 2.10)
_MM_OUT_DTYPE = {"ok": tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10)}
_UPCAST_BLOCK_BYTES = 256 << 20


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc [V, H] and bf16/fp16 a [V, n], b [n, H]: the product is neither rounded to
    the operands' dtype before the sum (a per-chunk rounding of dW) nor held as a [V, H] temporary. On CUDA
    (torch >= 2.10) cuBLAS writes fp32 straight into acc; elsewhere a is up-cast a block of V rows at a
    time (at most 256 MB of fp32), so the fallback stays within a small, fixed extra memory."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _MM_OUT_DTYPE["ok"] and acc.device.type == "cuda":
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError) as e:     # not in this build: say so once
            _MM_OUT_DTYPE["ok"] = False
            warnings.warn(f"torch.addmm(out_dtype=float32) failed ({type(e).__name__}: {e}); d_weight chunks are "
                          "now up-cast to fp32 before their GEMM, in blocks (slower, same result)", stacklevel=2)
    b32 = b.float()
    rows = max(1, _UPCAST_BLOCK_BYTES // (4 * max(1, a.shape[1])))
    for lo in range(0, a.shape[0], rows):
        acc[lo:lo + rows].addmm_(a[lo:lo + rows].float(), b32)


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, backend, inv_temp, softcap, budget, want_entropy):
        from ._checks import check_finite_outputs
        lse, zt, ent = _sweep(hidden, weight, targets, backend.epilogue, inv_temp=inv_temp, softcap=softcap,
                              budget=budget, want_entropy=want_entropy)
        valid = targets != IGNORE_INDEX
        check_finite_outputs(lse, valid, hidden, weight)
        logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, targets, lse, ent if want_entropy else None)
        ctx.cfg = (backend, inv_temp, softcap, budget)
        if want_entropy:
            return logp, torch.where(valid, ent, torch.zeros_like(ent))
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        backend, inv_temp, softcap, budget = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if (g_ent is None or ent is None) else g_ent.float().contiguous()
        dh, dW = _sweep(hidden, weight, targets, backend.epilogue, inv_temp=inv_temp, softcap=softcap,
                        budget=budget, grad_from=(lse, ent, g_lp, g_ent), need_dh=ctx.needs_input_grad[0],
                        need_dW=ctx.needs_input_grad[1])
        return dh, dW, None, None, None, None, None, None


class PolicyLoss(torch.autograd.Function):
    """loss(logp) from the backend's per-token terms; the gradient is coef, saved in forward."""

    @staticmethod
    def forward(ctx, logp, terms: TokenTerms, spec: LossSpec, backend):
        coef, sums = backend.loss_terms(logp.detach().reshape(-1).float().contiguous(), terms, spec)
        ctx.save_for_backward(coef)
        ctx.shape_dtype = (logp.shape, logp.dtype)
        return sums

    @staticmethod
    def backward(ctx, g_sums):
        (coef,) = ctx.saved_tensors
        shape, dtype = ctx.shape_dtype
        return (coef * g_sums[0]).reshape(shape).to(dtype), None, None, None


class FusedLoss(torch.autograd.Function):
    """policy_loss(token_logprobs(...)) in one pass: the gradients are made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, terms: TokenTerms, spec: LossSpec, backend, inv_temp, softcap,
                budget):
        from ._checks import check_finite_outputs
        sums = torch.zeros(N_SUMS, dtype=torch.float32, device=hidden.device)

        def coef_fn(logp, lo, hi):
            coef, part = backend.loss_terms(logp, terms.rows(lo, hi), spec)
            sums.add_(part)
            return coef

        lse, zt, dh, dW = _sweep(hidden, weight, targets, backend.epilogue, inv_temp=inv_temp, softcap=softcap,
                                 budget=budget, coef_fn=coef_fn, need_dh=ctx.needs_input_grad[0],
                                 need_dW=ctx.needs_input_grad[1])
        check_finite_outputs(lse, targets != IGNORE_INDEX, hidden, weight)
        # Held on ctx, not saved: backward scales them in place and hands them to autograd, so no copy
        # of dW [V, H] is ever made and the loss keeps no reference once its gradients are out.
        ctx.grads = (dh, dW)
        return sums

    @staticmethod
    def backward(ctx, g_sums):
        if ctx.grads is None:
            raise RuntimeError("fused_exgrpo_loss: backward ran twice through the same loss; its gradients are "
                               "made in forward and handed out by the first backward (retain_graph cannot reuse "
                               "them): compute the loss again")
        (dh, dW), ctx.grads = ctx.grads, None
        g = g_sums[0].float()
        for grad in (dh, dW):
            if grad is not None:
                _scale_(grad, g)
        return dh, dW, None, None, None, None, None, None, None


def _scale_(t: torch.Tensor, g: torch.Tensor, block_bytes: int = 64 << 20) -> None:
    """t *= g in place, computed in fp32 over blocks: a bf16 copy of g would bias the whole gradient
    by up to 2⁻⁹, and an fp32 copy of a [V, H] gradient would cost what holding it in bf16 saved."""
    if t.dtype == torch.float32:
        t.mul_(g)
        return
    for blk in t.view(-1).split(block_bytes // 4):          # t is a fresh, contiguous gradient
        blk.copy_(blk.float().mul_(g))


def policy_loss_from_sums(sums, terms):
    return sums[0], finish_metrics(sums, terms)
