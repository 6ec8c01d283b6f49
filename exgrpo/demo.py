"""The main job: EI -> SFT -> ExGRPO on the embedded default (synthetic task, oracle teacher, tiny
student), the paper's ablation run as an experiment on a CPU in minutes, with its statistics.

    cfg = DemoConfig(out="runs/demo")
    run_demo(cfg)          # stages one after another, each marked finished in runs/demo/status.json

Stages (each writes into the run folder; `resume=True` skips every stage already finished):

    data                    train / val / held-in test / OOD splits and the instruct pool (data/*.jsonl)
    probes:filter1          oracle probes for every train question, filter 1 (probes/filter1/)
    probes:val, probes:instruct   the same for val (the split every setting is chosen on) and for the
                            instruct pool (probes/val/, probes/instruct/)
    student:seed{s}         a random tiny Gemma student per seed, its BPE tokenizer trained on the
                            filter-1 probe-set corpus (train texts only)
    instruct:seed{s}        the shared instruct stage: SFT on 1-3-turn chats of the instruct pool, in
                            rounds, until the sampled accuracy of 2-turn chats on val reaches the target
    probes:filter2          filter 2 judged by the seed-0 instruct student -> D_EI (probes/)
    {sft arm}:seed{s}       vanilla SFT (equal steps; equal original pairs seen) and EI-SFT, from the
                            instruct student
    precondition:seed{s}    at the EI-SFT export, on val: P_full - P_partial with its interval, the share
                            of groups in which the DSU bonus changes an advantage, the starting dialogue
                            reward of RL
    {rl arm}:seed{s}        RL, RL + L_aux and ExGRPO from the EI-SFT export
    eval:seed{s}            held-in test + OOD + val accuracy of every arm, greedy, in one fresh process
                            that loads each arm's export with from_pretrained (evaluate_many_in_subprocess)
    report                  results.{json,md}, results.png, report.md: Wilson intervals per arm and
                            paired tests of the paper's claims

docs/demo.md says how every setting was chosen (on val, by criteria that compare no arms).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from exgrpo.runlock import write_json_atomic
from exgrpo.sft import SFTConfig
from exgrpo.train import TrainConfig

# ============================================================================= config

ARMS: tuple[str, ...] = ("sft_vanilla", "sft_vanilla_pairs", "sft_ei", "rl_outcome", "rl_aux", "exgrpo")
ARM_LABELS = {
    "sft_vanilla": "vanilla SFT (Q -> R_T), equal steps",
    "sft_vanilla_pairs": "vanilla SFT, equal pairs seen",
    "sft_ei": "EI-SFT (probes + pairs)",
    "rl_outcome": "EI-SFT + RL (R_base)",
    "rl_aux": "EI-SFT + RL + L_aux",
    "exgrpo": "EI-SFT + ExGRPO (DSU + L_aux)",
}
RL_ARMS = ("rl_outcome", "rl_aux", "exgrpo")
SFT_ARMS = ("sft_vanilla", "sft_vanilla_pairs", "sft_ei")
STATUS_FILE = "status.json"


def _sft_defaults() -> SFTConfig:
    # EI-SFT: half an epoch of D_EI (~300 optimizer steps at n_train=1000) on top of the instruct stage; no
    # intermediate checkpoints (a stage is the unit). 16 sequences a step: chosen by the time budget of the
    # instruct stage, which shares this batch size (docs/demo.md)
    return SFTConfig(epochs=0.5, lr=3e-3, batch_size=16, warmup_steps=10, save_every=10**9)


def _rl_defaults() -> TrainConfig:
    # 48 new tokens a turn: the longest teacher reply of the task (a probe's answer) is 36 tokens of the demo's
    # tokenizer, the longest held-in R_T 30 (measured on the default splits)
    return TrainConfig(steps=20, questions_per_step=4, group_size=4, k_probes=2, max_new_tokens=48, lr=3e-4,
                       save_every=10**9)


@dataclass
class DemoConfig:
    out: str = "runs/demo"                  # the run folder
    preset: Literal["default", "quick", "full"] = "default"   # --quick / --full pick the preset
    seeds: int = 1                          # independent seeds (student init + training order)
    seed: int = 0                           # the first seed; seeds are seed .. seed+seeds-1
    resume: bool = False                    # skip the stages already finished in the run folder
    stop_after: str | None = None           # stop after this stage (a name in status.json)
    arms: tuple[str, ...] = ARMS            # which ablation arms to run
    # data (synthetic task; the splits are generated with data_seed for every seed)
    n_train: int = 1000
    n_val: int = 210                        # held-in problems held out of training: every setting is chosen here
    n_test: int = 500                       # held-in test split (no setting chosen on it)
    n_ood: int = 300                        # OOD: more steps / unseen names and items / reversed, round-robin
    n_instruct: int = 1000                  # the instruct pool: held-in problems disjoint from all of the above
    data_seed: int = 0
    teacher_slip_rate: float = 0.1          # the oracle's share of wrong probe answers (filter 1 removes them)
    # the instruct stage: rounds of SFT on chats, stopped once 2-turn chats on val reach the target
    instruct_chat_probes: int = 2           # earlier turns before Q: 0..2, so 1-3-turn chats
    instruct_round_steps: int = 100         # a round: one cosine cycle (warm-up, decay), from the last round's export
    instruct_max_rounds: int = 10
    instruct_target: float = 0.5            # sampled accuracy of 2-turn chats (one probe, then Q) on val (docs/demo.md)
    # filter 2, judged by the instruct student
    tau_hard: int = 1
    hard_direction: Literal["intent", "printed", "off"] = "intent"
    drop_too_easy: bool = True
    judge_max_new_tokens: int = 48          # the longest probe answer is 36 tokens: room to reach "The answer is"
    # the bonus's precondition, measured at the EI-SFT export on val before RL
    pre_group_size: int = 4                 # G per scenario
    # student
    size: Literal["tiny", "shallow", "small"] = "shallow"
    vocab_size: int = 800
    context: int = 1024
    # the two SFT arms (EI-SFT's epochs; vanilla SFT's follow from it) and the three RL arms, from the
    # EI-SFT export: every setting of `exgrpo sft` / `exgrpo train` but those FIXED below, as --sft.* / --rl.*
    sft: SFTConfig = field(default_factory=_sft_defaults)
    vanilla_epochs: float | None = None     # none: as many optimizer steps as EI-SFT (compute-matched)
    rl: TrainConfig = field(default_factory=_rl_defaults)
    # evaluation
    eval_max_new_tokens: int = 56           # the longest R_T is 42 tokens (OOD, 5 steps), held-in 30
    eval_batch_size: int = 128
    eval_val: bool = True                   # also score the val split (the tuning split)
    progress: bool = True

    # Set per arm and seed by the demo itself (stage_arm), so not settings of the demo.
    FIXED: ClassVar[dict[str, tuple[str, ...]]] = {
        "sft": ("model", "probes", "out", "with_probes", "with_original", "seed", "resume", "overwrite", "progress",
                "device"),
        "rl": ("model", "probes", "out", "bonus", "seed", "resume", "overwrite", "progress", "device"),
    }
    # The demo's own names before its SFT and RL settings became SFTConfig / TrainConfig fields.
    RENAMED: ClassVar[dict[str, str]] = {
        "sft_epochs": "sft.epochs", "sft_lr": "sft.lr", "sft_batch_size": "sft.batch_size",
        "sft_warmup": "sft.warmup_steps", "rl_steps": "rl.steps", "rl_lr": "rl.lr",
        "questions_per_step": "rl.questions_per_step", "group_size": "rl.group_size", "k_probes": "rl.k_probes",
        "max_new_tokens": "rl.max_new_tokens", "beta": "rl.beta", "aux_coef": "rl.aux_coef", "delta": "rl.delta",
        "nu": "rl.nu",
    }


# Preset values sit between the dataclass defaults and the config file / flags.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {"size": "tiny", "n_train": 24, "n_val": 6, "n_test": 20, "n_ood": 21, "n_instruct": 16,
              "instruct_round_steps": 2, "instruct_max_rounds": 2, "instruct_target": 1.0, "pre_group_size": 2,
              "tau_hard": 0, "judge_max_new_tokens": 16, "eval_max_new_tokens": 32, "eval_val": False,
              "sft.epochs": 1.0, "sft.warmup_steps": 2,
              "rl.steps": 2, "rl.questions_per_step": 2, "rl.group_size": 2, "rl.k_probes": 2, "rl.max_new_tokens": 16},
    "full": dict(seeds=3),
}

# ============================================================================= the status file


class StageError(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage, self.cause = stage, cause


class Status:
    """status.json: {"config": {...}, "stages": {name: {"state", "seconds", "info" | "error"}}}."""

    def __init__(self, run: Path):
        self.path = run / STATUS_FILE
        self.data: dict[str, Any] = {"config": None, "stages": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def finished(self, name: str) -> bool:
        return self.data["stages"].get(name, {}).get("state") == "finished"

    def info(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {}).get("info") or {}

    def mark(self, name: str, **rec: Any) -> None:
        self.data["stages"][name] = rec
        write_json_atomic(self.path, self.data)


def _log(run: Path, msg: str) -> None:
    print(f"[demo] {msg}", flush=True)
    with open(run / "demo.log", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


# ============================================================================= stages


def _seeds(cfg: DemoConfig) -> list[int]:
    return list(range(cfg.seed, cfg.seed + cfg.seeds))


def stage_data(cfg: DemoConfig, run: Path) -> dict[str, Any]:
    """make_splits with n_train + n_val train problems; the last n_val (minus any repeat of a train
    question) become the val split. The test split is disjoint from both; the instruct pool (drawn from
    another seed's stream) from all three."""
    from exgrpo.tasks import synthetic
    sp = synthetic.make_splits(cfg.n_train + cfg.n_val, cfg.n_test, cfg.n_ood, cfg.data_seed)
    train = sp["train"][: cfg.n_train]
    seen = {e.question for e in train}
    val = [e for e in sp["train"][cfg.n_train:] if e.question not in seen]
    seen |= {e.question for e in val + sp["test"]}
    pool = [e for e in synthetic.generate(2 * cfg.n_instruct + 50, "held_in", cfg.data_seed + 7919)
            if e.question not in seen][: cfg.n_instruct]
    d = run / "data"
    d.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, exs in (("train", train), ("val", val), ("test", sp["test"]), ("ood", sp["ood"]), ("instruct", pool)):
        tmp = d / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in exs), encoding="utf-8")
        os.replace(tmp, d / f"{name}.jsonl")
        counts[name] = len(exs)
    # The vanilla SFT baseline's "probe set": every train question, no probes (Q -> R_T only), R_T the
    # synthetic dataset's own worked solution (the oracle teacher's R_T is the same text).
    v = d / "vanilla"
    v.mkdir(exist_ok=True)
    (v / "probe_set.jsonl").write_text("".join(
        json.dumps({"kept": True, "example": e.to_dict(), "rationale": e.rationale, "rationale_source": "dataset",
                    "probes": []}) + "\n" for e in train), encoding="utf-8")
    return {"counts": counts}


