"""ExGRPO: GRPO on multi-turn probe dialogues with the Dialogue Structure Utility bonus (METHOD.md
Stage 3). One file, top to bottom: config, init, then per step rollout -> reward -> advantage ->
loss -> step -> checkpoint.

    exgrpo train --model runs/sft/export --probes runs/probes --out runs/exgrpo
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# ============================================================================= config


@dataclass
class TrainConfig:
    model: str = "runs/sft/export"          # the SFT checkpoint (also the reference policy)
    probes: str = "runs/probes"             # probe_set.jsonl or its folder
    out: str = "runs/exgrpo"
    # model
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    backend: str = "auto"                   # kernel backend
    # rollouts
    steps: int = 100
    questions_per_step: int = 8
    group_size: int = 8                     # G trajectories per scenario per question
    k_probes: int = 5
    temperature: float = 1.0
    max_new_tokens: int = 96                # per turn
    rollout_batch_size: int = 64
    engine: Literal["hf", "vllm"] = "hf"    # vllm: colocated engine, weights synced after each update (GPU)
    vllm_memory: float = 0.35               # the vLLM engine's share of GPU memory
    # reward / advantage
    bonus: bool = True                      # the DSU bonus (off: RL on R_base only)
    delta: float = 0.5
    nu: float = 1.0
    group_by: Literal["question", "scenario"] = "question"
    scale: Literal["group", "batch", "none"] = "group"
    # loss
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04
    aux_coef: float = 0.1                   # λ of the auxiliary teacher-forced SFT loss (0: off)
    updates_per_batch: int = 1
    micro_batch_tokens: int = 16384
    # optimiser
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"   # adamw8bit: torchao's 8-bit moments (full FT memory)
    # run
    seed: int = 0
    save_every: int = 25
    keep_checkpoints: int = 2
    max_bad_steps: int = 3                  # stop after this many non-finite steps in a row
    resume: bool = False
    progress: bool = True


def train(cfg: TrainConfig, *, engine=None) -> Path:
    """Run (or resume) ExGRPO; returns the exported model folder. `engine` overrides the rollout engine.
    Under torchrun each rank rolls out its share of the step's questions (a question's whole group stays
    on one rank) and the model is sharded with FSDP2."""
    from tqdm import tqdm

    from exgrpo import checkpoint, distributed
    from exgrpo.batching import Sequence, attach_logprobs, equalize, loss_and_backward, micro_batches
    from exgrpo.configs import save_config
    from exgrpo.dialogues import (
        POLICY,
        SFT,
        dialogue,
        load_probe_set,
        partial_count,
        question_message,
        render,
        sample_probes,
    )
    from exgrpo.kernels import exgrpo_advantages
    from exgrpo.models import context_length, init_student, load_model
    from exgrpo.optim import make_optimizer
    from exgrpo.policy import Policy
    from exgrpo.rollout import HFEngine, VLLMEngine, run_dialogues
    from exgrpo.runlog import MetricsLog, plot_curves
    from exgrpo.tasks import get_task

    # ========================================================================= init
    d, dev = distributed.init(cfg.device)
    if cfg.questions_per_step % d.world:
        raise ValueError(f"questions_per_step={cfg.questions_per_step} must be a multiple of the "
                         f"{d.world} processes (each question's group stays on one rank)")
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    items = load_probe_set(cfg.probes)                      # fails on an empty probe set, before any compute
    mixed = d.on and dev.type == "cuda" and cfg.dtype != "fp32"   # FSDP2: fp32 master, bf16 compute
    model, tok, dev = init_student(cfg.model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   dtype="fp32" if mixed else cfg.dtype, device=str(dev),
                                   gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed)
    ctx = context_length(model)
    _check_lengths(items, tok, cfg, ctx)
    policy = Policy(model)
    if d.on:
        distributed.shard(policy, policy.decoder_layers(), mixed_precision=mixed)
        distributed.init_root(policy, tok.pad_token_id, dev)
    # The reference policy is the SFT checkpoint: LoRA -> the same model with adapters off; full
    # fine-tuning -> a frozen copy, sharded like the policy (its log-probs are computed once per batch).
    ref = None
    if cfg.beta > 0 and not cfg.lora:
        ref = Policy(load_model(cfg.model, dtype=next(model.parameters()).dtype, device=dev).eval())
        ref.requires_grad_(False)
        if d.on:
            distributed.shard(ref, ref.decoder_layers(), mixed_precision=mixed)
            distributed.init_root(ref, tok.pad_token_id, dev)
    opt, sched = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                total_steps=cfg.steps, schedule=cfg.schedule, optimizer=cfg.optimizer)
    if engine is None and cfg.engine == "vllm":
        engine = VLLMEngine(cfg.model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            gpu_memory_utilization=cfg.vllm_memory, seed=cfg.seed + d.rank)
    engine = engine or HFEngine(model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                batch_size=cfg.rollout_batch_size, max_context=ctx)
    colocated = isinstance(engine, VLLMEngine)
    start, bad_streak = 0, 0
    last = checkpoint.latest(run) if cfg.resume else None
    if last is not None:
        state = checkpoint.load(last, policy, opt, sched)
        start, bad_streak = state["step"], state["bad_streak"]
    elif cfg.resume and d.main:
        print(f"no checkpoint in {run}: starting from step 0")
    if d.main:
        save_config(cfg, run / "config.json")
        log = MetricsLog(run, resume_step=start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="exgrpo",
               disable=not (cfg.progress and d.main))
    per_rank = cfg.questions_per_step // d.world
    G2 = 2 * cfg.group_size

    done = saved = start                                    # steps finished / checkpointed
    try:
        for step in bar:
            t0 = time.time()
            seed = cfg.seed * 1_000_003 + step              # per-step seeding: a resumed run replays exactly
            torch.manual_seed(seed + 7 * d.rank)
            qids = range(d.rank * per_rank, (d.rank + 1) * per_rank)    # this rank's questions of the step
            step_questions = _questions(items, step, cfg.questions_per_step, cfg.seed)
            batch = [step_questions[i] for i in qids]

            # ===================================================================== rollout
            turns, meta = [], []                            # one entry per trajectory
            aux_probes = []
            for q, (qid, item) in enumerate(zip(qids, batch)):
                rng = random.Random(seed * 4099 + qid)      # per question: the same on any number of ranks
                full = sample_probes(item, cfg.k_probes, rng)
                k_part = partial_count(len(full), rng)
                qmsg = question_message(item.example)
                for is_full, probes in ((True, full), (False, full[:k_part])):
                    for _ in range(cfg.group_size):
                        turns.append([{"role": "user", "content": p.question} for p in probes] + [qmsg])
                        meta.append((q, is_full, probes))
                aux_probes.append(full)
            policy.eval()
            if colocated:                                   # wake the engine, then push the latest update into it
                engine.wake()
                engine.sync_weights(model)
            with distributed.gathered(policy, d):
                answers = run_dialogues(engine, turns)
            if colocated:                                   # give the trainer the engine's memory back
                engine.sleep()
            policy.train()

            # ===================================================================== reward
            outcome = torch.zeros(len(batch), G2)           # [Q_rank, 2G]: A's G, then B's G
            for j, (q, _, _) in enumerate(meta):
                ex = batch[q].example
                task = get_task(ex.task)
                outcome[q, j % G2] = float(task.is_correct(task.extract(answers[j][-1], ex), ex.answer))
            is_full = torch.zeros(len(batch), G2, dtype=torch.bool)
            is_full[:, : cfg.group_size] = True

            # ===================================================================== advantage
            adv, total, fired = exgrpo_advantages(outcome, is_full, delta=cfg.delta if cfg.bonus else 0.0,
                                                  nu=cfg.nu, scale=cfg.scale, group_by=cfg.group_by)
            seqs = []
            for j, (q, _, probes) in enumerate(meta):
                msgs = dialogue(probes, answers[j][:-1], batch[q].example, answers[j][-1], answer_train=POLICY)
                t = render(tok, msgs)
                seqs.append(Sequence(t.ids, t.policy, t.sft, advantage=float(adv[q, j % G2])))
            if cfg.aux_coef > 0:                            # teacher-forced probe answers in their context
                for probes in aux_probes:
                    if probes:
                        t = render(tok, dialogue(probes, None, None, None, answer_train=SFT))
                        seqs.append(Sequence(t.ids, t.policy, t.sft))
            mbs = micro_batches(seqs, cfg.micro_batch_tokens, tok.pad_token_id, dev)
            if d.on:                                        # FSDP: the same number of passes on every rank
                mbs = equalize(mbs, int(distributed.all_max([len(mbs)], d, dev)[0]), tok.pad_token_id, dev)
            # ratios need the rollout policy's log-probs only when the batch is reused
            attach_logprobs(policy, mbs, seqs, old=cfg.updates_per_batch > 1, ref=cfg.beta > 0, ref_policy=ref,
                            backend=cfg.backend)
            totals = distributed.all_sum([sum(int(mb.mask.sum()) for mb in mbs),
                                          sum(int(mb.sft_mask.sum()) for mb in mbs)], d, dev)

            # ===================================================================== loss + step
            for _ in range(cfg.updates_per_batch):
                opt.zero_grad(set_to_none=True)
                m = loss_and_backward(policy, mbs, seqs, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                                      aux_coef=cfg.aux_coef, backend=cfg.backend, totals=(int(totals[0]),
                                      int(totals[1])), grad_scale=float(d.world), skip_empty=not d.on)
                gnorm = distributed.clip_grad_norm(policy.parameters(), cfg.grad_clip)
                local_loss = m["loss"]
                m.update(zip(SUMMED, distributed.all_sum([m[k] for k in SUMMED], d, dev)))
                skipped = not (math.isfinite(m["loss"]) and math.isfinite(local_loss) and math.isfinite(gnorm))
                if skipped:                                 # never step on a non-finite loss or gradient
                    opt.zero_grad(set_to_none=True)
                    bad_streak += 1
                    break
                opt.step()
                opt.zero_grad(set_to_none=True)             # the next rollout holds no gradients
                bad_streak = 0
            sched.step()
            n_q, s_tot, s_out, s_full, s_part, n_fired = distributed.all_sum(
                [len(batch), float(total.sum()), float(outcome.sum()), float(outcome[:, : cfg.group_size].sum()),
                 float(outcome[:, cfg.group_size:].sum()), float(fired.sum())], d, dev)
            rec = {"step": step + 1, "reward": s_tot / (n_q * G2), "acc": s_out / (n_q * G2),
                   "acc_full": s_full / (n_q * cfg.group_size), "acc_partial": s_part / (n_q * cfg.group_size),
                   "dsu_fire_rate": n_fired / n_q, **m, "grad_norm": gnorm, "lr": float(sched.get_last_lr()[0]),
                   "skipped": skipped, "seconds": time.time() - t0}
            if d.main:
                log.write(rec)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['acc']:.2f}", kl=f"{m['kl']:.3f}",
                            clip=f"{m['clip_frac_low'] + m['clip_frac_high']:.2f}", dsu=f"{rec['dsu_fire_rate']:.2f}")
            if skipped:
                checkpoint.note_skipped_step(run, step + 1, m["loss"], gnorm, bad_streak, cfg.max_bad_steps, d)
                continue

            done = step + 1
            # ===================================================================== checkpoint
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                checkpoint.save(run, step + 1, policy, opt, sched, {"bad_streak": bad_streak},
                                keep=cfg.keep_checkpoints, d=d)
                saved = step + 1
    except KeyboardInterrupt:                               # nothing finished is lost on Ctrl-C
        checkpoint.save_on_interrupt(run, done, saved, policy, opt, sched, bad_streak, keep=cfg.keep_checkpoints, d=d)
        raise

    export = checkpoint.export(policy, tok, run / "export", d=d, base=cfg.model,
                               lora_cfg=dict(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None)
    if d.main:
        plot_curves(log.read(), ["reward", "acc", "acc_full", "acc_partial", "dsu_fire_rate", "kl", "clip_frac_low",
                                 "clip_frac_high", "aux_nll", "loss", "grad_norm"], run / "curves.png", "ExGRPO")
    return export


# Metrics that are partial sums on each rank (already normalised by the global token counts).
SUMMED = ("loss", "clip_frac_low", "clip_frac_high", "kl", "ratio", "aux_nll")


def _questions(items, step: int, n: int, seed: int):
    """The step's questions: epochs over a seeded permutation, so the data position is the step."""
    out, perms = [], {}
    for i in range(step * n, step * n + n):
        epoch, j = divmod(i, len(items))
        if epoch not in perms:
            perms[epoch] = list(range(len(items)))
            random.Random(seed * 7919 + epoch).shuffle(perms[epoch])
        out.append(items[perms[epoch][j]])
    return out


def _check_lengths(items, tok, cfg: TrainConfig, ctx: int) -> None:
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
