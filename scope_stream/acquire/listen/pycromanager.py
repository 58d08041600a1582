"""Stream pycromanager acquisitions into scope-stream (Java backend and Python backend).

The one-liner for people who write their own pycromanager ``Acquisition``::

    from scope_stream.acquire.listen import stream_to_scope_stream

    with Acquisition(directory="C:/data", name="smear",
                     image_process_fn=stream_to_scope_stream("tcp://127.0.0.1:5555", slide_id="smear-7")) as acq:
        acq.acquire(events)

:class:`PycromanagerListener` is pycromanager's ``image_process_fn``: it hands every image on
**unchanged** (so pycromanager's own saving and viewer still work), and streams a copy of the
reference -- never the pixels' memory -- to the pipeline from a thread of its own, so the
acquisition is not held up by the network. Exceptions never escape into pycromanager (one there
aborts or hangs the acquisition).

With a fast camera on the Java backend, the bridge that carries ``image_process_fn`` images is the
bottleneck (pycromanager issues #70, #552); use :meth:`PycromanagerListener.image_saved_fn`
instead: images are saved by Java and read back from the dataset on disk (``docs/acquisition.md``).

Metadata (AcqEngJ and its Python port write the same tags): stage position from
``XPosition_um_Intended`` / ``YPosition_um_Intended`` / ``ZPosition_um_Intended`` (falling back
to ``XPosition_um``, ``XPositionUm``...), pixel size from ``PixelSize_um`` (or ``PixelSizeUm``),
tile id from ``Axes``. Micro-Manager's RGB32 frames are BGRA in memory, so the Java backend's
``(H, W, 3)`` images are BGR; they are turned to RGB for the pipeline.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .relay import TileRelay
from .tiles import FrameError, SinkLike, as_pixels, first_number, make_tile

if TYPE_CHECKING:
    from scope_stream.vocabulary import Tile

__all__ = [
    "PycromanagerListener",
    "TileNamer",
    "default_namer",
    "detect_backend",
    "stream_to_scope_stream",
    "tile_from_pycromanager",
]

log = logging.getLogger(__name__)

X_KEYS = ("XPosition_um_Intended", "XPosition_um", "XPositionUm", "XPosition_umIntended", "X")
Y_KEYS = ("YPosition_um_Intended", "YPosition_um", "YPositionUm", "YPosition_umIntended", "Y")
Z_KEYS = ("ZPosition_um_Intended", "ZPosition_um", "ZPositionUm", "ZPosition_umIntended", "Z")
PIXEL_SIZE_KEYS = ("PixelSize_um", "PixelSizeUm", "PixelSize")
OBJECTIVE_KEYS = ("Objective-Label", "Nosepiece-Label", "Turret-Label", "ObjectiveTurret-Label")

Backend = Literal["auto", "java", "python"]

#: ``namer(axes) -> (tile_id, kind, extra_metadata)``: how tiles of an acquisition are named.
TileNamer = Callable[[Mapping[str, Any]], tuple[str, str, dict[str, Any]]]


def detect_backend() -> Literal["java", "python"]:
    """``python`` when pycromanager runs on a Python core (``start_headless(python_backend=True)`` or the
    scope-stream adapter), else ``java`` (a Micro-Manager GUI or Java headless process)."""
    try:
        from mmpycorex import is_pymmcore_active

        return "python" if is_pymmcore_active() else "java"
    except Exception:
        return "java"


def default_namer(prefix: str) -> TileNamer:
    """Tile ids from the ``Axes`` tag: ``<prefix>-position3-z0``; an axis ``reimage`` makes a re-image tile."""

    def name(axes: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
        parts = [f"{k}{v}" for k, v in sorted(axes.items(), key=lambda kv: str(kv[0]))]
        kind = "reimage" if "reimage" in axes else "scan"
        return (f"{prefix}-" + "-".join(parts) if parts else prefix), kind, {}

    return name


def _axes(meta: Mapping[str, Any]) -> dict[str, Any]:
    axes = meta.get("Axes")
    if isinstance(axes, str):
        try:
            axes = json.loads(axes)
        except json.JSONDecodeError:
            axes = None
    return dict(axes) if isinstance(axes, Mapping) else {}


def tile_from_pycromanager(
    image: Any,
    metadata: Mapping[str, Any],
    *,
    slide_id: str,
    seq: int,
    namer: TileNamer,
    backend: Literal["java", "python"],
    objective: str | None = None,
    pixel_size_um: float | None = None,
) -> Tile:
    """The :class:`Tile` of one pycromanager image (``image_process_fn``'s arguments).

    Raises :class:`FrameError` when the metadata has no stage position or pixel size.
    """
    x = first_number(metadata, X_KEYS)
    y = first_number(metadata, Y_KEYS)
    if x is None or y is None:
        raise FrameError(
            "image metadata has no stage position (XPosition_um_Intended/YPosition_um_Intended): give every "
            "acquisition event 'x' and 'y' (or an XY stage position list)"
        )
    z = first_number(metadata, Z_KEYS) or 0.0
    px = first_number(metadata, PIXEL_SIZE_KEYS) or pixel_size_um
    if not px or px <= 0:
        raise FrameError(
            "image metadata has no pixel size (PixelSize_um is 0: calibrate a pixel-size configuration in "
            "Micro-Manager, or pass pixel_size_um=...)"
        )
    pixels = as_pixels(image)
    if backend == "java" and pixels.ndim == 3 and str(metadata.get("PixelType", "")).startswith("RGB"):
        pixels = pixels[:, :, 2::-1] if pixels.shape[2] == 4 else pixels[:, :, ::-1]  # BGR(A) -> RGB
    obj = objective
    if obj is None:
        obj = next((str(metadata[k]) for k in OBJECTIVE_KEYS if k in metadata), "")
    axes = _axes(metadata)
    tile_id, kind, extra = namer(axes)
    extra = dict(extra)
    if "objective" in extra:  # the namer knows which objective this event used
        obj = str(extra.pop("objective")) if objective is None else obj
    md: dict[str, Any] = {"source": f"pycromanager-{backend}", "axes": axes}
    for key in ("PositionName", "Channel", "Exposure", "ElapsedTime-ms", "ImageNumber", "Camera"):
        if key in metadata:
            md[key] = metadata[key]
    md.update(extra)
    return make_tile(
        pixels,
        slide_id=slide_id,
        tile_id=tile_id,
        seq=seq,
        x_um=x,
        y_um=y,
        z_um=z,
        pixel_size_um=float(px),
        objective=obj,
        kind=kind,
        metadata=json.loads(json.dumps(md, default=str)),
    )


class PycromanagerListener(TileRelay):
    """pycromanager's ``image_process_fn`` (and ``image_saved_fn``) streaming tiles to ``sink``.

    Parameters
    ----------
    sink:
        The pipeline's ``TileSource`` (``send(tile)``) or any callable taking a :class:`Tile`.
    slide_id:
        The slide every tile belongs to.
    backend:
        ``auto`` asks mmpycorex at the first image which backend runs; ``java`` / ``python`` force it.
    objective, pixel_size_um:
        Used when the image metadata does not tell (objective: ``Objective-Label`` and similar tags).
    namer:
        ``namer(axes) -> (tile_id, kind, extra_metadata)``; default :func:`default_namer` with a
        random prefix per listener, so two acquisitions of one slide never collide.
    asynchronous:
        Convert and send on the listener's thread (default) instead of pycromanager's.
    on_tile:
        Called with every tile after it was sent (on the sending thread); exceptions are logged.
    """

    def __init__(
        self,
        sink: SinkLike,
        *,
        slide_id: str,
        backend: Backend = "auto",
        objective: str | None = None,
        pixel_size_um: float | None = None,
        namer: TileNamer | None = None,
        asynchronous: bool = True,
        max_queue_bytes: int = 1 << 30,
        on_tile: Callable[[Tile], Any] | None = None,
        owns_sink: bool = False,
        on_image: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(
            sink, slide_id=slide_id, max_queue_bytes=max_queue_bytes, on_tile=on_tile, label="pycromanager listener"
        )
        self.backend = backend
        self.objective = objective
        self.pixel_size_um = pixel_size_um
        self.namer = namer or default_namer(f"a{uuid.uuid4().hex[:6]}")
        self.owns_sink = owns_sink  # close() closes the sink too (it was made for this listener)
        self.on_image = on_image  # called at once, on pycromanager's thread, with each image's metadata
        self.images = 0  # images pycromanager handed over
        self._resolved: Literal["java", "python"] | None = None if backend == "auto" else backend
        self._seq = 0
        self._lock = threading.Lock()
        self._asynchronous = asynchronous

    # ------------------------------------------------------------------ pycromanager hooks
    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """``image_process_fn(image, metadata)``: stream the image, return it unchanged."""
        try:
            self._take(image, metadata)
        except Exception as exc:  # an exception here would abort or hang pycromanager's acquisition
            self.stats.error(f"pycromanager listener: image not streamed: {type(exc).__name__}: {exc}")
        return image, metadata

    def _note(self, metadata: dict[str, Any]) -> None:
        self.images += 1
        if self.on_image is not None:
            try:
                self.on_image(metadata)
            except Exception:
                log.exception("pycromanager listener: on_image callback failed")

    def image_saved_fn(self, axes: dict[str, Any], dataset: Any) -> None:
        """``image_saved_fn(axes, dataset)``: read the image Java just saved and stream it.

        The fast path on the Java backend: pixels come from the dataset on disk instead of over the
        bridge. Pass ``image_saved_fn=listener.image_saved_fn`` to ``Acquisition``.
        """
        try:
            image = dataset.read_image(**axes)
            metadata = dict(dataset.read_metadata(**axes))
            metadata.setdefault("Axes", dict(axes))
            self._take(np.asarray(image), metadata)
        except Exception as exc:
            self.stats.error(f"pycromanager listener: saved image {axes} not streamed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ lifecycle (flush: TileRelay)
    def close(self, timeout: float = 60.0) -> bool:
        """Send what is queued (up to ``timeout``) and stop the sending thread; True if all was sent."""
        done = super().close(timeout)
        close_sink = getattr(self.sink, "close", None)
        if self.owns_sink and callable(close_sink):
            close_sink()
        return done

    # ------------------------------------------------------------------ internals
    def _take(self, image: np.ndarray, metadata: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("listener is closed")
        self._note(metadata)
        if self._resolved is None:
            self._resolved = detect_backend()
            log.info("pycromanager listener: %s backend", self._resolved)
        if not self._asynchronous:
            self._process(image, metadata)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._start_relay("scope-stream-pycro-send")
        self._enqueue(image, dict(metadata))

    def _process(self, image: np.ndarray, metadata: dict[str, Any]) -> None:
        with self._lock:
            seq = self._seq
            self._seq += 1
        try:
            tile = tile_from_pycromanager(
                image,
                metadata,
                slide_id=self.slide_id,
                seq=seq,
                namer=self.namer,
                backend=self._resolved or "java",
                objective=self.objective,
                pixel_size_um=self.pixel_size_um,
            )
        except Exception as exc:
            self.stats.error(f"pycromanager listener: image {metadata.get('Axes')} skipped: {exc}")
            return
        self._send(tile)


def stream_to_scope_stream(
    target: str | SinkLike,
    *,
    slide_id: str,
    keys_dir: str | None = None,
    **kwargs: Any,
) -> PycromanagerListener:
    """An ``image_process_fn`` that streams every image of a pycromanager acquisition into scope-stream.

    ``target`` is the pipeline's frontend endpoint (``tcp://host:port``, printed by ``scope-stream
    run``) -- a ``TileSource`` is made for it -- or an existing sink. Keyword arguments go to
    :class:`PycromanagerListener` (``backend``, ``objective``, ``pixel_size_um``...). Call
    ``listener.close()`` (or use it as a context manager) after the acquisition to send the last tiles.
    """
    if isinstance(target, str):
        from scope_stream.transport import TileSource

        from .tiles import ThreadedSink

        endpoint = target
        sink = ThreadedSink(lambda: TileSource(endpoint, keys_dir=keys_dir), name="scope-stream-pycro-sink")
        return PycromanagerListener(sink, slide_id=slide_id, owns_sink=True, **kwargs)
    return PycromanagerListener(target, slide_id=slide_id, **kwargs)
