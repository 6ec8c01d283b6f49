"""One training step as functions with typed inputs and outputs (docs/method.md, Stage 3):

    seed  = begin_step(cfg.seed, step, d)                          # the step's seeds (resume replays them)
    plan  = plan_step(items, step, seed, cfg, d)                   # questions, Scenario A/B dialogues
    outs  = rollout(engine, plan)                                  # multi-turn, token ids in and out
    rew   = reward(plan, outs)                                     # R_base [Q, 2G]
    adv   = advantages(rew, cfg)                                   # DSU bonus + group z-scores
    seqs  = sequences(plan, outs, adv, tok, cfg)                   # trajectories + teacher-forced probe answers
    batch = prepare(policy, seqs, cfg, d, dev, ref=ref, ...)       # micro-batches, old/ref log-probs, totals
    m     = optimize(policy, opt, batch, seqs, loss_spec(cfg), ...) # clipped loss + KL + L_aux, guarded updates

exgrpo/train.py is a loop over these, top to bottom; bench/step.py times the same calls phase by phase at
Gemma-7B shape; exgrpo/sft.py uses prepare + optimize with the SFT loss. Nothing here owns a loop, a run
folder or a checkpoint.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from exgrpo import batching, distributed
from exgrpo.batching import MicroBatch, Sequence, attach_logprobs, equalize, micro_batches
from exgrpo.dialogues import SFT, Probe, ProbeItem, dialogue, partial_count, question_message, render, sample_probes
from exgrpo.distributed import Dist
from exgrpo.rollout import DialogueRollout, Engine

# ============================================================================= plan


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def begin_step(seed: int, step: int, d: Dist) -> int:
    """The step's seed, and torch seeded from it per rank (sampling): a resumed run replays the step."""
    s = step_seed(seed, step)
    torch.manual_seed(s + 7 * d.rank)
    return s


def step_questions(items: list[ProbeItem], step: int, n: int, seed: int) -> list[ProbeItem]:
    """The step's n questions: epochs over a seeded permutation, so the data position is the step."""
    out, perms = [], {}
    for i in range(step * n, step * n + n):
        epoch, j = divmod(i, len(items))
        if epoch not in perms:
            perms[epoch] = list(range(len(items)))
            random.Random(seed * 7919 + epoch).shuffle(perms[epoch])
        out.append(items[perms[epoch][j]])
    return out


@dataclass(frozen=True)
class Trajectory:
    question: int                       # index into StepPlan.questions
    full: bool                          # Scenario A (all sampled probes) or B (the first k')
    probes: tuple[Probe, ...]
    turns: tuple[dict, ...]             # the user messages: probes..., then Q


@dataclass
class StepPlan:
    questions: list[ProbeItem]          # [Q] this rank's questions of the step
    trajectories: list[Trajectory]      # [Q·2G] per question: Scenario A's G, then B's G
    aux_probes: list[tuple[Probe, ...]]  # [Q] Scenario A's probes, teacher-forced for L_aux
    group_size: int                     # G


def plan_step(items: list[ProbeItem], step: int, seed: int, cfg, d: Dist) -> StepPlan:
    """This rank's questions (a question's whole group stays on one rank) and their dialogues: k probes
    without replacement for Scenario A, the first k' (uniform in 1..k-1) for B, the same on any number
    of ranks (the per-question rng depends on the question's index in the step, not on the rank)."""
    per_rank = cfg.questions_per_step // d.world
    qids = range(d.rank * per_rank, (d.rank + 1) * per_rank)
    everyone = step_questions(items, step, cfg.questions_per_step, cfg.seed)
    questions = [everyone[i] for i in qids]
    trajs, aux = [], []
    for q, (qid, item) in enumerate(zip(qids, questions)):
        rng = random.Random(seed * 4099 + qid)
        full = tuple(sample_probes(item, cfg.k_probes, rng))
        k_part = partial_count(len(full), rng, cfg.partial_probes)
        qmsg = question_message(item.example)
        for is_full, probes in ((True, full), (False, full[:k_part])):
            turns = tuple({"role": "user", "content": p.question} for p in probes) + (qmsg,)
            trajs += [Trajectory(q, is_full, probes, turns)] * cfg.group_size
        aux.append(full)
    return StepPlan(questions, trajs, aux, cfg.group_size)


# ============================================================================= rollout


