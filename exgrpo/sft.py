"""SFT warm-up (docs/method.md, Stage 2): teacher-forced NLL on the teacher's responses, loss on response
tokens only, through the same micro-batching, fused kernel and guarded update as ExGRPO (exgrpo/step.py:
prepare + optimize with SFT_LOSS, i.e. no policy tokens and the auxiliary SFT term with weight 1 as the
whole loss).

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
class SFTSettings:
    with_probes: bool = True                # the probes' teacher answers (EI-SFT)
    with_original: bool = True              # the original Q -> R_T, A pairs [choice]
    epochs: float = 3.0
    batch_size: int = 32                    # sequences per optimizer step
    # > 0: each original pair is a chat, after 0..chat_probes of its probes as earlier turns with the teacher's
    # answers, every reply trained (an instruct stage: the student learns to answer Q with a history)
    chat_probes: int = 0


@dataclass
class SFTConfig(RunSettings, SFTSettings, OptimSettings, FitSettings, KernelSettings, ModelSettings, Paths):
    out: str = "runs/sft"
    lr: float = 1e-4
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    save_every: int = 100


def sft_sequences(items, tok, cfg: SFTConfig):
    """One single-turn teacher-forced sequence per kept probe (its probe set "prompt" -> the teacher's answer) and
    per original question (Q -> R_T, the R_T the probe set settled on: `ProbeItem.rationale`, not the dataset's
    field). With `chat_probes` > 0 the original pair comes after a seeded 0..chat_probes of its probes, their
    teacher answers trained too."""
    from exgrpo.batching import Sequence
    from exgrpo.dialogues import SFT, dialogue, render
    seqs = []
    for it in items:
        if cfg.with_original:
            if not it.rationale:
                raise ValueError(f"question {it.example.id} ({it.example.task}) has no R_T in the probe set for the "
                                 "Q -> R_T pair: re-run `exgrpo probe` to settle it, or pass --no-with-original")
            before = []
            if cfg.chat_probes > 0:
                rng = random.Random(f"exgrpo-chat:{cfg.seed}:{it.example.id}")
                before = rng.sample(list(it.probes), rng.randint(0, min(cfg.chat_probes, len(it.probes))))
            t = render(tok, dialogue(before, None, it.example, it.rationale, answer_train=SFT, final_train=SFT))
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
    from exgrpo import distributed, loop
    from exgrpo import step as S
    from exgrpo.dialogues import load_probe_set
    from exgrpo.models import context_length

    # ========================================================================= init
    require_positive(cfg, ("batch_size", "micro_batch_tokens", "save_every", "keep_checkpoints"))
    if cfg.chat_probes < 0:
        raise ValueError(f"chat_probes must be >= 0, got {cfg.chat_probes}")
    if not cfg.epochs > 0:
        raise ValueError(f"epochs must be > 0, got {cfg.epochs}")
    items = load_probe_set(cfg.probes)
    d, dev = distributed.init(cfg.device)
    loop.claim(cfg, d)                                     # the run folder is this run's, before any load
    cfg = loop.auto_fit(cfg, d, "sft")                     # --auto-fit: planned on fake tensors, kept in config.json
    model, tok, mixed = loop.load_student(cfg, d, dev)
    seqs = sft_sequences(items, tok, cfg)
    ctx = context_length(model)
    longest = max(len(s.ids) for s in seqs)
    if longest > ctx:
        raise ValueError(f"an SFT sequence has {longest} tokens but the model's context is {ctx}")
    policy = loop.make_policy(model, tok, cfg, d, dev, mixed)
    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    run = loop.start(cfg, d, dev, policy, tok, total_steps=max(1, math.ceil(cfg.epochs * per_epoch)))

    bar = run.steps("sft")
    with run.saving_on_interrupt():
        for step in bar:
            t0 = time.time()
            epoch, j = divmod(step, per_epoch)
            order = list(range(len(seqs)))
            random.Random(cfg.seed * 7919 + epoch).shuffle(order)      # the data position is the step
            batch = [seqs[i] for i in order[j * cfg.batch_size:(j + 1) * cfg.batch_size]][d.rank::d.world]
            S.begin_step(cfg.seed, step, distributed.SINGLE)

            # ===================================================================== loss + step
            mb = S.prepare(policy, batch, cfg, d, dev, loss=S.SFT_LOSS)
            upd = S.optimize(policy, run.opt, mb, batch, S.SFT_LOSS, updates=1, grad_clip=cfg.grad_clip, d=d, dev=dev)
            m = upd.metrics
            run.sched.step()

            # ===================================================================== log + checkpoint
            rec = {"step": step + 1, "epoch": epoch, "nll": m["aux_nll"], "n_tokens": m["n_sft_tokens"],
                   "grad_norm": upd.grad_norm, "lr": float(run.sched.get_last_lr()[0]), "skipped": upd.skipped,
                   "seconds": time.time() - t0}
            bar.set_postfix(nll=f"{m['aux_nll']:.3f}", epoch=epoch)
            run.end_step(step, rec, upd)

    export = run.export()
    run.plot(["nll", "grad_norm", "lr"], "SFT")
    run.close()
    return export
