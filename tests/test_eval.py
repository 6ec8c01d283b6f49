"""`exgrpo eval`: scoring a hand-made output file (including answers that merely contain the gold
number), the synthetic splits, clear errors, and an end-to-end run of a tiny model in this process
and in a fresh one."""
import json
import shutil
from dataclasses import asdict

import pytest

from exgrpo.cli import main as cli_main
from exgrpo.evaluate import EvalConfig, EvalError, build_sets, evaluate, evaluate_in_subprocess
from exgrpo.tasks import Example, synthetic

# (id, gold, model output, prediction the extractor must return, correct)
CASES = [
    ("right", "12", "Tom starts with 5. 5 + 7 = 12. The answer is 12.", "12", True),
    # Contains the gold number, but the final statement says otherwise: the statement wins.
    ("contains", "12", "I think 12 is wrong. The answer is 21.", "21", False),
    # 12 only in the reasoning and no "The answer is": the extractor falls back to the LAST number
    # (answers.extract_number), which here is 9, so the mention of 12 earns nothing.
    ("reasoning_only", "12", "5 + 7 = 12. Then 12 - 3 = 9.", "9", False),
    # Digits must not match inside a longer number or a decimal.
    ("longer", "12", "The answer is 120.", "120", False),
    ("decimal", "12", "The answer is 12.5.", "12.5", False),
    # No number anywhere: no prediction at all.
    ("none", "12", "I do not know.", None, False),
    # The instruction ignored but the last number right: the documented fallback counts it.
    ("fallback", "7", "5 + 2 = 7", "7", True),
    ("thousands", "1234", "So the total is 1,234 coins. The answer is 1,234.", "1234", True),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def case_files(tmp_path):
    data = _write_jsonl(tmp_path / "cases.jsonl", [
        Example(id=i, task="synthetic", question=f"question {i}?", answer=g).to_dict() for i, g, *_ in CASES])
    outs = _write_jsonl(tmp_path / "outs.jsonl", [{"id": i, "output": o} for i, _, o, *_ in CASES])
    return data, outs


def test_outputs_file_is_scored_with_the_tasks_extractor(tmp_path, case_files, capsys):
    data, outs = case_files
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--data", f"mine={data}", "--outputs", str(outs), "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "synthetic  mine   8        3     37.5%" in table
    report = json.loads(out.read_text())
    assert report["accuracy"] == {"mine": 0.375}
    assert report["results"] == [{"task": "synthetic", "split": "mine", "n": 8, "correct": 3, "accuracy": 0.375,
                                  "notes": []}]
    got = {r["id"]: r for r in report["examples"]}
    for i, gold, output, pred, correct in CASES:
        assert got[i] == {"task": "synthetic", "split": "mine", "id": i, "prediction": pred, "gold": gold,
                          "correct": correct, "output": output}, i


def test_registry_task_file_and_missing_ids(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "gsm.jsonl", [
        {"id": "g1", "question": "2 + 10?", "answer": "2 + 10 = 12\n#### 12"},
        {"id": "g2", "question": "3 * 4?", "answer": "#### 12"},
        {"id": "g3", "question": "1 + 1?", "answer": "#### 2"},
    ])
    outs = _write_jsonl(tmp_path / "o.jsonl", [{"id": "g1", "output": "The answer is 12."},
                                               {"id": "g2", "output": "12? No. The answer is 13."}])
    rc = cli_main(["eval", "--task", "gsm8k", "--data", str(data), "--outputs", str(outs), "--out", "none"])
    assert rc == 2 and "no output for 1 example(s) of gsm8k/gsm: g3" in capsys.readouterr().err
    with outs.open("a") as f:
        f.write(json.dumps({"id": "g3", "output": "The answer is 2."}) + "\n")
    rc = cli_main(["eval", "--task", "gsm8k", "--data", str(data), "--outputs", str(outs), "--out", "none"])
    assert rc == 0 and "gsm8k  gsm    3        2     66.7%" in capsys.readouterr().out


def test_field_mapping_skipped_records_and_shuffled_options_reach_the_report(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "copy.jsonl", [
        {"qid": "b1", "question": "is it", "passage": "p", "gold": "yes"},
        {"qid": "b2", "question": "is it not", "passage": "p"},                  # no gold: skipped
        {"qid": "b3", "question": "really", "passage": "p", "gold": False}])
    outs = _write_jsonl(tmp_path / "o.jsonl", [{"id": "b1", "output": "The answer is yes."},
                                               {"id": "b3", "output": "The answer is yes."}])
    out = tmp_path / "r.json"
    args = ["eval", "--task", "boolq", "--data", str(data), "--outputs", str(outs), "--out", str(out),
            "--field", "answer=gold,id=qid"]
    assert cli_main(args) == 2 and "copy.jsonl:2: BoolQ record: --field answer=gold: the record has no 'gold'" in \
        capsys.readouterr().err
    assert cli_main([*args, "--skip-bad-lines"]) == 0
    table = capsys.readouterr().out
    assert "boolq  copy   2        1     50.0%" in table and "note (boolq/copy): skipped 1 unreadable" in table
    # a skewed multiple-choice file: options shuffled, and each example says how
    mc = _write_jsonl(tmp_path / "mc.jsonl", [
        {"id": f"q{i}", "question": f"Q{i}?", "answerKey": "A",
         "choices": {"text": [f"right{i}", "x", "y", "z"], "label": list("ABCD")}} for i in range(10)])
    sets = build_sets(EvalConfig(task="arc_challenge", data=(str(mc),)))
    outs = _write_jsonl(tmp_path / "mo.jsonl", [{"id": e.id, "output": f"The answer is ({e.answer})."}
                                                for e in sets[0].examples])
    assert cli_main(["eval", "--task", "arc_challenge", "--data", str(mc), "--outputs", str(outs),
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["accuracy"] == {"mc": 1.0} and "gold letter A answers 10 of 10" in report["results"][0]["notes"][0]
    assert all(x["options_shuffled"]["source_answer"] == "A" for x in report["examples"])


def test_synthetic_splits():
    cfg = EvalConfig(outputs="x", split=("train", "test", "ood", "held_in"), n=5, n_train=40, seed=3)
    sets = {s.split: s.examples for s in build_sets(cfg)}
    ref = synthetic.make_splits(40, 5, 5, seed=3)
    assert [e.id for e in sets["test"]] == [e.id for e in ref["test"]]
    assert [e.id for e in sets["ood"]] == [e.id for e in ref["ood"]]
    assert [e.id for e in sets["train"]] == [e.id for e in ref["train"]]
    # held_in is the start of the training stream; test shares no question with train.
    assert [e.id for e in sets["held_in"]] == [e.id for e in ref["train"][:5]]
    assert not {e.question for e in sets["test"]} & {e.question for e in sets["train"]}


def test_errors_are_clear(tmp_path, case_files, capsys):
    data, outs = case_files
    cases = [
        (["--split", "test,dev", "--outputs", str(outs)], "unknown synthetic split(s) ['dev']"),
        (["--task", "gsm9k", "--outputs", str(outs)], "unknown task 'gsm9k'"),
        (["--task", "gsm8k", "--outputs", str(outs)], "task 'gsm8k' needs --data"),
        (["--data", str(data)], "give exactly one of --model"),
        (["--data", str(data), "--outputs", str(tmp_path / "nope.jsonl")], "outputs file not found"),
        (["--data", str(tmp_path / "nope.jsonl"), "--outputs", str(outs)], "dataset file not found"),
        (["--model", str(tmp_path / "nodir")], "model directory not found"),
        (["--n", "many", "--outputs", str(outs)], "'n' must be int"),
    ]
    for argv, msg in cases:
        assert cli_main(["eval", "--out", "none", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert cli_main(["eval", "--model", str(tmp_path / "empty"), "--out", "none"]) == 2
    assert "no weights" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "right", "output": "x"}\n{"id": "right", "output": "y"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: duplicate id 'right'"):
        evaluate(EvalConfig(data=(str(data),), outputs=str(bad), out=None))


# ---------------------------------------------------------------- a tiny model, end to end

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from exgrpo.models import build_tiny_student
    corpus = [f"{e.question} {e.rationale}" for e in synthetic.make_splits(60, 0, 20)["train"]]
    return build_tiny_student(tmp_path_factory.mktemp("tiny") / "student", corpus, vocab_size=300)


def test_end_to_end_tiny_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", "--model", str(tiny_model), "--split", "test,ood", "--n", "3", "--n-train", "60",
                   "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "synthetic  test" in table and "synthetic  ood" in table and f"report: {out}" in table
    report = json.loads(out.read_text())
    assert set(report) == {"task", "model", "outputs", "accuracy", "results", "examples", "config", "seconds"}
    assert report["model"] == str(tiny_model) and set(report["accuracy"]) == {"test", "ood"}
    assert [r["n"] for r in report["results"]] == [3, 3]
    assert len(report["examples"]) == 6
    for r in report["examples"]:
        assert set(r) == {"task", "split", "id", "prediction", "gold", "correct", "output"}
        assert "<end_of_turn>" not in r["output"]
    # The recorded outputs, scored as a hand-made file, give the same verdicts.
    outs = _write_jsonl(tmp_path / "o.jsonl", [{"id": r["id"], "output": r["output"]} for r in report["examples"]])
    again = evaluate(EvalConfig(outputs=str(outs), split=("test", "ood"), n=3, n_train=60, out=None))
    assert [r["correct"] for r in again["examples"]] == [r["correct"] for r in report["examples"]]

    # A fresh process loads the directory with from_pretrained and, greedy on the same device,
    # writes the same answers.
    sub = evaluate_in_subprocess(tiny_model, EvalConfig(**{**report["config"], "split": ("test", "ood"),
                                                           "data": (), "out": None, "progress": False}))
    assert [r["output"] for r in sub["examples"]] == [r["output"] for r in report["examples"]]
    assert sub["results"] == report["results"]


def test_many_models_in_one_fresh_process_each_as_alone(tiny_model, tmp_path):
    """evaluate_many_in_subprocess: two different checkpoints in one interpreter; each report is what evaluating
    that model alone in this process gives, written to its own --out."""
    from transformers import AutoModelForCausalLM

    from exgrpo.evaluate import evaluate_many_in_subprocess
    # The other checkpoint: the same model with its final norm's scale (1 + w) set to -1, so every logit is
    # negated and greedy decoding answers differently (two random tiny models can both repeat one token).
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    m.model.norm.weight.data.fill_(-2.0)
    m.save_pretrained(str(other))
    cfg = EvalConfig(split=("test", "ood"), n=3, n_train=60, max_new_tokens=8, batch_size=2, device="cpu",
                     progress=False)
    alone = [evaluate(EvalConfig(**{**asdict(cfg), "model": str(m), "out": None})) for m in (tiny_model, other)]
    assert [r["output"] for r in alone[0]["examples"]] != [r["output"] for r in alone[1]["examples"]]
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    reps = evaluate_many_in_subprocess([(m, EvalConfig(**{**asdict(cfg), "out": str(o)}))
                                        for m, o in zip((tiny_model, other), outs)])
    for rep, ref, out in zip(reps, alone, outs):
        assert rep["model"] == ref["model"] and rep["results"] == ref["results"]
        assert [r["output"] for r in rep["examples"]] == [r["output"] for r in ref["examples"]]
        assert json.loads(out.read_text())["examples"] == rep["examples"]


def test_tokenizer_without_chat_template_is_refused(tiny_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink()
    assert cli_main(["eval", "--model", str(bare), "--n", "1", "--out", "none"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    with pytest.raises(EvalError, match="failed in a subprocess"):
        evaluate_in_subprocess(bare, EvalConfig(n=1, progress=False))
