"""Training sequences -> token-budgeted micro-batches -> the fused loss, for SFT and ExGRPO alike.

A micro-batch's loss is scaled so that summing the micro-batches' gradients gives exactly the
full batch's token-mean objective: per-token weights N_micro/N_total for the policy tokens and an
aux coefficient λ·S_micro/S_total for the teacher-forced tokens. Activations of one micro-batch are
freed (backward) before the next is formed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from exgrpo.kernels import IGNORE_INDEX


@dataclass
class Sequence:
    ids: list[int]                      # [L]
    policy: list[bool]                  # [L] tokens trained by the policy loss
    sft: list[bool]                     # [L] tokens trained by the auxiliary SFT loss
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None   # [L-1] log-probs of targets 1..L-1 at rollout time
    ref_logp: torch.Tensor | None = None   # [L-1] same, under the reference policy


@dataclass
class MicroBatch:
    index: list[int]                    # which sequences
    input_ids: torch.Tensor             # [b, T]
    attention: torch.Tensor             # [b, T]
    targets: torch.Tensor               # [b, T] next token where trained (mask | sft_mask), else IGNORE_INDEX
    mask: torch.Tensor                  # [b, T] bool, policy targets
    sft_mask: torch.Tensor              # [b, T] bool, teacher-forced targets


def micro_batches(seqs: list[Sequence], token_budget: int, pad_id: int, device) -> list[MicroBatch]:
    """Pack sequences (in length order, so padding stays small) into micro-batches of at most
    `token_budget` padded tokens; a sequence longer than the budget goes alone."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    groups, cur = [], []
    for i in order:
        width = max([len(seqs[j].ids) for j in cur] + [len(seqs[i].ids)])
        if cur and width * (len(cur) + 1) > token_budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        T = max(len(seqs[i].ids) for i in g)
        ids = torch.full((len(g), T), pad_id, dtype=torch.long)
        att = torch.zeros(len(g), T, dtype=torch.long)
        tgt = torch.full((len(g), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(g), T, dtype=torch.bool)
        sft = torch.zeros(len(g), T, dtype=torch.bool)
        for r, i in enumerate(g):
            s = seqs[i]
            n = len(s.ids)
            ids[r, :n] = torch.tensor(s.ids)
            att[r, :n] = 1
            mask[r, : n - 1] = torch.tensor(s.policy[1:], dtype=torch.bool)
            sft[r, : n - 1] = torch.tensor(s.sft[1:], dtype=torch.bool)
            # position t predicts token t+1; only trained positions get a target, so prompt tokens
            # and untrained turns never go through the LM head (their log-probs would be unused)
            tgt[r, : n - 1] = torch.where(mask[r, : n - 1] | sft[r, : n - 1], ids[r, 1:n], IGNORE_INDEX)
        out.append(MicroBatch(g, ids.to(device), att.to(device), tgt.to(device), mask.to(device), sft.to(device)))
    return out


def equalize(mbs: list[MicroBatch], n: int, pad_id: int, device) -> list[MicroBatch]:
    """Pad with empty micro-batches to `n` forward passes. Under FSDP every rank must run the same
    number of forwards/backwards (each one all-gathers and reduce-scatters); an empty one trains nothing."""
    z = torch.zeros(1, 2, dtype=torch.bool, device=device)
    dummy = MicroBatch([], torch.full((1, 2), pad_id, device=device), torch.ones(1, 2, dtype=torch.long, device=device),
                       torch.full((1, 2), IGNORE_INDEX, device=device), z, z)
    return mbs + [dummy] * (n - len(mbs))


def _per_token(mb: MicroBatch, seqs: list[Sequence], field: str) -> torch.Tensor | None:
    vals = [getattr(seqs[i], field) for i in mb.index]
    if any(v is None for v in vals):
        return None
    out = torch.zeros(mb.targets.shape, dtype=torch.float32, device=mb.targets.device)
    for r, v in enumerate(vals):
        out[r, : v.numel()] = v.to(out.device)
    return out


@torch.no_grad()
def sequence_logprobs(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, backend="auto",
                      temperature=1.0) -> list[torch.Tensor]:
    """Per-sequence log-probs of targets 1..L-1 ([L-1] fp32 each; 0 at untrained positions),
    micro-batch by micro-batch. `policy` is an exgrpo.policy.Policy (possibly FSDP-sharded)."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for mb in mbs:
        lp = policy(mb.input_ids, mb.attention, mb.targets, logprobs_only=True, backend=backend,
                    temperature=temperature)
        for r, i in enumerate(mb.index):
            out[i] = lp[r, : len(seqs[i].ids) - 1].float().cpu()
    return out


def attach_logprobs(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, old: bool, ref: bool, ref_policy=None,
                    backend="auto") -> None:
    """Fill each sequence's old_logp (the rollout policy's, for the ratio when a batch is reused) and
    ref_logp (the reference's: `ref_policy`, a frozen copy, or else the policy with its LoRA adapters
    disabled). The trainer and bench/step.py both go through here."""
    from exgrpo.models import reference_mode
    if old:
        for s, lp in zip(seqs, sequence_logprobs(policy, mbs, seqs, backend=backend)):
            s.old_logp = lp
    if ref:
        if ref_policy is not None:
            ref_lp = sequence_logprobs(ref_policy, mbs, seqs, backend=backend)
        else:
            with reference_mode(policy.model):
                ref_lp = sequence_logprobs(policy, mbs, seqs, backend=backend)
        for s, lp in zip(seqs, ref_lp):
            s.ref_logp = lp


def loss_and_backward(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, eps_low, eps_high, beta, aux_coef,
                      backend="auto", temperature=1.0, need_grad=True, totals: tuple[int, int] | None = None,
                      grad_scale: float = 1.0, skip_empty: bool = True) -> dict[str, float]:
    """One optimizer step's worth of forward+backward over all micro-batches; returns summed metrics.

    `totals` = (policy tokens, teacher-forced tokens) of the whole (global) batch; by default this
    process's. Under data parallelism pass the all-reduced counts and grad_scale = world size (FSDP
    averages gradients over ranks; the objective is a sum over the global batch)."""
    n_loc = sum(int(mb.mask.sum()) for mb in mbs)
    s_loc = sum(int(mb.sft_mask.sum()) for mb in mbs)
    n_tot, s_tot = totals if totals is not None else (n_loc, s_loc)
    agg = {"loss": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0, "kl": 0.0, "ratio": 0.0, "aux_nll": 0.0,
           "n_tokens": float(n_tot), "n_sft_tokens": float(s_tot)}
    for mb in mbs:
        n_mb, s_mb = int(mb.mask.sum()), int(mb.sft_mask.sum())
        if skip_empty and n_mb == 0 and (s_mb == 0 or aux_coef == 0):
            continue
        adv = torch.tensor([seqs[i].advantage for i in mb.index] or [0.0] * mb.targets.shape[0], dtype=torch.float32,
                           device=mb.targets.device)
        w_policy = n_mb / max(n_tot, 1)
        loss, m = policy(
            mb.input_ids, mb.attention, mb.targets, mask=mb.mask, advantages=adv,
            old_logp=_per_token(mb, seqs, "old_logp"), ref_logp=_per_token(mb, seqs, "ref_logp") if beta > 0 else None,
            weights=torch.full_like(adv, w_policy), sft_mask=mb.sft_mask,
            aux_coef=aux_coef * s_mb / max(s_tot, 1), eps_low=eps_low, eps_high=eps_high, beta=beta,
            reduction="token_mean", temperature=temperature, backend=backend)
        if need_grad:
            (loss * grad_scale).backward()
        agg["loss"] += float(loss.detach())
        for k in ("clip_frac_low", "clip_frac_high", "kl", "ratio"):
            agg[k] += float(m[k]) * n_mb / max(n_tot, 1)
        agg["aux_nll"] += float(m["aux_nll"]) * s_mb / max(s_tot, 1)
        del loss
    return agg
