"""Replay: stream tiles from a folder or from the store of an earlier scan, at a chosen rate.

Two kinds of input:

* a **folder of tiles with positions**: image files (PNG, JPEG, TIFF) plus ``tiles.csv`` with the
  columns ``file,x_um,y_um`` and optionally ``z_um,pixel_size_um,objective,kind,tile_id``
  (``pixel_size_um`` may instead be given once for all). ``(x_um, y_um)`` is the stage position of
  the tile **centre**. :func:`write_replay_folder` writes one from tiles.
* a **slide store** (``<slide>.zarr``, ``docs/store.md``) written by an earlier scan: its tiles with
  their recorded positions, pixel sizes, objectives and kinds, in acquisition order.

>>> source = ReplaySource("runs/old-scan.zarr", slide_id="replay-1")     # doctest: +SKIP
>>> source.run(pipeline.source(), rate_tiles_per_s=5)                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scope_stream.vocabulary import Tile

from .tiles import FrameError, SendStats, SinkLike, as_pixels, deliver, make_tile

__all__ = ["ReplayError", "ReplaySource", "write_replay_folder"]

log = logging.getLogger(__name__)

CSV_NAME = "tiles.csv"
_COLUMNS = ("file", "x_um", "y_um", "z_um", "pixel_size_um", "objective", "kind", "tile_id")


class ReplayError(ValueError):
    """A replay input that cannot be read (missing files, bad CSV rows...); the message says where."""


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "RGB", "I;16", "I;16B", "RGBA"):
            return np.asarray(im.convert("RGB"))
        return np.asarray(im)


def _write_image(path: Path, pixels: np.ndarray) -> None:
    if pixels.dtype == np.uint8 and path.suffix.lower() == ".png":
        from PIL import Image

        Image.fromarray(pixels).save(path)
    else:
        import tifffile

        tifffile.imwrite(path, pixels)


def write_replay_folder(tiles: Iterable[Tile], folder: Path | str) -> Path:
    """Write tiles as a replay folder (PNG for uint8, TIFF otherwise, plus ``tiles.csv``); returns it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in tiles:
        ext = ".png" if t.pixels.dtype == np.uint8 else ".tif"
        name = f"{t.tile_id}{ext}"
        _write_image(out / name, np.ascontiguousarray(t.pixels))
        rows.append([name, t.x_um, t.y_um, t.z_um, t.pixel_size_um, t.objective, t.kind, t.tile_id])
    with (out / CSV_NAME).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(_COLUMNS)
        w.writerows(rows)
    return out


