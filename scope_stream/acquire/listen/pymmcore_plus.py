"""Stream any pymmcore-plus MDA into scope-stream: ``mda.events.frameReady`` -> tiles -> the pipeline.

Two ways to use :class:`PymmcorePlusListener`:

* **attached to a core** (napari-micromanager / pymmcore-widgets users, any ``CMMCorePlus``)::

      listener = PymmcorePlusListener(source, slide_id="slide-42").connect(core)
      core.run_mda(sequence)            # build and run sequences as usual; every frame is streamed
      ...
      listener.close()                  # waits until every frame has been sent

  On the acquisition thread the listener only notes the frame (and the objective in use) in a
  queue; conversion and sending happen on the listener's own relay thread, so processing and
  pipeline backpressure never stall the scan.

* **as a pymmcore-plus data handler** (e.g. ``mda_listeners_connected(listener, mda_events=...)``,
  or ``core.mda.run(events, output=listener)``): pymmcore-plus's relay thread then calls
  :meth:`frameReady`, which converts and sends at once (that relay already keeps it off the
  acquisition thread).

Stage positions come from the MDA event's ``x_pos``/``y_pos``/``z_pos`` (hardware-sequenced frames
carry no ``position`` metadata), then the frame metadata's ``position``, then the stage position
read when the frame arrived. A Tile's (x_um, y_um) is the stage position of the frame centre.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from .relay import TileRelay
from .tiles import FrameError, SinkLike, as_pixels, make_tile

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus
    from useq import MDAEvent, MDASequence

    from scope_stream.vocabulary import Tile

__all__ = ["SCOPE_STREAM_KEY", "PymmcorePlusListener"]

log = logging.getLogger(__name__)

#: Key of ``MDAEvent.metadata`` where scope-stream puts what the tile should be called
#: (``{"tile_id": ..., "kind": "scan"|"reimage", "objective": ..., "request_id": ...}``).
SCOPE_STREAM_KEY = "scope_stream"


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def current_objective(core: Any, group: str = "Objective") -> str:
    """The objective in use: the current preset of config group ``group``, else the label of the
    objective turret, else the pixel-size configuration's name ("" when none is known)."""
    try:
        if core.isGroupDefined(group):
            name = str(core.getCurrentConfig(group))
            if name:
                return name
    except Exception:  # a core without config groups
        pass
    try:
        for dev in core.guessObjectiveDevices():
            return str(core.getProperty(dev, "Label"))
    except Exception:  # no objective device
        pass
    try:
        return str(core.getCurrentPixelSizeConfig())
    except Exception:
        return ""


