"""The end-of-run table: per rule and per task, how many probes were generated, passed
consistency (filter 1) and were kept (filter 2), plus failure reasons, question verdicts, and where
each question's R_T came from (and why the teacher's failed attempts at it were not kept)."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    attempted: int = 0
    failed: int = 0
    generated: int = 0
    consistent: int = 0
    kept: int = 0


@dataclass
class Summary:
    by_rule: dict[str, Row] = field(default_factory=dict)
    by_task: dict[str, Row] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)       # "stage: reason" -> count
    verdicts: Counter = field(default_factory=Counter)       # question verdict -> count
    rationale_sources: Counter = field(default_factory=Counter)  # "teacher" / "dataset" / "none" -> questions
    rationale_attempts: int = 0                              # the teacher's attempts at R_T
    rationale_failures: Counter = field(default_factory=Counter)  # attempt not kept: reason -> count
    questions: int = 0

    @property
    def total(self) -> Row:
        t = Row()
        for r in self.by_rule.values():
            for k in vars(t):
                setattr(t, k, getattr(t, k) + getattr(r, k))
        return t


def summarize(unit_records: list[dict[str, Any]], question_records: list[dict[str, Any]],
              rationale_records: list[dict[str, Any]] = ()) -> Summary:
    """From the work logs (every probe and R_T attempt finished, including those of questions not yet
    judged) and the probe set (kept flags, verdicts, R_T sources)."""
    s = Summary()
    by_rule: dict[str, Row] = defaultdict(Row)
    by_task: dict[str, Row] = defaultdict(Row)
    kept = {(q["task"], q["example_id"], p["rule"]) for q in question_records for p in q["probes"] if p["kept"]}
    for u in unit_records:
        for row in (by_rule[u["rule"]], by_task[u["task"]]):
            row.attempted += 1
            row.failed += u["status"] != "ok"
            row.generated += u["status"] == "ok"
            row.consistent += bool(u["consistent"])
            row.kept += (u["task"], u["example_id"], u["rule"]) in kept
        if u["status"] != "ok":
            reason = str(u["reason"])
            s.failures[f"{u['stage']}: {reason[:80]}"] += 1
    s.by_rule, s.by_task = dict(by_rule), dict(by_task)
    s.questions = len(question_records)
    s.verdicts = Counter(q["verdict"] for q in question_records)
    s.rationale_sources = Counter(q.get("rationale_source") or "none" for q in question_records)
    s.rationale_attempts = len(rationale_records)
    s.rationale_failures = Counter(str(r["reason"])[:80] for r in rationale_records if not r["correct"])
    return s


def render(s: Summary) -> str:
    cols = ("attempted", "failed", "generated", "consistent", "kept")

    def table(title: str, rows: dict[str, Row]) -> list[str]:
        w = max([len(title)] + [len(k) for k in rows] + [5])
        head = f"{title:<{w}}  " + "  ".join(f"{c:>10}" for c in cols)
        lines = [head, "-" * len(head)]
        for k, r in rows.items():
            lines.append(f"{k:<{w}}  " + "  ".join(f"{getattr(r, c):>10}" for c in cols))
        t = s.total
        lines.append(f"{'total':<{w}}  " + "  ".join(f"{getattr(t, c):>10}" for c in cols))
        return lines

    out = table("rule", s.by_rule) + [""] + table("task", s.by_task)
    out.append("")
    out.append(f"questions judged: {s.questions}  " + "  ".join(f"{k}: {v}" for k, v in sorted(s.verdicts.items())))
    out.append("R_T from: " + "  ".join(f"{k}: {v}" for k, v in sorted(s.rationale_sources.items()))
               + f"  (teacher attempts: {s.rationale_attempts}, not kept: {sum(s.rationale_failures.values())})")
    if s.rationale_failures:
        out.append("R_T attempts not kept, by reason:")
        out += [f"  {n:>6}  {reason}" for reason, n in s.rationale_failures.most_common(10)]
    if s.failures:
        out.append("failed probes by reason:")
        out += [f"  {n:>6}  {reason}" for reason, n in s.failures.most_common(15)]
    return "\n".join(out)
