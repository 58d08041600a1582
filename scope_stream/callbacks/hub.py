"""Python callbacks on the pipeline's events: ``hub.on("cell.flagged", fn)``.

:class:`EventHub` subscribes to the events PUB socket of a pipeline (``docs/protocol.md``: two
frames, an ASCII topic and a JSON object) and calls the functions registered for each topic on
one dispatch thread, in arrival order. A callback that raises is logged and counted; it never
stops the hub or other callbacks. A slow callback delays only later callbacks (the receiving
thread keeps draining the socket into an in-process queue, so the publisher never drops events
for this subscriber while the queue has room).

Patterns: ``"cell.flagged"`` (exact), ``"tile.*"`` (prefix up to the dot) and ``"*"`` (everything).

>>> hub = EventHub("tcp://127.0.0.1:5558")            # doctest: +SKIP
>>> hub.on("cell.flagged", lambda ev: print(ev["cell_id"], ev["x_um"], ev["y_um"]))  # doctest: +SKIP
>>> hub.start()                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import zmq

__all__ = ["EventCallback", "EventHub", "topic_matches"]

log = logging.getLogger(__name__)

#: A callback gets the event payload (a dict with at least ``v``, ``topic`` and ``ts``).
EventCallback = Callable[[dict[str, Any]], Any]
F = TypeVar("F", bound=EventCallback)

_STOP = object()


def topic_matches(pattern: str, topic: str) -> bool:
    """``"*"`` matches every topic, ``"tile.*"`` every topic starting ``tile.``, else exact match."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return pattern == topic


class EventHub:
    """Subscribe to a pipeline's events and dispatch them to Python callbacks.

    Parameters
    ----------
    endpoint:
        The events PUB endpoint (``LocalPipeline.events_endpoint`` or what ``scope-stream run`` prints).
        ``None`` makes a hub without a socket: only :meth:`emit` feeds it (tests, local sources).
    curve_keys_dir:
        A CurveZMQ key folder (``scope-stream keys generate``) when the pipeline is not on loopback.
    queue_size:
        Events held between the socket and the callbacks; when full the receiver waits (the PUB
        socket then buffers up to its high-water mark and drops beyond it, as PUB does).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        curve_keys_dir: Path | str | None = None,
        queue_size: int = 100_000,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._curve_keys_dir = Path(curve_keys_dir) if curve_keys_dir is not None else None
        self._ctx = context or zmq.Context.instance()
        self._handlers: list[tuple[str, EventCallback]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connected = threading.Event()
        self._started = False
        self._closed = False
        #: events received per topic, malformed messages, and callbacks that raised
        self.received: Counter[str] = Counter()
        self.malformed = 0
        self.errors = 0
        self._idle = threading.Condition()
        self._pending = 0

    # ------------------------------------------------------------------ registration
    @overload
    def on(self, topic: str, fn: F) -> F: ...

    @overload
    def on(self, topic: str, fn: None = None) -> Callable[[F], F]: ...

    def on(self, topic: str, fn: F | None = None) -> F | Callable[[F], F]:
        """Call ``fn(payload)`` for every event matching ``topic``; usable as a decorator.

        ``topic`` is an exact topic (``"slide.done"``), a prefix pattern (``"tile.*"``) or ``"*"``.
        Returns ``fn`` so that the decorator form keeps the function.
        """
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string such as 'cell.flagged', 'tile.*' or '*'")

        def register(f: F) -> F:
            if not callable(f):
                raise TypeError(f"callback for {topic!r} must be callable, got {type(f).__name__}")
            with self._lock:
                self._handlers.append((topic, f))
            return f

        return register(fn) if fn is not None else register

    def off(self, topic: str, fn: EventCallback) -> None:
        """Remove a registration made with :meth:`on` (no error if it is not there)."""
        with self._lock:
            self._handlers = [(t, f) for t, f in self._handlers if not (t == topic and f == fn)]

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_connected: float = 2.0) -> EventHub:
        """Start receiving (if there is an endpoint) and dispatching; waits up to ``wait_connected`` s
        for the subscription to reach the publisher (ZeroMQ's slow-joiner)."""
        if self._started:
            return self
        if self._closed:
            raise RuntimeError("this EventHub is closed")
        self._started = True
        dispatcher = threading.Thread(target=self._dispatch, name="scope-stream-event-dispatch", daemon=True)
        dispatcher.start()
        self._threads.append(dispatcher)
        if self.endpoint is not None:
            receiver = threading.Thread(target=self._receive, name="scope-stream-event-receive", daemon=True)
            receiver.start()
            self._threads.append(receiver)
            if wait_connected > 0 and not self._connected.wait(wait_connected):
                log.warning("event hub: no connection to %s after %.1f s (still trying)", self.endpoint, wait_connected)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop receiving, let queued events reach their callbacks (up to ``timeout``), stop."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.name == "scope-stream-event-receive":
                t.join(max(0.0, deadline - time.monotonic()))
        try:
            self._queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
        except queue.Full:
            log.warning("event hub: dispatch queue still full at close; %d events not dispatched", self._queue.qsize())
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> EventHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ feeding
    def emit(self, topic: str, payload: dict[str, Any]) -> None:
        """Dispatch an event that did not come from the socket (same path as received events)."""
        event = dict(payload)
        event.setdefault("topic", topic)
        event.setdefault("ts", time.time())
        self._enqueue(topic, event)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every event received so far has been dispatched; True if it was in time."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # ------------------------------------------------------------------ internals
    def _enqueue(self, topic: str, event: dict[str, Any]) -> None:
        with self._idle:
            self._pending += 1
        self.received[topic] += 1
        while True:
            try:
                self._queue.put((topic, event), timeout=0.2)
                return
            except queue.Full:
                if self._stop.is_set():
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
                    return

    def _socket(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
        if self._curve_keys_dir is not None:
            from scope_stream.transport.security import ClientSecurity

            ClientSecurity.from_dir(self._curve_keys_dir).apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        return sock

    def _receive(self) -> None:
        assert self.endpoint is not None
        sock = self._socket()
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.connect(self.endpoint)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if monitor in ready:
                    monitor.recv_multipart()
                    if not self._connected.is_set():
                        # the subscription travels right after the handshake; give it a moment
                        time.sleep(0.05)
                        self._connected.set()
                if sock in ready:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle_frames(frames)
        except zmq.ZMQError as exc:  # pragma: no cover - context terminated under us
            if not self._stop.is_set():
                log.error("event hub: socket error on %s: %s", self.endpoint, exc)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    def _handle_frames(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise ValueError(f"expected 2 frames (topic, JSON), got {len(frames)}")
            topic = frames[0].decode("ascii")
            payload = json.loads(frames[1].decode("utf-8"))
            if not isinstance(payload, dict):
                raise ValueError("payload is not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            self.malformed += 1
            if self.malformed <= 10 or self.malformed % 1000 == 0:
                log.warning("event hub: ignoring malformed event (%d so far): %s", self.malformed, exc)
            return
        self._enqueue(topic, payload)

    def _dispatch(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            topic, event = item
            try:
                with self._lock:
                    handlers = [f for pattern, f in self._handlers if topic_matches(pattern, topic)]
                for fn in handlers:
                    try:
                        fn(event)
                    except Exception:
                        self.errors += 1
                        log.exception("event hub: callback %r for %r raised (ignored)", fn, topic)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
