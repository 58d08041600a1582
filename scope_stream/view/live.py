"""The live feed: a background thread that turns pipeline events and store commits into view updates.

This is the napari-micromanager pattern, and the fix for what its issue #202 records (frames pushed
into napari from the acquisition thread: slow acquisitions, thread errors): nothing here touches
the GUI. One daemon thread

1. listens to the pipeline's events (a ZeroMQ SUB socket, docs/protocol.md) -- ``tile.done``,
   ``reimage.done``, ``cell.flagged``, ``scan.started``, ``slide.done``, ``pipeline.stats`` -- which
   only say *look now* and where the store is;
2. follows the slide store (:class:`~scope_stream.view.follow.StoreFollower`) for what was
   committed, so a dropped event loses nothing and connecting mid-scan catches up;
3. does the costly work off the GUI thread -- reading tile pixels, downsampling them to the mosaic
   scale, reading crops -- and puts small, ready-to-show updates on a bounded queue.

The GUI drains the queue from a ~50 ms main-thread timer (:meth:`LiveFeed.drain`), applies a
bounded amount of work per tick and refreshes each layer once. When the GUI falls behind, the
queue fills and the feed waits: the pipeline never does (it writes to the store regardless).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cells import CellRecord, RecordError
from .follow import StoreDelta, StoreFollower, StoreReadError, TileRow
from .mosaic import downsample_to_scale, to_display

__all__ = [
    "CellsRetracted",
    "CellsUpdate",
    "FeedError",
    "FeedStatus",
    "FlagSeen",
    "LiveFeed",
    "MosaicSnapshot",
    "ReimageEvent",
    "ReimageTile",
    "ReviewsUpdate",
    "ScanTile",
    "SlideUpdate",
    "StatsUpdate",
    "Update",
    "describe_stats",
]

log = logging.getLogger(__name__)

EVENT_TOPICS = ("scan.", "tile.", "reimage.", "cell.", "slide.", "pipeline.")


# ------------------------------------------------------------------------------ updates
@dataclass(frozen=True)
class ScanTile:
    """A survey tile, already downsampled to ``scale_um`` for the mosaic."""

    row: TileRow
    image: np.ndarray
    scale_um: float


@dataclass(frozen=True)
class ReimageTile:
    """A re-imaged field at full resolution (few of them: each gets its own layer)."""

    row: TileRow
    pixels: np.ndarray


@dataclass(frozen=True)
class MosaicSnapshot:
    """The store's mosaic overview, used to catch up on many tiles at once (no per-tile reads)."""

    image: np.ndarray  # (Y, X[, 3])
    scale_um: float
    translate_um: tuple[float, float]  # (y, x) of pixel (0, 0) centre
    tile_ids: frozenset[str]


@dataclass(frozen=True)
class CellsUpdate:
    cells: list[CellRecord]
    crops: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class CellsRetracted:
    """Cells shown before that are copies of a better-centred cell of an overlapping tile: drop them."""

    cell_ids: list[str]


@dataclass(frozen=True)
class FlagSeen:
    """A ``cell.flagged`` event (arrives as soon as the sink stores the cell)."""

    record: CellRecord


@dataclass(frozen=True)
class ReviewsUpdate:
    reviews: dict[str, tuple[str, str, float]]


@dataclass(frozen=True)
class SlideUpdate:
    """Slide-level news: store found, status (scanning/done), metadata, summary."""

    store: str
    slide_id: str
    status: str
    metadata: dict[str, Any]
    summary: dict[str, Any]


@dataclass(frozen=True)
class ReimageEvent:
    """A ``reimage.done`` event: a re-imaged tile was analysed (its pixels come as :class:`ReimageTile`)."""

    payload: dict[str, Any]


@dataclass(frozen=True)
class StatsUpdate:
    payload: dict[str, Any]


@dataclass(frozen=True)
class FeedStatus:
    """Connection state, for the widget's status line."""

    connected: bool
    message: str


@dataclass(frozen=True)
class FeedError:
    """Something failed in the background (bad event, unreadable tile...): shown, never fatal."""

    message: str


Update = (
    ScanTile
    | ReimageTile
    | MosaicSnapshot
    | CellsUpdate
    | CellsRetracted
    | FlagSeen
    | ReviewsUpdate
    | ReimageEvent
    | SlideUpdate
    | StatsUpdate
    | FeedStatus
    | FeedError
)


