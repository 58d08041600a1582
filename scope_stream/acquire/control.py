"""The control endpoint: re-image requests from napari, scripts or slide scanners (ZeroMQ ROUTER).

A running :class:`~scope_stream.acquire.scan.ScanSession` serves this endpoint. A client sends one
JSON object per message (one frame, UTF-8, at most 64 KiB) and gets one JSON object back per
request, matched by ``request_id``:

``{"v": 1, "type": "reimage", "request_id": "r1", "x_um": 1200.5, "y_um": 830.0}``
    optional: ``slide_id`` (must be the session's), ``objective`` (default ``scan.reimage_objective``),
    ``z_offsets_um`` (default ``scan.focus_stack``), ``reason`` (free text, stored with the tiles).
    The request is validated (schema, stage limits, objective) and answered with an ``error`` at
    once if it is bad -- nothing is queued or moved then. A good one is queued and executed between
    two scan events; the answer comes when its images are in the pipeline:
    ``{"v": 1, "type": "reimage.done", "request_id", "slide_id", "tile_ids": [...], "x_um", "y_um",
    "objective", "pixel_size_um", "z_um": [...]}``.
``{"v": 1, "type": "status"}``
    ``{"v": 1, "type": "status", "state", "slide_id", "stage_limits_um", "objectives", "queued", ...}``.
``{"v": 1, "type": "ping"}``
    ``{"v": 1, "type": "pong"}``.

Errors: ``{"v": 1, "type": "error", "request_id", "code", "detail"}`` with ``code`` one of
:data:`ERROR_CODES`. Requests are parsed by the shared bounded parser (``scope_stream.transport.validate.loads``):
JSON nested deeper than 32, integers of more than 19 digits and ``NaN``/``Infinity`` are ``malformed``.

Each client has a queue of its own for answers (``REPLY_HWM``); answers to a client that does not read them
are dropped once its queue is full (counted, logged once per client) instead of blocking the endpoint for
everyone, and a client with ``MUTE_AFTER`` answers in a row dropped is ignored for ``MUTE_S`` seconds
(:class:`~scope_stream.transport.control_gate.ReplyGate`).

Binding anything but loopback needs CurveZMQ keys (the pipeline's ``scope-stream keys generate``); only
clients in ``<keys>/authorized/`` get through.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scope_stream.transport.control_gate import ReplyGate
from scope_stream.transport.validate import ProtocolError
from scope_stream.transport.validate import loads as bounded_loads

__all__ = [
    "ERROR_CODES",
    "MAX_REQUEST_BYTES",
    "MUTE_AFTER",
    "MUTE_S",
    "REPLY_HWM",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "ReimageClient",
    "ReimageRequest",
    "ReimageResult",
]

log = logging.getLogger(__name__)

#: Largest request accepted (also the socket's ZMQ_MAXMSGSIZE: bigger frames drop the connection).
MAX_REQUEST_BYTES = 64 * 1024
#: Answers queued per client (ZMQ_SNDHWM); beyond that, answers to a client that does not read are dropped.
REPLY_HWM = 1000
#: A client with this many answers in a row dropped is ignored for ``MUTE_S`` seconds.
MUTE_AFTER = 2000
MUTE_S = 5.0
#: Requests read per round before the queued answers are sent (a flood cannot starve the answers).
_READ_BATCH = 256
#: Error codes of ``error`` replies.
ERROR_CODES = (
    "malformed",  # not a JSON object, unknown/missing fields, wrong types, non-finite numbers
    "version",  # "v" is not 1
    "out_of_limits",  # the position is outside the stage limits
    "unknown_objective",  # the objective is not configured
    "slide_mismatch",  # slide_id is not the slide being scanned
    "busy",  # too many requests queued (scan.control_max_pending)
    "closed",  # the session is finishing or finished; nothing more is acquired
    "failed",  # the acquisition of the request failed (detail says why)
    "timeout",  # client side: no answer in time
)


class ControlError(Exception):
    """A request refused (``code`` in :data:`ERROR_CODES`, ``detail`` for people)."""

    def __init__(self, code: str, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.request_id = request_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ReimageRequest(_Strict):
    """A request to image one position again, usually with a higher objective and a focus stack."""

    v: Literal[1] = 1
    type: Literal["reimage"] = "reimage"
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], min_length=1, max_length=128)
    slide_id: str | None = Field(default=None, max_length=256)
    x_um: float
    y_um: float
    objective: str | None = Field(default=None, max_length=64)
    z_offsets_um: list[float] | None = Field(default=None, min_length=1, max_length=64)
    reason: str = Field(default="", max_length=500)

    @field_validator("x_um", "y_um")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number of µm")
        return v

    @field_validator("z_offsets_um")
    @classmethod
    def _finite_list(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(z) and abs(z) <= 1000 for z in v):
            raise ValueError("z offsets must be finite and within ±1000 µm")
        return v


@dataclass
class ReimageResult:
    """What a fulfilled re-image request produced: the ids of the new tiles and where they were taken."""

    request_id: str
    slide_id: str
    tile_ids: list[str]
    x_um: float
    y_um: float
    objective: str
    pixel_size_um: float
    z_um: list[float] = field(default_factory=list)

    def to_reply(self) -> dict[str, Any]:
        return {"v": 1, "type": "reimage.done", **asdict(self)}


class ControlHandler(Protocol):
    """What the control server needs from a scan session."""

    def submit_reimage(self, request: ReimageRequest) -> Future[ReimageResult]:
        """Validate and queue ``request``; raise :class:`ControlError` to refuse it at once."""
        ...

    def control_status(self) -> dict[str, Any]:
        """A JSON-able status for ``status`` requests."""
        ...


def _error(code: str, detail: str, request_id: str | None = None) -> dict[str, Any]:
    return {"v": 1, "type": "error", "request_id": request_id, "code": code, "detail": detail}


def _pydantic_detail(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "<request>"
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_request(raw: bytes) -> dict[str, Any]:
    """Decode one request frame; raises :class:`ControlError` (``malformed`` / ``version``)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ControlError("malformed", f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        msg = bounded_loads(raw, max_bytes=MAX_REQUEST_BYTES)
    except ProtocolError as exc:
        # the bounded parser: not UTF-8 JSON, nested too deep, a huge integer, NaN / Infinity -- all malformed
        # (a deep request or a 5000-digit integer used to raise in json.loads and come back as "failed")
        raise ControlError("malformed", f"{exc.reason}: {exc.detail}") from None
    if not isinstance(msg, dict):
        raise ControlError("malformed", f"request must be a JSON object, got {type(msg).__name__}")
    rid = msg.get("request_id") if isinstance(msg.get("request_id"), str) else None
    if msg.get("v") != 1:
        raise ControlError("version", f"protocol version {msg.get('v')!r} is not 1", rid)
    if msg.get("type") not in ("reimage", "status", "ping"):
        raise ControlError("malformed", f"type {msg.get('type')!r} is not one of reimage, status, ping", rid)
    return msg


# ------------------------------------------------------------------------------ server
class ControlServer:
    """Serve re-image requests for ``handler`` on a ROUTER socket (a thread of its own).

    ``port=0`` binds a free port; :attr:`endpoint` tells which. Off loopback, ``keys_dir`` (CurveZMQ,
    ``scope-stream keys generate``) is required and only authorised clients may connect.
    """

    def __init__(
        self,
        handler: ControlHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keys_dir: Path | str | None = None,
    ) -> None:
        from scope_stream.transport.security import ServerSecurity, check_bind_allowed

        check_bind_allowed(host, Path(keys_dir) if keys_dir is not None else None)
        self.handler = handler
        # a context of our own: a ZAP authenticator is per context and must not meet the pipeline's
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._security = ServerSecurity(keys_dir) if keys_dir is not None else None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        # a queue of its own per client (SNDHWM); ROUTER_MANDATORY + non-blocking sends make a full one an
        # error we count, never a wait (a send that waited silenced the endpoint for every client)
        self._sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        self._sock.setsockopt(zmq.RCVHWM, 1000)
        self._sock.setsockopt(zmq.SNDTIMEO, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self._security is not None:
            self._security.start(self._ctx)
            self._security.apply(self._sock)
        bind_host = f"[{host}]" if ":" in host else host
        if port == 0:
            port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self._sock.bind(f"tcp://{bind_host}:{port}")
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "*") else bind_host
        self.endpoint = f"tcp://{connect_host}:{port}"
        self._outbox: queue.Queue[tuple[tuple[bytes, ...], dict[str, Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scope-stream-control", daemon=True)
        self.requests = 0
        self.rejected = 0
        self.gate = ReplyGate("control", mute_after=MUTE_AFTER, mute_s=MUTE_S)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving (pending answers still queued are sent first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._security is not None:
            self._security.stop()
        self._ctx.destroy(linger=0)

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _reply(self, envelope: tuple[bytes, ...], msg: dict[str, Any]) -> None:
        self._outbox.put((envelope, msg))

    @property
    def replies_dropped(self) -> int:
        """Answers dropped because their client did not read (its queue was full) or had gone."""
        return self.gate.dropped_total

    def _flush(self) -> None:
        while True:
            try:
                envelope, msg = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._sock.send_multipart([*envelope, json.dumps(msg, default=str).encode("utf-8")], flags=zmq.NOBLOCK)
            except zmq.Again:  # this client's queue is full: it does not read; drop (counted), never wait
                self.gate.dropped(envelope[0])
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:  # EHOSTUNREACH: the client went away (ROUTER_MANDATORY)
                    raise
                self.gate.dropped(envelope[0])
            else:
                self.gate.delivered(envelope[0])

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            self._flush()
            if not dict(poller.poll(20)):
                continue
            # a bounded batch, then the answers: a client that floods requests cannot hold the answers back
            for _ in range(_READ_BATCH):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self.gate.muted(frames[0]):
                    continue  # it does not read its answers: discarded unanswered, unparsed (counted)
                self._handle(frames)
        self._flush()
        self._sock.close(0)

    def _handle(self, frames: list[bytes]) -> None:
        self.requests += 1
        identity: tuple[bytes, ...] = (frames[0],)
        body = frames[1:]
        if len(body) > 1 and body[0] == b"":  # a REQ client puts an empty delimiter first
            identity = (frames[0], b"")
            body = body[1:]
        rid: str | None = None
        try:
            if len(body) != 1:
                raise ControlError("malformed", f"a request is one frame of JSON, got {len(body)} frames")
            msg = parse_request(body[0])
            rid = msg.get("request_id") if isinstance(msg.get("request_id"), str) else None
            kind = msg["type"]
            if kind == "ping":
                self._reply(identity, {"v": 1, "type": "pong", "request_id": rid})
                return
            if kind == "status":
                self._reply(identity, {"v": 1, "type": "status", "request_id": rid, **self.handler.control_status()})
                return
            try:
                req = ReimageRequest.model_validate(msg)
            except ValidationError as exc:
                raise ControlError("malformed", _pydantic_detail(exc), rid) from None
            rid = req.request_id
            future = self.handler.submit_reimage(req)
        except ControlError as exc:
            self.rejected += 1
            log.info("control: refused request %s: %s", exc.request_id or rid, exc)
            self._reply(identity, _error(exc.code, exc.detail, exc.request_id or rid))
            return
        except Exception as exc:  # a bug in the handler must not kill the endpoint
            self.rejected += 1
            log.exception("control: handler failed on request %s", rid)
            self._reply(identity, _error("failed", f"{type(exc).__name__}: {exc}", rid))
            return
        envelope, request_id = identity, rid

        def done(f: Future[ReimageResult]) -> None:
            self._done(envelope, request_id, f)

        future.add_done_callback(done)

    def _done(self, identity: tuple[bytes, ...], rid: str | None, future: Future[ReimageResult]) -> None:
        try:
            result = future.result()
        except ControlError as exc:
            self._reply(identity, _error(exc.code, exc.detail, rid))
        except Exception as exc:
            self._reply(identity, _error("failed", f"{type(exc).__name__}: {exc}", rid))
        else:
            self._reply(identity, result.to_reply())


# ------------------------------------------------------------------------------ client
class ReimageClient:
    """Ask a running scan for re-images (napari, scripts, scanners).

    >>> with ReimageClient("tcp://127.0.0.1:5600") as client:             # doctest: +SKIP
    ...     reply = client.reimage(1200.5, 830.0, reason="check this blast")
    ...     print(reply["tile_ids"])
    """

    _counter = itertools.count()

    def __init__(
        self,
        endpoint: str,
        *,
        keys_dir: Path | str | None = None,
        timeout_s: float = 120.0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        from scope_stream.transport.security import ClientSecurity

        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # queue requests only on completed connections: a server that is down or refuses our keys makes
        # send() wait (bounded below) instead of parking the request on a pipe that never opens
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        if keys_dir is not None:
            ClientSecurity.from_dir(keys_dir).apply(self._sock)
        self._sock.connect(endpoint)
        self._lock = threading.Lock()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> ReimageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, message: dict[str, Any] | bytes, timeout_s: float | None = None) -> dict[str, Any]:
        """Send one raw request (a dict gets ``v`` and a ``request_id`` if missing) and return the reply dict.

        Replies of type ``error`` are returned, not raised (see :meth:`reimage` for the raising form).
        """
        if isinstance(message, dict):
            msg = {"v": 1, **message}
            msg.setdefault("request_id", f"{self._prefix}-{next(self._counter)}")
            rid: str | None = str(msg["request_id"])
            raw = json.dumps(msg).encode("utf-8")
        else:
            raw, rid = bytes(message), None
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000) + 1
            if not self._sock.poll(left_ms, zmq.POLLOUT):
                return _error("timeout", f"no connection to {self.endpoint} in time", rid)
            try:
                self._sock.send(raw, zmq.NOBLOCK)
            except zmq.Again:
                return _error("timeout", f"no connection to {self.endpoint} in time", rid)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                    return _error("timeout", f"no answer from {self.endpoint} in time", rid)
                try:
                    reply = bounded_loads(self._sock.recv())
                except ProtocolError as exc:
                    return _error("malformed", f"the answer from {self.endpoint} is malformed: {exc}", rid)
                if not isinstance(reply, dict):
                    return _error("malformed", f"the answer from {self.endpoint} is not a JSON object", rid)
                if rid is None or reply.get("request_id") in (rid, None):
                    return dict(reply)
                log.debug("control client: dropping a stale reply for %s", reply.get("request_id"))

    def reimage(
        self,
        x_um: float,
        y_um: float,
        *,
        objective: str | None = None,
        z_offsets_um: list[float] | None = None,
        slide_id: str | None = None,
        reason: str = "",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Re-image the field centred at (x_um, y_um); returns the ``reimage.done`` reply (``tile_ids``...).

        Raises :class:`ControlError` with the server's code when the request is refused or fails.
        """
        msg: dict[str, Any] = {"type": "reimage", "x_um": x_um, "y_um": y_um, "reason": reason}
        if objective is not None:
            msg["objective"] = objective
        if z_offsets_um is not None:
            msg["z_offsets_um"] = list(z_offsets_um)
        if slide_id is not None:
            msg["slide_id"] = slide_id
        reply = self.request(msg, timeout_s)
        if reply.get("type") == "error":
            raise ControlError(str(reply.get("code")), str(reply.get("detail")), reply.get("request_id"))
        return reply

    def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return self.request({"type": "status"}, timeout_s)

    def ping(self, timeout_s: float = 5.0) -> bool:
        return self.request({"type": "ping"}, timeout_s).get("type") == "pong"
