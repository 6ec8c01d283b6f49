"""Training sequences -> token-budgeted micro-batches -> the fused loss, for SFT and ExGRPO alike.

Layouts. Packed (the default): several sequences share a row, laid end to end, with position ids
restarting at 0 for each and no attention mask; transformers then keeps attention within each sequence
(flash_attention_2 reads the boundaries off the position ids as variable-length sequences, for a
single row only; sdpa and eager get a block-diagonal causal mask). With flash-attn every sequence of a
micro-batch goes in one row and there is no padding at all; with sdpa/eager, whose masked attention
costs the square of the row's length, rows are as wide as the micro-batch's longest sequence and are
filled first-fit, so attention costs no more than the padded layout's and there are fewer rows and
little padding. Padded: one row per sequence, right-padded to the longest, sorted by length so the
padding stays small. Every layout gives the same loss and gradients (tests/test_packing.py).

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
    old_logp: torch.Tensor | None = None   # [L-1] log-probs of targets 1..L-1 under the policy that sampled
    ref_logp: torch.Tensor | None = None   # [L-1] same, under the reference policy
    rollout_logp: list[float] | None = None   # [L] the rollout engine's own log-probs where sampled (diagnostic)


@dataclass
class MicroBatch:
    index: list[int]                    # which sequences
    input_ids: torch.Tensor             # [b, T]
    attention: torch.Tensor | None      # [b, T] padded layout; None when packed
    position_ids: torch.Tensor | None   # [b, T] packed layout: 0, 1, ... restarting at each sequence
    targets: torch.Tensor               # [b, T] next token where trained (mask | sft_mask), else IGNORE_INDEX
    mask: torch.Tensor                  # [b, T] bool, policy targets
    sft_mask: torch.Tensor              # [b, T] bool, teacher-forced targets
    starts: list[tuple[int, int]]       # per sequence of `index`: (row, first column)


def _groups(seqs: list[Sequence], token_budget: int, packed: bool) -> list[list[int]]:
    """Sequences in length order, cut into micro-batches of at most `token_budget` tokens (packed: the
    sum of the lengths; padded: rows x the longest); a sequence longer than the budget goes alone."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    groups, cur, used, width = [], [], 0, 0
    for i in order:
        n = len(seqs[i].ids)
        cost = used + n if packed else max(width, n) * (len(cur) + 1)
        if cur and cost > token_budget:
            groups.append(cur)
            cur, used, width = [], 0, 0
        cur.append(i)
        used, width = used + n, max(width, n)
    if cur:
        groups.append(cur)
    return groups


def _layout(lens: list[int], packed: bool, one_row: bool) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(rows, columns) of a micro-batch of sequences of these lengths, and each one's (row, first column)."""
    if not packed:
        return (len(lens), max(lens)), [(r, 0) for r in range(len(lens))]
    width = sum(lens) if one_row else max(lens)
    free: list[int] = []                                # columns left in each row
    starts: list[tuple[int, int]] = [(0, 0)] * len(lens)
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):     # first fit, longest first
        r = next((r for r, f in enumerate(free) if f >= lens[i]), len(free))
        if r == len(free):
            free.append(width)
        starts[i] = (r, width - free[r])
        free[r] -= lens[i]
    return (len(free), width), starts


def layout_tokens(seqs: list[Sequence], token_budget: int, *, packed: bool, one_row: bool = False) -> tuple[int, int]:
    """(tokens, of which padding) that micro_batches would lay out for these sequences, without building them."""
    tokens = padding = 0
    for g in _groups(seqs, token_budget, packed):
        lens = [len(seqs[i].ids) for i in g]
        (rows, width), _ = _layout(lens, packed, one_row)
        tokens, padding = tokens + rows * width, padding + rows * width - sum(lens)
    return tokens, padding


def micro_batches(seqs: list[Sequence], token_budget: int, pad_id: int, device, *, packed: bool = True,
                  one_row: bool = False) -> list[MicroBatch]:
    """Micro-batches of at most `token_budget` tokens (see the module docstring for the layouts); one_row:
    every packed sequence of a micro-batch in one row (what flash_attention_2 needs)."""
    out = []
    for g in _groups(seqs, token_budget, packed):
        lens = [len(seqs[i].ids) for i in g]
        shape, starts = _layout(lens, packed, one_row)
        ids = torch.full(shape, pad_id, dtype=torch.long)
        tgt = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.bool)
        sft = torch.zeros(shape, dtype=torch.bool)
        att = None if packed else torch.zeros(shape, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long) if packed else None
        for i, (r, c), n in zip(g, starts, lens):
            s = seqs[i]
            ids[r, c:c + n] = torch.tensor(s.ids)
            if att is not None:
                att[r, c:c + n] = 1
            if pos is not None:
                pos[r, c:c + n] = torch.arange(n)
            # position t predicts token t+1 of the same sequence; only trained positions get a target, so
            # prompt tokens and untrained turns never go through the LM head (their log-probs would be unused),
            # and a sequence's last position (which would predict the next sequence's first) gets none
            mask[r, c:c + n - 1] = torch.tensor(s.policy[1:], dtype=torch.bool)
            sft[r, c:c + n - 1] = torch.tensor(s.sft[1:], dtype=torch.bool)
            tgt[r, c:c + n - 1] = torch.where(mask[r, c:c + n - 1] | sft[r, c:c + n - 1], ids[r, c + 1:c + n],
                                              IGNORE_INDEX)
        mv = lambda t: None if t is None else t.to(device)
        out.append(MicroBatch(g, ids.to(device), mv(att), mv(pos), tgt.to(device), mask.to(device), sft.to(device),
                              starts))
    return out