def rollout(engine: Engine, plan: StepPlan) -> list[DialogueRollout]:
    """Every trajectory's dialogue, sampled turn by turn (exgrpo.rollout.run_dialogues, looked up at call
    time so that a test can wrap it)."""
    from exgrpo import rollout as R
    return R.run_dialogues(engine, [list(t.turns) for t in plan.trajectories])


# ============================================================================= reward


class Rewards(NamedTuple):
    outcome: torch.Tensor               # [Q, 2G] R_base: A's G, then B's G
    is_full: torch.Tensor               # [Q, 2G] bool, Scenario A


RewardFn = Callable[[object, str], float]     # (Example, final reply) -> R_base


def task_reward(ex, reply: str) -> float:
    """R_base: 1 if the final answer to Q, extracted as the task extracts it, equals the gold answer."""
    from exgrpo.tasks import get_task
    task = get_task(ex.task)
    return float(task.is_correct(task.extract(reply, ex), ex.answer))


def reward(plan: StepPlan, rollouts: list[DialogueRollout], reward_fn: RewardFn | None = None) -> Rewards:
    fn = reward_fn or task_reward
    G2 = 2 * plan.group_size
    outcome = torch.zeros(len(plan.questions), G2)
    for j, (t, r) in enumerate(zip(plan.trajectories, rollouts, strict=True)):
        outcome[t.question, j % G2] = fn(plan.questions[t.question].example, r.replies[-1])
    is_full = torch.zeros(len(plan.questions), G2, dtype=torch.bool)
    is_full[:, : plan.group_size] = True
    return Rewards(outcome, is_full)


# ============================================================================= advantage


class Advantages(NamedTuple):
    adv: torch.Tensor                   # [Q, 2G] fp32
    total: torch.Tensor                 # [Q, 2G] R_total = R_base (+ δ where the bonus fires)
    fired: torch.Tensor                 # [Q] bool, the DSU condition P_full > ν·P_partial


def advantages(rew: Rewards, cfg, *, bonus: bool | None = None) -> Advantages:
    """The step's advantages; `bonus` (default: cfg.bonus) False computes them without the DSU bonus."""
    from exgrpo.kernels import exgrpo_advantages
    on = cfg.bonus if bonus is None else bonus
    return Advantages(*exgrpo_advantages(rew.outcome, rew.is_full, delta=cfg.delta if on else 0.0, nu=cfg.nu,
                                         scale=cfg.scale, group_by=cfg.group_by))


class AdvantageStats(NamedTuple):
    nonzero: int                        # questions whose 2G trajectories have a non-zero advantage (a signal)
    bonus_changed: int                  # questions in which the bonus moved an advantage, against the same step
                                        # without it (with pooled z-scores and 0/1 rewards it moves one only where
                                        # both scenarios have a correct answer)


def advantage_stats(rew: Rewards, adv: Advantages, cfg) -> AdvantageStats:
    """How many of the step's questions carry a learning signal, and in how many the bonus changed it: far
    beyond fp32 rounding (1e-5), since z-scores of two values are the same whatever the bonus adds."""
    nonzero = int((adv.adv != 0).any(1).sum())
    if not (cfg.bonus and cfg.delta):
        return AdvantageStats(nonzero, 0)
    plain = advantages(rew, cfg, bonus=False).adv
    changed = ~torch.isclose(adv.adv, plain, rtol=1e-5, atol=1e-5).all(1)
    return AdvantageStats(nonzero, int(changed.sum()))


# ============================================================================= sequences


def sequences(plan: StepPlan, rollouts: list[DialogueRollout], adv: Advantages, tok, cfg) -> list[Sequence]:
    """One sequence per trajectory, exactly the ids the engine saw and sampled (policy loss on the
    sampled ids), then, when aux_coef > 0, one teacher-forced dialogue of Scenario A's probes per
    question (the teacher's answers in context: L_aux)."""
    G2 = 2 * plan.group_size
    seqs = [Sequence(r.ids, r.sampled, [False] * len(r.ids), advantage=float(adv.adv[t.question, j % G2]),
                     rollout_logp=r.logprobs)
            for j, (t, r) in enumerate(zip(plan.trajectories, rollouts, strict=True))]
    if cfg.aux_coef > 0:
        for probes in plan.aux_probes:
            if probes:
                r = render(tok, dialogue(list(probes), None, None, None, answer_train=SFT))
                seqs.append(Sequence(r.ids, r.policy, r.sft))
    return seqs


