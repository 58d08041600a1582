"""One OME-Zarr (zarr v3) store per slide: tiles, mosaic, cell table, crops, reviews.

The layout is specified in ``docs/store.md``. In short::

    <slide>.zarr/              root attrs: "ome" (mosaic multiscales), "scope_stream" (format, metadata, status)
      mosaic/0                 (C, Y, X) downsampled overview of the survey tiles
      tiles/<kind>/<key>/0     one NGFF image per tile, one chunk
      tables/{tiles,cells,reviews}/<column>   columnar arrays; tables attrs hold the committed row counts
      crops                    (N, S, S, 3) uint8

The store is the source of truth of a scan: a writer commits tiles by bumping the row counts in the
``tables`` attributes *after* every row is written (zarr's local store replaces files atomically),
so an interrupted write leaves nothing but garbage beyond the counts, which the next append overwrites.
Writing a tile that is already committed is a no-op: :meth:`SlideStore.write_records` reports it as a
duplicate. Only the sink writes tiles and cells; a reviewer writes only ``tables/reviews``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from scope_stream.classify.domain import domain_check
from scope_stream.config.store import StoreConfig
from scope_stream.transport.validate import is_safe_id
from scope_stream.vocabulary import Tile, TileResult, VocabularyError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SlideStore",
    "StoreError",
    "StoreRefused",
    "TileRecord",
    "store_path_for",
    "tile_key",
]

log = logging.getLogger(__name__)

FORMAT = "scope-stream-slide"
FORMAT_VERSION = 1
NGFF_VERSION = "0.5"

_STR = "str"


class StoreError(RuntimeError):
    """The slide store cannot do what was asked (missing tile or cell, wrong format, read-only...)."""


class StoreRefused(StoreError):
    """A store that will never be written: the path is unsafe or holds something that is not ours.

    Nothing at the path was modified; trying again does not help (the sink does not retry these).
    """


def store_path_for(root: Path | str, slide_id: str) -> Path:
    """``<root>/<slide_id>.zarr`` for a safe ``slide_id`` (``[A-Za-z0-9._-]``, no leading ``.``, no ``..``).

    The path is derived from the validated id, never joined from arbitrary text, and checked to stay
    directly under ``root`` once resolved (a symlink pointing elsewhere is refused too).
    """
    if not is_safe_id(slide_id):
        raise StoreRefused(
            f"slide id {str(slide_id)[:80]!r} is not a safe store name ([A-Za-z0-9._-], no leading '.', no '..')"
        )
    base = Path(root).resolve()
    path = base / f"{slide_id}.zarr"
    if path.resolve().parent != base:
        raise StoreRefused(f"the store of slide {slide_id!r} would resolve outside {base}: {path.resolve()}")
    return path


def _refuse_foreign(path: Path) -> None:
    """Refuse (without touching it) a path that exists but is not a zarr v3 group we could have made."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise StoreRefused(f"{path} exists and is not a folder: not a scope-stream slide store; left untouched")
    if path.is_dir() and any(path.iterdir()):
        raise StoreRefused(
            f"{path} exists, is not empty and has no zarr.json (a zarr v2 store or other data?): "
            "not a scope-stream slide store; left untouched"
        )


# ------------------------------------------------------------------------------------ columns
TILE_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "tile_id": (_STR, ()),
    "kind": (_STR, ()),
    "path": (_STR, ()),
    "seq": ("int64", ()),
    "x_um": ("float64", ()),
    "y_um": ("float64", ()),
    "z_um": ("float64", ()),
    "pixel_size_um": ("float64", ()),
    "height": ("int32", ()),
    "width": ("int32", ()),
    "status": (_STR, ()),
    "error": (_STR, ()),
    "n_cells": ("int32", ()),
    "n_flagged": ("int32", ()),
    "cell_start": ("int64", ()),
    "cell_stop": ("int64", ()),
    "latency_ms": ("float32", ()),
    "stored_at": ("float64", ()),
    "worker": (_STR, ()),
}

CELL_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "cell_id": (_STR, ()),
    "tile_id": (_STR, ()),
    "kind": (_STR, ()),
    "bbox": ("int32", (4,)),
    "centroid_row": ("float32", ()),
    "centroid_col": ("float32", ()),
    "x_um": ("float64", ()),
    "y_um": ("float64", ()),
    "area_px": ("float32", ()),
    "label": (_STR, ()),
    "probabilities": (_STR, ()),
    "uncertainty": ("float32", ()),
    "margin": ("float32", ()),
    "anomaly_score": ("float32", ()),
    "model_id": (_STR, ()),
    "flagged": ("bool", ()),
    "flag_reasons": (_STR, ()),
    "flag_score": ("float32", ()),
    "crop_index": ("int64", ()),
    "extra": (_STR, ()),
    "edge_um": ("float32", ()),
    "duplicate_of": (_STR, ()),
    "replaces": (_STR, ()),
}
#: columns added after format version 1 first shipped: absent in older stores (read as their fill value)
OPTIONAL_CELL_COLUMNS = frozenset({"edge_um", "duplicate_of", "replaces"})

REVIEW_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "cell_id": (_STR, ()),
    "label": (_STR, ()),
    "reviewer": (_STR, ()),
    "seconds": ("float32", ()),
    "at": ("float64", ()),
}

_KEY_OK = re.compile(r"[^A-Za-z0-9._-]")


def tile_key(tile_id: str) -> str:
    """A safe group name for a tile id: unsafe characters become ``_`` (plus a short hash if any did)."""
    key = _KEY_OK.sub("_", tile_id)
    if key != tile_id or key in ("", ".", ".."):
        key = f"{key}-{hashlib.sha1(tile_id.encode('utf-8')).hexdigest()[:8]}"
    return key


def _fill(dtype: str) -> Any:
    if dtype == _STR:
        return ""
    if dtype.startswith("float"):
        return np.nan
    if dtype == "bool":
        return False
    if dtype.startswith("int"):
        return -1 if dtype == "int64" else 0
    raise ValueError(dtype)


@dataclass
class TileRecord:
    """One tile as the sink commits it: its header, optional pixels, its result or why there is none."""

    header: dict[str, Any]  # Tile.header()
    pixels: np.ndarray | None = None
    result: TileResult | None = None
    error: str = ""
    latency_ms: float = math.nan

    @classmethod
    def from_tile(cls, tile: Tile, result: TileResult | None = None, **kw: Any) -> TileRecord:
        return cls(header=tile.header(), pixels=tile.pixels, result=result, **kw)

    @property
    def tile_id(self) -> str:
        return str(self.header["tile_id"])


