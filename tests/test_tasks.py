"""Loaders on small files in each dataset's public format, and malformed-line handling."""
import json

import pytest

from exgrpo.tasks import PAPER_TASKS, TASKS, DatasetError, Example, get_task, load_examples


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_registry_has_the_papers_12_tasks():
    assert len(PAPER_TASKS) == 12
    held_out = {n for n in PAPER_TASKS if TASKS[n].held_out}
    assert held_out == {"boolq", "openbookqa", "esnli", "gsm8k_reversal"}
    assert get_task("ARC-Challenge").name == "arc_challenge"
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")


def test_strategyqa(tmp_path):
    p = tmp_path / "strategyqa_train.json"
    p.write_text(json.dumps([
        {"qid": "a1", "term": "Spice Girls", "question": "Could the members of The Police perform lawful arrests?",
         "answer": False, "facts": ["The Police were a band.", "Bands cannot arrest."],
         "decomposition": ["..."]},
        {"qid": "a2", "question": "Are more people today related to Genghis Khan than Julius Caesar?",
         "answer": True, "facts": []},
    ]))
    ex = load_examples("strategyqa", p).examples
    assert [e.answer for e in ex] == ["no", "yes"]
    assert ex[0].id == "a1" and ex[0].rationale == "The Police were a band. Bands cannot arrest."
    assert ex[1].rationale is None


def test_commonsenseqa_and_openbookqa(tmp_path):
    rec = {"id": "075e", "answerKey": "A", "question": {"question_concept": "revolving door", "choices": [
        {"label": l, "text": t} for l, t in zip("ABCDE", ["bank", "library", "mall", "new york", "office"])],
        "stem": "A revolving door is convenient for two direction travel, but it also serves as a "
                "security measure at a what?"}}
    e = load_examples("commonsenseqa", _jsonl(tmp_path / "c.jsonl", [rec])).examples[0]
    assert e.answer == "A" and e.choices[0] == "bank" and "(E) office" in e.question
    obqa = {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [
        {"text": "puppies learning new tricks", "label": "A"}, {"text": "plants sprouting", "label": "D"},
        {"text": "x", "label": "B"}, {"text": "y", "label": "C"}]}, "fact1": "the sun is the source of energy",
        "answerKey": "D"}
    e = load_examples("openbookqa", _jsonl(tmp_path / "o.jsonl", [obqa])).examples[0]
    assert e.answer == "B" and e.rationale == "the sun is the source of energy"  # label order -> letter order


