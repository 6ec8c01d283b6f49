"""Stage 1 of docs/method.md: R_T -> probes -> teacher answers -> filter 1 -> filter 2 -> probe set.

Three append-only files in the output folder:

* `rationale_log.jsonl`, the R_T work log: one record per attempt of the teacher at solving Q
  (`teacher.solve`), written the moment that call returns. An attempt counts only when the answer
  extracted from it (`task.extract`) is the gold one; a question gets up to `RationaleSettings.tries`
  attempts and is dropped (verdict "no_rationale") when none is correct, before any probe call.
* `probe_log.jsonl`, the probe work log: one record per (example, rule, teacher settings, R_T),
  written the moment that probe's three teacher calls are done.
* `probe_set.jsonl`, the probe set D_EI: one record per question (see `question_record`), written
  once its R_T is settled, all of its rules are in the log and the student has judged it.

A killed run loses only the calls in flight. A re-run with the same settings skips every key already
present, so it neither repeats work nor writes duplicates: logged R_T attempts are replayed in order
(the first correct one is the R_T, so a resumed question sees the same R_T and the same probe keys).
The one exception is a call that got no usable reply (a broken body, an error page, no choices): a probe
whose teacher calls failed, or an R_T attempt whose call failed (not one that answered wrongly), is asked
again on later runs (up to `retry_failed` more times), its new record standing for the key (a store's later
line wins), and its question's record written again.
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
RATIONALE_FILE = "rationale_log.jsonl"
SET_FILE = "probe_set.jsonl"
# Part of every question key: a probe set written before a schema change is rewritten on a re-run.
# 2: R_T checked against the gold answer and its source recorded; each probe's exact "prompt" stored.
SCHEMA = 2

HardDirection = Literal["intent", "printed", "off"]
RationaleSource = Literal["teacher", "dataset"]


@dataclass(frozen=True)
class FilterSettings:
    """Filter 2. docs/method.md: drop Q if N' = 0, if Λ = N' (too easy), or if it is too hard.
    `hard_direction` [choice]: "intent" drops Q when Λ < tau_hard (the student solves fewer than
    tau_hard probes: the paper's stated intent); "printed" drops it when Λ > tau_hard (our reading
    of the comparison as printed, kept for reproduction); "off" never drops for hardness."""
    tau_hard: int = 1
    hard_direction: HardDirection = "intent"
    drop_too_easy: bool = True


@dataclass(frozen=True)
class RationaleSettings:
    """Where R_T comes from. "teacher": the teacher's own solution of Q, kept only when its extracted
    answer is the gold one, resampled up to `tries` times. "dataset": the dataset's rationale where the
    example has one (GSM8K's solution, say), the teacher's (checked the same way) where it has none."""
    source: RationaleSource = "teacher"
    tries: int = 3

    def check(self) -> None:
        if self.source not in ("teacher", "dataset"):
            raise ValueError(f"rationale source must be 'teacher' or 'dataset', got {self.source!r}")
        if self.tries < 1:
            raise ValueError(f"rationale tries must be >= 1, got {self.tries}")


def difficulty_verdict(n_consistent: int, n_correct: int | None, f: FilterSettings) -> str:
    """"kept", "no_probes", "too_easy" or "too_hard". `n_correct` None: no student, no filter 2.
    (A question without a correct R_T never gets here: its verdict is "no_rationale".)"""
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


def probe_key(ex: Example, rule: ProbeRule, teacher_fp: str, rationale: str) -> str:
    """A probe depends on the R_T it was written from, so the R_T text is part of its key."""
    return _digest(["probe", ex.task, ex.id, rule.name, rule.digest, teacher_fp, _digest(rationale)])


def rationale_key(task: Task, ex: Example, teacher_fp: str, attempt: int) -> str:
    """Attempt `attempt` (0, 1, ...) at R_T: keyed on the exact prompt the teacher solves and the gold
    answer it is checked against, so neither can change under a resumed run."""
    return _digest(["rationale", ex.task, ex.id, task.prompt(ex), ex.answer, teacher_fp, attempt])


def question_key(ex: Example, rules: RuleSet, teacher_fp: str, student_fp: str | None,
                 f: FilterSettings, rs: RationaleSettings = RationaleSettings()) -> str:
    return _digest(["question", SCHEMA, ex.task, ex.id, rules.digest, teacher_fp, student_fp, asdict(f),
                    asdict(rs)])


def extract_probe_answer(text: str) -> str | None:
    """A_aug: the short answer after "The answer is"; None when the response never states one."""
    if answer_span(text) is None:
        return None
    return extract_short(text)


# ---------------------------------------------------------------- R_T: one attempt, one teacher call

def run_rationale_attempt(teacher: Teacher, task: Task, ex: Example, attempt: int, key: str) -> dict[str, Any]:
    """The work-log record of one attempt at R_T. `correct` is true iff the task's extractor finds the
    gold answer in the teacher's solution; otherwise `reason` says why not. `call_failed` marks an attempt
    that got no solution at all (a broken reply, an error page, an exception): a later run makes it again
    (see `replay_rationale`). Only `TeacherUnavailable` escapes, because it means the run must stop."""
    rec: dict[str, Any] = {"key": key, "task": ex.task, "example_id": ex.id, "teacher": teacher.fingerprint,
                           "attempt": attempt, "status": "failed", "reason": None, "response": None,
                           "answer": None, "correct": False, "call_failed": False}
    try:
        r = teacher.solve(task, ex)
        if not r.ok:
            rec["reason"], rec["call_failed"] = r.error or "no text", True
            return rec
        rec["response"] = r.text
        if not (r.text or "").strip():
            rec["reason"] = "empty response"
            return rec
        pred = task.extract(r.text or "", ex)
        rec["answer"] = pred
        if pred is None:
            rec["reason"] = "no extractable answer"
            return rec
        rec["status"] = "ok"
        rec["correct"] = bool(task.is_correct(pred, ex.answer))
        if not rec["correct"]:
            rec["reason"] = f"wrong answer {pred!r} (gold {ex.answer!r})"
        return rec
    except TeacherUnavailable:
        raise
    except Exception as e:  # a bug or odd input in one question must not kill a long run
        rec["reason"], rec["call_failed"] = f"{type(e).__name__}: {e}", True
        return rec


def call_failed(rec: dict[str, Any]) -> bool:
    """An R_T attempt that got no solution to judge (logs older than the field: no response)."""
    return bool(rec.get("call_failed", rec.get("response") is None and not rec.get("correct")))


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

@dataclass
class RationaleOutcome:
    """How a question's R_T was settled: its text (None: no correct attempt), where it came from
    ("teacher" | "dataset"; None when dropped), and the teacher's attempts in order."""
    text: str | None = None
    source: RationaleSource | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def fields(self, ex: Example, rs: RationaleSettings) -> dict[str, Any]:
        """The probe-set record's R_T fields (see `question_record`)."""
        note = None
        if rs.source == "dataset" and not ex.rationale:
            note = "the dataset has no rationale for this question: R_T is the teacher's"
        return {"rationale": self.text, "rationale_source": self.source, "rationale_note": note,
                "rationale_settings": asdict(rs),
                "rationale_attempts": [{k: a[k] for k in ("attempt", "status", "reason", "response", "answer",
                                                          "correct")} for a in self.attempts]}


def question_record(ex: Example, key: str, unit_recs: list[dict[str, Any]], teacher_fp: str,
                    student_fp: str | None, f: FilterSettings, student_texts: dict[str, str] | None, *,
                    rules: RuleSet, rationale: RationaleOutcome,
                    rationale_settings: RationaleSettings = RationaleSettings()) -> dict[str, Any]:
    """One line of the probe set.

    Schema: key, task, example_id, example (Example.to_dict: the dataset's fields as loaded),
    rationale (the R_T used: probes were written from it and SFT's Q -> R_T pair trains on it; None
    when dropped), rationale_source ("teacher" | "dataset" | None), rationale_note (why the source
    differs from the one asked for, else None), rationale_settings (RationaleSettings),
    rationale_attempts (the teacher's attempts at R_T in order: attempt, status, reason, response,
    answer, correct; empty when the dataset's was used), teacher, student, filter (FilterSettings),
    probes (one per rule, in rule order: rule, status, stage, reason, probe, prompt, response,
    probe_answer, consistent, student_response, student_answer, student_correct, kept), n_probes,
    n_generated, n_consistent (N'), n_student_correct (Λ, or None without a student), verdict
    ("kept" | "no_rationale" | "no_probes" | "too_easy" | "too_hard"), kept.

    A probe's `prompt` is the exact user turn the teacher answered and filter 2's student saw
    (`probe_prompt`: the probe and the rule set's answer instruction); SFT and the ExGRPO dialogues
    show that same text. A probe is usable for training iff its `kept` is true (consistent, in a kept
    question). A question whose R_T could not be settled has no probes and verdict "no_rationale"."""
    probes = []
    n_correct = 0
    for u in unit_recs:
        st_text = student_texts.get(u["key"]) if student_texts is not None and u["consistent"] else None
        st_ans = extract_probe_answer(st_text) if st_text is not None else None
        st_ok = short_equal(st_ans, u["probe_answer"]) if st_text is not None else None
        n_correct += bool(st_ok)
        probes.append({"rule": u["rule"], "status": u["status"], "stage": u["stage"], "reason": u["reason"],
                       "probe": u["probe"], "prompt": probe_prompt(u["probe"], rules) if u["probe"] else None,
                       "response": u["response"], "probe_answer": u["probe_answer"],
                       "consistent": u["consistent"], "student_response": st_text, "student_answer": st_ans,
                       "student_correct": st_ok})
    n_cons = sum(p["consistent"] for p in probes)
    judged = student_texts is not None and rationale.text is not None
    if rationale.text is None:
        verdict = "no_rationale"
    else:
        verdict = difficulty_verdict(n_cons, n_correct if judged else None, f)
    for p in probes:
        p["kept"] = bool(p["consistent"] and verdict == "kept")
    return {"key": key, "task": ex.task, "example_id": ex.id, "example": ex.to_dict(),
            **rationale.fields(ex, rationale_settings),
            "teacher": teacher_fp, "student": student_fp, "filter": asdict(f), "probes": probes,
            "n_probes": len(probes), "n_generated": sum(p["status"] == "ok" for p in probes),
            "n_consistent": n_cons, "n_student_correct": n_correct if judged else None,
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
    rationale_attempts_done: int = 0     # R_T attempts made in this run
    rationale_attempts_skipped: int = 0  # R_T attempts found in the R_T log
    dropped_torn_lines: list[str] = field(default_factory=list)
    stopped: str | None = None     # why the run stopped early (teacher down), else None
    question_records: list[dict[str, Any]] = field(default_factory=list)   # this run's examples, done
    unit_records: list[dict[str, Any]] = field(default_factory=list)       # this run's examples, done
    rationale_records: list[dict[str, Any]] = field(default_factory=list)  # this run's examples, done


@dataclass
class _Pending:
    task: Task
    ex: Example
    qkey: str
    rt: RationaleOutcome = field(default_factory=RationaleOutcome)
    to_make: list[int] = field(default_factory=list)   # the R_T attempts still to make, in order
    dropped: bool = False          # every R_T attempt made and none correct
    rules: list[ProbeRule] = field(default_factory=list)   # the rules still to run (R_T settled)
    remaining: int = 0

    def unit_keys(self, rules: RuleSet, tfp: str) -> list[str]:
        assert self.rt.text is not None
        return [probe_key(self.ex, r, tfp, self.rt.text) for r in rules.rules]


def replay_rationale(p: _Pending, rs: RationaleSettings, rlog: JsonlStore, tfp: str, retry_failed: int) -> None:
    """Settle p's R_T from the dataset or from the logged attempts, as far as they go: sets p.rt.text
    (the first correct attempt), or p.dropped (all `rs.tries` logged, none correct), or p.to_make: the
    attempts not yet made, and those whose call failed (`call_failed`) fewer than `retry_failed` + 1 times,
    to be made again under the same key."""
    if rs.source == "dataset" and p.ex.rationale:
        p.rt = RationaleOutcome(p.ex.rationale, "dataset")
        return
    for i in range(rs.tries):
        rec = rlog.records.get(rationale_key(p.task, p.ex, tfp, i))
        if rec is None:
            p.to_make += range(i, rs.tries)
            return
        p.rt.attempts.append(rec)
        if rec["correct"]:
            p.rt.text, p.rt.source = rec["response"], "teacher"
            p.to_make = []
            return
        if call_failed(rec) and rec.get("tries", 1) <= retry_failed:
            p.to_make.append(i)
    p.dropped = not p.to_make


def run_pipeline(items: Iterable[tuple[Task, Example]], teacher: Teacher, rules: RuleSet, out_dir: str | Path,
                 *, student: Student | None = None, filters: FilterSettings = FilterSettings(),
                 rationale: RationaleSettings = RationaleSettings(), retry_failed: int = 2,
                 workers: int = 8, student_batch: int = 64, fsync: bool = False,
                 on_total: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Run (or resume) Stage 1 over `items`; see the module docstring for the files written. A probe whose
    teacher calls failed (a broken reply, an error page, no choices) is tried again on later runs until it has
    failed `retry_failed` + 1 times; its question's record is then written again.
    `on_total` gets the number of probes left to compute, again whenever it changes (a question's
    R_T settles, or it is dropped); `on_progress` gets 1 per probe computed."""
    rationale.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log, rlog = open_store(out / LOG_FILE, fsync), open_store(out / RATIONALE_FILE, fsync)
    qset = open_store(out / SET_FILE, fsync)
    res = RunResult(out)
    res.dropped_torn_lines = [str(s.path) for s in (rlog, log, qset) if s.dropped_torn_line]
    student_fp = student.fingerprint if student is not None else None
    tfp = teacher.fingerprint
    n_rules = len(rules.rules)

    if retry_failed < 0:
        raise ValueError(f"retry_failed must be >= 0, got {retry_failed}")

    def retry(k: str) -> bool:
        rec = log.records.get(k)
        return rec is None or (rec["status"] != "ok" and rec.get("tries", 1) <= retry_failed)

    def plan_units(p: _Pending) -> None:
        """p's R_T is settled: the probes still to compute (never done, or failed and still to be retried)."""
        keys = p.unit_keys(rules, tfp)
        p.rules = [r for r, k in zip(rules.rules, keys) if retry(k)]
        p.remaining = len(p.rules)
        res.units_skipped += n_rules - len(p.rules)

    # What is left to do, per example.
    order: list[_Pending] = []
    todo: list[_Pending] = []
    for task, ex in items:
        res.examples += 1
        p = _Pending(task, ex, question_key(ex, rules, tfp, student_fp, filters, rationale))
        replay_rationale(p, rationale, rlog, tfp, retry_failed)
        order.append(p)
        retried = p.to_make if p.rt.text is None else [k for k in p.unit_keys(rules, tfp) if retry(k)]
        if p.qkey in qset.records and not retried:
            res.questions_skipped += 1
            continue
        res.rationale_attempts_skipped += sum(a["attempt"] not in p.to_make for a in p.rt.attempts)
        if p.rt.text is not None:
            plan_units(p)
        todo.append(p)
    # Probes left: exact for a question whose R_T is settled, every rule for one whose R_T is not yet.
    total = sum(p.remaining if p.rt.text is not None else (0 if p.dropped else n_rules) for p in todo)
    if on_total:
        on_total(total)

    def retotal(delta: int) -> None:
        nonlocal total
        total += delta
        if on_total and delta:
            on_total(total)

    ready: list[_Pending] = []

    def flush_ready() -> None:
        if not ready:
            return
        batch = list(ready)
        ready.clear()
        _finish(batch, log, qset, rules, tfp, student, student_fp, filters, rationale, res)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="exgrpo-probe")
    inflight: dict[Future, tuple[str, _Pending]] = {}
    queue = iter(todo)

    def start(p: _Pending) -> None:
        """The next calls for p: an R_T attempt, its probes, or none (then it is ready for filter 2)."""
        if p.dropped or (p.rt.text is not None and not p.rules):
            ready.append(p)
        elif p.rt.text is None:
            i = p.to_make.pop(0)
            fut = pool.submit(run_rationale_attempt, teacher, p.task, p.ex, i, rationale_key(p.task, p.ex, tfp, i))
            inflight[fut] = ("rationale", p)
        else:
            for r, k in zip(p.rules, [probe_key(p.ex, r, tfp, p.rt.text) for r in p.rules]):
                inflight[pool.submit(run_probe_unit, teacher, p.task, p.ex, r, p.rt.text, k)] = ("unit", p)

    def attempt_done(p: _Pending, rec: dict[str, Any]) -> None:
        before = rlog.records.get(rec["key"])
        if before is not None:                      # a failed call made again: it replaces that record
            rec["tries"] = before.get("tries", 1) + 1
            p.rt.attempts = [a for a in p.rt.attempts if a["key"] != rec["key"]]
        rlog.append(rec, replace=before is not None)
        res.rationale_attempts_done += 1
        p.rt.attempts.append(rec)
        p.rt.attempts.sort(key=lambda a: a["attempt"])
        if rec["correct"]:
            p.rt.text, p.rt.source = rec["response"], "teacher"
            p.rt.attempts = [a for a in p.rt.attempts if a["attempt"] <= rec["attempt"]]   # as a replay sees them
            p.to_make = []
            plan_units(p)
            retotal(p.remaining - n_rules)
        elif not p.to_make:
            p.dropped = True            # no probe calls are spent on it
            retotal(-n_rules)
        if not res.stopped or p.dropped:    # a dropped question's record is complete: write it anyway
            start(p)

    try:
        exhausted = False
        while True:
            while not res.stopped and not exhausted and len(inflight) < 2 * max(1, workers):
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                start(nxt)
            if not inflight:
                break
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            interrupted: BaseException | None = None
            for fut in done:
                kind, p = inflight.pop(fut)
                try:
                    value = fut.result()
                except TeacherUnavailable as e:
                    if res.stopped is None:
                        res.stopped = str(e)
                        for f in inflight:  # start nothing new; in-flight calls finish or fail
                            f.cancel()
                    continue
                except BaseException as e:  # Ctrl-C or a bug: first log every other call that returned
                    interrupted = interrupted or e
                    continue
                if kind == "rationale":
                    attempt_done(p, value)
                    continue
                before = log.records.get(value["key"])
                if before is not None:                      # a retry of a failed probe: it replaces that record
                    value["tries"] = before.get("tries", 1) + 1
                log.append(value, replace=before is not None)
                res.units_done += 1
                if on_progress:
                    on_progress(1)
                p.remaining -= 1
                if p.remaining == 0:
                    ready.append(p)
            if interrupted is not None:
                raise interrupted
            inflight = {f: v for f, v in inflight.items() if not f.cancelled()}
            if len(ready) >= student_batch:
                flush_ready()
        flush_ready()
    finally:
        # After a stop the loop above has drained the calls in flight (written if they succeeded);
        # on Ctrl-C this waits for them too, and cancels everything not started.
        pool.shutdown(wait=True, cancel_futures=True)

    for p in order:
        rec = qset.records.get(p.qkey)
        if rec is not None:
            res.question_records.append(rec)
        res.rationale_records += p.rt.attempts
        text = p.rt.text if p.rt.text is not None else (rec or {}).get("rationale")
        if text is not None:
            res.unit_records += [log.records[k] for k in (probe_key(p.ex, r, tfp, text) for r in rules.rules)
                                 if k in log.records]
    return res


def _finish(batch: list[_Pending], log: JsonlStore, qset: JsonlStore, rules: RuleSet, tfp: str,
            student: Student | None, student_fp: str | None, f: FilterSettings, rs: RationaleSettings,
            res: RunResult) -> None:
    """Filter 2 for questions whose probes are all logged, then their probe-set records (a question
    dropped for its R_T gets its record without any student call)."""
    units = {id(p): [] if p.dropped else [log.records[k] for k in p.unit_keys(rules, tfp)] for p in batch}
    texts: dict[str, str] | None = None
    if student is not None:
        asks = [u for p in batch for u in units[id(p)] if u["consistent"]]
        answers = student.answer([probe_prompt(u["probe"], rules) for u in asks]) if asks else []
        if len(answers) != len(asks):
            raise RuntimeError(f"the student returned {len(answers)} answers for {len(asks)} prompts")
        texts = {u["key"]: t for u, t in zip(asks, answers)}
    for p in batch:
        rec = question_record(p.ex, p.qkey, units[id(p)], tfp, student_fp, f, texts, rules=rules,
                              rationale=p.rt, rationale_settings=rs)
        if qset.append(rec, replace=True):                 # replace: a question whose failed probes were retried
            res.questions_written += 1
