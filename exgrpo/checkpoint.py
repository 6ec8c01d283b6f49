"""Checkpoints that survive a crash and move between world sizes.

Layout of `run/ckpt-NNNNNN/`:
    dcp/          model + optimizer, torch.distributed.checkpoint (sharded under FSDP2; any number of
                  processes, or none, can load it: DCP reshards on load)
    model/        single-process runs only: the model (or LoRA adapter) as safetensors, save_pretrained
    trainer.pt    scheduler and RNG states
    state.json    step, data position and loop counters
    manifest.json every other file's size, written last

Writing: everything goes into `.tmp-ckpt-NNNNNN/`, every file is fsynced, the folder is renamed into
place, then the `latest` pointer is replaced atomically. A kill at any instant leaves either the
previous checkpoint or the new one, never a half-written one that `latest` points to.

Reading (`resume`): `latest` is a hint, not the truth. The checkpoint folders are scanned newest step first;
each is verified against its manifest (a file missing or of another size: damaged) and loaded; a damaged
or unloadable one is reported and the next older one tried. Nothing loadable in a folder that holds
checkpoints is an error, never a silent start from step 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from exgrpo.distributed import SINGLE, Dist, barrier
from exgrpo.models import is_lora


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in sorted({q.parent for q in path.rglob("*")} | {path}):
        _fsync_dir(p)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _hf_model(module):
    """The transformers model inside a Policy wrapper (or the module itself)."""
    return getattr(module, "model", module) if not hasattr(module, "save_pretrained") else module


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, *, keep: int = 2,
         d: Dist = SINGLE) -> Path:
    """Collective under torchrun: every rank writes its shards, rank 0 commits."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = run_dir / f".tmp-ckpt-{step:06d}"
    if d.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(d)
    msd, osd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"), no_dist=not d.on)
    if d.main:
        if not d.on:
            _hf_model(model).save_pretrained(str(tmp / "model"), safe_serialization=True)
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": d.world, **state}))
        write_manifest(tmp, step)
        _fsync_tree(tmp)
        if final.exists():                               # re-saving the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        ptr = run_dir / ".latest.tmp"
        ptr.write_text(final.name)
        with open(ptr, "rb") as f:
            os.fsync(f.fileno())
        os.replace(ptr, run_dir / "latest")
        _fsync_dir(run_dir)
        prune(run_dir, step, keep)
    barrier(d)
    return final


MANIFEST = "manifest.json"


def write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}))


def verify(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a file missing, truncated or grown, no manifest), or None."""
    m = ckpt / MANIFEST
    if not m.is_file():
        return "no manifest.json (an interrupted save, or a checkpoint from before manifests)"
    try:
        man = json.loads(m.read_text())
        files = dict(man["files"])
    except (ValueError, KeyError, TypeError):
        return "manifest.json is not readable"
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size}"
    try:
        json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return "state.json is not readable"
    return None


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("ckpt-") and name[5:].isdigit() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run folder's checkpoint folders, newest step first."""
    found = [p for p in Path(run_dir).glob("ckpt-*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep this run's `keep` newest checkpoints up to `step`; one with a later step is from a timeline this
    run has left (it resumed from an older checkpoint) and goes too."""
    mine = [p for p in checkpoints(run_dir) if step_of(p) <= step]
    for old in [p for p in checkpoints(run_dir) if step_of(p) > step] + mine[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (the `latest` pointer is only a hint)."""
    return next((c for c in checkpoints(run_dir) if verify(c) is None), None)


class ResumeError(ValueError):
    pass


def resume(run_dir: Path, model, optimizer, scheduler, *, say=print) -> dict | None:
    """Load the newest checkpoint that verifies and loads; the trainer state, or None for a folder with no
    checkpoint at all. Each damaged or unloadable one is reported through `say` and the next older tried."""
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    if not found:
        return None
    hint = run_dir / "latest"
    pointed = hint.read_text().strip() if hint.is_file() else None
    problems = []
    for ckpt in found:
        why = verify(ckpt)
        if why is None:
            try:
                state = load(ckpt, model, optimizer, scheduler)
            except Exception as e:                   # a damaged shard the sizes did not show, a foreign format
                why = f"loading failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            else:
                if problems or pointed != ckpt.name:
                    say(f"resume: from {ckpt.name} (`latest` names {pointed or 'nothing'}); skipped: "
                        + ("; ".join(problems) or "none"))
                return state
        problems.append(f"{ckpt.name}: {why}")
        say(f"resume: {ckpt.name} is damaged ({why}); trying the one before")
    raise ResumeError(f"--resume: no loadable checkpoint in {run_dir}: " + "; ".join(problems))


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place, on any number of processes (the
    checkpoint may come from another world size); returns the trainer state."""
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with _single_process_quiet():
        dcp.load(sd, checkpoint_id=str(Path(ckpt) / "dcp"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    blob = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((Path(ckpt) / "state.json").read_text())


def export(model, tokenizer, out_dir: Path, *, d: Dist = SINGLE, base: str | None = None, lora_cfg=None) -> Path:
    """A plain transformers model folder (LoRA merged in) that `from_pretrained` loads.

    Under FSDP2 the full state dict is gathered to rank 0 (offloaded to CPU) and loaded into a fresh
    copy of `base` (with the same LoRA shape when `lora_cfg` is given), which is then saved."""
    out_dir = Path(out_dir)
    hf = _hf_model(model)
    if d.on:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.main:
            from exgrpo.models import add_lora, load_model
            fresh = load_model(base, dtype=torch.float32)
            if lora_cfg is not None:
                fresh = add_lora(fresh, **lora_cfg)
            strip = "model." if hf is not model else ""
            fresh.load_state_dict({k.removeprefix(strip): v for k, v in full.items()})
            hf = fresh
        barrier(d)
        if not d.main:
            return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = hf
    if is_lora(hf):
        import copy
        to_save = copy.deepcopy(hf).merge_and_unload()
    to_save.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- the loops' safety net
# Shared by sft.py and train.py, so both stop and save the same way.

def note_skipped_step(run_dir: Path, step: int, loss: float, gnorm: float, bad_streak: int, max_bad: int,
                      d: Dist = SINGLE) -> None:
    """Report a skipped (non-finite) update; after `max_bad` in a row, stop with the last good checkpoint."""
    if d.main:
        print(f"step {step}: non-finite loss ({loss}) or gradient norm ({gnorm}); update skipped")
    if bad_streak >= max_bad:
        raise FloatingPointError(f"{bad_streak} non-finite steps in a row; stopping. The last good "
                                 f"checkpoint is {latest(run_dir)}")


def save_on_interrupt(run_dir: Path, done: int, saved: int, model, optimizer, scheduler, bad_streak: int, *,
                      keep: int, d: Dist = SINGLE) -> None:
    """Ctrl-C: checkpoint the steps finished since the last save (single process; under torchrun the
    agent stops every rank at once, so no collective save is possible)."""
    if done > saved and not d.on:
        save(run_dir, done, model, optimizer, scheduler, {"bad_streak": bad_streak}, keep=keep)
        print(f"interrupted: checkpoint saved at step {done}; continue with --resume")
