"""The EI pipeline with in-process teachers and students: R_T, filters, failures, resume, CLI."""
import dataclasses
import json
import threading
from collections import Counter
from importlib import resources

import pytest

from exgrpo.cli import main as cli_main
from exgrpo.probes import (
    LOG_FILE,
    SET_FILE,
    FilterSettings,
    OracleTeacher,
    Reply,
    difficulty_verdict,
    load_rules,
    read_jsonl,
    run_pipeline,
)
from exgrpo.probes.pipeline import RATIONALE_FILE, RationaleSettings
from exgrpo.probes.store import StoreError, open_store
from exgrpo.probes.summary import render, summarize
from exgrpo.tasks import Example, get_task, synthetic

SYN = get_task("synthetic")
RULES = load_rules()


def _items(n, split="held_in"):
    return [(SYN, e) for e in synthetic.generate(n, split)]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_shipped_rules_are_the_ten_families():
    assert [r.name for r in RULES.rules] == list(synthetic.RULES)
    assert all("{question}" in r.template for r in RULES.rules)
    assert RULES.select(["why", "inverse"]).digest != RULES.digest
    with pytest.raises(ValueError, match="unknown rule"):
        RULES.select(["nope"])


def test_user_rules_file_is_validated(tmp_path):
    p = tmp_path / "rules.json"
    p.write_text(json.dumps({"system": "s", "answer_instruction": "a",
                             "rules": [{"name": "why", "template": "Q {question} {colour}"}]}))
    with pytest.raises(ValueError, match=r"rule 'why' uses unknown placeholder\(s\) \['colour'\]"):
        load_rules(p)
    p.write_text(json.dumps({"system": "s", "answer_instruction": "a",
                             "rules": [{"name": "mine", "template": "Q {question} A {answer}"}]}))
    assert [r.name for r in load_rules(p).rules] == ["mine"]


def test_oracle_run_is_all_correct_and_one_record_per_question(tmp_path):
    res = run_pipeline(_items(12) + _items(6, "ood"), OracleTeacher(), RULES, tmp_path, workers=3)
    recs = _lines(tmp_path / SET_FILE)
    assert len(recs) == 18 and len({r["key"] for r in recs}) == 18
    for q in recs:
        ex = Example.from_dict(q["example"])
        assert q["verdict"] == "kept" and q["n_consistent"] == 10 and q["n_student_correct"] is None
        for p in q["probes"]:
            want = synthetic.oracle_probe(ex, p["rule"])
            assert p["probe"] == want.question and p["probe_answer"] == want.answer and p["kept"]
    assert len(_lines(tmp_path / LOG_FILE)) == 180 and res.units_done == 180
    # R_T is the teacher's (the oracle's worked solution), checked against the gold answer: one attempt each.
    for q in recs:
        ex = Example.from_dict(q["example"])
        assert q["rationale"] == synthetic.rationale_text(ex.meta["program"]) and q["rationale_source"] == "teacher"
        assert [a["correct"] for a in q["rationale_attempts"]] == [True] and q["rationale_note"] is None
        assert all(p["prompt"] == f"{p['probe']}\n{RULES.answer_instruction}" for p in q["probes"])
    assert len(_lines(tmp_path / RATIONALE_FILE)) == 18 and res.rationale_attempts_done == 18


def test_filter1_drops_the_probes_a_slipping_oracle_got_wrong(tmp_path):
    """A fallible oracle (slip_rate 0.3): filter 1's re-check finishes Q from each probe's stated answer, so it
    drops the slipped probes (bar the rare "why" whose wrong operation gives the same count) and keeps the rest."""
    run_pipeline(_items(20) + _items(6, "ood"), OracleTeacher(slip_rate=0.3), RULES, tmp_path, workers=3)
    slipped = kept_slipped = 0
    for u in _lines(tmp_path / LOG_FILE):
        ex = next(e for _, e in _items(20) + _items(6, "ood") if e.id == u["example_id"])
        right = synthetic.oracle_probe(ex, u["rule"]).answer
        assert u["status"] == "ok"
        if u["probe_answer"] != right:
            slipped += 1
            kept_slipped += u["consistent"]
            assert not u["consistent"] or u["rule"] == "why", u
        else:
            assert u["consistent"], u
    assert 0.2 * 260 < slipped < 0.4 * 260 and kept_slipped <= slipped // 10


