"""The transformers student and teacher on a tiny randomly initialised model built here."""
import threading

import pytest

from exgrpo.tasks.synthetic import CHARSET

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(CHARSET + "<>|_")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return str(d)


def test_transformers_student_answers_every_prompt_in_order(tiny_model_dir):
    from exgrpo.probes.student import TransformersStudent
    st = TransformersStudent(tiny_model_dir, max_new_tokens=4, batch_size=2)
    prompts = ["What is 1 + 1?", "Hi", "A much longer prompt, to force left padding?"]
    out = st.answer(prompts)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert out == st.answer(prompts)                    # greedy: deterministic
    assert out[1] == st.answer(["Hi"])[0]               # left padding does not change the answer
    assert out == [st.answer([p])[0] for p in prompts]


def test_transformers_student_batches_by_length_and_answers_in_order(tiny_model_dir):
    """Batches are of similar-length prompts; every answer still lands at its own prompt."""
    from exgrpo.probes.student import TransformersStudent
    st = TransformersStudent(tiny_model_dir, max_new_tokens=4, batch_size=2)
    batches = []

    def echo(convs):
        batches.append([c[0]["content"] for c in convs])
        return [f"re: {c[0]['content']}" for c in convs]

    st._m.generate = echo
    prompts = ["a much longer prompt", "b", "ccc", "dd", "a prompt of middle size"]
    assert st.answer(prompts) == [f"re: {p}" for p in prompts]
    assert batches == [["b", "dd"], ["ccc", "a much longer prompt"], ["a prompt of middle size"]]


def test_transformers_teacher_batches_concurrent_requests(tiny_model_dir):
    from exgrpo.probes.backends import TransformersBackend
    b = TransformersBackend(tiny_model_dir, max_new_tokens=3, batch_size=8)
    sizes = []
    inner = b._model.generate

    def spy(convs):
        sizes.append(len(convs))
        return inner(convs)

    b._model.generate = spy
    replies = [None] * 6

    def ask(i):
        replies[i] = b.complete([{"role": "user", "content": f"q{i}"}])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in replies) and sum(sizes) == 6
    assert max(sizes) > 1                               # the micro-batcher did batch
