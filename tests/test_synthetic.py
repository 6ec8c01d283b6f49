"""The synthetic task: deterministic generation, correct rationales, correct oracle probes."""
import re

import pytest

from exgrpo.tasks import Example, get_task
from exgrpo.tasks import synthetic as syn
from exgrpo.tasks.answers import extract_short, short_equal

_EQ = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)")


def _check_arithmetic(text: str) -> int:
    """Every "a op b = c" in the text must be true; returns how many there were."""
    n = 0
    for a, op, b, c in _EQ.findall(text):
        a, b, c = int(a), int(b), int(c)
        if op == "/":
            assert b != 0 and a % b == 0, f"inexact division in {text!r}"
            want = a // b
        else:
            want = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert want == c, f"wrong arithmetic {a} {op} {b} = {c} in {text!r}"
        n += 1
    return n


def test_deterministic_and_index_addressable():
    a = syn.generate(30, "held_in", seed=3)
    b = syn.generate(30, "held_in", seed=3)
    assert a == b
    assert syn.generate(5, "held_in", seed=3, start=10) == a[10:15]
    assert syn.generate(30, "held_in", seed=4) != a
    assert len({e.id for e in a}) == 30


@pytest.mark.parametrize("split", ["held_in", "ood"])
def test_gold_and_rationale_are_right(split):
    task = get_task("synthetic")
    for e in syn.generate(200, split, seed=1):
        p = e.meta["program"]
        s = syn.states(p)
        assert all(v >= 0 for v in s)
        want = s[0] if p["reverse"] else s[-1]
        assert e.answer == str(want)
        # the gold rationale solves the question, with true arithmetic, one equation per step
        assert _check_arithmetic(e.rationale) == len(p["steps"])
        assert task.is_correct(task.extract(e.rationale, e), e.answer)
        assert set(e.question + e.rationale) <= set(syn.CHARSET)


def test_splits_differ_as_documented():
    held = syn.generate(300, "held_in")
    ood = syn.generate(300, "ood")
    assert all(2 <= len(e.meta["program"]["steps"]) <= 3 and not e.meta["program"]["reverse"] for e in held)
    assert max(max(syn.states(e.meta["program"])) for e in held) <= 99
    kinds = {k: [e for e in ood if e.meta["kind"] == k] for k in syn.OOD_KINDS}
    assert all(len(v) == 100 for v in kinds.values())
    assert all(len(e.meta["program"]["steps"]) >= 4 for e in kinds["ood_steps"])
    held_words = {w for e in held for w in re.findall(r"[A-Za-z]+", e.question)}
    assert all(e.question.split()[0] not in held_words for e in kinds["ood_names"])     # an unseen person
    assert all(e.question.split()[2] not in held_words for e in kinds["ood_names"])     # and an unseen item
    assert all(e.meta["program"]["reverse"] and "at the start?" in e.question for e in kinds["ood_reverse"])
    assert not {e.question for e in held} & {e.question for e in ood}


def test_make_splits_has_no_train_test_overlap():
    sp = syn.make_splits(200, 50, 30, seed=0)
    assert len(sp["test"]) == 50 and len(sp["ood"]) == 30
    assert not {e.question for e in sp["train"]} & {e.question for e in sp["test"]}


def _recompute(e, probe) -> str:
    """The probe's answer, recomputed from the program and the probe's own parameters,
    independently of the oracle's text."""
    p = e.meta["program"]
    s = syn.states(p)
    n = len(p["steps"])
    j = 1 if p["reverse"] else n - 1                       # the state next to the known end
    r, prm = probe.rule, probe.params
    if r == "why":
        return {"add": "add", "sub": "subtract", "mul": "multiply"}[p["steps"][prm["step"]][0]]
    if r == "cause_effect":
        return str(s[prm["step"] + 1] - s[prm["step"]])
    if r == "process":
        return str(s[n - 1] if p["reverse"] else s[1])
    if r == "counterfactual":
        if p["reverse"]:   # search the start whose run ends at new_end, then run it one step
            x = next(x for x in range(0, 10 ** 5) if syn.states({**p, "start": x})[-1] == prm["new_end"])
            return str(syn.states({**p, "start": x})[1])
        return str(syn.states({**p, "start": prm["new_start"]})[n - 1])
    if r == "comparison":
        return str(s[n] - s[1] if p["reverse"] else s[n - 1] - s[0])
    if r == "hypothesis":
        return "yes" if s[j] > prm["threshold"] else "no"
    if r == "decomposition":
        return str(s[j])
    if r == "explanatory_challenge":
        return "yes" if s[prm["step"] + 1] == prm["claim"] else "no"
    if r == "inverse":
        return str(s[n] if p["reverse"] else s[0])
    if r == "assumption":
        return str(min(s[1:n]))
    raise AssertionError(r)


