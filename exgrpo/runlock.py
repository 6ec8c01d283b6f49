"""One run per folder: an exclusive `flock` on `RUN/.lock`, held for the run's life and released by the OS on any
exit (a crashed or killed run leaves no stale lock), with the holder's pid, host, command and start time in the
file so that a second run into the folder fails at once naming it. Used by sft, train, probe and eval."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK = ".lock"
_held: dict[Path, int] = {}                 # run folder -> the descriptor whose flock this process holds


def lock(run: Path) -> None:
    """Hold `run`'s lock until release() or the process ends; a folder another process holds is an error
    naming the holder."""
    key = run.resolve()
    if key in _held:                        # this process's own earlier run into the folder (tests, the demo)
        os.close(_held.pop(key))
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
        raise ValueError(f"{run} is in use by another run ({who}); wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[key] = fd


def release(run: Path) -> None:
    """Give the run folder's lock back (the end of a run; a crash gives it back by exiting)."""
    fd = _held.pop(Path(run).resolve(), None)
    if fd is not None:
        os.close(fd)
