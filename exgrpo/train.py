"""ExGRPO: GRPO on multi-turn probe dialogues with the Dialogue Structure Utility bonus (docs/method.md,
Stage 3). One file, top to bottom: config, init, then per step plan -> rollout -> reward -> advantage ->
sequences -> update -> checkpoint, each one call into the step unit (exgrpo/step.py) that
bench/step.py times as well.

    exgrpo train --model runs/sft/export --probes runs/probes --out runs/exgrpo
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exgrpo.settings import (
    FitSettings,
    KernelSettings,
    ModelSettings,
    OptimSettings,
    Paths,
    RunSettings,
    require_positive,
)

# ============================================================================= config


@dataclass
class ExGRPOSettings:
    # rollouts
    steps: int = 100
    questions_per_step: int = 8
    group_size: int = 8                     # G trajectories per scenario per question
    k_probes: int = 5                       # k: Scenario A's probes, sampled without replacement
    partial_probes: int | None = None       # k' of Scenario B (its first k' < k probes); none: uniform in 1..k-1
    temperature: float = 1.0                # sampling temperature; the old, reference and policy log-probs use it too
    max_new_tokens: int = 96                # per turn
    rollout_batch_size: int = 64
    engine: Literal["hf", "vllm"] = "hf"    # vllm: colocated engine, weights synced after each update
    vllm_memory: float = 0.35               # the vLLM engine's share of GPU memory
    # reward / advantage
    bonus: bool = True                      # the DSU bonus (off: RL on R_base only)
    delta: float = 0.5                      # δ, added to every correct Scenario A trajectory when the bonus fires
    nu: float = 1.0                         # ν: the bonus fires when P_full > ν·P_partial
    group_by: Literal["question", "scenario"] = "question"   # the z-score group: both scenarios pooled, or each
    scale: Literal["group", "batch", "none"] = "group"
    # loss
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04                      # KL(π_θ ‖ π_ref) weight, k3 estimator
    aux_coef: float = 0.1                   # λ of the auxiliary teacher-forced SFT loss (0: off)
    updates_per_batch: int = 1


@dataclass
class TrainConfig(RunSettings, ExGRPOSettings, OptimSettings, FitSettings, KernelSettings, ModelSettings, Paths):
    model: str = "runs/sft/export"          # the SFT checkpoint (also the reference policy)
    out: str = "runs/exgrpo"


def train(cfg: TrainConfig, *, engine=None, reward_fn=None) -> Path:
    """Run (or resume) ExGRPO; returns the exported model folder. `engine` overrides the rollout engine
    (anything exgrpo.rollout.as_engine accepts, or a function (model, tokenizer) -> engine, for an engine
    around the trained model), `reward_fn(example, final_reply) -> R_base` the task's
    answer check. Under torchrun each rank rolls out its share of the step's questions (a question's
    whole group stays on one rank) and the model is sharded with FSDP2."""
    from exgrpo import distributed, loop
    from exgrpo import step as S
    from exgrpo.dialogues import load_probe_set
    from exgrpo.models import context_length
    from exgrpo.rollout import HFEngine, VLLMEngine, as_engine

    # ========================================================================= init
    _check(cfg)
    items = load_probe_set(cfg.probes)                      # fails on an empty probe set, before any compute
    d, dev = distributed.init(cfg.device)
    loop.claim(cfg, d)                                     # the run folder is this run's, before any load
    cfg = loop.auto_fit(cfg, d, "train")                   # --auto-fit: planned on fake tensors, kept in config.json
    if cfg.questions_per_step % d.world:
        raise ValueError(f"questions_per_step={cfg.questions_per_step} must be a multiple of the "
                         f"{d.world} processes (each question's group stays on one rank)")
    model, tok, mixed = loop.load_student(cfg, d, dev)
    ctx = context_length(model)
    check_lengths(items, tok, cfg, ctx)
    policy = loop.make_policy(model, tok, cfg, d, dev, mixed)
    ref = loop.make_reference(cfg, model, tok, d, dev, mixed)      # π_ref: the SFT checkpoint
    run = loop.start(cfg, d, dev, policy, tok, total_steps=cfg.steps)
    made = engine is None and cfg.engine == "vllm"       # an engine made here is closed here; a caller's is theirs
    if made:
        if d.world > 1:
            raise ValueError(f"--engine vllm runs one colocated engine in one process; this run has {d.world} "
                             "processes (use --engine hf under torchrun)")
        engine = VLLMEngine(cfg.model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            gpu_memory_utilization=cfg.vllm_memory, seed=cfg.seed, max_model_len=ctx,
                            dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    engine = as_engine(engine, tok, model) if engine is not None else HFEngine(
        model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        batch_size=cfg.rollout_batch_size, max_context=ctx)
    colocated = isinstance(engine, VLLMEngine)
    loss = S.loss_spec(cfg)
    G = cfg.group_size

    bar = run.steps("exgrpo")
    with run.saving_on_interrupt(), contextlib.closing(engine) if made else contextlib.nullcontext():
        for step in bar:
            t0 = time.time()
            seed = S.begin_step(cfg.seed, step, d)
            plan = S.plan_step(items, step, seed, cfg, d)

            # ===================================================================== rollout
            policy.eval()
            if colocated:                                   # wake the engine, then push the latest update into it
                engine.wake()
                engine.sync_weights(model)
            with distributed.gathered(policy, d):
                rollouts = S.rollout(engine, plan)
            if colocated:                                   # give the trainer the engine's memory back
                engine.sleep()
            policy.train()

            # ===================================================================== reward + advantage
            rew = S.reward(plan, rollouts, reward_fn)
            adv = S.advantages(rew, cfg)
            stats = S.advantage_stats(rew, adv, cfg)

            # ===================================================================== loss + step
            seqs = S.sequences(plan, rollouts, adv, tok, cfg)
            # ratios need the rollout policy's log-probs only when the batch is reused
            batch = S.prepare(policy, seqs, cfg, d, dev, loss=loss, old=cfg.updates_per_batch > 1, ref_policy=ref)
            upd = S.optimize(policy, run.opt, batch, seqs, loss, updates=cfg.updates_per_batch,
                             grad_clip=cfg.grad_clip, d=d, dev=dev)
            m = upd.metrics
            run.sched.step()

            # ===================================================================== log + checkpoint
            o = rew.outcome
            n_q, s_tot, s_out, s_full, s_part, n_fired, n_signal, n_bonus = distributed.all_sum(
                [len(plan.questions), float(adv.total.sum()), float(o.sum()), float(o[:, :G].sum()),
                 float(o[:, G:].sum()), float(adv.fired.sum()), stats.nonzero, stats.bonus_changed], d, dev)
            rec = {"step": step + 1, "reward": s_tot / (n_q * 2 * G), "acc": s_out / (n_q * 2 * G),
                   "acc_full": s_full / (n_q * G), "acc_partial": s_part / (n_q * G),
                   "dsu_fire_rate": n_fired / n_q, "adv_nonzero_frac": n_signal / n_q,
                   "bonus_changed_frac": n_bonus / n_q, **m, "grad_norm": upd.grad_norm,
                   "lr": float(run.sched.get_last_lr()[0]), "padding_frac": batch.padding / max(1, batch.tokens),
                   "skipped": upd.skipped,
                   "seconds": time.time() - t0}
            bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['acc']:.2f}", kl=f"{m['kl']:.3f}",
                            clip=f"{m['clip_frac_low'] + m['clip_frac_high']:.2f}", dsu=f"{rec['dsu_fire_rate']:.2f}")
            run.end_step(step, rec, upd)

    export = run.export()
    run.plot(["reward", "acc", "acc_full", "acc_partial", "dsu_fire_rate", "adv_nonzero_frac", "bonus_changed_frac",
              "kl", "clip_frac_low", "clip_frac_high", "aux_nll", "loss", "grad_norm"], "ExGRPO")
    run.close()
    return export


def _check(cfg: TrainConfig) -> None:
    """Settings that cannot work, named before anything loads."""
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (ExGRPO samples G trajectories per scenario), got {cfg.temperature}")
    require_positive(cfg, ("steps", "questions_per_step", "group_size", "updates_per_batch", "micro_batch_tokens",
                           "save_every", "k_probes", "max_new_tokens", "keep_checkpoints"))
    if cfg.partial_probes is not None and cfg.partial_probes < 0:
        raise ValueError(f"partial_probes must be >= 0 or none, got {cfg.partial_probes}")


def check_lengths(items, tok, cfg: TrainConfig, ctx: int) -> None:
    """A dialogue that cannot fit the context is an error now, not after hours of rollouts."""
    from exgrpo.dialogues import dialogue
    worst = 0
    for it in items:
        probes = sorted(it.probes, key=lambda p: len(p.question) + len(p.response), reverse=True)[: cfg.k_probes]
        msgs = dialogue(probes, None, it.example, "", answer_train=None)
        text = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs], tokenize=False)
        n = len(tok(text, add_special_tokens=False).input_ids)
        worst = max(worst, n + (len(probes) + 1) * cfg.max_new_tokens)
    if worst > ctx:
        raise ValueError(f"the longest dialogue needs up to {worst} tokens (k_probes={cfg.k_probes}, "
                         f"max_new_tokens={cfg.max_new_tokens} per turn) but the model's context is {ctx}")