# ------------------------------------------------------------------------------ the feed
class LiveFeed:
    """Background reader of a pipeline's events and its slide store.

    Parameters
    ----------
    events_endpoint:
        the pipeline's events PUB endpoint (``tcp://127.0.0.1:PORT``), or None to follow a store only.
    store_path:
        the slide store; None to learn it from the events (``scan.started`` / ``tile.done``).
    mosaic_downsample:
        the mosaic's µm per pixel is the first survey tile's pixel size times this.
    poll_interval_s:
        how often the store is read when no event says "look now".
    keys_dir:
        CurveZMQ client keys when the pipeline binds beyond loopback.
    snapshot_after:
        when catching up on more committed scan tiles than this, use the store's mosaic overview
        instead of reading every tile (if the store has one).
    """

    def __init__(
        self,
        events_endpoint: str | None = None,
        store_path: str | Path | None = None,
        *,
        mosaic_downsample: int = 4,
        poll_interval_s: float = 0.25,
        max_queue: int = 512,
        snapshot_after: int = 64,
        crops: str = "flagged",
        keys_dir: str | Path | None = None,
        name: str = "scope-stream-feed",
    ) -> None:
        if events_endpoint is None and store_path is None:
            raise ValueError("LiveFeed needs an events endpoint, a store path, or both")
        self.events_endpoint = events_endpoint
        self.store_path: Path | None = Path(store_path) if store_path is not None else None
        self.mosaic_downsample = max(1, int(mosaic_downsample))
        self.poll_interval_s = float(poll_interval_s)
        self.snapshot_after = int(snapshot_after)
        self.crops_mode = crops
        self.keys_dir = keys_dir
        #: µm per mosaic pixel; set from the first tile, and by the GUI when its canvas is coarsened.
        self.mosaic_scale_um: float | None = None
        self.follower: StoreFollower | None = None
        self.n_events = 0
        self.n_tiles = 0
        self._queue: queue.Queue[Update] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name
        self._last_error_at = 0.0
        self._errors_suppressed = 0
        self._store_wait_reported = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LiveFeed:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close its socket (safe to call twice)."""
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poke(self) -> None:
        """Read the store now (e.g. after a review was written)."""
        self._poke.set()

    def drain(self, max_items: int = 200, budget_s: float | None = None) -> list[Update]:
        """Up to ``max_items`` pending updates (call from the GUI thread's timer); never blocks."""
        out: list[Update] = []
        t0 = time.perf_counter()
        while len(out) < max_items:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        return out

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ thread body
    def _emit(self, update: Update) -> bool:
        """Put an update, waiting while the GUI catches up; False if stopping."""
        while not self._stop.is_set():
            try:
                self._queue.put(update, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_at < 1.0:  # rate-limit: a storm of bad events must not flood the UI
            self._errors_suppressed += 1
            return
        if self._errors_suppressed:
            message = f"{message} (+{self._errors_suppressed} more errors)"
            self._errors_suppressed = 0
        self._last_error_at = now
        log.warning("%s", message)
        self._emit(FeedError(message))

    def _run(self) -> None:
        sub: Any = None
        try:
            if self.events_endpoint:
                from scope_stream.transport.events import EventSubscriber

                try:
                    sub = EventSubscriber(self.events_endpoint, EVENT_TOPICS, keys_dir=self.keys_dir)
                except Exception as exc:  # bad address, bad keys
                    self._emit(FeedStatus(False, f"cannot listen to {self.events_endpoint}: {exc}"))
                else:
                    self._emit(FeedStatus(True, f"listening to {self.events_endpoint}"))
            if self.store_path is not None:
                self._emit(FeedStatus(True, f"following {self.store_path}"))
            last_poll = 0.0
            while not self._stop.is_set():
                poke = False
                if sub is not None:
                    poke = self._read_events(sub)
                else:
                    self._poke.wait(self.poll_interval_s)
                if self._poke.is_set():
                    self._poke.clear()
                    poke = True
                now = time.monotonic()
                if self.store_path is not None and (poke or now - last_poll >= self.poll_interval_s):
                    last_poll = now
                    self._poll_store()
        except Exception as exc:  # pragma: no cover - last resort: report, never kill the GUI
            log.exception("live feed stopped")
            self._emit(FeedStatus(False, f"live feed stopped: {exc}"))
        finally:
            if sub is not None:
                sub.close()

    def _read_events(self, sub: Any) -> bool:
        """Receive what is waiting (up to a batch); True if the store should be read now."""
        poke = False
        ev = sub.recv(self.poll_interval_s)
        n = 0
        while ev is not None and n < 1000 and not self._stop.is_set():
            n += 1
            self.n_events += 1
            try:
                poke |= self._handle_event(*ev)
            except (ValueError, TypeError, KeyError, RecordError) as exc:
                self._error(f"ignored a bad {ev[0]} event: {exc}")
            ev = sub.recv(0)
        return poke

    def _handle_event(self, topic: str, payload: dict[str, Any]) -> bool:
        store = payload.get("store")
        if store and self.store_path is None:
            self.store_path = Path(str(store))
            self._emit(FeedStatus(True, f"slide store: {self.store_path}"))
        if topic == "cell.flagged":
            self._emit(FlagSeen(CellRecord.from_flag_event(payload)))
            return False
        if topic == "pipeline.stats":
            self._emit(StatsUpdate(payload))
            return False
        if topic == "reimage.done":
            self._emit(ReimageEvent(payload))
        return topic in ("scan.started", "tile.done", "reimage.done", "slide.done")

    # ------------------------------------------------------------------ store
    def _poll_store(self) -> None:
        assert self.store_path is not None
        if self.follower is None or self.follower.path != self.store_path:
            if not (self.store_path / "zarr.json").is_file():
                if not self._store_wait_reported:
                    self._store_wait_reported = True
                    self._emit(FeedStatus(True, f"waiting for the store {self.store_path}"))
                return
            self.follower = StoreFollower(self.store_path, crops=self.crops_mode)
        first = self.follower.n_tiles == 0 and self.follower.n_cells == 0
        try:
            delta = self.follower.poll()
        except StoreReadError as exc:
            self._error(str(exc))
            return
        except Exception as exc:  # a half-written store mid-commit, a transient I/O error
            self._error(f"reading {self.store_path}: {exc}")
            return
        self._apply(delta, first=first)

    def _apply(self, delta: StoreDelta, *, first: bool) -> None:
        f = self.follower
        assert f is not None
        if delta.status_changed or first:
            self._emit(SlideUpdate(str(f.path), f.slide_id, delta.status, delta.metadata, delta.summary))
        if delta.reviews:
            self._emit(ReviewsUpdate(delta.reviews))
        if delta.cells:
            self._emit(CellsUpdate(delta.cells, delta.crops))
        if delta.retracted:
            self._emit(CellsRetracted(delta.retracted))
        scan = [t for t in delta.tiles if t.kind == "scan" and t.path]
        skip: set[str] = set()
        if first and len(scan) > self.snapshot_after:
            snap = self._snapshot(scan)
            if snap is not None:
                skip = set(snap.tile_ids)
        for row in delta.tiles:
            if self._stop.is_set():
                return
            if row.tile_id in skip or not row.path:
                continue
            try:
                pixels = f.read_pixels(row)
                if row.kind == "reimage":
                    self._emit(ReimageTile(row, pixels))
                    continue
                if self.mosaic_scale_um is None:
                    self.mosaic_scale_um = row.pixel_size_um * self.mosaic_downsample
                scale = self.mosaic_scale_um
                shown = to_display(pixels, 3 if _is_colour(pixels) else 1)
                image = downsample_to_scale(shown, row.pixel_size_um, scale)
                self.n_tiles += 1
                self._emit(ScanTile(row, image, scale))
            except Exception as exc:
                self._error(f"tile {row.tile_id}: cannot show it: {exc}")

    def _snapshot(self, scan: list[TileRow]) -> MosaicSnapshot | None:
        assert self.follower is not None
        try:
            m = self.follower.mosaic()
        except Exception as exc:
            log.info("no mosaic snapshot: %s", exc)
            return None
        if m is None:
            return None
        image, scale, translate = m
        if self.mosaic_scale_um is None:
            self.mosaic_scale_um = scale
        snap = MosaicSnapshot(image, scale, translate, frozenset(t.tile_id for t in scan))
        self._emit(snap)
        return snap


def _is_colour(pixels: np.ndarray) -> bool:
    return pixels.ndim == 3 and pixels.shape[2] in (3, 4)


def describe_stats(payload: dict[str, Any]) -> str:
    """One status-line summary of a ``pipeline.stats`` payload."""
    rate = payload.get("rate_tiles_per_s")
    parts = []
    if isinstance(rate, int | float) and math.isfinite(rate):
        parts.append(f"{rate:.1f} tiles/s")
    for key, name in (("queue_depth", "queued"), ("in_flight", "in flight"), ("stored", "stored")):
        v = payload.get(key)
        if isinstance(v, int):
            parts.append(f"{v} {name}")
    workers = payload.get("workers")
    if isinstance(workers, list):
        parts.append(f"{len(workers)} workers")
    return ", ".join(parts)
