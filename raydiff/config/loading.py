"""Reading a config: YAML or a dict, `--set` overrides, validation with errors that name each key, and the
payload Ray's processes receive.

A YAML file maps onto `RaydiffConfig`; `--set section.key=value` overrides apply before
validation. Unknown keys and bad values fail here, before Ray starts, with a message that
names the key. The worker receives the validated config and never re-applies defaults.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raydiff import registry
from raydiff.config.root import RaydiffConfig


class UserError(ValueError):
    """A mistake the user can fix (a config, a path, a file): the CLI prints its message alone and exits 2."""


class ConfigError(UserError):
    """A config that fails validation; the message names each offending key."""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_did_you_mean(e['loc'])}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    if len(lines) == 1:  # the usual typo: one line, as the CLI prints every mistake
        return f"invalid config: {lines[0].strip()}"
    return "invalid config:\n" + "\n".join(lines)


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = RaydiffConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return ""
        model = ann
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (expected one of: {', '.join(keys)})"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values parse as YAML (`1e-4`, `[a, b]`, `null`)."""
    raw = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            child = node.get(p)
            node[p] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = yaml.safe_load(value)
    return raw


def parse_config(raw: dict) -> RaydiffConfig:
    try:
        return RaydiffConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                raw: dict | None = None) -> RaydiffConfig:
    """Read a YAML config (or a dict), apply overrides, validate, and resolve relative paths."""
    if raw is None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(raw, list(overrides))).resolved_paths()


def dump_config(cfg: RaydiffConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def to_dict(cfg: RaydiffConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_remote(cfg: RaydiffConfig) -> dict[str, Any]:
    """The config as Ray's processes (workers, encoder actors) receive it, with any families registered
    in this process (a registration does not reach other processes by itself)."""
    return {"config": to_dict(cfg), "families": registry.registered_families()}


def from_remote(payload: dict[str, Any]) -> RaydiffConfig:
    """The inverse of `to_remote`, in the receiving process."""
    registry.adopt_families(payload["families"])
    return parse_config(payload["config"])
