"""exgrpo.kernels: the fused LM-head log-probs, ExGRPO advantages and the clipped policy loss.

Four public functions; tensors in, tensors out. Backends: "torch" (chunked PyTorch, the CPU path),
"triton" (GPU, or CPU under TRITON_INTERPRET=1), "cuda" (csrc/, the optional exgrpo._C extension).
`reference` holds the unchunked float64 spec that tests and benchmarks compare against.

    logp = token_logprobs(hidden, weight, targets)                    # never an [N, V] tensor
    adv, total, fired = exgrpo_advantages(outcome, is_full)           # DSU bonus + group z-scores
    loss, metrics = policy_loss(logp, old_logp, ref_logp, adv, mask)
    loss, metrics = fused_exgrpo_loss(hidden, weight, targets, mask, adv, ...)   # both, one pass
"""
from __future__ import annotations

import torch

from . import _backends, _checks, _lmhead, _loss, reference
from ._backends import available
from .reference import IGNORE_INDEX

__all__ = ["token_logprobs", "exgrpo_advantages", "policy_loss", "fused_exgrpo_loss", "available",
           "reference", "IGNORE_INDEX"]


def token_logprobs(hidden, weight, targets, *, temperature=1.0, softcap=None, return_entropy=False,
                   backend="auto", chunk_mb=None):
    """log softmax(cap(hidden @ weightᵀ)/temperature)[targets], fp32, 0 where targets == -100.

    hidden [..., H] (bf16/fp16/fp32), weight [V, H] (same dtype; may be the tied embedding),
    targets [...] int64. With return_entropy, also the entropy of the softmax (fp32, 0 where ignored).
    Differentiable in hidden and weight through both outputs. Extra memory: one chunk of logits,
    bounded by chunk_mb (default EXGRPO_CHUNK_MB, else 2048 MB on CUDA, 256 MB on CPU), plus the gradient buffers.
    """
    _checks.check_lm_head(hidden, weight, targets, temperature=temperature, softcap=softcap)
    be = _backends.get(backend, hidden.device)
    lead = hidden.shape[:-1]
    flat_h, flat_t, rows = _live_rows(hidden, targets, targets != IGNORE_INDEX)   # ignored rows skip the LM head
    out = _lmhead.TokenLogprobs.apply(
        flat_h.contiguous(), weight.contiguous(), flat_t.contiguous(), be,
        1.0 / temperature, softcap, _lmhead.chunk_budget_bytes(chunk_mb, hidden.device), return_entropy)
    outs = out if return_entropy else (out,)
    if rows is not None:                                        # 0 at the ignored positions, as documented
        outs = tuple(o.new_zeros(targets.numel()).index_copy(0, rows, o) for o in outs)
    outs = tuple(o.reshape(lead) for o in outs)
    return outs if return_entropy else outs[0]


