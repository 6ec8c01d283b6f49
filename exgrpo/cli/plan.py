"""`exgrpo plan`: the peak GPU memory and FLOPs of one ExGRPO step, planned on fake tensors (exgrpo.plan).

    exgrpo plan --model-config gemma-7b --optimizer adamw8bit --gpu-memory 141GB --json plan.json
    exgrpo plan --model-config ~/models/gemma-7b --lora --gradient-checkpointing --gpu-memory 80GB
    exgrpo plan --model-config tiny --no-gpu --measure --gpu-memory 1GB      # the plan against a real step here

Takes every `exgrpo train` flag (the step planned is that config's) plus the plan's own (PlanConfig).
"""
from __future__ import annotations

import argparse

from exgrpo.cli import fail
from exgrpo.configs import add_dataclass_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from exgrpo.plan import PlanConfig
    add_dataclass_arguments(parser, PlanConfig)


def run(args: argparse.Namespace) -> int:
    from exgrpo.models import ModelError
    from exgrpo.plan import PlanConfig, main_plan
    try:
        cfg = config_from_args(PlanConfig, args, table="plan")
        return main_plan(cfg)
    except (ValueError, ModelError, OSError) as e:
        return fail("plan", e)
