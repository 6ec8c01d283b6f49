"""Model and data at a benchmark's shape, without a real checkpoint or dataset: the Gemma-7B config, a
word-level tokenizer ("w17 w4" is exactly the ids 17, 4) and probe sets of random-word questions whose
lengths in tokens are their lengths in words. bench/step.py times a step on them and `exgrpo plan`
plans one (exgrpo.plan)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

GEMMA_7B = dict(model_type="gemma", hidden_size=3072, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=16, head_dim=256, intermediate_size=24576, vocab_size=256000,
                max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(model_type="gemma", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, intermediate_size=256, vocab_size=1000, max_position_embeddings=8192,
            tie_word_embeddings=True)
SMALL = dict(TINY, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=512)
BUILT_IN = {"gemma-7b": GEMMA_7B, "tiny": TINY, "small": SMALL}
SPECIAL = ("<pad>", "<end_of_turn>", "<bos>", "<unk>", "<start_of_turn>", "user", "model")   # ids 0-6; then w<id>


def word_tokenizer(vocab: int):
    """A word-level tokenizer over V ids: text "w17 w4" <-> ids [17, 4], the chat template's markers as
    special tokens, nothing added around a text, so a prompt's length in tokens is its number of words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from exgrpo.models import CHAT_TEMPLATE
    words = {t: i for i, t in enumerate(SPECIAL)} | {f"w{i}": i for i in range(len(SPECIAL), vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)    # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<end_of_turn>",
                                  bos_token="<bos>", unk_token="<unk>", additional_special_tokens=["<start_of_turn>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def random_words(g: torch.Generator, n: int, vocab: int) -> str:
    return " ".join(f"w{i}" for i in torch.randint(len(SPECIAL), vocab, (n,), generator=g).tolist())


def random_probe_set(path: Path, *, questions: int, k_probes: int, probe_len: int, question_len: int,
                     response_len: int, vocab: int) -> Path:
    """`questions` random-word questions with `k_probes` probes each and an R_T, in exgrpo probe's probe_set.jsonl
    format. The R_Ts come from a generator of their own, so the questions and probes are what they were before
    the probe set had R_Ts."""
    g, g_rationale = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    lines = []
    for q in range(questions):
        ex = {"id": f"bench-{q}", "task": "gsm8k", "question": random_words(g, question_len, vocab), "answer": "1"}
        probes = [{"rule": f"rule{j}", "probe": (pr := random_words(g, probe_len, vocab)), "prompt": pr,
                   "response": random_words(g, response_len, vocab), "probe_answer": "1", "kept": True}
                  for j in range(k_probes)]
        rationale = random_words(g_rationale, response_len, vocab)                # R_T, for SFT's Q -> R_T pair
        lines.append(json.dumps({"kept": True, "example": ex, "probes": probes, "rationale": rationale,
                                 "rationale_source": "teacher"}))
    path.write_text("\n".join(lines) + "\n")
    return path
