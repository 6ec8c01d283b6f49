"""Dialogues: Scenario A/B construction and the masks, token by token; the probe set's R_T and probe text, the
same in filter 2, SFT and the rollouts."""
import json
import random

import pytest

from exgrpo.dialogues import (
    POLICY,
    SFT,
    DialogueError,
    dialogue,
    load_probe_set,
    partial_count,
    render,
    sample_probes,
)
from exgrpo.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_student):
    return load_tokenizer(tiny_student)


@pytest.fixture(scope="module")
def item(probe_dir):
    return load_probe_set(probe_dir)[0]


def spans(tok, t, mask):
    """The decoded text of each maximal run of masked tokens."""
    out, cur = [], []
    for i, m in zip(t.ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def test_scenario_a_masks_are_exactly_the_student_turns(tok, item):
    probes = sample_probes(item, 3, random.Random(0))
    answers = ["First answer. The answer is 4.", "Second: 7.", "Third one."]
    final = "2 + 2 = 4. The answer is 4."
    t = render(tok, dialogue(probes, answers, item.example, final, answer_train=POLICY))
    assert spans(tok, t, t.policy) == [a + "<end_of_turn>" for a in answers + [final]]
    assert not any(t.sft)
    # every other token (all user turns, role headers, bos) is prompt
    text = tok.decode(t.ids)
    for p in probes:
        assert p.question in text
    assert len(t.ids) == len(t.policy) == len(t.sft)


def test_scenario_b_is_a_prefix_of_a_with_fewer_probes(tok, item):
    rng = random.Random(3)
    full = sample_probes(item, 5, rng)
    k = partial_count(len(full), rng)
    assert 1 <= k < len(full)
    t = render(tok, dialogue(full[:k], ["a"] * k, item.example, "The answer is 1.", answer_train=POLICY))
    assert spans(tok, t, t.policy) == ["a<end_of_turn>"] * k + ["The answer is 1.<end_of_turn>"]


def test_teacher_forced_probe_answers_get_the_sft_mask(tok, item):
    probes = list(item.probes[:2])
    t = render(tok, dialogue(probes, None, None, None, answer_train=SFT))
    assert spans(tok, t, t.sft) == [p.response + "<end_of_turn>" for p in probes]
    assert not any(t.policy)


def test_sampling_without_replacement_and_partial_counts(item):
    rng = random.Random(0)
    for _ in range(20):
        ps = sample_probes(item, 5, rng)
        assert len(ps) == 5 and len({p.rule for p in ps}) == 5
        assert 1 <= partial_count(5, rng) <= 4
    assert partial_count(1, rng) == 0


def test_non_prefix_stable_template_is_refused(tok, item):
    import copy
    bad = copy.deepcopy(tok)
    bad.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} ({{ loop.length }})\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DialogueError, match="not prefix-stable"):
        render(bad, dialogue(list(item.probes[:1]), ["x"], None, None, answer_train=POLICY))


