"""`exgrpo eval`: single-pass greedy accuracy, the student seeing Q alone (docs/method.md).

    exgrpo eval --model runs/demo/full/checkpoint                  # synthetic held-in test + OOD
    exgrpo eval --model runs/x --split test,ood --n 500 --n-train 2000 --out runs/x/eval.json
    exgrpo eval --model ~/models/gemma-2b-it --task gsm8k --data test.jsonl --batch-size 32
    exgrpo eval --task boolq --data held_in=dev.jsonl --outputs answers.jsonl   # score a file, no model

Every field of `EvalConfig` (exgrpo.evaluate) is a config-file key (`[eval]` table) and a `--flag`.
Synthetic splits: test is the held-in test split (disjoint from the first --n-train problems), ood the
out-of-distribution one; see exgrpo.evaluate. Prints a task x split table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import sys

from exgrpo.cli import fail
from exgrpo.configs import add_dataclass_arguments, config_from_args
from exgrpo.evaluate import EvalConfig, EvalError, evaluate, render_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from exgrpo.models import ModelError
    from exgrpo.tasks.loaders import DatasetError
    try:
        cfg = config_from_args(EvalConfig, args, table="eval")
        report = evaluate(cfg)
    except (EvalError, ModelError, DatasetError, ValueError, OSError) as e:
        return fail("eval", e)
    print(render_table(report))
    if "held_in" in report["accuracy"] and cfg.task == "synthetic" and not cfg.data:
        print("note: held_in is problems 0..n-1 of the held-in stream, i.e. training problems for this "
              "seed; the held-in test split is `test`", file=sys.stderr)
    if cfg.out:
        print(f"report: {cfg.out}")
    return 0
