"""`exgrpo plan`: the peak memory and the FLOPs of one ExGRPO step, computed before anything is allocated.

The step is the trainer's own (exgrpo/step.py: plan_step -> rollout -> reward -> advantages -> sequences ->
prepare -> optimize, the calls exgrpo/train.py makes), run on **fake tensors**: the model is built on the meta
device from a config.json alone (no weights), materialised under `PlanMode` (torch's FakeTensorMode, which
gives every tensor its shape, dtype and size and allocates nothing), and every phase is watched by torch's
`MemTracker` (bytes by kind: parameters, gradients, optimizer state, activations, temporaries) and
torch's FLOP formulas (`Flops`: from the shapes of the matrix products and attention).

What cannot run on fake tensors is replaced, each by a stated rule:

* **The rollout.** Generation decides when to stop from sampled values. `ShapeEngine` returns every reply at
  exactly `max_new_tokens` (the longest, and what bench/step.py samples) so the later phases see the worst-case
  sequences, and the rollout's own memory is a formula (`rollout_bytes`, checked against a real run at small
  scale in tests/test_plan.py): the KV cache plus the larger of the prefill's activations and the sampler's
  [B, V] buffers, on top of the persistent state.
* **Data-dependent control.** An op whose inputs are all real data (masks, token ids, position ids) runs for
  real, so the branches that depend on them go as in a real run; a Python scalar read from a fake tensor (a
  loss value for the metrics, a gradient norm) is a fixed stand-in: the memory does not depend on it.
* **The GPU's choices** (`gpu=True`, the default): the LM head's CUDA chunk budget (2048 MB unless chunk_mb is
  set) with an epilogue that works in place on the chunk as the Triton and CUDA epilogues do; attention through
  the memory-efficient SDPA kernel a CUDA run uses (no [T, T] score matrix; a boolean mask becomes an additive
  bias of the query's dtype, as torch does on CUDA); AdamW fused; torchao's 8-bit AdamW by its state layout
  (int8 moments plus one fp32 scale per 256-value block, two moments), its compiled step assumed to add no
  full-size temporary. With `gpu=False` the plan takes this CPU's choices instead, which is what `--measure`
  runs on real tensors to check the plan against.
* **Fixed overheads**, added by rule and named in the output: the CUDA context, cuBLAS's workspace and the
  caching allocator's rounding and fragmentation reserve (`OVERHEADS`).

The planned step is a steady-state one: the optimizer's state exists from its start (the first step creates
it; every later step carries it through the rollout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from exgrpo.sft import SFTSettings
from exgrpo.train import TrainConfig

PHASES = ("rollout", "logprobs", "loss", "optimizer")
STAGE_PHASES = {"train": PHASES, "sft": ("loss", "optimizer")}     # SFT has no rollout and no log-probs pass
STAGE_SETTINGS = {"train": ("rollout_batch_size", "questions_per_step", "group_size", "k_probes", "max_new_tokens",
                            "beta", "aux_coef"),
                  "sft": ("batch_size", "with_probes", "with_original", "k_probes")}     # in the plan's JSON
KINDS = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "other")
GiB = 1 << 30
ADAMW8BIT_BLOCK = 256        # torchao's default block size: one fp32 scale per block of each 8-bit moment

# The fixed costs a CUDA process pays on top of its tensors, each with its reason (README "exgrpo plan").
OVERHEADS = {
    "cuda_context": (600 << 20, "the CUDA context and the loaded kernels of torch, cuBLAS and cuDNN, about "
                                "0.5-0.6 GiB on an H100/H200 with torch 2.x, outside the caching allocator"),
    "cublas_workspace": (32 << 20, "cuBLAS's workspace on sm_90: 32 MiB per stream and handle (CUBLAS_WORKSPACE_CONFIG "
                                   "default :4096:8 on Hopper)"),
}
ALLOCATOR_RESERVE = 0.05     # the caching allocator's block rounding and fragmentation: 5 % of the peak


@dataclass
class PlanConfig(TrainConfig, SFTSettings):
    stage: Literal["train", "sft"] = "train"   # the step planned: exgrpo train's, or exgrpo sft's (--batch-size)
    model_config: str = "gemma-7b"          # a config.json, a model folder, or a built-in shape: gemma-7b, small, tiny
    eager_loss: bool = False                # the loss through materialised [tokens, V] logits (the loss_eager peer)
    gpu: bool = True                        # plan the GPU's choices (off: this CPU's, what --measure checks)
    measure: bool = False                   # also run the step on real tensors here and print both (small models)
    json: str | None = None                 # write the plan as JSON
    margin: float = 0.05                    # the share of GPU memory kept free: fits iff peak <= (1 - margin) x memory
    question_len: int = 128                 # random-word data when no --probes file is given: words of Q
    probe_len: int = 96                     # words per probe
    response_len: int = 128                 # words of each teacher answer (the aux loss)
    probes: str = ""                        # a probe_set.jsonl to plan on (needs --model-config to be a model folder)
    # bench/step.py's shape by default: one question, G = 8 per scenario, 5 probes, 128 new tokens per turn
    questions_per_step: int = 1
    max_new_tokens: int = 128
    rollout_batch_size: int = 16
    out: str = ""                           # unused by plan (the train flags are accepted as they are)
    # gpu_memory and auto_fit are the training commands' own (exgrpo.settings.FitSettings), the same here

    @classmethod
    def of(cls, train: TrainConfig, **overrides) -> PlanConfig:
        """The plan of a training run's config: every field they share, then `overrides`."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(train)}
        return cls(**{**{k: getattr(train, k) for k in shared}, **overrides})