def test_empty_probe_set_is_an_error(tmp_path):
    (tmp_path / "probe_set.jsonl").write_text("")
    with pytest.raises(DialogueError, match="no kept question"):
        load_probe_set(tmp_path)
    with pytest.raises(DialogueError, match="not found"):
        load_probe_set(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- what the probe set says is shown

def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _record(ex_id, rationale, example_rationale=None, probes=(), kept=True, **kw):
    ex = {"id": ex_id, "task": "synthetic", "question": f"Sam has {ex_id} pens. How many?", "answer": "3",
          "rationale": example_rationale}
    return {"key": ex_id, "kept": kept, "example": ex, "rationale": rationale, "rationale_source": "teacher",
            "probes": list(probes), **kw}


def _probe(rule="why", prompt="Why 3?\nAnswer the question.", **kw):
    return {"rule": rule, "probe": "Why 3?", "prompt": prompt, "response": "Because. The answer is 3.",
            "probe_answer": "3", "kept": True, **kw}


def test_the_probe_text_filter2_saw_is_the_text_of_sft_and_of_the_rollouts(tok, tmp_path):
    from exgrpo.distributed import SINGLE
    from exgrpo.probes import OracleTeacher, load_rules, run_pipeline
    from exgrpo.sft import SFTConfig, sft_sequences
    from exgrpo.step import plan_step
    from exgrpo.tasks import get_task, synthetic
    from exgrpo.train import TrainConfig

    rules = load_rules()

    class Recording:
        """Filter 2's student: remembers every prompt; right on the 'why' and 'inverse' probes only."""
        fingerprint = "recording"

        def __init__(self):
            self.seen = []

        def answer(self, prompts):
            self.seen += prompts
            out = []
            for p in prompts:
                ex, rule = by_prompt[p]
                out.append(f"The answer is {synthetic.oracle_probe(ex, rule).answer}." if rule in ("why", "inverse")
                           else "The answer is 123456.")
            return out

    exs = synthetic.generate(3, "held_in", 5)
    by_prompt = {f"{synthetic.oracle_probe(e, r).question}\n{rules.answer_instruction}": (e, r)
                 for e in exs for r in synthetic.RULES}
    student = Recording()
    run_pipeline([(get_task("synthetic"), e) for e in exs], OracleTeacher(), rules, tmp_path, student=student)
    items = load_probe_set(tmp_path)
    assert len(items) == 3 and all(len(it.probes) == 10 for it in items)
    seen = set(student.seen)
    shown = {p.question for it in items for p in it.probes}
    assert shown == seen and all(q.endswith("\n" + rules.answer_instruction) for q in shown)
    # SFT: each probe's user turn is that text, character for character.
    seqs = sft_sequences(items, tok, SFTConfig(with_original=False))
    texts = [tok.decode(s.ids) for s in seqs]
    assert len(texts) == 30
    for text, p in zip(texts, [p for it in items for p in it.probes]):
        assert f"<start_of_turn>user\n{p.question}<end_of_turn>" in text
    # ExGRPO: the rollout dialogues' probe turns, and the L_aux dialogues', are those texts too.
    cfg = TrainConfig(questions_per_step=3, group_size=2, k_probes=4)
    plan = plan_step(items, 0, 0, cfg, SINGLE)
    turns = [u["content"] for t in plan.trajectories for u in t.turns[:-1]]
    assert turns and set(turns) <= seen
    aux = render(tok, dialogue(list(plan.aux_probes[0]), None, None, None, answer_train=SFT))
    for p in plan.aux_probes[0]:
        assert f"<start_of_turn>user\n{p.question}<end_of_turn>" in tok.decode(aux.ids)


def test_sft_and_the_tokenizer_corpus_use_the_probe_sets_rationale(tok, tmp_path):
    from exgrpo.models import corpus_for
    from exgrpo.sft import SFTConfig, sft_sequences
    _write(tmp_path / "probe_set.jsonl", [
        _record("q-1", "TEACHER: 1 + 2 = 3. The answer is 3.", example_rationale="DATASET: three."),
        _record("q-2", "TEACHER: 2 + 1 = 3. The answer is 3."),
    ])
    items = load_probe_set(tmp_path)
    assert [it.rationale for it in items] == ["TEACHER: 1 + 2 = 3. The answer is 3.",
                                              "TEACHER: 2 + 1 = 3. The answer is 3."]
    assert items[0].example.rationale == "DATASET: three." and items[0].rationale_source == "teacher"
    seqs = sft_sequences(items, tok, SFTConfig(with_probes=False))
    assert [spans(tok, s, s.sft) for s in seqs] == [[it.rationale + "<end_of_turn>"] for it in items]
    corpus = corpus_for(items)
    assert items[0].rationale in corpus and "DATASET: three." not in corpus
    # A kept question without an R_T in its record cannot make the Q -> R_T pair: the error names it.
    _write(tmp_path / "probe_set.jsonl", [_record("q-3", None, example_rationale="DATASET: three.")])
    with pytest.raises(ValueError, match=r"question q-3 \(synthetic\) has no R_T in the probe set"):
        sft_sequences(load_probe_set(tmp_path), tok, SFTConfig())


def test_probe_text_comes_from_the_record_and_the_last_record_of_a_question_wins(tmp_path):
    _write(tmp_path / "probe_set.jsonl", [
        _record("q-1", "old R_T", probes=[_probe(prompt="OLD\nAnswer.")]),
        _record("q-2", "R_T 2", probes=[_probe()]),
        _record("q-1", "new R_T", probes=[_probe(prompt="NEW\nAnswer."), _probe("inverse", kept=False)]),
    ])
    items = load_probe_set(tmp_path)
    assert [(it.example.id, it.rationale) for it in items] == [("q-1", "new R_T"), ("q-2", "R_T 2")]
    assert [p.question for p in items[0].probes] == ["NEW\nAnswer."]
    # A later record that drops the question wins over an earlier kept one.
    with (tmp_path / "probe_set.jsonl").open("a") as f:
        f.write(json.dumps(_record("q-2", None, kept=False, verdict="no_rationale")) + "\n")
    assert [it.example.id for it in load_probe_set(tmp_path)] == ["q-1"]


def test_a_probe_set_without_probe_prompts_is_refused_with_the_fix(tmp_path):
    old = _probe()
    del old["prompt"]
    _write(tmp_path / "probe_set.jsonl", [_record("q-1", "R_T", probes=[old])])
    with pytest.raises(DialogueError, match=r"probe_set.jsonl:1: probe 'why' of question 'q-1' has no 'prompt'.*"
                                            r"older `exgrpo probe`; run the same `exgrpo probe` command again"):
        load_probe_set(tmp_path)
    (tmp_path / "probe_set.jsonl").write_text('{"kept": true}\n')
    with pytest.raises(DialogueError, match=r"probe_set.jsonl:1: not a probe-set record"):
        load_probe_set(tmp_path)


@pytest.mark.parametrize("field", ["probe_answer", "response", "probe"])
def test_an_incomplete_kept_probe_is_named(field, tmp_path):
    bad = _probe()
    bad[field] = None
    _write(tmp_path / "probe_set.jsonl", [_record("q-1", "R_T", probes=[bad])])
    with pytest.raises(DialogueError, match=rf"probe_set.jsonl:1: kept probe 'why' of question 'q-1' has no {field}: "
                                            "the record is incomplete"):
        load_probe_set(tmp_path)


def test_an_example_without_its_fields_is_named(tmp_path):
    rec = _record("q-1", "R_T")
    del rec["example"]["answer"]
    _write(tmp_path / "probe_set.jsonl", [rec])
    with pytest.raises(DialogueError, match=r"probe_set.jsonl:1: the question's 'example' has no 'answer' \(it has id"):
        load_probe_set(tmp_path)


def test_sft_chat_probes_put_the_pair_after_its_probes_every_reply_trained(tok, tmp_path):
    """The instruct stage's sequences: each original pair after 0..2 of its own probes, the probes' teacher
    answers and R_T all trained, the user turns untrained; the draw is seeded and covers 0, 1 and 2."""
    from exgrpo.probes import OracleTeacher, load_rules, run_pipeline
    from exgrpo.sft import SFTConfig, sft_sequences
    from exgrpo.tasks import get_task, synthetic
    exs = synthetic.generate(16, "held_in", 6)
    run_pipeline([(get_task("synthetic"), e) for e in exs], OracleTeacher(), load_rules(None), tmp_path)
    items = load_probe_set(tmp_path)
    cfg = SFTConfig(with_probes=False, chat_probes=2)
    seqs = sft_sequences(items, tok, cfg)
    assert len(seqs) == len(items) == 16
    counts = set()
    for it, s in zip(items, seqs):
        trained = spans(tok, s, s.sft)
        assert trained[-1] == it.rationale + "<end_of_turn>"
        by_response = {p.response + "<end_of_turn>": p for p in it.probes}
        before = [by_response[x] for x in trained[:-1]]        # each earlier reply is one of its probes' answers
        text = tok.decode(s.ids)
        for p in before:
            assert f"<start_of_turn>user\n{p.question}<end_of_turn>" in text
        assert text.index(before[-1].question if before else "<start_of_turn>") < text.index(it.example.question)
        counts.add(len(before))
    assert counts == {0, 1, 2}
    assert [x.ids for x in sft_sequences(items, tok, cfg)] == [x.ids for x in seqs]
