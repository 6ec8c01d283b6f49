"""A local transformers chat model, greedy: the transformers teacher and the filter-2 student."""
from __future__ import annotations

from typing import Any


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of at most `batch_size`, shortest first: a batch holds texts of similar
    length (little left padding; for generation, answers of similar length, so it stops with its longest)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    step = max(1, batch_size)
    return [order[i:i + step] for i in range(0, len(order), step)]


class LocalChatModel:
    def __init__(self, model_dir: str, max_new_tokens: int = 256, device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer

        from exgrpo.models import from_pretrained_checked

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        # Left padding: generated tokens then start at the same column for every row of a batch.
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = from_pretrained_checked(model_dir).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # No template (a bare base model): plain "role: content" lines.
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def generate(self, convs: list[list[dict[str, str]]]) -> list[str]:
        texts = [self.render(m) for m in convs]
        enc: Any = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with self.torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]  # [B, new tokens]
        return self.tok.batch_decode(new, skip_special_tokens=True)
