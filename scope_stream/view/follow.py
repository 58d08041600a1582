"""Follow a slide store while the sink writes it: read only what was committed since the last look.

The store (docs/store.md) is the source of truth; events only say "look now". A follower keeps
the committed row counts it has already read and, at each :meth:`StoreFollower.poll`, reads the
new rows of ``tables/tiles``, ``tables/cells`` and ``tables/reviews`` (plus the new crops), so
following a scan of thousands of tiles costs the same per tile at the end as at the start, and a
dropped event (PUB drops when a subscriber is slow) loses nothing.

It reads with plain zarr, as any reader of the documented layout can, and never writes: reviews
are written through :class:`ReviewWriter` (``SlideStore.set_review``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .cells import CellRecord

__all__ = [
    "FORMAT",
    "AsyncReviewWriter",
    "ReviewWriter",
    "StoreDelta",
    "StoreFollower",
    "StoreReadError",
    "TileRow",
    "is_slide_store",
]

log = logging.getLogger(__name__)

FORMAT = "scope-stream-slide"

_TILE_COLS = (
    "tile_id",
    "kind",
    "path",
    "seq",
    "x_um",
    "y_um",
    "z_um",
    "pixel_size_um",
    "height",
    "width",
    "status",
    "error",
    "n_cells",
    "n_flagged",
    "cell_start",
    "cell_stop",
)
_CELL_COLS = (
    "cell_id",
    "tile_id",
    "kind",
    "bbox",
    "x_um",
    "y_um",
    "label",
    "probabilities",
    "uncertainty",
    "margin",
    "anomaly_score",
    "model_id",
    "flagged",
    "flag_reasons",
    "flag_score",
    "crop_index",
    "duplicate_of",  # overlap copies (docs/store.md): absent in stores written before them
    "replaces",
)
_REVIEW_COLS = ("cell_id", "label", "reviewer", "seconds", "at")


class StoreReadError(RuntimeError):
    """The path is not a readable scope-stream slide store (the message says why)."""


def is_slide_store(path: str | Path) -> bool:
    """Whether ``path`` is a scope-stream slide store (zarr v3 group with the format attribute)."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return False
    try:
        grp = zarr.open_group(str(p), mode="r", zarr_format=3)
    except Exception:
        return False
    info = grp.attrs.get("scope_stream")
    return isinstance(info, dict) and info.get("format") == FORMAT


@dataclass(frozen=True)
class TileRow:
    """One committed tile: where it is and where its pixels are."""

    tile_id: str
    kind: str
    path: str
    seq: int
    x_um: float
    y_um: float
    z_um: float
    pixel_size_um: float
    height: int
    width: int
    status: str
    error: str
    n_cells: int
    n_flagged: int

    @property
    def width_um(self) -> float:
        return self.width * self.pixel_size_um

    @property
    def height_um(self) -> float:
        return self.height * self.pixel_size_um


@dataclass
class StoreDelta:
    """What a :meth:`StoreFollower.poll` found that was not there at the previous poll."""

    tiles: list[TileRow] = field(default_factory=list)
    cells: list[CellRecord] = field(default_factory=list)
    crops: dict[int, np.ndarray] = field(default_factory=dict)  # crop_index -> (S, S, 3) uint8
    reviews: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # cell_id -> (label, reviewer, s)
    #: cells shown before that turned out to be copies of a better-centred row committed since (overlapping tiles)
    retracted: list[str] = field(default_factory=list)
    status: str = ""
    status_changed: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.tiles or self.cells or self.reviews or self.retracted or self.status_changed)


def _str(v: Any) -> str:
    return "" if v is None else str(v)