def equalize(mbs: list[MicroBatch], n: int, pad_id: int, device) -> list[MicroBatch]:
    """Pad with empty micro-batches to `n` forward passes. Under FSDP every rank must run the same
    number of forwards/backwards (each one all-gathers and reduce-scatters); an empty one trains nothing."""
    z = torch.zeros(1, 2, dtype=torch.bool, device=device)
    dummy = MicroBatch([], torch.full((1, 2), pad_id, device=device), torch.ones(1, 2, dtype=torch.long, device=device),
                       None, torch.full((1, 2), IGNORE_INDEX, device=device), z, z, [])
    return mbs + [dummy] * (n - len(mbs))


def _per_token(mb: MicroBatch, seqs: list[Sequence], field: str) -> torch.Tensor | None:
    """A per-sequence [L-1] field laid out like the micro-batch's targets ([b, T] fp32, 0 elsewhere)."""
    vals = [getattr(seqs[i], field) for i in mb.index]
    if any(v is None for v in vals):
        return None
    out = torch.zeros(mb.targets.shape, dtype=torch.float32, device=mb.targets.device)
    for (r, c), v in zip(mb.starts, vals):
        out[r, c:c + v.numel()] = v.to(out.device)
    return out


def _advantages(mb: MicroBatch, seqs: list[Sequence]) -> torch.Tensor:
    """Each sequence's advantage on each of its tokens: [b, T] fp32 (a packed row holds several)."""
    out = torch.zeros(mb.targets.shape, dtype=torch.float32)
    for i, (r, c) in zip(mb.index, mb.starts):
        out[r, c:c + len(seqs[i].ids)] = seqs[i].advantage
    return out.to(mb.targets.device)


@torch.no_grad()
def sequence_logprobs(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, temperature=1.0) -> list[torch.Tensor]:
    """Per-sequence log-probs of targets 1..L-1 ([L-1] fp32 each; 0 at untrained positions),
    micro-batch by micro-batch. `policy` is an exgrpo.policy.Policy (possibly FSDP-sharded)."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for mb in mbs:
        lp = policy(mb.input_ids, mb.attention, mb.targets, position_ids=mb.position_ids, logprobs_only=True,
                    temperature=temperature)
        for i, (r, c) in zip(mb.index, mb.starts):
            out[i] = lp[r, c:c + len(seqs[i].ids) - 1].float().cpu()
    return out


def attach_logprobs(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, old: bool, ref: bool, ref_policy=None,
                    temperature: float = 1.0) -> None:
    """Fill each sequence's old_logp (the rollout policy's, for the ratio when a batch is reused) and
    ref_logp (the reference's: `ref_policy`, a frozen copy, or else the policy with its LoRA adapters
    disabled), both at the sampling temperature. The trainer and bench/step.py both go through here."""
    from exgrpo.models import reference_mode
    if old:
        for s, lp in zip(seqs, sequence_logprobs(policy, mbs, seqs, temperature=temperature)):
            s.old_logp = lp
    if ref:
        if ref_policy is not None:
            ref_lp = sequence_logprobs(ref_policy, mbs, seqs, temperature=temperature)
        else:
            with reference_mode(policy.model):
                ref_lp = sequence_logprobs(policy, mbs, seqs, temperature=temperature)
        for s, lp in zip(seqs, ref_lp):
            s.ref_logp = lp


def loss_and_backward(policy, mbs: list[MicroBatch], seqs: list[Sequence], *, eps_low, eps_high, beta, aux_coef,
                      temperature=1.0, need_grad=True, totals: tuple[int, int] | None = None,
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
        adv = _advantages(mb, seqs)
        w_policy = n_mb / max(n_tot, 1)
        loss, m = policy(
            mb.input_ids, mb.attention, mb.targets, position_ids=mb.position_ids, mask=mb.mask, advantages=adv,
            old_logp=_per_token(mb, seqs, "old_logp"), ref_logp=_per_token(mb, seqs, "ref_logp") if beta > 0 else None,
            weights=torch.full_like(adv, w_policy), sft_mask=mb.sft_mask,
            aux_coef=aux_coef * s_mb / max(s_tot, 1), eps_low=eps_low, eps_high=eps_high, beta=beta,
            reduction="token_mean", temperature=temperature)
        if need_grad:
            (loss * grad_scale).backward()
        agg["loss"] += float(loss.detach())
        for k in ("clip_frac_low", "clip_frac_high", "kl", "ratio"):
            agg[k] += float(m[k]) * n_mb / max(n_tot, 1)
        agg["aux_nll"] += float(m["aux_nll"]) * s_mb / max(s_tot, 1)
        del loss
    return agg
