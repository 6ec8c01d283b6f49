"""One full ExGRPO step at Gemma-7B shape, phase by phase, side by side with its peers.

    python bench/step.py                                   # GPU: every case below, Gemma-7B shape
    python bench/step.py --cases exgrpo:lora trl-liger:lora --steps 3
    python bench/step.py --tiny                            # CPU smoke run (what the tests execute)

The model is GemmaForCausalLM built from the Gemma-7B config (hidden 3072, 28 layers, 16 heads of 256,
intermediate 24576, vocab 256000, tied embedding) with random bf16 weights, saved once to --model-dir
with a word-level tokenizer ("w17 w4 ..." is exactly the ids 17, 4, ...) and a probe set of random-word
questions and probes, so every case loads the same weights and data.

The exgrpo cases run the trainer's own step (exgrpo/step.py, the functions exgrpo/train.py loops over):
per question, G Scenario A dialogues (--k-probes probes, each answered by the student, then Q) and G
Scenario B dialogues (the first k' probes), every turn sampled with exactly --completion new tokens
(min = max new tokens), token in and token out; rewards from a hash of the final reply (the model is
random, so is its accuracy); the DSU bonus and advantages; the auxiliary teacher-forced probe answers
(--aux-coef); packed micro-batches; the reference log-probs; the guarded update. What is timed is
what `exgrpo train` trains (tests/test_bench_step.py checks the first step's loss against train()).

Cases (each in a fresh process, so one case's memory cannot leak into the next):
    exgrpo:lora | exgrpo:full   the step above (full: torchao 8-bit AdamW and a frozen reference copy).
                                With --eager-loss, the same loss phase again in plain PyTorch with
                                materialised [b, T, V] logits, on the same micro-batches.
    trl:MODE | trl-liger:MODE   TRL's GRPOTrainer on the same model, G, β, LoRA and optimizer, generating
                                through transformers; with and without use_liger_kernel. TRL has no
                                multi-turn rollouts: each trajectory is one prompt as long as the exgrpo
                                dialogue before its last reply, plus --completion new tokens, so both
                                process sequences of the same lengths (TRL trains fewer of their tokens).
                                Phases are cut at its generate and score methods.

Per phase: median wall time over --steps steps after --warmup, tokens/s, peak allocated and reserved
CUDA memory; for the update phase also the useful model TFLOP/s against the bf16 matmul rate
measured in the same run. A case that fails (OOM, missing package, API change) is recorded with its
error. JSON goes to bench/results/, a table to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402  (the repo root on the path first)
from exgrpo.policy import EagerPolicy  # noqa: E402
from exgrpo.shapes import GEMMA_7B, TINY, random_probe_set, random_words, word_tokenizer  # noqa: E402

MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size")

CASES = ("exgrpo:lora", "exgrpo:full", "trl:lora", "trl-liger:lora", "trl:full", "trl-liger:full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = ("rollout", "logprobs", "loss", "optimizer", "update", "loss_eager")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--questions", type=int, default=1, help="questions per step (each: G of A + G of B)")
    p.add_argument("--group", type=int, default=8, help="G trajectories per scenario")
    p.add_argument("--k-probes", type=int, default=5, help="Scenario A's probes (B keeps the first k' < k)")
    p.add_argument("--probe-len", type=int, default=96, help="words (tokens) per probe question")
    p.add_argument("--question-len", type=int, default=128, help="words of Q (before the answer-format instruction)")
    p.add_argument("--response-len", type=int, default=128, help="words of each teacher probe answer (aux SFT)")
    p.add_argument("--completion", type=int, default=128, help="new tokens per turn (fixed)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="packed micro-batches (the trainer's default) or padded rows")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--aux-coef", type=float, default=0.1, help="λ of the auxiliary SFT loss (0: no aux sequences)")
    p.add_argument("--updates-per-batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--full-optimizer", default="adamw8bit", choices=["adamw", "adamw8bit"])
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off")
    p.add_argument("--eager-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the loss phase with materialised logits (exgrpo cases)")
    p.add_argument("--backend", default="auto", help="exgrpo kernel backend")
    p.add_argument("--profile", action="store_true",
                   help="exgrpo cases: after the timed steps, one more loss phase under torch.profiler; the top "
                        "operators by self time go into the JSON (to explain a missed target with a profile)")
    p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True,
                   help="exgrpo cases on CUDA: also plan the same step with `exgrpo plan` (fake tensors, on this "
                        "machine's CPU) and record each phase's planned peak against the measured one")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds a case may take (its own process)")
    p.add_argument("--model-dir", default=None,
                   help="where the random model is saved and reused (default: a temp dir, removed at the end)")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke shapes: 2-layer model, V=1000, 1 step")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--case-json", default=None, help=argparse.SUPPRESS)   # internal: run one case, write here
    a = p.parse_args(argv)
    a.shape = {k: (TINY if a.tiny else GEMMA_7B)[k] for k in MODEL_KEYS}
    if a.tiny:
        a.k_probes, a.probe_len, a.question_len, a.response_len, a.completion = 2, 6, 8, 6, 4
        a.group, a.micro_batch_tokens = 2, 192            # several micro-batches, some padding when padded
        a.warmup, a.steps, a.lora_r, a.lr = 0, 2, 4, 1e-3      # step 2: policy != reference, so KL counts
        a.device = a.device or "cpu"
    for name in ("questions", "group", "k_probes", "probe_len", "question_len", "response_len", "completion", "steps",
                 "micro_batch_tokens", "updates_per_batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


# ============================================================================= the shared setup

def prepare_model_dir(a) -> Path:
    """Random Gemma weights at the benchmark's shape (bf16 on GPU, fp32 on CPU) and the probe set, saved once."""
    from transformers import GemmaConfig, GemmaForCausalLM
    out = Path(a.model_dir)
    stamp = out / "bench_shape.json"
    dtype = "bfloat16" if a.device_type == "cuda" else "float32"
    data = {k: getattr(a, k) for k in ("questions", "warmup", "steps", "k_probes", "probe_len", "question_len",
                                       "response_len")}
    want = {**a.shape, "dtype": dtype, "data": data, "format": 3}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    tok = word_tokenizer(a.shape["vocab_size"])
    cfg = GemmaConfig(**a.shape, max_position_embeddings=8192, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(a.device_type):
            model = GemmaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    random_probe_set(out / "probe_set.jsonl", questions=a.questions * (a.warmup + a.steps), k_probes=a.k_probes,
                     probe_len=a.probe_len, question_len=a.question_len, response_len=a.response_len,
                     vocab=a.shape["vocab_size"])
    stamp.write_text(json.dumps(want))
    del model
    return out


def bench_reward(ex, reply: str) -> float:
    """R_base for a random model: a hash of its final reply, 1 for about 40 % of them (so groups have both)."""
    return float(zlib.crc32(reply.encode()) % 5 < 2)


def train_config(a, mode: str, out: str):
    """The TrainConfig whose step the exgrpo cases run (tests/test_bench_step.py trains with it too)."""
    from exgrpo.train import TrainConfig
    lora = mode == "lora"
    return TrainConfig(
        model=str(a.model_path), probes=str(Path(a.model_path) / "probe_set.jsonl"), out=out, lora=lora,
        lora_r=a.lora_r, lora_alpha=a.lora_alpha, dtype="bf16" if a.device_type == "cuda" else "fp32",
        device=a.device_type, gradient_checkpointing=a.grad_ckpt, backend=a.backend,
        micro_batch_tokens=a.micro_batch_tokens, packed=a.packed, steps=a.warmup + a.steps,
        questions_per_step=a.questions, group_size=a.group, k_probes=a.k_probes, max_new_tokens=a.completion,
        rollout_batch_size=2 * a.group * a.questions, beta=a.beta, aux_coef=a.aux_coef,
        updates_per_batch=a.updates_per_batch, lr=a.lr, optimizer="adamw" if lora else a.full_optimizer,
        seed=0, progress=False)


def engine_factory(a):
    """(model, tokenizer) -> the trainer's HF engine with every reply exactly --completion tokens long."""
    from exgrpo.rollout import HFEngine
    return lambda model, tok: HFEngine(model, tok, max_new_tokens=a.completion, min_new_tokens=a.completion,
                                       temperature=1.0, batch_size=2 * a.group * a.questions)


class Meter:
    """Consecutive phases of one step: mark(name) ends the current phase and starts `name`. Each
    phase gets its wall time (device synchronised) and its own peak allocated / reserved memory, in GB
    (10⁹ bytes, the unit of the targets)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.rec, self.cur, self.t0 = {}, None, 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self, name: str | None):
        self._sync()
        now = time.perf_counter()
        if self.cur is not None:
            r = self.rec.setdefault(self.cur, {"ms": 0.0, "peak_alloc_gb": 0.0, "peak_reserved_gb": 0.0})
            r["ms"] += (now - self.t0) * 1e3
            if self.cuda:
                r["peak_alloc_gb"] = max(r["peak_alloc_gb"], torch.cuda.max_memory_allocated() / 1e9)
                r["peak_reserved_gb"] = max(r["peak_reserved_gb"], torch.cuda.max_memory_reserved() / 1e9)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.cur, self.t0 = name, time.perf_counter()

    def take(self) -> dict:
        self.mark(None)
        rec, self.rec = self.rec, {}
        if not self.cuda:
            for r in rec.values():
                r["peak_alloc_gb"] = r["peak_reserved_gb"] = None
        return rec


def phase_work(lens: list[int], generated: int) -> dict:
    """Tokens per phase, for tokens/s: generated tokens in the rollout, every token of every sequence
    through the model in the others."""
    return {"rollout": (generated, "generated"),
            **{ph: (sum(lens), "processed") for ph in ("logprobs", "loss", "update", "loss_eager")}}


def model_flops(shape: dict, seq_lens: list[int], lm_rows: int, *, train_weights: bool) -> float:
    """Useful FLOPs of one forward + backward over these sequences: linear layers 2·params per token
    forward, 2· again for the input gradients and, when the weights train, 2· for their gradients;
    causal attention 2·heads·head_dim·T² per layer and sequence forward, twice that backward (per
    sequence: packed rows attend within each sequence only); the LM head only on the `lm_rows` trained
    rows (the fused kernels skip the rest). Recomputation under gradient checkpointing is not useful
    work and is not counted."""
    H, L, I, V = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    per_token = L * (H * q + 2 * H * kv + q * H + 3 * H * I)
    mult = 6 if train_weights else 4
    tokens = sum(seq_lens)
    attn = sum(2 * shape["num_attention_heads"] * shape["head_dim"] * T * T for T in seq_lens) * L
    return mult * per_token * tokens + 3 * attn + mult * lm_rows * H * V


# ============================================================================= exgrpo

def run_exgrpo(a, mode: str) -> dict:
    """The trainer's step, phase by phase: exactly the calls exgrpo/train.py makes, with a meter between them."""
    from exgrpo import distributed, loop
    from exgrpo import step as S
    from exgrpo.batching import layout_tokens, loss_and_backward
    from exgrpo.dialogues import load_probe_set
    from exgrpo.distributed import SINGLE
    from exgrpo.optim import make_optimizer

    cfg = train_config(a, mode, out=tempfile.mkdtemp(prefix="exgrpo-bench-"))
    items = load_probe_set(cfg.probes)
    d, dev = distributed.init(cfg.device)
    model, tok, mixed = loop.load_student(cfg, d, dev)
    policy = loop.make_policy(model, tok, cfg, d, dev, mixed)
    ref = loop.make_reference(cfg, model, tok, d, dev, mixed)
    opt, _ = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=0, total_steps=cfg.steps,
                            schedule="constant", optimizer=cfg.optimizer)
    engine = engine_factory(a)(model, tok)
    loss = S.loss_spec(cfg)
    eager = EagerPolicy(model) if a.eager_loss else None
    meter, steps, info = Meter(dev), [], {"losses": []}
    for step in range(cfg.steps):
        seed = S.begin_step(cfg.seed, step, SINGLE)
        plan = S.plan_step(items, step, seed, cfg, SINGLE)
        meter.mark("rollout")
        policy.eval()
        rollouts = S.rollout(engine, plan)
        policy.train()
        meter.mark("logprobs")
        adv = S.advantages(S.reward(plan, rollouts, bench_reward), cfg)
        seqs = S.sequences(plan, rollouts, adv, tok, cfg)
        batch = S.prepare(policy, seqs, cfg, SINGLE, dev, loss=loss, old=cfg.updates_per_batch > 1, ref_policy=ref)
        if eager is not None:                               # the peer first: same weights, micro-batches and loss
            meter.mark("loss_eager")
            opt.zero_grad(set_to_none=True)
            try:
                info["loss_eager"] = loss_and_backward(eager, batch.mbs, seqs, eps_low=loss.eps_low,
                                                       eps_high=loss.eps_high, beta=loss.beta, aux_coef=loss.aux_coef,
                                                       temperature=loss.temperature, totals=batch.totals)["loss"]
                info["grad_norm_eager"] = float(torch.nn.utils.get_total_norm(
                    [p.grad for p in policy.parameters() if p.grad is not None]))
            except torch.OutOfMemoryError as e:
                info["loss_eager_error"] = common.error_text(e, 200)
                eager = None
            opt.zero_grad(set_to_none=True)
            if a.device_type == "cuda":
                torch.cuda.empty_cache()
        upd = S.optimize(policy, opt, batch, seqs, loss, updates=cfg.updates_per_batch, grad_clip=cfg.grad_clip,
                         d=SINGLE, dev=dev, mark=meter.mark)
        m, gnorm = upd.metrics, upd.grad_norm
        rec = meter.take()
        if step >= a.warmup:
            steps.append(rec)
        info.update(loss=m["loss"], grad_norm=gnorm)
        info["losses"].append(m["loss"])
    if a.profile:                                           # outside the timed steps: the profiler costs time
        opt.zero_grad(set_to_none=True)
        info["profile_loss"] = common.profile_top(lambda: loss_and_backward(
            policy, batch.mbs, seqs, eps_low=loss.eps_low, eps_high=loss.eps_high, beta=loss.beta,
            aux_coef=loss.aux_coef, temperature=loss.temperature, totals=batch.totals), dev)
        opt.zero_grad(set_to_none=True)
    lens = [len(s.ids) for s in seqs]
    trained = sum(sum(s.policy) + sum(s.sft) for s in seqs)      # rows the LM head runs in the loss
    generated = sum(sum(r.sampled) for r in rollouts)
    flops = model_flops(a.shape, lens, trained, train_weights=not cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    padded_tokens, padded_padding = layout_tokens(seqs, cfg.micro_batch_tokens, packed=False)
    return _summarise(steps, phase_work(lens, generated), flops,
                      extra={**info, "trainable_params": trainable, "micro_batches": len(batch.mbs),
                             "optimizer": cfg.optimizer, "sequences": len(seqs), "trajectories": len(rollouts),
                             "sequence_lens": lens, "packed": cfg.packed,
                             "padding_frac": batch.padding / max(1, batch.tokens),
                             "padding_frac_padded_layout": padded_padding / max(1, padded_tokens)})


# ============================================================================= TRL

def trl_prompt_lens(a, tok, n_steps: int) -> list[list[int]]:
    """Per step, per question, Scenario A then B: the tokens of the exgrpo dialogue before its last reply
    (template segments + the earlier replies, each exactly --completion tokens), as the trainer plans it."""
    from exgrpo import step as S
    from exgrpo.dialogues import load_probe_set, turn_segments
    from exgrpo.distributed import SINGLE
    cfg = train_config(a, "lora", out="")
    items = load_probe_set(cfg.probes)
    out = []
    for step in range(n_steps):
        plan = S.plan_step(items, step, S.step_seed(cfg.seed, step), cfg, SINGLE)
        out.append([sum(map(len, turn_segments(tok, list(t.turns))[:-1])) + (len(t.turns) - 1) * a.completion
                    for t in plan.trajectories[:: a.group]])   # one per (question, scenario): its G are alike
    return out


def run_trl(a, mode: str, liger: bool) -> dict:
    """TRL's GRPOTrainer on the same model, with single-turn prompts as long as the exgrpo dialogues before
    their last reply (trl_prompt_lens). Phases are cut at its own methods:
    rollout = _generate_single_turn, logprobs = the rest of _generate_and_score_completions (reference
    and old log-probs, rewards), update = the rest of the optimizer step (loss forward+backward over
    the micro-batches, optimizer)."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from exgrpo.models import load_model, load_tokenizer
    tok = load_tokenizer(a.model_path)
    cuda = a.device_type == "cuda"
    model = load_model(a.model_path, dtype=torch.bfloat16 if cuda else torch.float32, device=a.device_type)
    n_steps = a.warmup + a.steps
    lens_by_step = trl_prompt_lens(a, tok, n_steps)
    g = torch.Generator().manual_seed(1000)
    texts = [random_words(g, n, a.shape["vocab_size"]) for lens in lens_by_step for n in lens]
    per_step = 2 * a.group * a.questions
    mb_seqs = max(1, min(per_step, a.micro_batch_tokens // (max(lens_by_step[0]) + a.completion)))
    while per_step % mb_seqs:
        mb_seqs -= 1
    g = torch.Generator().manual_seed(7)
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
    optim = "adamw_torch" if mode == "lora" or a.full_optimizer == "adamw" else "adamw_torch_8bit"
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="exgrpo-trl-"), per_device_train_batch_size=mb_seqs,
        gradient_accumulation_steps=per_step // mb_seqs, num_generations=a.group,
        max_completion_length=a.completion, generation_kwargs={"min_new_tokens": a.completion},
        temperature=1.0, beta=a.beta, loss_type="dapo", learning_rate=a.lr, max_steps=n_steps,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim=optim, shuffle_dataset=False,
        gradient_checkpointing=a.grad_ckpt, bf16=cuda, use_cpu=not cuda, use_liger_kernel=liger, seed=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: (torch.rand(len(completions), generator=g) < 0.4).tolist(),
        args=cfg, train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok, peft_config=peft_config)
    meter = Meter(torch.device(a.device_type))
    steps = []

    def around(name, before, after):
        fn = getattr(trainer, name, None)
        if fn is None:
            raise RuntimeError(f"this TRL ({trl.__version__}) has no GRPOTrainer.{name}: "
                               "the phase cuts need updating")

        def wrapped(*args, **kw):
            meter.mark(before)
            try:
                return fn(*args, **kw)
            finally:
                meter.mark(after)
        setattr(trainer, name, wrapped)

    around("_generate_and_score_completions", "logprobs", "loss")
    around("_generate_single_turn", "rollout", "logprobs")

    class Cut(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.take()
            meter.mark("prepare")

        def on_pre_optimizer_step(self, args, state, control, **kw):
            meter.mark("optimizer")

        def on_optimizer_step(self, args, state, control, **kw):
            meter.mark("post_step")

        def on_step_end(self, args, state, control, **kw):
            rec = meter.take()
            if state.global_step > a.warmup:
                steps.append(rec)

    trainer.add_callback(Cut())
    trainer.train()
    lens = [n + a.completion for n in lens_by_step[-1] for _ in range(a.group)]
    flops = model_flops(a.shape, lens, per_step * a.completion, train_weights=mode == "full")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _summarise(steps, phase_work(lens, per_step * a.completion), flops,
                      extra={"trl": trl.__version__, "micro_batch_seqs": mb_seqs, "optimizer": optim,
                             "trainable_params": trainable})


# ============================================================================= reporting

def _peaks(recs) -> dict:
    """The highest allocated / reserved peak over these phase records (None where not measured: CPU)."""
    return {k: None if recs[0][k] is None else max(r[k] for r in recs) for k in ("peak_alloc_gb", "peak_reserved_gb")}


def _combine(*recs) -> dict:
    return {"ms": sum(r["ms"] for r in recs), **_peaks(recs)}


def _summarise(steps: list[dict], work: dict, update_flops: float, extra: dict) -> dict:
    if not steps:
        raise RuntimeError("no measured step was recorded")
    for s in steps:                                         # the update phase: loss forward+backward + optimizer
        s["update"] = _combine(s["loss"], s["optimizer"])
    phases = {}
    for name in sorted({k for s in steps for k in s}, key=lambda k: PHASES.index(k) if k in PHASES else -1):
        recs = [s[name] for s in steps if name in s]
        ms = statistics.median(r["ms"] for r in recs)
        row = {"ms": ms, **_peaks(recs)}
        if name in work:
            row["tokens"], row["tokens_kind"] = work[name]
            row["tokens_per_s"] = row["tokens"] / (ms * 1e-3)
        phases[name] = row
    # the case's peak is its own step's: the materialised-logits peer (loss_eager) has its phase row only
    peaks = [r["peak_alloc_gb"] for k, r in phases.items() if k != "loss_eager" and r["peak_alloc_gb"] is not None]
    out = {"phases": phases, "step_ms": sum(r["ms"] for k, r in phases.items()
                                           if k not in ("update", "loss_eager")),
           "peak_alloc_gb": max(peaks) if peaks else None, "update_flops": update_flops, **extra}
    if "update" in phases:
        out["update_tflops"] = update_flops / (phases["update"]["ms"] * 1e-3) / 1e12
    return out


def plan_check(a, mode: str, res: dict) -> dict:
    """`exgrpo plan` for the case's step, per phase: the planned tensor peak against the measured
    torch.cuda.max_memory_allocated (both without the CUDA context), and the relative error."""
    from exgrpo.plan import PlanConfig, plan
    a.model_path = a.model_dir
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 141 * 10**9
    cfg = PlanConfig.of(train_config(a, mode, out=""), probes="", out="", dtype="auto", device="auto",
                        model_config=str(a.model_path), gpu_memory=str(memory), probe_len=a.probe_len,
                        question_len=a.question_len, response_len=a.response_len)
    try:
        p = plan(cfg)
    except Exception as e:                                   # recorded, like a failing case
        return {"error": common.error_text(e, 300)}
    out = {}
    for name, ph in p["phases"].items():
        measured = res["phases"].get(name, {}).get("peak_alloc_gb")
        if measured:
            out[name] = {"planned_bytes": ph["peak_bytes"], "measured_bytes": int(measured * 1e9),
                         "error": ph["peak_bytes"] / (measured * 1e9) - 1}
    return out


def run_case(a, case: str) -> dict:
    trainer, mode = case.split(":")
    if trainer == "exgrpo":
        return run_exgrpo(a, mode)
    return run_trl(a, mode, liger=trainer == "trl-liger")


def _run_streamed(cmd: list[str], env: dict, timeout: float, prefix: str, echo: bool) -> tuple[int | None, list[str]]:
    """Run cmd, echoing its merged output line by line to stderr as `[prefix] line` (echo=True); -> (exit
    code, or None if it was killed at `timeout` seconds; its last 12 lines). Undecodable bytes are replaced,
    never fatal (a reader that stops would leave the child blocked on a full pipe), and the child is killed
    with this process's Ctrl-C or kill."""
    import collections
    import threading
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            encoding="utf-8", errors="replace")
    tail = collections.deque(maxlen=12)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            if echo:
                try:
                    print(f"[{prefix}] {line.rstrip()}", file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc = None
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=10)
    return rc, list(tail)


