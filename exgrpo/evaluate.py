"""Evaluation the way the method is deployed (docs/method.md): the student sees Q alone, answers once
with greedy decoding, and the task's extractor and comparison score the answer. Metric: accuracy.

    cfg = EvalConfig(model="runs/demo/full/checkpoint", split=("test", "ood"), n=200)
    report = evaluate(cfg)                  # {"accuracy": {"test": 0.41, "ood": 0.12}, ...}
    print(render_table(report))
    report = evaluate_in_subprocess("runs/demo/full/checkpoint", cfg)   # same, in a fresh process

Data. A registry task reads its files: `data=("dev.jsonl",)` or `("held_in=a.jsonl", "ood=b.jsonl")`
(the split label is the file stem unless given). The synthetic task generates its splits
(`exgrpo.tasks.synthetic`), deterministic in `seed`:

    train    make_splits(n_train, ...)["train"]: held-in problems 0 .. n_train-1 (what SFT/RL train on)
    test     the HELD-IN TEST split: make_splits(n_train, n, n, seed)["test"], held-in problems after
             the first n_train whose question text is not among them. Pass the n_train the student
             was trained with (or more): it is what keeps test disjoint from train.
    ood      the out-of-distribution test split: make_splits(...)["ood"] = generate(n, "ood", seed)
             (more steps, larger numbers, or reversed questions, round-robin)
    held_in  the raw held-in stream, problems 0 .. n-1: for the same seed these ARE the first n
             training problems, so it measures fit to the training data, not generalisation.

Scoring without a model: `outputs="outputs.jsonl"` with lines {"id": ..., "output": ...}; every
evaluated example needs a line (missing ids are an error that names them).

The report (also written as JSON to `cfg.out`):

    {"task": "synthetic", "model": "runs/x" | null, "outputs": null | "file.jsonl",
     "accuracy": {"test": 0.41, "ood": 0.12},
     "results": [{"task", "split", "n", "correct", "accuracy", "notes"}, ...],
     "examples": [{"task", "split", "id", "prediction", "gold", "correct", "output"
                   [, "options_shuffled": {"source_order", "source_answer"}]}, ...],
     "config": {EvalConfig fields}, "seconds": 12.3}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exgrpo.runlock import lock, release, write_json_atomic
from exgrpo.tasks import Example, Task, get_task, load_examples

SYNTHETIC_SPLITS = ("train", "test", "ood", "held_in")


class EvalError(ValueError):
    pass


@dataclass
class EvalConfig:
    # what answers
    model: str | None = None              # local transformers model directory (an exported checkpoint or any)
    outputs: str | None = None            # JSONL of {"id", "output"} to score instead of running a model
    # data
    task: str = "synthetic"               # a registry task (exgrpo.tasks.TASKS)
    data: tuple[str, ...] = ()            # dataset files, each "path" or "split=path"; synthetic: none
    limit: int | None = None              # use the first N examples of each data file
    field: tuple[str, ...] = ()           # NAME=SOURCE field mappings for a copy that names fields differently
    skip_bad_lines: bool = False          # skip (and count in the report's notes) records that cannot be read
    split: tuple[str, ...] = ("test", "ood")  # synthetic splits: train, test (held-in test), ood, held_in
    n: int = 200                          # synthetic: examples per split
    n_train: int = 1000                   # synthetic: size of the train split that `test` is disjoint from
    seed: int = 0                         # synthetic: generator seed
    # generation
    max_new_tokens: int = 256
    batch_size: int = 16
    device: str = "auto"                  # auto: cuda when available, else cpu
    # output
    out: str | None = "runs/eval.json"    # the JSON report; none: print only
    progress: bool = True


@dataclass(frozen=True)
class EvalSet:
    task: Task
    split: str
    examples: list[Example]
    notes: tuple[str, ...] = ()           # what the loader changed (e.g. options shuffled)


# ---------------------------------------------------------------- data

def _synthetic_split(cfg: EvalConfig, split: str) -> list[Example]:
    from exgrpo.tasks import synthetic
    if split == "held_in":
        return synthetic.generate(cfg.n, "held_in", cfg.seed)
    if split == "ood":
        return synthetic.generate(cfg.n, "ood", cfg.seed)
    if split == "train":
        return synthetic.generate(cfg.n_train, "held_in", cfg.seed)
    return synthetic.make_splits(cfg.n_train, cfg.n, 0, cfg.seed)["test"]


def build_sets(cfg: EvalConfig) -> list[EvalSet]:
    """The (task, split, examples) to evaluate, in the order given."""
    try:
        task = get_task(cfg.task)
    except KeyError as e:
        raise EvalError(e.args[0]) from None
    if cfg.data:
        sets = []
        for item in cfg.data:
            label, sep, path = item.partition("=")
            if not sep:
                label, path = Path(item).stem, item
            res = load_examples(task, path, limit=cfg.limit, fields=cfg.field, skip_bad=cfg.skip_bad_lines)
            skipped = [f"skipped {len(res.skipped)} unreadable record(s), the first: {res.skipped[0]}"] \
                if res.skipped else []
            sets.append(EvalSet(task, label, res.examples, (*res.notes, *skipped)))
        return sets
    if task.name != "synthetic":
        raise EvalError(f"task {task.name!r} needs --data (expected: {task.files})")
    bad = [s for s in cfg.split if s not in SYNTHETIC_SPLITS]
    if bad or not cfg.split:
        raise EvalError(f"unknown synthetic split(s) {bad or '(none given)'}; choose from "
                        f"{', '.join(SYNTHETIC_SPLITS)} (test is the held-in test split)")
    return [EvalSet(task, s, _synthetic_split(cfg, s)) for s in cfg.split]


def read_outputs(path: str | Path) -> dict[str, str]:
    """id -> model output from a JSONL file of {"id": ..., "output": ...} lines."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"outputs file not found: {p}")
    out: dict[str, str] = {}
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{p}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("output"), str):
                raise EvalError(f'{p}:{i}: expected {{"id": ..., "output": "..."}}')
            key = str(rec["id"])
            if key in out:
                raise EvalError(f"{p}:{i}: duplicate id {key!r}")
            out[key] = rec["output"]
    return out


