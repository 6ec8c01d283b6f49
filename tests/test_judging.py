"""Answers judged as the field judges them.

MATH: the real MATH-500 sample (../shared/real-data/math/), each gold answer in the three phrasings models use, is
judged right, and another record's (non-equivalent) gold is judged wrong; the table of what counts as the same MATH
answer (README "What counts as the same answer"); judging is safe in worker threads, leaves the caller's alarms
alone, and is quick and bounded on answers sympy could spend forever on.
"""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from exgrpo.tasks import answers, get_task, load_examples

REAL = Path(os.environ.get("EXGRPO_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "real-data")
MATH_FILES = ["math500_test.jsonl", "processed_test_.jsonl"]
needs_real = pytest.mark.skipif(not (REAL / "math").is_dir(),
                                reason=f"the real MATH samples are not at {REAL / 'math'} (set EXGRPO_REAL_DATA)")
MATH = get_task("math")


def _phrasings(gold: str) -> list[str]:
    """The three ways a model states a MATH answer: boxed, "The answer is $x$.", Minerva / lm-eval's phrasing."""
    return [f"We simplify, and so the answer is $\\boxed{{{gold}}}$.",
            f"The answer is ${gold}$.",
            f"Final Answer: The final answer is ${gold}$. I hope it is correct."]


def _examples(name: str):
    exs = load_examples("math", REAL / "math" / name).examples
    assert len(exs) == 30
    return exs


def _not_equivalent(exs, i: int) -> str:
    """Another record's gold that is not the same answer as record i's, either way round."""
    gold = exs[i].answer
    for k in range(1, len(exs)):
        other = exs[(i + k) % len(exs)].answer
        if not answers.math_equal(other, gold) and not answers.math_equal(gold, other):
            return other
    raise AssertionError(f"no other gold differs from {gold!r}")


@needs_real
@pytest.mark.parametrize("name", MATH_FILES)
@pytest.mark.parametrize("phrasing", [0, 1, 2], ids=["boxed", "the-answer-is", "final-answer-minerva"])
def test_every_gold_in_each_phrasing_is_judged_right(name, phrasing):
    exs = _examples(name)
    right = 0
    for e in exs:
        pred = MATH.extract(_phrasings(e.answer)[phrasing], e)
        assert pred == answers.normalize_math(e.answer), (e.id, pred)       # the whole answer, nothing more
        right += MATH.is_correct(pred, e.answer)
    assert right == 30


@needs_real
@pytest.mark.parametrize("name", MATH_FILES)
def test_another_records_gold_is_judged_wrong(name):
    exs = _examples(name)
    for i, e in enumerate(exs):
        other = _not_equivalent(exs, i)
        for text in _phrasings(other):
            assert not MATH.is_correct(MATH.extract(text, e), e.answer), (e.id, text)


@needs_real
def test_neighbouring_golds_that_are_the_same_answer_are_seen_as_such():
    """MATH-500 has "5" and "x=5" as golds of two records: the wrong-answer test above must skip such a pair."""
    golds = [e.answer for e in _examples("math500_test.jsonl")]
    assert "5" in golds and "x=5" in golds
    assert answers.math_equal("x=5", "5") and answers.math_equal("5", "x=5")


# ---------------------------------------------------------------- what counts as the same MATH answer

SAME = [  # (gold, prediction)
    ("\\dfrac{3}{4}", "\\frac34"),                         # \dfrac, \tfrac, \frac{3}{4}, \frac34
    ("\\frac{1}{2}", "0.5"),                               # a fraction and its decimal
    ("\\frac{1}{3}", "0.333333"),                          # a decimal to 6 significant places
    ("\\frac{14}{3}", "4\\frac{2}{3}"),                    # a mixed number
    ("\\frac{14}{3}", "14/3"),
    ("1,\\!000", "1000"),                                  # thousands separators
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("[1,2)", "[1, 2)"),                                   # spacing
    ("\\{1,2\\}", "\\{2,1\\}"),                            # a set in any order
    ("7,9,12,13", "13, 12, 9, 7"),                         # a list of solutions in any order
    ("x \\le 3", "(-\\infty, 3]"),                         # an interval for an inequality gold
    ("5\\text{ cm}", "5"), ("5", "5\\text{ cm}"),          # units after a number are dropped ...
    ("5\\text{ cm}", "5\\text{ m}"),                       # ... whatever they are
    ("90^\\circ", "90"), ("90", "90^{\\circ}"),            # a degree sign
    ("x=5", "5"), ("5", "x=5"), ("x=5", "y=5"),           # a one-letter "x =" prefix, its letter ignored
    ("10\\%", "10"),                                       # a percent sign
    ("\\$5.00", "5"),                                      # dollars
    ("\\text{Evelyn}", "evelyn"), ("\\text{(C)}", "C"),    # a text answer, any case, \text{} or not
    ("p - q", "-q + p"), ("6 - 5i", "-5i+6"),              # reordered terms
    ("2\\sqrt{2}", "\\sqrt{8}"), ("3\\sqrt{13}", "\\sqrt{117}"),
    ("x^2+2x+1", "(x+1)^2"),                               # algebraically equal expressions
    ("\\pi r^2", "r^2 \\pi"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("1024", "2^{10}"), ("252", "\\binom{10}{5}"),
]
DIFFERENT = [
    ("(1,-2)", "(-2,1)"),                                  # tuples and points keep their order
    ("(1,4)", "(4,1)"),
    ("[1,2)", "[1,2]"),                                    # intervals keep their ends
    ("(-\\infty,3]", "x \\le 3"),                          # an inequality for an interval gold
    ("\\frac{1}{3}", "0.33"),                              # a rounded decimal
    ("3\\sqrt{13}", "10.82"), ("\\pi", "3.14159"),
    ("\\frac{14}{3}", "4.\\overline{6}"),                  # repeating-decimal notation is not read
    ("90^\\circ", "\\frac{\\pi}{2}"),                      # degrees and radians
    ("10\\%", "0.1"), ("0.1", "10\\%"),                    # a percentage and its fraction
    ("2", "\\sqrt{2}"), ("2", "2\\pi"), ("2", "x^2"),      # a number inside an expression is not the number
    ("p - q", "q - p"),
    ("\\text{(C)}", "(B)"),
    ("5", "4"),
]


@pytest.mark.parametrize("gold,pred", SAME)
def test_same_answer(gold, pred):
    assert answers.math_equal(pred, gold)


@pytest.mark.parametrize("gold,pred", DIFFERENT)
def test_different_answer(gold, pred):
    assert not answers.math_equal(pred, gold)


def test_the_table_needs_math_verify():
    """Part of SAME is only equal as mathematics (not as normalised strings or plain numbers): the library is used."""
    for gold, pred in [("2\\sqrt{2}", "\\sqrt{8}"), ("x^2+2x+1", "(x+1)^2"), ("\\{1,2\\}", "\\{2,1\\}")]:
        assert answers.normalize_math(gold) != answers.normalize_math(pred)
        assert answers._verified(answers.normalize_math(gold), answers.normalize_math(pred))


# ---------------------------------------------------------------- threads, alarms, bounded work

def test_judging_in_worker_threads_gives_the_same_verdicts():
    """The probe pipeline calls is_correct from worker threads, where SIGALRM time-outs cannot be set."""
    cases = [(g, p) for g, p in SAME + DIFFERENT] * 4
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda c: answers.math_equal(c[1], c[0]), cases))
    assert threaded == [answers.math_equal(p, g) for g, p in cases]
    assert threaded == ([True] * len(SAME) + [False] * len(DIFFERENT)) * 4


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="no SIGALRM on this platform")
def test_judging_leaves_the_callers_alarm_alone():
    assert threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.alarm(100)
        assert answers.math_equal("\\sqrt{18}", "3\\sqrt{2}")            # through math-verify
        left = signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert left > 90, "math-verify's time-out cancelled the caller's alarm"


@pytest.mark.parametrize("pred", [
    "9^{9^{9}}", "9^{999999999}", "10^{-10^{8}}", "(10^{100})!", "1000000!", "\\binom{10^{9}}{10^{6}}",
    "(x+1)^{1000}", "\\prod_{k=1}^{10^{9}} k", "\\sum_{k=1}^{100000} k^{k}", "{" * 60 + "x" + "}" * 60,
])
def test_answers_sympy_could_spend_forever_on_are_refused_quickly(pred):
    """Without time-outs these take from seconds to hours in sympy; they are compared as strings instead."""
    answers.math_equal("1", "2")                       # math-verify imported and warm
    t = time.perf_counter()
    assert not answers.math_equal(pred, "5")
    assert time.perf_counter() - t < 2.0
    assert answers.math_equal(pred, pred)              # still right when written exactly as the gold


@needs_real
def test_judging_the_math500_sample_is_fast():
    exs = _examples("math500_test.jsonl")
    t = time.perf_counter()
    for i, e in enumerate(exs):
        for text in _phrasings(e.answer) + _phrasings(exs[(i + 1) % 30].answer):
            MATH.is_correct(MATH.extract(text, e), e.answer)
    assert time.perf_counter() - t < 30.0              # about 1 s cold on one core