# ============================================================================= update


class LossSpec(NamedTuple):
    eps_low: float
    eps_high: float
    beta: float
    aux_coef: float
    temperature: float                  # the sampling temperature: old, reference and policy log-probs use it


def loss_spec(cfg) -> LossSpec:
    return LossSpec(cfg.eps_low, cfg.eps_high, cfg.beta, cfg.aux_coef, cfg.temperature)


SFT_LOSS = LossSpec(eps_low=0.2, eps_high=0.2, beta=0.0, aux_coef=1.0, temperature=1.0)   # NLL on sft tokens only


@dataclass
class Batch:
    mbs: list[MicroBatch]
    totals: tuple[int, int]             # global (policy tokens, teacher-forced tokens)
    tokens: int                         # tokens in this rank's micro-batches (padding included, if any)
    padding: int                        # of which padding


def prepare(policy, seqs: list[Sequence], cfg, d: Dist, dev, *, loss: LossSpec, old: bool = False,
            ref_policy=None) -> Batch:
    """Token-budgeted micro-batches (packed rows by default), the same number of passes on every rank
    under FSDP, the rollout policy's log-probs when the batch is reused (`old`), the reference's when the
    loss has a KL term, and the global token counts every micro-batch's loss is normalised by."""
    pad = policy.pad_id
    mbs = micro_batches(seqs, cfg.micro_batch_tokens, pad, dev, packed=cfg.packed, one_row=policy.one_row_packing)
    if d.on:
        mbs = equalize(mbs, int(distributed.all_max([len(mbs)], d, dev)[0]), pad, dev)
    attach_logprobs(policy, mbs, seqs, old=old, ref=loss.beta > 0, ref_policy=ref_policy,
                    temperature=loss.temperature)
    totals = distributed.all_sum([sum(int(mb.mask.sum()) for mb in mbs), sum(int(mb.sft_mask.sum()) for mb in mbs)],
                                 d, dev)
    n_tok = sum(mb.input_ids.numel() for mb in mbs)
    n_pad = n_tok - sum(len(seqs[i].ids) for mb in mbs for i in mb.index)
    return Batch(mbs, (int(totals[0]), int(totals[1])), n_tok, n_pad)


# Metrics that are partial sums on each rank (already normalised by the global token counts).
SUMMED = ("loss", "clip_frac_low", "clip_frac_high", "kl", "ratio", "aux_nll")


class Update(NamedTuple):
    metrics: dict                       # of the last update (partial sums all-reduced over ranks)
    grad_norm: float                    # its gradient norm, before clipping
    skipped: bool                       # it was not finite, so it (and the rest of the batch) was not applied
    applied: int                        # optimizer steps taken on this batch


def optimize(policy, opt, batch: Batch, seqs: list[Sequence], loss: LossSpec, *, updates: int, grad_clip: float,
             d: Dist, dev, mark: Callable[[str], None] | None = None) -> Update:
    """`updates` optimizer steps on the batch, each guarded: a non-finite loss or gradient norm skips the
    step (and the rest of the batch). Gradients are freed after every step, so the next rollout holds
    none. `mark(phase)` is called as the loss ("loss") and the optimizer ("optimizer") phases begin:
    bench/step.py times them."""
    m, gnorm, skipped, applied = {}, 0.0, False, 0
    for _ in range(updates):
        mark and mark("loss")
        opt.zero_grad(set_to_none=True)
        m = batching.loss_and_backward(policy, batch.mbs, seqs, eps_low=loss.eps_low, eps_high=loss.eps_high,
                                       beta=loss.beta, aux_coef=loss.aux_coef, temperature=loss.temperature,
                                       totals=batch.totals, grad_scale=float(d.world), skip_empty=not d.on)
        mark and mark("optimizer")
        gnorm = distributed.clip_grad_norm(policy.parameters(), grad_clip)
        local_loss = m["loss"]
        m.update(zip(SUMMED, distributed.all_sum([m[k] for k in SUMMED], d, dev)))
        skipped = not (math.isfinite(m["loss"]) and math.isfinite(local_loss) and math.isfinite(gnorm))
        if skipped:                                     # never step on a non-finite loss or gradient
            opt.zero_grad(set_to_none=True)
            break
        opt.step()
        opt.zero_grad(set_to_none=True)                 # the next rollout holds no gradients
        applied += 1
    return Update(m, gnorm, skipped, applied)