@pytest.mark.parametrize("split", ["held_in", "ood"])
def test_oracle_probes_are_all_correct(split):
    seen_answers = {r: set() for r in syn.RULES}
    for e in syn.generate(60, split, seed=2):
        for rule in syn.RULES:
            pr = syn.oracle_probe(e, rule)
            assert pr == syn.oracle_probe(e, rule)          # deterministic
            assert pr.answer == _recompute(e, pr), (rule, pr)
            assert short_equal(extract_short(pr.response), pr.answer)
            _check_arithmetic(pr.response)
            assert pr.question.strip().endswith("?")
            assert set(pr.question + pr.response) <= set(syn.CHARSET)
            seen_answers[rule].add(pr.answer)
    # yes/no rules must produce both verdicts, or they test nothing
    assert seen_answers["hypothesis"] >= {"yes", "no"}
    assert seen_answers["explanatory_challenge"] >= {"yes", "no"}


def _with_other_end(e):
    """The same example (same id, so the same probe choices) with the answer changed and everything the
    probes may use kept: forward problems get another amount in their last add/sub step; reversed ones
    another first add/sub step and the start that keeps every later count."""
    p = e.meta["program"]
    steps = [list(x) for x in p["steps"]]
    i = 0 if p["reverse"] else len(steps) - 1
    if steps[i][0] == "mul":
        return None
    s = syn.states(p)
    for m in range(1, 10):
        if m == steps[i][1]:
            continue
        steps[i][1] = m
        if p["reverse"]:
            start = s[1] - m if steps[i][0] == "add" else s[1] + m
            if start < 0:
                continue
            q = {**p, "start": start, "steps": steps}
        else:
            q = {**p, "steps": steps}
            if syn.states(q)[-1] < 0:
                continue
        return Example(e.id, e.task, syn.question_text(q), str(syn.answer_of(q)), (), syn.rationale_text(q),
                       {**e.meta, "program": q})
    return None


@pytest.mark.parametrize("split", ["held_in", "ood"])
def test_no_probe_states_or_needs_the_answer(split):
    """A probe depends only on the counts strictly between the start and the end: change the answer (and
    nothing a probe may use) and every probe's own text, worked answer and answer stay the same."""
    tested = 0
    for e in syn.generate(80, split, seed=4):
        f = _with_other_end(e)
        if f is None:
            continue
        assert f.answer != e.answer
        for rule in syn.RULES:
            a, b = syn.oracle_probe(e, rule), syn.oracle_probe(f, rule)
            assert a.question.split("\n", 1)[1] == b.question.split("\n", 1)[1], rule
            assert (a.response, a.answer) == (b.response, b.answer), rule
            tested += 1
    assert tested >= 200


@pytest.mark.parametrize("split", ["held_in", "ood"])
def test_through_probe_finishes_from_the_probe_answer(split):
    """Filter 1's oracle re-check: the right probe answer leads to the gold answer; a slipped one (see
    OracleTeacher) to a wrong answer or none, except where the problem cannot tell them apart."""
    from exgrpo.probes.teachers import slip
    caught = passed = 0
    for e in syn.generate(60, split, seed=5):
        for rule in syn.RULES:
            pr = syn.oracle_probe(e, rule)
            assert str(syn.through_probe(e, rule, pr.answer)) == e.answer, (rule, pr)
            assert syn.through_probe(e, rule, None) is None
            wrong = syn.through_probe(e, rule, slip(pr.answer))
            if wrong is None or str(wrong) != e.answer:
                caught += 1
            else:
                passed += 1
                assert rule == "why"        # add n and multiply by n can agree (2 + 2 = 2 * 2)
    assert caught >= 20 * passed


def test_oracle_rejects_non_synthetic_examples():
    from exgrpo.tasks import Example
    with pytest.raises(ValueError, match="no synthetic program"):
        syn.oracle_probe(Example("x", "gsm8k", "q", "1"), "why")
    with pytest.raises(ValueError, match="unknown rule"):
        syn.oracle_probe(syn.generate(1)[0], "nonsense")
