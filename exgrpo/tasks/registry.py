"""The task registry: for each of the paper's 12 datasets (and the embedded synthetic task), its
loader, answer-format instruction, extractor and comparison.

    task = get_task("gsm8k")
    examples = load_examples("gsm8k", "data/gsm8k/test.jsonl").examples
    prompt = task.prompt(examples[0])                  # question + answer-format instruction
    ok = task.is_correct(task.extract(response, examples[0]), examples[0].answer)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exgrpo.tasks import answers, loaders
from exgrpo.tasks.example import LETTERS, Example
from exgrpo.tasks.loaders import DatasetError, LoadResult

AnswerFormat = Literal["letter", "yes_no", "number", "boxed", "number_or_text"]

_INSTRUCTIONS: dict[str, str] = {
    "letter": "Think step by step, then end your response with \"The answer is (X)\", where X is the "
              "letter of the correct option.",
    "yes_no": "Think step by step, then end your response with \"The answer is yes\" or "
              "\"The answer is no\".",
    "number": "Think step by step, then end your response with \"The answer is N\", where N is the "
              "final number.",
    "boxed": "Think step by step, then put the final answer in \\boxed{} and end your response with "
             "\"The answer is \\boxed{...}\".",
    "number_or_text": "Think step by step, then end your response with \"The answer is X\", where X is "
                      "the final number or, for a multiple-choice question, the text of the option.",
}


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    answer_format: AnswerFormat
    held_out: bool          # docs/method.md: the 4 held-out datasets are test only
    letters: str            # valid option letters for letter tasks ("" otherwise)
    converter: Callable[[dict[str, Any], str], Example]
    files: str              # the expected local files, for --help and error messages

    @property
    def instruction(self) -> str:
        return _INSTRUCTIONS[self.answer_format]

    def prompt(self, ex: Example) -> str:
        return f"{ex.question}\n{self.instruction}"

    def extract(self, text: str, ex: Example | None = None) -> str | None:
        """The answer in `text`, canonical for this task, or None."""
        f = self.answer_format
        if f == "letter":
            letters = LETTERS[: len(ex.choices)] if ex is not None and ex.choices else self.letters
            return answers.extract_letter(text, letters)
        if f == "yes_no":
            return answers.extract_yes_no(text)
        if f == "number":
            return answers.extract_number(text)
        if f == "boxed":
            return answers.extract_boxed(text)
        # number_or_text (TabMWP): a number if the response gives one in its answer span,
        # else the short text.
        return answers.extract_short(text)

    def is_correct(self, pred: str | None, gold: str) -> bool:
        if pred is None:
            return False
        f = self.answer_format
        if f == "letter":
            return pred.strip().upper() == gold.strip().upper()
        if f == "yes_no":
            return pred == answers.normalize_yes_no(gold)
        if f == "number":
            return answers.numbers_equal(pred, gold)
        if f == "boxed":
            return answers.math_equal(pred, gold)
        return answers.short_equal(pred, gold)


def _t(name: str, title: str, fmt: AnswerFormat, held_out: bool, letters: str, conv: Any,
       files: str) -> Task:
    return Task(name, title, fmt, held_out, letters, conv, files)


TASKS: dict[str, Task] = {t.name: t for t in (
    _t("strategyqa", "StrategyQA", "yes_no", False, "", loaders.strategyqa,
       "strategyqa_train.json: [{qid, question, answer: bool, facts, decomposition}]"),
    _t("commonsenseqa", "CommonsenseQA", "letter", False, "ABCDE", loaders.commonsenseqa,
       "*.jsonl: {id, question: {stem, choices: [{label, text}]}, answerKey}"),
    _t("arc_challenge", "ARC-Challenge", "letter", False, "ABCD", loaders.arc_challenge,
       "ARC-Challenge-*.jsonl: {id, question: {stem, choices}, answerKey} (or HF: question, choices{text,label})"),
    _t("math", "MATH", "boxed", False, "", loaders.math,
       "*.jsonl or *.json: {problem, solution, level, type} (gold = last \\boxed{}) or {problem, answer}"),
    _t("gsm8k", "GSM8K", "number", False, "", loaders.gsm8k,
       "train.jsonl / test.jsonl: {question, answer: '... #### 72'}"),
    _t("tabmwp", "TabMWP", "number_or_text", False, "", loaders.tabmwp,
       "problems_*.json: {id: {question, table, table_title, choices, answer, unit, ans_type, solution}}"),
    _t("anli", "ANLI", "letter", False, "ABC", loaders.anli,
       "R*/train.jsonl: {uid, premise, hypothesis, label: e|n|c, reason} (A=entail, B=neutral, C=contra)"),
    _t("date_understanding", "Date Understanding", "letter", False, "ABCDEF",
       loaders.date_understanding,
       "task.json: {examples: [{input, target_scores}]} (BIG-bench) or BBH {examples: [{input, target}]}"),
    _t("boolq", "BoolQ", "yes_no", True, "", loaders.boolq,
       "dev.jsonl: {question, title, answer: bool, passage}"),
    _t("openbookqa", "OpenBookQA", "letter", True, "ABCD", loaders.openbookqa,
       "test.jsonl: {id, question: {stem, choices}, answerKey, fact1?} (or HF: question_stem, choices)"),
    _t("esnli", "e-SNLI", "letter", True, "ABC", loaders.esnli,
       "esnli_test.csv / .jsonl: {pairID, gold_label, Sentence1, Sentence2, Explanation_1} or HF fields"),
    _t("gsm8k_reversal", "GSM8K-Reversal", "number", True, "", loaders.gsm8k_reversal,
       "*.jsonl: {question, answer} (answer a number or '... #### N')"),
    _t("synthetic", "Synthetic arithmetic", "number", False, "", loaders.synthetic,
       "*.jsonl written by `exgrpo.tasks.synthetic` (Example.to_dict lines)"),
)}

PAPER_TASKS: tuple[str, ...] = tuple(n for n in TASKS if n != "synthetic")


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def load_examples(task: str | Task, path: str | Path, *, skip_bad: bool = False,
                  limit: int | None = None) -> LoadResult:
    """All examples of one local file. A record that cannot be read raises `DatasetError`
    ("file:line: reason"), or with `skip_bad` is skipped and listed in `LoadResult.skipped`.
    Duplicate ids are an error: the probe set is keyed on them."""
    t = task if isinstance(task, Task) else get_task(task)
    out = LoadResult([])
    seen: dict[str, str] = {}
    for loc, rec in loaders.read_records(path):
        try:
            if isinstance(rec, Exception):
                raise rec
            ex = loaders.convert(t.name, t.converter, rec, loc)
            if ex.id in seen:
                raise ValueError(f"duplicate id {ex.id!r} (first seen at {seen[ex.id]})")
        except (ValueError, KeyError, TypeError, IndexError) as e:
            msg = f"{loc}: {t.title} record: {e}"
            if not skip_bad:
                raise DatasetError(msg) from None
            out.skipped.append(msg)
            continue
        seen[ex.id] = loc
        out.examples.append(ex)
        if limit is not None and len(out.examples) >= limit:
            break
    return out
