"""The tiny student's tokenizer (models.build_tokenizer): the trainer's own prompt phrases are one id each,
the task's numbers are whole tokens, and text and ids survive a round trip."""
from __future__ import annotations

from collections import Counter

import pytest

from exgrpo.models import build_tokenizer, prompt_phrases
from exgrpo.probes.rules import load_rules
from exgrpo.tasks import get_task, synthetic


@pytest.fixture(scope="module")
def corpus_and_tok():
    task = get_task("synthetic")
    exs = synthetic.generate(300, "held_in", seed=3)
    corpus = [t for e in exs for t in (task.prompt(e), e.rationale)]
    return exs, corpus, build_tokenizer(corpus, vocab_size=500)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_prompt_phrase_is_one_id_inside_a_prompt(corpus_and_tok):
    exs, _, tok = corpus_and_tok
    rules = load_rules()
    for phrase in prompt_phrases():
        assert len(_ids(tok, phrase)) == 1, phrase
    task = get_task("synthetic")
    prompt = task.prompt(exs[0])
    assert task.instruction in prompt
    ids = _ids(tok, prompt)
    assert _ids(tok, task.instruction)[0] in ids
    # the probe answer instruction, after a probe's text, is one id as well
    probe = "How many apples does Tom have after the first step?\n" + rules.answer_instruction
    assert _ids(tok, probe)[-1] == _ids(tok, rules.answer_instruction)[0]


def test_chat_template_role_headers_are_one_id_each(corpus_and_tok):
    _, _, tok = corpus_and_tok
    chat = [{"role": "user", "content": "Tom has 5 apples."}, {"role": "assistant", "content": "The answer is 5."}]
    ids = tok.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:3] == ["<bos>", "<start_of_turn>", "user\n"]
    assert "model\n" in pieces


def test_frequent_numbers_are_whole_tokens_with_their_space(corpus_and_tok):
    _, corpus, tok = corpus_and_tok
    counts = Counter(w for text in corpus for w in text.replace(".", " ").split() if w.isdigit())
    frequent = [n for n, c in counts.items() if c >= 10]
    assert len(frequent) >= 20, counts            # the corpus exercises most of 0..30
    for n in frequent:
        assert len(_ids(tok, f" {n}")) == 1, n
    # an equation of the task: every number, operator and "=" is one id
    assert [tok.decode([i]) for i in _ids(tok, " 9 - 4 = 5")] == [" 9", " -", " 4", " =", " 5"]


def test_text_and_ids_round_trip(corpus_and_tok):
    _, corpus, tok = corpus_and_tok
    for text in corpus[:200]:
        ids = _ids(tok, text)
        assert tok.decode(ids) == text
        assert _ids(tok, tok.decode(ids)) == ids
