"""The EI pipeline with in-process teachers and students: filters, failures, resume, CLI."""
import json
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
    assert "inverse" in text and "questions judged: 6" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["synthetic_n"] == 6 and saved["rules"] == "why,inverse" and saved["synthetic_split"] == "ood"
    assert len(_lines(out / SET_FILE)) == 6
    rc = cli_main(["probe", "--config", str(cfg), "--synthetic-n", "6", "--synthetic-split", "ood"])
    assert rc == 0 and "0 written now, 6 already done" in capsys.readouterr().out
    assert len(_lines(out / SET_FILE)) == 6


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"tau_hardd": 2}))
    assert cli_main(["probe", "--config", str(bad)]) == 2
    assert "unknown setting 'tau_hardd'" in capsys.readouterr().err
    assert cli_main(["probe", "--tau-hard", "x", "--out", str(tmp_path / "o")]) == 2
    assert "'tau_hard' must be int" in capsys.readouterr().err
    assert cli_main(["probe", "--task", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "needs --data" in capsys.readouterr().err
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    assert cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "g.jsonl:2: GSM8K record: invalid JSON" in capsys.readouterr().err
    # skip-and-count: the oracle cannot handle GSM8K, so the probe fails, recorded with its reason
    rc = cli_main(["probe", "--task", "gsm8k", "--data", str(data), "--skip-bad-lines", "--no-progress",
                   "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped 1 malformed dataset record" in captured.err
    assert "synthetic oracle cannot handle" in captured.out