class ReplaySource:
    """Tiles from a replay folder or a slide store, re-labelled for ``slide_id``.

    Parameters
    ----------
    path:
        A folder with ``tiles.csv`` or a ``*.zarr`` slide store.
    slide_id:
        The slide id the replayed tiles get (default: the store's slide, or the folder's name).
    pixel_size_um:
        For folders whose ``tiles.csv`` has no ``pixel_size_um`` column.
    kinds:
        Which tiles of a store to replay (default survey tiles only: a replay is a new scan, and its
        re-images come from the new run).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        slide_id: str | None = None,
        pixel_size_um: float | None = None,
        kinds: tuple[str, ...] = ("scan",),
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ReplayError(f"replay input {self.path} does not exist")
        self.kinds = kinds
        self.pixel_size_um = pixel_size_um
        self.is_store = (self.path / "zarr.json").is_file()
        if not self.is_store and not (self.path / CSV_NAME).is_file():
            raise ReplayError(
                f"{self.path} is neither a slide store (<slide>.zarr with zarr.json) "
                f"nor a replay folder with {CSV_NAME}"
            )
        self._rows: list[dict[str, str]] | None = None
        self._store: Any = None
        if self.is_store:
            self._store = self._open_store()
            default_slide = str(getattr(self._store, "slide_id", "") or self.path.stem)
        else:
            self._rows = self._read_csv()
            default_slide = self.path.name
        self.slide_id = slide_id or default_slide
        self.stats = SendStats()

    # ------------------------------------------------------------------ inputs
    def _read_csv(self) -> list[dict[str, str]]:
        path = self.path / CSV_NAME
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            missing = {"file", "x_um", "y_um"} - cols
            if missing:
                raise ReplayError(f"{path}: missing columns {sorted(missing)} (need file, x_um, y_um)")
            unknown = cols - set(_COLUMNS)
            if unknown:
                raise ReplayError(f"{path}: unknown columns {sorted(unknown)}; known: {list(_COLUMNS)}")
            if "pixel_size_um" not in cols and self.pixel_size_um is None:
                raise ReplayError(f"{path}: no pixel_size_um column; pass pixel_size_um for the whole folder")
            rows = list(reader)
        if not rows:
            raise ReplayError(f"{path}: no tiles listed")
        for i, row in enumerate(rows, start=2):
            if not (self.path / row["file"]).is_file():
                raise ReplayError(f"{path} line {i}: image {row['file']!r} not found in {self.path}")
            for col in ("x_um", "y_um", "z_um", "pixel_size_um"):
                if row.get(col) not in (None, ""):
                    try:
                        value = float(row[col])
                    except ValueError:
                        raise ReplayError(f"{path} line {i}: {col}={row[col]!r} is not a number") from None
                    if not math.isfinite(value):
                        raise ReplayError(f"{path} line {i}: {col}={row[col]!r} is not finite")
        return rows

    def _open_store(self) -> Any:
        from scope_stream.store import SlideStore, StoreError

        try:
            return SlideStore.open(self.path, mode="r")
        except StoreError as exc:
            raise ReplayError(str(exc)) from exc

    def __len__(self) -> int:
        if self._rows is not None:
            return len(self._rows)
        return len(self._store_ids())

    def _store_ids(self) -> list[str]:
        rows = self._store.tile_positions(kind=None)
        # failed tiles may have no pixels (store.save_tiles false, or none stored): nothing to replay
        rows = [r for r in rows if str(r["kind"]) in self.kinds and r.get("path")]
        rows.sort(key=lambda r: (int(r.get("seq", 0)), str(r.get("tile_id"))))
        return [str(r["tile_id"]) for r in rows]

    def tiles(self) -> Iterator[Tile]:
        """The tiles in order (folder: CSV order; store: acquisition order), numbered from 0."""
        if self._rows is not None:
            for seq, row in enumerate(self._rows):
                yield self._tile_from_row(seq, row)
            return
        for seq, tid in enumerate(self._store_ids()):
            t = self._store.read_tile(tid)
            md = dict(t.metadata)
            md["replayed_from"] = {"slide_id": t.slide_id, "tile_id": t.tile_id, "store": str(self.path)}
            yield make_tile(
                np.asarray(t.pixels),
                slide_id=self.slide_id,
                tile_id=t.tile_id,
                seq=seq,
                x_um=t.x_um,
                y_um=t.y_um,
                z_um=t.z_um,
                pixel_size_um=t.pixel_size_um,
                objective=t.objective,
                kind=t.kind,
                metadata=md,
            )

    def _tile_from_row(self, seq: int, row: dict[str, str]) -> Tile:
        def num(col: str, default: float | None = None) -> float | None:
            v = row.get(col)
            return float(v) if v not in (None, "") else default

        path = self.path / row["file"]
        try:
            pixels = as_pixels(_read_image(path))
        except (OSError, FrameError) as exc:
            raise ReplayError(f"{path}: {exc}") from exc
        px = num("pixel_size_um", self.pixel_size_um)
        assert px is not None
        return make_tile(
            pixels,
            slide_id=self.slide_id,
            tile_id=row.get("tile_id") or Path(row["file"]).stem,
            seq=seq,
            x_um=float(row["x_um"]),
            y_um=float(row["y_um"]),
            z_um=num("z_um", 0.0) or 0.0,
            pixel_size_um=px,
            objective=row.get("objective") or "",
            kind=row.get("kind") or "scan",
            metadata={"source": "replay", "file": row["file"]},
        )

    # ------------------------------------------------------------------ streaming
    def run(
        self,
        sink: SinkLike,
        *,
        rate_tiles_per_s: float | None = None,
        stop: threading.Event | None = None,
        on_tile: Callable[[Tile], Any] | None = None,
    ) -> int:
        """Send every tile to ``sink``, at most ``rate_tiles_per_s`` (None: as fast as the sink takes them).

        Returns how many tiles were sent. ``stop`` ends the replay early. A tile that cannot be read is
        logged, counted in :attr:`stats` and skipped.
        """
        if rate_tiles_per_s is not None and not rate_tiles_per_s > 0:
            raise ValueError(f"rate_tiles_per_s must be > 0, got {rate_tiles_per_s}")
        period = 1.0 / rate_tiles_per_s if rate_tiles_per_s else 0.0
        t0 = time.monotonic()
        sent = 0
        it = self.tiles()
        i = 0
        while True:
            if stop is not None and stop.is_set():
                break
            try:
                tile = next(it)
            except StopIteration:
                break
            except ReplayError as exc:
                self.stats.error(f"replay: {exc}")
                i += 1
                continue
            if period:
                wait = t0 + i * period - time.monotonic()
                if wait > 0:
                    if stop is not None:
                        if stop.wait(wait):
                            break
                    else:
                        time.sleep(wait)
            i += 1
            if deliver(sink, tile, self.stats, stop=stop):
                sent += 1
                if on_tile is not None:
                    on_tile(tile)
        return sent
