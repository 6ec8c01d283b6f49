"""The synthetic task: deterministic generation, correct rationales, correct oracle probes."""
import re

import pytest

from exgrpo.tasks import get_task
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
    assert all(e.meta["program"]["start"] >= 100 for e in kinds["ood_numbers"])
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
    r, prm = probe.rule, probe.params
    if r == "why":
        return {"add": "add", "sub": "subtract", "mul": "multiply"}[p["steps"][prm["step"]][0]]
    if r == "cause_effect":
        return str(s[prm["step"] + 1] - s[prm["step"]])
    if r == "process":
        return str(s[1])
    if r == "counterfactual":
        if p["reverse"]:
            # search the start whose run ends at new_end
            return str(next(x for x in range(0, 10 ** 5)
                            if syn.states({**p, "start": x})[-1] == prm["new_end"]))
        return str(syn.states({**p, "start": prm["new_start"]})[-1])
    if r == "comparison":
        return str(s[-1] - s[0])
    if r == "hypothesis":
        return "yes" if (s[0] if p["reverse"] else s[-1]) > prm["threshold"] else "no"
    if r == "decomposition":
        return str(s[-2])
    if r == "explanatory_challenge":
        return "yes" if s[prm["step"] + 1] == prm["claim"] else "no"
    if r == "inverse":
        return str(s[-1] if p["reverse"] else s[0])
    if r == "assumption":
        return str(min(s))
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


def test_oracle_rejects_non_synthetic_examples():
    from exgrpo.tasks import Example
    with pytest.raises(ValueError, match="no synthetic program"):
        syn.oracle_probe(Example("x", "gsm8k", "q", "1"), "why")
    with pytest.raises(ValueError, match="unknown rule"):
        syn.oracle_probe(syn.generate(1)[0], "nonsense")