def _case_in_subprocess(argv: list[str], case: str, model_dir: Path, timeout: float, echo: bool) -> dict:
    """One case in a fresh process (its own CUDA context and peak memory); its output is echoed as it comes,
    so a log shows how far a killed run got."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--cases", case, "--model-dir", str(model_dir),
               "--case-json", str(path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not torch.cuda.is_available():                   # Triton kernels (exgrpo's, Liger's) interpreted
            env.setdefault("TRITON_INTERPRET", "1")
        rc, tail = _run_streamed(cmd, env, timeout, case, echo)
        if rc is None:
            return {"error": f"timed out after {timeout:.0f} s (--case-timeout)"}
        if path.exists():
            return json.loads(path.read_text())
        return {"error": f"exit {rc}: " + " | ".join(tail)[-1500:]}


def _without(argv: list[str], options: set[str]) -> list[str]:
    """argv minus these options and their values (both `--opt v1 v2` and `--opt=v`)."""
    out, skip = [], False
    for x in argv:
        if x.split("=")[0] in options:
            skip = "=" not in x
            continue
        if skip and not x.startswith("--"):
            continue
        skip = False
        out.append(x)
    return out


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, judged only on what was measured in this run."""
    by = {r["case"]: r for r in results if not r.get("error")}
    out = []

    def judge(name, ok, measured):
        out.append({"target": name, "met": ok, "measured": measured})

    for mode, limit in (("full", None), ("lora", 60.0)):
        r = by.get(f"exgrpo:{mode}")
        if r and r.get("peak_alloc_gb") is not None:
            ok = True if limit is None else r["peak_alloc_gb"] <= limit
            judge(f"exgrpo {mode} fits" + ("" if limit is None else f", peak <= {limit:.0f} GB"), ok,
                  f"peak allocated {r['peak_alloc_gb']:.1f} GB, reserved "
                  f"{max(p['peak_reserved_gb'] for k, p in r['phases'].items() if k != 'loss_eager'):.1f} GB")
    for mode in ("lora", "full"):
        ours, peer = by.get(f"exgrpo:{mode}"), by.get(f"trl-liger:{mode}")
        if ours and peer:
            speed = ours["phases"]["update"]["tokens_per_s"] / peer["phases"]["update"]["tokens_per_s"]
            judge(f"{mode} update tokens/s >= 1.5x TRL+Liger", speed >= 1.5, f"{speed:.2f}x")
            if ours["phases"]["update"]["peak_alloc_gb"] is not None:
                mem = ours["phases"]["update"]["peak_alloc_gb"] / peer["phases"]["update"]["peak_alloc_gb"]
                judge(f"{mode} update peak memory <= 0.5x TRL+Liger", mem <= 0.5, f"{mem:.2f}x")
    return out