def _load_split(run: Path, name: str):
    from exgrpo.tasks import load_examples
    return load_examples("synthetic", run / "data" / f"{name}.jsonl").examples


def _probe_pipeline(cfg: DemoConfig, run: Path, split: str, out: Path, student=None) -> dict[str, Any]:
    from tqdm import tqdm

    from exgrpo.probes.pipeline import FilterSettings, run_pipeline
    from exgrpo.probes.rules import load_rules
    from exgrpo.probes.summary import render, summarize
    from exgrpo.probes.teachers import OracleTeacher
    from exgrpo.tasks import get_task, synthetic
    task = get_task("synthetic")
    examples = {e.id: e for e in _load_split(run, split)}
    items = [(task, e) for e in examples.values()]
    bar = tqdm(total=0, unit="probe", desc=f"probes {split}", disable=not cfg.progress, dynamic_ncols=True)

    def on_total(n: int) -> None:
        bar.total = n
        bar.refresh()

    try:
        res = run_pipeline(items, OracleTeacher(cfg.teacher_slip_rate), load_rules(None), out, student=student,
                           filters=FilterSettings(cfg.tau_hard, cfg.hard_direction, cfg.drop_too_easy),
                           workers=2, student_batch=256, on_total=on_total, on_progress=bar.update)
    finally:
        bar.close()
    if res.stopped:
        raise RuntimeError(f"the teacher stopped: {res.stopped}")
    s = summarize(res.unit_records, res.question_records, res.rationale_records)
    (out / "summary.txt").write_text(render(s) + "\n", encoding="utf-8")
    t = s.total
    slipped = sum(u["status"] == "ok" and u["probe_answer"] is not None
                  and u["probe_answer"] != synthetic.oracle_probe(examples[u["example_id"]], u["rule"]).answer
                  for u in res.unit_records)
    return {"questions": s.questions, "verdicts": dict(s.verdicts), "probes_attempted": t.attempted,
            "probes_generated": t.generated, "probes_consistent": t.consistent, "probes_kept": t.kept,
            "questions_kept": s.verdicts.get("kept", 0), "probes_slipped": slipped}




