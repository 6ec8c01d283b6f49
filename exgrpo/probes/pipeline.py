"""Stage 1 of docs/method.md: probes -> teacher answers -> filter 1 -> filter 2 -> probe set.

Two append-only files in the output folder:

* `probe_log.jsonl`, the work log: one record per (example, rule, teacher settings), written the
  moment that probe's three teacher calls are done. A killed run loses only the calls in flight.
* `probe_set.jsonl`, the probe set D_EI: one record per question (see `question_record`), written
  once all of its rules are in the log and the student has judged it.

A re-run with the same settings skips every key already present, so it neither repeats work nor
writes duplicates.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from exgrpo.probes.backends import TeacherUnavailable
from exgrpo.probes.rules import ProbeRule, RuleSet
from exgrpo.probes.store import JsonlStore, open_store
from exgrpo.probes.student import Student
from exgrpo.probes.teachers import Teacher, parse_probe, probe_prompt
from exgrpo.tasks.answers import answer_span, extract_short, short_equal
from exgrpo.tasks.example import Example
from exgrpo.tasks.registry import Task

LOG_FILE = "probe_log.jsonl"
SET_FILE = "probe_set.jsonl"

HardDirection = Literal["intent", "printed", "off"]


@dataclass(frozen=True)
class FilterSettings:
    """Filter 2. docs/method.md: drop Q if N' = 0, if Λ = N' (too easy), or if it is too hard.
    `hard_direction` [choice]: "intent" drops Q when Λ < tau_hard (the student solves fewer than
    tau_hard probes: the paper's stated intent); "printed" drops it when Λ > tau_hard (our reading
    of the comparison as printed, kept for reproduction); "off" never drops for hardness."""
    tau_hard: int = 1
    hard_direction: HardDirection = "intent"
    drop_too_easy: bool = True


def difficulty_verdict(n_consistent: int, n_correct: int | None, f: FilterSettings) -> str:
    """"kept", "no_probes", "too_easy" or "too_hard". `n_correct` None: no student, no filter 2."""
    if n_consistent == 0:
        return "no_probes"
    if n_correct is None:
        return "kept"
    if f.drop_too_easy and n_correct == n_consistent:
        return "too_easy"
    if f.hard_direction == "intent" and n_correct < f.tau_hard:
        return "too_hard"
    if f.hard_direction == "printed" and n_correct > f.tau_hard:
        return "too_hard"
    return "kept"


def _digest(parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def probe_key(ex: Example, rule: ProbeRule, teacher_fp: str) -> str:
    return _digest(["probe", ex.task, ex.id, rule.name, rule.digest, teacher_fp])


def question_key(ex: Example, rules: RuleSet, teacher_fp: str, student_fp: str | None,
                 f: FilterSettings) -> str:
    return _digest(["question", ex.task, ex.id, rules.digest, teacher_fp, student_fp, asdict(f)])


def extract_probe_answer(text: str) -> str | None:
    """A_aug: the short answer after "The answer is"; None when the response never states one."""
    if answer_span(text) is None:
        return None
    return extract_short(text)


# ---------------------------------------------------------------- one probe: three teacher calls

def run_probe_unit(teacher: Teacher, task: Task, ex: Example, rule: ProbeRule, rationale: str,
                   key: str) -> dict[str, Any]:
    """The work-log record of one (example, rule). Bad teacher output becomes status "failed" with
    a reason; only `TeacherUnavailable` escapes, because it means the run must stop."""
    rec: dict[str, Any] = {"key": key, "task": ex.task, "example_id": ex.id, "rule": rule.name,
                           "rule_digest": rule.digest, "teacher": teacher.fingerprint, "status": "failed",
                           "stage": None, "reason": None, "rationale": rationale, "probe": None,
                           "response": None, "probe_answer": None, "recheck_response": None,
                           "recheck_answer": None, "consistent": False}

    def fail(stage: str, reason: str) -> dict[str, Any]:
        rec.update(stage=stage, reason=reason)
        return rec

    try:
        r = teacher.write_probe(task, ex, rule, rationale)
        if not r.ok:
            return fail("write", r.error or "no text")
        probe, why = parse_probe(r.text or "")
        if probe is None:
            return fail("write", why or "bad probe")
        rec["probe"] = probe
        a = teacher.answer_probe(task, ex, rule, probe)
        if not a.ok:
            return fail("answer", a.error or "no text")
        rec["response"] = a.text
        if not (a.text or "").strip():
            return fail("answer", "empty response")
        ans = extract_probe_answer(a.text or "")
        if ans is None:
            return fail("answer", "no extractable answer")
        rec["probe_answer"] = ans
        c = teacher.recheck(task, ex, probe, a.text or "")
        if not c.ok:
            return fail("recheck", c.error or "no text")
        rec["recheck_response"] = c.text
        pred = task.extract(c.text or "", ex)
        rec["recheck_answer"] = pred
        rec["consistent"] = task.is_correct(pred, ex.answer)
        rec["status"] = "ok"
        return rec
    except TeacherUnavailable:
        raise
    except Exception as e:  # a bug or odd input in one probe must not kill a long run
        return fail(rec["stage"] or "internal", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- filter 2 and the question record

def question_record(ex: Example, key: str, unit_recs: list[dict[str, Any]], teacher_fp: str,
                    student_fp: str | None, f: FilterSettings,
                    student_texts: dict[str, str] | None) -> dict[str, Any]:
    """One line of the probe set.

    Schema: key, task, example_id, example (Example.to_dict), rationale (R_T used), teacher,
    student, filter (FilterSettings), probes (one per rule, in rule order: rule, status, stage,
    reason, probe, response, probe_answer, consistent, student_response, student_answer,
    student_correct, kept), n_probes, n_generated, n_consistent (N'), n_student_correct (Λ, or
    None without a student), verdict ("kept" | "no_probes" | "too_easy" | "too_hard"), kept.
    A probe is usable for training iff its `kept` is true (consistent, in a kept question)."""
    probes = []
    n_correct = 0
    for u in unit_recs:
        st_text = student_texts.get(u["key"]) if student_texts is not None and u["consistent"] else None
        st_ans = extract_probe_answer(st_text) if st_text is not None else None
        st_ok = short_equal(st_ans, u["probe_answer"]) if st_text is not None else None
        n_correct += bool(st_ok)
        probes.append({"rule": u["rule"], "status": u["status"], "stage": u["stage"], "reason": u["reason"],
                       "probe": u["probe"], "response": u["response"], "probe_answer": u["probe_answer"],
                       "consistent": u["consistent"], "student_response": st_text, "student_answer": st_ans,
                       "student_correct": st_ok})
    n_cons = sum(p["consistent"] for p in probes)
    verdict = difficulty_verdict(n_cons, n_correct if student_texts is not None else None, f)
    for p in probes:
        p["kept"] = bool(p["consistent"] and verdict == "kept")
    return {"key": key, "task": ex.task, "example_id": ex.id, "example": ex.to_dict(),
            "rationale": unit_recs[0]["rationale"] if unit_recs else ex.rationale,
            "teacher": teacher_fp, "student": student_fp, "filter": asdict(f), "probes": probes,
            "n_probes": len(probes), "n_generated": sum(p["status"] == "ok" for p in probes),
            "n_consistent": n_cons, "n_student_correct": n_correct if student_texts is not None else None,
            "verdict": verdict, "kept": verdict == "kept"}


# ---------------------------------------------------------------- the run

@dataclass
class RunResult:
    out_dir: Path
    examples: int = 0
    questions_written: int = 0
    questions_skipped: int = 0     # already in the probe set
    units_done: int = 0            # probes computed in this run
    units_skipped: int = 0         # found in the work log
    dropped_torn_lines: list[str] = field(default_factory=list)
    stopped: str | None = None     # why the run stopped early (teacher down), else None
    question_records: list[dict[str, Any]] = field(default_factory=list)  # this run's examples, done
    unit_records: list[dict[str, Any]] = field(default_factory=list)      # this run's examples, done


@dataclass
class _Pending:
    ex: Example
    qkey: str
    rules: list[ProbeRule]
    rationale: str | None = None
    remaining: int = 0


def run_pipeline(items: Iterable[tuple[Task, Example]], teacher: Teacher, rules: RuleSet, out_dir: str | Path,
                 *, student: Student | None = None, filters: FilterSettings = FilterSettings(),
                 workers: int = 8, student_batch: int = 64, fsync: bool = False,
                 on_total: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Run (or resume) Stage 1 over `items`; see the module docstring for the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log, qset = open_store(out / LOG_FILE, fsync), open_store(out / SET_FILE, fsync)
    res = RunResult(out)
    res.dropped_torn_lines = [str(s.path) for s in (log, qset) if s.dropped_torn_line]
    student_fp = student.fingerprint if student is not None else None
    tfp = teacher.fingerprint

    # What is left to do, per example.
    todo: list[tuple[Task, _Pending]] = []
    order: list[tuple[Example, str, list[str]]] = []
    n_units = 0
    for task, ex in items:
        res.examples += 1
        qk = question_key(ex, rules, tfp, student_fp, filters)
        ukeys = [probe_key(ex, r, tfp) for r in rules.rules]
        order.append((ex, qk, ukeys))
        if qk in qset.records:
            res.questions_skipped += 1
            continue
        missing = [r for r, k in zip(rules.rules, ukeys) if k not in log.records]
        res.units_skipped += len(rules.rules) - len(missing)
        p = _Pending(ex, qk, missing, remaining=len(missing))
        done_units = [log.records[k] for k in ukeys if k in log.records]
        # Reuse the rationale of an earlier run, so a resumed question sees the same R_T.
        p.rationale = ex.rationale or next((u["rationale"] for u in done_units if u.get("rationale")), None)
        todo.append((task, p))
        n_units += len(missing)
    if on_total:
        on_total(n_units)

    ready: list[tuple[Task, _Pending]] = []

    def flush_ready() -> None:
        if not ready:
            return
        batch = list(ready)
        ready.clear()
        _finish(batch, log, qset, rules, tfp, student, student_fp, filters, res)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="exgrpo-probe")
    inflight: dict[Future, tuple[str, Task, _Pending, ProbeRule | None]] = {}
    queue = iter(todo)

    def submit_units(task: Task, p: _Pending) -> None:
        for r in p.rules:
            fut = pool.submit(run_probe_unit, teacher, task, p.ex, r, p.rationale or "",
                              probe_key(p.ex, r, tfp))
            inflight[fut] = ("unit", task, p, r)

    def get_rationale(task: Task, ex: Example) -> str:
        # R_T for a dataset without one. A failed solve leaves it empty: probes can still be
        # written from Q and A, and filter 1 still checks them.
        r = teacher.solve(task, ex)
        return r.text if r.ok and r.text else ""

    try:
        exhausted = False
        while True:
            while not res.stopped and not exhausted and len(inflight) < 2 * max(1, workers):
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                task, p = nxt
                if not p.rules:
                    ready.append((task, p))
                elif p.rationale is None:
                    inflight[pool.submit(get_rationale, task, p.ex)] = ("prep", task, p, None)
                else:
                    submit_units(task, p)
            if not inflight:
                break
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, task, p, rule = inflight.pop(fut)
                try:
                    value = fut.result()
                except TeacherUnavailable as e:
                    if res.stopped is None:
                        res.stopped = str(e)
                        for f in inflight:  # start nothing new; in-flight calls finish or fail
                            f.cancel()
                    continue
                if kind == "prep":
                    p.rationale = value
                    if not res.stopped:
                        submit_units(task, p)
                    continue
                log.append(value)
                res.units_done += 1
                if on_progress:
                    on_progress(1)
                p.remaining -= 1
                if p.remaining == 0:
                    ready.append((task, p))
            inflight = {f: v for f, v in inflight.items() if not f.cancelled()}
            if len(ready) >= student_batch:
                flush_ready()
        flush_ready()
    finally:
        # After a stop the loop above has drained the calls in flight (written if they succeeded);
        # on Ctrl-C this waits for them too, and cancels everything not started.
        pool.shutdown(wait=True, cancel_futures=True)

    for _ex, qk, ukeys in order:
        if qk in qset.records:
            res.question_records.append(qset.records[qk])
        res.unit_records += [log.records[k] for k in ukeys if k in log.records]
    return res


def _finish(batch: list[tuple[Task, _Pending]], log: JsonlStore, qset: JsonlStore, rules: RuleSet, tfp: str,
            student: Student | None, student_fp: str | None, f: FilterSettings, res: RunResult) -> None:
    """Filter 2 for questions whose probes are all logged, then their probe-set records."""
    units = {id(p): [log.records[probe_key(p.ex, r, tfp)] for r in rules.rules] for _, p in batch}
    texts: dict[str, str] | None = None
    if student is not None:
        asks = [u for _, p in batch for u in units[id(p)] if u["consistent"]]
        answers = student.answer([probe_prompt(u["probe"], rules) for u in asks]) if asks else []
        if len(answers) != len(asks):
            raise RuntimeError(f"the student returned {len(answers)} answers for {len(asks)} prompts")
        texts = {u["key"]: t for u, t in zip(asks, answers)}
    for _, p in batch:
        rec = question_record(p.ex, p.qkey, units[id(p)], tfp, student_fp, f, texts)
        if qset.append(rec):
            res.questions_written += 1
