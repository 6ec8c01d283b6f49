"""`exgrpo` command line: one subcommand per stage.

Each subcommand is a module of this package (the entry points; the library they wire is the rest of
exgrpo/).

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. They are imported
lazily so that `exgrpo --help` stays fast and a missing optional dependency only breaks its own
subcommand.

Input mistakes end in one line on stderr naming what is wrong and exit 2 (`fail`); `--debug` adds the
traceback. An exception outside those kinds is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "backends": ("exgrpo.cli.backends", "list the kernel backends and why any is unavailable"),
    "data": ("exgrpo.cli.data", "load a dataset file as training and evaluation will, and show what was read"),
    "probe": ("exgrpo.cli.probe", "build or resume an Explanatory Inversion probe set (Stage 1)"),
    "sft": ("exgrpo.cli.train", "SFT warm-up on the teacher's responses (Stage 2)"),
    "train": ("exgrpo.cli.train", "ExGRPO on multi-turn probe dialogues (Stage 3)"),
    "plan": ("exgrpo.cli.plan", "one step's peak GPU memory and FLOPs, planned on fake tensors (no GPU, no weights)"),
    "eval": ("exgrpo.cli.eval", "single-pass greedy accuracy per task and split (the student sees Q alone)"),
    "demo": ("exgrpo.cli.demo", "the main job: EI -> SFT -> ExGRPO ablation on the embedded default, on a CPU"),
}


DEBUG = False
# What a wrong file, folder, record or setting raises, here or in the libraries that read them.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, KeyError, ValueError, UnicodeError)


def fail(command: str, e: BaseException, rc: int = 2) -> int:
    """One line on stderr naming what is wrong (the traceback too under --debug); returns the exit status."""
    if isinstance(e, KeyError) and e.args:
        msg = e.args[0]                     # str(KeyError) quotes its message
    elif isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    print(f"exgrpo {command}: {msg}", file=sys.stderr)
    if DEBUG:
        traceback.print_exception(e)
    return rc


def main(argv: list[str] | None = None) -> int:
    global DEBUG
    parser = argparse.ArgumentParser(prog="exgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, too")
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
    p.add_argument("--debug", action="store_true", help="print the traceback of an error, too")
    ns = p.parse_args(rest)
    DEBUG = bool(args.debug or ns.debug)
    del ns.debug
    ns._command = args.command
    try:
        return int(mod.run(ns) or 0)
    except INPUT_ERRORS as e:
        return fail(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