class FlakyTeacher(OracleTeacher):
    """The oracle, with one kind of bad output per rule."""

    def write_probe(self, task, ex, rule, rationale):
        if rule.name == "why":
            return Reply(None, "malformed response: not JSON")
        if rule.name == "process":
            return Reply("Probe:   ")
        return super().write_probe(task, ex, rule, rationale)

    def answer_probe(self, task, ex, rule, probe):
        if rule.name == "comparison":
            return Reply("I think it is bigger, roughly.")          # no "The answer is"
        if rule.name == "hypothesis":
            raise KeyError("boom")                                  # a bug must not kill the run
        return super().answer_probe(task, ex, rule, probe)

    def recheck(self, task, ex, probe, probe_response):
        if "smallest number" in probe:                              # the assumption probe misleads
            return Reply("The answer is 99999.")
        return super().recheck(task, ex, probe, probe_response)


def test_bad_teacher_output_is_recorded_and_counted(tmp_path):
    res = run_pipeline(_items(5), FlakyTeacher(), RULES, tmp_path, workers=2)
    s = summarize(res.unit_records, res.question_records)
    assert s.by_rule["why"].failed == 5 and s.by_rule["process"].failed == 5
    assert s.by_rule["comparison"].failed == 5 and s.by_rule["hypothesis"].failed == 5
    assert s.by_rule["assumption"].generated == 5 and s.by_rule["assumption"].consistent == 0
    assert s.by_rule["inverse"].kept == 5
    assert s.total.attempted == 50 and s.total.failed == 20 and s.total.consistent == 25
    reasons = dict(s.failures)
    assert reasons["write: malformed response: not JSON"] == 5
    assert reasons["write: empty probe"] == 5
    assert reasons["answer: no extractable answer"] == 5
    assert reasons["internal: KeyError: 'boom'"] == 5
    table = render(s)
    assert "cause_effect" in table and "answer: no extractable answer" in table
    q = res.question_records[0]
    bad = {p["rule"]: p for p in q["probes"]}
    assert bad["why"]["status"] == "failed" and not bad["why"]["kept"]
    assert not bad["assumption"]["consistent"]


@pytest.mark.parametrize("n_cons,n_ok,f,want", [
    (0, None, FilterSettings(), "no_probes"),
    (3, None, FilterSettings(), "kept"),
    (3, 3, FilterSettings(), "too_easy"),
    (3, 0, FilterSettings(), "too_hard"),
    (3, 1, FilterSettings(), "kept"),
    (3, 1, FilterSettings(tau_hard=2), "too_hard"),
    (3, 2, FilterSettings(tau_hard=2), "kept"),
    (3, 3, FilterSettings(drop_too_easy=False), "kept"),
    (3, 2, FilterSettings(hard_direction="printed"), "too_hard"),
    (3, 0, FilterSettings(hard_direction="printed"), "kept"),
    (3, 0, FilterSettings(hard_direction="off"), "kept"),
])
def test_difficulty_verdict(n_cons, n_ok, f, want):
    assert difficulty_verdict(n_cons, n_ok, f) == want


class FakeStudent:
    """Answers a probe correctly iff its recomputed answer is in `good_rules`."""
    fingerprint = "fake-student"

    def __init__(self, good_rules, examples):
        self.good = good_rules
        self.by_q = {}
        for e in examples:
            for r in synthetic.RULES:
                pr = synthetic.oracle_probe(e, r)
                self.by_q[pr.question] = (r, pr.answer)
        self.calls = 0

    def answer(self, prompts):
        self.calls += 1
        out = []
        for p in prompts:
            rule, ans = self.by_q[p.split("\n" + RULES.answer_instruction)[0]]
            out.append(f"The answer is {ans}." if rule in self.good else "The answer is 123456.")
        return out


