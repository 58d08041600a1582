"""A worker's or the sink's link to the broker: a DEALER socket run by an I/O thread.

The I/O thread answers heartbeats even while the main thread is busy (a long analysis or a slow
store commit), reconnects when the broker goes silent (Paranoid Pirate), re-announces its credit on
``reset``, and forwards messages to and from the main thread over an inproc PAIR socket without
copying the frames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .protocol import ProtocolError, Rejections, decode_header, encode, set_common
from .security import ClientSecurity

__all__ = ["PeerLink"]

log = logging.getLogger(__name__)


class PeerLink:
    """Connects to a broker socket; ``recv``/``send`` from the main thread, heartbeats in the background.

    ``work_types`` are broker messages that occupy a credit slot until the main thread sends one of
    ``done_types`` back; ``capacity`` slots in all. ``ready_fields()`` adds fields to ``ready``.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        *,
        name: str,
        capacity: int,
        accept_types: Sequence[str],
        work_types: Sequence[str],
        done_types: Sequence[str],
        heartbeat_ms: int,
        timeout_ms: int,
        hwm: int,
        max_message_bytes: int,
        security: ClientSecurity | None = None,
        ready_fields: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.ctx = context
        self.endpoint = endpoint
        self.name = name
        self.capacity = capacity
        self.accept_types = (*tuple(accept_types), "heartbeat", "reset")
        self.work_types = set(work_types)
        self.done_types = set(done_types)
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.timeout_s = timeout_ms / 1000.0
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self.security = security
        self.ready_fields = ready_fields or dict
        self.rejections = Rejections(f"{name}")
        self.held = 0
        self.reconnects = 0
        self.connected_once = threading.Event()
        self._addr = f"inproc://peer-{uuid.uuid4().hex}"
        # the inproc pipe carries at most `capacity` tiles (the broker's credit) plus small messages
        self._pair_hwm = 4 * capacity + 1024
        self._main = self.ctx.socket(zmq.PAIR)
        self._main.setsockopt(zmq.LINGER, 0)
        self._main.setsockopt(zmq.SNDHWM, self._pair_hwm)
        self._main.setsockopt(zmq.RCVHWM, self._pair_hwm)
        self._main.bind(self._addr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)

    # ----------------------------------------------------------------- main-thread side
    def start(self) -> PeerLink:
        self._thread.start()
        return self

    def recv(self, timeout_ms: int) -> list[zmq.Frame] | None:
        """The next broker message (frames, header first) or None after ``timeout_ms``."""
        if self._main.poll(max(0, int(timeout_ms)), zmq.POLLIN):
            return self._main.recv_multipart(copy=False)
        return None

    def send(self, frames: list[Any]) -> None:
        """Send frames (header first) to the broker through the I/O thread."""
        self._main.send_multipart(frames, copy=False)

    def bye(self) -> None:
        """Tell the broker we leave (after our held work is answered) and stop the I/O thread."""
        self._main.send_multipart([b"_bye"])
        self._thread.join(timeout=5)

    def drain(self) -> None:
        """Ask the broker to send no more work."""
        self._main.send_multipart([b"_drain"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._main.close(linger=0)

    # ------------------------------------------------------------------ I/O thread side
    def _connect(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        set_common(sock, hwm=self.hwm, max_message_bytes=self.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, 10_000)  # outgoing messages are small (results, acks, events) and bounded by credit
        sock.setsockopt(zmq.IDENTITY, f"{self.name}-{uuid.uuid4().hex[:8]}".encode())
        if self.security is not None:
            self.security.apply(sock)
        sock.connect(self.endpoint)
        return sock

    def _ready(self, sock: zmq.Socket[Any]) -> None:
        credit = max(0, self.capacity - self.held)
        sock.send_multipart([encode("ready", credit=credit, name=self.name, pid=os.getpid(), **self.ready_fields())])

    def _run(self) -> None:
        pair = self.ctx.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.setsockopt(zmq.SNDHWM, self._pair_hwm)
        pair.setsockopt(zmq.RCVHWM, self._pair_hwm)
        pair.connect(self._addr)
        sock = self._connect()
        self._ready(sock)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        last_heard = time.monotonic()
        last_sent = 0.0
        leaving = False
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(1000 * min(self.heartbeat_s, 0.1))))
                now = time.monotonic()
                if sock in ready:
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        last_heard = now
                        self.connected_once.set()
                        try:
                            header = decode_header(frames[0], self.accept_types)
                        except ProtocolError as exc:
                            self.rejections.add(exc.reason, exc.detail)
                            continue
                        kind = header["type"]
                        if kind == "heartbeat":
                            continue
                        if kind == "reset":
                            log.info(
                                "%s: broker does not know us (%s); announcing again", self.name, header.get("reason")
                            )
                            self._ready(sock)
                            continue
                        if kind in self.work_types:
                            self.held += 1
                        pair.send_multipart(frames, copy=False)
                if pair in ready:
                    for _ in range(256):
                        try:
                            frames = pair.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        first = frames[0].bytes
                        if first == b"_bye":
                            leaving = True
                            break
                        if first == b"_drain":
                            sock.send_multipart([encode("drain")])
                            continue
                        try:
                            kind = decode_header(frames[0])["type"]
                        except ProtocolError:
                            kind = ""
                        if kind in self.done_types:
                            self.held = max(0, self.held - 1)
                        sock.send_multipart(frames, copy=False)
                        last_sent = now
                if leaving:
                    sock.send_multipart([encode("bye")])
                    break
                if now - last_sent >= self.heartbeat_s:
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart([encode("heartbeat", busy=self.held)], flags=zmq.NOBLOCK)
                    last_sent = now
                if now - last_heard > self.timeout_s:
                    log.warning(
                        "%s: broker silent for %.1f s; reconnecting to %s", self.name, now - last_heard, self.endpoint
                    )
                    poller.unregister(sock)
                    sock.close(linger=0)
                    sock = self._connect()
                    poller.register(sock, zmq.POLLIN)
                    self._ready(sock)
                    self.reconnects += 1
                    last_heard = now
        finally:
            sock.close(linger=1000 if leaving else 0)
            pair.close(linger=0)
