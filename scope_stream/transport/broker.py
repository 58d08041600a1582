"""The broker: accepts tiles from sources, load-balances them over workers, hands results to the sink.

Reliable request-reply after the ZeroMQ guide (credit-based flow control + Paranoid Pirate
heartbeating): workers announce credit, the broker dispatches at most that many tiles to each,
both sides heartbeat, and a dead or hung worker's tiles are dispatched again. The broker keeps every
tile until the sink confirms it is committed to the store, so delivery is at-least-once and the
sink's de-duplication makes the store exactly-once. Tiles beyond ``memory_queue_tiles`` wait in a
disk :class:`~scope_stream.transport.spool.Spool`; when that is full too the broker stops reading
its frontend, acknowledgements stop, and sources block (backpressure). See ``docs/protocol.md``.

What the broker remembers per tile is bounded: the record of stored tiles (de-duplication of resent tiles)
is dropped when the slide is finished and held to :data:`DONE_RECORDS_MAX` in all (oldest first), and
finished slides are remembered up to :data:`FINISHED_SLIDES_MAX`; a long soak does not grow memory.
Answers on the control socket go out without blocking, on a queue per client: a client that does not read
them loses them (counted) and is muted after a while, the others are served (:class:`ReplyGate`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from scope_stream.config.pipeline import PipelineConfig

from .control_gate import ReplyGate
from .protocol import (
    Endpoints,
    ProtocolError,
    Rejections,
    as_buffer,
    decode_header,
    encode,
    parse_result,
    set_common,
)
from .security import ServerSecurity, check_bind_allowed
from .spool import Spool, SpoolFull
from .validate import MAX_TILE_HEADER_BYTES, check_id, check_req, check_tile_header, finite_number, optional_int

__all__ = ["DONE_RECORDS_MAX", "FINISHED_SLIDES_MAX", "Broker", "bind_endpoints"]

log = logging.getLogger(__name__)
_REPLY_HWM = 10_000  # acks and rejects towards sources: small, one per request
_BLOCKED_S = 0.05  # a worker whose pipe was full gets no tile for this long
_CONTROL_REPLY_HWM = 1000  # answers queued per control client; beyond that they are dropped (it does not read)
_CONTROL_MUTE_AFTER = 2000  # a control client with this many answers in a row dropped is ignored for a while
_CONTROL_MUTE_S = 5.0
#: Stored-tile records kept for de-duplication in all slides together (the oldest are forgotten first; a
#: slide's records go when it is finished). A tile resent after its record went is analysed again and the
#: sink answers ``duplicate`` (the store holds each tile once).
DONE_RECORDS_MAX = 200_000
#: Finished slides remembered (``finished`` in stats, the summary for a repeated ``finish``), oldest forgotten.
FINISHED_SLIDES_MAX = 1000

Key = tuple[str, str]

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_DISCONNECTED
)


@dataclass
class Job:
    """One accepted tile, from acceptance until the sink has committed it."""

    key: Key
    tile: dict[str, Any]
    pixels: Any  # zmq.Frame (zero-copy) or a memoryview from the spool
    nbytes: int
    sent_at: float
    accepted_at: float
    attempts: int = 0
    state: str = "queued"  # queued | inflight | analyzed | storing
    worker: bytes | None = None
    dispatched_at: float = 0.0
    result: dict[str, Any] | None = None
    crops: Any = b""
    error: str = ""
    worker_name: str = ""
    retry_at: float = 0.0


@dataclass
class Peer:
    """A worker or the sink as the broker sees it."""

    ident: bytes
    name: str
    credit: int
    last_seen: float
    device: str = ""
    pid: int = 0
    held: set[Key] = field(default_factory=set)
    done: int = 0
    draining: bool = False
    wants_pixels: bool = True
    last_used: float = 0.0
    blocked_until: float = 0.0  # its pipe was full: no dispatch to it before then


def bind_endpoints(
    config: PipelineConfig, sockets: dict[str, zmq.Socket[Any]], ipc_dir: Path | None = None
) -> Endpoints:
    """Bind the five broker sockets (``frontend``, ``backend``, ``sink``, ``events``, ``control``)."""
    names = ("frontend", "backend", "sink", "events", "control")
    if config.transport == "ipc":
        import tempfile

        d = ipc_dir or Path(tempfile.mkdtemp(prefix="scope-stream-ipc-"))
        eps = {}
        for n in names:
            ep = f"ipc://{d / n}"
            sockets[n].bind(ep)
            eps[n] = ep
        return Endpoints(**eps)
    host = config.host
    bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "*") else bind_host
    if host in ("::", "[::]"):
        connect_host = "[::1]"
    if config.base_port:
        for i, n in enumerate(names):
            sockets[n].bind(f"tcp://{bind_host}:{config.base_port + i}")
        return Endpoints(**{n: f"tcp://{connect_host}:{config.base_port + i}" for i, n in enumerate(names)})
    # free ports, contiguous if we can (so that frontend + 4 = control, documented), else any
    import random

    for _ in range(50):
        base = random.randint(20000, 60000)
        bound: list[str] = []
        try:
            for i, n in enumerate(names):
                sockets[n].bind(f"tcp://{bind_host}:{base + i}")
                bound.append(n)
            return Endpoints(**{n: f"tcp://{connect_host}:{base + i}" for i, n in enumerate(names)})
        except zmq.ZMQError:
            for i, n in enumerate(bound):
                sockets[n].unbind(f"tcp://{bind_host}:{base + i}")
    eps = {}
    for n in names:
        port = sockets[n].bind_to_random_port(f"tcp://{bind_host}")
        eps[n] = f"tcp://{connect_host}:{port}"
    return Endpoints(**eps)


class Broker:
    """The pipeline's hub. Construct, :meth:`bind`, then :meth:`run` (blocks until shut down)."""

    def __init__(self, config: PipelineConfig, *, context: zmq.Context[Any] | None = None) -> None:
        self.cfg = config
        self.ctx = context or zmq.Context(io_threads=config.io_threads)
        self._own_ctx = context is None
        self.security: ServerSecurity | None = None
        if config.transport == "tcp":
            check_bind_allowed(config.host, config.curve_keys_dir)
        if config.curve_keys_dir is not None:
            self.security = ServerSecurity(config.curve_keys_dir)
            self.security.start(self.ctx)
        c = config
        self.frontend = self._socket(zmq.ROUTER, hwm=c.tile_hwm, limit=c.max_message_bytes)
        # replies (acks, rejects) are small and one per request: a full pipe must not drop them. With the
        # tile high-water mark (8) a starved I/O thread lost acks, and sources waited ack_timeout to resend.
        self.frontend.setsockopt(zmq.SNDHWM, _REPLY_HWM)
        self.backend = self._socket(zmq.ROUTER, hwm=max(c.tile_hwm, 64), limit=c.max_message_bytes)
        self.backend.setsockopt(zmq.SNDHWM, c.tile_hwm)
        self.sinksock = self._socket(zmq.ROUTER, hwm=max(c.tile_hwm, c.sink_credit), limit=c.max_message_bytes)
        self.control = self._socket(zmq.ROUTER, hwm=256, limit=16 * 1024 * 1024)
        # a queue of its own per client, sends never wait (ROUTER_MANDATORY, NOBLOCK, SNDTIMEO 0): a client that
        # floods requests and never reads fills only its own queue; its answers are dropped and counted
        self.control.setsockopt(zmq.SNDHWM, _CONTROL_REPLY_HWM)
        self.control.setsockopt(zmq.SNDTIMEO, 0)
        self.control_gate = ReplyGate("broker control", mute_after=_CONTROL_MUTE_AFTER, mute_s=_CONTROL_MUTE_S)
        self.events = self.ctx.socket(zmq.PUB)
        set_common(self.events, hwm=10_000)
        if self.security is not None:
            self.security.apply(self.events)
        self.monitors: dict[zmq.Socket[Any], str] = {}
        self.endpoints: Endpoints | None = None
        # state
        self.queue: deque[Job] = deque()
        self.held_bytes = 0  # pixels + header bytes of the tiles held in memory (queued to stored)
        self.spool = Spool(c.spool_dir, c.spool_max_bytes)
        self.spooled: set[Key] = set()
        self.jobs: dict[Key, Job] = {}
        # stored tiles, per slide, oldest first (de-duplication); pruned at finish, DONE_RECORDS_MAX in all
        self.done: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self.done_records = 0
        self.done_records_max = DONE_RECORDS_MAX
        self.finished_slides_max = FINISHED_SLIDES_MAX
        self.store_queue: deque[Key] = deque()
        self.workers: OrderedDict[bytes, Peer] = OrderedDict()
        self.sink: Peer | None = None
        self.pending: Counter[str] = Counter()
        self.scans: dict[str, dict[str, Any]] = {}
        self.finish_waiters: dict[str, list[tuple[zmq.Socket[Any], bytes, Any]]] = {}
        self.finish_summary: dict[str, dict[str, Any]] = {}
        self.finalize_sent: dict[str, bytes] = {}
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.rejections = Rejections("broker")
        self.counts: Counter[str] = Counter()
        self.draining = False
        self.drain_deadline: float | None = None
        self.stopping = False
        self._stop_after: float | None = None
        self._last_hb = 0.0
        self._last_stats = time.monotonic()
        self._rate_mark = (time.monotonic(), 0, 0)
        self._rates = (0.0, 0.0)
        self._typical_bytes = 0

    # ----------------------------------------------------------------------------- sockets
    def _socket(self, kind: int, *, hwm: int, limit: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        set_common(sock, hwm=hwm, max_message_bytes=limit)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.security is not None:
            self.security.apply(sock)
        return sock

    def bind(self, ipc_dir: Path | None = None) -> Endpoints:
        socks = {
            "frontend": self.frontend,
            "backend": self.backend,
            "sink": self.sinksock,
            "events": self.events,
            "control": self.control,
        }
        for name in ("frontend", "backend", "sink", "control"):
            mon = socks[name].get_monitor_socket(_MONITOR_EVENTS)
            self.monitors[mon] = name
        self.endpoints = bind_endpoints(self.cfg, socks, ipc_dir)
        # a string, not the dict: a lone mapping argument becomes the format mapping in logging (and napari's
        # test-time LogRecord then breaks the message)
        log.info("broker listening: %s", ", ".join(f"{k} {v}" for k, v in self.endpoints.to_dict().items()))
        return self.endpoints

    def _send(self, sock: zmq.Socket[Any], frames: list[Any], *, copy: bool = False) -> bool:
        """Send without blocking; False if the peer is gone or its pipe is full."""
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _reply(self, sock: zmq.Socket[Any], ident: bytes, type_: str, **fields: Any) -> None:
        if not self._send(sock, [ident, encode(type_, **fields)], copy=True):
            # the peer is gone or not reading: it resends what it still needs (a source after ack_timeout)
            self.counts["replies_dropped"] += 1
            if sock is self.control:
                self.counts["control_replies_dropped"] += 1
                self.control_gate.dropped(ident)  # logged once per client; muted if it never reads
            else:
                log.debug("a %s reply could not be sent (peer gone or its pipe full)", type_)
        elif sock is self.control:
            self.control_gate.delivered(ident)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        body = {"v": 1, "topic": topic, "ts": time.time(), **payload}
        # PUB never blocks: a slow subscriber loses events, never tiles
        with contextlib.suppress(zmq.Again):
            self.events.send_multipart([topic.encode(), json.dumps(body, default=str).encode()], flags=zmq.NOBLOCK)

    # ---------------------------------------------------------------------------- main loop
    def run(self) -> None:
        """Serve until a ``shutdown`` control message (or :meth:`request_stop`) and the drain complete."""
        if self.endpoints is None:
            self.bind()
        self._take_up_spool()
        poller = zmq.Poller()
        for sock in (self.backend, self.sinksock, self.control, *self.monitors):
            poller.register(sock, zmq.POLLIN)
        front_registered = False
        hb_s = self.cfg.heartbeat_ms / 1000.0
        try:
            while True:
                want_front = self._can_accept()
                if want_front and not front_registered:
                    poller.register(self.frontend, zmq.POLLIN)
                    front_registered = True
                elif not want_front and front_registered:
                    poller.unregister(self.frontend)
                    front_registered = False
                timeout = max(1, int(1000 * min(hb_s, 0.1)))
                ready = dict(poller.poll(timeout))
                if self.control in ready:
                    self._drain_socket(self.control, self._on_control, 64)
                if self.sinksock in ready:
                    self._drain_socket(self.sinksock, self._on_sink, 256)
                if self.backend in ready:
                    self._drain_socket(self.backend, self._on_backend, 256)
                if front_registered and self.frontend in ready:
                    # few at a time, time-boxed: spooling a tile to disk is slow and heartbeats must go on
                    self._drain_socket(self.frontend, self._on_frontend, 8, while_=self._can_accept, budget_s=hb_s / 4)
                for mon, name in self.monitors.items():
                    if mon in ready:
                        self._on_monitor(mon, name)
                self._refill()
                self._dispatch()
                self._feed_sink()
                self._finishes()
                now = time.monotonic()
                if now - self._last_hb >= hb_s:
                    self._last_hb = now
                    self._heartbeat(now)
                if now - self._last_stats >= self.cfg.stats_interval_ms / 1000.0:
                    self._last_stats = now
                    self.publish("pipeline.stats", self.stats())
                if self._shutdown_due(now):
                    break
        finally:
            self.close()

    def _drain_socket(
        self, sock: zmq.Socket[Any], handler: Any, limit: int, while_: Any = None, budget_s: float | None = None
    ) -> None:
        t0 = time.monotonic()
        for _ in range(limit):
            if while_ is not None and not while_():
                return
            if budget_s is not None and time.monotonic() - t0 > budget_s:
                return
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.rejections.add("frames", f"message with {len(frames)} frames")
                continue
            ident = frames[0].bytes
            try:
                handler(ident, frames[1:])
            except ProtocolError as exc:
                self._reject(sock, ident, exc)
            except Exception as exc:  # a message must never take the broker down: refuse it, keep serving
                log.exception("broker: a message on the %s socket raised; refused", self._name_of(sock))
                self._reject(sock, ident, ProtocolError("internal", f"{type(exc).__name__}: {str(exc)[:200]}"))

    def _name_of(self, sock: zmq.Socket[Any]) -> str:
        names = {id(self.frontend): "frontend", id(self.backend): "backend", id(self.sinksock): "sink"}
        return names.get(id(sock), "control")

    def _reject(self, sock: zmq.Socket[Any], ident: bytes, exc: ProtocolError) -> None:
        """Log and count a refused message and, where the protocol has a reply, answer ``reject``."""
        self.rejections.add(exc.reason, f"{self._name_of(sock)}: {exc.detail}")
        if sock is self.frontend or sock is self.control:
            detail = exc.detail if exc.reason == "full" else f"malformed: {exc.reason}: {exc.detail}"
            self._reply(sock, ident, "reject", reason=exc.reason, detail=detail, tile_id=exc.tile_id, req=exc.req)

    def request_stop(self, drain: bool = True, deadline_s: float | None = None) -> None:
        """Stop (after storing everything accepted, if ``drain``; giving up on that after ``deadline_s``)."""
        self.draining = True
        if deadline_s is not None:
            self.drain_deadline = time.monotonic() + deadline_s
        if not drain:
            self.stopping = True

    # ----------------------------------------------------------------------------- frontend
    def _can_accept(self) -> bool:
        if self.stopping:
            return False
        if self._memory_has_room(self._typical_bytes) and not self.spool:
            return True
        return self.spool.can_take(self._typical_bytes)

    def _memory_has_room(self, nbytes: int) -> bool:
        """Room in memory for one more tile of ``nbytes`` (pixels + header): ``memory_queue_tiles`` waiting,
        ``memory_queue_bytes`` held in all (waiting, in analysis or being stored); one tile always fits."""
        if len(self.queue) >= self.cfg.memory_queue_tiles:
            return False
        return not self.jobs or self.held_bytes + nbytes <= self.cfg.memory_queue_bytes

    def _on_frontend(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        header = decode_header(frames[0], ("tile", "scan", "finish", "stats"))
        kind = header["type"]
        if kind != "tile":
            if len(frames) != 1:
                raise ProtocolError("frames", f"a {kind} message has no payload frames")
            self._on_request(self.frontend, ident, header)
            return
        if len(frames) != 2:
            raise ProtocolError("frames", f"a tile message has 1 payload frame, got {len(frames) - 1}")
        header_bytes = as_buffer(frames[0]).nbytes
        tile = header.get("tile")
        tid = tile.get("tile_id") if isinstance(tile, dict) and isinstance(tile.get("tile_id"), str) else None
        if header_bytes > MAX_TILE_HEADER_BYTES:
            raise ProtocolError(
                "header", f"a tile header of {header_bytes} bytes exceeds {MAX_TILE_HEADER_BYTES}", tid and tid[:128]
            )
        buf = as_buffer(frames[1])
        check_tile_header(tile, buf.nbytes, self.cfg.max_tile_bytes)
        assert isinstance(tile, dict)
        self._check_tile_fields(tile, buf)
        sent_at = finite_number(header.get("sent_at", time.time()), "sent_at", tid, limit=1e11)
        key: Key = (tile["slide_id"], tile["tile_id"])
        status = self._accept(key, tile, frames[1], buf.nbytes, sent_at, header_bytes)
        self._reply(
            self.frontend,
            ident,
            "ack",
            slide_id=key[0],
            tile_id=key[1],
            status=status,
            depth=len(self.queue) + len(self.spool),
            in_flight=sum(len(w.held) for w in self.workers.values()),
            credit=self._free_credit(),
        )

    @staticmethod
    def _check_tile_fields(tile: dict[str, Any], buf: memoryview) -> None:
        """The full vocabulary check (cheap: the pixels are viewed, not copied)."""
        from scope_stream.vocabulary import Tile, VocabularyError

        try:
            Tile.from_wire(tile, buf)
        except VocabularyError as exc:
            tid = tile.get("tile_id") if isinstance(tile.get("tile_id"), str) else None
            raise ProtocolError("schema", str(exc), tid) from None
        except (TypeError, ValueError) as exc:
            raise ProtocolError("schema", f"bad tile header: {exc}") from None

    def _accept(
        self, key: Key, tile: dict[str, Any], pixels: Any, nbytes: int, sent_at: float, header_bytes: int = 0
    ) -> str:
        """Queue (memory), spool (disk) or refuse (``full``, never acknowledged) an accepted tile."""
        if key in self.jobs or self._is_done(key) or key in self.spooled:
            self.counts["duplicates_in"] += 1
            return "duplicate"
        total = nbytes + header_bytes  # the header (metadata) costs memory and disk too
        now = time.time()
        in_memory = self._memory_has_room(total) and not self.spool
        meta = {"tile": tile, "sent_at": sent_at, "accepted_at": now}
        status = "queued"
        if not in_memory:
            try:
                self.spool.push(meta, as_buffer(pixels))
                status = "spooled"
            except SpoolFull as exc:
                self.counts["refused_full"] += 1
                raise ProtocolError(
                    "full",
                    f"broker full: {len(self.queue)} tiles queued, {self.held_bytes} bytes held in memory, {exc}; "
                    "send it again later",
                    key[1],
                ) from None
        self._typical_bytes = max(total, int(self._typical_bytes * 0.9))
        self.counts["accepted"] += 1
        self.counts["accepted_bytes"] += nbytes
        self.pending[key[0]] += 1
        self.finished.pop(key[0], None)
        if status == "spooled":
            self.spooled.add(key)
            self.counts["spooled"] += 1
        else:
            self._enqueue(Job(key, tile, pixels, total, sent_at, now))
        return status

    def _enqueue(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.queue.append(job)
        self.held_bytes += job.nbytes

    def _take_up_spool(self) -> None:
        """Tiles a previous broker left in a configured spool folder are known (for de-duplication) and pending."""
        for meta in self.spool.headers():
            key = (meta["tile"]["slide_id"], meta["tile"]["tile_id"])
            if key not in self.spooled:
                self.spooled.add(key)
                self.pending[key[0]] += 1
                self.counts["accepted"] += 1

    def _refill(self) -> None:
        while self.spool and self._memory_has_room(self._typical_bytes):
            meta, payload = self.spool.pop()
            tile = meta["tile"]
            key = (tile["slide_id"], tile["tile_id"])
            self.spooled.discard(key)
            self._enqueue(Job(key, tile, payload, payload.nbytes, float(meta["sent_at"]), float(meta["accepted_at"])))

    # ------------------------------------------------------------------------------ control
    def _on_control(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        if self.control_gate.muted(ident):
            self.counts["control_ignored"] += 1  # it does not read its answers: discarded, unparsed, unanswered
            return
        header = decode_header(frames[0], ("scan", "finish", "stats", "shutdown", "ping"))
        if len(frames) != 1:
            raise ProtocolError("frames", f"a {header['type']} message has no payload frames")
        self._on_request(self.control, ident, header)

    def _on_request(self, sock: zmq.Socket[Any], ident: bytes, header: dict[str, Any]) -> None:
        req = check_req(header.get("req"))
        try:
            self._serve_request(sock, ident, header, req)
        except ProtocolError as exc:
            exc.req = req
            raise

    def _serve_request(self, sock: zmq.Socket[Any], ident: bytes, header: dict[str, Any], req: Any) -> None:
        kind = header["type"]
        if kind == "stats":
            self._reply(sock, ident, "stats", stats=self.stats(), req=req)
        elif kind == "ping":
            self._reply(sock, ident, "pong", req=req, endpoints=self.endpoints.to_dict() if self.endpoints else {})
        elif kind == "scan":
            slide_id, meta = check_id(header.get("slide_id"), "slide_id"), header.get("metadata", {})
            if not isinstance(meta, dict):
                raise ProtocolError("schema", "scan needs a slide_id (string) and metadata (object)")
            self.scans.setdefault(slide_id, {}).update(meta)
            if self.sink is not None:
                self._send(
                    self.sinksock, [self.sink.ident, encode("scan", slide_id=slide_id, metadata=meta)], copy=True
                )
            self._reply(sock, ident, "ack", slide_id=slide_id, status="scan", req=req)
        elif kind == "finish":
            slide_id, summary = check_id(header.get("slide_id"), "slide_id"), header.get("summary", {})
            if not isinstance(summary, dict):
                raise ProtocolError("schema", "finish needs a slide_id (string) and summary (object)")
            self.finish_summary.setdefault(slide_id, {}).update(summary)
            self.finish_waiters.setdefault(slide_id, []).append((sock, ident, req))
            if slide_id in self.finished and not summary:
                self._answer_finish(slide_id, self.finished[slide_id])
        elif kind == "shutdown":
            drain = bool(header.get("drain", True))
            self.request_stop(drain)
            self._reply(sock, ident, "ack", status="shutdown", req=req)

    def _finishes(self) -> None:
        for slide_id in list(self.finish_waiters):
            if self.pending[slide_id] > 0 or self.sink is None:
                continue
            if self.finalize_sent.get(slide_id) == self.sink.ident:
                continue
            summary = self.finish_summary.get(slide_id, {})
            if self._send(
                self.sinksock,
                [self.sink.ident, encode("finalize", slide_id=slide_id, summary=summary, req=slide_id)],
                copy=True,
            ):
                self.finalize_sent[slide_id] = self.sink.ident

    def _refuse_finish(self, slide_id: str, error: str) -> None:
        log.error("slide %s cannot be finished: %s", slide_id, error)
        for sock, ident, req in self.finish_waiters.pop(slide_id, []):
            self._reply(sock, ident, "reject", reason="store", detail=f"slide {slide_id}: {error}", req=req)
        self.finish_summary.pop(slide_id, None)
        self.finalize_sent.pop(slide_id, None)

    def _answer_finish(self, slide_id: str, summary: dict[str, Any]) -> None:
        for sock, ident, req in self.finish_waiters.pop(slide_id, []):
            self._reply(sock, ident, "finished", slide_id=slide_id, summary=summary, req=req)
        self.finish_summary.pop(slide_id, None)
        self.finalize_sent.pop(slide_id, None)
        self._forget_slide(slide_id)

    # ------------------------------------------------------------------- per-tile records
    def _is_done(self, key: Key) -> bool:
        tiles = self.done.get(key[0])
        return tiles is not None and key[1] in tiles

    def _mark_done(self, key: Key) -> None:
        """Remember a stored tile (a resend is then answered ``duplicate``), within ``done_records_max``."""
        tiles = self.done.get(key[0])
        if tiles is None:
            tiles = self.done[key[0]] = OrderedDict()
        if key[1] in tiles:
            return
        tiles[key[1]] = None
        self.done_records += 1
        while self.done_records > self.done_records_max and self.done:
            oldest_slide, oldest = next(iter(self.done.items()))
            if oldest:
                oldest.popitem(last=False)
                self.done_records -= 1
                self.counts["done_records_evicted"] += 1
            if not oldest:
                del self.done[oldest_slide]

    def _forget_slide(self, slide_id: str) -> None:
        """A finished slide: drop its per-tile records and scan metadata; remember only that it finished."""
        self.done_records -= len(self.done.pop(slide_id, ()))
        self.scans.pop(slide_id, None)
        if slide_id in self.finished:
            self.finished.move_to_end(slide_id)
        while len(self.finished) > self.finished_slides_max:
            old, _ = self.finished.popitem(last=False)
            if self.pending.get(old, 0) == 0:
                self.pending.pop(old, None)

    # ------------------------------------------------------------------------------ workers
    def _free_credit(self) -> int:
        return sum(max(0, w.credit) for w in self.workers.values() if not w.draining)

    def _on_backend(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        header = decode_header(frames[0], ("ready", "heartbeat", "result", "failed", "bye", "drain"))
        kind = header["type"]
        now = time.monotonic()
        w = self.workers.get(ident)
        if kind == "ready":
            credit = header.get("credit")
            if not isinstance(credit, int) or isinstance(credit, bool) or credit < 0:
                raise ProtocolError("schema", f"ready needs an int credit >= 0, got {credit!r}")
            pid = optional_int(header.get("pid"), "pid", 0)
            if w is None:
                w = Peer(ident, str(header.get("name", ident.hex()[:8]))[:128], 0, now)
                self.workers[ident] = w
                log.info("worker %s joined (device %s, credit %d)", w.name, header.get("device", "?"), credit)
                self.counts["workers_joined"] += 1
            w.credit = min(credit, self.cfg.tile_hwm)
            w.device = str(header.get("device", ""))[:128]
            w.pid = pid
            w.last_seen = now
            return
        if w is None:
            if kind == "result" or kind == "failed":
                self._on_result(None, header, frames[1:])
            if kind != "bye":
                self._reply(self.backend, ident, "reset", reason="unknown worker: send ready")
            return
        w.last_seen = now
        if kind == "heartbeat":
            return
        if kind == "drain":
            w.draining = True
            return
        if kind == "bye":
            self._drop_worker(w, "left")
            return
        w.credit += 1
        self._on_result(w, header, frames[1:])

    def _on_result(self, w: Peer | None, header: dict[str, Any], payload: list[zmq.Frame]) -> None:
        if header["type"] == "failed":
            if payload:
                raise ProtocolError("frames", "a failed message has no payload frames")
            slide_id, tile_id = header.get("slide_id"), header.get("tile_id")
            if not isinstance(slide_id, str) or not isinstance(tile_id, str):
                raise ProtocolError("schema", "failed needs slide_id and tile_id strings")
            key: Key = (slide_id, tile_id)
            job = self.jobs.get(key)
            if w is not None:
                w.held.discard(key)
            if job is None or job.state != "inflight":
                return
            job.error = str(header.get("error", "analysis failed"))[:2000]
            self.counts["analysis_errors"] += 1
            if job.attempts >= self.cfg.max_attempts:
                self._give_up(job, job.error)
            else:
                self._requeue(job, front=False)
            return
        result = parse_result(header, payload)
        key = (result.slide_id, result.tile_id)
        if w is not None:
            w.held.discard(key)
            w.done += 1
        job = self.jobs.get(key)
        if job is None or job.state != "inflight":
            self.counts["duplicate_results"] += 1
            return
        if job.worker is not None and job.worker != (w.ident if w else None):
            other = self.workers.get(job.worker)
            if other is not None:
                other.held.discard(key)
        job.state = "analyzed"
        job.result = header["result"]
        job.crops = payload[0]
        job.worker_name = w.name if w is not None else result.worker
        self.store_queue.append(key)

    def _requeue(self, job: Job, front: bool = True) -> None:
        job.state = "queued"
        job.worker = None
        self.counts["redispatched"] += 1
        if front:
            self.queue.appendleft(job)
        else:
            self.queue.append(job)

    def _give_up(self, job: Job, error: str) -> None:
        log.error("tile %s failed %d times; storing it without a result: %s", job.key[1], job.attempts, error)
        self.counts["failed"] += 1
        job.state = "analyzed"
        job.result = None
        job.error = error or f"no result after {job.attempts} attempts"
        self.store_queue.append(job.key)

    def _drop_worker(self, w: Peer, why: str) -> None:
        self.workers.pop(w.ident, None)
        log.warning("worker %s %s; %d tiles go back to the queue", w.name, why, len(w.held))
        self.counts["workers_lost" if why != "left" else "workers_left"] += 1
        for key in sorted(w.held, key=lambda k: self.jobs[k].accepted_at if k in self.jobs else 0, reverse=True):
            job = self.jobs.get(key)
            if job is None or job.state != "inflight" or job.worker != w.ident:
                continue
            if job.attempts >= self.cfg.max_attempts:
                self._give_up(job, f"the worker died {job.attempts} times while analysing this tile ({why})")
            else:
                self._requeue(job)
        w.held.clear()

    def _pick_worker(self) -> Peer | None:
        best: Peer | None = None
        now = time.monotonic()
        for w in self.workers.values():
            if w.draining or w.credit <= 0 or w.blocked_until > now:
                continue
            if best is None or (w.credit, -w.last_used) > (best.credit, -best.last_used):
                best = w
        return best

    def _dispatch(self) -> None:
        while self.queue:
            if len(self.store_queue) >= self.cfg.store_backlog_tiles:
                return
            w = self._pick_worker()
            if w is None:
                return
            job = self.queue.popleft()
            if job.state != "queued" or self._is_done(job.key):
                continue
            job.attempts += 1
            frames = [
                w.ident,
                encode("tile", tile=job.tile, sent_at=job.sent_at, attempt=job.attempts, queued=len(self.queue)),
                job.pixels,
            ]
            if not self._send(self.backend, frames):
                job.attempts -= 1
                self.queue.appendleft(job)
                if w.ident in self.workers and time.monotonic() - w.last_seen > self.cfg.worker_timeout_ms / 1000:
                    self._drop_worker(w, "is unreachable")
                else:
                    # its pipe is full (a starved I/O thread, heartbeats queued): skip it briefly and keep its
                    # credit. Zeroing the credit starved a worker that held nothing, as no result came back.
                    w.blocked_until = time.monotonic() + _BLOCKED_S
                    self.counts["dispatch_blocked"] += 1
                continue
            w.credit -= 1
            w.held.add(job.key)
            w.last_used = time.monotonic()
            job.state = "inflight"
            job.worker = w.ident
            job.dispatched_at = time.monotonic()

    # --------------------------------------------------------------------------------- sink
    def _on_sink(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        header = decode_header(frames[0], ("ready", "heartbeat", "stored", "event", "finalized", "bye"))
        kind = header["type"]
        now = time.monotonic()
        if kind == "ready":
            credit = header.get("credit")
            if not isinstance(credit, int) or isinstance(credit, bool) or credit < 1:
                raise ProtocolError("schema", f"ready needs an int credit >= 1, got {credit!r}")
            pid = optional_int(header.get("pid"), "pid", 0)
            if self.sink is not None and self.sink.ident != ident:
                log.warning("a new sink replaces the old one; re-sending %d unconfirmed tiles", len(self.sink.held))
                self._drop_sink("replaced")
            if self.sink is None:
                self.sink = Peer(ident, "sink", credit, now, pid=pid)
                self.counts["sinks_joined"] += 1
                for slide_id, meta in self.scans.items():
                    self._send(self.sinksock, [ident, encode("scan", slide_id=slide_id, metadata=meta)], copy=True)
            self.sink.credit = credit
            self.sink.wants_pixels = bool(header.get("wants_pixels", True))
            self.sink.last_seen = now
            return
        sink = self.sink
        if sink is not None and sink.ident == ident:
            sink.last_seen = now
        elif kind in ("heartbeat",):
            self._reply(self.sinksock, ident, "reset", reason="unknown sink: send ready")
            return
        if kind == "stored":
            sid, tid = header.get("slide_id"), header.get("tile_id")
            if not isinstance(sid, str) or not isinstance(tid, str):
                raise ProtocolError("schema", "stored needs slide_id and tile_id strings")
            key = (sid, tid)
            if sink is not None and sink.ident == ident:
                sink.credit += 1
                sink.held.discard(key)
            self._on_stored(key, str(header.get("status", "stored")), str(header.get("error", ""))[:2000])
        elif kind == "event":
            topic, payload = header.get("topic"), header.get("payload")
            if not isinstance(topic, str) or not isinstance(payload, dict):
                raise ProtocolError("schema", "event needs a topic (string) and payload (object)")
            self.publish(topic, payload)
        elif kind == "finalized":
            done_slide = header.get("slide_id")
            if isinstance(done_slide, str) and header.get("error"):
                # the sink could not finish this slide's store (e.g. a foreign store there): say so, do not hang
                self._refuse_finish(done_slide, str(header["error"])[:2000])
            elif isinstance(done_slide, str):
                summary = header.get("summary", {})
                self.finished[done_slide] = summary if isinstance(summary, dict) else {}
                self._answer_finish(done_slide, self.finished[done_slide])
        elif kind == "bye" and sink is not None and sink.ident == ident:
            self._drop_sink("left")

    def _on_stored(self, key: Key, status: str, error: str) -> None:
        job = self.jobs.get(key)
        if job is None or job.state != "storing":
            return  # already confirmed (a re-sent tile answered twice)
        if status == "refused":
            # the sink will never store it (the store there is not ours, the tile is malformed): no retry loop
            del self.jobs[key]
            self.held_bytes -= job.nbytes
            self.pending[key[0]] -= 1
            self.counts["store_refused"] += 1
            self.rejections.add("store", f"sink refused tile {key[1]} of slide {key[0]} for good: {error}")
            return
        if status == "error":
            # the sink could not write it: keep it and try again (never dropped silently)
            self.counts["store_errors"] += 1
            self.rejections.add("store", f"sink could not store tile {key[1]}: {error} (retrying in 1 s)")
            job.state = "analyzed"
            job.retry_at = time.monotonic() + 1.0
            self.store_queue.append(key)
            return
        del self.jobs[key]
        self.held_bytes -= job.nbytes
        self._mark_done(key)
        self.pending[key[0]] -= 1
        self.counts["stored"] += 1
        self.counts["stored_bytes"] += job.nbytes
        if status == "duplicate":
            self.counts["duplicates_at_sink"] += 1

    def _drop_sink(self, why: str) -> None:
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        self.counts["sinks_lost" if why != "left" else "sinks_left"] += 1
        back = [k for k in sink.held if k in self.jobs and self.jobs[k].state == "storing"]
        back.sort(key=lambda k: self.jobs[k].accepted_at, reverse=True)
        for key in back:
            self.jobs[key].state = "analyzed"
            self.store_queue.appendleft(key)
        for slide_id, ident in list(self.finalize_sent.items()):
            if ident == sink.ident:
                del self.finalize_sent[slide_id]
        log.warning("sink %s; %d unconfirmed tiles will be stored by the next sink", why, len(back))

    def _feed_sink(self) -> None:
        sink = self.sink
        while sink is not None and sink.credit > 0 and self.store_queue:
            key = self.store_queue.popleft()
            job = self.jobs.get(key)
            if job is None or job.state != "analyzed":
                continue
            if job.retry_at > time.monotonic():  # a tile the sink failed to store: not before its retry time
                self.store_queue.append(key)
                if all(self.jobs[k].retry_at > time.monotonic() for k in self.store_queue if k in self.jobs):
                    return
                continue
            frames = [
                sink.ident,
                encode(
                    "store",
                    tile=job.tile,
                    result=job.result,
                    error=job.error or None,
                    sent_at=job.sent_at,
                    accepted_at=job.accepted_at,
                    attempts=job.attempts,
                    backlog=len(self.store_queue),
                ),
                job.pixels if sink.wants_pixels else b"",
                job.crops if job.result is not None else b"",
            ]
            if not self._send(self.sinksock, frames):
                self.store_queue.appendleft(key)
                return
            job.state = "storing"
            sink.credit -= 1
            sink.held.add(key)

    # ------------------------------------------------------------------------------- timers
    def _heartbeat(self, now: float) -> None:
        # read what peers sent first: if this loop was slow (a big spool write), their heartbeats are waiting
        self._drain_socket(self.backend, self._on_backend, 10_000)
        self._drain_socket(self.sinksock, self._on_sink, 10_000)
        now = time.monotonic()
        timeout = self.cfg.worker_timeout_ms / 1000.0
        task_timeout = self.cfg.task_timeout_ms / 1000.0
        hb = encode("heartbeat")
        for w in list(self.workers.values()):
            if now - w.last_seen > timeout:
                self._drop_worker(w, f"is silent for {now - w.last_seen:.1f} s (dead)")
                continue
            self._send(self.backend, [w.ident, hb], copy=True)
            for key in list(w.held):
                job = self.jobs.get(key)
                if job is None or job.state != "inflight" or job.worker != w.ident:
                    w.held.discard(key)
                    continue
                if now - job.dispatched_at > task_timeout:
                    w.held.discard(key)
                    log.warning("tile %s held by %s for %.0f s: dispatching it again", key[1], w.name, task_timeout)
                    self.counts["task_timeouts"] += 1
                    if job.attempts >= self.cfg.max_attempts:
                        self._give_up(job, f"no result within {task_timeout:.0f} s, {job.attempts} times")
                    else:
                        self._requeue(job)
        if self.sink is not None:
            if now - self.sink.last_seen > timeout:
                self._drop_sink(f"is silent for {now - self.sink.last_seen:.1f} s (dead)")
            else:
                self._send(self.sinksock, [self.sink.ident, hb], copy=True)

    def _on_monitor(self, mon: zmq.Socket[Any], name: str) -> None:
        while True:
            try:
                evt = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            kind = evt["event"]
            if kind in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                self.rejections.add("auth", f"{name}: handshake failed ({zmq.Event(kind).name})")
            elif kind == zmq.EVENT_DISCONNECTED:
                self.counts[f"disconnects_{name}"] += 1

    # -------------------------------------------------------------------------- shutdown
    def _idle(self) -> bool:
        return not self.jobs and not self.queue and not self.spool and not self.store_queue

    def _shutdown_due(self, now: float) -> bool:
        if not self.draining:
            return False
        if self.drain_deadline is not None and now > self.drain_deadline and not self.stopping:
            log.error("drain deadline passed with %d tiles not stored; stopping anyway", sum(self.pending.values()))
            self.stopping = True
        if self._stop_after is None:
            if self.stopping or (self._idle() and not self.finish_waiters):
                self.stopping = True
                for w in self.workers.values():
                    self._send(self.backend, [w.ident, encode("shutdown")], copy=True)
                if self.sink is not None:
                    self._send(self.sinksock, [self.sink.ident, encode("shutdown")], copy=True)
                self._stop_after = now + max(2.0, 2 * self.cfg.worker_timeout_ms / 1000.0)
                self.publish("pipeline.stats", self.stats())
            return False
        return (not self.workers and self.sink is None) or now > self._stop_after

    def close(self) -> None:
        self.publish("pipeline.stats", self.stats())
        for sock in (self.frontend, self.backend, self.sinksock, self.control, self.events, *self.monitors):
            sock.close(linger=0)
        if self.security is not None:
            self.security.stop()
        self.spool.close()
        if self._own_ctx:
            self.ctx.term()

    # ------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        t0, n0, b0 = self._rate_mark
        if now - t0 >= 0.5:
            stored, sbytes = self.counts["stored"], self.counts["stored_bytes"]
            self._rates = ((stored - n0) / (now - t0), (sbytes - b0) / (now - t0) / 1e6)
            self._rate_mark = (now, stored, sbytes)
        in_flight = sum(1 for j in self.jobs.values() if j.state == "inflight")
        return {
            "queue_depth": len(self.queue) + len(self.spool),
            "memory_queue": len(self.queue),
            "spooled": len(self.spool),
            "spool_bytes": self.spool.nbytes,
            "in_flight": in_flight,
            "awaiting_store": sum(1 for j in self.jobs.values() if j.state in ("analyzed", "storing")),
            "pending": sum(self.pending.values()),
            "slides": {k: {"pending": v, "finished": k in self.finished} for k, v in self.pending.items()},
            "workers": [
                {
                    "name": w.name,
                    "device": w.device,
                    "pid": w.pid,
                    "credit": w.credit,
                    "held": len(w.held),
                    "done": w.done,
                }
                for w in self.workers.values()
            ],
            "sink": None
            if self.sink is None
            else {"pid": self.sink.pid, "credit": self.sink.credit, "held": len(self.sink.held)},
            "accepted": self.counts["accepted"],
            "stored": self.counts["stored"],
            "duplicates": self.counts["duplicates_in"]
            + self.counts["duplicate_results"]
            + self.counts["duplicates_at_sink"],
            "failed": self.counts["failed"],
            "redispatched": self.counts["redispatched"],
            "rejected": self.rejections.as_dict(),
            "rejected_total": self.rejections.total,
            "counts": dict(self.counts),
            "rate_tiles_per_s": round(self._rates[0], 3),
            "rate_mb_per_s": round(self._rates[1], 3),
            "draining": self.draining,
            "control": self.control_gate.stats(),
            "done_records": self.done_records,
        }