def test_filter2_with_a_student(tmp_path):
    items = _items(4)
    exs = [e for _, e in items]
    for good, verdict in ((set(synthetic.RULES), "too_easy"), (set(), "too_hard"), ({"why"}, "kept")):
        d = tmp_path / verdict
        st = FakeStudent(good, exs)
        res = run_pipeline(items, OracleTeacher(), RULES, d, student=st, student_batch=2)
        assert {q["verdict"] for q in res.question_records} == {verdict}
        assert st.calls == 2                                     # batched: 4 questions, 2 per call
        q = res.question_records[0]
        assert q["n_student_correct"] == len(good) and q["student"] == "fake-student"
        if verdict == "kept":
            assert [p["rule"] for p in q["probes"] if p["student_correct"]] == ["why"]
            assert all(p["kept"] for p in q["probes"])


def test_resume_skips_done_work_and_redoes_an_edited_rule(tmp_path):
    class Counting(OracleTeacher):
        n = 0

        def write_probe(self, *a):
            Counting.n += 1
            return super().write_probe(*a)

    run_pipeline(_items(5), Counting(), RULES, tmp_path)
    assert Counting.n == 50
    res = run_pipeline(_items(8), Counting(), RULES, tmp_path)
    assert Counting.n == 80 and res.questions_skipped == 5 and res.questions_written == 3
    # Editing one rule's template changes its key: only that rule is redone; the old questions get
    # new records under the new rule set, the old records stay for audit.
    edited = json.loads(resources.files("exgrpo").joinpath("data/probe_rules.json").read_text())
    edited["rules"][0]["template"] += " Be brief."
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(edited))
    res = run_pipeline(_items(8), Counting(), load_rules(p), tmp_path)
    assert Counting.n == 88 and res.units_skipped == 72 and res.questions_written == 8
    keys = [r["key"] for r in _lines(tmp_path / LOG_FILE)]
    assert len(keys) == len(set(keys)) == 88


def test_torn_last_line_is_dropped_and_mid_file_corruption_is_an_error(tmp_path):
    run_pipeline(_items(3), OracleTeacher(), RULES, tmp_path)
    log = tmp_path / LOG_FILE
    with open(log, "ab") as f:
        f.write(b'{"key": "abc", "task": "synth')            # a write cut short by SIGKILL
    assert len(read_jsonl(log)) == 30                         # readers skip it without touching it
    res = run_pipeline(_items(4), OracleTeacher(), RULES, tmp_path)
    assert res.dropped_torn_lines == [str(log)]
    assert log.read_bytes().endswith(b"\n") and len(_lines(log)) == 40
    # A record that is complete but lost its newline is kept.
    data = (tmp_path / SET_FILE).read_bytes()
    (tmp_path / SET_FILE).write_bytes(data[:-1])
    st = open_store(tmp_path / SET_FILE)
    assert len(st.records) == 4 and not st.dropped_torn_line
    lines = log.read_text().splitlines()
    lines[3] = lines[3][:20]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=rf"{LOG_FILE}:4: corrupt record"):
        open_store(log)


