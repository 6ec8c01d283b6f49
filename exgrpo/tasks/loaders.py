"""Dataset records -> `Example`s: one converter per task, for its original release and the Hub's export.

Nothing is downloaded. `exgrpo.tasks.files.read_records` turns a file (JSON, JSON Lines, Parquet, CSV, or
a folder of them) into records with their `file:line`; each task's converter here turns one record into an
`Example` and raises `ValueError` naming what is missing. Where copies of a dataset name a field
differently (BoolQ's `answer` bool vs `label` "yes"/0/1, ANLI's e/n/c vs 0/1/2, ARC's "1".."4" keys), the
converter accepts each; `--field NAME=SOURCE` (`apply_fields`) maps any other copy without code.

Every task also accepts the generic form `{"id", "task", "question", "choices", "answer", "rationale"}`,
which is what `Example.to_dict` writes.

Multiple choice whose source fixes the gold position (BIG-bench lists the correct option first in 364 of
Date Understanding's 369 examples) is re-ordered by `shuffle_options`: a permutation derived from the
task and the example id alone, so the same on every run and every machine, recorded in `meta`.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from exgrpo.tasks.answers import format_number, last_boxed, normalize_yes_no, parse_number
from exgrpo.tasks.example import LETTERS, Example, format_choices
from exgrpo.tasks.files import DatasetError, read_records

__all__ = ["DatasetError", "LoadResult", "MissingField", "apply_fields", "convert", "parse_fields",
           "read_records", "shuffle_options"]


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped record
    notes: list[str] = field(default_factory=list)    # what the loader changed, e.g. options shuffled


# ---------------------------------------------------------------- field names

# Where a field is often found under another name: the hint in a missing-field error.
_SYNONYMS = {
    "answer": ("label", "gold", "target", "answerKey", "answer_key", "correct", "output", "targets"),
    "answerKey": ("answer", "label", "answer_key", "gold"),
    "label": ("answer", "gold_label", "gold"),
    "question": ("query", "problem", "input", "inputs", "question_stem", "stem", "prompt", "text"),
    "problem": ("question", "query", "input"),
    "passage": ("context", "paragraph", "text", "document"),
    "premise": ("sentence1", "Sentence1", "context"),
    "hypothesis": ("sentence2", "Sentence2"),
    "input": ("inputs", "question"),
}


class MissingField(ValueError):
    """A record lacks the field a converter needs; says which fields it has and the --field that maps one."""

    def __init__(self, names: tuple[str, ...], rec: dict[str, Any]):
        present = [k for k in rec if not k.startswith("_")]
        want = " or ".join(repr(n) for n in names)
        msg = f"missing field {want}; the record has {', '.join(present) or 'no fields'}"
        guess = _guess(names, present)
        if guess:
            msg += f"; if {guess!r} holds it, pass --field {names[0]}={guess}"
        else:
            msg += f"; pass --field {names[0]}=<the field that holds it>"
        super().__init__(msg)
        self.names, self.present = names, present


def _guess(names: tuple[str, ...], present: list[str]) -> str | None:
    for n in names:
        for s in _SYNONYMS.get(n, ()):
            if s in present:
                return s
    close = difflib.get_close_matches(names[0], present, n=1, cutoff=0.6)
    return close[0] if close else None


def parse_fields(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`("answer=label", "passage=context.text")` -> {"answer": "label", "passage": "context.text"}."""
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"--field {spec!r}: expected NAME=SOURCE, e.g. --field answer=label")
        out[name.strip()] = source.strip()
    return out


def _lookup(rec: dict[str, Any], source: str) -> Any:
    cur: Any = rec
    for part in source.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(part)
    return cur


