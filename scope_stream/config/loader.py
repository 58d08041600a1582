"""Load pydantic configuration models from YAML files, with errors that name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["EMPTY_FILE", "ConfigError", "load_model", "load_yaml"]

#: what `config check` says of a file without settings
EMPTY_FILE = "the file is empty (no settings); `scope-stream config show > FILE` writes one with every default"

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and each bad field."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration {self.path}:\n{lines}")


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, ["file not found"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(p, [f"not valid YAML{where}: {problem}"]) from exc
    if data is None:  # empty, or only comments: all defaults (`config check` reports it as a mistake)
        return {}
    if not isinstance(data, dict):
        raise ConfigError(p, [f"top level must be a mapping of sections, got {type(data).__name__}"])
    return data


_FIELD_FIRST = re.compile(r"^([A-Za-z_]\w*): ")


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in err.get("loc", ())) or "<root>"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    msg = str(err.get("msg", "invalid value"))
    value = err.get("input")
    if isinstance(value, dict) and kind in ("value_error", "assertion_error"):
        # A section's own check (a model validator): its input is the whole section, which says nothing;
        # the message names the values. "field: ..." messages name the field, so point at it.
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        m = _FIELD_FIRST.match(msg)
        if m is not None and m.group(1) in value:
            prefix = "" if loc == "<root>" else f"{loc}."
            return f"{prefix}{m.group(1)}: {msg[m.end() :]}"
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {value!r})"


def validate(model: type[M], data: dict[str, Any], source: Path | str) -> M:
    """Validate ``data`` as ``model``; errors become a :class:`ConfigError` naming ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(dict(e)) for e in exc.errors()]) from exc


def load_model(model: type[M], path: Path | str) -> M:
    """Load and validate one YAML file as ``model``."""
    return validate(model, load_yaml(path), path)
