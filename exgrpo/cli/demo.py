"""`exgrpo demo`: the main job, EI -> SFT -> ExGRPO ablation on the embedded default, on a CPU.

    exgrpo demo                        # default: one seed, <= 10 minutes on 2 CPU cores
    exgrpo demo --quick --out /tmp/d   # a smoke run, <= 2 minutes (the tests use it)
    exgrpo demo --full                 # several seeds, mean ± std over seeds
    exgrpo demo --resume               # continue an interrupted run from its last finished stage
    exgrpo demo --arms sft_vanilla,sft_ei --stop-after eval:sft_ei:seed0

Every field of `DemoConfig` (exgrpo.demo) is a config-file key (`[demo]` table) and a `--flag`;
layers, later wins: defaults, the preset (--quick / --full), the file, the flags. Stages and what they
write are listed in exgrpo/demo.py; the results are `results.md`, `results.json`, `results.png` and
`report.md` in the run folder.
"""
from __future__ import annotations

import argparse
import sys

from exgrpo.cli import fail
from exgrpo.configs import add_dataclass_arguments, load_config_file, make_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from exgrpo.demo import DemoConfig
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="_preset",
                   help="small data, 2 RL steps: a smoke run in <= 2 minutes")
    g.add_argument("--full", action="store_const", const="full", dest="_preset",
                   help="the default run over several seeds (--seeds, default 3)")
    add_dataclass_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from exgrpo.demo import PRESETS, DemoConfig, StageError, run_demo
    try:
        file_values = load_config_file(args.config, "demo") if getattr(args, "config", None) else {}
        preset = getattr(args, "_preset", None) or getattr(args, "preset", None) or file_values.get("preset", "default")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        overrides = {k: v for k, v in vars(args).items() if k != "config" and not k.startswith("_")}
        overrides["preset"] = preset
        cfg = make_config(DemoConfig, {**PRESETS[preset], **file_values}, overrides,
                          source=str(getattr(args, "config", None) or "config"))
    except (ValueError, OSError, TypeError) as e:
        return fail("demo", e)
    try:
        run_demo(cfg)
    except StageError as e:
        print(f"exgrpo demo: {e}\nThe stages finished before it are kept in {cfg.out} (status.json); fix the "
              "cause and continue with --resume.", file=sys.stderr)
        return 1
    except ValueError as e:
        return fail("demo", e)
    return 0
