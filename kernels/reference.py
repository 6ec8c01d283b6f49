"""The spec: unchunked float64 PyTorch, written the obvious way.

Every backend is tested against these functions, and the benchmarks import them as the eager peer.
They materialise the full `[N, V]` logits, so they are for checking, not for training. Gradients come
from autograd on the literal formulas; nothing here is hand-derived.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def logits_ref(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
               softcap: float | None = None) -> torch.Tensor:
    """z = cap(hidden @ weight^T) / temperature, cap(x) = softcap * tanh(x / softcap)."""
    return scale_logits_ref(hidden @ weight.T, temperature=temperature, softcap=softcap)   # [..., V]


def scale_logits_ref(x: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """cap(x) / temperature, x the raw logits hidden @ weight^T."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def token_logprobs_ref(hidden, weight, targets, *, temperature=1.0, softcap=None, return_entropy=False):
    """log softmax(z)[target] (and the entropy of softmax(z)), 0 at ignored positions."""
    z = logits_ref(hidden, weight, temperature=temperature, softcap=softcap)
    return logprobs_from_logits_ref(z, targets, return_entropy=return_entropy)


def logprobs_from_logits_ref(z, targets, *, return_entropy=False):
    """token_logprobs_ref from the scaled logits z [..., V]."""
    logsm = torch.log_softmax(z, dim=-1)                        # [..., V]
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    ent = -(logsm.exp() * logsm).sum(-1)
    ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent


def _std_or_zero(x: torch.Tensor) -> torch.Tensor:
    """torch.std with Bessel's correction; 0 for fewer than two elements."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def exgrpo_advantages_ref(outcome, is_full, *, delta=0.5, nu=1.0, eps=1e-6, scale="group",
                          group_by="question", dtype=torch.float64):
    """docs/method.md, steps 4-5 of ExGRPO, one question at a time in plain Python loops.

    correct := outcome >= 1. P_partial is 0 for a question with no partial trajectory. `dtype` is the
    precision of the arithmetic: float64 is the truth; the tests also run it in float32, as the eager peer
    whose error bounds the kernels'.
    """
    outcome = outcome.to(dtype)
    Q, G = outcome.shape
    total = outcome.clone()
    fired = torch.zeros(Q, dtype=torch.bool)
    centred = torch.zeros_like(outcome)
    adv = torch.zeros_like(outcome)
    for q in range(Q):
        full, part = is_full[q], ~is_full[q]
        p_full = outcome[q][full].mean() if full.any() else None
        p_part = outcome[q][part].mean() if part.any() else outcome.new_zeros(())
        if p_full is not None and p_full > nu * p_part:
            fired[q] = True
            bonus = full & (outcome[q] >= 1)
            total[q][bonus] += delta
        groups = [torch.ones(G, dtype=torch.bool)] if group_by == "question" else [full, part]
        for sel in groups:
            x = total[q][sel]
            if x.numel() < 2 or bool((x == x[0]).all()):
                continue                                        # advantage stays 0
            centred[q][sel] = x - x.mean()
            adv[q][sel] = (x - x.mean()) / (_std_or_zero(x) + eps)
    if scale == "none":
        adv = centred
    elif scale == "batch":
        adv = centred / (_std_or_zero(total.flatten()) + eps)
    return adv, total, fired


def policy_loss_ref(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.04,
                    weights=None, sft_mask=None, aux_coef=0.0, reduction="token_mean"):
    """Clipped surrogate + k3 KL + teacher-forced auxiliary NLL, exactly as the issue writes it.

    logp, old_logp, ref_logp, mask, sft_mask: [B, L]; advantages: [B] (one per sequence) or [B, L] (one
    per token: packed rows hold several sequences); weights: [B] or [B, L].
    """
    B, L = logp.shape
    m = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    A = advantages.to(logp.dtype)
    A = A if A.dim() == 2 else A.unsqueeze(-1)                  # [B, L] or [B, 1]
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    if ref_logp is None or beta == 0:
        kl = torch.zeros_like(logp)
    else:
        d = torch.where(mask, ref_logp - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1
    w = 1.0 if weights is None else (weights if weights.dim() == 2 else weights.unsqueeze(-1)).to(logp.dtype)
    ell = w * (pg + beta * kl)
    ell = torch.where(mask, ell, torch.zeros_like(ell))
    if reduction == "token_mean":
        loss = (m * ell).sum() / m.sum().clamp(min=1)
    elif reduction == "seq_mean":
        per_seq = (m * ell).sum(-1) / m.sum(-1).clamp(min=1)
        has = m.sum(-1) > 0
        loss = per_seq[has].mean() if has.any() else per_seq.sum() * 0
    elif reduction == "constant":
        loss = (m * ell).sum() / (B * L)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    aux = logp.new_zeros(())
    if sft_mask is not None:
        s = sft_mask.to(logp.dtype)
        aux = (s * -torch.where(sft_mask, logp, torch.zeros_like(logp))).sum() / s.sum().clamp(min=1)
        loss = loss + aux_coef * aux
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        metrics = {
            "clip_frac_low": (((ratio < 1 - eps_low) & (A < 0)) & mask).sum() / n,
            "clip_frac_high": (((ratio > 1 + eps_high) & (A > 0)) & mask).sum() / n,
            "kl": (kl * m).sum() / n,
            "ratio": (ratio * m).sum() / n,
            "aux_nll": aux.detach(),
            "n_tokens": m.sum(),
            "n_sft_tokens": sft_mask.sum().to(logp.dtype) if sft_mask is not None else logp.new_zeros(()),
        }
    return loss, metrics


def fused_exgrpo_loss_ref(hidden, weight, targets, mask, advantages, *, old_logp=None, ref_logp=None,
                          weights=None, sft_mask=None, eps_low=0.2, eps_high=0.2, beta=0.04, aux_coef=0.0,
                          reduction="token_mean", temperature=1.0, softcap=None):
    logp = token_logprobs_ref(hidden, weight, targets, temperature=temperature, softcap=softcap)
    return policy_loss_ref(logp, old_logp, ref_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                           beta=beta, weights=weights, sft_mask=sft_mask, aux_coef=aux_coef,
                           reduction=reduction)