class PlanError(ValueError):
    pass


# ============================================================================= the model's shape

def load_shape(spec: str) -> dict[str, Any]:
    """The model's config as a dict: a built-in shape by name, a config.json, or a model folder's."""
    from exgrpo.shapes import BUILT_IN
    if spec in BUILT_IN:
        return dict(BUILT_IN[spec])
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"--model-config {spec}: not a built-in shape ({', '.join(BUILT_IN)}), a config.json or a "
                        "model folder")
    from exgrpo.models import check_family
    return check_family(p)


def parse_bytes(text: str) -> int:
    """'141GB' (10⁹), '80GiB' (2³⁰), '1.5TB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise PlanError(f"--gpu-memory {text!r}: give a size such as 141GB or 80GiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def gpu_memory_bytes(cfg: PlanConfig) -> int:
    if cfg.gpu_memory:
        return parse_bytes(cfg.gpu_memory)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    raise PlanError("no GPU is visible here: give --gpu-memory (for example 141GB for an H200)")


# ============================================================================= fake tensors

class PlanMode(torch._subclasses.fake_tensor.FakeTensorMode):
    """FakeTensorMode in which real data stays real: an op none of whose tensors is fake or meta runs for real
    (masks, ids, positions: what a real run branches on), a small integer or boolean tensor made from nothing
    (an arange of positions) is real, and a Python scalar read from a fake tensor is a stand-in (True, 1, 0.0:
    loss values and norms for the metrics; `scalars` counts them). Boolean indices into a fake tensor are
    turned into real integer indices first (a fake tensor cannot index by data it does not have)."""

    SMALL = 1 << 20

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.scalars = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import _disable_current_modes
        kwargs = kwargs or {}
        fake = torch._subclasses.fake_tensor.FakeTensor
        tensors = [x for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]
        if tensors and not any(isinstance(x, fake) or x.is_meta for x in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if not tensors:
            out = super().__torch_dispatch__(func, types, args, kwargs)
            made = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if all(not t.dtype.is_floating_point for t in made) and sum(t.nbytes for t in made) <= self.SMALL:
                with _disable_current_modes():
                    return func(*args, **kwargs)
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalars += 1
            dt = args[0].dtype
            return True if dt == torch.bool else (0.0 if dt.is_floating_point else 1)
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
            with _disable_current_modes():
                idx = [i.nonzero().unbind(1) if isinstance(i, torch.Tensor) and not isinstance(i, fake)
                       and i.dtype == torch.bool else (i,) for i in args[1]]
            args = (args[0], [j for t in idx for j in t], *args[2:])
        return super().__torch_dispatch__(func, types, args, kwargs)


class ShapeEpilogue:
    """The LM head's epilogue as the GPU kernels (Triton, CUDA) run it, for shapes only: one read of the chunk
    and [n] outputs, the gradient written over the chunk in place, no [n, V] temporary."""
    name = "plan"
    extra_bytes_per_logit = 0

    def stats(self, x, targets, lse, zt, ent, inv_temp, softcap):
        for out in (lse, zt) if ent is None else (lse, zt, ent):
            out.copy_(x[:, 0])

    def grad_(self, x, targets, lse, ent, g_lp, g_ent, inv_temp, softcap):
        x.mul_(0)


def _gpu_backend():
    from exgrpo.kernels import _backends, _loss
    return _backends.Backend("plan", ShapeEpilogue(), _loss.loss_terms_torch, _loss.advantages_torch)


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs it with a mask or causally: the memory-efficient kernel
    (its output and [B, heads, T] fp32 log-sum-exp saved for backward, no [T, T] scores), a boolean mask
    turned into an additive bias of the query's dtype as torch does before calling it."""
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill_(~bias, -math.inf)
    if bias is not None:
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal and bias is None, scale=scale)
    return out[0]


