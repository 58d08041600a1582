"""The one validation layer every received message goes through (broker, workers, sink, control, sources).

Nothing a peer sends is trusted before it passes here (``docs/protocol.md``, *Validation and rejection*):

* :func:`loads` is a bounded JSON parse: the frame size is checked first, then the nesting depth by a
  cheap bracket scan *before* ``json.loads`` recurses, integers longer than :data:`MAX_INT_DIGITS` digits
  are refused while parsing (``parse_int``), and so are ``NaN``/``Infinity`` (``parse_constant``) and
  floats that overflow to infinity (``parse_float``). Whatever it returns re-encodes with
  ``allow_nan=False`` and without recursion trouble.
* :func:`check_id` admits slide and tile ids that are safe path components by construction:
  ``[A-Za-z0-9._-]{1,128}``, not starting with ``.``, no ``..``.
* :func:`check_tile_header` is the strict check of a tile header (ids, ``seq`` range, finite positions,
  dtype, shape and payload length) used by the broker on arrival, by workers and by the sink.

Every failure raises :class:`ProtocolError` with a short ``reason`` (:data:`REJECT_REASONS`). This module
imports neither zmq nor the store, so the store can use :func:`is_safe_id` too.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from scope_stream.vocabulary import PIXEL_DTYPES, TILE_FIELDS

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADER_BYTES",
    "MAX_ID_LENGTH",
    "MAX_INT_DIGITS",
    "MAX_POSITION_UM",
    "MAX_SEQ",
    "MAX_TILE_HEADER_BYTES",
    "REJECT_REASONS",
    "ProtocolError",
    "check_id",
    "check_req",
    "check_tile_header",
    "finite_number",
    "is_safe_id",
    "loads",
    "optional_int",
]

#: Largest header frame accepted (JSON). Tile headers are small; result headers carry cell contours.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Largest header frame of a ``tile`` message (the tile's metadata included).
MAX_TILE_HEADER_BYTES = 256 * 1024
#: Deepest nesting of arrays and objects in a header (a result header needs about 6).
MAX_DEPTH = 32
#: Longest integer literal, in digits (int64 has 19).
MAX_INT_DIGITS = 19
#: Largest tile ``seq`` (the largest integer JSON carries exactly; stored as int64).
MAX_SEQ = 2**53 - 1
#: Largest absolute stage position (µm) accepted: 1 km.
MAX_POSITION_UM = 1e9
#: Longest slide or tile id.
MAX_ID_LENGTH = 128

#: Reasons a message can be rejected for (keys of ``pipeline.stats.rejected``).
REJECT_REASONS = (
    "frames",
    "header",
    "depth",
    "number",
    "id",
    "version",
    "type",
    "schema",
    "dtype",
    "length",
    "size",
    "full",
    "auth",
    "store",
    "internal",
)

_ID = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}")
# a JSON string literal, escapes included (unrolled loop: linear time)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str, tile_id: str | None = None, req: str | int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.tile_id = tile_id
        self.req = req  # the request id to repeat in the ``reject`` answer, when known


# ------------------------------------------------------------------------------ bounded JSON
def json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in ``raw`` (JSON text), not counting brackets inside strings."""
    stripped = _STRING.sub(b'""', raw)
    steps = _OPEN[np.frombuffer(stripped, dtype=np.uint8)]
    if not steps.size:
        return 0
    return int(np.cumsum(steps, dtype=np.int64).max())


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError("number", f"integer of {len(text.lstrip('-'))} digits exceeds {MAX_INT_DIGITS}")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise ProtocolError("number", f"number literal of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("number", f"number {text[:32]} overflows to infinity")
    return value


def _parse_constant(name: str) -> Any:
    raise ProtocolError("number", f"{name} is not a finite number (NaN and Infinity are refused)")


def loads(raw: bytes | bytearray | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Parse a JSON frame within the limits; raises :class:`ProtocolError` (``header``, ``depth``, ``number``)."""
    data = bytes(raw)
    if len(data) > max_bytes:
        raise ProtocolError("header", f"header frame of {len(data)} bytes exceeds {max_bytes}")
    # fewer brackets than the limit cannot nest past it: the scan is only needed beyond that
    depth = 0 if data.count(b"[") + data.count(b"{") <= MAX_DEPTH else json_depth(data)
    if depth > MAX_DEPTH:
        raise ProtocolError("depth", f"JSON nested {depth} deep exceeds {MAX_DEPTH}")
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError("header", f"header is not UTF-8 JSON: {str(exc)[:200]}") from None
    except RecursionError:  # cannot happen below MAX_DEPTH; belt and braces
        raise ProtocolError("depth", "JSON nested too deep") from None


# ------------------------------------------------------------------------------ field checks
def is_safe_id(value: object) -> bool:
    """True for a string usable as one path component: ``[A-Za-z0-9._-]{1,128}``, no leading ``.``, no ``..``."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None and ".." not in value


def check_id(value: object, field: str, tile_id: str | None = None) -> str:
    """``value`` if it is a safe id (:func:`is_safe_id`), else :class:`ProtocolError` (reason ``id``)."""
    if not is_safe_id(value):
        shown = repr(value)[:80] if isinstance(value, (str, int, float)) else type(value).__name__
        raise ProtocolError(
            "id",
            f"{field} {shown} is not an id of 1-{MAX_ID_LENGTH} characters from [A-Za-z0-9._-] "
            "(no leading '.', no '..')",
            tile_id,
        )
    assert isinstance(value, str)
    return value


def finite_number(value: object, field: str, tile_id: str | None = None, *, limit: float | None = None) -> float:
    """``value`` as a float if it is a finite JSON number (not a bool), within ``±limit`` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("schema", f"{field} must be a number, got {type(value).__name__}", tile_id)
    out = float(value)
    if not math.isfinite(out) or (limit is not None and abs(out) > limit):
        bound = "" if limit is None else f" within ±{limit:g}"
        raise ProtocolError("schema", f"{field} {value!r} is not a finite number{bound}", tile_id)
    return out


def optional_int(value: object, field: str, default: int, *, lo: int = 0, hi: int = 2**31 - 1) -> int:
    """An optional int field (absent/None -> ``default``) within ``[lo, hi]``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError("schema", f"{field} must be an int in [{lo}, {hi}], got {str(value)[:40]}")
    return value


def check_req(value: object) -> str | int | None:
    """A request id (echoed in the answer): null, a string of at most 128 characters, or an int."""
    if value is None or (isinstance(value, str) and len(value) <= 128):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProtocolError(
        "schema", f"req must be a string (<= 128 characters), an int or null, not {type(value).__name__}"
    )


_TILE_FIELDS = frozenset(TILE_FIELDS) | {"dtype", "shape"}


def check_tile_header(tile: Any, payload_bytes: int | None, max_tile_bytes: int) -> tuple[str, tuple[int, ...]]:
    """The strict check of a tile header against its payload length; returns ``(dtype, shape)``.

    Ids are safe path components, ``seq`` is an int in ``[0, MAX_SEQ]``, positions and times are finite,
    ``metadata`` is an object; dtype, shape and the payload length must agree (``payload_bytes=None``:
    the pixels did not travel, e.g. to a sink that does not keep them).
    """
    if not isinstance(tile, dict):
        raise ProtocolError("schema", "field 'tile' must be an object (the tile header)")
    raw_tid = tile.get("tile_id")
    tid = raw_tid if is_safe_id(raw_tid) else None
    for key in ("slide_id", "tile_id", "seq", "x_um", "y_um", "pixel_size_um"):
        if key not in tile:
            raise ProtocolError("schema", f"tile header lacks {key!r}", tid)
    unknown = set(tile) - _TILE_FIELDS
    if unknown:
        raise ProtocolError("schema", f"tile header has unknown fields {sorted(unknown)[:10]}", tid)
    check_id(tile["slide_id"], "slide_id", tid)
    check_id(raw_tid, "tile_id")
    seq = tile["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ProtocolError("schema", f"seq must be an int, got {type(seq).__name__}", tid)
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("schema", f"seq {seq} is not in [0, {MAX_SEQ}]", tid)
    for key in ("x_um", "y_um", "z_um"):
        if key in tile:
            finite_number(tile[key], key, tid, limit=MAX_POSITION_UM)
    px = finite_number(tile["pixel_size_um"], "pixel_size_um", tid, limit=1e6)
    if px <= 0:
        raise ProtocolError("schema", f"pixel_size_um must be > 0, got {px}", tid)
    if tile.get("acquired_at") is not None:
        finite_number(tile["acquired_at"], "acquired_at", tid, limit=1e11)
    objective = tile.get("objective", "")
    if not isinstance(objective, str) or len(objective) > 256:
        raise ProtocolError("schema", "objective must be a string of at most 256 characters", tid)
    if tile.get("kind", "scan") not in ("scan", "reimage"):
        raise ProtocolError("schema", f"kind must be 'scan' or 'reimage', got {str(tile.get('kind'))[:40]!r}", tid)
    if not isinstance(tile.get("metadata", {}), dict):
        raise ProtocolError("schema", "metadata must be an object", tid)
    dtype_name = tile.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in PIXEL_DTYPES:
        raise ProtocolError("dtype", f"pixel dtype {str(dtype_name)[:40]!r} is not one of {sorted(PIXEL_DTYPES)}", tid)
    shape = tile.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 2**31 - 1 for s in shape)
    ):
        raise ProtocolError("schema", f"tile shape {str(shape)[:60]} is not a list of 2 or 3 positive ints", tid)
    expected = math.prod(shape) * np.dtype(dtype_name).itemsize
    got = expected if payload_bytes is None else payload_bytes
    if expected > max_tile_bytes or got > max_tile_bytes:
        raise ProtocolError("size", f"tile of {max(expected, got)} bytes exceeds the limit of {max_tile_bytes}", tid)
    if got != expected:
        raise ProtocolError(
            "length",
            f"pixel buffer holds {payload_bytes} bytes but shape {shape} x {dtype_name} needs {expected}",
            tid,
        )
    return dtype_name, tuple(shape)