def apply_fields(rec: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """The record with each NAME set from its SOURCE (a field name, or a dotted path into nested objects)."""
    if not fields:
        return rec
    out = dict(rec)
    for name, source in fields.items():
        try:
            out[name] = _lookup(rec, source)
        except KeyError:
            present = ", ".join(k for k in rec if not k.startswith("_"))
            raise ValueError(f"--field {name}={source}: the record has no {source!r} (it has {present})") from None
    return out


# ---------------------------------------------------------------- helpers for converters

def _req(rec: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in rec and rec[n] is not None and rec[n] != "":
            return rec[n]
    raise MissingField(names, rec)


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
        texts, labels = list(_req(raw, "text")), [str(x) for x in _req(raw, "label")]
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        texts, labels = [c["text"] for c in raw], [str(c["label"]) for c in raw]
    elif isinstance(raw, list):
        texts, labels = [str(c) for c in raw], list(LETTERS[: len(raw)])
    else:
        raise ValueError("'choices' must be a list or a {text, label} object")
    if len(texts) < 2:
        raise ValueError(f"need at least 2 choices, got {len(texts)}")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} choice texts but {len(labels)} labels")
    if len(texts) > len(LETTERS):
        raise ValueError(f"{len(texts)} choices; at most {len(LETTERS)} are supported")
    return str(stem), [str(t) for t in texts], labels


def _mc_example(task: str, rid: str, stem: str, texts: list[str], answer: str,
                rationale: str | None = None, meta: dict[str, Any] | None = None) -> Example:
    question = f"{stem.strip()}\nAnswer Choices:\n{format_choices(texts)}"
    return Example(rid, task, question, answer, tuple(texts), rationale, meta or {})


def _scored_options(rec: dict[str, Any]) -> tuple[list[str], int] | None:
    """(options, index of the right one) from BIG-bench's `target_scores` {option: 0/1} or the Hub export's
    `multiple_choice_targets` + `multiple_choice_scores`; None when the record has neither."""
    if isinstance(rec.get("target_scores"), dict):
        texts, scores = list(rec["target_scores"]), list(rec["target_scores"].values())
    elif isinstance(rec.get("multiple_choice_targets"), list) and isinstance(rec.get("multiple_choice_scores"), list):
        texts, scores = rec["multiple_choice_targets"], rec["multiple_choice_scores"]
    else:
        return None
    right = [i for i, s in enumerate(scores) if s]
    if len(right) != 1:
        raise ValueError(f"the option scores must mark exactly one option, they mark {len(right)}")
    return [str(t) for t in texts], right[0]


def _text(rec: dict[str, Any], *names: str) -> str:
    """A text field that may come as a one-element list (the Hub's BIG-bench export has `inputs`, lists)."""
    v = _req(rec, *names)
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    return str(v)


def _generic(task: str, rec: dict[str, Any], loc: str) -> Example | None:
    """The generic `Example` shape, if the record has it (an 'answer' that is a plain string and a
    'question' that is a plain string)."""
    if "task" in rec and "id" in rec and isinstance(rec.get("question"), str) and "answer" in rec:
        return Example.from_dict({**rec, "task": task})
    return None


def _rid(rec: dict[str, Any], loc: str, *names: str) -> str:
    for n in (*names, "_key"):
        if rec.get(n) not in (None, ""):
            return str(rec[n])
    return loc.rsplit(":", 1)[-1].replace("item ", "").replace("row ", "")  # the line / item / row number


# ---------------------------------------------------------------- shuffled options

def shuffle_options(ex: Example) -> Example:
    """`ex` with its options in a permutation fixed by (task, id): each option's place is the order of
    sha256(task, id, its source index), so every run on every machine gets the same. The question's
    options block ("(A) text" lines) is rewritten and the gold letter follows its option;
    `meta["options_shuffled"]` records the source order and the source's gold letter."""
    n = len(ex.choices)
    block = format_choices(ex.choices)
    if n < 2 or ex.question.count(block) != 1 or len(ex.answer) != 1 or ex.answer not in LETTERS[:n]:
        raise ValueError(f"example {ex.id!r}: cannot shuffle its options (no single options block in the question)")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{ex.task}\0{ex.id}\0{i}".encode()).digest())
    texts = tuple(ex.choices[i] for i in order)
    answer = LETTERS[order.index(LETTERS.index(ex.answer))]
    meta = {**ex.meta, "options_shuffled": {"source_order": "".join(LETTERS[i] for i in order),
                                            "source_answer": ex.answer}}
    return replace(ex, question=ex.question.replace(block, format_choices(texts)), answer=answer,
                   choices=texts, meta=meta)


def gold_skew(examples: list[Example]) -> tuple[str, int, int] | None:
    """(the most common gold letter, its count, the number of multiple-choice examples) over the examples
    whose gold is an option letter, or None if there are none."""
    letters = [e.answer for e in examples if e.choices and len(e.answer) == 1 and e.answer in LETTERS]
    if not letters:
        return None
    top = max(sorted(set(letters)), key=letters.count)
    return top, letters.count(top), len(letters)


# ---------------------------------------------------------------- the converters

def _yes_no_scores(rec: dict[str, Any]) -> str | None:
    scored = _scored_options(rec)
    if scored is None:
        return None
    texts, right = scored
    return normalize_yes_no(texts[right].strip().rstrip("."))


def strategyqa(rec: dict[str, Any], loc: str) -> Example:
    """StrategyQA: the release's strategyqa_train.json ({"qid", "question", "answer": bool, "facts": [...],
    "decomposition": [...]}, the facts becoming the rationale; the Hub's copies, facts sometimes one string),
    or BIG-bench's task.json ({"input", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. <why>"})."""
    if (gold := _yes_no_scores(rec)) is not None:
        target = rec.get("target")
        why = str(target[0] if isinstance(target, list) and target else target or "")
        why = re.sub(r"^\s*(yes|no)\b[.,:]?\s*", "", why, flags=re.IGNORECASE).strip()
        return Example(_rid(rec, loc, "id", "idx"), "strategyqa", _text(rec, "input", "inputs"), gold, (),
                       why or None)
    facts = rec.get("facts")
    if isinstance(facts, list):
        rationale = " ".join(str(f) for f in facts) or None
    else:
        rationale = str(facts).strip() or None if facts else None
    return Example(_rid(rec, loc, "qid", "id"), "strategyqa", str(_req(rec, "question")),
                   normalize_yes_no(_req(rec, "answer", "label")), (), rationale)


def boolq(rec: dict[str, Any], loc: str) -> Example:
    """BoolQ: the release's dev.jsonl / google/boolq ({"question", "title", "answer": bool, "passage"}),
    SuperGLUE's ({"question", "passage", "idx", "label": 0/1}), or copies with "label": "yes"/"no"."""
    passage = str(_req(rec, "passage"))
    q = str(_req(rec, "question")).strip()
    q = q[0].upper() + q[1:] if q else q
    if not q.endswith("?"):
        q += "?"
    title = rec.get("title")
    ctx = f"{title}: {passage}" if title else passage
    return Example(_rid(rec, loc, "id", "idx"), "boolq", f"Passage: {ctx}\nQuestion: {q}",
                   normalize_yes_no(_req(rec, "answer", "label")))


def commonsenseqa(rec: dict[str, Any], loc: str) -> Example:
    """CommonsenseQA: the release's *_rand_split.jsonl ({"id", "question": {"stem", "choices": [{"label",
    "text"}]}, "answerKey"}) or tau/commonsense_qa ({"question": str, "choices": {"label", "text"}})."""
    stem, texts, labels = _mc_choices(rec)
    return _mc_example("commonsenseqa", _rid(rec, loc, "id"), stem, texts,
                       _letter(_req(rec, "answerKey"), labels))


def arc_challenge(rec: dict[str, Any], loc: str) -> Example:
    """ARC-Challenge (AI2's ARC-Challenge-*.jsonl, or allenai/ai2_arc): like CommonsenseQA; some answer
    keys and labels are "1".."4" and map to A..D."""
    stem, texts, labels = _mc_choices(rec)
    return _mc_example("arc_challenge", _rid(rec, loc, "id"), stem, texts,
                       _letter(_req(rec, "answerKey"), labels))


def openbookqa(rec: dict[str, Any], loc: str) -> Example:
    """OpenBookQA (the release's test.jsonl / test_complete.jsonl, or allenai/openbookqa with
    "question_stem"): like ARC; "fact1" (the complete/additional files) is the rationale."""
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
    if raw in ("-", "-1"):
        raise ValueError(f"no gold label ({raw!r}: the annotators did not agree)")
    if raw not in _NLI_LABEL:
        raise ValueError(f"label {raw!r} is not entailment/neutral/contradiction (e/n/c or 0/1/2)")
    reason = next((str(rec[k]) for k in reason_keys if rec.get(k)), None)
    stem = (f"Premise: {premise}\nHypothesis: {hyp}\n"
            "Does the premise entail the hypothesis, is it neutral, or does it contradict it?")
    return _mc_example(task, _rid(rec, loc, "uid", "pairID", "id"), stem, list(_NLI_OPTIONS),
                       LETTERS[_NLI_LABEL[raw]], reason)


def anli(rec: dict[str, Any], loc: str) -> Example:
    """ANLI: the release's R*/{train,dev,test}.jsonl ({"uid", "context", "hypothesis", "label": "e"|"n"|"c",
    "reason"}), facebook/anli ("premise", label 0/1/2), or copies with the label spelled out.
    A = entailment, B = neutral, C = contradiction."""
    return _nli("anli", rec, loc, ("premise", "context"), ("hypothesis",), ("label", "gold_label"), ("reason",))


def esnli(rec: dict[str, Any], loc: str) -> Example:
    """e-SNLI: the release's esnli_*.csv ({"pairID", "gold_label", "Sentence1", "Sentence2", "Explanation_1"})
    or the Hub's esnli ({"premise", "hypothesis", "label": 0/1/2, "explanation_1"})."""
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
    """GSM8K (the release's train.jsonl / test.jsonl, or openai/gsm8k): {"question", "answer": "... #### 72"}."""
    ans, rationale = _gsm8k_answer(_req(rec, "answer"))
    return Example(_rid(rec, loc, "id"), "gsm8k", str(_req(rec, "question")), ans, (), rationale)


def gsm8k_reversal(rec: dict[str, Any], loc: str) -> Example:
    """GSM8K-Reversal (the authors' data/gsm8k/test-backward.json, JSON Lines under a .json name):
    {"id", "question", "answer": "5", "explanation"}; the answer may also be GSM8K's "... #### N"."""
    ans, rationale = _gsm8k_answer(_req(rec, "answer", "gold", "target"))
    q = _req(rec, "question", "reversed_question", "input")
    explanation = rec.get("explanation")
    return Example(_rid(rec, loc, "id"), "gsm8k_reversal", str(q), ans, (),
                   str(explanation) if explanation else rationale)


def math(rec: dict[str, Any], loc: str) -> Example:
    """MATH: the release's one problem per file (MATH/{train,test}/<subject>/N.json, read as a folder:
    {"problem", "level", "type", "solution"}, the gold being the solution's last `\\boxed{}`), the Hub's
    exports (hendrycks/competition_math; MATH-500 with "answer", "subject", "unique_id"), or copies with
    "question" and "reason" (the solution)."""
    solution = rec.get("solution") or rec.get("reason")
    answer = rec.get("answer")
    if answer in (None, ""):
        if not solution:
            raise MissingField(("answer", "solution"), rec)
        answer = last_boxed(str(solution))
        if answer is None:
            raise ValueError("the solution has no \\boxed{} answer")
    meta = {k: rec[k] for k in ("level", "type", "subject") if rec.get(k)}
    return Example(_rid(rec, loc, "unique_id", "id", "pid"), "math", str(_req(rec, "problem", "question")),
                   str(answer).strip(), (), str(solution) if solution else None, meta)


def tabmwp(rec: dict[str, Any], loc: str) -> Example:
    """TabMWP (problems_{train,dev,test,test1k}.json: {pid: {"question", "table", "table_title", "choices",
    "answer", "unit", "ans_type", "solution"}}, or a list/JSONL of such records). The table is given as
    text, the options as a list when the question is multiple choice; the gold stays the answer text."""
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
    return Example(_rid(rec, loc, "pid", "id"), "tabmwp", "\n".join(parts), answer,
                   tuple(str(c) for c in choices), rec.get("solution"), meta)


def date_understanding(rec: dict[str, Any], loc: str) -> Example:
    """Date Understanding: BIG-bench's task.json ({"examples": [{"input", "target_scores": {option: 0/1}}]},
    or the Hub's export with "multiple_choice_targets"/"multiple_choice_scores"), whose options are shuffled
    (the source lists the right one first), or BIG-Bench-Hard's ({"input" with "Options:\\n(A) ...",
    "target": "(A)"}), kept as it is."""
    inp = _text(rec, "input", "inputs")
    scored = _scored_options(rec)
    if scored is not None:
        texts, right = scored
        return shuffle_options(_mc_example("date_understanding", _rid(rec, loc, "id", "idx"), inp, texts,
                                           LETTERS[right]))
    target = _text(rec, "target", "targets").strip()
    m = re.fullmatch(r"\(?([A-F])\)?", target)
    if not m:
        raise ValueError(f"target {target!r} is not an option letter like (A)")
    texts = re.findall(r"^\(([A-F])\)\s*(.*)$", inp, re.MULTILINE)
    return Example(_rid(rec, loc, "id"), "date_understanding", inp, m.group(1),
                   tuple(t for _, t in texts))


def synthetic(rec: dict[str, Any], loc: str) -> Example:
    """The embedded task's own files: `Example.to_dict` lines (see exgrpo.tasks.synthetic)."""
    raise MissingField(("id", "task", "question", "answer"), rec)


Converter = Callable[[dict[str, Any], str], Example]


def convert(task: str, converter: Converter, rec: dict[str, Any], loc: str,
            fields: dict[str, str] | None = None) -> Example:
    rec = apply_fields(rec, fields or {})
    return _generic(task, rec, loc) or converter(rec, loc)