def stage_student(cfg: DemoConfig, run: Path, seed: int) -> dict[str, Any]:
    """A random student; the tokenizer is trained on the filter-1 probe set (train texts only)."""
    from exgrpo.dialogues import load_probe_set
    from exgrpo.models import build_tiny_student, corpus_for
    out = run / "students" / f"seed{seed}"
    corpus = corpus_for(load_probe_set(run / "probes" / "filter1"))
    build_tiny_student(out, corpus, size=cfg.size, seed=seed, context=cfg.context, vocab_size=cfg.vocab_size)
    return {"dir": str(out), "corpus_texts": len(corpus)}


def dialogue_outcomes(model_dir: Path, probes: Path, rl: TrainConfig, *, group_size: int, k_probes: int,
                      seed: int) -> dict[str, Any]:
    """One ExGRPO step's measurements, without the update: every question of the probe set once, Scenario A
    (k probes, the student answering each, then Q) and B (the first k') G times each, sampled as RL samples;
    R_base, P_full and P_partial per question, the DSU bonus and the advantages (exgrpo.step)."""
    from exgrpo import step as S
    from exgrpo.dialogues import load_probe_set
    from exgrpo.distributed import SINGLE
    from exgrpo.models import context_length, load_model, load_tokenizer
    from exgrpo.rollout import HFEngine
    from exgrpo.stats import mean_interval, wilson
    items = load_probe_set(probes)
    cfg = replace(rl, questions_per_step=len(items), group_size=group_size, k_probes=k_probes, seed=seed, bonus=True)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    engine = HFEngine(model, tok, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, batch_size=256,
                      max_context=context_length(model))
    step_seed = S.begin_step(seed, 0, SINGLE)
    plan = S.plan_step(items, 0, step_seed, cfg, SINGLE)
    rew = S.reward(plan, S.rollout(engine, plan))
    adv = S.advantages(rew, cfg)
    st = S.advantage_stats(rew, adv, cfg)
    q = len(items)
    full, part = rew.outcome[:, :group_size].mean(1), rew.outcome[:, group_size:].mean(1)
    diff, diff_ci = mean_interval((full - part).tolist()) if q > 1 else (float((full - part).mean()), None)
    return {"questions": q, "group_size": group_size, "k_probes": k_probes,
            "p_full": float(full.mean()), "p_partial": float(part.mean()),
            "p_full_minus_partial": diff, "p_full_minus_partial_ci": diff_ci,
            "reward": float(rew.outcome.mean()),
            "bonus_fired": int(adv.fired.sum()), "adv_nonzero": st.nonzero, "bonus_changed": st.bonus_changed,
            "adv_nonzero_ci": wilson(st.nonzero, q), "bonus_changed_ci": wilson(st.bonus_changed, q)}


