"""The shared vocabulary of scope-stream: tiles, cells, calls and flags.

Every stage of the pipeline (acquire -> transport -> segment -> classify -> store -> view)
speaks these four types and nothing else:

* :class:`Tile`     -- one camera frame with where and how it was taken (pixels + metadata).
* :class:`Cell`     -- one object found in a tile (white cell, red cell or platelet).
* :class:`CellCall` -- what the classifier says about one cell (probabilities, uncertainty, anomaly).
* :class:`Flag`     -- why a cell needs a person's eyes, and where it is on the slide.

Each type has a lossless round trip to a wire form (a JSON-able header plus, for tiles, one raw
buffer) and to zarr attributes (plain JSON). Nothing here pickles.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Self

__all__ = [
    "PIXEL_DTYPES",
    "TILE_FIELDS",
    "Cell",
    "CellCall",
    "CellKind",
    "Flag",
    "FlagReason",
    "Tile",
    "TileResult",
    "VocabularyError",
]

#: dtypes a tile may carry; anything else is refused at the door (and on the wire).
PIXEL_DTYPES: frozenset[str] = frozenset({"uint8", "uint16", "float32"})


class VocabularyError(ValueError):
    """A value that does not fit the shared vocabulary (bad shape, dtype, field...)."""


class _Model(BaseModel):
    """Frozen, strict pydantic model whose wire form and zarr attributes are its JSON dump."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)

    def to_attrs(self) -> dict[str, Any]:
        return self.to_wire()

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Self:
        return cls.from_wire(attrs)


class CellKind(str, Enum):
    """What kind of object a detected cell is."""

    WBC = "WBC"
    RBC = "RBC"
    PLATELET = "platelet"


class FlagReason(str, Enum):
    """Why a cell was flagged for review."""

    ANOMALY = "anomaly"  # unlike anything the classifier was trained on
    UNCERTAIN = "uncertain"  # the classifier cannot decide between classes
    ABNORMAL_CLASS = "abnormal_class"  # its class is on the configured abnormal list
    UNFAMILIAR = "unfamiliar"  # looks unlike the model's training cells (another microscope, stain or cell type)


