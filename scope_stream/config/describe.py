"""Settings explained: ``scope-stream config show --comments`` and the cross-section checks of ``config check``.

Each setting's comment is derived, never written twice: the unit from the name's suffix (``_um``, ``_ms``...),
the allowed values from the pydantic type and constraints (``Literal``, ``ge``/``gt``/``le``/``lt``), and the
description from ``Field(description=...)`` or, where there is none, the comment next to the field in the
model's source (``# ...`` after it, or ``#: ...`` / ``# ...`` lines just above it).
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
import types
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

if TYPE_CHECKING:
    from . import ScopeStreamConfig

__all__ = ["commented_yaml", "consistency_problems", "field_comment"]

# name suffix -> unit, longest first
_UNITS: tuple[tuple[str, str], ...] = (
    ("_um_per_s2", "µm/s²"),
    ("_um_per_s", "µm/s"),
    ("_um_per_mm", "µm per mm"),
    ("_um_per_um", "µm per µm of defocus"),
    ("_um_per_px", "µm per pixel"),
    ("_per_mm2", "per mm²"),
    ("_tiles_per_s", "tiles/s"),
    ("_um2", "µm²"),
    ("_um", "µm"),
    ("_ms", "ms"),
    ("_s", "s"),
    ("_bytes", "bytes"),
    ("_px", "pixels"),
    ("_dn", "camera DN"),
    ("_e", "electrons"),
    ("_rgb", "0..255 per channel"),
)


def _unit(name: str) -> str | None:
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return unit
    return None


def _type_words(annotation: Any) -> tuple[str, bool]:
    """(a short description of the type, whether null is allowed)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(get_args(annotation))
        return " or ".join(_type_words(a)[0] for a in members), nullable
    if origin is Literal:
        return "one of " + " | ".join(str(v) for v in get_args(annotation)), False
    if origin in (list, tuple, dict):
        args = get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"({', '.join(_type_words(a)[0] for a in args)})", False
        return f"{origin.__name__} of {', '.join(_type_words(a)[0] for a in args if a is not Ellipsis)}", False
    if isinstance(annotation, type):
        if issubclass(annotation, Path):
            return "path", False
        if issubclass(annotation, BaseModel):
            return "{" + ", ".join(annotation.model_fields) + "}", False
        return {"str": "text", "bool": "true | false"}.get(annotation.__name__, annotation.__name__), False
    return str(annotation), False


def _range(field: FieldInfo) -> str | None:
    low = high = None
    parts: list[str] = []
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            low = f"{m.ge} <="
        elif isinstance(m, annotated_types.Gt):
            low = f"{m.gt} <"
        elif isinstance(m, annotated_types.Le):
            high = f"<= {m.le}"
        elif isinstance(m, annotated_types.Lt):
            high = f"< {m.lt}"
        elif isinstance(m, annotated_types.MinLen):
            parts.append(f"at least {m.min_length} item(s)" if m.min_length != 1 else "not empty")
    if low and high:
        parts.insert(0, f"{low} x {high}")
    elif low:  # "0 <" -> "> 0"
        value, op = low.split(" ")
        parts.insert(0, f"{'>' if op == '<' else '>='} {value}")
    elif high:
        parts.insert(0, high)
    return ", ".join(parts) or None