# ---------------------------------------------------------------- generation

def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_model(model_dir: str | Path, max_new_tokens: int, device: str = "auto"):
    """A greedy `LocalChatModel` that stops at the end of its turn. Fails before any compute on a
    directory without weights or a tokenizer without a chat template."""
    from exgrpo.models import END_OF_TURN, check_model_dir, load_tokenizer
    from exgrpo.probes.local_model import LocalChatModel
    path = check_model_dir(model_dir)
    load_tokenizer(path)  # raises ModelError when there is no chat template
    lm = LocalChatModel(str(path), max_new_tokens=max_new_tokens, device=_device(device))
    # Stop at the end of the turn as well as at whatever eos the checkpoint's generation config names.
    gen = lm.model.generation_config
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    extra = [lm.tok.eos_token_id, lm.tok.convert_tokens_to_ids(END_OF_TURN)]
    gen.eos_token_id = sorted({t for t in [*stops, *extra] if isinstance(t, int) and t != lm.tok.unk_token_id})
    return lm


def generate_answers(lm: Any, prompts: list[str], batch_size: int, progress: bool = True,
                     desc: str = "eval") -> list[str]:
    """One greedy answer per prompt, each prompt alone as the user turn. Batches are formed from
    prompts of similar length (less left padding); answers come back in the prompts' order."""
    from exgrpo.models import END_OF_TURN
    from exgrpo.probes.local_model import length_batches
    answers: list[str] = [""] * len(prompts)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), unit="q", desc=desc, dynamic_ncols=True)
    try:
        for idx in length_batches(prompts, batch_size):
            outs = lm.generate([[{"role": "user", "content": prompts[i]}] for i in idx])
            for i, o in zip(idx, outs):
                answers[i] = o.split(END_OF_TURN, 1)[0]
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return answers


# ---------------------------------------------------------------- scoring

