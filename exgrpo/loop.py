"""What the SFT and ExGRPO loops share, so that each loop file reads top to bottom as its own algorithm:
loading the student, the set-up around it (Policy with the kernel settings, FSDP2 sharding, the
reference policy, optimizer, resume, config and metrics in the run folder), the end of a step
(non-finite streak, checkpoint cadence), the Ctrl-C save and the export.

    d, dev = distributed.init(cfg.device)
    claim(cfg, d)                                 # the run folder: writable, locked, no earlier run unless resumed
    model, tok, mixed = load_student(cfg, d, dev)
    policy = make_policy(model, tok, cfg, d, dev, mixed)
    run = start(cfg, d, dev, policy, tok, total_steps=...)
    bar = run.steps(desc)
    with run.saving_on_interrupt():
        for step in bar:
            ...                                   # the loop's own work: one step.optimize() per step
            run.end_step(step, rec, update)
    export = run.export()
    run.close()
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from exgrpo import checkpoint, distributed
from exgrpo.distributed import Dist
from exgrpo.runlock import claim_folder, release

# ----------------------------------------------------------------------------- the run folder

_RUN_OUTPUTS = ("ckpt-*", ".tmp-ckpt-*", "latest", ".latest.tmp", "metrics.jsonl", "export", "export.tmp",
                "curves.png")


def _previous_run(run: Path) -> list[str]:
    """What in `run` says a run was here: checkpoints, logged steps, an export."""
    found = []
    if n := len(checkpoint.checkpoints(run)):
        found.append(f"{n} checkpoint(s)")
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and (n := sum(1 for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip())):
        found.append(f"{n} logged step(s)")
    if (run / "export").exists():
        found.append("an export")
    return found


def claim(cfg, d: Dist) -> Path:
    """Make `cfg.out` this run's before anything loads: a folder (not a file), writable, locked for the run's
    life (flock: released by the OS on any exit, so a crashed run leaves no stale lock; a second run into it
    fails at once naming the holder), and, without --resume, free of an earlier run unless --overwrite says
    to delete it. Rank 0 does the file work and every rank gets its verdict (no rank waits on one that failed)."""
    run = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start it over")
    why = None
    if d.main:                                  # the file work on rank 0; its verdict reaches every rank
        try:
            _claim_on_main(run, cfg)
        except ValueError as e:
            why = str(e)
    why = distributed.from_main(why, d)
    if why is not None:
        raise ValueError(why)
    return run


def auto_fit(cfg, d: Dist, stage: str):
    """`--auto-fit`: the config with the micro-batch tokens, gradient checkpointing, LM-head chunk budget (and for
    train the rollout batch) that `exgrpo plan` finds to fit this device (exgrpo.plan.fit_run_config), before
    anything loads; the run's config.json then records them. Unchanged without --auto-fit."""
    if not cfg.auto_fit:
        return cfg
    if d.on:
        raise ValueError("--auto-fit plans one device's step; it does not run under torchrun")
    from exgrpo.plan import fit_run_config
    return fit_run_config(cfg, stage)


def _claim_on_main(run: Path, cfg) -> None:
    claim_folder(run)
    found = _previous_run(run)
    if cfg.resume and found and not checkpoint.checkpoints(run):
        raise ValueError(f"--resume: {run} holds {', '.join(found)} but no checkpoint to continue from; "
                         "start it over with --overwrite")
    if found and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"{run} already holds a run ({', '.join(found)}); continue it with --resume, or "
                             "pass --overwrite to start over (its checkpoints, metrics and export are deleted)")
        for pattern in _RUN_OUTPUTS:
            for p in run.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        print(f"--overwrite: deleted the earlier run in {run} ({', '.join(found)})")


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
    dirty: bool = False                 # an optimizer update ran since the last step ended
    stop: str | None = None             # a stop signal arrived: stop when this step ends

    def steps(self, desc: str):
        from tqdm import tqdm
        return tqdm(range(self.start, self.total), initial=self.start, total=self.total, desc=desc,
                    disable=not (self.cfg.progress and self.d.main))

    def end_step(self, step: int, rec: dict, upd) -> None:
        """Log the step; an applied update resets the count of non-finite updates in a row, a skipped one adds
        to it (max_bad_steps in a row stop the run with the last good checkpoint); a step that ends without
        a skip is checkpointed on the cadence. `upd`: the step's exgrpo.step.Update. A stop signal that
        arrived during the step (see saving_on_interrupt) takes effect here, where the state is whole."""
        self._end_step(step, rec, upd)
        self.dirty = False
        if self.stop is not None:
            raise Terminated(self.stop) if self.stop == "SIGTERM" else KeyboardInterrupt(self.stop)

    def _end_step(self, step: int, rec: dict, upd) -> None:
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
        """Ctrl-C or SIGTERM (what schedulers send): nothing finished is lost. The first signal lets the step
        in progress finish (a checkpoint taken inside an optimizer update would hold weights between two
        steps); at its end the finished steps are saved and the interrupt goes on. A second signal stops at
        once, saving only if no update has run since the last step ended."""
        try:
            with _stop_at_step_end(self):
                yield
        except KeyboardInterrupt:
            if self.dirty:
                if self.d.main:
                    print(f"interrupted inside an optimizer update: not saved (the weights are between two steps); "
                          f"the newest checkpoint is step {self.saved}", file=sys.stderr)
            else:
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

    def close(self) -> None:
        """The run is over: its folder's lock is given back."""
        release(self.dir)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised at the end of the step so that the run saves like Ctrl-C."""


@contextlib.contextmanager
def _stop_at_step_end(run: Run):
    """SIGINT and SIGTERM set `run.stop` (end_step raises it); a second one raises at once. Single process on
    the main thread only: under torchrun each rank would stop at its own step boundary and leave the others
    in a collective, so there the signals keep their usual effect."""
    if run.d.on or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if run.stop is not None:
            raise Terminated(name) if signum == signal.SIGTERM else KeyboardInterrupt(name)
        run.stop = name
        print(f"{name}: stopping at the end of this step (send it again to stop now)", file=sys.stderr, flush=True)

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


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
    if cfg.resume:
        state = checkpoint.resume(run, policy, opt, sched, say=print if d.main else (lambda _m: None))
        if state is not None:
            first, bad_streak = state["step"], state["bad_streak"]
        elif d.main:
            print(f"resume: {run} holds no checkpoint yet: starting at step 0")
    log = None
    if d.main:
        save_config(cfg, run / "config.json")
        log = MetricsLog(run, resume_step=first)
    r = Run(cfg, d, dev, run, tok, policy, opt, sched, total_steps, first, bad_streak, log, done=first, saved=first)
    opt.register_step_pre_hook(lambda *_: setattr(r, "dirty", True))
    return r