def _live_rows(hidden, targets, live):
    """hidden [N, H] and targets [N] flattened to the rows whose log-prob is needed, and their indices
    (None when that is every row). Prompt tokens, padding and untrained turns skip the LM head's GEMMs
    entirely (one host sync)."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if bool(live.all()):
        return flat_h, flat_t, None
    rows = live.reshape(-1).nonzero().squeeze(1)
    return flat_h.index_select(0, rows), flat_t.index_select(0, rows), rows


def exgrpo_advantages(outcome, is_full, *, delta=0.5, nu=1.0, eps=1e-6, scale="group", group_by="question",
                      backend="auto"):
    """Dialogue Structure Utility bonus + group-relative advantages (docs/method.md Stage 3, steps 4-5).

    outcome [Q, G] float (R_base; a trajectory is correct when outcome >= 1), is_full [Q, G] bool
    (Scenario A). Per question: P_full, P_partial = mean outcome of each scenario (P_partial = 0
    without partial trajectories); the bonus fires when the question has full trajectories and
    P_full > nu·P_partial, adding delta to every correct full trajectory. Normalised over the whole
    question (group_by="question") or per scenario ("scenario"); scale "group" divides by the group's
    Bessel std + eps, "batch" by the std of all totals + eps, "none" only centres. Groups of one and
    groups of equal totals get 0. Returns (advantages [Q, G] fp32, total_reward [Q, G] fp32, fired [Q] bool).
    """
    if not isinstance(outcome, torch.Tensor) or not isinstance(is_full, torch.Tensor):
        raise TypeError("outcome and is_full must be tensors")
    if outcome.dim() != 2:
        raise ValueError(f"outcome must be [Q, G], got shape {tuple(outcome.shape)}")
    if is_full.shape != outcome.shape:
        raise ValueError(f"is_full shape {tuple(is_full.shape)} must equal outcome shape {tuple(outcome.shape)}")
    if is_full.dtype != torch.bool:
        raise TypeError(f"is_full must be bool, got {is_full.dtype}")
    if not outcome.dtype.is_floating_point:
        raise TypeError(f"outcome must be a floating tensor, got {outcome.dtype}")
    if is_full.device != outcome.device:
        raise ValueError(f"is_full is on {is_full.device} but outcome is on {outcome.device}")
    if not bool(torch.isfinite(outcome).all()):
        raise ValueError("outcome contains NaN or Inf")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if group_by not in ("question", "scenario"):
        raise ValueError(f"group_by must be 'question' or 'scenario', got {group_by!r}")
    for name, v in (("delta", delta), ("nu", nu), ("eps", eps)):
        if not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf")):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    be = _backends.get(backend, outcome.device)
    centred, scaled, total, fired = be.advantages(outcome.detach(), is_full, delta=delta, nu=nu, eps=eps,
                                                  by_scenario=group_by == "scenario")
    if scale == "group":
        adv = scaled
    elif scale == "none":
        adv = centred
    else:
        std = total.std() if total.numel() > 1 else total.new_zeros(())
        adv = centred / (std + eps)
    return adv, total, fired


def _terms(shape, device, mask, advantages, old_logp, ref_logp, weights, sft_mask, eps_low, eps_high, beta,
           aux_coef, reduction):
    _checks.check_loss_inputs(shape, device, mask, advantages, old_logp, ref_logp, weights, sft_mask,
                              eps_low=eps_low, eps_high=eps_high, beta=beta, aux_coef=aux_coef,
                              reduction=reduction)
    spec = _loss.LossSpec(float(eps_low), float(eps_high), float(beta), float(aux_coef), reduction)
    return _loss.prepare_terms(mask, advantages, old_logp, ref_logp, weights, sft_mask, spec), spec


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.04,
                weights=None, sft_mask=None, aux_coef=0.0, reduction="token_mean", backend="auto"):
    """Token-level clipped surrogate − β·KL(k3) + aux_coef·NLL on sft_mask. Returns (loss, metrics).

    logp, old_logp, ref_logp, mask, sft_mask: [B, L]; advantages [B] or [B, L] (per token, for rows that
    pack several sequences); weights [B] or [B, L].
    old_logp=None: on-policy (ratio 1, gradient intact). ref_logp=None or beta=0: no KL.
    reduction: "token_mean" Σmℓ/max(1,Σm), "seq_mean" mean over sequences with a token of Σmℓ/Σm,
    "constant" Σmℓ/(B·L). Metrics: clip_frac_low/high, kl, ratio, aux_nll, n_tokens, n_sft_tokens.
    """
    if not isinstance(logp, torch.Tensor) or not logp.dtype.is_floating_point:
        raise TypeError("logp must be a floating tensor")
    terms, spec = _terms(tuple(logp.shape), logp.device, mask, advantages, old_logp, ref_logp, weights,
                         sft_mask, eps_low, eps_high, beta, aux_coef, reduction)
    used = mask if sft_mask is None else (mask | sft_mask)
    if not bool(torch.isfinite(logp.detach()[used]).all()):
        raise ValueError("logp contains NaN or Inf at masked-in positions")
    be = _backends.get(backend, logp.device)
    sums = _lmhead.PolicyLoss.apply(logp, terms, spec, be)
    return _lmhead.policy_loss_from_sums(sums, terms)


def fused_exgrpo_loss(hidden, weight, targets, mask, advantages, *, old_logp=None, ref_logp=None, weights=None,
                      sft_mask=None, eps_low=0.2, eps_high=0.2, beta=0.04, aux_coef=0.0,
                      reduction="token_mean", temperature=1.0, softcap=None, backend="auto", chunk_mb=None):
    """policy_loss(token_logprobs(hidden, weight, targets), ...) in one pass over the LM head.

    hidden [B, L, H], targets [B, L]; the rest as in policy_loss. The log-probs and the loss gradient
    come from the same chunk of logits, so the LM head costs 6·N·H·V FLOPs and never an [N, V] tensor.
    Every position in mask or sft_mask must have a real target (not -100).
    """
    _checks.check_lm_head(hidden, weight, targets, temperature=temperature, softcap=softcap, hidden_rank=3)
    B, L, H = hidden.shape
    terms, spec = _terms((B, L), hidden.device, mask, advantages, old_logp, ref_logp, weights, sft_mask,
                         eps_low, eps_high, beta, aux_coef, reduction)
    used = mask if sft_mask is None else (mask | sft_mask)
    if bool((used & (targets == IGNORE_INDEX)).any()):
        raise ValueError("mask/sft_mask select positions whose target is -100 (ignored): they have no log-prob")
    be = _backends.get(backend, hidden.device)
    flat_h, flat_t, rows = _live_rows(hidden, targets, used)   # only trained tokens go through the LM head
    if rows is not None:
        terms = terms.take(rows)
    args = (flat_h.contiguous(), weight.contiguous(), flat_t.contiguous())
    budget = _lmhead.chunk_budget_bytes(chunk_mb, hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        sums = _lmhead.FusedLoss.apply(*args, terms, spec, be, 1.0 / temperature, softcap, budget)
    else:                                                       # evaluation: no gradient GEMMs
        with torch.no_grad():
            logp = _lmhead.TokenLogprobs.apply(*args, be, 1.0 / temperature, softcap, budget, False)
            sums = be.loss_terms(logp, terms, spec)[1]
    return _lmhead.policy_loss_from_sums(sums, terms)