# -------------------------------------------------------------------------------------- table
class _Table:
    """Columnar arrays in a group, over-allocated; ``n`` valid rows are held by the caller."""

    def __init__(
        self,
        group: zarr.Group,
        columns: dict[str, tuple[str, tuple[int, ...]]],
        chunk_rows: int,
        writable: bool,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        self.group = group
        self.columns = columns
        self.arrays: dict[str, zarr.Array] = {}
        missing: list[str] = []
        for name in columns:
            if name in group:
                arr = group[name]
                assert isinstance(arr, zarr.Array)
                self.arrays[name] = arr
            else:
                missing.append(name)
        rows = min((int(a.shape[0]) for a in self.arrays.values()), default=0)
        for name in missing:
            dtype, tail = columns[name]
            if writable:  # a newer column on an older table: as long as the others, filled
                self.arrays[name] = group.create_array(
                    name,
                    shape=(rows, *tail),
                    chunks=(chunk_rows, *tail),
                    dtype=str if dtype == _STR else dtype,
                    fill_value=_fill(dtype),
                    compressors=ZstdCodec(level=3),
                )
            elif name not in optional:
                raise StoreError(f"table {group.path!r} lacks column {name!r}")

    @property
    def capacity(self) -> int:
        return min(int(a.shape[0]) for a in self.arrays.values())

    def write(self, start: int, values: dict[str, np.ndarray | list[Any]]) -> None:
        k = None
        for name in self.columns:
            v = values[name]
            k = len(v) if k is None else k
            if len(v) != k:
                raise StoreError(f"column {name!r} has {len(v)} values, expected {k}")
        if not k:
            return
        stop = start + k
        writes = []
        for name, arr in self.arrays.items():
            if arr.shape[0] < stop:
                chunk = arr.chunks[0]
                new = max(stop, 2 * arr.shape[0])
                new = int(math.ceil(new / chunk) * chunk)
                arr.resize((new, *arr.shape[1:]))
            dtype = self.columns[name][0]
            v = values[name]
            data = np.array(list(v), dtype=object) if dtype == _STR else np.asarray(v, dtype=dtype)
            writes.append((arr, data))
        # all columns in one event-loop round trip (zarr's async API), not one per column
        _gather([arr.async_array.setitem(slice(start, stop), data) for arr, data in writes])

    def read(self, n: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        wanted = list(names or self.columns)
        if n == 0:
            for name in wanted:
                dtype, tail = self.columns[name]
                shape = (0, *tail)
                out[name] = np.zeros(shape, dtype=object if dtype == _STR else dtype)
            return out
        for name in [w for w in wanted if w not in self.arrays]:  # an optional column this table lacks
            dtype, tail = self.columns[name]
            out[name] = np.full((n, *tail), _fill(dtype), dtype=object if dtype == _STR else dtype)
        wanted = [w for w in wanted if w in self.arrays]
        got = _gather([self.arrays[name].async_array.getitem(slice(0, n)) for name in wanted])
        for name, data in zip(wanted, got, strict=True):
            data = np.asarray(data)
            out[name] = data.astype(object) if self.columns[name][0] == _STR else data
        return out


def _gather(coros: list[Any]) -> list[Any]:
    """Run zarr coroutines concurrently on zarr's event loop and return their results in order."""
    from zarr.core.sync import sync

    async def _all() -> list[Any]:
        return list(await asyncio.gather(*coros))

    return sync(_all())


def _nan_to_none(x: float) -> float | None:
    return None if (x is None or not math.isfinite(float(x))) else float(x)


def _blosc(kind: str, itemsize: int = 1) -> Any:
    if kind == "lz4":  # byte shuffle helps 2- and 4-byte pixels; for uint8 it is wasted time
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle" if itemsize > 1 else "noshuffle")
    if kind == "zstd":
        return ZstdCodec(level=3)
    return None


# -------------------------------------------------------------------------------------- store
class SlideStore:
    """An OME-Zarr slide store (see ``docs/store.md``). Create with :meth:`open_or_create` or :meth:`open`."""

    def __init__(
        self,
        path: Path | str,
        *,
        mode: Literal["r", "r+", "w"] = "r+",
        slide_id: str | None = None,
        config: StoreConfig | None = None,
        scan_region_um: tuple[float, float, float, float] | None = None,
        dedup_radius_um: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config or StoreConfig()
        self.dedup_radius_um = dedup_radius_um
        self._dedup: Any = None  # StageDeduplicator of the committed scan cells, built on first write
        self.writable = mode != "r"
        self.scan_region_um = scan_region_um
        exists = (self.path / "zarr.json").is_file()
        if mode == "r" and not exists:
            raise StoreError(f"no slide store at {self.path}")
        if mode == "w" and exists:
            SlideStore._check_ours(self.path)  # overwrite only our own kind of store
        if mode == "w" or not exists:
            if not slide_id:
                raise StoreError(f"creating a slide store at {self.path} needs a slide_id")
            if not exists:
                _refuse_foreign(self.path)
            self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self.root.attrs["scope_stream"] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "slide_id": slide_id,
                "created_at": time.time(),
                "status": "scanning",
                "metadata": {},
                "summary": {},
            }
            self.root.create_group("tiles")
            tables = self.root.create_group("tables")
            tables.attrs["scope_stream"] = {"n_tiles": 0, "n_cells": 0, "n_crops": 0}
            reviews = tables.create_group("reviews")
            reviews.attrs["scope_stream"] = {"n_reviews": 0}
        else:
            try:
                self.root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+", zarr_format=3)
            except Exception as exc:  # zarr raises several kinds
                raise StoreRefused(f"cannot open slide store {self.path}: {exc}; left untouched") from exc
            info = self.root.attrs.get("scope_stream")
            if not isinstance(info, dict) or info.get("format") != FORMAT:
                raise StoreRefused(
                    f"{self.path} is not a scope-stream slide store (no scope_stream.format attribute); left untouched"
                )
            if int(info.get("version", 0)) > FORMAT_VERSION:
                raise StoreError(
                    f"{self.path} has store format version {info.get('version')}, newer than {FORMAT_VERSION}"
                )
            if slide_id and info.get("slide_id") != slide_id:
                raise StoreError(f"{self.path} holds slide {info.get('slide_id')!r}, not {slide_id!r}")
        self._open_tables()

    @staticmethod
    def _check_ours(path: Path) -> None:
        try:
            info = zarr.open_group(str(path), mode="r", zarr_format=3).attrs.get("scope_stream")
        except Exception as exc:  # zarr raises several kinds
            raise StoreRefused(f"{path} is not a readable zarr v3 group ({exc}); left untouched") from exc
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise StoreRefused(f"{path} is not a scope-stream slide store; refusing to overwrite it")

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def open_or_create(
        cls,
        path: Path | str,
        slide_id: str,
        config: StoreConfig | None = None,
        scan_region_um: tuple[float, float, float, float] | None = None,
        dedup_radius_um: float | None = None,
    ) -> SlideStore:
        """Open the store at ``path`` for writing, creating it for ``slide_id`` if it is not there.

        ``dedup_radius_um`` (the sink passes ``segment.dedup_radius_um``): cells of survey tiles within
        this distance of a cell of another survey tile are one physical cell, counted once (docs/store.md).
        """
        return cls(
            path,
            mode="r+",
            slide_id=slide_id,
            config=config,
            scan_region_um=scan_region_um,
            dedup_radius_um=dedup_radius_um,
        )

    @classmethod
    def open(cls, path: Path | str, mode: Literal["r", "r+"] = "r") -> SlideStore:
        """Open an existing store (read-only by default)."""
        return cls(path, mode=mode)

    def _open_tables(self) -> None:
        chunk = self.config.table_chunk_rows
        if "tables" not in self.root:  # a store whose creation was interrupted
            if not self.writable:
                raise StoreError(f"{self.path} has no tables group (its creation was interrupted?)")
            self.root.create_group("tables").attrs["scope_stream"] = {"n_tiles": 0, "n_cells": 0, "n_crops": 0}
        tables = _group(self.root, "tables")
        self._tables_group = tables
        for name in ("tiles", "cells"):
            if name not in tables and self.writable:
                tables.create_group(name)
        if "reviews" not in tables and self.writable:
            tables.create_group("reviews").attrs["scope_stream"] = {"n_reviews": 0}
        self._tile_table = _Table(_group(tables, "tiles"), TILE_COLUMNS, chunk, self.writable)
        self._cell_table = _Table(
            _group(tables, "cells"), CELL_COLUMNS, chunk, self.writable, optional=OPTIONAL_CELL_COLUMNS
        )
        self._review_table = _Table(_group(tables, "reviews"), REVIEW_COLUMNS, 1024, self.writable)
        self._load_counts()

    def _load_counts(self) -> None:
        counts = _attrs(self._tables_group, "scope_stream")
        self._n_tiles = int(counts.get("n_tiles", 0))
        self._n_cells = int(counts.get("n_cells", 0))
        self._n_crops = int(counts.get("n_crops", 0))
        ids = self._tile_table.read(self._n_tiles, ["tile_id"])["tile_id"]
        self._tile_rows: dict[str, int] = {str(t): i for i, t in enumerate(ids)}
        self._pending_tiles: dict[str, str] = {}  # tile_id -> path of pixels written but not committed
        self._dedup = None  # rebuilt from the committed rows on the next write
        #: after each write_records: cell_id -> the cell_id it is a duplicate of (new rows only)
        self.last_duplicates: dict[str, str] = {}
        #: after each write_records: cell_id -> the earlier cell_id it replaces as the counted copy
        self.last_replaced: dict[str, str] = {}

    def refresh(self) -> None:
        """Re-read what another process committed (readers of a live store call this; read methods do)."""
        self.root = zarr.open_group(str(self.path), mode="r" if not self.writable else "r+", zarr_format=3)
        self._open_tables()

    def _auto_refresh(self) -> None:
        if not self.writable:
            self.refresh()

    # ---------------------------------------------------------------------------- metadata
    @property
    def info(self) -> dict[str, Any]:
        return _attrs(self.root, "scope_stream")

    @property
    def slide_id(self) -> str:
        return str(self.info.get("slide_id", ""))

    @property
    def metadata(self) -> dict[str, Any]:
        """Scan metadata (whatever the acquisition passed: region, objective, operator...)."""
        return dict(self.info.get("metadata", {}))

    @property
    def status(self) -> str:
        return str(self.info.get("status", "scanning"))

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.info.get("summary", {}))

    def _set_info(self, **fields: Any) -> None:
        self._require_writable()
        info = self.info
        info.update(fields)
        self.root.attrs["scope_stream"] = info

    def set_metadata(self, **fields: Any) -> None:
        """Merge ``fields`` (JSON-able) into the scan metadata."""
        meta = self.metadata
        meta.update(fields)
        json.dumps(meta)  # fail here, clearly, on something that is not JSON
        self._set_info(metadata=meta)

    def mark_done(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the scan finished; the summary is the computed one merged with ``summary``. Returns it."""
        full = self.compute_summary()
        full.update(summary or {})
        self._set_info(status="done", summary=full, finished_at=time.time())
        return full

    def compute_summary(self) -> dict[str, Any]:
        """Counts over the committed tiles and cells: differential, flags, kinds."""
        tiles = self._tile_table.read(self._n_tiles, ["status", "kind"])
        cells = self._cell_table.read(
            self._n_cells, ["cell_id", "kind", "label", "flagged", "flag_reasons", "duplicate_of", "replaces"]
        )
        counted = self.counted_mask(cells)
        n_dup = int(np.sum(~counted))
        cells = {k: v[counted] for k, v in cells.items()}
        differential: dict[str, int] = {}
        kinds: dict[str, int] = {}
        n_wbc = 0
        for kind, label in zip(cells["kind"], cells["label"], strict=True):
            kinds[str(kind)] = kinds.get(str(kind), 0) + 1
            if kind == "WBC":
                n_wbc += 1
                if label:
                    differential[str(label)] = differential.get(str(label), 0) + 1
        classified = sum(differential.values())
        return {
            "n_tiles": int(self._n_tiles),
            "n_scan_tiles": int(np.sum(tiles["kind"] == "scan")) if self._n_tiles else 0,
            "n_reimage_tiles": int(np.sum(tiles["kind"] == "reimage")) if self._n_tiles else 0,
            "n_failed_tiles": int(np.sum(tiles["status"] == "failed")) if self._n_tiles else 0,
            "n_cells": int(self._n_cells) - n_dup,
            "n_duplicates": n_dup,
            "n_wbc": n_wbc,
            "n_flagged": int(np.sum(cells["flagged"])) if len(cells["flagged"]) else 0,
            "kinds": kinds,
            "differential": dict(sorted(differential.items())),
            "differential_percent": {k: round(100.0 * v / classified, 2) for k, v in sorted(differential.items())},
            "domain_check": domain_check(
                str(r).split(",")
                for kind, label, r in zip(cells["kind"], cells["label"], cells["flag_reasons"], strict=True)
                if kind == "WBC" and label
            ),
        }

    # ------------------------------------------------------------------------------- tiles
    def has_tile(self, tile_id: str) -> bool:
        """Whether ``tile_id`` is committed (its result, or its failure, is in the store)."""
        return tile_id in self._tile_rows

    def tile_ids(self, kind: str | None = None) -> list[str]:
        """Committed tile ids in commit order (optionally only ``scan`` or ``reimage`` tiles)."""
        self._auto_refresh()
        if kind is None:
            return list(self._tile_rows)
        cols = self._tile_table.read(self._n_tiles, ["tile_id", "kind"])
        return [str(t) for t, k in zip(cols["tile_id"], cols["kind"], strict=True) if k == kind]

    def __len__(self) -> int:
        return self._n_tiles

    def tile_rows(self) -> dict[str, np.ndarray]:
        """The committed rows of ``tables/tiles`` as numpy columns."""
        self._auto_refresh()
        return self._tile_table.read(self._n_tiles)

    def tile_positions(self, kind: str | None = "scan") -> list[dict[str, Any]]:
        """Per committed tile: id, centre ``x_um``/``y_um``, size in µm and pixels, pixel size, path, counts."""
        cols = self.tile_rows()
        out = []
        for i in range(self._n_tiles):
            if kind is not None and cols["kind"][i] != kind:
                continue
            px = float(cols["pixel_size_um"][i])
            out.append(
                {
                    "tile_id": str(cols["tile_id"][i]),
                    "kind": str(cols["kind"][i]),
                    "seq": int(cols["seq"][i]),
                    "x_um": float(cols["x_um"][i]),
                    "y_um": float(cols["y_um"][i]),
                    "z_um": float(cols["z_um"][i]),
                    "pixel_size_um": px,
                    "height": int(cols["height"][i]),
                    "width": int(cols["width"][i]),
                    "width_um": float(cols["width"][i]) * px,
                    "height_um": float(cols["height"][i]) * px,
                    "path": str(cols["path"][i]),
                    "status": str(cols["status"][i]),
                    "n_cells": int(cols["n_cells"][i]),
                    "n_flagged": int(cols["n_flagged"][i]),
                }
            )
        return out

    def _tile_path(self, header: dict[str, Any]) -> str:
        return f"tiles/{header.get('kind', 'scan')}/{tile_key(str(header['tile_id']))}"

    def write_tile(self, tile: Tile) -> str:
        """Write a tile's pixels as an NGFF image; :meth:`write_result` commits it. Returns its group path."""
        return self._write_pixels(tile.header(), tile.pixels)

    def _write_pixels(self, header: dict[str, Any], pixels: np.ndarray) -> str:
        path, pending = self._prepare_pixels(header, pixels)
        if pending is not None:
            _gather([pending])
        return path

    def _prepare_pixels(self, header: dict[str, Any], pixels: np.ndarray) -> tuple[str, Any]:
        """Create the tile's image group and array; returns (path, coroutine writing the pixels or None)."""
        self._require_writable()
        tile_id = str(header["tile_id"])
        path = self._tile_path(header)
        if tile_id in self._tile_rows or self._pending_tiles.get(tile_id) == path:
            return path, None
        pixels = np.asarray(pixels)
        data = pixels if pixels.ndim == 2 else np.ascontiguousarray(np.moveaxis(pixels, -1, 0))
        grp = self.root.require_group(path)
        px = float(header["pixel_size_um"])
        h, w = pixels.shape[:2]
        x0 = float(header["x_um"]) - w / 2.0 * px  # the top-left pixel's corner; NGFF gets its centre
        y0 = float(header["y_um"]) - h / 2.0 * px
        grp.attrs.update(
            {
                "ome": _ngff_image(str(header["tile_id"]), data.shape, px, (y0, x0), window=_window(data.dtype)),
                "scope_stream": {"tile": header},
            }
        )
        arr = grp.create_array(
            "0",
            shape=data.shape,
            chunks=data.shape,
            dtype=data.dtype,
            compressors=_blosc(self.config.compressor, data.dtype.itemsize),
            dimension_names=_dims(data.ndim),
            overwrite=True,
        )
        self._pending_tiles[tile_id] = path
        if header.get("kind", "scan") == "scan" and self.config.mosaic_downsample > 0:
            try:
                self._paste_mosaic(header, pixels)
            except Exception as exc:  # the overview is a convenience; never lose a tile over it
                log.warning("could not paste tile %s into the mosaic: %s", tile_id, exc)
        return path, arr.async_array.setitem(Ellipsis, data)

    def read_tile(self, tile_id: str) -> Tile:
        """The committed (or just written) tile ``tile_id`` with its pixels and header."""
        self._auto_refresh()
        path = self._pending_tiles.get(tile_id)
        if path is None:
            row = self._tile_rows.get(tile_id)
            if row is None:
                raise StoreError(f"tile {tile_id!r} is not in the store {self.path}")
            path = str(self._tile_table.read(self._n_tiles, ["path"])["path"][row])
        if not path:
            raise StoreError(f"tile {tile_id!r} was stored without its pixels (store.save_tiles was off)")
        grp = _group(self.root, path)
        header = dict(_attrs(grp, "scope_stream")["tile"])
        arr = grp["0"]
        assert isinstance(arr, zarr.Array)
        data = np.asarray(arr[...])
        pixels = data if data.ndim == 2 else np.moveaxis(data, 0, -1)
        try:
            return Tile.from_attrs(header, np.ascontiguousarray(pixels))
        except VocabularyError as exc:
            raise StoreError(f"tile {tile_id!r} in {self.path} is damaged: {exc}") from exc

    # ------------------------------------------------------------------------------ results
    def write_result(
        self,
        result: TileResult | None,
        tile: Tile | None = None,
        *,
        error: str = "",
        latency_ms: float = math.nan,
        header: dict[str, Any] | None = None,
    ) -> bool:
        """Commit one tile: its result (or ``error``), cells, crops and (if given) pixels.

        Idempotent by ``tile_id``: returns False (and writes nothing) when the tile is already
        committed. Without ``tile``, the header comes from ``header`` or an earlier :meth:`write_tile`.
        """
        if tile is not None:
            header = tile.header()
        if header is None:
            if result is None:
                raise StoreError("write_result needs a result or a tile")
            path = self._pending_tiles.get(result.tile_id)
            if path is None:
                raise StoreError(f"tile {result.tile_id!r}: no tile header (pass tile= or call write_tile first)")
            header = dict(_attrs(self.root[path], "scope_stream")["tile"])
        rec = TileRecord(
            header=header,
            pixels=tile.pixels if tile is not None else None,
            result=result,
            error=error,
            latency_ms=latency_ms,
        )
        return self.write_records([rec])[0]

    def write_records(self, records: Sequence[TileRecord]) -> list[bool]:
        """Write and commit several tiles in one commit; True for each newly stored, False for duplicates."""
        self._require_writable()
        self.last_duplicates, self.last_replaced = {}, {}
        fresh: list[TileRecord] = []
        out: list[bool] = []
        seen: set[str] = set()
        for rec in records:
            tid = rec.tile_id
            dup = tid in self._tile_rows or tid in seen
            out.append(not dup)
            if not dup:
                if rec.result is not None and rec.result.tile_id != tid:
                    raise StoreError(f"result for tile {rec.result.tile_id!r} paired with tile {tid!r}")
                seen.add(tid)
                fresh.append(rec)
        if not fresh:
            return out
        try:
            self._write_fresh(fresh)
        except BaseException:
            self._dedup = None  # it saw cells that were not committed: rebuild it from the store
            raise
        return out

    def _write_fresh(self, fresh: list[TileRecord]) -> None:
        tile_rows: dict[str, list[Any]] = {c: [] for c in TILE_COLUMNS}
        cell_rows: dict[str, list[Any]] = {c: [] for c in CELL_COLUMNS}
        crops: list[np.ndarray] = []
        pixel_writes: list[Any] = []
        n_cells = self._n_cells
        n_crops = self._n_crops
        now = time.time()
        for rec in fresh:
            h = rec.header
            tid = rec.tile_id
            path = self._pending_tiles.get(tid, "")
            if rec.pixels is not None and self.config.save_tiles:
                path, pending = self._prepare_pixels(h, rec.pixels)
                if pending is not None:
                    pixel_writes.append(pending)
            shape = [int(s) for s in h.get("shape", [0, 0])]
            res = rec.result
            start = n_cells
            n_flagged = 0
            if res is not None:
                calls = {c.cell_id: c for c in res.calls}
                flags = {f.cell_id: f for f in res.flags}
                crop_pos = {cid: i for i, cid in enumerate(res.crop_cell_ids)}
                for cell in res.cells:
                    call = calls.get(cell.cell_id)
                    flag = flags.get(cell.cell_id)
                    n_flagged += flag is not None
                    cell_rows["cell_id"].append(cell.cell_id)
                    cell_rows["tile_id"].append(tid)
                    cell_rows["kind"].append(cell.kind.value)
                    cell_rows["bbox"].append(list(cell.bbox))
                    cell_rows["centroid_row"].append(cell.centroid_px[0])
                    cell_rows["centroid_col"].append(cell.centroid_px[1])
                    cell_rows["x_um"].append(cell.x_um)
                    cell_rows["y_um"].append(cell.y_um)
                    cell_rows["area_px"].append(cell.area_px)
                    cell_rows["label"].append(call.label if call else "")
                    cell_rows["probabilities"].append(json.dumps(call.probabilities) if call else "")
                    cell_rows["uncertainty"].append(call.uncertainty if call else math.nan)
                    cell_rows["margin"].append(call.margin if call else math.nan)
                    cell_rows["anomaly_score"].append(call.anomaly_score if call else math.nan)
                    cell_rows["model_id"].append(call.model_id if call else "")
                    cell_rows["flagged"].append(flag is not None)
                    cell_rows["flag_reasons"].append(",".join(r.value for r in flag.reasons) if flag else "")
                    cell_rows["flag_score"].append(flag.score if flag else math.nan)
                    ci = crop_pos.get(cell.cell_id)
                    cell_rows["crop_index"].append(-1 if ci is None else n_crops + ci)
                    cell_rows["edge_um"].append(_edge_um(cell.centroid_px, h))
                    cell_rows["duplicate_of"].append("")
                    cell_rows["replaces"].append("")
                    cell_rows["extra"].append(
                        json.dumps(
                            {
                                "contour": cell.contour,
                                "features": cell.features,
                                "evaluations": call.evaluations if call else 0,
                            }
                        )
                    )
                    n_cells += 1
                # flags of cells not in res.cells are still kept (as cells without geometry they cannot be)
                if res.crops.shape[0]:
                    crops.append(res.crops)
                    n_crops += res.crops.shape[0]
                self._dedup_rows(h, res, cell_rows, start)
            status = "ok" if res is not None else "failed"
            row = {
                "tile_id": tid,
                "kind": str(h.get("kind", "scan")),
                "path": path,
                "seq": int(h.get("seq", 0)),
                "x_um": float(h["x_um"]),
                "y_um": float(h["y_um"]),
                "z_um": float(h.get("z_um", 0.0)),
                "pixel_size_um": float(h["pixel_size_um"]),
                "height": shape[0],
                "width": shape[1] if len(shape) > 1 else 0,
                "status": status,
                "error": rec.error if res is None else "",
                "n_cells": n_cells - start,
                "n_flagged": n_flagged,
                "cell_start": start,
                "cell_stop": n_cells,
                "latency_ms": rec.latency_ms,
                "stored_at": now,
                "worker": res.worker if res is not None else "",
            }
            for k, v in row.items():
                tile_rows[k].append(v)
        # pixels (compressed concurrently), rows beyond the committed counts, then the commit
        if pixel_writes:
            _gather(pixel_writes)
        self._cell_table.write(self._n_cells, cell_rows)  # type: ignore[arg-type]
        if crops:
            self._write_crops(self._n_crops, crops)
        self._tile_table.write(self._n_tiles, tile_rows)  # type: ignore[arg-type]
        n_tiles = self._n_tiles + len(fresh)
        self._tables_group.attrs["scope_stream"] = {"n_tiles": n_tiles, "n_cells": n_cells, "n_crops": n_crops}
        for i, rec in enumerate(fresh):
            self._tile_rows[rec.tile_id] = self._n_tiles + i
            self._pending_tiles.pop(rec.tile_id, None)
        self._n_tiles, self._n_cells, self._n_crops = n_tiles, n_cells, n_crops

    # ----------------------------------------------------------------------- de-duplication
    def _dedup_index(self) -> Any:
        """The de-duplicator of the committed survey cells (replayed in commit order: the same decisions)."""
        if self._dedup is None:
            from scope_stream.segment.dedup import StageDeduplicator

            dd = StageDeduplicator(float(self.dedup_radius_um or 0.0))
            tiles = self._tile_table.read(self._n_tiles, ["tile_id", "kind"])
            scan = {str(t) for t, k in zip(tiles["tile_id"], tiles["kind"], strict=True) if k == "scan"}
            cols = self._cell_table.read(self._n_cells, ["cell_id", "tile_id", "kind", "x_um", "y_um", "edge_um"])
            for i in range(self._n_cells):
                if str(cols["tile_id"][i]) in scan:
                    dd.resolve(
                        self.slide_id,
                        str(cols["kind"][i]),
                        float(cols["x_um"][i]),
                        float(cols["y_um"][i]),
                        str(cols["tile_id"][i]),
                        str(cols["cell_id"][i]),
                        float(cols["edge_um"][i]),
                    )
            self._dedup = dd
        return self._dedup

    def _dedup_rows(self, header: dict[str, Any], res: TileResult, cell_rows: dict[str, list[Any]], start: int) -> None:
        """Mark the new cell rows (``cell_rows`` from offset ``start - committed``) that repeat a survey cell."""
        if self.dedup_radius_um is None or header.get("kind", "scan") != "scan":
            return
        dd = self._dedup_index()
        first = start - self._n_cells
        for j in range(first, len(cell_rows["cell_id"])):
            cid = str(cell_rows["cell_id"][j])
            got = dd.resolve(
                self.slide_id,
                str(cell_rows["kind"][j]),
                float(cell_rows["x_um"][j]),
                float(cell_rows["y_um"][j]),
                str(cell_rows["tile_id"][j]),
                cid,
                float(cell_rows["edge_um"][j]),
            )
            if got.outcome == "duplicate":
                cell_rows["duplicate_of"][j] = got.other
                self.last_duplicates[cid] = str(got.other)
            elif got.outcome == "replaces":
                cell_rows["replaces"][j] = got.other
                self.last_replaced[cid] = str(got.other)

    def counted_mask(self, cols: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Per committed cell row: whether it counts (not a second copy of a cell seen in an overlapping tile).

        A row does not count when its ``duplicate_of`` is set or a committed row names it in ``replaces``.
        """
        if cols is None or "replaces" not in cols or "duplicate_of" not in cols or "cell_id" not in cols:
            cols = self._cell_table.read(self._n_cells, ["cell_id", "duplicate_of", "replaces"])
        replaced = {str(r) for r in cols["replaces"] if r}
        if not replaced and not any(cols["duplicate_of"]):
            return np.ones(len(cols["cell_id"]), dtype=bool)
        return np.array(
            [not d and str(c) not in replaced for c, d in zip(cols["cell_id"], cols["duplicate_of"], strict=True)],
            dtype=bool,
        )

    # ------------------------------------------------------------------------------- crops
    def _crops_array(self, size: int | None = None) -> zarr.Array | None:
        if "crops" in self.root:
            arr = self.root["crops"]
            assert isinstance(arr, zarr.Array)
            return arr
        if size is None:
            return None
        return self.root.create_array(
            "crops",
            shape=(0, size, size, 3),
            chunks=(64, size, size, 3),
            dtype="uint8",
            compressors=ZstdCodec(level=3),
        )

    def _write_crops(self, start: int, crops: list[np.ndarray]) -> None:
        arr = self._crops_array(int(crops[0].shape[1]))
        assert arr is not None
        size = int(arr.shape[1])
        data = np.concatenate([_resize_crops(c, size) for c in crops], axis=0)
        stop = start + data.shape[0]
        if arr.shape[0] < stop:
            new = int(math.ceil(max(stop, 2 * arr.shape[0]) / 64) * 64)
            arr.resize((new, size, size, 3))
        arr[start:stop] = data

    def crop(self, cell_id: str) -> np.ndarray:
        """The (S, S, 3) uint8 crop of a classified cell."""
        cols = self.cell_table(["cell_id", "crop_index"])
        idx = np.flatnonzero(cols["cell_id"] == cell_id)
        if idx.size == 0:
            raise StoreError(f"cell {cell_id!r} is not in the store {self.path}")
        ci = int(cols["crop_index"][idx[0]])
        arr = self._crops_array()
        if ci < 0 or arr is None or ci >= self._n_crops:
            raise StoreError(f"cell {cell_id!r} has no crop (only classified cells have one)")
        return np.asarray(arr[ci])

    def crops(self) -> np.ndarray:
        """All committed crops, (N, S, S, 3) uint8."""
        self._auto_refresh()
        arr = self._crops_array()
        if arr is None or self._n_crops == 0:
            return np.zeros((0, self.config.crop_px, self.config.crop_px, 3), dtype=np.uint8)
        return np.asarray(arr[: self._n_crops])

    # ------------------------------------------------------------------------------- cells
    def cell_table(self, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Committed cell rows as numpy columns (``docs/store.md``), without reviews."""
        self._auto_refresh()
        return self._cell_table.read(self._n_cells, columns)

    @property
    def n_cells(self) -> int:
        return self._n_cells

    def reviews(self) -> dict[str, dict[str, Any]]:
        """The latest review per cell id."""
        grp = zarr.open_group(str(self.path / "tables" / "reviews"), mode="r", zarr_format=3)
        self._review_table.arrays = {c: grp[c] for c in REVIEW_COLUMNS}  # type: ignore[misc]
        n = int(_attrs(grp, "scope_stream").get("n_reviews", 0))
        cols = self._review_table.read(n)
        out: dict[str, dict[str, Any]] = {}
        for i in range(n):
            out[str(cols["cell_id"][i])] = {
                "label": str(cols["label"][i]),
                "reviewer": str(cols["reviewer"][i]),
                "seconds": float(cols["seconds"][i]),
                "at": float(cols["at"][i]),
            }
        return out

    def cells(
        self, kind: str | None = None, flagged: bool | None = None, *, duplicates: bool = False
    ) -> list[dict[str, Any]]:
        """Committed cells as row dicts (columns of ``docs/store.md`` + reviewer fields).

        One row per physical cell: second copies from overlapping tiles (see :meth:`counted_mask`) are
        left out unless ``duplicates``; their rows then carry ``counted: False``.
        """
        cols = self.cell_table()
        counted = self.counted_mask(cols)
        reviews = self.reviews()
        rows = []
        for i in range(len(cols["cell_id"])):
            if not duplicates and not counted[i]:
                continue
            if kind is not None and cols["kind"][i] != kind:
                continue
            if flagged is not None and bool(cols["flagged"][i]) != flagged:
                continue
            cid = str(cols["cell_id"][i])
            probs = str(cols["probabilities"][i])
            review = reviews.get(cid, {})
            reasons = str(cols["flag_reasons"][i])
            rows.append(
                {
                    "id": cid,
                    "cell_id": cid,
                    "tile_id": str(cols["tile_id"][i]),
                    "kind": str(cols["kind"][i]),
                    "bbox": tuple(int(v) for v in cols["bbox"][i]),
                    "centroid_px": (float(cols["centroid_row"][i]), float(cols["centroid_col"][i])),
                    "x_um": float(cols["x_um"][i]),
                    "y_um": float(cols["y_um"][i]),
                    "area_px": float(cols["area_px"][i]),
                    "label": str(cols["label"][i]),
                    "probabilities": json.loads(probs) if probs else {},
                    "uncertainty": _nan_to_none(cols["uncertainty"][i]),
                    "margin": _nan_to_none(cols["margin"][i]),
                    "anomaly_score": _nan_to_none(cols["anomaly_score"][i]),
                    "model_id": str(cols["model_id"][i]),
                    "flagged": bool(cols["flagged"][i]),
                    "flag_reasons": reasons.split(",") if reasons else [],
                    "flag_score": _nan_to_none(cols["flag_score"][i]),
                    "crop_index": int(cols["crop_index"][i]),
                    "counted": bool(counted[i]),
                    "duplicate_of": str(cols["duplicate_of"][i]),
                    "replaces": str(cols["replaces"][i]),
                    "reviewer_label": review.get("label"),
                    "reviewer": review.get("reviewer"),
                    "review_seconds": review.get("seconds"),
                }
            )
        return rows

    def set_review(self, cell_id: str, label: str, reviewer: str = "", seconds: float = 0.0) -> None:
        """Record a reviewer's label for a cell (append-only; the model's call is never overwritten)."""
        self._require_writable()
        if not label:
            raise StoreError("a review needs a non-empty label")
        if not np.any(self.cell_table(["cell_id"])["cell_id"] == cell_id):
            self.refresh()  # the sink may have committed it since we last looked
            if not np.any(self.cell_table(["cell_id"])["cell_id"] == cell_id):
                raise StoreError(f"cell {cell_id!r} is not in the store {self.path}")
        # the review count on disk, not a cached one (another reviewer may have written)
        grp = zarr.open_group(str(self.path / "tables" / "reviews"), mode="r+", zarr_format=3)
        n = int(_attrs(grp, "scope_stream").get("n_reviews", 0))
        self._review_table.arrays = {c: grp[c] for c in REVIEW_COLUMNS}  # type: ignore[misc]
        self._review_table.write(
            n,
            {
                "cell_id": [cell_id],
                "label": [label],
                "reviewer": [reviewer],
                "seconds": [float(seconds)],
                "at": [time.time()],
            },
        )
        grp.attrs["scope_stream"] = {"n_reviews": n + 1}

    # ------------------------------------------------------------------------------ mosaic
    def _paste_mosaic(self, header: dict[str, Any], pixels: np.ndarray) -> None:
        levels, scale, origin = self._mosaic_levels(header, pixels)
        if not levels:
            return
        arr = levels[0]
        f = max(1, round(scale / float(header["pixel_size_um"])))
        h, w = pixels.shape[:2]
        hh, ww = (h // f) * f, (w // f) * f
        if hh == 0 or ww == 0:
            return
        img = pixels[:hh, :ww]
        # nearest-neighbour subsampling: the overview costs ~1 ms a tile (a block mean costs ~40 ms at 2048^2)
        img = img[f // 2 :: f, f // 2 :: f]
        img = img if img.ndim == 3 else img[..., None]
        img = np.moveaxis(img.astype(arr.dtype), -1, 0)  # (C, y, x)
        if img.shape[0] != arr.shape[0]:
            return
        px = float(header["pixel_size_um"])
        top = float(header["y_um"]) - h / 2.0 * px
        left = float(header["x_um"]) - w / 2.0 * px
        r0 = round((top - origin[0]) / scale)
        c0 = round((left - origin[1]) / scale)
        r1, c1 = r0 + img.shape[1], c0 + img.shape[2]
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r1, arr.shape[1]), min(c1, arr.shape[2])
        if rr1 <= rr0 or cc1 <= cc0:
            return
        patch = img[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
        writes = [arr.async_array.setitem((slice(None), slice(rr0, rr1), slice(cc0, cc1)), patch)]
        # level k holds level 0's pixel (R*2^k + 2^(k-1), C*2^k + 2^(k-1)): every level follows the last
        # tile pasted over a place, exactly as level 0 does, from the patch in memory (no read back)
        for k, lev in enumerate(levels[1:], start=1):
            step, off = 2**k, 2 ** (k - 1)
            ra, rb = -(-(rr0 - off) // step), (rr1 - 1 - off) // step
            ca, cb = -(-(cc0 - off) // step), (cc1 - 1 - off) // step
            rb, cb = min(rb, lev.shape[1] - 1), min(cb, lev.shape[2] - 1)
            if rb < ra or cb < ca:
                continue
            rows = np.arange(ra, rb + 1) * step + off - rr0
            cols = np.arange(ca, cb + 1) * step + off - cc0
            sub = np.ascontiguousarray(patch[:, rows][:, :, cols])
            writes.append(lev.async_array.setitem((slice(None), slice(ra, rb + 1), slice(ca, cb + 1)), sub))
        _gather(writes)

    def _mosaic_levels(
        self, header: dict[str, Any], pixels: np.ndarray
    ) -> tuple[list[zarr.Array], float, tuple[float, float]]:
        """The mosaic's pyramid levels (level 0 first), µm per level-0 pixel and (y0, x0) of its top-left corner."""
        if "mosaic" in self.root:
            datasets = _attrs(self.root, "ome")["multiscales"][0]["datasets"]
            tfs = datasets[0]["coordinateTransformations"]
            scale = float(tfs[0]["scale"][-1])
            levels = []
            for ds in datasets:
                arr = self.root[str(ds["path"])]
                assert isinstance(arr, zarr.Array)
                levels.append(arr)
            # the translation is the centre of the top-left pixel: the corner is half a pixel before it
            ty, tx = float(tfs[1]["translation"][-2]), float(tfs[1]["translation"][-1])
            return levels, scale, (ty - scale / 2, tx - scale / 2)
        region = self.metadata.get("region_um") or self.scan_region_um
        if not region:
            return [], 0.0, (0.0, 0.0)
        x0, y0, x1, y1 = (float(v) for v in region)
        px = float(header["pixel_size_um"])
        h, w = pixels.shape[:2]
        x0, x1 = x0 - w * px / 2, x1 + w * px / 2
        y0, y1 = y0 - h * px / 2, y1 + h * px / 2
        f = self.config.mosaic_downsample
        while max((x1 - x0), (y1 - y0)) / (px * f) > self.config.mosaic_max_px:
            f *= 2
        scale = px * f
        ny, nx = math.ceil((y1 - y0) / scale), math.ceil((x1 - x0) / scale)
        nc = 1 if pixels.ndim == 2 else pixels.shape[2]
        mosaic = self.root.require_group("mosaic")
        shapes = _pyramid_shapes(ny, nx)
        levels = [
            mosaic.create_array(
                str(k),
                shape=(nc, sy, sx),
                chunks=(nc, min(sy, 512), min(sx, 512)),
                dtype=pixels.dtype,
                fill_value=0,
                compressors=_blosc(self.config.compressor, pixels.dtype.itemsize),
                dimension_names=_dims(3),
            )
            for k, (sy, sx) in enumerate(shapes)
        ]
        # translation is the centre of each level's top-left pixel
        ome = _ngff_image(
            "mosaic",
            (nc, ny, nx),
            scale,
            (y0, x0),
            paths=[f"mosaic/{k}" for k in range(len(shapes))],
            window=_window(pixels.dtype),
        )
        self.root.attrs["ome"] = ome
        return levels, scale, (y0, x0)

    def mosaic(self, level: int = 0) -> tuple[np.ndarray, float, tuple[float, float]] | None:
        """(array (C, Y, X), µm per pixel, (y0, x0) µm of the top-left corner) of a pyramid level, or None."""
        if "mosaic" not in self.root:
            return None
        levels, scale, origin = self._mosaic_levels({}, np.zeros((1, 1), np.uint8))
        arr = levels[level]
        return np.asarray(arr[...]), scale * 2**level, origin

    @property
    def mosaic_levels(self) -> int:
        """How many pyramid levels the mosaic has (0 if there is no mosaic)."""
        if "mosaic" not in self.root:
            return 0
        return len(_attrs(self.root, "ome")["multiscales"][0]["datasets"])

    # ------------------------------------------------------------------------------- misc
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"the slide store {self.path} is open read-only")

    def __repr__(self) -> str:
        return (
            f"SlideStore({str(self.path)!r}, slide_id={self.slide_id!r}, tiles={self._n_tiles}, cells={self._n_cells})"
        )


def _attrs(node: Any, key: str) -> dict[str, Any]:
    """``node.attrs[key]`` as a dict ({} when absent or not an object)."""
    val = node.attrs.get(key, {})
    return dict(val) if isinstance(val, dict) else {}


def _group(parent: zarr.Group, name: str) -> zarr.Group:
    grp = parent[name]
    if not isinstance(grp, zarr.Group):
        raise StoreError(f"{parent.path}/{name} is not a group")
    return grp


def _edge_um(centroid_px: Sequence[float], header: dict[str, Any]) -> float:
    """How far a centroid lies inside its tile: distance to the nearest tile edge in µm (NaN if unknown)."""
    shape = header.get("shape") or [0, 0]
    try:
        h, w = float(shape[0]), float(shape[1])
        r, c = float(centroid_px[0]), float(centroid_px[1])
        px = float(header["pixel_size_um"])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan
    if h <= 0 or w <= 0:
        return math.nan
    return min(r + 0.5, c + 0.5, h - 0.5 - r, w - 0.5 - c) * px


def _dims(ndim: int) -> tuple[str, ...]:
    """Zarr v3 ``dimension_names`` of an image array, matching its NGFF axes (NGFF 0.5 requires them)."""
    return ("c", "y", "x") if ndim == 3 else ("y", "x")


def _pyramid_shapes(
    ny: int, nx: int, *, min_levels: int = 3, max_levels: int = 8, top_px: int = 1024
) -> list[tuple[int, int]]:
    """(Y, X) of each mosaic level, each half the last: at least ``min_levels``, more until the top fits ``top_px``."""
    shapes = [(ny, nx)]
    while len(shapes) < max_levels and (len(shapes) < min_levels or max(shapes[-1]) > top_px):
        sy, sx = shapes[-1]
        if sy == 1 and sx == 1:
            break
        shapes.append((max(1, math.ceil(sy / 2)), max(1, math.ceil(sx / 2))))
    return shapes


def _ngff_image(
    name: str,
    shape: tuple[int, ...],
    pixel_size_um: float,
    corner_yx: tuple[float, float],
    paths: Sequence[str] = ("0",),
    window: tuple[float, float] = (0.0, 255.0),
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attributes of a (C,) Y, X image whose top-left pixel corner is at ``corner_yx`` (stage µm).

    ``paths`` are the pyramid levels, level ``k`` ``2**k`` times coarser than level 0 (``pixel_size_um``);
    each level's translation is the centre of its own top-left pixel.
    """
    spatial = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    axes = [{"name": "c", "type": "channel"}, *spatial] if len(shape) == 3 else spatial
    datasets = []
    for k, path in enumerate(paths):
        p = pixel_size_um * 2**k
        ty, tx = corner_yx[0] + p / 2, corner_yx[1] + p / 2
        scale = [1.0, p, p] if len(shape) == 3 else [p, p]
        translation = [0.0, ty, tx] if len(shape) == 3 else [ty, tx]
        datasets.append(
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
    }
    if len(shape) == 3:
        colours = ["FF0000", "00FF00", "0000FF", "FFFFFF"] if shape[0] in (3, 4) else ["FFFFFF"]
        ome["omero"] = {
            "rdefs": {"model": "color"},
            "channels": [
                {
                    "label": lab,
                    "color": colours[i % len(colours)],
                    "active": True,
                    "window": {"start": window[0], "end": window[1], "min": window[0], "max": window[1]},
                }
                for i, lab in enumerate(["R", "G", "B", "A"][: shape[0]] if shape[0] in (3, 4) else ["gray"])
            ],
        }
    return ome


def _window(dtype: np.dtype[Any]) -> tuple[float, float]:
    if dtype == np.uint8:
        return (0.0, 255.0)
    if dtype == np.uint16:
        return (0.0, 65535.0)
    return (0.0, 1.0)


def _resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resample (N, s, s, 3) crops to (N, size, size, 3)."""
    if crops.shape[1] == size and crops.shape[2] == size:
        return crops
    rows = np.minimum((np.arange(size) * crops.shape[1] / size).astype(int), crops.shape[1] - 1)
    cols = np.minimum((np.arange(size) * crops.shape[2] / size).astype(int), crops.shape[2] - 1)
    return np.ascontiguousarray(crops[:, rows][:, :, cols])