def test_cli_with_config_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "probe.toml"
    out = tmp_path / "run"
    cfg.write_text(f'[probe]\nsynthetic_n = 50\nout = "{out}"\nrules = "why,inverse"\nprogress = false\n')
    rc = cli_main(["probe", "--config", str(cfg), "--synthetic-n", "6", "--synthetic-split", "ood"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "inverse" in text and "questions judged: 6" in text and "R_T from: teacher: 6" in text
    assert "6 R_T attempts made, 0 reused" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["synthetic_n"] == 6 and saved["rules"] == "why,inverse" and saved["synthetic_split"] == "ood"
    assert len(_lines(out / SET_FILE)) == 6
    rc = cli_main(["probe", "--config", str(cfg), "--synthetic-n", "6", "--synthetic-split", "ood"])
    assert rc == 0 and "0 written now, 6 already done" in capsys.readouterr().out
    assert len(_lines(out / SET_FILE)) == 6
    # --rationale dataset: the synthetic problems' own worked solutions, a new record per question.
    rc = cli_main(["probe", "--config", str(cfg), "--synthetic-n", "6", "--synthetic-split", "ood",
                   "--rationale", "dataset"])
    assert rc == 0 and "6 written now, 0 already done; 0 R_T attempts made" in capsys.readouterr().out
    assert {r["rationale_source"] for r in _lines(out / SET_FILE)[6:]} == {"dataset"}
    assert json.loads((out / "config.json").read_text())["rationale"] == "dataset"


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"tau_hardd": 2}))
    assert cli_main(["probe", "--config", str(bad)]) == 2
    assert "unknown setting 'tau_hardd'" in capsys.readouterr().err
    assert cli_main(["probe", "--tau-hard", "x", "--out", str(tmp_path / "o")]) == 2
    assert "'tau_hard' must be int" in capsys.readouterr().err
    assert cli_main(["probe", "--task", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["probe", "--rationale", "gold", "--out", str(tmp_path / "o")])
    assert "--rationale: invalid choice: 'gold' (choose from 'teacher', 'dataset')" in capsys.readouterr().err
    assert cli_main(["probe", "--rationale-tries", "0", "--out", str(tmp_path / "o")]) == 2
    assert "rationale tries must be >= 1, got 0" in capsys.readouterr().err
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    assert cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "g.jsonl:2: GSM8K record: invalid JSON" in capsys.readouterr().err
    # skip-and-count: the oracle cannot handle GSM8K, so every call fails (exit 4), recorded with its reason
    rc = cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--skip-bad-lines", "--no-progress",
                   "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 4 and "skipped 1 malformed dataset record" in captured.err
    assert "synthetic oracle cannot handle" in captured.out


# ---------------------------------------------------------------- R_T: from the teacher, checked, or the dataset's

class RTTeacher(OracleTeacher):
    """The oracle, but its solution of Q is wrong on the first `wrong[id]` attempts (every attempt for -1), and
    written in its own words so that it differs from the dataset's rationale. Counts calls per question."""

    def __init__(self, wrong=None):
        super().__init__()
        self.wrong = wrong or {}
        self.lock = threading.Lock()
        self.solves, self.writes = Counter(), Counter()
        self.rationales = {}                      # example id -> the R_T write_probe was given

    def solve(self, task, ex):
        with self.lock:
            self.solves[ex.id] += 1
            n = self.solves[ex.id]
        w = self.wrong.get(ex.id, 0)
        if w == -1 or n <= w:
            return Reply(f"My attempt {n}. The answer is {int(ex.answer) + 1000}.")
        return Reply(f"Teacher's R_T (attempt {n}): " + super().solve(task, ex).text)

    def write_probe(self, task, ex, rule, rationale):
        with self.lock:
            self.writes[ex.id] += 1
            self.rationales[ex.id] = rationale
        return super().write_probe(task, ex, rule, rationale)

    def recheck(self, task, ex, probe, probe_response):
        return OracleTeacher.solve(self, task, ex)    # filter 1 is not what is tested here


def test_rationale_is_resampled_until_gold_and_a_question_without_one_is_dropped(tmp_path):
    items = _items(4)
    ids = [e.id for _, e in items]
    t = RTTeacher({ids[1]: 2, ids[2]: -1})       # ids[1]: right at the 3rd try; ids[2]: never right
    res = run_pipeline(items, t, RULES, tmp_path, workers=3, rationale=RationaleSettings(tries=3))
    q = {r["example_id"]: r for r in res.question_records}
    assert t.solves == {ids[0]: 1, ids[1]: 3, ids[2]: 3, ids[3]: 1}
    ok = q[ids[1]]
    assert ok["verdict"] == "kept" and ok["rationale_source"] == "teacher"
    assert ok["rationale"].startswith("Teacher's R_T (attempt 3): ") and t.rationales[ids[1]] == ok["rationale"]
    assert [(a["attempt"], a["correct"]) for a in ok["rationale_attempts"]] == [(0, False), (1, False), (2, True)]
    assert ok["rationale_attempts"][0]["reason"].startswith("wrong answer ")
    bad = q[ids[2]]
    assert bad["verdict"] == "no_rationale" and not bad["kept"] and bad["rationale"] is None
    assert bad["probes"] == [] and bad["rationale_source"] is None and len(bad["rationale_attempts"]) == 3
    assert all(a["response"].startswith("My attempt") for a in bad["rationale_attempts"])
    assert t.writes[ids[2]] == 0                                   # no probe call is spent on it
    assert not [u for u in _lines(tmp_path / LOG_FILE) if u["example_id"] == ids[2]]
    assert len(_lines(tmp_path / RATIONALE_FILE)) == 8
    s = summarize(res.unit_records, res.question_records, res.rationale_records)
    assert s.verdicts["no_rationale"] == 1 and s.rationale_attempts == 8 and s.rationale_sources["teacher"] == 3
    assert "no_rationale: 1" in render(s) and "R_T attempts not kept, by reason:" in render(s)
    # More tries on the same folder: the dropped question's three attempts are reused, only the 4th is asked.
    t2 = RTTeacher({ids[2]: -1})
    res = run_pipeline(items, t2, RULES, tmp_path, rationale=RationaleSettings(tries=4))
    assert t2.solves == {ids[2]: 1} and res.rationale_attempts_skipped == 8 and res.rationale_attempts_done == 1
    assert sum(t2.writes.values()) == 0 and res.units_skipped == 30


class BrokenSolveTeacher(RTTeacher):
    """RTTeacher whose solve of the questions in `broken` gets no reply at all (a broken JSON body, an error
    page) while `down` is set."""

    def __init__(self, broken):
        super().__init__()
        self.broken, self.down = set(broken), True

    def solve(self, task, ex):
        if self.down and ex.id in self.broken:
            with self.lock:
                self.solves[ex.id] += 1
            return Reply(None, "HTTP 200 with a body that is not JSON")
        return super().solve(task, ex)


def test_a_failed_rationale_call_is_made_again_on_the_next_run_up_to_a_count(tmp_path):
    from exgrpo.dialogues import load_probe_set
    items = _items(3)
    ids = [e.id for _, e in items]
    t = BrokenSolveTeacher({ids[1]})
    rs = RationaleSettings(tries=2)
    run_pipeline(items, t, RULES, tmp_path, rationale=rs, retry_failed=1)
    first = {r["example_id"]: r for r in _lines(tmp_path / SET_FILE)}
    assert first[ids[1]]["verdict"] == "no_rationale" and t.solves[ids[1]] == 2      # both tries were calls that failed
    assert [a["reason"] for a in first[ids[1]]["rationale_attempts"]] == ["HTTP 200 with a body that is not JSON"] * 2
    t.down = False                                                 # the server is fixed: the next run asks again
    t.solves.clear()
    res = run_pipeline(items, t, RULES, tmp_path, rationale=rs, retry_failed=1)
    assert t.solves == {ids[1]: 1} and res.rationale_attempts_done == 1 and res.questions_written == 1
    again = {r["example_id"]: r for r in _lines(tmp_path / SET_FILE)}[ids[1]]      # the later line stands
    assert again["verdict"] == "kept" and again["rationale"].startswith("Teacher's R_T")
    assert [(a["attempt"], a["correct"]) for a in again["rationale_attempts"]] == [(0, True)]
    assert ids[1] in {it.example.id for it in load_probe_set(tmp_path)}
    lines = [(r["attempt"], r.get("tries", 1), r["correct"]) for r in _lines(tmp_path / RATIONALE_FILE)
             if r["example_id"] == ids[1]]
    assert lines == [(0, 1, False), (1, 1, False), (0, 2, True)]          # appended; the later line wins
    t.solves.clear()
    res = run_pipeline(items, t, RULES, tmp_path, rationale=rs, retry_failed=1)
    assert not t.solves and res.questions_written == 0              # settled: nothing asked again
    # A call that keeps failing is made retry_failed + 1 times in all, however often the run is repeated.
    t2 = BrokenSolveTeacher({ids[0]})
    other = tmp_path / "o"
    for _ in range(4):
        run_pipeline(items[:1], t2, RULES, other, rationale=rs, retry_failed=1)
    assert t2.solves[ids[0]] == 4                                  # 2 tries x (1 + 1 retry)
    assert [(r["attempt"], r.get("tries", 1)) for r in _lines(other / RATIONALE_FILE)] == [(0, 1), (1, 1), (0, 2),
                                                                                          (1, 2)]


def test_rationale_dataset_uses_the_datasets_own_and_falls_back_to_the_teacher(tmp_path):
    exs = [e for _, e in _items(3)]
    no_rt = dataclasses.replace(exs[2], id="no-rt", rationale=None)
    items = [(SYN, e) for e in exs[:2] + [no_rt]]
    t = RTTeacher()
    res = run_pipeline(items, t, RULES, tmp_path / "ds", rationale=RationaleSettings("dataset"))
    q = {r["example_id"]: r for r in res.question_records}
    for e in exs[:2]:
        assert q[e.id]["rationale"] == e.rationale and q[e.id]["rationale_source"] == "dataset"
        assert q[e.id]["rationale_attempts"] == [] and q[e.id]["rationale_note"] is None
        assert t.rationales[e.id] == e.rationale and t.solves[e.id] == 0   # the probes were written from it
    fb = q["no-rt"]
    assert fb["rationale_source"] == "teacher" and fb["rationale"].startswith("Teacher's R_T")
    assert "no rationale" in fb["rationale_note"] and fb["rationale_settings"] == {"source": "dataset", "tries": 3}
    assert t.rationales["no-rt"] == fb["rationale"]
    # "teacher" (the default) on a dataset that has rationales: the teacher's, and different question and
    # probe keys, so nothing written from the dataset's R_T is reused for it.
    t2 = RTTeacher()
    res = run_pipeline(items, t2, RULES, tmp_path / "ds", rationale=RationaleSettings("teacher"))
    assert res.questions_written == 3 and res.units_skipped == 10 and res.units_done == 20
    for r in res.question_records[-3:]:
        assert r["rationale_source"] == "teacher" and r["rationale"].startswith("Teacher's R_T")


class KilledTeacher(RTTeacher):
    """Dies (as a KeyboardInterrupt from inside a teacher call, like Ctrl-C) at its `kill_at`-th solve."""

    def __init__(self, kill_at, wrong):
        super().__init__(wrong)
        self.kill_at = kill_at

    def solve(self, task, ex):
        if sum(self.solves.values()) + 1 == self.kill_at:
            raise KeyboardInterrupt("killed during the R_T stage")
        return super().solve(task, ex)


def test_resume_after_a_kill_during_the_rationale_stage_loses_and_repeats_nothing(tmp_path):
    items = _items(6)
    ids = [e.id for _, e in items]
    wrong = {ids[0]: -1, ids[1]: 1, ids[3]: 2, ids[4]: -1}     # attempts needed: 3, 2, 1, 3, 3, 1 = 13
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(items, KilledTeacher(7, wrong), RULES, tmp_path, workers=1, rationale=RationaleSettings())
    before = _lines(tmp_path / RATIONALE_FILE)
    assert len(before) == 6                                    # every attempt that returned is in the log
    t = RTTeacher({i: (w - sum(1 for r in before if r["example_id"] == i) if w > 0 else w) for i, w in wrong.items()})
    res = run_pipeline(items, t, RULES, tmp_path, workers=2)
    assert res.rationale_attempts_skipped == 6 and res.rationale_attempts_done == sum(t.solves.values()) == 13 - 6
    log = _lines(tmp_path / RATIONALE_FILE)
    assert len(log) == len({r["key"] for r in log}) == 13
    for i in ids:                                              # attempts 0, 1, ... in order, up to the first right
        mine = [r for r in log if r["example_id"] == i]
        assert [r["attempt"] for r in mine] == list(range(len(mine)))
        assert [r["correct"] for r in mine] == [False] * (len(mine) - 1) + [wrong.get(i, 0) != -1]
    q = {r["example_id"]: r for r in _lines(tmp_path / SET_FILE)}
    assert len(q) == 6 and {i for i, r in q.items() if r["verdict"] == "no_rationale"} == {ids[0], ids[4]}
    units = _lines(tmp_path / LOG_FILE)
    assert len(units) == len({u["key"] for u in units}) == 40


def test_cli_field_mapping_and_a_file_with_nothing_readable(tmp_path, capsys):
    data = tmp_path / "copy.jsonl"
    data.write_text('{"question": "1+1?", "label": "#### 2"}\n')
    out = tmp_path / "o"
    assert cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--out", str(out), "--skip-bad-lines"]) == 2
    err = capsys.readouterr().err
    assert "if 'label' holds it, pass --field answer=label" in err and "no example could be read" in err
    assert not (out / "probe_set.jsonl").exists()
    # mapped, the record loads; the oracle cannot serve gsm8k, so every call fails: a non-zero exit naming why
    rc = cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--out", str(out), "--field", "answer=label",
                   "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 4 and "1 questions" in cap.out
    assert "every teacher call of this run failed; the commonest error: R_T: " in cap.err
    assert "the synthetic oracle cannot handle example" in cap.err
