"""`exgrpo sft` and `exgrpo train`: the config file + flags -> SFTConfig / TrainConfig -> the loop."""
from __future__ import annotations

import argparse
import os

from exgrpo.cli import fail
from exgrpo.configs import add_dataclass_arguments, config_from_args
from exgrpo.sft import SFTConfig, sft
from exgrpo.train import TrainConfig, train

CONFIGS = {"sft": (SFTConfig, sft), "train": (TrainConfig, train)}


def add_arguments_for(parser: argparse.ArgumentParser, command: str) -> None:
    add_dataclass_arguments(parser, CONFIGS[command][0])


def run(args: argparse.Namespace) -> int:
    cls, fn = CONFIGS[args._command]
    try:
        cfg = config_from_args(cls, args, table=args._command)
    except (ValueError, OSError, TypeError) as e:
        return fail(args._command, e)
    from exgrpo.loop import Terminated
    try:
        out = fn(cfg)
    except FloatingPointError as e:                        # a non-finite loss stopped the run: a message, not a trace
        return fail(args._command, e, rc=1)
    except ValueError as e:                                # bad input, found once the run folder or model is read
        return fail(args._command, e)
    except KeyboardInterrupt as e:                         # the finished steps are saved (loop.Run)
        print(f"exgrpo {args._command}: interrupted ({'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'})")
        return 143 if isinstance(e, Terminated) else 130
    if os.environ.get("RANK", "0") == "0":
        print(f"exported: {out}")
    return 0
