"""Pipeline events: a PUB socket on the broker, JSON payloads, topic prefixes (``docs/protocol.md``).

Topics: ``scan.started``, ``tile.done``, ``reimage.done``, ``cell.flagged``, ``slide.done``,
``pipeline.stats``. Every payload carries ``v``, ``topic`` and ``ts``. Events are for watching
(napari, scanners, dashboards): PUB drops for a subscriber that cannot keep up, so nothing that must
not be lost travels here — the store is the record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import zmq

from .security import ClientSecurity, client_security
from .validate import ProtocolError, loads

__all__ = ["TOPICS", "EventSubscriber"]

log = logging.getLogger(__name__)

TOPICS = ("scan.started", "tile.done", "reimage.done", "cell.flagged", "slide.done", "pipeline.stats")


class EventSubscriber:
    """Subscribe to pipeline events: iterate ``(topic, payload)``, ``recv(timeout)``, or a callback thread.

    ``topics`` are prefixes (``""`` or None: everything). A SUB socket joins late: events published
    before it connected are not seen (use the store for history).
    """

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] | str | None = None,
        *,
        security: ClientSecurity | None = None,
        keys_dir: Path | str | None = None,
        context: zmq.Context[Any] | None = None,
        hwm: int = 100_000,
    ) -> None:
        self.endpoint = endpoint
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        sec = security or client_security(keys_dir)
        if sec is not None:
            sec.apply(self.sock)
        if topics is None or isinstance(topics, str):
            topics = [topics or ""]
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(endpoint)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def recv(self, timeout: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever). Bad messages are skipped."""
        while True:
            if not self.sock.poll(None if timeout is None else int(timeout * 1000), zmq.POLLIN):
                return None
            frames = self.sock.recv_multipart()
            if len(frames) != 2:
                log.warning("event with %d frames ignored", len(frames))
                continue
            try:
                payload = loads(frames[1])  # bounded: depth, number sizes, finite floats
                topic = frames[0].decode()
            except (UnicodeDecodeError, ProtocolError) as exc:
                log.warning("undecodable event ignored: %s", exc)
                continue
            if isinstance(payload, dict):
                return topic, payload

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            ev = self.recv(None)
            if ev is not None:
                yield ev

    def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout: float
    ) -> tuple[str, dict[str, Any]] | None:
        """The first event for which ``predicate(topic, payload)`` holds, or None after ``timeout`` s."""
        import time

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self.recv(left)
            if ev is not None and predicate(*ev):
                return ev
        return None

    def start(self, callback: Callable[[str, dict[str, Any]], None]) -> EventSubscriber:
        """Call ``callback(topic, payload)`` for every event from a background thread (until :meth:`close`)."""
        if self._thread is not None:
            raise RuntimeError("this subscriber already runs a callback thread")

        def loop() -> None:
            while not self._stop.is_set():
                ev = self.recv(0.1)
                if ev is None:
                    continue
                try:
                    callback(*ev)
                except Exception:  # a bad callback must not kill the subscription
                    log.exception("event callback raised")

        self._thread = threading.Thread(target=loop, name="event-subscriber", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
