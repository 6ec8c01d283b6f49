"""One typed config per command: a dataclass is the single source of truth, every field is a
config-file key and a `--flag`, and the merged config is saved as JSON into the run folder.

    @dataclass
    class EvalConfig:
        model: str | None = None
        split: tuple[str, ...] = ("test", "ood")    # --split test,ood
        batch_size: int = 16

    add_dataclass_arguments(parser, EvalConfig)     # --config, --model, --split, --batch-size
    cfg = config_from_args(EvalConfig, parser.parse_args(), table="eval")
    save_config(cfg, run_dir / "config.json")

Layers, later wins: the dataclass defaults, then the file (JSON, or TOML with an optional
`[table]`), then the flags actually given on the command line. Unknown keys are errors that name
the key. Supported field types: str, int, float, bool, Literal[...], X | None, and
tuple[str, ...] / list[str] (a list in a file, comma-separated on the command line).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_NONE_WORDS = ("none", "null", "")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) for `int | None`, `Literal[...]`, `str`..."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {tp!r}: only `X | None` unions")
        return inner[0], len(inner) < len(args)
    return tp, False


def _sequence_type(base: Any) -> type | None:
    """tuple or list for `tuple[str, ...]` / `list[str]`, else None."""
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        args = typing.get_args(base)
        if args and args[0] is str and (origin is list or args[1:] == (Ellipsis,)):
            return origin
        raise TypeError(f"unsupported config type {base!r}: only tuple[str, ...] and list[str]")
    return None


def _coerce(name: str, tp: Any, value: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ValueError(f"config {name!r} cannot be empty")
    if (seq := _sequence_type(base)) is not None:
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            items = list(value)
        else:
            raise ValueError(f"config {name!r} must be a list of strings or a comma-separated string, "
                             f"got {value!r}")
        return seq(items)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(f"config {name!r} must be one of {list(choices)}, got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config {name!r} must be true or false, got {value!r}")
    if base not in (str, int, float):
        raise TypeError(f"unsupported config type {tp!r} for {name!r}")
    try:
        # A file's 2.5 or true must not become int 2 or 1 silently.
        if base is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name!r} must be {base.__name__}, got {value!r}") from None


def load_config_file(path: str | Path, table: str | None = None) -> dict[str, Any]:
    """Settings from a JSON or TOML file (by suffix; anything but .toml is read as JSON). With
    `table`, a top-level `[table]` / {"table": {...}} is used when present, else the whole file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: invalid TOML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a table/object of settings")
    if table is not None and isinstance(data.get(table), dict):
        data = data[table]
    return data


def make_config(cls: type[T], file_values: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None, source: str = "config") -> T:
    """Defaults, then the file, then the command line; unknown keys are errors."""
    known = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for layer, where in ((file_values or {}, source), (overrides or {}, "command line")):
        for k, v in layer.items():
            key = k.replace("-", "_")
            if key not in names:
                raise ValueError(f"{where}: unknown setting {k!r}; known: {', '.join(names)}")
            values[key] = _coerce(key, known[key], v)
    return cls(**values)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field line in the class source: the flag's help."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#(.*)$", src, re.MULTILINE)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--config FILE` plus one `--flag` per field, its help the field's trailing comment. Flags
    default to SUPPRESS, so only the flags actually given appear in the namespace and override the
    file."""
    parser.add_argument("--config", help=f"JSON or TOML file of {cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        base, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if _sequence_type(base) is not None:
            helptext = f"comma-separated; default: {','.join(default) if default else '(empty)'}"
        else:
            helptext = f"default: {default!r}"
        if f.name in comments:
            helptext = f"{comments[f.name]} ({helptext})"
        helptext = helptext.replace("%", "%%")  # argparse %-formats help strings
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=helptext)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=argparse.SUPPRESS, help=helptext)
        else:
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS,
                                help=helptext + (" (none to unset)" if optional else ""))


def config_from_args(cls: type[T], args: argparse.Namespace, table: str | None = None) -> T:
    """The config for a namespace built by `add_dataclass_arguments`: its --config file (if any),
    then the flags given."""
    overrides = {k: v for k, v in vars(args).items() if k != "config" and not k.startswith("_")}
    path = getattr(args, "config", None)
    file_values = load_config_file(path, table) if path else {}
    return make_config(cls, file_values, overrides, source=str(path or "config"))


def save_config(cfg: Any, path: str | Path) -> Path:
    """The merged config as JSON (tuples become lists; `make_config` reads them back)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", encoding="utf-8")
    return p
