"""`exgrpo` command line: one subcommand per stage.

Each subcommand is a module of this package (the entry points; the library they wire is the rest of
exgrpo/).

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. They are imported
lazily so that `exgrpo --help` stays fast and a missing optional dependency only breaks its own
subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "backends": ("exgrpo.cli.backends", "list the kernel backends and why any is unavailable"),
    "data": ("exgrpo.cli.data", "load a dataset file as training and evaluation will, and show what was read"),
    "probe": ("exgrpo.cli.probe", "build or resume an Explanatory Inversion probe set (Stage 1)"),
    "sft": ("exgrpo.cli.train", "SFT warm-up on the teacher's responses (Stage 2)"),
    "train": ("exgrpo.cli.train", "ExGRPO on multi-turn probe dialogues (Stage 3)"),
    "eval": ("exgrpo.cli.eval", "single-pass greedy accuracy per task and split (the student sees Q alone)"),
    "demo": ("exgrpo.cli.demo", "the main job: EI -> SFT -> ExGRPO ablation on the embedded default, on a CPU"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exgrpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, add_help=False)   # -h goes on to the subcommand's own parser
        p.set_defaults(_module=module)
    # Parse the subcommand name first, then let its module add its own arguments.
    args, rest = parser.parse_known_args(argv)
    mod = importlib.import_module(args._module)
    p = argparse.ArgumentParser(prog=f"exgrpo {args.command}", description=SUBCOMMANDS[args.command][1])
    add = getattr(mod, "add_arguments_for", None)
    add(p, args.command) if add else mod.add_arguments(p)
    ns = p.parse_args(rest)
    ns._command = args.command
    return int(mod.run(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
