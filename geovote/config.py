"""Typed configs: a dataclass of defaults, a TOML file over it, `--set key=value` over that.

    @dataclass
    class SampleConfig:
        n_train: int = 20000

    cfg = load_config(SampleConfig, "configs/sample.toml", ["n_train=5000"])

Unknown keys and values of the wrong type are errors that name the key; the resolved config is a plain
dict (`asdict`) to save beside a stage's output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _check(cls: type, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_check(cls, key, v, item) for v in value)
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{cls.__name__}.{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(cls: type, values: dict, source: str, current: dict) -> dict:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}; "
                              f"known: {', '.join(hints)}")
        try:
            current[key] = _check(cls, key, value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return current


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value', value read as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the TOML file at `path`, then `key=value` overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        values = _apply(cls, data, str(path), values)
    values = _apply(cls, dict(parse_override(o) for o in overrides), "--set", values)
    return cls(**values)


def config_from_dict(cls: type[T], values: dict, source: str) -> T:
    """`cls` from a plain dict (e.g. a section of a JSON file), checked as a TOML file is: an unknown
    key or a wrong type is a ConfigError naming `source`; keys absent from `values` keep their defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a table of {cls.__name__} settings, got {values!r}")
    try:
        return cls(**_apply(cls, values, source, {}))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"{source}: {e}") from None


def add_config_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", type=Path, default=None, help="TOML file of settings")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting (repeatable)")


def overrides_from_args(args: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """`--set` overrides, then one `key=value` for each of `keys` given as its own flag (flags win)."""
    out = list(args.overrides)
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out
