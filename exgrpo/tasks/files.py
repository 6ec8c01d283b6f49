"""Reading dataset files into records, whatever form the user downloaded.

`read_records(path)` yields `(location, record)` pairs, the location being what an error message should
point at (`file:line`, `file:item K`, `file:row N`, or the file itself for a one-record file). A record
that cannot be parsed comes as the exception instead, so that the caller decides whether to stop or skip.

What is read, decided by the content and not by the file name (GSM8K-Reversal's public
`test-backward.json` is JSON Lines under a `.json` name):

* JSON Lines: one JSON object per line (blank lines ignored);
* a JSON document: a list of records, a BIG-bench task (`{"examples": [...]}`), an object mapping ids to
  records (TabMWP's `problems_*.json`; the key becomes `_key`), or one record (MATH's release has one
  problem per file);
* Parquet (what the Hugging Face Hub serves), through pyarrow: one record per row;
* CSV or TSV with a header row (e-SNLI's release);
* a folder: every data file under it, in natural path order, each record's `_key` being its file's
  path inside the folder without the suffix (MATH's `test/algebra/1.json` -> "test/algebra/1").
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv")
PARQUET_MAGIC = b"PAR1"


class DatasetError(ValueError):
    """A dataset file or record that cannot be read; the message starts with where it is."""


def read_records(path: str | Path) -> Iterator[tuple[str, Record | Exception]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.is_dir():
        yield from _read_folder(path)
        return
    with path.open("rb") as f:
        head = f.read(4)
    if head == PARQUET_MAGIC or path.suffix.lower() == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        yield from _read_json(path)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Record | Exception]]:
    text = _read_text(path)
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        # Not one document. JSON Lines when the first line is a JSON value of its own.
        first = next(ln for ln in text.splitlines() if ln.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise DatasetError(f"{path}:{whole.lineno}: invalid JSON ({whole.msg}), and not JSON Lines either "
                               "(its first line is not a JSON value)") from None
        yield from _json_lines(path, text)
        return
    yield from _json_document(path, data, one_line="\n" not in text.strip())


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Record | Exception]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        yield loc, rec if isinstance(rec, dict) else ValueError(f"expected a JSON object, got {type(rec).__name__}")


def _json_document(path: Path, data: Any, one_line: bool) -> Iterator[tuple[str, Record | Exception]]:
    if isinstance(data, dict) and isinstance(data.get("examples"), list):       # BIG-bench, BBH
        items: list[tuple[str, Any]] = list(enumerate(data["examples"]))
    elif isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        items = [(k, {"_key": k, **v}) for k, v in data.items()]                # {id: record}
    elif isinstance(data, dict):             # one record: a file of the MATH release, or one line of JSON Lines
        yield (f"{path}:1" if one_line else str(path)), data
        return
    else:
        raise DatasetError(f"{path}: expected a list or an object at the top level, got {type(data).__name__}")
    for k, rec in items:
        yield f"{path}:item {k}", rec if isinstance(rec, dict) else ValueError(
            f"expected a JSON object, got {type(rec).__name__}")


def _read_parquet(path: Path) -> Iterator[tuple[str, Record | Exception]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow ({e}); pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches():
        for rec in batch.to_pylist():
            yield f"{path}:row {row}", rec
            row += 1


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, Record | Exception]]:
    _read_text(path)                                    # a clear error for a file that is not UTF-8
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            # DictReader's line_num is the physical line of the row just read.
            yield f"{path}:{reader.line_num}", dict(row)


def natural_key(s: str) -> tuple:
    """"q-2" before "q-10": digit runs compare as numbers."""
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s))


def _read_folder(root: Path) -> Iterator[tuple[str, Record | Exception]]:
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES),
                   key=lambda p: natural_key(p.relative_to(root).as_posix()))
    if not files:
        raise DatasetError(f"{root}: a folder with no data file ({', '.join(DATA_SUFFIXES)}) in it")
    for f in files:
        recs = list(read_records(f))
        if len(recs) == 1 and isinstance(recs[0][1], dict):        # one record per file: the path is its id
            loc, rec = recs[0]
            recs = [(loc, {"_key": f.relative_to(root).with_suffix("").as_posix(), **rec})]
        yield from recs