@cache
def _source_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment written next to it in ``cls``'s source ({} if the source is not at hand)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = "".join(lines)
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    own_line: set[int] = set()  # lines holding nothing but a comment
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string
                if not tok.line[: tok.start[1]].strip():
                    own_line.add(tok.start[0])
    except (tokenize.TokenError, IndentationError):
        return {}
    names = set(getattr(cls, "__annotations__", {}))
    body_indent: int | None = None
    field_re = re.compile(r"^(\s+)([A-Za-z_]\w*)\s*:[^=]")
    starts: list[tuple[int, str]] = []
    for i, line in enumerate(lines, start=1):
        m = field_re.match(line)
        if m is None or i in own_line or m.group(2) not in names:
            continue
        indent = len(m.group(1))
        if body_indent is None:
            body_indent = indent
        if indent == body_indent:
            starts.append((i, m.group(2)))
    out: dict[str, str] = {}
    for k, (start, name) in enumerate(starts):
        # the statement runs until the next field or a blank line
        end = start
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(lines) + 1
        while end + 1 < stop and lines[end].strip() and (end + 1) not in own_line:
            end += 1
        trailing = [comments[n] for n in range(start, end + 1) if n in comments and n not in own_line]
        above: list[str] = []
        n = start - 1
        while n in own_line:
            above.insert(0, comments[n])
            n -= 1
        text = trailing or [c for c in above if not c.lstrip("#: ").startswith("----")]
        cleaned = " ".join(c.lstrip("#").lstrip(":").strip() for c in text).strip()
        if cleaned:
            out[name] = cleaned
    return out


def _description(model: type[BaseModel], name: str, field: FieldInfo) -> str | None:
    if field.description:
        return field.description
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and name in getattr(cls, "__annotations__", {}):
            return _source_comments(cls).get(name)
    return None


def field_comment(model: type[BaseModel], name: str) -> str:
    """``unit; allowed values; description`` of one setting (parts that are unknown are left out)."""
    field = model.model_fields[name]
    words, nullable = _type_words(field.annotation)
    parts = [p for p in (_unit(name), words, _range(field)) if p]
    if nullable:
        parts.append("or null")
    desc = _description(model, name, field)
    text = "; ".join(parts)
    return f"{text} -- {desc}" if desc else text


def _doc(model: type[BaseModel]) -> str | None:
    doc = inspect.getdoc(model)
    return doc.split("\n\n")[0].replace("\n", " ") if doc else None


def _dump(key: str, value: Any) -> list[str]:
    """``key: value`` on one line (lists and mappings in flow style), a block list for lists of mappings."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None, width=10_000, allow_unicode=True)
        return text.rstrip("\n").split("\n")
    flow = yaml.safe_dump(value, sort_keys=False, default_flow_style=True, width=10_000, allow_unicode=True)
    flow = flow.strip()
    if flow.endswith("\n..."):
        flow = flow[: -len("\n...")]
    elif flow.endswith("..."):
        flow = flow[:-3].rstrip()
    return [f"{key}: {flow}"]


def commented_yaml(config: BaseModel, indent: int = 0) -> str:
    """``config`` as YAML (every value filled in) with a comment on each setting: unit, allowed values,
    description. It loads back as the same configuration."""
    pad = " " * indent
    lines: list[str] = []
    model = type(config)
    if indent == 0 and (doc := _doc(model)):
        lines.append(f"# {doc}")
    for name in model.model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            doc = _doc(type(value))
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if doc else ""))
            lines.append(commented_yaml(value, indent + 2))
            continue
        comment = field_comment(model, name)
        dumped = _dump(name, config.model_dump(mode="json", include={name})[name])
        if len(dumped) == 1:
            lines.append(f"{pad}{dumped[0]}  # {comment}")
        else:
            lines.append(f"{pad}# {comment}")
            lines.extend(pad + d for d in dumped)
    return "\n".join(lines)


def consistency_problems(cfg: ScopeStreamConfig) -> list[str]:
    """What each section accepts alone but the sections together cannot run (``config check`` reports
    these as errors): objectives the scan names that the microscope does not have."""
    problems: list[str] = []
    if cfg.scan.backend == "replay":
        return problems  # a replay images nothing
    names = [o.name for o in cfg.microscope.objectives]
    listed = ", ".join(names)
    hint = "(add it to microscope.objectives with its pixel_size_um, or use one of those)"
    if cfg.scan.objective not in names:
        problems.append(f"scan.objective: {cfg.scan.objective!r} is not one of microscope.objectives ({listed}) {hint}")
    if cfg.scan.adaptive and cfg.scan.reimage_objective not in names:
        problems.append(
            f"scan.reimage_objective: {cfg.scan.reimage_objective!r} is not one of microscope.objectives "
            f"({listed}) {hint}; or set scan.adaptive: false"
        )
    return problems