class PymmcorePlusListener(TileRelay):
    """Turn pymmcore-plus frames into tiles and send them to ``sink`` (a ``TileSource`` or callable).

    Parameters
    ----------
    sink:
        Where tiles go: ``TileSource`` (``send(tile)``) or any callable taking a :class:`Tile`.
    slide_id:
        The slide every tile belongs to.
    objective:
        Objective name for tiles whose event does not name one; ``None`` with :meth:`connect`: read
        the core's current pixel-size configuration name when the frame arrives.
    max_queue_bytes:
        Frames held between the acquisition thread and the relay thread (attached mode). When full,
        the acquisition thread waits (a scan slowed down, never a frame lost).
    on_tile:
        Called with each tile after it was sent (on the relay thread); exceptions are logged.
    """

    def __init__(
        self,
        sink: SinkLike,
        *,
        slide_id: str,
        objective: str | None = None,
        max_queue_bytes: int = 1 << 30,
        on_tile: Any = None,
    ) -> None:
        super().__init__(
            sink, slide_id=slide_id, max_queue_bytes=max_queue_bytes, on_tile=on_tile, label="mda listener"
        )
        self.objective = objective
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._run_tag = uuid.uuid4().hex[:6]
        self._core: CMMCorePlus | None = None
        self._sequences = 0

    # ------------------------------------------------------------------ attached mode
    def connect(self, core: CMMCorePlus) -> PymmcorePlusListener:
        """Follow every MDA run on ``core`` until :meth:`close` (or :meth:`disconnect`)."""
        if self._core is not None:
            raise RuntimeError("this listener is already connected to a core")
        self._core = core
        self._stop.clear()
        self._start_relay("scope-stream-mda-relay")
        events = core.mda.events
        events.sequenceStarted.connect(self._on_sequence_started)
        events.frameReady.connect(self._on_frame)
        return self

    def disconnect(self) -> None:
        """Stop following the core (frames already queued are still sent by :meth:`close`)."""
        core, self._core = self._core, None
        if core is None:
            return
        events = core.mda.events
        for sig, slot in ((events.sequenceStarted, self._on_sequence_started), (events.frameReady, self._on_frame)):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):  # already gone
                sig.disconnect(slot)

    def close(self, timeout: float = 60.0) -> bool:
        """Disconnect, send what is queued (up to ``timeout``), stop the relay; True if all was sent."""
        self.disconnect()
        return super().close(timeout)

    def _on_sequence_started(self, sequence: MDASequence, *_: Any) -> None:
        self._sequences += 1
        self._run_tag = str(getattr(sequence, "uid", "") or uuid.uuid4().hex)[:6]

    def _on_frame(self, img: np.ndarray, event: MDAEvent, meta: dict[str, Any] | None = None) -> None:
        """Acquisition thread: note the frame and what only the core knows now; never raise."""
        try:
            extra: dict[str, Any] = {}
            core = self._core
            if core is not None:
                if self.objective is None:
                    extra["objective"] = current_objective(core)
                if event.x_pos is None or event.y_pos is None:
                    pos = (meta or {}).get("position") or {}
                    if "x" not in pos or "y" not in pos:
                        with contextlib.suppress(Exception):
                            extra["xy"] = tuple(core.getXYPosition())
            self._enqueue(img, event, meta, extra, self._run_tag)
        except Exception as exc:  # never break the acquisition thread
            self.stats.error(f"mda listener: could not queue a frame: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ data-handler mode
    def sequenceStarted(self, sequence: MDASequence, *args: Any) -> None:
        self._on_sequence_started(sequence)

    def frameReady(self, img: np.ndarray, event: MDAEvent, meta: dict[str, Any] | None = None) -> None:
        """Convert and send one frame now (called on pymmcore-plus's relay thread); never raises."""
        self._process(img, event, meta, {}, self._run_tag)

    def sequenceFinished(self, sequence: MDASequence, *args: Any) -> None:
        pass

    # ------------------------------------------------------------------ conversion
    def tile_from_frame(
        self, img: np.ndarray, event: MDAEvent, meta: dict[str, Any] | None, extra: dict[str, Any], tag: str
    ) -> Tile:
        """The :class:`Tile` of one frame (raises :class:`FrameError` when it cannot be one)."""
        meta = dict(meta or {})
        ss = dict((event.metadata or {}).get(SCOPE_STREAM_KEY, {}) or {})
        pos = meta.get("position") or {}
        x = event.x_pos if event.x_pos is not None else pos.get("x")
        y = event.y_pos if event.y_pos is not None else pos.get("y")
        if (x is None or y is None) and "xy" in extra:
            x, y = extra["xy"]
        if x is None or y is None:
            raise FrameError(
                f"frame {dict(event.index)} has no stage position (no x_pos/y_pos on the event, no position "
                "metadata, no core to ask); give the MDA stage positions or connect() the listener to the core"
            )
        z = event.z_pos if event.z_pos is not None else pos.get("z", 0.0)
        pixel_size = meta.get("pixel_size_um")
        if not pixel_size:
            raise FrameError(f"frame {dict(event.index)} has no pixel size (calibrate a pixel-size configuration)")
        objective = str(ss.get("objective") or self.objective or extra.get("objective") or "")
        index = dict(event.index)
        tile_id = str(ss.get("tile_id") or f"m{tag}-" + "-".join(f"{k}{v}" for k, v in sorted(index.items())))
        with self._seq_lock:
            seq = self._seq
            self._seq += 1
        md: dict[str, Any] = {
            "source": "pymmcore-plus",
            "index": index,
            "exposure_ms": meta.get("exposure_ms"),
            "runner_time_ms": meta.get("runner_time_ms"),
            "camera": meta.get("camera_device"),
        }
        if event.channel is not None:
            md["channel"] = event.channel.config
        for key in ("request_id", "reason", "z_offset_um", "flag_cell_id", "origin", "reimage_number"):
            if key in ss:
                md[key] = ss[key]
        return make_tile(
            as_pixels(img),
            slide_id=self.slide_id,
            tile_id=tile_id,
            seq=seq,
            x_um=float(x),
            y_um=float(y),
            z_um=float(z or 0.0),
            pixel_size_um=float(pixel_size),
            objective=objective,
            kind=str(ss.get("kind", "scan")),
            metadata=_jsonable(md),
        )

    def _process(
        self, img: np.ndarray, event: MDAEvent, meta: dict[str, Any] | None, extra: dict[str, Any], tag: str
    ) -> None:
        try:
            tile = self.tile_from_frame(img, event, meta, extra, tag)
        except Exception as exc:
            self.stats.error(f"mda listener: frame {getattr(event, 'index', '?')} skipped: {exc}")
            return
        self._send(tile)