@contextlib.contextmanager
def gpu_attention():
    """transformers' sdpa calls go to `_efficient_sdpa` for the plan."""
    import torch.nn.functional as F
    before = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = before


# ============================================================================= the model, built without weights

def build_model(shape: dict[str, Any], cfg: PlanConfig, mode: PlanMode | None, dtype: torch.dtype):
    """The student as exgrpo train builds it (LoRA, gradient checkpointing, attention), from its config
    alone: on the meta device, then materialised as fake tensors under `mode` (or as real random weights
    when mode is None: what --measure runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exgrpo.models import add_lora
    conf = AutoConfig.for_model(**shape)
    conf._attn_implementation = "sdpa"
    if mode is None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
        if cfg.lora:
            model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
            if cfg.lora:
                model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
        with mode:
            model = model.to_empty(device="cpu")
            model.tie_weights()
            _init_buffers(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _init_buffers(model) -> None:
    """Rotary inverse frequencies are computed at construction; to_empty leaves them unset, which changes no
    size but would give NaN positions: recompute them (they are the only non-persistent buffers here)."""
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_init_fn"):
            inv, _ = mod.rope_init_fn(mod.config, torch.device("cpu"))
            mod.inv_freq = inv
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = inv


# ============================================================================= the rollout by formula

class ShapeEngine:
    """An engine that samples no model: every reply is exactly `max_new_tokens` ids that are not special
    tokens, so the later phases see the longest sequences the step can have. It records each generate call's
    batch (dialogues, longest prompt) for `rollout_bytes`."""

    def __init__(self, tok, max_new_tokens: int, batch_size: int, vocab: int):
        self.tok, self.max_new_tokens, self.batch_size = tok, max_new_tokens, batch_size
        special = set(getattr(tok, "all_special_ids", []) or [])
        self.ids = [i for i in range(min(vocab, 4096)) if i not in special][-64:]
        self.calls: list[tuple[int, int]] = []

    def record(self, prompts) -> None:
        """The (dialogues, longest prompt) of each generate call HFEngine would make for these prompts."""
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i:i + self.batch_size]
            self.calls.append((len(batch), max(map(len, batch))))

    def sample(self, prompts, conversations=None):
        from exgrpo.rollout import Sample
        self.record(prompts)
        n = self.max_new_tokens
        return [Sample([self.ids[(j + k) % len(self.ids)] for k in range(n)], [-1.0] * n)
                for j, _ in enumerate(prompts)]


class _Recorded:
    """A real engine whose generate calls `shapes` records as ShapeEngine would (for rollout_bytes)."""

    def __init__(self, engine, shapes: ShapeEngine):
        self.engine, self.shapes, self.tok = engine, shapes, engine.tok

    def sample(self, prompts, conversations=None):
        self.shapes.record(prompts)
        return self.engine.sample(prompts, conversations)


def rollout_bytes(shape: dict[str, Any], calls: list[tuple[int, int]], new_tokens: int, dtype_bytes: int,
                  lora: bool = False) -> dict:
    """The rollout's memory on top of the persistent state, from the generate calls' shapes (HFEngine:
    transformers' generate with a dynamic KV cache, left-padded batches):

        kv_cache = 2 (K, V) · layers · kv_heads · head_dim · B · (prompt + new) · dtype bytes    at the last token
        prefill  = B · prompt · (3 · intermediate + 4 · hidden) · dtype bytes   one layer's MLP and residual stream
                   + B · prompt · (intermediate + 3 · hidden) · 4 with LoRA: peft copies an adapted projection's
                   input to the adapters' fp32 (the largest, down_proj's, and the attention projections'; fitted
                   to a real generate at two MLP widths in tests/test_plan.py, within 10 %)
        sampler  = B · vocab · (dtype bytes + 3 · 4)   the last position's logits, their fp32 copy, the
                   temperature-scaled and log-softmax copies (the sampled log-probs), the probabilities
        peak     = max over calls of max(kv_cache(prompt) + prefill, kv_cache(prompt + new) + sampler)
    """
    L, kvh = shape["num_hidden_layers"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    hd = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    H, I, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    best = {"peak_bytes": 0, "kv_cache_bytes": 0, "prefill_bytes": 0, "sampler_bytes": 0}
    for B, T in calls:
        kv = 2 * L * kvh * hd * B * dtype_bytes
        prefill = B * T * ((3 * I + 4 * H) * dtype_bytes + ((I + 3 * H) * 4 if lora else 0))
        sampler = B * V * (dtype_bytes + 12)
        peak = max(kv * T + prefill, kv * (T + new_tokens) + sampler)
        if peak > best["peak_bytes"]:
            best = {"peak_bytes": peak, "kv_cache_bytes": kv * (T + new_tokens), "prefill_bytes": prefill,
                    "sampler_bytes": sampler, "batch": B, "longest_prompt": T}
    return best


# ============================================================================= the phases, watched

class Watch:
    """One phase at a time under MemTracker and `Flops`: `phase(name)` ends the current phase (its
    peak bytes by kind, its FLOPs) and starts `name`."""

    def __init__(self, modules, optimizer):
        self.modules, self.optimizer = modules, optimizer
        self.cur: str | None = None
        self.stack: contextlib.ExitStack | None = None
        self.results: dict[str, dict] = {}

    def phase(self, name: str | None) -> None:
        if self.cur is not None:
            self.stack.close()
            snap = next(iter(self.mt.get_tracker_snapshot("peak").values()), {})
            by_kind = {k: 0 for k in KINDS}
            for ref, n in snap.items():
                if ref != "Total":
                    by_kind[_KIND.get(getattr(ref, "name", str(ref)), "other")] += int(n)
            new = {"peak_bytes": int(snap.get("Total", 0)), "by_kind": by_kind, "flops": self.fc.total}
            old = self.results.get(self.cur)           # a phase met again (updates_per_batch > 1): max and sum
            if old is not None and old["peak_bytes"] > new["peak_bytes"]:
                new = {**old, "flops": old["flops"] + new["flops"]}
            elif old is not None:
                new["flops"] += old["flops"]
            self.results[self.cur] = new
        self.cur = name
        if name is None:
            return
        self.stack = contextlib.ExitStack()
        self.mt, self.fc = _tracker(), Flops()
        self.mt.track_external(*self.modules, *([self.optimizer] if isinstance(self.optimizer, torch.optim.Optimizer)
                                                else []))
        self.stack.enter_context(self.mt)
        self.stack.enter_context(self.fc)


class Flops(torch.utils._python_dispatch.TorchDispatchMode):
    """FLOPs of the matrix products and attention, by torch.utils.flop_counter's formulas, without its module
    tracking: FlopCounterMode's module hooks hold on to activations that gradient checkpointing would free
    (measured: 22.6 MiB of activations become 88 MiB on a 4-layer model), which would make the memory plan
    wrong."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker():
    """torch's MemTracker, except that a frozen parameter (a LoRA base weight, the reference copy) gets no
    gradient hook: torch 2.13's registers one on every parameter, which fails on those."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _pre_fw_hook(self, module, inputs):
            # A root module called again (the next micro-batch): its per-module stats, which the plan does not
            # use, start over instead of raising; the per-kind peaks go on.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    self.reset_mod_stats()
            return super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state):
            # The device's peak only: torch's also walks every tracked module's stats on every op (the plan
            # reads none of them), which made a LoRA plan, with its thousands of adapter modules, 6x slower.
            from copy import deepcopy
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = deepcopy(snap)
    return Tracker()


_KIND = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients", "OPT": "optimizer_state",
         "ACT": "activations", "TEMP": "temporaries", "OTH": "other"}


class Planned8bitAdamW:
    """torchao's AdamW8bit for the plan: its state by layout (`state_bytes`), its step not run (torchao
    compiles it, which fake tensors cannot go through)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.state_bytes = sum(2 * (p.numel() + 4 * math.ceil(p.numel() / ADAMW8BIT_BLOCK)) for p in self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        pass


def _optimizer(model, cfg: PlanConfig, planned: bool):
    from exgrpo.optim import make_optimizer
    if cfg.optimizer == "adamw8bit" and planned:
        return Planned8bitAdamW(model.parameters())
    opt, _ = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=0, total_steps=1,
                            schedule="constant", optimizer=cfg.optimizer, fused=True if cfg.gpu else None)
    return opt


