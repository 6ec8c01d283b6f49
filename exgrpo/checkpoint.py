"""Checkpoints that survive a crash: written into a temporary folder, every file fsynced, the folder
renamed into place, then the `latest` pointer replaced atomically. A kill at any instant leaves
either the previous checkpoint or the new one, never a half-written one that `latest` points to.

A checkpoint holds the model (full weights, or only the LoRA adapter) in safetensors, the optimizer
and scheduler states, the RNG states and the trainer's position (step, data cursor, metrics).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from exgrpo.models import is_lora


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


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


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, *, keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = run_dir / f".tmp-ckpt-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    _fsync_tree(tmp)
    if final.exists():                                   # re-saving the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    ptr = run_dir / ".latest.tmp"
    ptr.write_text(final.name)
    with open(ptr, "rb") as f:
        os.fsync(f.fileno())
    os.replace(ptr, run_dir / "latest")
    _fsync_dir(run_dir)
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    ptr = Path(run_dir) / "latest"
    if not ptr.exists():
        return None
    path = Path(run_dir) / ptr.read_text().strip()
    return path if (path / "state.json").exists() else None


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns the trainer state."""
    from safetensors.torch import load_file
    mdir = Path(ckpt) / "model"
    if is_lora(model):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(str(mdir / "adapter_model.safetensors")))
    else:
        sd = {}
        for f in sorted(mdir.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not _is_tied(model, k)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    blob = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((Path(ckpt) / "state.json").read_text())


def _is_tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def export(model, tokenizer, out_dir: Path) -> Path:
    """A plain transformers model folder (LoRA merged in) that `from_pretrained` loads."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if is_lora(model):
        import copy
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
