"""The policy loss and the advantages as per-token / per-question arithmetic, shared by all backends.

The loss is a sum of per-token terms once the reduction's normaliser is known, and every normaliser
(Σm, tokens per sequence, sequences with a token, Σs) is known from the masks before any log-prob is
computed. So `prepare_terms` folds mask, weights and normaliser into one per-token `scale`, and the
per-token arithmetic (`loss_terms_torch` here, `triton_loss.loss_terms` on the GPU) needs nothing
global. That is what lets the fused LM-head pass turn a chunk's log-probs into that chunk's loss
gradient right away, without a second pass over the vocabulary.

Per token t of sequence b, with lp = log π_θ, ρ = exp(lp − old), d = ref − lp:
    pg   = −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)·A)      ∂pg/∂lp  = −ρA, or 0 where the clipped branch is the min
    kl   = e^d − d − 1                               ∂kl/∂lp  = 1 − e^d
    loss = Σ_t scale_t·(pg + β·kl) + aux_t·(−lp)      scale_t = m·w·norm_b,  aux_t = s·λ / max(1, Σs)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Order of the per-program partial sums written by every loss-terms implementation.
SUM_NAMES = ("loss", "clip_low", "clip_high", "kl", "ratio", "aux_nll")
N_SUMS = len(SUM_NAMES)


class LossSpec(NamedTuple):
    eps_low: float
    eps_high: float
    beta: float
    aux_coef: float
    reduction: str


class TokenTerms(NamedTuple):
    """Everything the per-token loss needs, flattened over the N = B·L tokens."""
    adv: torch.Tensor                 # [N] fp32, the advantage of the token's sequence
    scale: torch.Tensor               # [N] fp32, m·w·norm_b = ∂loss/∂ℓ_t (0 where masked)
    aux: torch.Tensor                 # [N] fp32, s·λ/max(1, Σs) (0 outside sft_mask)
    old: torch.Tensor | None          # [N] fp32, None = on-policy (ρ ≡ 1, gradient intact)
    ref: torch.Tensor | None          # [N] fp32, None when there is no KL term
    mask: torch.Tensor                # [N] bool, policy tokens
    sft: torch.Tensor | None          # [N] bool, teacher-forced tokens
    n_tokens: torch.Tensor            # [] fp32, Σm
    n_sft: torch.Tensor               # [] fp32, Σs

    def _per_token(self, f) -> TokenTerms:
        """f applied to the [N] fields; the totals n_tokens / n_sft stay the whole batch's."""
        return TokenTerms(*(f(t) if (isinstance(t, torch.Tensor) and t.dim() == 1) else t for t in self))

    def rows(self, lo: int, hi: int) -> TokenTerms:
        return self._per_token(lambda t: t[lo:hi])

    def take(self, index: torch.Tensor) -> TokenTerms:
        """The terms of the tokens `index` only."""
        return self._per_token(lambda t: t.index_select(0, index))


def prepare_terms(mask, advantages, old_logp, ref_logp, weights, sft_mask, spec: LossSpec) -> TokenTerms:
    B, L = mask.shape
    m = mask.float()                                            # [B, L]
    n_tok = m.sum()
    if spec.reduction == "token_mean":
        norm = (1.0 / n_tok.clamp(min=1)).expand(B, 1)          # [B, 1]
    elif spec.reduction == "seq_mean":
        per_seq = m.sum(-1, keepdim=True)                       # [B, 1]
        n_seq = (per_seq > 0).sum().clamp(min=1)
        norm = torch.where(per_seq > 0, 1.0 / (per_seq.clamp(min=1) * n_seq), torch.zeros_like(per_seq))
    else:                                                       # "constant"
        norm = m.new_full((B, 1), 1.0 / (B * L))
    w = 1.0 if weights is None else (weights if weights.dim() == 2 else weights.unsqueeze(-1)).float()
    scale = (m * w * norm).reshape(-1)
    if sft_mask is not None and spec.aux_coef > 0:
        s = sft_mask.float()
        n_sft = s.sum()
        aux = (s * (spec.aux_coef / n_sft.clamp(min=1))).reshape(-1)
    else:
        n_sft = sft_mask.float().sum() if sft_mask is not None else m.new_zeros(())
        aux = torch.zeros_like(scale)
    flat = lambda t: None if t is None else t.detach().reshape(-1).float()
    use_ref = ref_logp is not None and spec.beta != 0
    return TokenTerms(
        adv=(advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)).detach().float().expand(B, L)
        .reshape(-1),
        scale=scale, aux=aux, old=flat(old_logp), ref=flat(ref_logp) if use_ref else None,
        mask=mask.reshape(-1), sft=None if sft_mask is None else sft_mask.reshape(-1),
        n_tokens=n_tok, n_sft=n_sft,
    )


