"""What the SFT and ExGRPO loops share, so that each loop file reads top to bottom as its own algorithm:
loading the student, the set-up around it (Policy with the kernel settings, FSDP2 sharding, the
reference policy, optimizer, resume, config and metrics in the run folder), the end of a step
(non-finite streak, checkpoint cadence), the Ctrl-C save and the export.

    d, dev = distributed.init(cfg.device)
    model, tok, mixed = load_student(cfg, d, dev)
    policy = make_policy(model, tok, cfg, d, dev, mixed)
    run = start(cfg, d, dev, policy, tok, total_steps=...)
    bar = run.steps(desc)
    with run.saving_on_interrupt():
        for step in bar:
            ...                                   # the loop's own work: one step.optimize() per step
            run.end_step(step, rec, update)
    export = run.export()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from exgrpo import checkpoint, distributed
from exgrpo.distributed import Dist


def load_student(cfg, d: Dist, dev):
    """(model, tokenizer, mixed): the student (LoRA, gradient checkpointing, attention) on this rank's
    device. mixed: FSDP2 on CUDA keeps fp32 masters and computes in bf16."""
    from exgrpo.models import init_student
    mixed = d.on and dev.type == "cuda" and cfg.dtype != "fp32"
    model, tok, dev = init_student(cfg.model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   dtype="fp32" if mixed else cfg.dtype, device=str(dev),
                                   gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed,
                                   attention=cfg.attention)
    return model, tok, mixed


def make_policy(model, tok, cfg, d: Dist, dev, mixed: bool, *, frozen: bool = False):
    """The model as the loops see it (exgrpo.policy.Policy, with the kernel settings), sharded per decoder
    layer under torchrun."""
    from exgrpo.policy import Policy
    policy = Policy(model, pad_id=tok.pad_token_id, backend=cfg.backend, chunk_mb=cfg.chunk_mb)
    if frozen:
        policy.requires_grad_(False)
    if d.on:
        distributed.shard(policy, policy.decoder_layers(), mixed_precision=mixed)
        distributed.init_root(policy, tok.pad_token_id, dev)
    return policy


def make_reference(cfg, model, tok, d: Dist, dev, mixed: bool):
    """The reference policy π_ref, the starting checkpoint: None when there is no KL term or under LoRA
    (there it is the same model with its adapters disabled: no second copy), else a frozen copy sharded
    like the policy (its log-probs are computed once per batch)."""
    from exgrpo.models import load_model
    if cfg.beta <= 0 or cfg.lora:
        return None
    copy = load_model(cfg.model, dtype=next(model.parameters()).dtype, device=dev,
                      attention=model.config._attn_implementation).eval()
    return make_policy(copy, tok, cfg, d, dev, mixed, frozen=True)


@dataclass
class Run:
    cfg: object
    d: Dist
    dev: torch.device
    dir: Path
    tok: object
    policy: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    total: int                          # optimizer steps of the whole run
    start: int                          # the step this invocation starts at (resume)
    bad_streak: int
    log: object | None                  # MetricsLog on rank 0
    done: int = 0                       # steps finished
    saved: int = 0                      # steps checkpointed

    def steps(self, desc: str):
        from tqdm import tqdm
        return tqdm(range(self.start, self.total), initial=self.start, total=self.total, desc=desc,
                    disable=not (self.cfg.progress and self.d.main))

    def end_step(self, step: int, rec: dict, upd) -> None:
        """Log the step; an applied update resets the count of non-finite updates in a row, a skipped one adds
        to it (max_bad_steps in a row stop the run with the last good checkpoint); a step that ends without
        a skip is checkpointed on the cadence. `upd`: the step's exgrpo.step.Update."""
        if upd.applied:
            self.bad_streak = 0
        if upd.skipped:
            self.bad_streak += 1
        if self.d.main:
            self.log.write(rec)
        if upd.skipped:
            checkpoint.note_skipped_step(self.dir, step + 1, upd.metrics["loss"], upd.grad_norm, self.bad_streak,
                                         self.cfg.max_bad_steps, self.d)
            return
        self.done = step + 1
        if self.done % self.cfg.save_every == 0 or self.done == self.total:
            checkpoint.save(self.dir, self.done, self.policy, self.opt, self.sched, {"bad_streak": self.bad_streak},
                            keep=self.cfg.keep_checkpoints, d=self.d)
            self.saved = self.done

    @contextlib.contextmanager
    def saving_on_interrupt(self):
        """Ctrl-C: nothing finished is lost (the steps since the last checkpoint are saved)."""
        try:
            yield
        except KeyboardInterrupt:
            checkpoint.save_on_interrupt(self.dir, self.done, self.saved, self.policy, self.opt, self.sched,
                                         self.bad_streak, keep=self.cfg.keep_checkpoints, d=self.d)
            raise

    def export(self) -> Path:
        cfg = self.cfg
        return checkpoint.export(self.policy, self.tok, self.dir / "export", d=self.d, base=cfg.model,
                                 lora_cfg=dict(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None)

    def plot(self, keys: list[str], title: str) -> None:
        from exgrpo.runlog import plot_curves
        if self.d.main:
            plot_curves(self.log.read(), keys, self.dir / "curves.png", title)


def start(cfg, d: Dist, dev, policy, tok, *, total_steps: int) -> Run:
    """The optimizer and schedule over `total_steps`, the resume point (cfg.resume: the run folder's
    latest checkpoint), the saved config and the metrics log (cut back to the resume point)."""
    from exgrpo.configs import save_config
    from exgrpo.optim import make_optimizer
    from exgrpo.runlog import MetricsLog
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    opt, sched = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                total_steps=total_steps, schedule=cfg.schedule, optimizer=cfg.optimizer)
    first, bad_streak = 0, 0
    last = checkpoint.latest(run) if cfg.resume else None
    if last is not None:
        state = checkpoint.load(last, policy, opt, sched)
        first, bad_streak = state["step"], state["bad_streak"]
    elif cfg.resume and d.main:
        print(f"no checkpoint in {run}: starting from step 0")
    log = None
    if d.main:
        save_config(cfg, run / "config.json")
        log = MetricsLog(run, resume_step=first)
    return Run(cfg, d, dev, run, tok, policy, opt, sched, total_steps, first, bad_streak, log, done=first, saved=first)
