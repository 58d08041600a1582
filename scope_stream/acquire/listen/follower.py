"""Follow a datastore that an acquisition is filling and stream each new image as it appears.

Acquisitions started from the Micro-Manager GUI's own MDA window cannot be hooked by pycromanager
(pycromanager issue #29: no ``image_process_fn`` for them). :class:`DatastoreFollower` instead
polls the datastore the GUI writes into, over pycromanager's bridge, and streams every image it
has not seen yet:

    follower = DatastoreFollower(MicroManagerGuiFeed(port=4827), source, slide_id="smear-7")
    follower.start()          # then press "Acquire!" in the MDA window
    ...
    follower.wait_finished()  # returns when the GUI's datastore is frozen (acquisition over)

The same follower reads a pycromanager dataset (NDTiff on disk or in RAM) that is being written
(:class:`DatasetFeed`) -- what the tests exercise here, with pycromanager's Python backend.

Limits (``docs/acquisition.md``): latency is one poll interval (``poll_ms``) plus the bridge
transfer of the image; images are read in the order the datastore lists them, not necessarily
acquisition order; the whole image travels over the bridge, so the bridge's bandwidth
(~100-200 MB/s, pycromanager issues #70 and #552) caps the rate; the follower picks the
datastore of the newest image window that is still being written (or the active one).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol

import numpy as np

from .pycromanager import TileNamer, default_namer, tile_from_pycromanager
from .tiles import SendStats, SinkLike, deliver

__all__ = ["DatasetFeed", "DatastoreFeed", "DatastoreFollower", "MicroManagerGuiFeed"]

log = logging.getLogger(__name__)


class DatastoreFeed(Protocol):
    """A datastore that grows while an acquisition runs (all calls come from the follower's thread)."""

    def image_keys(self) -> list[Hashable]:
        """Keys of every image present now (any order)."""
        ...

    def read(self, key: Hashable) -> tuple[np.ndarray, dict[str, Any]]:
        """Pixels and a metadata dict (pycromanager tag names: XPosition_um_Intended or XPositionUm,
        PixelSize_um or PixelSizeUm, Axes, PixelType) of one image."""
        ...

    def is_finished(self) -> bool:
        """Whether the acquisition writing into the datastore is over."""
        ...


# ------------------------------------------------------------------------------ datasets
class DatasetFeed:
    """A pycromanager dataset being written: ``acq.get_dataset()`` (NDTiff or RAM) or ``Dataset(path)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def image_keys(self) -> list[Hashable]:
        return [
            tuple(sorted(axes.items(), key=lambda kv: str(kv[0]))) for axes in self.dataset.get_image_coordinates_list()
        ]

    def read(self, key: Hashable) -> tuple[np.ndarray, dict[str, Any]]:
        axes = dict(key)  # type: ignore[call-overload]
        image = np.asarray(self.dataset.read_image(**axes))
        meta = dict(self.dataset.read_metadata(**axes))
        meta.setdefault("Axes", axes)
        return image, meta

    def is_finished(self) -> bool:
        return bool(self.dataset.is_finished())


# ------------------------------------------------------------------------------ MM GUI
def _java_items(obj: Any) -> list[Any]:
    """The elements of a Java collection seen over the bridge (a Python list, or a Java Iterable/Iterator)."""
    if obj is None:
        return []
    if isinstance(obj, (list, tuple)):
        return list(obj)
    it = obj.iterator() if hasattr(obj, "iterator") else obj
    if hasattr(it, "has_next"):
        out = []
        while it.has_next():
            out.append(it.next())
        return out
    return list(obj)


class MicroManagerGuiFeed:
    """The Micro-Manager GUI's datastore, over pycromanager's bridge (MM 2.0 ``Studio`` API).

    ``which="live"`` follows the newest data viewer whose datastore is not frozen (an acquisition
    being written), re-choosing when that one is frozen and a newer one appears; ``"active"``
    follows the focused viewer. The bridge is created lazily, on the follower's thread (bridge
    objects are not shared between threads).

    Needs a running Micro-Manager with *Tools > Options > Run server on port 4827* ticked. Not
    exercised by the test suite (no Micro-Manager here); see ``docs/acquisition.md``.
    """

    def __init__(self, *, port: int = 4827, which: Literal["live", "active"] = "live", timeout_ms: int = 2000) -> None:
        self.port = port
        self.which = which
        self.timeout_ms = timeout_ms
        self._studio: Any = None
        self._provider: Any = None
        self._coords: dict[str, Any] = {}

    def _get_studio(self) -> Any:
        if self._studio is None:
            from pycromanager import Studio

            self._studio = Studio(port=self.port, timeout=self.timeout_ms, convert_camel_case=True)
        return self._studio

    def _choose_provider(self) -> Any:
        displays = self._get_studio().displays()
        if self.which == "active":
            viewer = displays.get_active_data_viewer()
            return None if viewer is None else viewer.get_data_provider()
        viewers = _java_items(displays.get_all_data_viewers())
        live = [v.get_data_provider() for v in viewers if not v.get_data_provider().is_frozen()]
        return live[-1] if live else None

    def image_keys(self) -> list[Hashable]:
        if self._provider is None or (self.which == "live" and self._provider.is_frozen() and self._coords):
            provider = self._choose_provider()
            if provider is not None and provider is not self._provider:
                self._provider = provider
                self._coords = {}
        if self._provider is None:
            return []
        keys: list[Hashable] = []
        for coords in _java_items(self._provider.get_unordered_image_coords()):
            key = str(coords.to_string())
            self._coords[key] = coords
            keys.append(key)
        return keys

    def read(self, key: Hashable) -> tuple[np.ndarray, dict[str, Any]]:
        coords = self._coords[str(key)]
        image = self._provider.get_image(coords)
        w, h = int(image.get_width()), int(image.get_height())
        bpp, ncomp = int(image.get_bytes_per_pixel()), int(image.get_number_of_components())
        raw = np.asarray(image.get_raw_pixels())
        pixels: np.ndarray
        if ncomp > 1:  # RGB32: BGRA bytes
            pixels = raw.view(np.uint8).reshape(h, w, 4)
            pixel_type = "RGB32"
        elif bpp == 2:
            pixels = raw.view(np.uint16).reshape(h, w)
            pixel_type = "GRAY16"
        else:
            pixels = raw.view(np.uint8).reshape(h, w)
            pixel_type = "GRAY8"
        md = image.get_metadata()
        meta: dict[str, Any] = {"PixelType": pixel_type, "Width": w, "Height": h}
        for name, getter in (
            ("XPositionUm", "get_x_position_um"),
            ("YPositionUm", "get_y_position_um"),
            ("ZPositionUm", "get_z_position_um"),
            ("PixelSizeUm", "get_pixel_size_um"),
            ("ImageNumber", "get_image_number"),
        ):
            try:
                value = getattr(md, getter)()
            except Exception:
                value = None
            if value is not None:
                meta[name] = float(value) if name != "ImageNumber" else int(value)
        axes = {}
        for axis in _java_items(coords.get_axes()):
            axes[str(axis)] = int(coords.get_index(axis))
        meta["Axes"] = axes
        return pixels, meta

    def is_finished(self) -> bool:
        return self._provider is not None and bool(self._provider.is_frozen())


# ------------------------------------------------------------------------------ follower
class DatastoreFollower:
    """Poll ``feed`` every ``poll_ms`` and stream every image it has not streamed yet to ``sink``.

    ``backend`` says whose pixels these are: ``java`` (Micro-Manager; RGB32 frames are BGR(A) and
    are turned to RGB) or ``python``. Tiles are named by ``namer`` from the image's axes.
    :attr:`latencies_s` holds, per streamed image, seconds from when the follower first saw it to
    when the sink took it (add up to one poll interval for the time before it was seen).
    """

    def __init__(
        self,
        feed: DatastoreFeed,
        sink: SinkLike,
        *,
        slide_id: str,
        poll_ms: int = 50,
        backend: Literal["java", "python"] = "java",
        namer: TileNamer | None = None,
        objective: str | None = None,
        pixel_size_um: float | None = None,
        on_tile: Callable[[Any], Any] | None = None,
    ) -> None:
        if not slide_id:
            raise ValueError("slide_id must be a non-empty string")
        self.feed = feed
        self.sink = sink
        self.slide_id = slide_id
        self.poll_s = max(0.001, poll_ms / 1000.0)
        self.backend = backend
        self.namer = namer or default_namer(f"g{uuid.uuid4().hex[:6]}")
        self.objective = objective
        self.pixel_size_um = pixel_size_um
        self.on_tile = on_tile
        self.stats = SendStats()
        self.seen: set[Hashable] = set()
        self.latencies_s: list[float] = []
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0

    def start(self) -> DatastoreFollower:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scope-stream-datastore-follower", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling (after the current poll)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the datastore is finished and every image in it was streamed."""
        return self.finished.wait(timeout)

    def __enter__(self) -> DatastoreFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def poll_once(self) -> int:
        """One poll: stream every image not seen before; returns how many were new."""
        keys = self.feed.image_keys()
        new = [k for k in keys if k not in self.seen]
        for key in new:
            t_seen = time.monotonic()
            self.seen.add(key)
            try:
                pixels, meta = self.feed.read(key)
                tile = tile_from_pycromanager(
                    pixels,
                    meta,
                    slide_id=self.slide_id,
                    seq=self._seq,
                    namer=self.namer,
                    backend=self.backend,
                    objective=self.objective,
                    pixel_size_um=self.pixel_size_um,
                )
            except Exception as exc:
                self.stats.error(f"datastore follower: image {key!r} skipped: {type(exc).__name__}: {exc}")
                continue
            self._seq += 1
            if deliver(self.sink, tile, self.stats, stop=self._stop):
                self.latencies_s.append(time.monotonic() - t_seen)
                if self.on_tile is not None:
                    try:
                        self.on_tile(tile)
                    except Exception:
                        log.exception("datastore follower: on_tile failed for %s", tile.tile_id)
        return len(new)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                done_before = self.feed.is_finished()
                self.poll_once()
                if done_before:
                    # the datastore was finished before this poll: everything in it has been streamed
                    self.finished.set()
                    return
            except Exception as exc:  # the bridge went away, Micro-Manager closed...: keep trying
                self.stats.error(f"datastore follower: poll failed: {type(exc).__name__}: {exc}")
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - t0)))
