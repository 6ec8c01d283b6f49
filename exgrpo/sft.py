"""SFT warm-up (METHOD.md Stage 2): teacher-forced NLL on the teacher's responses, loss on response
tokens only, through the same fused kernel and micro-batching as ExGRPO (policy mask empty, the
auxiliary SFT term with weight 1 is the whole loss).

    exgrpo sft --model runs/student0 --probes runs/probes --out runs/sft                 # EI-SFT
    exgrpo sft --model runs/student0 --probes runs/probes --out runs/sft0 --no-with-probes   # vanilla SFT
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
class SFTConfig:
    model: str = "runs/student0"
    probes: str = "runs/probes"
    out: str = "runs/sft"
    with_probes: bool = True                # the probes' teacher answers (EI-SFT)
    with_original: bool = True              # the original Q -> R_T, A pairs [choice]
    # model
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    backend: str = "auto"
    # optimisation
    epochs: float = 3.0
    batch_size: int = 32                    # sequences per optimizer step
    micro_batch_tokens: int = 16384
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"   # adamw8bit: torchao's 8-bit moments (full FT memory)
    # run
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 3
    resume: bool = False
    progress: bool = True


def sft_sequences(items, tok, cfg: SFTConfig):
    """One single-turn teacher-forced sequence per kept probe and per original question."""
    from exgrpo.batching import Sequence
    from exgrpo.dialogues import SFT, dialogue, render
    seqs = []
    for it in items:
        if cfg.with_original:
            if not it.example.rationale:
                raise ValueError(f"question {it.example.id} has no teacher rationale R_T for the Q -> R_T pair")
            t = render(tok, dialogue([], None, it.example, it.example.rationale, answer_train=None, final_train=SFT))
            seqs.append(Sequence(t.ids, t.policy, t.sft))
        if cfg.with_probes:
            for p in it.probes:
                t = render(tok, dialogue([p], None, None, None, answer_train=SFT))
                seqs.append(Sequence(t.ids, t.policy, t.sft))
    if not seqs:
        raise ValueError("no SFT sequences: enable with_probes or with_original, and check the probe set")
    return seqs


def sft(cfg: SFTConfig) -> Path:
    """Run (or resume) the SFT warm-up; returns the exported model folder. Under torchrun each rank
    takes its share of every batch and the model is sharded with FSDP2."""
    from tqdm import tqdm

    from exgrpo import checkpoint, distributed
    from exgrpo.batching import equalize, loss_and_backward, micro_batches
    from exgrpo.configs import save_config
    from exgrpo.dialogues import load_probe_set
    from exgrpo.models import context_length, init_student
    from exgrpo.optim import make_optimizer
    from exgrpo.policy import Policy
    from exgrpo.runlog import MetricsLog, plot_curves

    # ========================================================================= init
    d, dev = distributed.init(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    items = load_probe_set(cfg.probes)
    mixed = d.on and dev.type == "cuda" and cfg.dtype != "fp32"   # FSDP2: fp32 master, bf16 compute
    model, tok, dev = init_student(cfg.model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   dtype="fp32" if mixed else cfg.dtype, device=str(dev),
                                   gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed)
    seqs = sft_sequences(items, tok, cfg)
    ctx = context_length(model)
    longest = max(len(s.ids) for s in seqs)
    if longest > ctx:
        raise ValueError(f"an SFT sequence has {longest} tokens but the model's context is {ctx}")
    policy = Policy(model)
    if d.on:
        distributed.shard(policy, policy.decoder_layers(), mixed_precision=mixed)
        distributed.init_root(policy, tok.pad_token_id, dev)
    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    opt, sched = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                total_steps=total, schedule=cfg.schedule, optimizer=cfg.optimizer)
    start, bad_streak = 0, 0
    last = checkpoint.latest(run) if cfg.resume else None
    if last is not None:
        state = checkpoint.load(last, policy, opt, sched)
        start, bad_streak = state["step"], state["bad_streak"]
    if d.main:
        save_config(cfg, run / "config.json")
        log = MetricsLog(run, resume_step=start)
    bar = tqdm(range(start, total), initial=start, total=total, desc="sft", disable=not (cfg.progress and d.main))

    done = saved = start                                    # steps finished / checkpointed
    try:
        for step in bar:
            t0 = time.time()
            epoch, j = divmod(step, per_epoch)
            order = list(range(len(seqs)))
            random.Random(cfg.seed * 7919 + epoch).shuffle(order)      # the data position is the step
            batch = [seqs[i] for i in order[j * cfg.batch_size:(j + 1) * cfg.batch_size]][d.rank::d.world]
            torch.manual_seed(cfg.seed * 1_000_003 + step)

            # ===================================================================== loss + step
            mbs = micro_batches(batch, cfg.micro_batch_tokens, tok.pad_token_id, dev)
            if d.on:                                        # FSDP: the same number of passes on every rank
                mbs = equalize(mbs, int(distributed.all_max([len(mbs)], d, dev)[0]), tok.pad_token_id, dev)
            totals = distributed.all_sum([0, sum(int(mb.sft_mask.sum()) for mb in mbs)], d, dev)
            opt.zero_grad(set_to_none=True)
            m = loss_and_backward(policy, mbs, batch, eps_low=0.2, eps_high=0.2, beta=0.0, aux_coef=1.0,
                                  backend=cfg.backend, totals=(0, int(totals[1])), grad_scale=float(d.world),
                                  skip_empty=not d.on)
            gnorm = distributed.clip_grad_norm(policy.parameters(), cfg.grad_clip)
            local_loss = m["loss"]
            m["loss"], m["aux_nll"] = distributed.all_sum([m["loss"], m["aux_nll"]], d, dev)
            skipped = not (math.isfinite(m["loss"]) and math.isfinite(local_loss) and math.isfinite(gnorm))
            if skipped:
                opt.zero_grad(set_to_none=True)
                bad_streak += 1
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)             # checkpoints and evaluation hold no gradients
                bad_streak = 0
            sched.step()
            rec = {"step": step + 1, "epoch": epoch, "nll": m["aux_nll"], "n_tokens": m["n_sft_tokens"],
                   "grad_norm": gnorm, "lr": float(sched.get_last_lr()[0]), "skipped": skipped,
                   "seconds": time.time() - t0}
            if d.main:
                log.write(rec)
            bar.set_postfix(nll=f"{m['aux_nll']:.3f}", epoch=epoch)
            if skipped:
                checkpoint.note_skipped_step(run, step + 1, m["loss"], gnorm, bad_streak, cfg.max_bad_steps, d)
                continue

            done = step + 1
            # ===================================================================== checkpoint
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                checkpoint.save(run, step + 1, policy, opt, sched, {"bad_streak": bad_streak},
                                keep=cfg.keep_checkpoints, d=d)
                saved = step + 1
    except KeyboardInterrupt:                               # nothing finished is lost on Ctrl-C
        checkpoint.save_on_interrupt(run, done, saved, policy, opt, sched, bad_streak, keep=cfg.keep_checkpoints, d=d)
        raise

    export = checkpoint.export(policy, tok, run / "export", d=d, base=cfg.model,
                               lora_cfg=dict(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None)
    if d.main:
        plot_curves(log.read(), ["nll", "grad_norm", "lr"], run / "curves.png", "SFT")
    return export
