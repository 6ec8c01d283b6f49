"""Reading local dataset files into `Example`s.

Nothing is downloaded. Each task's converter turns one record of the dataset's usual public
format into an `Example` and raises `ValueError` naming what is missing; `read_records` gives
records with their `file:line` so that a bad line is reported where it is. Accepted files:

* `.jsonl`: one JSON object per line (blank lines ignored);
* `.json`: a list of objects, an object mapping ids to objects (TabMWP's `problems_*.json`), or a
  BIG-bench task file with an "examples" list (Date Understanding);
* `.csv`: a header row then one record per row (e-SNLI's original release).

Every task also accepts the generic form `{"id", "question", "choices", "answer", "rationale"}`,
which is also what `Example.to_dict` writes.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exgrpo.tasks.answers import format_number, last_boxed, normalize_yes_no, parse_number
from exgrpo.tasks.example import LETTERS, Example, format_choices


class DatasetError(ValueError):
    """A dataset record that cannot be read; the message starts with `file:line`."""


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped record


# ---------------------------------------------------------------- reading files

def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(location, record) pairs; a record that does not parse comes as the exception instead, so
    the caller decides whether to stop or skip."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{i}", ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield f"{path}:{i}", rec if isinstance(rec, dict) else ValueError(
                    f"expected a JSON object, got {type(rec).__name__}")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("examples"), list):
            items: list[tuple[str, Any]] = [(str(i), r) for i, r in enumerate(data["examples"])]
        elif isinstance(data, list):
            items = [(str(i), r) for i, r in enumerate(data)]
        elif isinstance(data, dict):
            # TabMWP: {"1": {...}, "2": {...}} — keep the key as the id.
            items = [(k, {"_key": k, **r} if isinstance(r, dict) else r) for k, r in data.items()]
        else:
            raise DatasetError(f"{path}: expected a list or an object at the top level")
        for k, rec in items:
            loc = f"{path}:item {k}"
            yield loc, rec if isinstance(rec, dict) else ValueError(
                f"expected a JSON object, got {type(rec).__name__}")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                # DictReader's line_num is the physical line of the row just read.
                yield f"{path}:{reader.line_num}", dict(row)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")


# ---------------------------------------------------------------- helpers for converters

def _req(rec: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in rec and rec[n] is not None and rec[n] != "":
            return rec[n]
    raise ValueError(f"missing field {' or '.join(repr(n) for n in names)}")


def _letter(label: Any, labels: list[str]) -> str:
    """Answer key to a letter: "B" stays, "2" (ARC's numeric labels) becomes the 2nd letter."""
    key = str(label).strip()
    if key in labels:
        return LETTERS[labels.index(key)]
    if key.upper() in LETTERS[: len(labels)]:
        return key.upper()
    raise ValueError(f"answer key {key!r} is not one of the labels {labels}")


def _mc_choices(rec: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """Stem, choice texts and labels from the ARC/CSQA/OpenBookQA shapes:
    {"question": {"stem", "choices": [{"label", "text"}]}} (AI2 release) or
    {"question": str, "choices": {"text": [...], "label": [...]}} (Hugging Face)."""
    q = rec.get("question")
    if isinstance(q, dict):
        stem = _req(q, "stem")
        raw = _req(q, "choices")
    else:
        stem = _req(rec, "question_stem", "question")
        raw = _req(rec, "choices")
    if isinstance(raw, dict):
        texts, labels = list(raw["text"]), [str(x) for x in raw["label"]]
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        texts, labels = [c["text"] for c in raw], [str(c["label"]) for c in raw]
    elif isinstance(raw, list):
        texts, labels = [str(c) for c in raw], list(LETTERS[: len(raw)])
    else:
        raise ValueError("'choices' must be a list or a {text, label} object")
    if len(texts) < 2:
        raise ValueError(f"need at least 2 choices, got {len(texts)}")
    return str(stem), [str(t) for t in texts], labels


def _mc_example(task: str, rid: str, stem: str, texts: list[str], answer: str,
                rationale: str | None = None, meta: dict[str, Any] | None = None) -> Example:
    question = f"{stem.strip()}\nAnswer Choices:\n{format_choices(texts)}"
    return Example(rid, task, question, answer, tuple(texts), rationale, meta or {})


def _generic(task: str, rec: dict[str, Any], loc: str) -> Example | None:
    """The generic `Example` shape, if the record has it (an 'answer' that is a plain string and a
    'question' that is a plain string)."""
    if "task" in rec and "id" in rec and isinstance(rec.get("question"), str) and "answer" in rec:
        return Example.from_dict({**rec, "task": task})
    return None


def _rid(rec: dict[str, Any], loc: str, *names: str) -> str:
    for n in names:
        if rec.get(n) not in (None, ""):
            return str(rec[n])
    return loc.rsplit(":", 1)[-1].replace("item ", "")  # fall back to the line / item number


# ---------------------------------------------------------------- the converters

def strategyqa(rec: dict[str, Any], loc: str) -> Example:
    """StrategyQA (strategyqa_train.json): {"qid", "question", "answer": bool, "facts": [...],
    "decomposition": [...]}; the facts become the rationale."""
    facts = rec.get("facts")
    rationale = " ".join(facts) if isinstance(facts, list) and facts else None
    return Example(_rid(rec, loc, "qid", "id"), "strategyqa", str(_req(rec, "question")),
                   normalize_yes_no(_req(rec, "answer")), (), rationale)


def boolq(rec: dict[str, Any], loc: str) -> Example:
    """BoolQ (train.jsonl / dev.jsonl): {"question", "title", "answer": bool, "passage"}."""
    passage = str(_req(rec, "passage"))
    q = str(_req(rec, "question")).strip()
    q = q[0].upper() + q[1:] if q else q
    if not q.endswith("?"):
        q += "?"
    title = rec.get("title")
    ctx = f"{title}: {passage}" if title else passage
    return Example(_rid(rec, loc, "id", "idx"), "boolq", f"Passage: {ctx}\nQuestion: {q}",
                   normalize_yes_no(_req(rec, "answer")))


def commonsenseqa(rec: dict[str, Any], loc: str) -> Example:
    """CommonsenseQA (train_rand_split.jsonl): {"id", "question": {"stem", "choices": [{"label",
    "text"}]}, "answerKey"}."""
    stem, texts, labels = _mc_choices(rec)
    return _mc_example("commonsenseqa", _rid(rec, loc, "id"), stem, texts,
                       _letter(_req(rec, "answerKey"), labels))


def arc_challenge(rec: dict[str, Any], loc: str) -> Example:
    """ARC-Challenge (ARC-Challenge-Train.jsonl, or the HF export): like CommonsenseQA; some
    answer keys are "1".."4" and map to A..D."""
    stem, texts, labels = _mc_choices(rec)
    return _mc_example("arc_challenge", _rid(rec, loc, "id"), stem, texts,
                       _letter(_req(rec, "answerKey"), labels))


def openbookqa(rec: dict[str, Any], loc: str) -> Example:
    """OpenBookQA (test.jsonl / test_complete.jsonl, or HF): like ARC; "fact1" is the rationale."""
    stem, texts, labels = _mc_choices(rec)
    fact = rec.get("fact1")
    return _mc_example("openbookqa", _rid(rec, loc, "id"), stem, texts,
                       _letter(_req(rec, "answerKey"), labels), str(fact) if fact else None)


_NLI_OPTIONS = ("entailment", "neutral", "contradiction")
_NLI_LABEL = {"e": 0, "entailment": 0, "0": 0, "n": 1, "neutral": 1, "1": 1,
              "c": 2, "contradiction": 2, "2": 2}


def _nli(task: str, rec: dict[str, Any], loc: str, premise_keys: tuple[str, ...],
         hyp_keys: tuple[str, ...], label_keys: tuple[str, ...], reason_keys: tuple[str, ...]) -> Example:
    premise, hyp = str(_req(rec, *premise_keys)), str(_req(rec, *hyp_keys))
    raw = str(_req(rec, *label_keys)).strip().lower()
    if raw not in _NLI_LABEL:
        raise ValueError(f"label {raw!r} is not entailment/neutral/contradiction (e/n/c or 0/1/2)")
    reason = next((str(rec[k]) for k in reason_keys if rec.get(k)), None)
    stem = (f"Premise: {premise}\nHypothesis: {hyp}\n"
            "Does the premise entail the hypothesis, is it neutral, or does it contradict it?")
    return _mc_example(task, _rid(rec, loc, "uid", "pairID", "id"), stem, list(_NLI_OPTIONS),
                       LETTERS[_NLI_LABEL[raw]], reason)


def anli(rec: dict[str, Any], loc: str) -> Example:
    """ANLI (R1/R2/R3 train.jsonl): {"uid", "premise", "hypothesis", "label": "e"|"n"|"c",
    "reason"}; the HF export uses label 0/1/2. A = entailment, B = neutral, C = contradiction."""
    return _nli("anli", rec, loc, ("premise", "context"), ("hypothesis",), ("label",), ("reason",))


def esnli(rec: dict[str, Any], loc: str) -> Example:
    """e-SNLI: the original CSV/JSONL fields {"pairID", "gold_label", "Sentence1", "Sentence2",
    "Explanation_1"} or the HF export {"premise", "hypothesis", "label", "explanation_1"}."""
    return _nli("esnli", rec, loc, ("Sentence1", "premise"), ("Sentence2", "hypothesis"),
                ("gold_label", "label"), ("Explanation_1", "explanation_1"))


def _gsm8k_answer(raw: Any) -> tuple[str, str | None]:
    """GSM8K's "answer": reasoning with <<48/2=24>> calculator notes, then "#### 72"."""
    s = str(raw)
    if "####" in s:
        reasoning, final = s.rsplit("####", 1)
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    else:
        reasoning, final = "", s
    v = parse_number(final)
    if v is None:
        raise ValueError(f"gold answer {final.strip()!r} is not a number")
    return format_number(v), reasoning or None


def gsm8k(rec: dict[str, Any], loc: str) -> Example:
    """GSM8K (train.jsonl / test.jsonl): {"question", "answer": "... #### 72"}."""
    ans, rationale = _gsm8k_answer(_req(rec, "answer"))
    return Example(_rid(rec, loc, "id"), "gsm8k", str(_req(rec, "question")), ans, (), rationale)


def gsm8k_reversal(rec: dict[str, Any], loc: str) -> Example:
    """GSM8K-Reversal: GSM8K questions rewritten to ask for a premise given the result. Fields
    {"question", "answer"} where the answer is a number or GSM8K's "... #### N"."""
    ans, rationale = _gsm8k_answer(_req(rec, "answer", "gold", "target"))
    q = _req(rec, "question", "reversed_question", "input")
    return Example(_rid(rec, loc, "id"), "gsm8k_reversal", str(q), ans, (), rationale)


def math(rec: dict[str, Any], loc: str) -> Example:
    """MATH (one JSON per problem, or MATH-500-style JSONL): {"problem", "solution", "level",
    "type"/"subject", optional "answer"}; without "answer" the gold is the solution's last
    `\\boxed{}`."""
    solution = rec.get("solution")
    answer = rec.get("answer")
    if answer in (None, ""):
        if not solution:
            raise ValueError("missing field 'answer' or 'solution'")
        answer = last_boxed(str(solution))
        if answer is None:
            raise ValueError("the solution has no \\boxed{} answer")
    meta = {k: rec[k] for k in ("level", "type", "subject") if rec.get(k)}
    return Example(_rid(rec, loc, "unique_id", "id"), "math", str(_req(rec, "problem", "question")),
                   str(answer).strip(), (), str(solution) if solution else None, meta)


def tabmwp(rec: dict[str, Any], loc: str) -> Example:
    """TabMWP (problems_train.json: {id: {"question", "table", "table_title", "choices",
    "answer", "unit", "ans_type", "solution"}}). The table is given as text, the options as
    letters when the question is multiple choice; the gold stays the answer text."""
    table = str(_req(rec, "table"))
    title = rec.get("table_title")
    q = str(_req(rec, "question"))
    parts = [f"Table: {title}" if title else "Table:", table, f"Question: {q}"]
    unit = rec.get("unit")
    if unit:
        parts.append(f"(Unit: {unit})")
    choices = rec.get("choices") or []
    if choices:
        parts.append("Options: " + ", ".join(str(c) for c in choices))
    answer = str(_req(rec, "answer")).strip()
    meta = {k: rec[k] for k in ("ans_type", "unit", "grade") if rec.get(k)}
    return Example(_rid(rec, loc, "_key", "id", "pid"), "tabmwp", "\n".join(parts), answer,
                   tuple(str(c) for c in choices), rec.get("solution"), meta)


def date_understanding(rec: dict[str, Any], loc: str) -> Example:
    """Date Understanding (BIG-bench task.json: {"examples": [{"input", "target_scores":
    {option: 0/1}}]}, or BIG-Bench-Hard: {"input" with "Options:\\n(A) ...", "target": "(A)"})."""
    inp = str(_req(rec, "input"))
    scores = rec.get("target_scores")
    if isinstance(scores, dict):
        texts = list(scores)
        right = [i for i, t in enumerate(texts) if scores[t]]
        if len(right) != 1:
            raise ValueError(f"target_scores must mark exactly one option, marks {len(right)}")
        return _mc_example("date_understanding", _rid(rec, loc, "id"), inp, texts, LETTERS[right[0]])
    target = str(_req(rec, "target")).strip()
    m = re.fullmatch(r"\(?([A-F])\)?", target)
    if not m:
        raise ValueError(f"target {target!r} is not an option letter like (A)")
    texts = re.findall(r"^\(([A-F])\)\s*(.*)$", inp, re.MULTILINE)
    return Example(_rid(rec, loc, "id"), "date_understanding", inp, m.group(1),
                   tuple(t for _, t in texts))


def synthetic(rec: dict[str, Any], loc: str) -> Example:
    """The embedded task's own files: `Example.to_dict` lines (see exgrpo.tasks.synthetic)."""
    raise ValueError("not an Example record (needs 'id', 'task', 'question', 'answer')")


def convert(task: str, converter: Any, rec: dict[str, Any], loc: str) -> Example:
    return _generic(task, rec, loc) or converter(rec, loc)