def _prime(opt) -> None:
    """The optimizer state of a steady-state step: one step on zero gradients creates it."""
    if not isinstance(opt, torch.optim.Optimizer):
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ============================================================================= the step

def chunk_mb_of(cfg: PlanConfig) -> float:
    """The LM-head chunk budget the planned run uses: --chunk-mb, else the kernels' default (EXGRPO_CHUNK_MB, else
    the CUDA or CPU default) for the device planned."""
    from exgrpo.kernels._lmhead import chunk_budget_bytes
    return chunk_budget_bytes(cfg.chunk_mb, torch.device("cuda" if cfg.gpu else "cpu")) / 2**20


def _data(cfg: PlanConfig, shape: dict, folder: Path):
    """(tokenizer, probe items): the given probe set with the model folder's tokenizer, or random words at
    the configured lengths with a word tokenizer (a token per word)."""
    from exgrpo.dialogues import load_probe_set
    from exgrpo.shapes import random_probe_set, word_tokenizer
    if cfg.probes:
        from exgrpo.models import load_tokenizer
        if not Path(cfg.model_config).is_dir():
            raise PlanError("--probes needs --model-config to be a model folder (its tokenizer measures the lengths)")
        return load_tokenizer(cfg.model_config), load_probe_set(cfg.probes)
    questions = cfg.questions_per_step
    if cfg.stage == "sft":                                  # enough questions for one SFT batch
        per_question = int(cfg.with_original) + cfg.k_probes * int(cfg.with_probes)
        questions = math.ceil(cfg.batch_size / max(1, per_question))
    path = random_probe_set(folder / "probe_set.jsonl", questions=questions, k_probes=cfg.k_probes,
                            probe_len=cfg.probe_len, question_len=cfg.question_len, response_len=cfg.response_len,
                            vocab=shape["vocab_size"])
    return word_tokenizer(shape["vocab_size"]), load_probe_set(path)


