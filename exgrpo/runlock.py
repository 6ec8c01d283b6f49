"""One run per folder: an exclusive `flock` on `RUN/.lock`, held for the run's life and released by the OS on any
exit (a crashed or killed run leaves no stale lock), with the holder's pid, host, command and start time in the
file so that a second run into the folder fails at once naming it. Used by sft, train and probe on their run
folder, and by eval on its report file (`REPORT.lock` beside it). Also the atomic JSON write their results use."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK = ".lock"
_held: dict[Path, int] = {}                 # target -> the descriptor whose flock this process holds


def _lock_file(target: Path) -> Path:
    return target / LOCK if target.is_dir() else target.with_name(target.name + LOCK)


def lock(target: Path) -> None:
    """Hold `target`'s lock (a run folder's `.lock`, or `FILE.lock` beside a file) until release() or the
    process ends; a target another process holds is an error naming the holder."""
    key = target.resolve()
    if key in _held:                        # this process's own earlier run into the folder (tests, the demo)
        os.close(_held.pop(key))
    fd = os.open(_lock_file(target), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']}, `{h['command']}`, since {h['since']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise ValueError(f"{target} is in use by another run ({who}); wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[key] = fd


def release(target: Path) -> None:
    """Give the lock back (the end of a run; a crash gives it back by exiting)."""
    fd = _held.pop(Path(target).resolve(), None)
    if fd is not None:
        os.close(fd)


def claim_folder(run: Path, what: str = "the run", flag: str = "--out") -> None:
    """Make `run` a folder this process holds: not a file, created if missing, writable (the lock file is the
    first thing written in it) and locked; any failure is a ValueError naming the folder."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"{flag} {run} is a file; {what} needs a folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock(run)
    except OSError as e:
        raise ValueError(f"{flag} {run} is not writable: {e.strerror or e}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file, fsync, rename: a kill leaves the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
