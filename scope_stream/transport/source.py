"""``TileSource``: how acquisitions and scanners put tiles into the pipeline.

A source is a DEALER connected to the broker's frontend. ``send(tile)`` is zero-copy and returns once
the tile is on its way; at most ``window`` tiles may be unacknowledged, so ``send`` blocks when the
broker stops acknowledging (its memory queue and disk spool are full) and raises
:class:`BackpressureError` after ``timeout``: a tile is never dropped silently. Unacknowledged tiles
are sent again after ``ack_timeout_s`` (the broker de-duplicates). ``queue_depth`` reports the
broker's depth from the latest acknowledgement, without blocking, so an acquisition can slow down.

One ``TileSource`` per thread (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from scope_stream.vocabulary import Tile

from .protocol import Endpoints, ProtocolError, decode_header, encode, set_common, tile_frames
from .security import ClientSecurity, client_security

__all__ = ["BackpressureError", "Rejected", "SourceError", "TileSource"]

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The pipeline did not answer in time or refused a request."""


class BackpressureError(SourceError):
    """The pipeline accepted no more tiles within the timeout; the tile was not sent (retry or slow down)."""


@dataclass
class Rejected:
    """A tile (or request) the broker refused, with its reason (see docs/protocol.md)."""

    tile_id: str | None
    reason: str
    detail: str


@dataclass
class _Pending:
    tile: Tile
    sent_at: float
    last_sent: float
    tries: int = 1


@dataclass
class SourceStats:
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    resent: int = 0
    spooled: int = 0
    rejected: list[Rejected] = field(default_factory=list)


