"""The one config machinery: dataclass <-> YAML <-> command line, with every field's docstring as its help.

`build` turns a mapping (a YAML recipe, overrides from the CLI) into a config dataclass and rejects unknown keys
with a suggestion; `coerce` gives every value its declared type or a one-line error; `add_dataclass_args`
exposes any config dataclass as `--options` (SamplingConfig for `generate`), and `help_text` lists the dotted
keys of a run config for `--help`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from llmkit.config.sections import AUTO_SIZED, MODEL_PRESETS, FinetuneRunConfig, ModelConfig, RunConfig
from llmkit.errors import CheckpointError, ConfigError
from llmkit.files import atomic_write_text


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), read from its source,
    inherited fields included."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        if base is not cls:
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())  # one line, however it was wrapped
    return docs


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise a one-line error naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], where)
    if origin is list:  # YAML gives a list; the CLI gives `a,b,c`
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, typing.get_args(tp)[0], where) for v in value] if typing.get_args(tp) else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"unknown config key {where + key!r}{hint}")


def build(cls: type, values: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested sections; unknown keys are errors."""
    values = dict(values or {})
    if cls is ModelConfig and "preset" in values:
        if values["preset"] == "auto" and (fixed := [k for k in AUTO_SIZED if k in values]):
            raise ConfigError(f"{where}{fixed[0]}: model.preset auto chooses it from the time budget; drop it, or "
                              "name a fixed preset (e.g. tiny)")
        values = {**model_preset(values.pop("preset")), **values}
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(key, names, where)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            sub = values[f.name]
            if isinstance(sub, str) and tp is ModelConfig:
                sub = {"preset": sub}
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}{f.name}: expected a mapping of keys, got {sub!r}")
            kwargs[f.name] = build(tp, sub, f"{where}{f.name}.")
        else:
            kwargs[f.name] = coerce(values[f.name], tp, f"{where}{f.name}")
    return cls(**kwargs)


def model_preset(name: str) -> dict[str, Any]:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (valid: {', '.join(MODEL_PRESETS)})")
    return dict(MODEL_PRESETS[name])


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    return data


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge dotted overrides (`train.lr` -> 3e-4) into a nested mapping; validation happens in `build`."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if isinstance(nxt, str) and part == "model":  # `model: tiny` shorthand
                nxt = {"preset": nxt}
            if not isinstance(nxt, dict):
                nxt = {}
            node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`--train.lr 3e-4 --model.n_layer=4` -> {"train.lr": "3e-4", "model.n_layer": "4"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument {arg!r} (config overrides look like --train.lr 3e-4)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    values = load_yaml(path) if path else {}
    return build(RunConfig, apply_overrides(values, overrides or {}))


def read_run_folder_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder was written with: a FinetuneRunConfig when it has a finetune section."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml (not an llmkit run folder)")
    values = load_yaml(cfg_file)
    if "kd" in values:  # a `llmkit distill` run
        from llmkit.config.distill import DistillRunConfig

        return build(DistillRunConfig, values)
    return build(FinetuneRunConfig if "finetune" in values else RunConfig, values)


def save_yaml(cfg: Any, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and docstring, for `--help`."""
    lines: list[str] = []
    docs = field_docs(cls)
    for f in fields(cls):
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}: {(tp.__doc__ or '').strip()}")
            lines.extend(help_text(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{prefix}{f.name} (default: {default}) {docs.get(f.name, '')}")
    return lines


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per dataclass field, typed and documented by the dataclass itself."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] == list[str]:
            parser.add_argument(flag, action="append", default=None, metavar="STR",
                                help=f"{docs.get(f.name, '')} Repeatable.")
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(),
                                help=f"{docs.get(f.name, '')} (default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            kwargs[f.name] = value if hints[f.name] == list[str] else coerce(value, hints[f.name], "--" + f.name)
    return cls(**kwargs)
