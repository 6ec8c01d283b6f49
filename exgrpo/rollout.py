"""Rollout engines behind one interface, and the multi-turn driver.

An engine answers a batch of conversations with one sampled assistant turn each:
    engine.generate(conversations: list[list[dict]]) -> list[str]
The multi-turn driver asks every dialogue's turn t at once: the student answers each probe with the
whole history in context, its answer is appended, then it answers Q.

Engines:
    HFEngine    transformers `generate`: batched, left-padded, KV cache, stops at end of turn.
    VLLMEngine  vLLM's offline engine, colocated with the trainer (optional, imported lazily).
"""
from __future__ import annotations

from typing import Protocol

import torch

from exgrpo.dialogues import prompt_ids


class Engine(Protocol):
    def generate(self, conversations: list[list[dict]]) -> list[str]: ...


class HFEngine:
    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 1.0,
                 batch_size: int = 64, max_context: int | None = None):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.max_context = max_context

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        ids = self.generate_ids([prompt_ids(self.tok, c) for c in conversations])
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], *, min_new_tokens: int | None = None) -> list[list[int]]:
        """Sampled completion ids per prompt, cut at the end-of-turn token. min_new_tokens =
        max_new_tokens fixes every completion's length (benchmarks: the same work on every run)."""
        out: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        dev = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        try:
            for i in range(0, len(prompts), self.batch_size):
                batch = prompts[i:i + self.batch_size]
                longest = max(map(len, batch))
                if self.max_context is not None and longest + self.max_new_tokens > self.max_context:
                    raise ValueError(f"a dialogue prompt of {longest} tokens + {self.max_new_tokens} new tokens "
                                     f"exceeds the model's context of {self.max_context}")
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                att = torch.zeros_like(ids)
                for j, p in enumerate(batch):                # left padding: every prompt ends at the same column
                    ids[j, longest - len(p):] = torch.tensor(p)
                    att[j, longest - len(p):] = 1
                sample = self.temperature > 0
                gen = self.model.generate(
                    input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=self.max_new_tokens,
                    min_new_tokens=min_new_tokens, do_sample=sample, temperature=self.temperature if sample else None,
                    top_p=None, top_k=None, eos_token_id=self.tok.eos_token_id, pad_token_id=pad, use_cache=True)
                for row in gen[:, longest:].tolist():
                    if self.tok.eos_token_id in row:
                        row = row[:row.index(self.tok.eos_token_id)]
                    out.append(row)
        finally:
            self.model.train(was_training)
        return out


class VLLMEngine:
    """vLLM offline engine colocated with the trainer: weights synced after each update, memory
    released while the trainer steps (sleep/wake). Needs a GPU and `pip install exgrpo[gpu]`.

    Not exercised by the CPU test suite: vLLM cannot run without a GPU.
    """

    def __init__(self, model_dir: str, *, max_new_tokens: int = 512, temperature: float = 1.0,
                 gpu_memory_utilization: float = 0.35, seed: int = 0):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise RuntimeError("the vllm rollout engine needs vllm (pip install 'exgrpo[gpu]')") from e
        self.llm = LLM(model=model_dir, enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                       seed=seed)
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        clean = [[{"role": m["role"], "content": m["content"]} for m in c] for c in conversations]
        outs = self.llm.chat(clean, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    def sync_weights(self, model) -> None:
        """Push the trainer's current weights (LoRA merged on the fly) into the engine."""
        from exgrpo.models import is_lora
        state = model.get_base_model().state_dict() if not is_lora(model) else _merged_state(model)
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.model.load_weights(((k.removeprefix("base_model.model."), v) for k, v in state.items()))

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()


def _merged_state(model) -> dict:
    model.merge_adapter()
    try:
        return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
                if "lora_" not in k}
    finally:
        model.unmerge_adapter()


def run_dialogues(engine: Engine, user_turns: list[list[dict]]) -> list[list[str]]:
    """user_turns[d] = the user messages of dialogue d (probes..., then Q). Returns each dialogue's
    student answers, one per user turn, generated turn by turn with the history in context."""
    answers: list[list[str]] = [[] for _ in user_turns]
    for t in range(max(map(len, user_turns), default=0)):
        live = [d for d, turns in enumerate(user_turns) if t < len(turns)]
        convs = []
        for d in live:
            conv = []
            for u, a in zip(user_turns[d][:t], answers[d]):
                conv += [u, {"role": "assistant", "content": a}]
            convs.append(conv + [user_turns[d][t]])
        for d, reply in zip(live, engine.generate(convs)):
            answers[d].append(reply)
    return answers
