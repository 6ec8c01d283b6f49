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
    if p.is_dir():
        raise ValueError(f"--config {p} is a folder; give a JSON or TOML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
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


def _nested(cls: type) -> dict[str, type]:
    """Fields whose type is itself a config dataclass (DemoConfig.sft, DemoConfig.rl): name -> class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])}


def _default(cls: type, name: str) -> Any:
    """A field's default (its factory's product), None where it has none."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _flatten(layer: dict[str, Any], nested: dict[str, type]) -> dict[str, Any]:
    """{"sft": {"lr": 1}} and {"sft.lr": 1} alike -> {"sft.lr": 1}; dashes -> underscores."""
    out: dict[str, Any] = {}
    for k, v in layer.items():
        key = k.replace("-", "_")
        if key in nested and isinstance(v, dict):
            out.update({f"{key}.{kk.replace('-', '_')}": vv for kk, vv in v.items()})
        else:
            out[key] = v
    return out


def make_config(cls: type[T], file_values: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None, source: str = "config") -> T:
    """Defaults, then the file, then the command line; unknown keys are errors.

    A field typed as another config dataclass is set key by key: `sft.lr` (a flag `--sft.lr`, a file
    key "sft.lr" or a table {"sft": {"lr": ...}}) replaces that one setting of the field's default.
    The outer class may name sub-settings it sets itself (`FIXED = {"sft": ("model", ...)}`: refused
    here) and settings that moved (`RENAMED = {"sft_lr": "sft.lr"}`: refused, naming the new key)."""
    known = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    nested = _nested(cls)
    fixed: dict[str, tuple[str, ...]] = getattr(cls, "FIXED", {})
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    values: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {n: {} for n in nested}
    for layer, where in ((file_values or {}, source), (overrides or {}, "command line")):
        for key, v in _flatten(layer, nested).items():
            outer, _, inner = key.partition(".")
            if inner:
                if outer not in nested:
                    raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(names)}")
                inner_names = [f.name for f in dataclasses.fields(nested[outer])]
                if inner not in inner_names:
                    raise ValueError(f"{where}: unknown setting {key!r}; {outer}.* takes "
                                     f"{', '.join(n for n in inner_names if n not in fixed.get(outer, ()))}")
                if inner in fixed.get(outer, ()):
                    raise ValueError(f"{where}: {key!r} is set by {cls.__name__} itself; it cannot be given")
                sub[outer][inner] = _coerce(key, typing.get_type_hints(nested[outer])[inner], v)
            elif key in renamed:
                raise ValueError(f"{where}: setting {key!r} is now {renamed[key]!r} "
                                 f"(flag --{renamed[key].replace('_', '-')})")
            elif key not in names:
                raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(names)}")
            elif key in nested:
                raise ValueError(f"{where}: {key!r} is a table of settings: give them as {key}.NAME")
            else:
                values[key] = _coerce(key, known[key], v)
    for outer, given in sub.items():
        if given:
            values[outer] = dataclasses.replace(_default(cls, outer), **given)
    return cls(**values)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field line in the class source, the flag's help; a field that a
    subclass re-declares (a different default) without a comment keeps its base class's."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        out.update({m.group(1): m.group(2).strip()
                    for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#(.*)$", src, re.MULTILINE)})
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--config FILE` plus one `--flag` per field, its help the field's trailing comment; a nested config
    field gets a group of `--outer.flag`s (see make_config). Flags default to SUPPRESS, so only the flags
    actually given appear in the namespace and override the file."""
    parser.add_argument("--config", help=f"JSON or TOML file of {cls.__name__} settings")
    nested = _nested(cls)
    _add_flags(parser, cls, "", skip=set(nested))
    for outer, sub in nested.items():
        group = parser.add_argument_group(f"--{outer}.* ({sub.__name__}, defaults as {cls.__name__} sets them)")
        _add_flags(group, sub, f"{outer}.", skip=set(getattr(cls, "FIXED", {}).get(outer, ())),
                   defaults=_default(cls, outer))
    for old in getattr(cls, "RENAMED", {}):                   # accepted only to say what they are called now
        parser.add_argument("--" + old.replace("_", "-"), dest=old, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_flags(parser, cls: type, prefix: str, skip: set[str], defaults: Any = None) -> None:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base, optional = _base_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if defaults is not None else _default(cls, f.name)
        if _sequence_type(base) is not None:
            helptext = f"comma-separated; default: {','.join(default) if default else '(empty)'}"
        else:
            helptext = f"default: {default!r}"
        if f.name in comments:
            helptext = f"{comments[f.name]} ({helptext})"
        helptext = helptext.replace("%", "%%")  # argparse %-formats help strings
        kw = dict(dest=prefix + f.name, default=argparse.SUPPRESS)
        if base is bool and prefix:                     # --rl.packed / --rl.no-packed
            parser.add_argument(flag, action="store_const", const=True, help=helptext, **kw)
            parser.add_argument("--" + prefix + "no-" + f.name.replace("_", "-"), action="store_const", const=False,
                                help=argparse.SUPPRESS, **kw)
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helptext, **kw)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(flag, choices=typing.get_args(base), help=helptext, **kw)
        else:
            parser.add_argument(flag, type=str, help=helptext + (" (none to unset)" if optional else ""), **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, table: str | None = None) -> T:
    """The config for a namespace built by `add_dataclass_arguments`: its --config file (if any),
    then the flags given."""
    overrides = {k: v for k, v in vars(args).items() if k != "config" and not k.startswith("_")}
    path = getattr(args, "config", None)
    file_values = load_config_file(path, table) if path else {}
    return make_config(cls, file_values, overrides, source=str(path or "config"))


def save_config(cfg: Any, path: str | Path) -> Path:
    """The merged config as JSON (tuples become lists; `make_config` reads them back). Sub-settings that
    the config sets itself (its FIXED) are left out: they are not settings of it."""
    d = dataclasses.asdict(cfg)
    for outer, names in getattr(type(cfg), "FIXED", {}).items():
        for n in names:
            d[outer].pop(n, None)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    return p