def _phase_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for ph, v in (r.get("phases") or {"—": {}}).items():
            rows.append({"case": r["case"], "phase": ph, **v, "error": r.get("error")})
    return common.table(rows, [("case", "case", ""), ("phase", "phase", ""), ("median ms", "ms", ".1f"),
                               ("tokens/s", "tokens_per_s", ".4g"), ("peak alloc GB", "peak_alloc_gb", ".2f"),
                               ("peak reserved GB", "peak_reserved_gb", ".2f"), ("error", "error", "")])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    a.device_type = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.case_json:                                         # child: one case
        a.model_path = a.model_dir
        (case,) = a.cases
        try:
            res = run_case(a, case)
        except Exception as e:                              # an OOM or a peer's failure is a result
            res = {"error": common.error_text(e, 500)}
        Path(a.case_json).write_text(json.dumps(res))
        return res

    dev = torch.device(a.device_type)
    scratch = None if a.model_dir else tempfile.TemporaryDirectory(prefix="exgrpo-step-model-")
    if scratch is not None:
        a.model_dir = scratch.name
    with contextlib.redirect_stdout(sys.stderr):
        model_dir = prepare_model_dir(a)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    H, I = a.shape["hidden_size"], a.shape["intermediate_size"]
    mm = common.matmul_tflops(min(a.micro_batch_tokens, 16384), H, I, dt, dev, warmup=1 if a.tiny else 3,
                              reps=3 if a.tiny else 10)
    if dev.type == "cuda":                                  # the cases run in children: hold no GPU memory here
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    record = {"bench": "step", "machine": common.machine(), "args": {k: v for k, v in vars(a).items()
                                                                    if k not in ("case_json",)},
              "matmul_tflops": mm, "results": [], "targets": []}
    child_argv = _without(argv, {"--cases", "--model-dir", "--out"})
    path = common.result_path("step", record, a.out)
    from tqdm import tqdm
    for case in tqdm(a.cases, desc="cases", disable=a.tiny):
        res = {"case": case, **_case_in_subprocess(child_argv, case, model_dir, timeout=a.case_timeout,
                                                   echo=not a.tiny)}
        if "update_tflops" in res:
            res["update_frac_of_matmul"] = res["update_tflops"] / mm
        if a.plan and dev.type == "cuda" and case.startswith("exgrpo:") and "phases" in res:
            res["plan_vs_measured"] = plan_check(a, case.split(":")[1], res)
        record["results"].append(res)
        record["targets"] = targets(record["results"])
        common.write_json(path, record)                     # after every case: a killed run keeps what it measured
        print(_phase_table([res]), flush=True)
    print(_phase_table(record["results"]))
    for r in record["results"]:
        if "update_tflops" in r:
            print(f"{r['case']}: update {r['update_tflops']:.3g} useful TFLOP/s = "
                  f"{r['update_frac_of_matmul']:.0%} of the {mm:.3g} TFLOP/s matmul rate")
        if "padding_frac" in r:
            print(f"{r['case']}: {'packed' if r['packed'] else 'padded'} micro-batches, padding "
                  f"{r['padding_frac']:.1%} of the tokens (padded rows would have had "
                  f"{r['padding_frac_padded_layout']:.1%})")
    for r in record["results"]:
        if r.get("profile_loss"):
            print(f"\n{r['case']}: loss phase, top operators by self time")
            print(common.profile_table(r["profile_loss"][:12]))
    for t in record["targets"]:
        print(f"target {'MET' if t['met'] else 'MISSED'}: {t['target']} ({t['measured']})")
    common.write_json(path, record)
    print(f"wrote {path}")
    from bench.plots import plot_record
    print(f"wrote {plot_record(record, path.with_suffix('.png'))}")
    if scratch is not None:
        scratch.cleanup()
    return record


if __name__ == "__main__":
    main()
