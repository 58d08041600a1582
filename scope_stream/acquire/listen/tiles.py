"""Shared pieces of the acquisition listeners: where tiles go, how frames become tiles.

A listener turns each camera frame (numpy array + the acquisition engine's metadata) into a
:class:`~scope_stream.vocabulary.Tile` and hands it to a *sink*: anything with ``send(tile)`` --
normally the pipeline's ``TileSource`` -- or a plain callable. Sending happens off the acquisition
thread; a sink that pushes back (``BackpressureError``, ``TimeoutError``) is retried, so an accepted
frame is never dropped for being early.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scope_stream.vocabulary import PIXEL_DTYPES, Tile, VocabularyError

__all__ = [
    "FrameError",
    "SendStats",
    "ThreadedSink",
    "TileSink",
    "as_pixels",
    "deliver",
    "first_number",
]

log = logging.getLogger(__name__)


class FrameError(ValueError):
    """A frame that cannot become a tile (no stage position, unusable pixels...)."""


@runtime_checkable
class TileSink(Protocol):
    """Where listeners put tiles: the pipeline's ``TileSource`` or anything with ``send(tile)``."""

    def send(self, tile: Tile) -> Any: ...


SinkLike = TileSink | Callable[[Tile], Any]


def _is_backpressure(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or type(exc).__name__ in ("BackpressureError", "Again")


class SendStats:
    """Counters shared by the listeners (thread-safe enough for counters read by tests and status)."""

    def __init__(self) -> None:
        self.sent = 0
        self.errors = 0
        self.retries = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()

    def error(self, message: str) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = message
        if self.errors <= 20 or self.errors % 1000 == 0:
            log.error("%s (%d errors so far)", message, self.errors)


def deliver(
    sink: SinkLike,
    tile: Tile,
    stats: SendStats,
    *,
    stop: threading.Event | None = None,
    retry_s: float = 0.5,
) -> bool:
    """Send ``tile`` to ``sink``, retrying while the sink pushes back; False if it could not be sent.

    Backpressure is retried until it clears (or ``stop`` is set); any other error is logged and
    counted and the tile is given up (it would fail the same way again).
    """
    send = sink.send if isinstance(sink, TileSink) else sink
    warned = False
    while True:
        try:
            send(tile)
        except Exception as exc:
            if _is_backpressure(exc) and not (stop is not None and stop.is_set()):
                with stats.lock:
                    stats.retries += 1
                if not warned:
                    log.warning("pipeline pushes back (%s); tile %s waits and is retried", exc, tile.tile_id)
                    warned = True
                time.sleep(retry_s)
                continue
            stats.error(f"could not send tile {tile.tile_id}: {type(exc).__name__}: {exc}")
            return False
        with stats.lock:
            stats.sent += 1
        return True


def as_pixels(image: Any) -> np.ndarray:
    """The frame as an array a :class:`Tile` accepts: (H, W) or (H, W, 3|4) of uint8/uint16/float32.

    (H, W, 1) becomes (H, W); int/uint types that fit in 16 bits are cast to uint16 when the values
    allow it; anything else is a :class:`FrameError` naming the problem.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise FrameError(f"frame shape {arr.shape} is not (H, W) or (H, W, 3|4)")
    if arr.dtype.name in PIXEL_DTYPES:
        return arr
    if arr.dtype.kind in "iu" and arr.size and int(arr.min()) >= 0 and int(arr.max()) <= 65535:
        return arr.astype(np.uint16)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise FrameError(f"frame dtype {arr.dtype} cannot be carried as one of {sorted(PIXEL_DTYPES)}")


def first_number(meta: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` in ``meta`` whose value parses as a finite float (MM tags are often strings)."""
    for key in keys:
        if key in meta:
            try:
                value = float(meta[key])
            except (TypeError, ValueError):
                continue
            if np.isfinite(value):
                return value
    return None


def make_tile(
    pixels: np.ndarray,
    *,
    slide_id: str,
    tile_id: str,
    seq: int,
    x_um: float,
    y_um: float,
    z_um: float,
    pixel_size_um: float,
    objective: str,
    kind: str,
    metadata: dict[str, Any],
) -> Tile:
    """A :class:`Tile`, with vocabulary errors turned into :class:`FrameError`."""
    try:
        return Tile(
            pixels,
            slide_id=slide_id,
            tile_id=tile_id,
            seq=seq,
            x_um=x_um,
            y_um=y_um,
            z_um=z_um,
            pixel_size_um=pixel_size_um,
            objective=objective,
            kind="reimage" if kind == "reimage" else "scan",
            metadata=metadata,
        )
    except VocabularyError as exc:
        raise FrameError(str(exc)) from exc


class ThreadedSink:
    """A ``TileSource`` (or any sink) used from many threads: one thread of its own does every call.

    ZeroMQ sockets belong to one thread, but tiles arrive on acquisition or relay threads and the
    scan session asks for ``start_scan``/``finish`` from its own. ``ThreadedSink`` builds the
    source with ``factory()`` on its thread and runs, in order, every :meth:`send` and :meth:`call`.
    :meth:`send` blocks while ``max_queue_bytes`` of tiles wait (backpressure reaches the caller,
    nothing is dropped); backpressure from the pipeline is retried by :func:`deliver`.

    >>> sink = ThreadedSink(lambda: TileSource(endpoint))          # doctest: +SKIP
    >>> sink.send(tile)                     # from any thread        # doctest: +SKIP
    >>> sink.call("finish", "slide-1")      # after all tiles sent    # doctest: +SKIP
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        *,
        max_queue_bytes: int = 512 << 20,
        name: str = "scope-stream-sink",
        on_sent: Callable[[Tile], Any] | None = None,
    ) -> None:
        import queue as _queue
        from concurrent.futures import Future

        self._Future = Future
        self._factory = factory
        self._queue: _queue.Queue[Any] = _queue.Queue()
        self._max_bytes = max_queue_bytes
        self._bytes = 0
        self._space = threading.Condition()
        self._stop = threading.Event()
        self._closed = False
        self.stats = SendStats()
        self.on_sent = on_sent  # called on the sink's thread with each tile the target took
        self.target: Any = None
        self._ready: Any = Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises a factory error here, in the caller's thread

    def send(self, tile: Tile) -> None:
        """Queue ``tile`` for sending (blocks while the queue is full)."""
        if self._closed:
            raise RuntimeError("this ThreadedSink is closed")
        n = int(tile.pixels.nbytes)
        with self._space:
            while self._bytes + n > self._max_bytes and self._bytes > 0:
                self._space.wait(0.5)
            self._bytes += n
        self._queue.put(("tile", tile, None))

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``target.<method>(*args, **kwargs)`` on the sink's thread after the tiles queued so far."""
        if self._closed:
            raise RuntimeError("this ThreadedSink is closed")
        fut: Any = self._Future()
        self._queue.put(("call", (method, args, kwargs), fut))
        return fut.result(timeout)

    @property
    def pending(self) -> int:
        """Items (tiles and calls) not yet handled."""
        return int(self._queue.unfinished_tasks)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued has been handed to the target (not acknowledged: see ``call('flush')``)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._queue.unfinished_tasks == 0

    def close(self, timeout: float = 60.0, close_target: bool = True) -> None:
        """Send what is queued (up to ``timeout``), close the target (``close(flush_timeout)``) and stop."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(("stop", close_target, None))
        self._thread.join(timeout + 5.0)
        self._stop.set()

    def _run(self) -> None:
        try:
            self.target = self._factory()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(True)
        while True:
            kind, payload, fut = self._queue.get()
            try:
                if kind == "stop":
                    if payload:
                        close = getattr(self.target, "close", None)
                        if callable(close):
                            try:
                                close(flush_timeout=30.0)
                            except TypeError:
                                close()
                            except Exception as exc:
                                self.stats.error(f"closing the sink failed: {exc}")
                    return
                if kind == "tile":
                    try:
                        if deliver(self.target, payload, self.stats, stop=self._stop) and self.on_sent is not None:
                            try:
                                self.on_sent(payload)
                            except Exception:
                                log.exception("sink: on_sent callback failed for %s", payload.tile_id)
                    finally:
                        with self._space:
                            self._bytes -= int(payload.pixels.nbytes)
                            self._space.notify_all()
                else:
                    method, args, kwargs = payload
                    try:
                        fut.set_result(getattr(self.target, method)(*args, **kwargs))
                    except BaseException as exc:
                        fut.set_exception(exc)
            finally:
                self._queue.task_done()