def test_arc_numeric_labels_and_hf_shape(tmp_path):
    recs = [
        {"id": "Mercury_1", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "rock", "label": "3"}]},
         "answerKey": "2"},
        {"id": "Mercury_2", "question": "Which is hot?", "choices": {"text": ["sun", "moon", "ice", "snow"],
                                                                      "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
    ]
    ex = load_examples("arc_challenge", _jsonl(tmp_path / "arc.jsonl", recs)).examples
    assert [e.answer for e in ex] == ["B", "A"]
    assert ex[0].choices == ("ice", "steam", "rock")


def test_gsm8k_and_reversal(tmp_path):
    rec = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                       "clips in May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                     "clips altogether in April and May.\n#### 1,072"}
    e = load_examples("gsm8k", _jsonl(tmp_path / "test.jsonl", [rec])).examples[0]
    assert e.answer == "1072" and "<<" not in e.rationale and e.id == "1"
    rev = load_examples("gsm8k_reversal", _jsonl(tmp_path / "rev.jsonl", [
        {"question": "Natalia sold 72 clips in total ... how many in April?", "answer": 48}])).examples[0]
    assert rev.answer == "48" and rev.task == "gsm8k_reversal"


def test_math_boxed_gold(tmp_path):
    recs = [{"problem": "What is $1/2 + 1/4$?", "level": "Level 1", "type": "Prealgebra",
             "solution": "We get $\\frac{2}{4}+\\frac14=\\boxed{\\frac{3}{4}}$."},
            {"problem": "Compute 2+2.", "answer": "4", "solution": "", "unique_id": "test/x.json"}]
    ex = load_examples("math", _jsonl(tmp_path / "m.jsonl", recs)).examples
    assert ex[0].answer == "\\frac{3}{4}" and ex[0].meta["type"] == "Prealgebra"
    assert ex[1].id == "test/x.json" and ex[1].answer == "4"


def test_tabmwp_dict_of_problems(tmp_path):
    p = tmp_path / "problems_dev.json"
    p.write_text(json.dumps({
        "7": {"question": "How much money does Ben need to buy a pen and a cup?", "choices": None,
              "answer": "1.25", "unit": "$", "table_title": "", "table": "pen | $0.50\ncup | $0.75",
              "ans_type": "decimal_number", "solution": "0.50 + 0.75 = 1.25"},
        "8": {"question": "Which is cheaper?", "choices": ["pen", "cup"], "answer": "pen", "unit": None,
              "table_title": "Prices", "table": "pen | $0.50\ncup | $0.75", "ans_type": "extractive_text"},
    }))
    ex = load_examples("tabmwp", p).examples
    assert ex[0].id == "7" and "pen | $0.50" in ex[0].question and ex[0].answer == "1.25"
    assert ex[1].choices == ("pen", "cup") and "Options: pen, cup" in ex[1].question
    t = get_task("tabmwp")
    assert t.is_correct(t.extract("The answer is $1.25."), "1.25")
    assert t.is_correct(t.extract("The answer is Pen."), "pen")


def test_anli_and_esnli(tmp_path):
    a = load_examples("anli", _jsonl(tmp_path / "a.jsonl", [
        {"uid": "u1", "premise": "P.", "hypothesis": "H.", "label": "c", "reason": "because"},
        {"uid": "u2", "premise": "P.", "hypothesis": "H.", "label": 1}])).examples
    assert [e.answer for e in a] == ["C", "B"] and a[0].choices[2] == "contradiction"
    csv_path = tmp_path / "esnli_test.csv"
    csv_path.write_text('pairID,gold_label,Sentence1,Sentence2,Explanation_1\n'
                        '"1#0e",entailment,"A man, outside.",A person is outdoors.,"outside, so outdoors"\n')
    e = load_examples("esnli", csv_path).examples[0]
    assert e.id == "1#0e" and e.answer == "A" and e.rationale == "outside, so outdoors"
    hf = load_examples("esnli", _jsonl(tmp_path / "e.jsonl", [
        {"premise": "p", "hypothesis": "h", "label": 2, "explanation_1": "x"}])).examples[0]
    assert hf.answer == "C"


def test_date_understanding_bigbench_and_bbh(tmp_path):
    p = tmp_path / "task.json"
    p.write_text(json.dumps({"name": "date_understanding", "examples": [
        {"input": "Today is 9/7. What is the date tomorrow in MM/DD/YYYY?",
         "target_scores": {"09/08/2021": 1, "09/06/2021": 0, "10/08/2021": 0}}]}))
    e = load_examples("date_understanding", p).examples[0]
    assert e.answer == "A" and "(C) 10/08/2021" in e.question
    q = tmp_path / "bbh.json"
    q.write_text(json.dumps({"examples": [
        {"input": "Today is ...\nOptions:\n(A) 12/14/2026\n(B) 12/14/1950", "target": "(B)"}]}))
    e = load_examples("date_understanding", q).examples[0]
    assert e.answer == "B" and e.choices == ("12/14/2026", "12/14/1950")


def test_boolq(tmp_path):
    e = load_examples("boolq", _jsonl(tmp_path / "dev.jsonl", [
        {"question": "do iran and afghanistan speak the same language", "title": "Persian language",
         "answer": True, "passage": "Persian is spoken in Iran and Afghanistan."}])).examples[0]
    assert e.answer == "yes" and e.question.endswith("Do iran and afghanistan speak the same language?")


def test_generic_example_records_for_any_task(tmp_path):
    ex = Example("q1", "gsm8k", "1+1?", "2", (), "1+1=2")
    got = load_examples("gsm8k", _jsonl(tmp_path / "g.jsonl", [ex.to_dict()])).examples
    assert got == [ex]


def test_malformed_line_reports_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n'
                 '{"question": "c"}\n{"question": "d", "answer": "#### 4"}\n')
    with pytest.raises(DatasetError, match=r"train\.jsonl:3: GSM8K record: invalid JSON"):
        load_examples("gsm8k", p)
    res = load_examples("gsm8k", p, skip_bad=True)
    assert [e.answer for e in res.examples] == ["1", "4"]
    assert len(res.skipped) == 2
    assert res.skipped[1].endswith("train.jsonl:4: GSM8K record: missing field 'answer'")


def test_bad_values_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r":1: .*answer key 'Z' is not one of the labels"):
        load_examples("commonsenseqa", _jsonl(tmp_path / "c.jsonl", [
            {"id": "x", "question": {"stem": "s", "choices": [{"label": "A", "text": "a"},
                                                              {"label": "B", "text": "b"}]},
             "answerKey": "Z"}]))
    with pytest.raises(DatasetError, match="not a yes/no answer"):
        load_examples("boolq", _jsonl(tmp_path / "b.jsonl", [{"question": "q", "passage": "p",
                                                              "answer": "maybe"}]))
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        load_examples("anli", _jsonl(tmp_path / "a.jsonl", [
            {"uid": "x", "premise": "p", "hypothesis": "h", "label": "e"}] * 2))
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_examples("gsm8k", tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("x")
        load_examples("gsm8k", tmp_path / "x.txt")
