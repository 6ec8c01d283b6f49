"""`exgrpo probe`: build (or resume) an Explanatory Inversion probe set.

    exgrpo probe                                   # synthetic task, oracle teacher, offline
    exgrpo probe --task gsm8k --data train.jsonl --teacher http \\
        --base-url http://127.0.0.1:8000/v1 --teacher-model Qwen/Qwen2.5-72B-Instruct \\
        --student runs/student0 --out runs/ei-gsm8k
    exgrpo probe --config probe.toml --concurrency 32   # file, then command-line overrides

R_T (the chain of thought the probes are written from, and SFT's Q -> R_T pair): by default the
teacher's own solution of each question, kept only when its extracted answer is the gold one, asked
up to --rationale-tries times; a question without one is dropped (verdict "no_rationale") before any
probe is written. --rationale dataset uses the dataset's own rationale where it has one (GSM8K's
solution) and the teacher's elsewhere. The probe set records which was used.

Every field of `ProbeConfig` is a config-file key and a `--flag`. The merged config is saved as
`config.json` in the output folder. Re-running the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exgrpo.cli import fail
from exgrpo.configs import add_dataclass_arguments, config_from_args, save_config


@dataclass
class ProbeConfig:
    # data
    task: str = "synthetic"               # a registry task (exgrpo.tasks.TASKS)
    data: str | None = None               # dataset file; for `synthetic` without one, problems are generated
    limit: int | None = None              # use the first N examples
    field: tuple[str, ...] = ()           # NAME=SOURCE field mappings for a copy that names fields differently
    skip_bad_lines: bool = False          # skip and count malformed dataset records instead of stopping
    synthetic_split: Literal["held_in", "ood"] = "held_in"
    synthetic_n: int = 200
    synthetic_seed: int = 0
    # rules
    rules_file: str | None = None         # default: the shipped exgrpo/data/probe_rules.json
    rules: str | None = None              # comma-separated subset of rule names
    # R_T, the teacher's chain of thought the probes are written from and SFT's Q -> R_T pair trains on
    rationale: Literal["teacher", "dataset"] = "teacher"   # dataset: the dataset's own where it has one
    rationale_tries: int = 3              # teacher attempts at an R_T with the gold answer; none: Q dropped
    # teacher
    teacher: Literal["oracle", "http", "vllm", "transformers"] = "oracle"
    teacher_model: str = ""               # served model name (http, vllm) or a local directory (transformers)
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"   # name of the variable holding the key, never the key itself
    concurrency: int = 8                  # requests in flight
    timeout_s: float = 120.0
    max_retries: int = 5
    retry_failed: int = 2                 # a probe whose teacher reply failed is asked again on later runs, this often
    backoff_s: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None
    # filter 2
    student: str | None = None            # local transformers model directory; none: filter 2 off
    student_max_new_tokens: int = 256
    student_batch_size: int = 16
    tau_hard: int = 1
    hard_direction: Literal["intent", "printed", "off"] = "intent"
    drop_too_easy: bool = True
    # output
    out: str = "runs/probes"
    fsync: bool = False                   # fsync every record (power-loss safety; slower)
    progress: bool = True


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ProbeConfig)


# ---------------------------------------------------------------- wiring

def build_items(cfg: ProbeConfig) -> tuple[list, list[str]]:
    from exgrpo.tasks import get_task, load_examples, synthetic
    task = get_task(cfg.task)
    if cfg.data is None:
        if task.name != "synthetic":
            raise ValueError(f"task {task.name!r} needs --data (expected: {task.files})")
        exs = synthetic.generate(cfg.synthetic_n, cfg.synthetic_split, cfg.synthetic_seed)
        if cfg.limit is not None:
            exs = exs[: cfg.limit]
        return [(task, e) for e in exs], []
    res = load_examples(task, cfg.data, skip_bad=cfg.skip_bad_lines, limit=cfg.limit, fields=cfg.field)
    for note in res.notes:                           # e.g. options shuffled: said before any teacher call
        print(f"exgrpo probe: {note}", file=sys.stderr)
    if not res.examples:
        first = f"; the first skipped: {res.skipped[0]}" if res.skipped else ""
        raise ValueError(f"no example could be read from {cfg.data}{first} (check the file with `exgrpo data "
                         f"{task.name} {cfg.data}`)")
    return [(task, e) for e in res.examples], res.skipped


def check_secrets(cfg: ProbeConfig) -> None:
    """The API key is read from the variable `api_key_env` names, never held in the config (which is saved in
    the run folder): a key given in its place or inside the URL is refused, and a variable the user named
    must be set. The default variable may be unset (a local server without auth)."""
    import re
    from urllib.parse import urlsplit
    name = cfg.api_key_env
    if name and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError("--api-key-env must be the NAME of the environment variable holding the key (e.g. "
                         "OPENAI_API_KEY), and what was given is not a variable name; it is not saved")
    if name and name != ProbeConfig.api_key_env and not os.environ.get(name):
        raise ValueError(f"--api-key-env {name}: that environment variable is not set (export it, or pass "
                         "--api-key-env '' for a server without auth)")
    url = urlsplit(cfg.base_url)
    if url.username or url.password or re.search(r"(?i)(key|token|secret)=", url.query):
        raise ValueError("--base-url carries a credential; put the key in an environment variable and name it "
                         "with --api-key-env (the URL is saved in the run folder's config.json)")


def build_teacher(cfg: ProbeConfig, rules: Any) -> Any:
    from exgrpo.probes import backends, teachers
    if cfg.teacher == "oracle":
        return teachers.OracleTeacher()
    if not cfg.teacher_model:
        raise ValueError(f"--teacher {cfg.teacher} needs --teacher-model")
    if cfg.teacher == "http":
        check_secrets(cfg)
        b = backends.HTTPBackend(backends.HTTPSettings(
            base_url=cfg.base_url, model=cfg.teacher_model, api_key_env=cfg.api_key_env,
            max_concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed))
    elif cfg.teacher == "vllm":
        b = backends.VLLMBackend(cfg.teacher_model, cfg.temperature, cfg.max_tokens,
                                 batch_size=cfg.concurrency, seed=cfg.seed)
    else:
        b = backends.TransformersBackend(cfg.teacher_model, max_new_tokens=cfg.max_tokens,
                                         batch_size=cfg.concurrency)
    return teachers.LLMTeacher(b, rules)


def run(args: argparse.Namespace) -> int:
    from exgrpo.probes.pipeline import FilterSettings, RationaleSettings, run_pipeline
    from exgrpo.probes.rules import load_rules
    from exgrpo.probes.summary import render, summarize
    from exgrpo.runlock import claim_folder
    from exgrpo.tasks.loaders import DatasetError

    try:
        cfg = config_from_args(ProbeConfig, args, table="probe")
        rationale = RationaleSettings(cfg.rationale, cfg.rationale_tries)
        rationale.check()
        if cfg.retry_failed < 0:
            raise ValueError(f"--retry-failed must be >= 0, got {cfg.retry_failed}")
        rules = load_rules(cfg.rules_file).select(cfg.rules.split(",") if cfg.rules else None)
        items, skipped = build_items(cfg)
        teacher = build_teacher(cfg, rules)
        student = None
        if cfg.student:
            from exgrpo.probes.student import TransformersStudent
            student = TransformersStudent(cfg.student, cfg.student_max_new_tokens, cfg.student_batch_size)
    except (ValueError, OSError, KeyError, ImportError, DatasetError) as e:
        return fail("probe", e)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} malformed dataset record(s)", file=sys.stderr)

    out = Path(cfg.out)
    try:
        claim_folder(out, "the probe set")          # one `exgrpo probe` per folder: a second would double records
    except (ValueError, OSError) as e:
        return fail("probe", e)
    save_config(cfg, out / "config.json")

    bar = None
    on_total = on_progress = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="probe", dynamic_ncols=True, desc=f"probes {cfg.task}")

        def on_total(n: int) -> None:
            bar.total = n
            bar.refresh()

        on_progress = bar.update
    try:
        res = run_pipeline(items, teacher, rules, out, student=student,
                           filters=FilterSettings(cfg.tau_hard, cfg.hard_direction, cfg.drop_too_easy),
                           rationale=rationale, retry_failed=cfg.retry_failed, workers=cfg.concurrency,
                           student_batch=max(1, cfg.student_batch_size * 4), fsync=cfg.fsync,
                           on_total=on_total, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    for p in res.dropped_torn_lines:
        print(f"resume: dropped a torn last line in {p} (an interrupted write)", file=sys.stderr)
    print(render(summarize(res.unit_records, res.question_records, res.rationale_records)))
    print(f"\n{res.examples} questions: {res.questions_written} written now, {res.questions_skipped} already "
          f"done; {res.rationale_attempts_done} R_T attempts made, {res.rationale_attempts_skipped} reused; "
          f"{res.units_done} probes computed, {res.units_skipped} reused from the log; "
          f"skipped dataset records: {len(skipped)}")
    print(f"probe set: {out / 'probe_set.jsonl'}  work logs: {out / 'probe_log.jsonl'}, "
          f"{out / 'rationale_log.jsonl'}")
    if res.stopped:
        print(f"exgrpo probe: stopped early: {res.stopped}\nThe work done so far is saved; run the same "
              "command again to resume.", file=sys.stderr)
        return 3
    if (why := all_failed(res)) is not None:
        print(f"exgrpo probe: every teacher call of this run failed; the commonest error: {why}", file=sys.stderr)
        return 4
    return 0


def all_failed(res: Any) -> str | None:
    """The commonest error when this run made teacher calls and not one of them gave a usable answer."""
    from collections import Counter
    units = [u for u in res.unit_records if u.get("status")]
    rts = list(res.rationale_records)
    if not (res.units_done or res.rationale_attempts_done):
        return None
    if any(u["status"] == "ok" for u in units) or any(r.get("correct") for r in rts):
        return None
    errors = Counter([f"{u['stage']}: {u['reason']}" for u in units] + [f"R_T: {r['reason']}" for r in rts])
    return errors.most_common(1)[0][0] if errors else "unknown"
