"""`exgrpo data TASK FILE`: load a dataset file the way `exgrpo probe` and `exgrpo eval` will, and show it.

    exgrpo data gsm8k grade_school_math/data/test.jsonl
    exgrpo data boolq dev.jsonl --field answer=label          # a copy that calls the gold "label"
    exgrpo data math MATH/test                                # the release's one-problem-per-file folder

Prints the number of examples, the gold-answer distribution (a warning when one answer is over half of a
multiple-choice set), what the loader changed (options shuffled), three rendered prompts as the student
sees them, and every record it skipped, with file:line and the reason. Exit 2 when nothing can be read.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from exgrpo.cli import fail
from exgrpo.tasks.example import Example


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from exgrpo.tasks import TASKS
    parser.add_argument("task", help=f"a registry task: {', '.join(TASKS)}")
    parser.add_argument("file", help="the dataset file or folder (JSON, JSON Lines, Parquet, CSV)")
    parser.add_argument("--field", default="", help="comma-separated NAME=SOURCE mappings, e.g. answer=label")
    parser.add_argument("--limit", type=int, default=None, help="use the first N examples, as --limit elsewhere")
    parser.add_argument("--show", type=int, default=3, help="how many prompts to print (default: 3)")


def gold_distribution(examples: list[Example], top: int = 8) -> list[tuple[str, int]]:
    counts = Counter(e.answer for e in examples)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def skew_warning(examples: list[Example]) -> str | None:
    """A warning when one gold letter answers more than half of the multiple-choice questions."""
    from exgrpo.tasks.loaders import gold_skew
    from exgrpo.tasks.registry import SKEW_SHARE
    skew = gold_skew(examples)
    if skew is None or skew[1] <= SKEW_SHARE * skew[2]:
        return None
    letter, n, total = skew
    return (f"warning: gold letter {letter} answers {n} of {total} multiple-choice questions "
            f"({100 * n / total:.0f}%): always answering {letter} would score that; a model trained on it "
            "learns the letter, not the task")


def group_skipped(skipped: list[str]) -> dict[str, list[str]]:
    """"file:line: Task record: reason" lines grouped by reason: {reason: [file:line, ...]}."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        loc, sep, reason = s.partition(" record: ")
        if not sep:
            loc, _, reason = s.rpartition(": ")
        groups.setdefault(reason, []).append(loc.rsplit(": ", 1)[0])
    return groups


def _spread(n: int, k: int) -> list[int]:
    """k indices spread over 0..n-1 (first, middle, last for k = 3)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def run(args: argparse.Namespace) -> int:
    from exgrpo.tasks import DatasetError, get_task, load_examples
    try:
        task = get_task(args.task)
        fields = tuple(s for s in args.field.split(",") if s.strip())
        res = load_examples(task, args.file, skip_bad=True, limit=args.limit, fields=fields)
    except (KeyError, ValueError, DatasetError, OSError) as e:
        return fail("data", e)
    exs = res.examples
    print(f"{task.title} ({task.name}): {args.file}")
    print(f"{len(exs)} examples, {len(res.skipped)} records skipped")
    if exs:
        dist = ", ".join(f"{a!r} {n} ({100 * n / len(exs):.0f}%)" for a, n in gold_distribution(exs))
        print(f"gold answers: {dist}" + (" ..." if len({e.answer for e in exs}) > 8 else ""))
        with_rationale = sum(bool(e.rationale) for e in exs)
        print(f"with the dataset's own rationale: {with_rationale} of {len(exs)}")
    for note in res.notes:
        print(f"note: {note}")
    if (w := skew_warning(exs)) is not None:
        print(w)
    for i in _spread(len(exs), max(0, args.show)):
        e = exs[i]
        print(f"\n--- prompt (id {e.id}; gold {e.answer!r}) ---\n{task.prompt(e)}")
    if res.skipped:
        print(f"\nskipped records ({len(res.skipped)}), by reason:")
        for reason, locs in group_skipped(res.skipped).items():
            more = f" and {len(locs) - 3} more" if len(locs) > 3 else ""
            print(f"  {len(locs)} x {reason}\n      at {', '.join(locs[:3])}{more}")
    if not exs:
        print(f"exgrpo data: no example could be read from {args.file} (expected: {task.files})", file=sys.stderr)
        return 2
    return 0