def stage_instruct(cfg: DemoConfig, run: Path, seed: int) -> dict[str, Any]:
    """The random student learns to hold a chat: SFT on the instruct pool's 1-3-turn chats (0..2 probes with
    the teacher's answers, then Q -> R_T, every reply trained), in rounds of `instruct_round_steps`, each
    from the last round's export. After each round, 2-turn chats on val (one probe the student answers, then
    Q, sampled) are scored; the stage stops at the first round that reaches `instruct_target`, or after
    `instruct_max_rounds`. The criterion compares no arms: it is what every arm starts from."""
    from exgrpo.dialogues import load_probe_set
    from exgrpo.sft import sft
    pool = run / "probes" / "instruct"
    per_epoch = math.ceil(len(load_probe_set(pool)) / cfg.sft.batch_size)
    model, rounds = run / "students" / f"seed{seed}", []
    for r in range(cfg.instruct_max_rounds):
        out = run / "students" / f"seed{seed}-instruct" / f"round{r}"
        done = out / "chat_eval.json"
        if not done.exists():
            export = sft(replace(cfg.sft, model=str(model), probes=str(pool), out=str(out), with_probes=False,
                                 with_original=True, chat_probes=cfg.instruct_chat_probes,
                                 epochs=cfg.instruct_round_steps / per_epoch, schedule="cosine",
                                 seed=seed * 1000 + r,
                                 resume=(out / "config.json").exists(), progress=cfg.progress, device="cpu"))
            m = dialogue_outcomes(export, run / "probes" / "val", cfg.rl, group_size=1, k_probes=1, seed=seed)
            write_json_atomic(done, {"round": r, "export": str(export), "chat2": m["p_full"], "chat1": m["p_partial"]})
        rounds.append(json.loads(done.read_text()))
        model = Path(rounds[-1]["export"])
        _log(run, f"instruct seed {seed} round {r}: 2-turn chats on val {rounds[-1]['chat2']:.3f} "
                  f"(Q alone {rounds[-1]['chat1']:.3f}; target {cfg.instruct_target})")
        if rounds[-1]["chat2"] >= cfg.instruct_target:
            break
    return {"export": str(model), "rounds": rounds, "steps": len(rounds) * cfg.instruct_round_steps,
            "target": cfg.instruct_target, "met": rounds[-1]["chat2"] >= cfg.instruct_target}


def _instruct_export(run: Path, seed: int) -> Path:
    return Path(Status(run).info(f"instruct:seed{seed}")["export"])


def stage_filter2(cfg: DemoConfig, run: Path) -> dict[str, Any]:
    from exgrpo.probes.student import TransformersStudent
    # Large batches: generate() costs about the same per decoding step at batch 32 or 256 on CPU.
    judge = TransformersStudent(str(_instruct_export(run, cfg.seed)), max_new_tokens=cfg.judge_max_new_tokens,
                                batch_size=256)
    return _probe_pipeline(cfg, run, "train", run / "probes", student=judge)


def _sft_counts(run: Path) -> tuple[int, int]:
    """(EI-SFT sequences, vanilla SFT sequences)."""
    from exgrpo.dialogues import load_probe_set
    ei = load_probe_set(run / "probes")
    van = load_probe_set(run / "data" / "vanilla")
    return len(ei) + sum(len(it.probes) for it in ei), len(van)


