"""Append-only JSONL with one key per record, safe to resume after SIGKILL.

Each record is written as one `write` of one line followed by a flush, so a killed process leaves
at most one torn line, and only at the end: `open_store` drops it (truncating the file to the last
complete line) and reports that it did. A broken line anywhere else is not a crash artefact, so it
is an error naming `file:line`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StoreError(ValueError):
    pass


@dataclass
class JsonlStore:
    path: Path
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> first record with it
    dropped_torn_line: bool = False
    duplicates: int = 0       # repeated keys found on load (kept: the last, which replaced the others)
    fsync: bool = False       # also survive power loss, at the cost of one disk sync per record

    def append(self, record: dict[str, Any], *, replace: bool = False) -> bool:
        """Write a record unless its key is already stored (or, with `replace`, write it to stand for that
        key from now on: the later line wins when the file is read again); True if written."""
        key = record["key"]
        if key in self.records and not replace:
            return False
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:  # os.write may write less than asked
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.records[key] = record
        return True


def open_store(path: str | Path, fsync: bool = False) -> JsonlStore:
    path = Path(path)
    store = JsonlStore(path, fsync=fsync)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return store
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After split, a file that ends in "\n" has an empty last element; anything else there is a
    # line the writer never finished.
    good_end = 0
    pos = 0
    for i, raw in enumerate(lines):
        is_last = i == len(lines) - 1
        end = pos + len(raw) + (0 if is_last else 1)
        if not raw.strip():
            pos = end
            if not is_last:
                good_end = end
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "key" not in rec:
                raise ValueError("not a record with a 'key'")
        except ValueError as e:
            tail = all(not r.strip() for r in lines[i + 1:])
            if tail:
                store.dropped_torn_line = True
                break
            raise StoreError(f"{path}:{i + 1}: corrupt record ({e}); only the last line may be torn") from None
        if is_last:
            # Complete JSON but no newline: the writer died between the JSON and "\n". Keep it.
            data = data + b"\n"
            with open(path, "ab") as f:
                f.write(b"\n")
            end += 1
        if rec["key"] in store.records:
            store.duplicates += 1
        store.records[rec["key"]] = rec
        good_end = end
        pos = end
    if store.dropped_torn_line:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return store


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a store file, first per key, without modifying the file."""
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    lines = p.read_bytes().split(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            if all(not r.strip() for r in lines[i + 1:]):
                break  # a torn last line from an interrupted run
            raise StoreError(f"{p}:{i + 1}: corrupt record") from None
        out.setdefault(rec["key"], rec)
    return list(out.values())
