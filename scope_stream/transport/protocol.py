"""Wire protocol v1: multipart messages of a JSON header and raw buffers (``docs/protocol.md``).

Every message is ``[header, *payload]`` where ``header`` is a UTF-8 JSON object carrying ``v`` (the
protocol version) and ``type``; payload frames are raw C-contiguous buffers described by the header.
Nothing is pickled. Receivers validate every message and raise :class:`ProtocolError` with a short
machine-readable ``reason`` (counted by :class:`Rejections`) and a human ``detail``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from scope_stream.vocabulary import Tile, TileResult, VocabularyError

from .validate import (
    MAX_HEADER_BYTES,
    REJECT_REASONS,
    ProtocolError,
    check_tile_header,
    loads,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "Endpoints",
    "ProtocolError",
    "Rejections",
    "as_buffer",
    "check_tile_header",
    "decode_header",
    "encode",
    "parse_result",
    "parse_tile",
    "result_frames",
    "tile_frames",
]

log = logging.getLogger(__name__)

#: Version carried in every header as ``v``; peers refuse other versions.
PROTOCOL_VERSION = 1


Frame = zmq.Frame | bytes | memoryview | bytearray


def as_buffer(frame: Frame) -> memoryview:
    """A zero-copy byte view of a received frame (``zmq.Frame`` from ``copy=False``) or bytes."""
    if isinstance(frame, zmq.Frame):
        return memoryview(frame.buffer).cast("B")
    return memoryview(frame).cast("B")


def encode(type_: str, **fields: Any) -> bytes:
    """A header frame: ``{"v": 1, "type": type_, **fields}`` as compact UTF-8 JSON."""
    return json.dumps({"v": PROTOCOL_VERSION, "type": type_, **fields}, separators=(",", ":"), allow_nan=False).encode()


def decode_header(frame: Frame, allowed_types: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse and check a header frame: size, bounded JSON (:func:`~.validate.loads`), object, version, type."""
    header = loads(as_buffer(frame), MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise ProtocolError("header", f"header must be a JSON object, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {str(version)[:20]} is not {PROTOCOL_VERSION}")
    kind = header.get("type")
    if not isinstance(kind, str) or (allowed_types is not None and kind not in allowed_types):
        shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError("type", f"message type {shown!r} is not one of {list(allowed_types or [])}")
    return header


# ---------------------------------------------------------------------------------- tiles
def tile_frames(tile: Tile, *, sent_at: float | None = None, **extra: Any) -> list[Any]:
    """``[header, pixels]`` for a ``tile`` message; the pixel frame is a zero-copy view."""
    header, buffer = tile.to_wire()
    return [encode("tile", tile=header, sent_at=time.time() if sent_at is None else sent_at, **extra), buffer]


def parse_tile(header: dict[str, Any], frames: Sequence[Frame], max_tile_bytes: int) -> Tile:
    """Rebuild the tile of a ``tile`` message (``frames`` = the payload frames), zero-copy."""
    if len(frames) != 1:
        raise ProtocolError("frames", f"a tile message has 1 payload frame, got {len(frames)}")
    buf = as_buffer(frames[0])
    tile = header.get("tile")
    check_tile_header(tile, buf.nbytes, max_tile_bytes)
    assert isinstance(tile, dict)
    try:
        return Tile.from_wire(tile, buf)
    except VocabularyError as exc:
        tid = tile.get("tile_id") if isinstance(tile.get("tile_id"), str) else None
        raise ProtocolError("schema", str(exc), tid) from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError("schema", f"bad tile header: {exc}") from None


# -------------------------------------------------------------------------------- results
def result_frames(result: TileResult, **extra: Any) -> list[Any]:
    """``[header, crops]`` for a ``result`` message."""
    if result.crops.size == 0:  # memoryview cannot cast an empty (0, 1, 1, 3) array
        return [encode("result", result=result.header(), **extra), b""]
    header, buffer = result.to_wire()
    return [encode("result", result=header, **extra), buffer]


def parse_result(header: dict[str, Any], frames: Sequence[Frame]) -> TileResult:
    """Rebuild and validate the :class:`TileResult` of a ``result`` message."""
    if len(frames) != 1:
        raise ProtocolError("frames", f"a result message has 1 payload frame, got {len(frames)}")
    res = header.get("result")
    if not isinstance(res, dict):
        raise ProtocolError("schema", "field 'result' must be an object")
    try:
        return TileResult.from_wire(res, as_buffer(frames[0]))
    except (VocabularyError, ValueError, TypeError) as exc:
        raise ProtocolError("schema", f"bad tile result: {exc}") from None


# ----------------------------------------------------------------------------- rejections
class Rejections:
    """Counts rejected messages by reason and logs them, at most ``log_per_s`` lines a second."""

    def __init__(self, where: str, log_per_s: float = 5.0) -> None:
        self.where = where
        self.counts: Counter[str] = Counter()
        self._log_per_s = log_per_s
        self._window = 0.0
        self._logged = 0
        self._suppressed = 0

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._suppressed:
                log.warning("%s: %d more rejected messages not logged", self.where, self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged < self._log_per_s:
            self._logged += 1
            log.warning("%s: rejected a message (%s): %s", self.where, reason, detail)
        else:
            self._suppressed += 1

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ------------------------------------------------------------------------------ endpoints
@dataclass(frozen=True)
class Endpoints:
    """Where the broker listens (connect endpoints, e.g. ``tcp://127.0.0.1:5555``)."""

    frontend: str  # sources: tiles
    backend: str  # workers
    sink: str  # the sink
    events: str  # PUB: events
    control: str  # stats, finish, scan metadata, shutdown

    def to_dict(self) -> dict[str, str]:
        return {
            "frontend": self.frontend,
            "backend": self.backend,
            "sink": self.sink,
            "events": self.events,
            "control": self.control,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Endpoints:
        return cls(**{k: str(data[k]) for k in ("frontend", "backend", "sink", "events", "control")})


def set_common(sock: zmq.Socket[Any], *, hwm: int, max_message_bytes: int | None = None, linger_ms: int = 0) -> None:
    """Explicit HWMs (ZeroMQ's default of 1000 tiles would be gigabytes), linger and message size limit."""
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)


def watch_parent(on_exit: Any, interval_s: float = 1.0, grace_s: float = 0.0, hard_exit_s: float | None = None) -> None:
    """In a spawned child: call ``on_exit()`` ``grace_s`` after the parent process goes away (no orphans).

    With ``hard_exit_s``, the process also ends (``os._exit(1)``) that long after ``on_exit()`` if it is
    still running then: a child busy in a long computation must not outlive its parent for minutes.
    """
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_alive():
            time.sleep(interval_s)
        log.warning("parent process %s is gone; shutting down in %.0f s", parent.pid, grace_s)
        time.sleep(grace_s)
        on_exit()
        if hard_exit_s is not None:
            time.sleep(hard_exit_s)
            log.error("still running %.0f s after the parent went away: exiting now", hard_exit_s)
            os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