def score(es: EvalSet, outputs: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the split's row, per-example records). Every example must have an output."""
    missing = [e.id for e in es.examples if e.id not in outputs]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise EvalError(f"no output for {len(missing)} example(s) of {es.task.name}/{es.split}: {shown}")
    records = []
    for ex in es.examples:
        text = outputs[ex.id]
        pred = es.task.extract(text, ex)
        rec = {"task": es.task.name, "split": es.split, "id": ex.id, "prediction": pred,
               "gold": ex.answer, "correct": es.task.is_correct(pred, ex.answer), "output": text}
        if "options_shuffled" in ex.meta:     # the options as the model saw them vs the source's order
            rec["options_shuffled"] = ex.meta["options_shuffled"]
        records.append(rec)
    n, correct = len(records), sum(r["correct"] for r in records)
    row = {"task": es.task.name, "split": es.split, "n": n, "correct": correct,
           "accuracy": correct / n if n else 0.0, "notes": list(es.notes)}
    return row, records


def _check_ids_unambiguous(sets: list[EvalSet]) -> None:
    """An outputs file is keyed by id alone: one id must not name two different questions."""
    seen: dict[str, tuple[str, str]] = {}
    for es in sets:
        for e in es.examples:
            if e.id in seen and seen[e.id][1] != e.question:
                raise EvalError(f"id {e.id!r} names different questions in splits {seen[e.id][0]!r} and "
                                f"{es.split!r}; score these splits in separate runs")
            seen.setdefault(e.id, (es.split, e.question))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Build the splits, answer them (model or outputs file), score, and write `cfg.out`."""
    t0 = time.perf_counter()
    if (cfg.model is None) == (cfg.outputs is None):
        raise EvalError("give exactly one of --model (a model directory) or --outputs (a JSONL file)")
    sets = build_sets(cfg)
    if cfg.out:
        _check_writable(Path(cfg.out))
    if cfg.outputs is not None:
        _check_ids_unambiguous(sets)
        given = read_outputs(cfg.outputs)
        outputs = [given] * len(sets)
    else:
        lm = load_chat_model(cfg.model, cfg.max_new_tokens, cfg.device)
        outputs = []
        for es in sets:
            answers = generate_answers(lm, [es.task.prompt(e) for e in es.examples], cfg.batch_size,
                                       cfg.progress, desc=f"eval {es.task.name}/{es.split}")
            outputs.append({e.id: a for e, a in zip(es.examples, answers)})
    rows, examples = [], []
    for es, outs in zip(sets, outputs):
        row, recs = score(es, outs)
        rows.append(row)
        examples += recs
    report = {"task": sets[0].task.name if sets else cfg.task, "model": cfg.model, "outputs": cfg.outputs,
              "accuracy": {r["split"]: r["accuracy"] for r in rows}, "results": rows, "examples": examples,
              "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.out:
        write_json_atomic(Path(cfg.out), report)
        release(Path(cfg.out))
    return report


def _check_writable(out: Path) -> None:
    """The report's place, tried and locked before any answer is computed (not after an hour of generation):
    a second `exgrpo eval` into the same report fails at once naming the first."""
    if out.is_dir():
        raise EvalError(f"--out {out} is a folder; give the report's file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        existed = out.exists()
        with out.open("a", encoding="utf-8"):
            pass
        if not existed:
            out.unlink()
        lock(out)
    except OSError as e:
        raise EvalError(f"--out {out} cannot be written: {e.strerror or e}") from None
    except ValueError as e:
        raise EvalError(str(e)) from None


def render_table(report: dict[str, Any]) -> str:
    head = ("task", "split", "n", "correct", "accuracy")
    rows = [(r["task"], r["split"], str(r["n"]), str(r["correct"]), f"{100 * r['accuracy']:.1f}%")
            for r in report["results"]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"note ({r['task']}/{r['split']}): {n}" for r in report["results"] for n in r.get("notes", ())]
    return "\n".join(lines)


# ---------------------------------------------------------------- a fresh process

def evaluate_in_subprocess(model_dir: str | Path, cfg: EvalConfig, timeout_s: float | None = None) -> dict:
    """`exgrpo eval` on `model_dir` in a fresh interpreter, which loads the checkpoint with
    `from_pretrained` from disk alone (nothing shared with this process), and its JSON report.
    `cfg.out` is used when set, else a temporary file."""
    return evaluate_many_in_subprocess([(model_dir, cfg)], timeout_s)[0]


def evaluate_many_in_subprocess(runs: list[tuple[str | Path, EvalConfig]],
                                timeout_s: float | None = None) -> list[dict]:
    """Each (model_dir, cfg) evaluated as `evaluate_in_subprocess` does, one after another in one fresh
    interpreter (`python -m exgrpo.evaluate CONFIG.json ...`): every checkpoint is still loaded from disk
    alone, and the interpreter's start (importing torch and transformers) is paid once."""
    with tempfile.TemporaryDirectory(prefix="exgrpo-eval-") as tmp:
        outs, confs = [], []
        for i, (model_dir, cfg) in enumerate(runs):
            out = Path(cfg.out) if cfg.out else Path(tmp) / f"eval{i}.json"
            sub = EvalConfig(**{**asdict(cfg), "model": str(model_dir), "outputs": None, "out": str(out)})
            conf = Path(tmp) / f"eval_config{i}.json"
            conf.write_text(json.dumps({"eval": asdict(sub)}), encoding="utf-8")
            outs.append(out)
            confs.append(str(conf))
        # The same exgrpo as this process, wherever the child's working directory is.
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, "-m", "exgrpo.evaluate", *confs],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
        if proc.returncode != 0:
            models = ", ".join(str(m) for m, _ in runs)
            raise EvalError(f"exgrpo eval of {models} failed in a subprocess (exit {proc.returncode}):\n"
                            f"{proc.stderr[-3000:]}")
        return [json.loads(out.read_text(encoding="utf-8")) for out in outs]


def _main(paths: list[str]) -> int:
    """`python -m exgrpo.evaluate CONFIG.json ...`: evaluate each config file's [eval] table in turn."""
    from exgrpo.configs import load_config_file, make_config
    for path in paths:
        evaluate(make_config(EvalConfig, load_config_file(path, "eval")))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