class TileSource:
    """Sends tiles to a broker frontend (``tcp://host:port``) or to the endpoints of a ``LocalPipeline``."""

    def __init__(
        self,
        endpoint: str | Endpoints,
        *,
        window: int = 8,
        ack_timeout_s: float = 10.0,
        send_timeout_s: float | None = 60.0,
        security: ClientSecurity | None = None,
        keys_dir: Path | str | None = None,
        keys_client: str = "client",
        copy: bool = False,
        context: zmq.Context[Any] | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.endpoint = endpoint.frontend if isinstance(endpoint, Endpoints) else str(endpoint)
        self.window = max(1, int(window))
        self.ack_timeout_s = float(ack_timeout_s)
        self.send_timeout_s = send_timeout_s
        self.security = security or client_security(keys_dir, keys_client)
        self.copy = copy
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        set_common(self.sock, hwm=self.window + 1, max_message_bytes=max_message_bytes)
        if self.security is not None:
            self.security.apply(self.sock)
        self.sock.connect(self.endpoint)
        self._unacked: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._replies: dict[Any, dict[str, Any]] = {}
        self._req = itertools.count(1)
        self.stats_ = SourceStats()
        self._depth = 0
        self._in_flight = 0
        self._closed = False

    @classmethod
    def from_config(cls, endpoint: str | Endpoints, config: Any, **kw: Any) -> TileSource:
        """A source with the window, timeouts and keys of a ``ScopeStreamConfig``'s ``pipeline`` section."""
        pc = config.pipeline
        kw.setdefault("window", pc.tile_hwm)
        kw.setdefault("ack_timeout_s", pc.ack_timeout_ms / 1000.0)
        kw.setdefault("send_timeout_s", pc.send_timeout_s)
        kw.setdefault("keys_dir", pc.curve_keys_dir)
        kw.setdefault("max_message_bytes", pc.max_message_bytes)
        return cls(endpoint, **kw)

    # ------------------------------------------------------------------------------ state
    @property
    def queue_depth(self) -> int:
        """Tiles waiting: the broker's queue (memory + disk, as of the last ack) plus ours not yet acked."""
        self._poll(0)
        return self._depth + len(self._unacked)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    @property
    def rejected(self) -> list[Rejected]:
        return list(self.stats_.rejected)

    # ------------------------------------------------------------------------------- send
    def send(self, tile: Tile, timeout: float | None = -1.0) -> None:
        """Send one tile; blocks while ``window`` tiles are unacknowledged.

        ``timeout`` (s; -1: the source's ``send_timeout_s``; None: wait forever) bounds the wait for
        room; past it :class:`BackpressureError` is raised and the tile is *not* sent.
        """
        if self._closed:
            raise SourceError("this TileSource is closed")
        if not isinstance(tile, Tile):
            raise TypeError(f"send() takes a Tile, got {type(tile).__name__}")
        key = (tile.slide_id, tile.tile_id)
        if key in self._unacked:
            return  # already on its way
        timeout = self.send_timeout_s if timeout == -1.0 else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._poll(0)
            self._resend_overdue()
            now = time.time()
            if len(self._unacked) < self.window and self._transmit(tile, now):
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BackpressureError(
                    f"the pipeline accepted no tile for {timeout:.1f} s ({len(self._unacked)} unacknowledged, "
                    f"broker queue {self._depth}); tile {tile.tile_id} was not sent"
                )
            self._poll(int(1000 * min(0.05 if remaining is None else min(remaining, 0.05), self.ack_timeout_s)))
        self._unacked[key] = _Pending(tile, now, time.monotonic())
        self.stats_.sent += 1

    def _transmit(self, tile: Tile, sent_at: float) -> bool:
        """Queue the tile on the socket without blocking; False when its pipe is full (the broker is not reading)."""
        frames = tile_frames(tile, sent_at=sent_at)
        if self.copy:
            frames[1] = np.ascontiguousarray(tile.pixels).tobytes()
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=self.copy)
        except zmq.Again:
            return False
        return True

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for p in list(self._unacked.values()):
            if now - p.last_sent < self.ack_timeout_s:
                break
            if not self._transmit(p.tile, p.sent_at):
                return  # the broker is not reading (full): the tile is still queued towards it
            log.warning("tile %s not acknowledged in %.1f s; sent it again", p.tile.tile_id, self.ack_timeout_s)
            p.last_sent = now
            p.tries += 1
            self.stats_.resent += 1
            self._unacked.move_to_end((p.tile.slide_id, p.tile.tile_id))

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every sent tile is acknowledged (resending overdue ones); SourceError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._unacked:
            if deadline is not None and time.monotonic() > deadline:
                raise SourceError(f"{len(self._unacked)} tiles not acknowledged within {timeout} s")
            self._poll(50)
            self._resend_overdue()

    # ---------------------------------------------------------------------------- replies
    def _poll(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                header = decode_header(frames[0], ("ack", "reject", "finished", "stats"))
            except ProtocolError as exc:
                log.warning("source: ignoring a bad reply from the broker: %s", exc)
                continue
            kind = header["type"]
            if kind == "ack" and "tile_id" in header and header.get("status") != "scan":
                key = (str(header.get("slide_id")), str(header.get("tile_id")))
                if self._unacked.pop(key, None) is not None:
                    self.stats_.acked += 1
                    self.stats_.duplicates += header.get("status") == "duplicate"
                    self.stats_.spooled += header.get("status") == "spooled"
                self._depth = int(header.get("depth", 0))
                self._in_flight = int(header.get("in_flight", 0))
            elif kind == "reject":
                tid = header.get("tile_id")
                tid = tid if isinstance(tid, str) else None
                if header.get("reason") == "full" and tid is not None:
                    # the broker had no room: not a verdict on the tile, which stays unacknowledged and is
                    # sent again after ack_timeout
                    log.warning("broker full, tile %s will be sent again: %s", tid, str(header.get("detail"))[:200])
                    continue
                rej = Rejected(tid, str(header.get("reason")), str(header.get("detail")))
                self.stats_.rejected.append(rej)
                log.error("broker rejected %s: %s (%s)", tid or "a message", rej.reason, rej.detail)
                for key in [k for k in self._unacked if k[1] == tid]:
                    self._unacked.pop(key)
                if isinstance(header.get("req"), (str, int)):
                    self._replies[header["req"]] = header
            elif header.get("req") is None or isinstance(header.get("req"), (str, int)):
                self._replies[header.get("req")] = header

    def _request(self, type_: str, timeout: float | None, **fields: Any) -> dict[str, Any]:
        req = f"{id(self)}-{next(self._req)}"
        deadline = None if timeout is None else time.monotonic() + timeout
        msg = [encode(type_, req=req, **fields)]
        while True:
            try:
                self.sock.send_multipart(msg, flags=zmq.NOBLOCK)
                break
            except zmq.Again:  # our pipe to the broker is full of tiles it is not reading yet
                if deadline is not None and time.monotonic() > deadline:
                    raise SourceError(f"could not send {type_!r} to {self.endpoint} within {timeout} s") from None
                self._poll(50)
        while req not in self._replies:
            if deadline is not None and time.monotonic() > deadline:
                raise SourceError(f"no answer to {type_!r} from {self.endpoint} within {timeout} s")
            self._poll(50)
            self._resend_overdue()
        reply = self._replies.pop(req)
        if reply["type"] == "reject":
            raise SourceError(f"broker refused {type_!r}: {reply.get('reason')}: {reply.get('detail')}")
        return reply

    # ------------------------------------------------------------------------- requests
    def start_scan(self, slide_id: str, metadata: dict[str, Any] | None = None, timeout: float | None = 30.0) -> None:
        """Announce a scan: its metadata goes into the slide store; ``scan.started`` is published."""
        self._request("scan", timeout, slide_id=slide_id, metadata=metadata or {})

    def finish(
        self, slide_id: str, summary: dict[str, Any] | None = None, timeout: float | None = 300.0
    ) -> dict[str, Any]:
        """Flush, then wait until every tile of the slide is stored and the store is marked done; the summary."""
        self.flush(timeout)
        reply = self._request("finish", timeout, slide_id=slide_id, summary=summary or {})
        return dict(reply.get("summary") or {})

    def stats(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The broker's statistics (as the ``pipeline.stats`` event)."""
        return dict(self._request("stats", timeout)["stats"])

    # ---------------------------------------------------------------------------- close
    def close(self, flush_timeout: float | None = 0.0) -> None:
        """Close; with ``flush_timeout`` > 0 wait for acknowledgements first."""
        if self._closed:
            return
        try:
            if flush_timeout:
                self.flush(flush_timeout)
        finally:
            self._closed = True
            self.sock.close(linger=0)
            if self._own_ctx:
                self.ctx.term()

    def __enter__(self) -> TileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(flush_timeout=(self.send_timeout_s or 60.0) if exc[0] is None else 0.0)