def run_step(cfg: PlanConfig, shape: dict[str, Any], *, fake: bool = True) -> dict[str, Any]:
    """One step of exgrpo train at `cfg`, phase by phase: on fake tensors (the plan) or, with fake=False, on
    real random weights on this CPU (what the plan is checked against). Returns per phase the peak bytes by
    kind and the FLOPs, plus the step's sizes.

    Python's cyclic garbage collector is off for the step: tensors held only by reference cycles (autograd and
    transformers make thousands per forward) are then freed at no point inside the step, so the peak does not
    depend on when a collection happens to run, and it bounds every such timing from above."""
    import gc
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_step(cfg, shape, fake=fake)
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def _run_step(cfg: PlanConfig, shape: dict[str, Any], *, fake: bool) -> dict[str, Any]:
    from exgrpo import step as S
    from exgrpo.distributed import SINGLE
    from exgrpo.policy import EagerPolicy, Policy

    planned_gpu = fake and cfg.gpu
    dtype = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and cfg.gpu)) else torch.float32
    chunk_mb = chunk_mb_of(cfg)
    mode = PlanMode() if fake else None
    dev = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="exgrpo-plan-") as tmp:
        tok, items = _data(cfg, shape, Path(tmp))
    context = int(shape.get("max_position_embeddings") or 1 << 30)
    if cfg.stage == "train":                                # exgrpo train's own refusal, before the plan runs
        from exgrpo.train import check_lengths
        check_lengths(items, tok, cfg, context)
    else:
        sft_batch = _sft_batch(cfg, tok, items, context)
    model = build_model(shape, cfg, mode, dtype)
    backend = _gpu_backend() if planned_gpu else cfg.backend
    policy = Policy(model, pad_id=tok.pad_token_id, backend=backend, chunk_mb=chunk_mb)
    ref = None
    if cfg.stage == "train" and cfg.beta > 0 and not cfg.lora:   # loop.make_reference: a frozen copy of the start
        ref = Policy(build_model(shape, cfg, mode, dtype).eval(), pad_id=tok.pad_token_id, backend=backend,
                     chunk_mb=chunk_mb)
        ref.requires_grad_(False)
    ctx = contextlib.ExitStack()
    if mode is not None:
        ctx.enter_context(mode)
    if planned_gpu:
        ctx.enter_context(gpu_attention())
    with ctx:
        opt = _optimizer(policy, cfg, planned=fake)
        _prime(opt)
        watch = Watch([m for m in (policy, ref) if m is not None], opt)
        trained = EagerPolicy(policy.model) if cfg.eager_loss else policy     # the loss phase's module
        if cfg.stage == "sft":
            return _sft_step(cfg, sft_batch, policy, trained, opt, watch, mode, chunk_mb, dtype, dev)
        loss = S.loss_spec(cfg)
        shapes = ShapeEngine(tok, cfg.max_new_tokens, cfg.rollout_batch_size, shape["vocab_size"])
        if fake:
            engine = shapes
        else:                                               # a real rollout, every reply max_new_tokens long
            from exgrpo.rollout import HFEngine
            engine = _Recorded(HFEngine(model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        batch_size=cfg.rollout_batch_size, min_new_tokens=cfg.max_new_tokens), shapes)
            watch.phase("rollout")
        seed = S.begin_step(cfg.seed, 0, SINGLE)
        step_plan = S.plan_step(items, 0, seed, cfg, SINGLE)
        policy.eval()
        rollouts = S.rollout(engine, step_plan)
        policy.train()
        adv = S.advantages(S.reward(step_plan, rollouts, lambda ex, reply: float(len(reply) % 2)), cfg)
        seqs = S.sequences(step_plan, rollouts, adv, tok, cfg)
        watch.phase("logprobs")
        batch = S.prepare(policy, seqs, cfg, SINGLE, dev, loss=loss, old=cfg.updates_per_batch > 1, ref_policy=ref)
        watch.phase("loss")
        S.optimize(trained, opt, batch, seqs, loss, updates=cfg.updates_per_batch, grad_clip=cfg.grad_clip,
                   d=SINGLE, dev=dev, mark=lambda name: name == "optimizer" and watch.phase("optimizer"))
        watch.phase(None)
    phases = watch.results
    extra_opt = getattr(opt, "state_bytes", 0)
    persistent = phases["logprobs"]["by_kind"]
    base = persistent["parameters"] + persistent["buffers"] + persistent["optimizer_state"] + extra_opt
    roll = rollout_bytes(shape, shapes.calls, cfg.max_new_tokens, torch.finfo(dtype).bits // 8, lora=cfg.lora)
    if fake:
        phases["rollout"] = {"peak_bytes": base + roll["peak_bytes"], "flops": None, "formula": roll,
                             "by_kind": {**{k: 0 for k in KINDS}, "parameters": persistent["parameters"],
                                         "buffers": persistent["buffers"],
                                         "optimizer_state": persistent["optimizer_state"] + extra_opt,
                                         "activations": roll["peak_bytes"]}}
    else:
        phases["rollout"]["formula"] = roll
    return _step_result(phases, "train", opt, mode, policy, seqs, batch, chunk_mb, dtype, rollout_calls=shapes.calls)


def _sft_batch(cfg: PlanConfig, tok, items, context: int):
    """exgrpo sft's longest batch: the `batch_size` longest of its sequences (a real epoch shuffles them; the plan
    takes the batch no shuffle exceeds)."""
    from exgrpo.sft import sft_sequences
    seqs = sorted(sft_sequences(items, tok, cfg), key=lambda s: -len(s.ids))[:cfg.batch_size]
    if len(seqs[0].ids) > context:                          # exgrpo sft's own refusal
        raise PlanError(f"an SFT sequence has {len(seqs[0].ids)} tokens but the model's context is {context}")
    return seqs


def _sft_step(cfg: PlanConfig, seqs, policy, trained, opt, watch: Watch, mode, chunk_mb, dtype, dev):
    """exgrpo sft's step (exgrpo/sft.py: prepare + optimize with SFT_LOSS) on its longest batch (`_sft_batch`)."""
    from exgrpo import step as S
    from exgrpo.distributed import SINGLE
    watch.phase("loss")
    batch = S.prepare(policy, seqs, cfg, SINGLE, dev, loss=S.SFT_LOSS)
    S.optimize(trained, opt, batch, seqs, S.SFT_LOSS, updates=1, grad_clip=cfg.grad_clip, d=SINGLE, dev=dev,
               mark=lambda name: name == "optimizer" and watch.phase("optimizer"))
    watch.phase(None)
    return _step_result(watch.results, "sft", opt, mode, policy, seqs, batch, chunk_mb, dtype)


def _step_result(phases, stage, opt, mode, policy, seqs, batch, chunk_mb, dtype, rollout_calls=None):
    """The step's phases (with an optimizer state kept by rule added where it is held) and its sizes."""
    extra_opt = getattr(opt, "state_bytes", 0)
    for name in STAGE_PHASES[stage]:
        if extra_opt and name != "rollout":             # the planned rollout already counts it
            phases[name]["peak_bytes"] += extra_opt
            phases[name]["by_kind"]["optimizer_state"] += extra_opt
    return {"phases": {p: phases[p] for p in STAGE_PHASES[stage]}, "scalars_stood_in": mode.scalars if mode else 0,
            "sequences": len(seqs), "sequence_lens": sorted({len(s.ids) for s in seqs}),
            "tokens": sum(len(s.ids) for s in seqs), "micro_batches": len(batch.mbs),
            "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in policy.model.parameters()), "dtype": str(dtype).replace("torch.", ""),
            "chunk_mb": chunk_mb, "rollout_calls": rollout_calls or [], "optimizer_rule_bytes": extra_opt}


# ============================================================================= the plan

def plan(cfg: PlanConfig) -> dict[str, Any]:
    """The plan's JSON: peak bytes, the verdict against the GPU's memory, and per phase the peak by kind and the
    FLOPs (see the module docstring for what is simulated and what is by rule)."""
    shape = load_shape(cfg.model_config)
    memory = gpu_memory_bytes(cfg)
    if cfg.attention not in ("auto", "sdpa"):
        raise PlanError(f"--attention {cfg.attention} is not planned: the plan runs sdpa as CUDA does (its "
                        "memory-efficient kernel, packed rows with a block-diagonal mask); use --attention sdpa")
    if not 0 <= cfg.margin < 1:
        raise PlanError(f"--margin must be in [0, 1), got {cfg.margin}")
    t0 = time.perf_counter()
    step = run_step(cfg, shape, fake=True)
    tensors = max(p["peak_bytes"] for p in step["phases"].values())
    overheads = {k: v for k, (v, _) in OVERHEADS.items()} if cfg.gpu else {}
    overheads["allocator_reserve"] = int(ALLOCATOR_RESERVE * tensors) if cfg.gpu else 0
    peak = tensors + sum(overheads.values())
    usable = int((1 - cfg.margin) * memory)
    out = {"peak_bytes": int(peak), "fits": peak <= usable, "gpu_memory_bytes": int(memory),
           "usable_bytes": usable, "headroom_bytes": int(usable - peak), "tensor_peak_bytes": int(tensors),
           "overheads": overheads, "phases": step.pop("phases"), "step": step,
           "model": {"config": cfg.model_config, **{k: shape.get(k) for k in (
               "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")}},
           "settings": {k: getattr(cfg, k) for k in ("stage", "lora", "optimizer", "gradient_checkpointing",
                                                      "micro_batch_tokens", "eager_loss", "gpu",
                                                      *STAGE_SETTINGS[cfg.stage])},
           "attention": "sdpa",
           "seconds": round(time.perf_counter() - t0, 1)}
    return out


MIN_MICRO_BATCH_TOKENS, MIN_CHUNK_MB = 1024, 256


def knobs(c: PlanConfig) -> dict[str, Any]:
    """The settings auto-fit chooses: micro-batch tokens, gradient checkpointing, the LM-head chunk budget, and for
    exgrpo train the rollout batch."""
    names = ("micro_batch_tokens", "gradient_checkpointing", "chunk_mb") + (
        ("rollout_batch_size",) if c.stage == "train" else ())
    return {k: getattr(c, k) for k in names}


def auto_fit(cfg: PlanConfig, say=print) -> tuple[PlanConfig, dict[str, Any], list[dict[str, Any]]]:
    """The setting with the largest micro-batches that fits (peak <= (1 - margin) x GPU memory), by a greedy
    search from `cfg`: while the plan does not fit, relieve the phase with the highest peak (the rollout: halve
    rollout_batch_size; the others: gradient checkpointing on, then halve the LM-head chunk budget down to
    256 MB, then halve micro_batch_tokens down to 1024); once one fits, double micro_batch_tokens while it still
    fits and the step's tokens need more than one micro-batch. Each try is one plan. exgrpo sft's step has no
    rollout. Returns (the chosen config, its plan, every try)."""
    from dataclasses import replace

    cur = replace(cfg, auto_fit=False, chunk_mb=chunk_mb_of(cfg))
    tries: list[dict[str, Any]] = []

    def attempt(c: PlanConfig) -> dict[str, Any]:
        p = plan(c)
        tries.append({**knobs(c), "peak_bytes": p["peak_bytes"], "fits": p["fits"]})
        say(f"auto-fit: {knobs(c)} -> {p['peak_bytes'] / GiB:.2f} GiB, {'fits' if p['fits'] else 'does not fit'}")
        return p

    p = attempt(cur)
    while not p["fits"]:
        worst = max(p["phases"], key=lambda k: p["phases"][k]["peak_bytes"])
        if worst == "rollout" and cur.rollout_batch_size > 1:
            cur = replace(cur, rollout_batch_size=cur.rollout_batch_size // 2)
        elif not cur.gradient_checkpointing:
            cur = replace(cur, gradient_checkpointing=True)
        elif cur.chunk_mb > MIN_CHUNK_MB:
            cur = replace(cur, chunk_mb=max(MIN_CHUNK_MB, cur.chunk_mb / 2))
        elif cur.micro_batch_tokens > MIN_MICRO_BATCH_TOKENS:
            cur = replace(cur, micro_batch_tokens=max(MIN_MICRO_BATCH_TOKENS, cur.micro_batch_tokens // 2))
        elif cur.stage == "train" and cur.rollout_batch_size > 1:
            cur = replace(cur, rollout_batch_size=cur.rollout_batch_size // 2)
        else:
            raise PlanError(f"nothing fits: the smallest setting tried needs {p['peak_bytes'] / GiB:.2f} GiB of "
                            f"{p['usable_bytes'] / GiB:.2f} usable (LoRA, adamw8bit or a larger GPU)")
        p = attempt(cur)
    while cur.micro_batch_tokens < p["step"]["tokens"]:     # once one micro-batch holds the step, no pass to save
        bigger = replace(cur, micro_batch_tokens=cur.micro_batch_tokens * 2)
        q = attempt(bigger)
        if not q["fits"]:
            break
        cur, p = bigger, q
    return cur, p, tries


def fit_run_config(cfg, stage: str, say=print):
    """`exgrpo train --auto-fit` / `exgrpo sft --auto-fit`: `auto_fit` on this run's own config (a TrainConfig or
    SFTConfig), model folder and probe set, for the device it will run on (a CUDA run: the GPU's choices and the
    visible GPU's memory unless --gpu-memory; a CPU run: this CPU's choices, --gpu-memory required); the run
    continues with the chosen settings, which its config.json then records."""
    from dataclasses import replace
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    chosen, p, _ = auto_fit(PlanConfig.of(cfg, model_config=cfg.model, gpu=cuda, stage=stage), say=say)
    say(f"auto-fit chose {knobs(chosen)}: planned peak {p['peak_bytes'] / GiB:.2f} GiB of "
        f"{p['usable_bytes'] / GiB:.2f} usable (planned on fake tensors)")
    return replace(cfg, **knobs(chosen))


def render(p: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    unit, div = ("GiB", GiB) if p["peak_bytes"] >= GiB else ("MiB", 1 << 20)
    gib = lambda n: f"{n / div:8.2f}" if n is not None else "       -"    # noqa: E731
    head = f"{'phase':10} {'peak ' + unit:>8} " + " ".join(f"{k[:8]:>8}" for k in KINDS[:6]) + f" {'TFLOP':>8}"
    if measured:
        head += f" {'measured':>8} {'error':>6}"
    lines = [head, "-" * len(head)]
    for name, ph in p["phases"].items():
        row = f"{name:10} {gib(ph['peak_bytes'])} " + " ".join(gib(ph["by_kind"][k]) for k in KINDS[:6])
        row += f" {ph['flops'] / 1e12:8.2f}" if ph.get("flops") is not None else "        -"
        if measured:
            m = measured["phases"][name]["peak_bytes"]
            row += f" {gib(m)} {100 * (ph['peak_bytes'] - m) / max(m, 1):5.1f}%"
        lines.append(row)
    if "rollout" in p["phases"]:
        r = p["phases"]["rollout"]["formula"]
        lines.append(f"rollout by formula: KV cache {r['kv_cache_bytes'] / GiB:.2f} GiB, prefill "
                     f"{r['prefill_bytes'] / GiB:.2f} GiB, sampler {r['sampler_bytes'] / GiB:.2f} GiB "
                     f"(batch {r.get('batch', 0)}, longest prompt {r.get('longest_prompt', 0)})")
    for k, v in p["overheads"].items():
        if not v:
            continue
        why = OVERHEADS[k][1] if k in OVERHEADS else f"the caching allocator: {ALLOCATOR_RESERVE:.0%} of the tensors"
        lines.append(f"+ {k}: {v / GiB:.2f} GiB ({why})")
    s = p["step"]
    lines.append(f"step: {s['sequences']} sequences, {s['tokens']} tokens in {s['micro_batches']} micro-batch(es), "
                 f"lengths {s['sequence_lens'][0]}-{s['sequence_lens'][-1]}; {s['trainable_params']:,} trainable "
                 f"of {s['params']:,} parameters, {s['dtype']}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"peak {p['peak_bytes'] / GiB:.2f} GiB of {p['gpu_memory_bytes'] / GiB:.2f} GiB "
                 f"({p['usable_bytes'] / GiB:.2f} usable): {verdict}, headroom {p['headroom_bytes'] / GiB:+.2f} GiB "
                 "(planned on fake tensors, not measured on a GPU)")
    return "\n".join(lines)


def main_plan(cfg: PlanConfig) -> int:
    if cfg.measure and cfg.gpu:
        raise PlanError("--measure runs the step here, on this CPU's choices: pass --no-gpu so that the plan "
                        "takes the same ones")
    if cfg.auto_fit:
        cfg, p, tries = auto_fit(cfg)
        p["auto_fit"] = {"chosen": knobs(cfg), "tries": tries}
        chosen = p["auto_fit"]["chosen"]
        print("auto-fit chose: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items()))
    else:
        p = plan(cfg)
    measured = None
    if cfg.measure:
        measured = run_step(cfg, load_shape(cfg.model_config), fake=False)
        p["measured"] = measured
    print(render(p, measured))
    if cfg.json:
        from exgrpo.runlock import write_json_atomic
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cfg.json), p)
        print(f"plan: {cfg.json}", file=sys.stderr)
    return 0
