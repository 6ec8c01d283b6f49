"""The student that judges difficulty in filter 2: answers a list of prompts, returns texts."""
from __future__ import annotations

import json
from typing import Protocol


class Student(Protocol):
    fingerprint: str

    def answer(self, prompts: list[str]) -> list[str]: ...


class TransformersStudent:
    """An untrained (or any) local transformers model directory, greedy, chat template."""

    def __init__(self, model_dir: str, max_new_tokens: int = 256, batch_size: int = 16, device: str = "cpu"):
        from exgrpo.probes.local_model import LocalChatModel
        self._m = LocalChatModel(model_dir, max_new_tokens=max_new_tokens, device=device)
        self.batch_size = max(1, batch_size)
        self.fingerprint = json.dumps({"student": "transformers", "model": model_dir,
                                       "max_new_tokens": max_new_tokens}, sort_keys=True)

    def answer(self, prompts: list[str]) -> list[str]:
        """One greedy answer per prompt, in the prompts' order. Batches are formed from prompts of similar
        length (a probe rule's prompts, whose answers are of similar length too): less left padding, and a
        batch stops when its longest answer does."""
        from exgrpo.probes.local_model import length_batches
        out: list[str] = [""] * len(prompts)
        for idx in length_batches(prompts, self.batch_size):
            for j, text in zip(idx, self._m.generate([[{"role": "user", "content": prompts[j]}] for j in idx])):
                out[j] = text
        return out