def loss_terms_torch(logp: torch.Tensor, t: TokenTerms, spec: LossSpec):
    """Per-token loss gradient and the partial sums, in plain PyTorch. logp: [n] fp32 (detached).

    Returns coef [n] fp32 (∂loss/∂logp) and sums [N_SUMS] fp32 in SUM_NAMES order.
    """
    m = t.mask
    used = m if t.sft is None else (m | t.sft)
    lp = torch.where(used, logp, torch.zeros_like(logp))        # masked positions may hold garbage
    old = lp if t.old is None else torch.where(m, t.old, lp)
    ratio = torch.exp(lp - old)
    unclipped = ratio * t.adv
    clipped = ratio.clamp(1 - spec.eps_low, 1 + spec.eps_high) * t.adv
    pg = -torch.minimum(unclipped, clipped)
    dpg = torch.where(clipped < unclipped, torch.zeros_like(ratio), -unclipped)
    if t.ref is not None:
        d = torch.where(m, t.ref - lp, torch.zeros_like(lp))
        ed = torch.exp(d)
        kl, dkl = ed - d - 1, 1 - ed
    else:
        kl = dkl = torch.zeros_like(lp)
    coef = t.scale * (dpg + spec.beta * dkl) - t.aux
    mf = m.float()
    sft_nll = (t.sft.float() * -lp).sum() if t.sft is not None else lp.new_zeros(())
    sums = torch.stack([
        (t.scale * (pg + spec.beta * kl) - t.aux * lp).sum(),
        (mf * ((ratio < 1 - spec.eps_low) & (t.adv < 0))).sum(),
        (mf * ((ratio > 1 + spec.eps_high) & (t.adv > 0))).sum(),
        (mf * kl).sum(),
        (mf * ratio).sum(),
        sft_nll,
    ])
    return coef, sums


def finish_metrics(sums: torch.Tensor, t: TokenTerms) -> dict[str, torch.Tensor]:
    """Partial sums -> the metrics dict (0-dim fp32 tensors, no host sync)."""
    sums = sums.detach()
    n = t.n_tokens.clamp(min=1)
    return {
        "clip_frac_low": sums[1] / n,
        "clip_frac_high": sums[2] / n,
        "kl": sums[3] / n,
        "ratio": sums[4] / n,
        "aux_nll": sums[5] / t.n_sft.clamp(min=1),
        "n_tokens": t.n_tokens,
        "n_sft_tokens": t.n_sft,
    }


# ----------------------------------------------------------------------------- advantages (torch)

def advantages_torch(outcome, is_full, *, delta, nu, eps, by_scenario):
    """Vectorised docs/method.md steps 4-5. Returns (centred [Q,G], group-scaled [Q,G], total [Q,G], fired [Q]).

    correct := outcome >= 1; P_partial = 0 for a question without partial trajectories.
    """
    r = outcome.float()                                         # [Q, G]
    full, part = is_full, ~is_full
    n_full, n_part = full.sum(1), part.sum(1)                   # [Q]
    p_full = (r * full).sum(1) / n_full.clamp(min=1)
    p_part = (r * part).sum(1) / n_part.clamp(min=1)
    fired = (n_full > 0) & (p_full > nu * p_part)               # [Q]
    total = r + delta * (fired.unsqueeze(1) & full & (r >= 1)).float()

    def norm(sel):                                              # sel [Q, G] bool: one group per row
        n = sel.sum(1, keepdim=True).float()
        mean = (total * sel).sum(1, keepdim=True) / n.clamp(min=1)
        c = torch.where(sel, total - mean, torch.zeros_like(total))
        std = ((c * c).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        hi = torch.where(sel, total, torch.full_like(total, -float("inf"))).amax(1, keepdim=True)
        lo = torch.where(sel, total, torch.full_like(total, float("inf"))).amin(1, keepdim=True)
        flat = (n < 2) | (hi == lo)                             # groups of one / all-equal totals -> 0
        c = torch.where(flat, torch.zeros_like(c), c)
        return c, torch.where(flat, torch.zeros_like(c), c / (std + eps))

    if by_scenario:
        (cf, af), (cp, ap) = norm(full), norm(part)
        centred, scaled = torch.where(full, cf, cp), torch.where(full, af, ap)
    else:
        centred, scaled = norm(torch.ones_like(full))
    return centred, scaled, total, fired
