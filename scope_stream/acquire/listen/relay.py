"""The relay shared by the pymmcore-plus and pycromanager listeners: queue, send, flush, close.

On the acquisition thread a listener only queues each frame (:meth:`TileRelay._enqueue`, which
waits while ``max_queue_bytes`` of frames wait already: the acquisition slows down, no frame is
lost); the listener's relay thread hands every queued frame to the listener's ``_process``, which
turns it into a tile and sends it with :meth:`TileRelay._send`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .tiles import SendStats, SinkLike, deliver

if TYPE_CHECKING:
    from typing import Self

    from scope_stream.vocabulary import Tile

__all__ = ["TileRelay"]

_STOP = object()


class TileRelay:
    """Base of the listeners that queue frames and send their tiles from a relay thread of their own.

    A subclass implements ``_process(*args)`` (convert one queued frame and :meth:`_send` its tile)
    and queues frames with :meth:`_enqueue` after starting the relay thread with :meth:`_start_relay`.
    ``label`` names the listener in log messages, which go to the logger of the subclass's module.
    """

    def __init__(
        self,
        sink: SinkLike,
        *,
        slide_id: str,
        max_queue_bytes: int,
        on_tile: Callable[[Tile], Any] | None,
        label: str,
    ) -> None:
        if not slide_id:
            raise ValueError("slide_id must be a non-empty string")
        self.sink = sink
        self.slide_id = slide_id
        self.on_tile = on_tile
        self.stats = SendStats()
        self._label = label
        self._log = logging.getLogger(type(self).__module__)
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._space = threading.Condition()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every frame queued so far was sent (or failed); True if in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return self._queue.unfinished_tasks == 0

    def close(self, timeout: float = 60.0) -> bool:
        """Send what is queued (up to ``timeout``) and stop the relay thread; True if all was sent."""
        done = self.flush(timeout)
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(5.0)
            self._thread = None
        return done

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ for subclasses
    def _process(self, *args: Any) -> None:
        """Turn one queued frame (what was given to :meth:`_enqueue`) into a tile and :meth:`_send` it."""
        raise NotImplementedError

    def _start_relay(self, name: str) -> None:
        """Start the relay thread, called ``name``."""
        self._thread = threading.Thread(target=self._relay, name=name, daemon=True)
        self._thread.start()

    def _enqueue(self, image: Any, *args: Any) -> None:
        """Queue a frame, and what ``_process`` needs with it, for the relay thread (waits while full)."""
        nbytes = int(getattr(image, "nbytes", 0))
        with self._space:
            while self._queued_bytes + nbytes > self._max_queue_bytes and self._queued_bytes > 0:
                self._log.warning(
                    "%s: %d bytes of frames waiting to be sent; the acquisition waits", self._label, self._queued_bytes
                )
                self._space.wait(1.0)
            self._queued_bytes += nbytes
        self._queue.put((nbytes, (image, *args)))

    def _send(self, tile: Tile) -> None:
        """Send ``tile`` to the sink (retrying while it pushes back), then give it to ``on_tile``."""
        if deliver(self.sink, tile, self.stats, stop=self._stop) and self.on_tile is not None:
            try:
                self.on_tile(tile)
            except Exception:
                self._log.exception("%s: on_tile callback failed for %s", self._label, tile.tile_id)

    def _relay(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                nbytes, args = item
                try:
                    self._process(*args)
                finally:
                    with self._space:
                        self._queued_bytes -= nbytes
                        self._space.notify_all()
            finally:
                self._queue.task_done()