def stage_arm(cfg: DemoConfig, run: Path, arm: str, seed: int, resume: bool) -> dict[str, Any]:
    from exgrpo.sft import sft
    from exgrpo.train import train
    out = run / "arms" / f"seed{seed}" / arm
    per_arm = dict(out=str(out), seed=seed, resume=resume, progress=cfg.progress, device="cpu")
    if arm in SFT_ARMS:
        n_ei, n_van = _sft_counts(run)
        if arm == "sft_ei":
            probes, epochs, with_probes = run / "probes", cfg.sft.epochs, True
        elif arm == "sft_vanilla_pairs":
            # Equal original pairs seen: EI-SFT sees each of its Q -> R_T pairs `epochs` times, so does this.
            probes, epochs, with_probes = run / "data" / "vanilla", cfg.sft.epochs, False
        else:
            # Equal steps: sft() runs ceil(epochs * ceil(n / batch)) optimizer steps; give vanilla SFT exactly as
            # many as EI-SFT (its few sequences are seen for proportionally more epochs).
            ei_steps = math.ceil(cfg.sft.epochs * math.ceil(n_ei / cfg.sft.batch_size))
            epochs = (cfg.vanilla_epochs if cfg.vanilla_epochs is not None
                      else ei_steps / math.ceil(n_van / cfg.sft.batch_size))
            probes, with_probes = run / "data" / "vanilla", False
        export = sft(replace(cfg.sft, model=str(_instruct_export(run, seed)), probes=str(probes),
                             with_probes=with_probes, with_original=True, epochs=epochs, **per_arm))
        recs = _metrics(out)
        return {"export": str(export), "epochs": epochs, "steps": len(recs),
                "nll_first": recs[0]["nll"] if recs else None, "nll_last": recs[-1]["nll"] if recs else None}
    knobs = {"rl_outcome": dict(bonus=False, aux_coef=0.0), "rl_aux": dict(bonus=False, aux_coef=cfg.rl.aux_coef),
             "exgrpo": dict(bonus=True, aux_coef=cfg.rl.aux_coef)}[arm]
    init = run / "arms" / f"seed{seed}" / "sft_ei" / "export"
    export = train(replace(cfg.rl, model=str(init), probes=str(run / "probes"), **per_arm, **knobs))
    recs = _metrics(out)
    third = max(1, len(recs) // 3)
    return {"export": str(export), "steps": len(recs),
            "reward_first_third": _mean([r["reward"] for r in recs[:third]]),
            "reward_last_third": _mean([r["reward"] for r in recs[-third:]]),
            "dsu_fire_rate": _mean([r["dsu_fire_rate"] for r in recs]),
            "adv_nonzero_frac": _mean([r["adv_nonzero_frac"] for r in recs]),
            "bonus_changed_frac": _mean([r["bonus_changed_frac"] for r in recs])}


def stage_precondition(cfg: DemoConfig, run: Path, seed: int) -> dict[str, Any]:
    """Before RL, at the EI-SFT export, on val: can the bonus act? It needs P_full > P_partial (walking through
    the probes helps) and groups in which it moves an advantage; and RL needs a dialogue reward between 0
    and 1 to have a signal at all. Measured with the RL arms' own dialogue settings."""
    return dialogue_outcomes(run / "arms" / f"seed{seed}" / "sft_ei" / "export", run / "probes" / "val", cfg.rl,
                             group_size=cfg.pre_group_size, k_probes=cfg.rl.k_probes, seed=seed)


def stage_eval(cfg: DemoConfig, run: Path, arms: list[str], seed: int) -> dict[str, Any]:
    """One fresh interpreter loads each arm's export with from_pretrained and answers Q alone; an arm whose
    eval.json a resumed stage already wrote is not evaluated again."""
    from exgrpo.evaluate import EvalConfig, evaluate_many_in_subprocess
    splits = ["test", "ood"] + (["val"] if cfg.eval_val and (run / "data" / "val.jsonl").stat().st_size else [])
    ec = EvalConfig(task="synthetic", data=tuple(f"{s}={run / 'data' / (s + '.jsonl')}" for s in splits),
                    max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size, device="cpu",
                    progress=False)
    dirs = [run / "arms" / f"seed{seed}" / arm for arm in arms]
    todo = [(d / "export", replace(ec, out=str(d / "eval.json"))) for d in dirs if not (d / "eval.json").exists()]
    if todo:
        evaluate_many_in_subprocess(todo)
    info = {}
    for arm, d in zip(arms, dirs):
        rep = json.loads((d / "eval.json").read_text(encoding="utf-8"))
        info[arm] = {"accuracy": rep["accuracy"], "n": {r["split"]: r["n"] for r in rep["results"]},
                     "model": rep["model"], "seconds": rep["seconds"]}
    return info


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ============================================================================= the run


@dataclass
class Stage:
    name: str
    fn: Callable[[], dict[str, Any] | None]
    outputs: list[Path] = field(default_factory=list)     # removed before a (re)run that does not resume


def plan(cfg: DemoConfig, run: Path, resume: bool) -> list[Stage]:
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    arms = [a for a in ARMS if a in cfg.arms]
    if any(a in RL_ARMS for a in arms) and "sft_ei" not in arms:
        raise ValueError("the RL arms start from the sft_ei export: keep sft_ei in --arms")
    def probes(split: str, name: str) -> Stage:      # filter 1 only
        out = run / "probes" / name
        return Stage(f"probes:{name}", lambda: _probe_pipeline(cfg, run, split, out), [out])

    # train's probes (filter 2 follows), val's (the dialogues of the instruct criterion and the precondition),
    # the instruct pool's (its chats)
    st = [Stage("data", lambda: stage_data(cfg, run), [run / "data"]),
          probes("train", "filter1"), probes("val", "val"), probes("instruct", "instruct")]
    for s in _seeds(cfg):
        st += [Stage(f"student:seed{s}", lambda s=s: stage_student(cfg, run, s), [run / "students" / f"seed{s}"]),
               Stage(f"instruct:seed{s}", lambda s=s: stage_instruct(cfg, run, s),
                     [run / "students" / f"seed{s}-instruct"])]
    st.append(Stage("probes:filter2", lambda: stage_filter2(cfg, run),
                    [run / "probes" / n for n in ("probe_set.jsonl", "probe_log.jsonl", "rationale_log.jsonl")]))

    def arm_stage(a: str, s: int) -> Stage:
        return Stage(f"{a}:seed{s}", lambda: stage_arm(cfg, run, a, s, resume), [run / "arms" / f"seed{s}" / a])

    for s in _seeds(cfg):
        st += [arm_stage(a, s) for a in arms if a in SFT_ARMS]
        if "sft_ei" in arms:
            st.append(Stage(f"precondition:seed{s}", lambda s=s: stage_precondition(cfg, run, s)))
        st += [arm_stage(a, s) for a in arms if a in RL_ARMS]
    for s in _seeds(cfg):
        st.append(Stage(f"eval:seed{s}", lambda s=s: stage_eval(cfg, run, arms, s),
                        [run / "arms" / f"seed{s}" / a / "eval.json" for a in arms]))
    st.append(Stage("report", lambda: stage_report(cfg, run)))
    return st


_RUN_ONLY = ("resume", "stop_after", "progress", "preset")     # may differ between a run and its resume


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Every stage in order; returns the report's results. Raises StageError naming the failed stage
    (earlier stages stay finished on disk)."""
    from exgrpo.configs import save_config
    run = Path(cfg.out)
    status_exists = (run / STATUS_FILE).exists()
    if status_exists and not cfg.resume:
        raise ValueError(f"{run} already holds a demo run ({STATUS_FILE}); continue it with --resume or pick "
                         "another --out")
    run.mkdir(parents=True, exist_ok=True)
    status = Status(run)
    mine = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in _RUN_ONLY}
    if status.data["config"] is not None:
        old = {k: v for k, v in status.data["config"].items() if k not in _RUN_ONLY}
        diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"--resume with different settings than the run in {run}: "
                             + ", ".join(f"{k} {old.get(k)!r} -> {mine.get(k)!r}" for k in diff))
    status.data["config"] = mine
    save_config(cfg, run / "config.json")
    stages = plan(cfg, run, cfg.resume)
    names = [s.name for s in stages]
    if cfg.stop_after is not None and cfg.stop_after not in names:
        raise ValueError(f"--stop-after {cfg.stop_after!r} is not a stage; stages: {', '.join(names)}")
    t_all = time.perf_counter()
    for i, s in enumerate(stages, 1):
        if status.finished(s.name):
            _log(run, f"[{i}/{len(stages)}] {s.name}: finished earlier, skipped")
        else:
            prior = status.data["stages"].get(s.name, {}).get("state")
            if prior is None:                           # never started: clear any stale output
                for p in s.outputs:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            _log(run, f"[{i}/{len(stages)}] {s.name}: running" + (f" (was {prior})" if prior else ""))
            status.mark(s.name, state="running", started=time.time())
            t0 = time.perf_counter()
            try:
                info = s.fn() or {}
            except BaseException as e:
                status.mark(s.name, state="failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                            seconds=round(time.perf_counter() - t0, 2), error=f"{type(e).__name__}: {e}",
                            traceback=traceback.format_exc()[-4000:])
                _log(run, f"[{i}/{len(stages)}] {s.name}: FAILED ({type(e).__name__}: {e})")
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise StageError(s.name, e) from e
            secs = round(time.perf_counter() - t0, 2)
            status.mark(s.name, state="finished", seconds=secs, info=info)
            _log(run, f"[{i}/{len(stages)}] {s.name}: finished in {secs:.1f}s")
        if s.name == cfg.stop_after:
            _log(run, f"stopped after {s.name} (--stop-after); continue with --resume")
            return {}
    _log(run, f"all stages done in {time.perf_counter() - t_all:.1f}s this invocation")
    return json.loads((run / "results.json").read_text())


# ============================================================================= the report

SPLIT_NAMES = {"test": "held-in test", "ood": "OOD", "val": "val (settings)"}

# The paper's claims this demo tests: (name, arm A, arm B); each is "A beats B", tested on the same questions.
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("EI-SFT beats vanilla SFT at equal optimizer steps", "sft_ei", "sft_vanilla"),
    ("EI-SFT beats vanilla SFT at equal original pairs seen", "sft_ei", "sft_vanilla_pairs"),
    ("the auxiliary SFT loss helps RL (RL + L_aux beats RL)", "rl_aux", "rl_outcome"),
    ("the DSU bonus helps (ExGRPO beats RL + L_aux)", "exgrpo", "rl_aux"),
    ("ExGRPO beats vanilla SFT (equal steps)", "exgrpo", "sft_vanilla"),
    ("ExGRPO beats EI-SFT", "exgrpo", "sft_ei"),
)


def _agg(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def _verdict(lo: float, hi: float) -> str:
    return "shown" if lo > 0 else "reversed" if hi < 0 else "not shown"


def collect(cfg: DemoConfig, run: Path) -> dict[str, Any]:
    """Accuracy per arm, split and seed, read back from each arm's eval.json (written by the fresh-process
    evaluation of that arm's export); Wilson intervals on the questions of all seeds pooled; the paired
    tests of CLAIMS on the same (seed, question) pairs."""
    from exgrpo.stats import paired, wilson
    status = Status(run)
    arms = [a for a in ARMS if a in cfg.arms]
    seeds = _seeds(cfg)
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    scores: dict[str, dict[int, dict[str, dict[str, bool]]]] = {}     # arm -> seed -> split -> id -> correct
    splits: list[str] = []
    for a in arms:
        per_seed[a], scores[a] = {}, {}
        for s in seeds:
            rep = json.loads((run / "arms" / f"seed{s}" / a / "eval.json").read_text())
            for row in rep["results"]:
                per_seed[a].setdefault(row["split"], {})[s] = row["accuracy"]
                if row["split"] not in splits:
                    splits.append(row["split"])
            scores[a][s] = {}
            for e in rep.get("examples", []):
                scores[a][s].setdefault(e["split"], {})[e["id"]] = bool(e["correct"])
    table = {a: {sp: _agg([per_seed[a][sp][s] for s in seeds]) for sp in splits} for a in arms}
    for a in arms:
        for sp in splits:
            flat = [c for s in seeds for c in scores[a][s].get(sp, {}).values()]
            if flat:
                table[a][sp]["pooled"] = {"k": sum(flat), "n": len(flat), "ci": wilson(sum(flat), len(flat))}
    claims = []
    for name, a, b in CLAIMS:
        if a not in arms or b not in arms:
            continue
        for sp in ("test", "ood"):
            xs, ys = [], []
            for s in seeds:
                ra, rb = scores[a][s].get(sp, {}), scores[b][s].get(sp, {})
                for i in ra.keys() & rb.keys():
                    xs.append(ra[i])
                    ys.append(rb[i])
            if xs:
                pr = paired(xs, ys)
                claims.append({"claim": name, "a": a, "b": b, "split": sp, "n": pr.n, "a_acc": pr.a, "b_acc": pr.b,
                               "diff": pr.diff, "ci": pr.ci, "a_only": pr.a_only, "b_only": pr.b_only,
                               "p_value": pr.p_value, "verdict": _verdict(*pr.ci)})
    ood = {a: table[a]["ood"]["mean"] for a in arms if "ood" in table[a]}
    target = None
    if all(a in ood for a in ("exgrpo", "sft_vanilla", "sft_ei")):
        target = {"exgrpo_ood": ood["exgrpo"], "sft_vanilla_ood": ood["sft_vanilla"], "sft_ei_ood": ood["sft_ei"],
                  "met": ood["exgrpo"] > ood["sft_vanilla"] and ood["exgrpo"] > ood["sft_ei"]}
    return {"arms": arms, "splits": splits, "seeds": seeds, "table": table, "claims": claims, "target": target,
            "data": status.info("data").get("counts", {}), "filter1": status.info("probes:filter1"),
            "filter2": status.info("probes:filter2"), "probes_val": status.info("probes:val"),
            "instruct": {s: status.info(f"instruct:seed{s}") for s in seeds},
            "precondition": {s: status.info(f"precondition:seed{s}") for s in seeds},
            "training": {f"{a}:seed{s}": status.info(f"{a}:seed{s}") for a in arms for s in seeds},
            "stage_seconds": {k: v.get("seconds") for k, v in status.data["stages"].items()}}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(c: dict[str, Any]) -> str:
    p = c.get("pooled")
    ci = f" [{_pct(p['ci'][0])}, {_pct(p['ci'][1])}]" if p else ""
    if c["n"] > 1:
        return f"{_pct(c['mean'])} ± {_pct(c['std'])}{ci}"
    return f"{_pct(c['mean'])}{ci}"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(fmt, rows)])


def render_table(res: dict[str, Any]) -> str:
    """Markdown table: accuracy % per arm and split (mean ± sample std over seeds when > 1), with the 95 %
    Wilson interval of the questions of all seeds pooled."""
    head = ["arm", *[SPLIT_NAMES.get(s, s) for s in res["splits"]]]
    rows = [[ARM_LABELS[a], *[_cell(res["table"][a][s]) for s in res["splits"]]] for a in res["arms"]]
    return _md_table(head, rows)


def render_claims(res: dict[str, Any]) -> str:
    head = ["claim (A beats B)", "split", "n", "A %", "B %", "A - B, points [95 % CI]", "A only / B only",
            "McNemar p", "verdict"]
    rows = [[c["claim"], SPLIT_NAMES.get(c["split"], c["split"]), str(c["n"]), _pct(c["a_acc"]), _pct(c["b_acc"]),
             f"{100 * c['diff']:+.1f} [{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]",
             f"{c['a_only']} / {c['b_only']}", f"{c['p_value']:.3g}", c["verdict"]] for c in res["claims"]]
    return _md_table(head, rows)


def plot(cfg: DemoConfig, run: Path, res: dict[str, Any]) -> Path:
    """Left: accuracy bars per arm and split (error bars: the pooled 95 % Wilson interval). Middle and right:
    the RL arms' mean reward and the share of groups in which the bonus changed an advantage, per step
    (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    arms, splits = res["arms"], res["splits"]
    width = 0.8 / max(1, len(splits))
    for j, sp in enumerate(splits):
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(arms))]
        m = [100 * res["table"][a][sp]["mean"] for a in arms]
        ci = [res["table"][a][sp].get("pooled", {}).get("ci") for a in arms]
        err = None if any(c is None for c in ci) else [[mi - 100 * c[0] for mi, c in zip(m, ci)],
                                                       [100 * c[1] - mi for mi, c in zip(m, ci)]]
        ax.bar(xs, m, width, yerr=err, capsize=3, label=SPLIT_NAMES.get(sp, sp))
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([ARM_LABELS[a].replace(" (", "\n(").replace(", ", ",\n").replace(" + ", "\n+ ", 1)
                        for a in arms], fontsize=6)
    ax.set_ylabel("accuracy % (95 % Wilson interval)")
    ax.set_title(f"accuracy ({len(res['seeds'])} seed{'s' if len(res['seeds']) > 1 else ''})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    for ax, key, title in ((axes[1], "reward", "RL reward (R_total, mean)"),
                           (axes[2], "bonus_changed_frac", "groups whose advantage the DSU bonus changed")):
        for a in [a for a in arms if a in RL_ARMS]:
            by_step: dict[int, list[float]] = {}
            for s in res["seeds"]:
                for r in _metrics(run / "arms" / f"seed{s}" / a):
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
                        by_step.setdefault(r["step"], []).append(r[key])
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [statistics.fmean(by_step[t]) for t in steps], label=ARM_LABELS[a],
                        marker="." if len(steps) < 40 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = run / "results.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _precondition_lines(res: dict[str, Any]) -> list[str]:
    from exgrpo.stats import format_interval
    lines = []
    for s, p in res["precondition"].items():
        if not p:
            continue
        q = p["questions"]
        ci = p["p_full_minus_partial_ci"]
        gap = f"{100 * p['p_full_minus_partial']:+.1f} points" + (
            f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] ({_verdict(*ci)})" if ci else "")
        lines += [
            f"- seed {s}, {q} val questions, {p['group_size']} samples per scenario, k = {p['k_probes']} probes: "
            f"P_full {_pct(p['p_full'])} %, P_partial {_pct(p['p_partial'])} %, P_full - P_partial {gap}",
            f"  - starting dialogue reward (mean R_base, both scenarios): {p['reward']:.3f}"
            + (" (within 0.2-0.8)" if 0.2 <= p["reward"] <= 0.8 else " (outside the 0.2-0.8 target)"),
            f"  - groups with a non-zero advantage: {p['adv_nonzero']} of {q} "
            f"[{_pct(p['adv_nonzero_ci'][0])}, {_pct(p['adv_nonzero_ci'][1])}] %; the bonus fired in "
            f"{p['bonus_fired']} and changed an advantage in {p['bonus_changed']} of {q} "
            f"({format_interval(p['bonus_changed'] / q, p['bonus_changed_ci'])}; target: at least 10 %)"]
    return lines


