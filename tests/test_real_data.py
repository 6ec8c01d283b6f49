"""The samples of the real public dataset files (../shared/real-data/<dataset>/, each with a SOURCE.txt):
every file loads whole, each gold answer written as models write it is judged right and a wrong one wrong,
`exgrpo eval --outputs` scores a file of right answers 100 %, and `exgrpo data` reports each file.

These files are reference data kept outside the repository; set EXGRPO_REAL_DATA to read them elsewhere.
"""
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from exgrpo.cli import main
from exgrpo.tasks import get_task, load_examples
from exgrpo.tasks.answers import format_number, parse_number
from exgrpo.tasks.example import LETTERS

REAL = Path(os.environ.get("EXGRPO_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "real-data")
if not REAL.is_dir():
    pytest.skip(f"the real dataset samples are not at {REAL} (set EXGRPO_REAL_DATA)", allow_module_level=True)

FILES = sorted((d.name, f) for d in REAL.iterdir() if d.is_dir() for f in sorted(d.iterdir())
               if f.name != "SOURCE.txt")
IDS = [f"{task}/{f.name}" for task, f in FILES]


def _record_count(path: Path) -> int:
    """How many records the file holds, counted without the loader."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return sum(1 for line in text.splitlines() if line.strip())       # JSON Lines
    return len(doc["examples"]) if isinstance(doc, dict) and "examples" in doc else len(doc)


def test_every_dataset_of_the_paper_with_a_real_file_is_here():
    assert {t for t, _ in FILES} == {"anli", "arc_challenge", "boolq", "commonsenseqa", "date_understanding",
                                     "gsm8k", "gsm8k_reversal", "math", "strategyqa", "tabmwp"}


@pytest.mark.parametrize("task,path", FILES, ids=IDS)
def test_loads_whole(task, path):
    res = load_examples(task, path)
    assert len(res.examples) == _record_count(path) == 30 and not res.skipped
    letter = get_task(task).answer_format == "letter"
    for e in res.examples:
        assert e.question.strip() and e.answer.strip()
        if letter:
            assert len(e.choices) >= 2 and e.answer in LETTERS[: len(e.choices)]


# ---------------------------------------------------------------- answers as models write them

def _phrasings(task, e):
    """Three ways a model states the gold answer."""
    g = e.answer
    f = task.answer_format
    if f == "letter":
        return [f"Let me check each option. So the answer is ({g}).", f"answer: {g}",
                f"So the best option is {g}: {e.choices[LETTERS.index(g)]}."]
    if f == "yes_no":
        return [f"Thinking it through, the answer is {g}.", f"Answer: {g.capitalize()}", f"**{g.capitalize()}**"]
    if f == "number":
        v = parse_number(g)
        spelled = f"{v.numerator:,}" if v.denominator == 1 else g
        return [f"Adding up, the answer is {spelled}.", f"So she has {g} left.\n#### {g}", f"$\\boxed{{{g}}}$"]
    if f == "boxed":
        return [f"Working it out, so the answer is $\\boxed{{{g}}}$.", f"The answer is ${g}$.",
                f"Final Answer: The final answer is ${g}$. I hope it is correct."]
    return [f"The answer is {g}.", f"Answer: {g}", f"Looking at the table, the answer is \\boxed{{{g}}}."]


def _wrong(task, e, others):
    """An answer that is not the gold one."""
    f = task.answer_format
    if f == "letter":
        return f"The answer is ({LETTERS[(LETTERS.index(e.answer) + 1) % len(e.choices)]})."
    if f == "yes_no":
        return f"The answer is {'no' if e.answer == 'yes' else 'yes'}."
    v = parse_number(e.answer)
    if v is not None:
        return f"The answer is {format_number(v + Fraction(1))}."
    other = next(o for o in others if not task.is_correct(o, e.answer))
    return f"The answer is $\\boxed{{{other}}}$." if f == "boxed" else f"The answer is {other}."


@pytest.mark.parametrize("task_name,path", FILES, ids=IDS)
def test_gold_in_three_phrasings_is_right_and_a_wrong_answer_is_wrong(task_name, path):
    task = get_task(task_name)
    exs = load_examples(task_name, path).examples
    golds = [e.answer for e in exs]
    missed = []
    for e in exs:
        for text in _phrasings(task, e):
            if not task.is_correct(task.extract(text, e), e.answer):
                missed.append((e.id, text, task.extract(text, e)))
        wrong = _wrong(task, e, golds)
        assert not task.is_correct(task.extract(wrong, e), e.answer), (e.id, wrong)
    assert not missed, f"{len(missed)} of {3 * len(exs)} judged wrong: {missed[:5]}"


@pytest.mark.parametrize("task_name,path", FILES, ids=IDS)
def test_eval_scores_a_file_of_right_answers_100_percent(task_name, path, tmp_path, capsys):
    task = get_task(task_name)
    exs = load_examples(task_name, path).examples
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(json.dumps({"id": e.id, "output": _phrasings(task, e)[i % 3]}) + "\n"
                             for i, e in enumerate(exs)))
    wrong.write_text("".join(json.dumps({"id": e.id, "output": _wrong(task, e, [x.answer for x in exs])}) + "\n"
                             for e in exs))
    for outputs, want in ((right, 1.0), (wrong, 0.0)):
        rc = main(["eval", "--task", task_name, "--data", str(path), "--outputs", str(outputs),
                   "--out", str(tmp_path / "report.json")])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["results"][0]["n"] == 30 and report["results"][0]["accuracy"] == want


# ---------------------------------------------------------------- Date Understanding's options

def _gold_letters(path: Path) -> str:
    code = ("import sys; from exgrpo.tasks import load_examples; "
            "print(''.join(e.answer for e in load_examples('date_understanding', sys.argv[1]).examples))")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": "random"}).stdout.strip()


def test_bigbench_date_understanding_gold_letters_are_spread_and_stable():
    path = REAL / "date_understanding" / "task.json"
    source = json.loads(path.read_text())["examples"]
    assert sum(next(iter(x["target_scores"].values())) == 1 for x in source) >= 29   # the source: gold first
    letters = _gold_letters(path)
    assert len(letters) == 30 and max(letters.count(x) for x in set(letters)) <= 0.4 * len(letters)
    assert _gold_letters(path) == letters                                            # a rerun, a new process
    exs = load_examples("date_understanding", path).examples
    for e, src in zip(exs, source):                                                   # gold follows its text
        right = next(t for t, s in src["target_scores"].items() if s)
        assert e.choices[LETTERS.index(e.answer)] == right


# ---------------------------------------------------------------- exgrpo data

@pytest.mark.parametrize("task_name,path", FILES, ids=IDS)
def test_exgrpo_data_reports_each_file(task_name, path, capsys):
    assert main(["data", task_name, str(path)]) == 0
    out = capsys.readouterr().out
    assert "30 examples, 0 records skipped" in out and out.count("--- prompt (id ") == 3
    assert get_task(task_name).instruction in out
    if path.name == "task.json" and task_name == "date_understanding":
        assert "note: options shuffled in 30 of 30 questions" in out


def test_exgrpo_data_warns_on_a_skewed_multiple_choice_set(capsys):
    # the ANLI sample is sorted by label: its first 8 questions are all entailment (A)
    assert main(["data", "anli", str(REAL / "anli" / "test.jsonl"), "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "warning: gold letter A answers 8 of 8 multiple-choice questions (100%)" in out
    assert main(["data", "anli", str(REAL / "anli" / "test.jsonl")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_exgrpo_data_names_the_mapping_that_would_fix_a_copy(capsys):
    assert main(["data", "gsm8k", str(REAL / "boolq" / "test.jsonl")]) == 2
    out = capsys.readouterr().out
    assert "30 x missing field 'answer'; the record has question, passage, label, id; " \
           "if 'label' holds it, pass --field answer=label" in out
    assert "boolq/test.jsonl:1" in out