# --------------------------------------------------------------------------------------- Tile
class Tile:
    """One camera frame: pixels plus where and how they were acquired.

    ``pixels`` is ``(H, W)`` grayscale or ``(H, W, C)`` colour, of a dtype in :data:`PIXEL_DTYPES`.
    Stage coordinates are the stage position (µm) of the *centre* of the frame, as Micro-Manager
    reports them; ``pixel_size_um`` converts pixels to µm. ``kind`` separates the survey scan from
    higher-magnification re-images.
    """

    __slots__ = (
        "acquired_at",
        "kind",
        "metadata",
        "objective",
        "pixel_size_um",
        "pixels",
        "seq",
        "slide_id",
        "tile_id",
        "x_um",
        "y_um",
        "z_um",
    )

    def __init__(
        self,
        pixels: np.ndarray,
        *,
        slide_id: str,
        tile_id: str,
        seq: int,
        x_um: float,
        y_um: float,
        z_um: float = 0.0,
        pixel_size_um: float,
        objective: str = "",
        acquired_at: float | None = None,
        kind: Literal["scan", "reimage"] = "scan",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(pixels, np.ndarray):
            raise VocabularyError(f"Tile.pixels must be a numpy array, got {type(pixels).__name__}")
        if pixels.dtype.name not in PIXEL_DTYPES:
            raise VocabularyError(f"Tile.pixels dtype {pixels.dtype.name!r} is not one of {sorted(PIXEL_DTYPES)}")
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
            raise VocabularyError(f"Tile.pixels must be (H, W) or (H, W, 1|3|4), got shape {pixels.shape}")
        if pixels.shape[0] == 0 or pixels.shape[1] == 0:
            raise VocabularyError(f"Tile.pixels is empty: shape {pixels.shape}")
        if not slide_id or not tile_id:
            raise VocabularyError("Tile needs a non-empty slide_id and tile_id")
        if int(seq) < 0:
            raise VocabularyError(f"Tile.seq must be >= 0, got {seq}")
        for name, value in (("x_um", x_um), ("y_um", y_um), ("z_um", z_um)):
            if not math.isfinite(float(value)):
                raise VocabularyError(f"Tile.{name} must be finite, got {value}")
        if not (math.isfinite(float(pixel_size_um)) and float(pixel_size_um) > 0):
            raise VocabularyError(f"Tile.pixel_size_um must be > 0, got {pixel_size_um}")
        if kind not in ("scan", "reimage"):
            raise VocabularyError(f"Tile.kind must be 'scan' or 'reimage', got {kind!r}")
        self.pixels = pixels
        self.slide_id = str(slide_id)
        self.tile_id = str(tile_id)
        self.seq = int(seq)
        self.x_um = float(x_um)
        self.y_um = float(y_um)
        self.z_um = float(z_um)
        self.pixel_size_um = float(pixel_size_um)
        self.objective = str(objective)
        self.acquired_at = float(time.time() if acquired_at is None else acquired_at)
        self.kind = kind
        self.metadata = dict(metadata or {})

    # ---- geometry
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    @property
    def width_um(self) -> float:
        return self.pixels.shape[1] * self.pixel_size_um

    @property
    def height_um(self) -> float:
        return self.pixels.shape[0] * self.pixel_size_um

    def px_to_stage(self, row: float, col: float) -> tuple[float, float]:
        """Stage (x, y) in µm of the pixel centre at (row, col).

        Convention: stage x grows with column, stage y grows with row, and the tile's
        (x_um, y_um) is the centre of the frame.
        """
        h, w = self.pixels.shape[:2]
        x = self.x_um + (col + 0.5 - w / 2.0) * self.pixel_size_um
        y = self.y_um + (row + 0.5 - h / 2.0) * self.pixel_size_um
        return x, y

    def stage_to_px(self, x_um: float, y_um: float) -> tuple[float, float]:
        """(row, col) in this tile of the stage point (x_um, y_um); inverse of :meth:`px_to_stage`."""
        h, w = self.pixels.shape[:2]
        col = (x_um - self.x_um) / self.pixel_size_um + w / 2.0 - 0.5
        row = (y_um - self.y_um) / self.pixel_size_um + h / 2.0 - 0.5
        return row, col

    # ---- wire form: JSON-able header + one raw C-contiguous buffer
    def header(self) -> dict[str, Any]:
        """Everything but the pixels, JSON-able; with ``dtype`` and ``shape`` to rebuild them."""
        return {
            "slide_id": self.slide_id,
            "tile_id": self.tile_id,
            "seq": self.seq,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "z_um": self.z_um,
            "pixel_size_um": self.pixel_size_um,
            "objective": self.objective,
            "acquired_at": self.acquired_at,
            "kind": self.kind,
            "metadata": self.metadata,
            "dtype": self.pixels.dtype.name,
            "shape": list(self.pixels.shape),
        }

    def to_wire(self) -> tuple[dict[str, Any], memoryview]:
        """(header, buffer): the buffer is a zero-copy view when the pixels are contiguous."""
        pixels = np.ascontiguousarray(self.pixels)
        return self.header(), pixels.data.cast("B")

    @classmethod
    def from_wire(cls, header: dict[str, Any], buffer: bytes | memoryview | bytearray) -> Tile:
        """Rebuild a tile from :meth:`to_wire`'s parts, checking dtype, shape and buffer length."""
        try:
            dtype = np.dtype(str(header["dtype"]))
            shape = tuple(int(s) for s in header["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabularyError(f"tile header needs a valid 'dtype' and 'shape': {exc}") from exc
        if dtype.name not in PIXEL_DTYPES:
            raise VocabularyError(f"tile dtype {dtype.name!r} is not one of {sorted(PIXEL_DTYPES)}")
        if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
            raise VocabularyError(f"tile shape {list(shape)} is not (H, W) or (H, W, C)")
        expected = int(np.prod(shape)) * dtype.itemsize
        nbytes = memoryview(buffer).nbytes
        if nbytes != expected:
            raise VocabularyError(
                f"tile buffer holds {nbytes} bytes but shape {list(shape)} x {dtype.name} needs {expected}"
            )
        pixels = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        fields = {k: header[k] for k in TILE_FIELDS if k in header}
        missing = [k for k in _TILE_REQUIRED if k not in header]
        if missing:
            raise VocabularyError(f"tile header lacks {missing}")
        unknown = set(header) - set(TILE_FIELDS) - {"dtype", "shape"}
        if unknown:
            raise VocabularyError(f"tile header has unknown fields {sorted(unknown)}")
        return cls(pixels, **fields)

    # ---- zarr attributes: the header is already plain JSON
    def to_attrs(self) -> dict[str, Any]:
        return self.header()

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], pixels: np.ndarray) -> Tile:
        pixels = np.asarray(pixels)
        if list(pixels.shape) != list(attrs.get("shape", pixels.shape)):
            raise VocabularyError(f"pixels of shape {list(pixels.shape)} do not match attrs shape {attrs.get('shape')}")
        return cls.from_wire(attrs, np.ascontiguousarray(pixels).tobytes())

    # ---- equality for tests and de-duplication
    def same_as(self, other: Tile) -> bool:
        return self.header() == other.header() and np.array_equal(self.pixels, other.pixels)

    def __repr__(self) -> str:
        return (
            f"Tile(slide_id={self.slide_id!r}, tile_id={self.tile_id!r}, seq={self.seq}, "
            f"shape={self.shape}, dtype={self.pixels.dtype.name}, x_um={self.x_um:.1f}, "
            f"y_um={self.y_um:.1f}, pixel_size_um={self.pixel_size_um}, kind={self.kind!r})"
        )


#: the fields of a tile header besides its pixels' ``dtype`` and ``shape`` (one list: the wire and the store)
TILE_FIELDS = (
    "slide_id",
    "tile_id",
    "seq",
    "x_um",
    "y_um",
    "z_um",
    "pixel_size_um",
    "objective",
    "acquired_at",
    "kind",
    "metadata",
)
_TILE_REQUIRED = ("slide_id", "tile_id", "seq", "x_um", "y_um", "pixel_size_um")


# --------------------------------------------------------------------------------------- Cell
class Cell(_Model):
    """One object found in a tile.

    ``bbox`` is ``(row0, col0, row1, col1)`` in tile pixels, half-open. ``contour`` is a closed
    polygon of ``(row, col)`` vertices in tile pixels. ``x_um``/``y_um`` are the centroid in
    stage coordinates, which is what de-duplicates a cell seen in two overlapping tiles.
    """

    cell_id: str
    tile_id: str
    slide_id: str
    kind: CellKind
    bbox: tuple[int, int, int, int]
    centroid_px: tuple[float, float]
    x_um: float
    y_um: float
    area_px: float = Field(ge=0)
    contour: list[tuple[float, float]] = Field(default_factory=list)
    features: dict[str, float] = Field(default_factory=dict)

    @field_validator("bbox")
    @classmethod
    def _bbox_ordered(cls, v: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        r0, c0, r1, c1 = v
        if r1 <= r0 or c1 <= c0:
            raise ValueError(f"bbox {v} must be (row0, col0, row1, col1) with row1 > row0, col1 > col0")
        return v


# ----------------------------------------------------------------------------------- CellCall
class CellCall(_Model):
    """The classifier's answer for one cell.

    ``probabilities`` maps each known class to its probability (summing to 1). ``uncertainty`` is
    the normalised entropy of those probabilities (0 = certain, 1 = uniform); ``margin`` is the gap
    between the top two. ``anomaly_score`` grows with how unlike the training cells this one is.
    """

    cell_id: str
    label: str
    probabilities: dict[str, float]
    uncertainty: float = Field(ge=0.0, le=1.0)
    margin: float = Field(ge=0.0, le=1.0)
    anomaly_score: float
    model_id: str
    evaluations: int = Field(default=0, ge=0)  # network evaluations spent on this cell
    #: how unlike the model's training cells this cell looks, calibrated to [0, 1] on held-out normal cells
    #: (a threshold q marks about 1 - q of them); None where the model cannot say (no feature bank)
    unfamiliarity: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> CellCall:
        if not self.probabilities:
            raise ValueError("probabilities must name at least one class")
        if self.label not in self.probabilities:
            raise ValueError(f"label {self.label!r} is not among the classes {sorted(self.probabilities)}")
        if any((not math.isfinite(p)) or p < 0 for p in self.probabilities.values()):
            raise ValueError("probabilities must be finite and >= 0")
        total = sum(self.probabilities.values())
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"probabilities sum to {total:.4f}, not 1")
        if not math.isfinite(self.anomaly_score):
            raise ValueError("anomaly_score must be finite")
        return self


# --------------------------------------------------------------------------------------- Flag
class Flag(_Model):
    """A cell that needs review: why, how strongly, and where on the slide."""

    cell_id: str
    tile_id: str
    slide_id: str
    reasons: list[FlagReason] = Field(min_length=1)
    score: float
    label: str
    x_um: float
    y_um: float


# --------------------------------------------------------------------------------- TileResult
class TileResult:
    """Everything a worker found in one tile: cells, the calls on the classified ones, flags, crops.

    ``crops`` is ``(N, S, S, 3)`` uint8, one crop per entry of ``crop_cell_ids`` (the classified
    white cells, in order). ``timings_ms`` records where the worker spent its time.
    """

    __slots__ = ("calls", "cells", "crop_cell_ids", "crops", "flags", "slide_id", "tile_id", "timings_ms", "worker")

    def __init__(
        self,
        *,
        slide_id: str,
        tile_id: str,
        cells: list[Cell] | None = None,
        calls: list[CellCall] | None = None,
        flags: list[Flag] | None = None,
        crops: np.ndarray | None = None,
        crop_cell_ids: list[str] | None = None,
        timings_ms: dict[str, float] | None = None,
        worker: str = "",
    ) -> None:
        self.slide_id = slide_id
        self.tile_id = tile_id
        self.cells = list(cells or [])
        self.calls = list(calls or [])
        self.flags = list(flags or [])
        self.crop_cell_ids = list(crop_cell_ids or [])
        if crops is None:
            crops = np.zeros((0, 1, 1, 3), dtype=np.uint8)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
            raise VocabularyError(f"TileResult.crops must be (N, S, S, 3) uint8, got {crops.shape} {crops.dtype}")
        if crops.shape[0] != len(self.crop_cell_ids):
            raise VocabularyError(f"TileResult has {crops.shape[0]} crops for {len(self.crop_cell_ids)} crop_cell_ids")
        self.crops = crops
        self.timings_ms = dict(timings_ms or {})
        self.worker = worker

    def header(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "tile_id": self.tile_id,
            "cells": [c.to_wire() for c in self.cells],
            "calls": [c.to_wire() for c in self.calls],
            "flags": [f.to_wire() for f in self.flags],
            "crop_cell_ids": self.crop_cell_ids,
            "crops_shape": list(self.crops.shape),
            "timings_ms": self.timings_ms,
            "worker": self.worker,
        }

    def to_wire(self) -> tuple[dict[str, Any], memoryview]:
        if self.crops.size == 0:  # memoryview.cast refuses an empty array
            return self.header(), memoryview(b"")
        return self.header(), np.ascontiguousarray(self.crops).data.cast("B")

    @classmethod
    def from_wire(cls, header: dict[str, Any], buffer: bytes | memoryview | bytearray) -> TileResult:
        try:
            shape = tuple(int(s) for s in header["crops_shape"])
            if len(shape) != 4 or shape[3] != 3 or any(s < 0 for s in shape):
                raise ValueError(f"crops_shape {list(shape)} is not (N, S, S, 3)")
            expected = int(np.prod(shape))
            nbytes = memoryview(buffer).nbytes
            if nbytes != expected:
                raise ValueError(f"crops buffer holds {nbytes} bytes, crops_shape {list(shape)} needs {expected}")
            crops = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)
            return cls(
                slide_id=str(header["slide_id"]),
                tile_id=str(header["tile_id"]),
                cells=[Cell.from_wire(c) for c in header.get("cells", [])],
                calls=[CellCall.from_wire(c) for c in header.get("calls", [])],
                flags=[Flag.from_wire(f) for f in header.get("flags", [])],
                crops=crops,
                crop_cell_ids=[str(i) for i in header.get("crop_cell_ids", [])],
                timings_ms={str(k): float(v) for k, v in header.get("timings_ms", {}).items()},
                worker=str(header.get("worker", "")),
            )
        except VocabularyError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabularyError(f"bad tile result: {exc}") from exc