class StoreFollower:
    """Incremental reader of one slide store (thread-safe: one poll at a time).

    ``crops`` selects which crops are read with the cells: ``"flagged"`` (the table and review
    gallery need them), ``"all"`` (every classified cell) or ``"none"``.
    """

    def __init__(self, path: str | Path, *, crops: str = "flagged") -> None:
        if crops not in ("flagged", "all", "none"):
            raise ValueError(f"crops must be 'flagged', 'all' or 'none', got {crops!r}")
        self.path = Path(path)
        self.crops_mode = crops
        self.n_tiles = 0
        self.n_cells = 0
        self.n_reviews = 0
        self.status = ""
        self.slide_id = ""
        self.metadata: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self._tiles: dict[str, TileRow] = {}
        #: seconds spent reviewing each cell, summed over all its review rows (a cell may be reviewed twice)
        self.review_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def _open(self) -> Any:
        """The root group, opened afresh (array shapes change as the writer grows them)."""
        if not (self.path / "zarr.json").is_file():
            raise StoreReadError(f"no slide store at {self.path} (no zarr.json)")
        try:
            root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreReadError(f"cannot open {self.path} as a zarr v3 group: {exc}") from exc
        info = root.attrs.get("scope_stream")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise StoreReadError(f"{self.path} is not a scope-stream slide store (no scope_stream.format attribute)")
        return root

    @staticmethod
    def _columns(group: Any, names: tuple[str, ...], start: int, stop: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name not in group:
                continue
            data = np.asarray(group[name][start:stop])
            out[name] = data
        return out

    def tile(self, tile_id: str) -> TileRow | None:
        return self._tiles.get(tile_id)

    @property
    def tiles(self) -> list[TileRow]:
        return list(self._tiles.values())

    def poll(self) -> StoreDelta:
        """Read everything committed since the previous poll."""
        with self._lock:
            return self._poll()

    def _poll(self) -> StoreDelta:
        root = self._open()
        info = dict(root.attrs.get("scope_stream", {}))
        delta = StoreDelta()
        self.slide_id = _str(info.get("slide_id"))
        status = _str(info.get("status"))
        if status != self.status:
            delta.status_changed = True
            self.status = status
        delta.status = status
        self.metadata = dict(info.get("metadata") or {})
        self.summary = dict(info.get("summary") or {})
        delta.metadata, delta.summary = self.metadata, self.summary
        if "tables" not in root:
            return delta
        tables: Any = root["tables"]
        counts = dict(tables.attrs.get("scope_stream", {}))
        n_tiles, n_cells = int(counts.get("n_tiles", 0)), int(counts.get("n_cells", 0))
        if n_tiles > self.n_tiles and "tiles" in tables:
            cols = self._columns(tables["tiles"], _TILE_COLS, self.n_tiles, n_tiles)
            for i in range(n_tiles - self.n_tiles):
                row = TileRow(
                    tile_id=_str(cols["tile_id"][i]),
                    kind=_str(cols["kind"][i]) or "scan",
                    path=_str(cols["path"][i]),
                    seq=int(cols["seq"][i]),
                    x_um=float(cols["x_um"][i]),
                    y_um=float(cols["y_um"][i]),
                    z_um=float(cols["z_um"][i]),
                    pixel_size_um=float(cols["pixel_size_um"][i]),
                    height=int(cols["height"][i]),
                    width=int(cols["width"][i]),
                    status=_str(cols["status"][i]),
                    error=_str(cols["error"][i]),
                    n_cells=int(cols["n_cells"][i]),
                    n_flagged=int(cols["n_flagged"][i]),
                )
                self._tiles[row.tile_id] = row
                delta.tiles.append(row)
            self.n_tiles = n_tiles
        if n_cells > self.n_cells and "cells" in tables:
            cols = self._columns(tables["cells"], _CELL_COLS, self.n_cells, n_cells)
            want: list[int] = []
            for i in range(n_cells - self.n_cells):
                if "duplicate_of" in cols and _str(cols["duplicate_of"][i]):
                    continue  # a second copy of a cell already shown: one row per physical cell
                if "replaces" in cols and _str(cols["replaces"][i]):
                    delta.retracted.append(_str(cols["replaces"][i]))
                row_d: dict[str, Any] = {k: v[i] for k, v in cols.items() if k not in ("duplicate_of", "replaces")}
                t = self._tiles.get(_str(row_d.get("tile_id")))
                if t is not None:
                    row_d.update(
                        tile_x_um=t.x_um,
                        tile_y_um=t.y_um,
                        tile_height=t.height,
                        tile_width=t.width,
                        pixel_size_um=t.pixel_size_um,
                    )
                rec = CellRecord.from_store_row(row_d, tile_kind=t.kind if t else "scan")
                if not rec.slide_id:
                    rec = replace(rec, slide_id=self.slide_id)
                delta.cells.append(rec)
                if rec.crop_index >= 0 and (self.crops_mode == "all" or (self.crops_mode == "flagged" and rec.flagged)):
                    want.append(rec.crop_index)
            if want and "crops" in root:
                delta.crops = self._read_crops(root, want)
            self.n_cells = n_cells
        if "reviews" in tables:
            rg: Any = tables["reviews"]
            n_rev = int(dict(rg.attrs.get("scope_stream", {})).get("n_reviews", 0))
            if n_rev > self.n_reviews:
                cols = self._columns(rg, _REVIEW_COLS, self.n_reviews, n_rev)
                for i in range(n_rev - self.n_reviews):
                    secs = float(cols["seconds"][i]) if "seconds" in cols else math.nan
                    cid = _str(cols["cell_id"][i])
                    if math.isfinite(secs):
                        self.review_seconds[cid] = self.review_seconds.get(cid, 0.0) + secs
                    delta.reviews[cid] = (
                        _str(cols["label"][i]),
                        _str(cols["reviewer"][i]) if "reviewer" in cols else "",
                        secs,
                    )
                self.n_reviews = n_rev
        return delta

    @staticmethod
    def _read_crops(root: Any, indices: list[int]) -> dict[int, np.ndarray]:
        arr: Any = root["crops"]
        lo, hi = min(indices), max(indices) + 1
        hi = min(hi, int(arr.shape[0]))
        if hi <= lo:
            return {}
        block = np.asarray(arr[lo:hi])
        return {i: block[i - lo] for i in indices if lo <= i < hi}

    def read_crops(self, indices: list[int]) -> dict[int, np.ndarray]:
        """Crops by index (e.g. for cells whose crops were not read with them)."""
        if not indices:
            return {}
        return self._read_crops(self._open(), indices)

    def read_pixels(self, tile: TileRow | str) -> np.ndarray:
        """A committed tile's pixels as ``(H, W)`` or ``(H, W, C)``."""
        row = self._tiles.get(tile) if isinstance(tile, str) else tile
        if row is None:
            raise StoreReadError(f"tile {tile!r} is not (yet) in {self.path}")
        if not row.path:
            raise StoreReadError(f"tile {row.tile_id!r} was stored without its pixels")
        root = self._open()
        try:
            data = np.asarray(root[f"{row.path}/0"][...])
        except KeyError as exc:
            raise StoreReadError(f"tile {row.tile_id!r}: no pixels at {row.path}/0 in {self.path}") from exc
        return data if data.ndim == 2 else np.moveaxis(data, 0, -1)

    def mosaic(self) -> tuple[np.ndarray, float, tuple[float, float]] | None:
        """The store's own mosaic overview: ``(array (Y, X[, C]), µm per pixel, (y, x) of pixel (0,0) centre)``."""
        root = self._open()
        if "mosaic" not in root or "ome" not in root.attrs:
            return None
        try:
            ome: Mapping[str, Any] = root.attrs["ome"]
            ds = ome["multiscales"][0]["datasets"][0]
            tfs = {t["type"]: t for t in ds["coordinateTransformations"]}
            scale = float(tfs["scale"]["scale"][-1])
            ty, tx = (float(v) for v in tfs["translation"]["translation"][-2:])
            data = np.asarray(root[ds["path"]][...])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            log.warning("%s: unreadable mosaic metadata: %s", self.path, exc)
            return None
        if data.ndim == 3:
            data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
        return data, scale, (ty, tx)


class ReviewWriter:
    """Writes reviewer labels into a store with ``SlideStore.set_review`` (append-only, never the model's call).

    The store is opened read-write lazily and refreshed before each write, so cells committed by
    the sink after it was opened are found. Thread-safe.
    """

    def __init__(self, path: str | Path, reviewer: str = "") -> None:
        self.path = Path(path)
        self.reviewer = reviewer
        self._store: Any = None
        self._lock = threading.Lock()

    def write(self, cell_id: str, label: str, seconds: float) -> None:
        from scope_stream.store import SlideStore

        with self._lock:
            if self._store is None:
                self._store = SlideStore.open(self.path, mode="r+")
            else:
                self._store.refresh()
            self._store.set_review(cell_id, label, self.reviewer, float(seconds) if math.isfinite(seconds) else 0.0)


class AsyncReviewWriter:
    """Writes reviews off the GUI thread, in order; outcomes are collected for the GUI to show.

    A key press must never wait for the disk: :meth:`submit` returns at once, a single background
    thread calls :class:`ReviewWriter`, and :meth:`outcomes` hands back ``(cell_id, label, error)``
    per finished write (``error`` is ``""`` on success). Failed writes are kept in :attr:`failed`
    for :meth:`retry`; nothing the reviewer decided is dropped.
    """

    def __init__(self, path: str | Path, reviewer: str = "") -> None:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self.writer = ReviewWriter(path, reviewer)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scope-stream-review")
        self._outcomes: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self.failed: list[tuple[str, str, float]] = []
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def reviewer(self) -> str:
        return self.writer.reviewer

    @reviewer.setter
    def reviewer(self, name: str) -> None:
        self.writer.reviewer = name

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, cell_id: str, label: str, seconds: float) -> None:
        with self._lock:
            self._pending += 1
        self._pool.submit(self._write, cell_id, label, seconds)

    def _write(self, cell_id: str, label: str, seconds: float) -> None:
        err = ""
        try:
            self.writer.write(cell_id, label, seconds)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            log.warning("review of %s not saved: %s", cell_id, err)
            with self._lock:
                self.failed.append((cell_id, label, seconds))
        with self._lock:
            self._pending -= 1
        self._outcomes.put((cell_id, label, err))

    def outcomes(self) -> list[tuple[str, str, str]]:
        out = []
        while True:
            try:
                out.append(self._outcomes.get_nowait())
            except Exception:
                return out

    def retry(self) -> int:
        """Submit the failed writes again; returns how many."""
        with self._lock:
            todo, self.failed = self.failed, []
        for cell_id, label, seconds in todo:
            self.submit(cell_id, label, seconds)
        return len(todo)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted write finished (True) or ``timeout`` passed."""
        import time as _time

        deadline = _time.monotonic() + timeout
        while self._pending and _time.monotonic() < deadline:
            _time.sleep(0.01)
        return self._pending == 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
