"""Dataclass configs: defaults < `--config file.yaml` < `--key value` on the command line.

Each stage declares one `@dataclass Config` whose fields carry `metadata={"help": ...}`. This module
turns it into an argparse parser (so `--help` lists every field with its default), merges a YAML
file under the CLI flags, rejects unknown keys and values of the wrong type, and writes the
resolved config beside the outputs.

    @dataclass
    class Config:
        model_name_or_path: str = field(default="models/x", metadata={"help": "base model"})

    if __name__ == "__main__":
        run_main(main, Config)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

import yaml

from common.errors import UserError

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`Optional[X]` / `X | None` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or CLI value to the field's declared type, or raise UserError."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UserError(f"config key '{key}' may not be null")
    origin = get_origin(base)
    if origin in (list, tuple):
        (item_tp, *_) = get_args(base) or (str,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        if item_tp in (int, float):
            # "--replay_ratios 0,0.25,0.5" reads like "--replay_ratios 0 0.25 0.5".
            value = [part for v in value for part in (v.split(",") if isinstance(v, str) else [v]) if part != ""]
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"config key '{key}' expects true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"config key '{key}' expects an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}' expects a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    if get_origin(base) is typing.Literal:
        choices = get_args(base)
        if value not in choices:
            raise UserError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    return value


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings; CLI flags override it")
    for name, (f, tp) in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        base, _ = _unwrap_optional(tp)
        is_list = get_origin(base) in (list, tuple)
        help_text = f"{help_text} (default: {default!r})".replace("%", "%%")
        if base is bool:
            parser.add_argument(f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS,
                                metavar="true|false", help=help_text)
        elif is_list:
            parser.add_argument(f"--{name}", nargs="*", default=argparse.SUPPRESS, metavar="V", help=help_text)
        else:
            parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)
    return parser


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Build a `cls` instance from defaults, an optional YAML file and CLI flags (in that order)."""
    parser = build_parser(cls, description)
    # argparse exits with status 2 and a usage line on unknown flags, which is the one-line error we want.
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    fields = _fields(cls)
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"--config {config_file}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{config_file}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{config_file}: expected a mapping of settings at the top level")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise UserError(f"{config_file}: unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
        values.update(loaded)
    values.update(args)
    return make_config(cls, values)


def make_config(cls: type, values: dict[str, Any] | None = None):
    """Build `cls` from a dict (tests use this), coercing and validating types."""
    values = dict(values or {})
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(v, fields[k][1], k) for k, v in values.items()}
    cfg = cls(**kwargs)
    post = getattr(cfg, "validate", None)
    if callable(post):
        post()
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from common.run import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_dict(cfg), sort_keys=False, allow_unicode=True))


def run_main(main_fn: Callable[[Any], Any], cls: type, argv: list[str] | None = None) -> None:
    """Body of a stage's `if __name__ == "__main__":` — one-line errors, no tracebacks for user mistakes."""
    description = sys.modules[main_fn.__module__].__doc__
    try:
        cfg = parse_config(cls, argv, description)
        main_fn(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs without a complete manifest.json are not valid", file=sys.stderr)
        sys.exit(130)
