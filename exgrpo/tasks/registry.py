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
from exgrpo.tasks.files import DatasetError
from exgrpo.tasks.loaders import LoadResult

AnswerFormat = Literal["letter", "yes_no", "number", "boxed", "number_or_text"]

INSTRUCTIONS: dict[str, str] = {
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
        return INSTRUCTIONS[self.answer_format]

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
       "strategyqa_train.json [{qid, question, answer: bool, facts}], its JSONL/Parquet copies, "
       "or BIG-bench's task.json {examples: [{input, target_scores: {Yes, No}}]}"),
    _t("commonsenseqa", "CommonsenseQA", "letter", False, "ABCDE", loaders.commonsenseqa,
       "{train,dev}_rand_split.jsonl {id, question: {stem, choices: [{label, text}]}, answerKey}, "
       "or tau/commonsense_qa {question, choices: {label, text}, answerKey} (JSONL/Parquet)"),
    _t("arc_challenge", "ARC-Challenge", "letter", False, "ABCD", loaders.arc_challenge,
       "ARC-Challenge-{Train,Dev,Test}.jsonl {id, question: {stem, choices}, answerKey}, "
       "or allenai/ai2_arc {question, choices: {text, label}, answerKey} (keys A-D or 1-4)"),
    _t("math", "MATH", "boxed", False, "", loaders.math,
       "the release's folder MATH/{train,test}/<subject>/N.json {problem, level, type, solution} "
       "(gold = last \\boxed{}), or JSONL/Parquet exports {problem, solution[, answer]} (MATH-500)"),
    _t("gsm8k", "GSM8K", "number", False, "", loaders.gsm8k,
       "train.jsonl / test.jsonl {question, answer: '... #### 72'} (or openai/gsm8k Parquet)"),
    _t("tabmwp", "TabMWP", "number_or_text", False, "", loaders.tabmwp,
       "problems_*.json {pid: {question, table, table_title, choices, answer, unit, ans_type, solution}}"),
    _t("anli", "ANLI", "letter", False, "ABC", loaders.anli,
       "R{1,2,3}/{train,dev,test}.jsonl {uid, context, hypothesis, label: e|n|c, reason}, or facebook/anli "
       "(label 0/1/2); A = entailment, B = neutral, C = contradiction"),
    _t("date_understanding", "Date Understanding", "letter", False, "ABCDEF",
       loaders.date_understanding,
       "BIG-bench task.json {examples: [{input, target_scores}]} (options shuffled), "
       "or BIG-Bench-Hard date_understanding.json {examples: [{input, target: '(A)'}]}"),
    _t("boolq", "BoolQ", "yes_no", True, "", loaders.boolq,
       "dev.jsonl {question, title, answer: bool, passage}, google/boolq, or SuperGLUE {label: 0/1}"),
    _t("openbookqa", "OpenBookQA", "letter", True, "ABCD", loaders.openbookqa,
       "test.jsonl / test_complete.jsonl {id, question: {stem, choices}, answerKey, fact1?}, "
       "or allenai/openbookqa {question_stem, choices, answerKey}"),
    _t("esnli", "e-SNLI", "letter", True, "ABC", loaders.esnli,
       "esnli_{train,dev,test}.csv {pairID, gold_label, Sentence1, Sentence2, Explanation_1}, "
       "or the Hub's esnli {premise, hypothesis, label: 0/1/2, explanation_1}"),
    _t("gsm8k_reversal", "GSM8K-Reversal", "number", True, "", loaders.gsm8k_reversal,
       "the authors' data/gsm8k/test-backward.json (JSON Lines) {id, question, answer, explanation}"),
    _t("synthetic", "Synthetic arithmetic", "number", False, "", loaders.synthetic,
       "*.jsonl written by `exgrpo.tasks.synthetic` (Example.to_dict lines)"),
)}

PAPER_TASKS: tuple[str, ...] = tuple(n for n in TASKS if n != "synthetic")


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


SKEW_SHARE = 0.5      # a multiple-choice set whose most common gold letter is above this share is skewed
SKEW_MIN_EXAMPLES = 8


def load_examples(task: str | Task, path: str | Path, *, skip_bad: bool = False,
                  limit: int | None = None, fields: tuple[str, ...] | dict[str, str] = ()) -> LoadResult:
    """All examples of one local file (or folder; see exgrpo.tasks.files for the forms read). A record that
    cannot be read raises `DatasetError` ("file:line: reason"), or with `skip_bad` is skipped and listed in
    `LoadResult.skipped`. Duplicate ids are an error: the probe set is keyed on them. `fields` maps field
    names ("answer=label"; see loaders.apply_fields).

    A multiple-choice file whose gold letters are skewed in the source's order (one letter the answer of
    more than half of at least SKEW_MIN_EXAMPLES questions) has every question's options shuffled
    (loaders.shuffle_options), said in `LoadResult.notes`. The decision is the whole file's, so that
    `limit` selects the same questions, worded the same, as a run without it."""
    t = task if isinstance(task, Task) else get_task(task)
    fmap = loaders.parse_fields(fields) if not isinstance(fields, dict) else fields
    out = LoadResult([])
    seen: dict[str, str] = {}
    for loc, rec in loaders.read_records(path):
        try:
            if isinstance(rec, Exception):
                raise rec
            ex = loaders.convert(t.name, t.converter, rec, loc, fmap)
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
    _unskew(t, out)
    if limit is not None:
        out.examples = out.examples[:limit]
    return out


def _unskew(t: Task, out: LoadResult) -> None:
    if t.answer_format != "letter":
        return
    fixed = [e for e in out.examples if "options_shuffled" in e.meta]
    if fixed:
        out.notes.append(f"options shuffled in {len(fixed)} of {len(out.examples)} questions: the source lists "
                         "the right option first (a permutation fixed by task and id)")
    skew = loaders.gold_skew([e for e in out.examples if "options_shuffled" not in e.meta])
    if skew is None or skew[2] < SKEW_MIN_EXAMPLES or skew[1] <= SKEW_SHARE * skew[2]:
        return
    letter, n, total = skew
    done = 0
    for i, e in enumerate(out.examples):
        if e.choices and "options_shuffled" not in e.meta:
            try:
                out.examples[i] = loaders.shuffle_options(e)
                done += 1
            except ValueError:
                pass
    out.notes.append(f"gold letter {letter} answers {n} of {total} questions in the source's order: options "
                     f"shuffled in {done} (a permutation fixed by task and id)")