def report_md(cfg: DemoConfig, res: dict[str, Any], table: str) -> str:
    multi = len(res["seeds"]) > 1
    f1, f2, fv, d = res["filter1"], res["filter2"], res["probes_val"], res["data"]
    lines = [
        "# exgrpo demo: results", "",
        f"Synthetic arithmetic task (docs/demo.md), oracle teacher slipping on {100 * cfg.teacher_slip_rate:g} % of "
        f"probe answers, `{cfg.size}` Gemma-architecture student trained from scratch on CPU; "
        f"{len(res['seeds'])} seed(s) {res['seeds']}; preset `{cfg.preset}`.", "",
        "## The paper's claims, tested", "",
        "Paired on the same questions" + (" (all seeds' questions pooled)" if multi else "") + ": the difference "
        "in accuracy with its 95 % interval (Newcombe's method 10) and the exact McNemar p. **shown**: the interval "
        "excludes 0 in the claimed direction; **not shown**: it includes 0; **reversed**: it excludes 0 the other "
        "way.", "", render_claims(res), "",
        "## Accuracy (%)" + (", mean ± sample std over seeds" if multi else "")
        + " [95 % Wilson interval]", "", table, "",
        "Greedy single pass, the student sees Q alone. Each number is from the arm's exported checkpoint, "
        "reloaded with `from_pretrained` in a fresh process (`evaluate_many_in_subprocess`); per-example outputs "
        "are in "
        "`arms/seed*/<arm>/eval.json`. `val` is the split every setting was chosen on (docs/demo.md); "
        "`held-in test` and `OOD` chose nothing.", "",
        "## Before RL: can the bonus act?", "", *_precondition_lines(res), "",
        "## The instruct stage", "",
    ]
    for s, info in res["instruct"].items():
        if info:
            hist = ", ".join(f"round {r['round']}: {_pct(r['chat2'])} %" for r in info["rounds"])
            lines.append(f"- seed {s}: 2-turn chats on val (sampled) {hist}; target {_pct(info['target'])} % "
                         f"{'met' if info['met'] else 'NOT met'} after {info['steps']} steps")
    lines += [
        "", "## Data and filters", "",
        f"- splits: {d}",
        f"- filter 1 (the oracle re-check finishes Q from each probe's answer): {f1.get('probes_consistent')} of "
        f"{f1.get('probes_attempted')} train probes consistent; the teacher slipped on {f1.get('probes_slipped')}; "
        f"{f1.get('questions_kept')} of {f1.get('questions')} questions keep at least one (val: "
        f"{fv.get('probes_consistent')} of {fv.get('probes_attempted')})",
        f"- filter 2 (the seed-{cfg.seed} instruct student, {cfg.judge_max_new_tokens} new tokens, direction "
        f"`{cfg.hard_direction}`, tau_hard={cfg.tau_hard}, drop too easy={cfg.drop_too_easy}): verdicts "
        f"{f2.get('verdicts')}; {f2.get('probes_kept')} probes kept in {f2.get('questions_kept')} questions", "",
        "## Training", "",
    ]
    for k, v in res["training"].items():
        if not v:
            continue
        keep = {x: (round(y, 4) if isinstance(y, float) else y) for x, y in v.items() if x != "export"}
        lines.append(f"- `{k}`: {keep}")
    t = res["target"]
    if t is not None:
        lines += ["", f"Issue 5's target (OOD: ExGRPO above vanilla SFT and EI-SFT, point estimates): "
                      f"{'met' if t['met'] else 'not met'} ({_pct(t['exgrpo_ood'])} vs {_pct(t['sft_vanilla_ood'])} "
                      f"and {_pct(t['sft_ei_ood'])}); the claims table above says whether the gaps are shown."]
    lines += ["", "## Wall time per stage (s)", "", ", ".join(f"{k} {v}" for k, v in res["stage_seconds"].items()
                                                              if v is not None), "",
              "Figure: `results.png` (accuracy with intervals; RL reward and the bonus's reach per step).", ""]
    return "\n".join(lines)


def stage_report(cfg: DemoConfig, run: Path) -> dict[str, Any]:
    res = collect(cfg, run)
    table = render_table(res)
    write_json_atomic(run / "results.json", res)
    (run / "results.md").write_text(table + "\n\n" + render_claims(res) + "\n", encoding="utf-8")
    plot(cfg, run, res)
    (run / "report.md").write_text(report_md(cfg, res, table), encoding="utf-8")
    print("\n" + table + "\n\n" + render_claims(res) + "\n", flush=True)
    print(f"report: {run / 'report.md'}  figure: {run / 'results.png'}", file=sys.stderr, flush=True)
    return {"claims": {f"{c['a']}>{c['b']}:{c['split']}": c["verdict"] for c in res["claims"]}}
