"""Loaders on small files in each dataset's public format, and malformed-line handling."""
import json

import pytest

from exgrpo.tasks import PAPER_TASKS, TASKS, DatasetError, Example, get_task, load_examples
from exgrpo.tasks.example import LETTERS


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
    # BIG-bench lists the right option first: the options are shuffled, the gold follows its text
    assert e.choices[LETTERS.index(e.answer)] == "09/08/2021" and sorted(e.choices) == sorted(
        ["09/08/2021", "09/06/2021", "10/08/2021"])
    assert e.meta["options_shuffled"]["source_answer"] == "A"
    assert "\n".join(f"({L}) {c}" for L, c in zip("ABC", e.choices)) in e.question
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
    assert "train.jsonl:4: GSM8K record: missing field 'answer'; the record has question;" in res.skipped[1]


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
    with pytest.raises(DatasetError, match=r"x\.txt:1: invalid JSON .*not JSON Lines either"):
        (tmp_path / "x.txt").write_text("x")
        load_examples("gsm8k", tmp_path / "x.txt")


# ---------------------------------------------------------------- file forms, decided by content

def test_json_lines_under_a_json_name_and_json_under_a_jsonl_name(tmp_path):
    recs = [{"id": "r1", "question": "Q1?", "answer": "5"}, {"id": "r2", "question": "Q2?", "answer": "7"}]
    jl = _jsonl(tmp_path / "test-backward.json", recs)            # GSM8K-Reversal's public file is like this
    assert [e.answer for e in load_examples("gsm8k_reversal", jl).examples] == ["5", "7"]
    doc = tmp_path / "list.jsonl"
    doc.write_text(json.dumps(recs, indent=2))                     # a JSON document, whatever the name
    assert [e.id for e in load_examples("gsm8k_reversal", doc).examples] == ["r1", "r2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs[0]) + "\n{broken\n")
    with pytest.raises(DatasetError, match=r"bad\.json:2: GSM8K-Reversal record: invalid JSON"):
        load_examples("gsm8k_reversal", bad)


def test_parquet_the_hub_exports(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    boolq = tmp_path / "validation-00000-of-00001.parquet"        # google/boolq
    pq.write_table(pa.Table.from_pylist([
        {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
        {"question": "is fire cold", "answer": False, "passage": "Fire is hot."}]), boolq)
    assert [e.answer for e in load_examples("boolq", boolq).examples] == ["yes", "no"]
    sglue = tmp_path / "superglue.parquet"                         # SuperGLUE: label 0/1, idx
    pq.write_table(pa.Table.from_pylist([{"question": "q", "passage": "p", "idx": 7, "label": 1}]), sglue)
    e = load_examples("boolq", sglue).examples[0]
    assert (e.id, e.answer) == ("7", "yes")
    arc = tmp_path / "arc.bin"                                     # by its magic bytes, not its name
    pq.write_table(pa.Table.from_pylist([{"id": "M_1", "question": "Which is a gas?", "answerKey": "3",
                                          "choices": {"text": ["ice", "rock", "steam"], "label": ["1", "2", "3"]}}]),
                   arc)
    e = load_examples("arc_challenge", arc).examples[0]
    assert e.answer == "C" and e.choices == ("ice", "rock", "steam")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"broken\.parquet: not a readable Parquet file"):
        load_examples("boolq", broken)


def test_math_release_folder_one_problem_per_file(tmp_path):
    root = tmp_path / "MATH" / "test"
    for subject, n, sol in (("algebra", 10, "So $x=\\boxed{3}$."), ("algebra", 2, "It is $\\boxed{\\frac{1}{2}}$."),
                            ("geometry", 1, "The area is $\\boxed{4\\pi}$.")):
        (root / subject).mkdir(parents=True, exist_ok=True)
        (root / subject / f"{n}.json").write_text(json.dumps(
            {"problem": f"{subject} {n}?", "level": "Level 2", "type": subject.title(), "solution": sol}, indent=4))
    ex = load_examples("math", tmp_path / "MATH").examples
    assert [e.id for e in ex] == ["test/algebra/2", "test/algebra/10", "test/geometry/1"]   # natural order
    assert [e.answer for e in ex] == ["\\frac{1}{2}", "3", "4\\pi"]
    one = load_examples("math", root / "geometry" / "1.json").examples[0]                   # one file alone
    assert one.answer == "4\\pi" and one.meta["type"] == "Geometry"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="a folder with no data file"):
        load_examples("math", tmp_path / "empty")


def test_non_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    with pytest.raises(DatasetError, match=r"t\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_examples("gsm8k", p)


# ---------------------------------------------------------------- field names that differ between copies

def test_label_variants_are_mapped_per_dataset(tmp_path):
    b = load_examples("boolq", _jsonl(tmp_path / "b.jsonl", [
        {"question": "q1", "passage": "T -- p", "label": "yes", "id": "t0"},
        {"question": "q2", "passage": "p", "label": "no"}, {"question": "q3", "passage": "p", "label": 0}])).examples
    assert [e.answer for e in b] == ["yes", "no", "no"]
    a = load_examples("anli", _jsonl(tmp_path / "a.jsonl", [     # the release: context + e/n/c
        {"uid": "1", "context": "P.", "hypothesis": "H.", "label": "n", "reason": "r", "genre": "wiki"},
        {"uid": "2", "premise": "P.", "hypothesis": "H.", "label": "contradiction"}])).examples
    assert [e.answer for e in a] == ["B", "C"] and a[0].rationale == "r"
    s = load_examples("strategyqa", _jsonl(tmp_path / "s.jsonl", [
        {"qid": "x", "question": "Q?", "answer": True, "facts": "One fact as a string."}])).examples[0]
    assert s.answer == "yes" and s.rationale == "One fact as a string."
    big = tmp_path / "task.json"                                    # BIG-bench's strategyqa
    big.write_text(json.dumps({"examples": [{"input": "Are owls birds?", "target_scores": {"Yes": 1, "No": 0},
                                             "target": "Yes. Owls are birds of prey."}]}))
    s = load_examples("strategyqa", big).examples[0]
    assert (s.question, s.answer, s.rationale) == ("Are owls birds?", "yes", "Owls are birds of prey.")


def test_field_mapping_without_code(tmp_path):
    recs = [{"qid": "z1", "query": {"text": "is it?"}, "ctx": "passage", "gold": "True"}]
    p = _jsonl(tmp_path / "copy.jsonl", recs)
    with pytest.raises(DatasetError) as err:
        load_examples("boolq", p)
    msg = str(err.value)
    # where, what is missing, what is there, and the flag that would fix it
    assert msg.startswith(f"{p}:1: BoolQ record: missing field 'passage'")
    assert "the record has qid, query, ctx, gold" in msg and "--field passage=" in msg
    e = load_examples("boolq", p, fields=("passage=ctx", "question=query.text", "answer=gold", "id=qid")).examples[0]
    assert (e.answer, e.id) == ("yes", "z1") and "Is it?" in e.question
    with pytest.raises(DatasetError, match=r"--field answer=nope: the record has no 'nope' \(it has qid, query"):
        load_examples("boolq", p, fields=("passage=ctx", "question=query.text", "answer=nope"))
    with pytest.raises(ValueError, match="expected NAME=SOURCE"):
        load_examples("boolq", p, fields=("answer",))


def test_missing_field_suggests_the_likely_source(tmp_path):
    with pytest.raises(DatasetError, match=r"if 'label' holds it, pass --field answer=label"):
        load_examples("gsm8k", _jsonl(tmp_path / "g.jsonl", [{"question": "q", "label": "3"}]))


# ---------------------------------------------------------------- options whose order gives the answer away

def _mc(i, gold_first=True):
    opts = [f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"]
    return {"id": f"q{i}", "question": f"Question {i}?", "choices": {"text": opts, "label": list("ABCD")},
            "answerKey": "A" if gold_first else "ABCD"[i % 4]}


def test_skewed_gold_letters_are_shuffled_the_same_every_time(tmp_path):
    p = _jsonl(tmp_path / "skewed.jsonl", [_mc(i) for i in range(40)])
    res = load_examples("arc_challenge", p)
    assert res.notes and "gold letter A answers 40 of 40" in res.notes[0]
    letters = [e.answer for e in res.examples]
    assert max(letters.count(x) for x in "ABCD") <= 0.4 * len(letters)       # spread over the options
    for e in res.examples:                                                      # the gold follows its text
        assert e.choices[LETTERS.index(e.answer)].startswith("right ")
        assert e.meta["options_shuffled"]["source_answer"] == "A"
        assert e.question.endswith("\n".join(f"({L}) {c}" for L, c in zip("ABCD", e.choices)))
    again = load_examples("arc_challenge", p)
    assert again.examples == res.examples                                       # same on a rerun
    head = load_examples("arc_challenge", p, limit=5)                           # --limit: the same questions
    assert head.examples == res.examples[:5]
    balanced = load_examples("arc_challenge", _jsonl(tmp_path / "ok.jsonl", [_mc(i, False) for i in range(40)]))
    assert not balanced.notes and all("options_shuffled" not in e.meta for e in balanced.examples)
    assert [e.answer for e in balanced.examples] == ["ABCD"[i % 4] for i in range(40)]


# ---------------------------------------------------------------- the published formats we have no real file of

def test_openbookqa_release_and_hub_formats(tmp_path):
    release = {"id": "8-343", "question": {"stem": "A person wants to start saving money so that they can afford a "
                                                   "nice vacation at the end of the year. After looking over their "
                                                   "budget and expenses, they decide the best way to save money is to",
                                           "choices": [{"text": "make more phone calls", "label": "A"},
                                                       {"text": "quit eating lunch out", "label": "B"},
                                                       {"text": "buy less with monopoly money", "label": "C"},
                                                       {"text": "have lunch with friends", "label": "D"}]},
               "answerKey": "B", "fact1": "using less resources usually causes money to be saved",
               "humanScore": "1.00", "clarity": "2.00", "turkIdAnonymized": "b356d338b7"}
    hub = {"id": "7-980", "question_stem": "The sun is responsible for",
           "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                       "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
    ex = load_examples("openbookqa", _jsonl(tmp_path / "test_complete.jsonl", [release, hub])).examples
    assert [e.answer for e in ex] == ["B", "D"] and ex[0].rationale.startswith("using less resources")
    assert ex[1].question.startswith("The sun is responsible for\nAnswer Choices:\n(A) puppies")


def test_esnli_release_csv(tmp_path):
    header = ("pairID,gold_label,Sentence1,Sentence2,Explanation_1,Sentence1_marked_1,Sentence2_marked_1,"
              "Sentence1_Highlighted_1,Sentence2_Highlighted_1,Explanation_2,Sentence1_marked_2")
    rows = ['2677109430.jpg#1r1n,neutral,"This church choir sings to the masses as they sing joyous songs from the '
            'book at a church.",The church has cracks in the ceiling.,"Not all churches have cracks in the ceiling",'
            '*This* church,The *church* has,0,1,"x",y',
            '2677109430.jpg#1r1e,entailment,"This church choir sings to the masses.",The church is filled with '
            'song.,"""Filled with song"" is a rephrasing of the ""choir sings to the masses.""",a,b,c,d,e,f',
            '9999.jpg#0r1c,-,A man.,A woman.,unsure,a,b,c,d,e,f']
    p = tmp_path / "esnli_test.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"esnli_test\.csv:4: e-SNLI record: no gold label \('-'"):
        load_examples("esnli", p)
    res = load_examples("esnli", p, skip_bad=True)
    assert [(e.id, e.answer) for e in res.examples] == [("2677109430.jpg#1r1n", "B"), ("2677109430.jpg#1r1e", "A")]
    assert res.examples[1].rationale == '"Filled with song" is a rephrasing of the "choir sings to the masses."'
