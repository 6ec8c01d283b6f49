"""Dialogues: Scenario A/B construction and the masks, token by token."""
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
