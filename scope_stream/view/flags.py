"""Flag overlays and the flagged-cell table, as plain arrays and rows (no Qt, no napari).

* :class:`ClassPalette` gives every class a stable colour (the PBC classes a fixed, colour-blind
  friendly set; others a hash-derived one), and maps anomaly scores through a colormap.
* :class:`FlagFilter` is what the widget's filters select: classes and a score threshold.
* :func:`flag_layer_data` turns cell records into napari Points data: positions ``(y, x)`` in
  stage µm, face colours by class or anomaly score, sizes (µm) growing with uncertainty.
* :class:`FlaggedCellTable` keeps flagged cells sorted by score, filtered, indexable by row and id.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .cells import CellRecord

__all__ = [
    "PBC_CLASSES",
    "ClassPalette",
    "ColorBy",
    "FlagFilter",
    "FlagLayerData",
    "FlaggedCellTable",
    "flag_layer_data",
]

#: The eight classes of the PBC dataset, in the order the viewer lists them (and binds keys 1-8).
PBC_CLASSES: tuple[str, ...] = (
    "neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "ig",
    "erythroblast",
    "platelet",
)

# Okabe-Ito-like, distinguishable on a pink/purple smear background.
_FIXED: dict[str, str] = {
    "neutrophil": "#0072B2",
    "lymphocyte": "#009E73",
    "monocyte": "#56B4E9",
    "eosinophil": "#E69F00",
    "basophil": "#CC79A7",
    "ig": "#D55E00",
    "erythroblast": "#F0E442",
    "platelet": "#999999",
}

ColorBy = Literal["class", "anomaly"]


def _hex_to_rgba(hex_colour: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    return r, g, b, alpha


class ClassPalette:
    """Stable RGBA colours per class, and an anomaly colormap.

    Unknown classes get a colour derived from a hash of their name, so the same class keeps its
    colour across sessions and machines.
    """

    def __init__(self, classes: Iterable[str] = PBC_CLASSES, overrides: dict[str, str] | None = None) -> None:
        self.classes: list[str] = list(dict.fromkeys(classes))
        self._hex = dict(_FIXED)
        self._hex.update(overrides or {})

    def hex(self, label: str) -> str:
        if label in self._hex:
            return self._hex[label]
        if not label:
            return "#ffffff"
        digest = hashlib.sha1(label.encode("utf-8")).digest()
        hue = digest[0] / 255.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"

    def rgba(self, label: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
        return _hex_to_rgba(self.hex(label), alpha)

    def add(self, label: str) -> None:
        if label and label not in self.classes:
            self.classes.append(label)

    @staticmethod
    def anomaly_rgba(scores: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
        """``(N, 4)`` colours: yellow (low) -> orange -> red -> magenta (high); NaN scores are grey."""
        s = np.asarray(scores, dtype=np.float64)
        span = vmax - vmin if vmax > vmin else 1.0
        t = np.clip((s - vmin) / span, 0.0, 1.0)
        stops = np.array(
            [[1.0, 0.93, 0.25], [1.0, 0.55, 0.0], [0.9, 0.1, 0.1], [0.85, 0.0, 0.85]],
            dtype=np.float64,
        )
        pos = np.nan_to_num(t) * (len(stops) - 1)
        i0 = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
        frac = (pos - i0)[:, None]
        rgb = stops[i0] * (1.0 - frac) + stops[i0 + 1] * frac
        out = np.concatenate([rgb, np.ones((len(s), 1))], axis=1)
        out[np.isnan(s)] = (0.6, 0.6, 0.6, 1.0)
        return out


@dataclass
class FlagFilter:
    """Which flagged cells to show: classes (empty = all) and a minimum score (NaN-scored pass)."""

    classes: set[str] = field(default_factory=set)
    min_score: float = -math.inf
    include_reviewed: bool = True

    def accepts(self, rec: CellRecord) -> bool:
        if self.classes and rec.effective_label not in self.classes:
            return False
        if not self.include_reviewed and rec.reviewed:
            return False
        s = rec.score
        return not (math.isfinite(s) and s < self.min_score)


@dataclass(frozen=True)
class FlagLayerData:
    """napari Points layer data for flags: everything aligned by row."""

    points: np.ndarray  # (N, 2) (y_um, x_um)
    face_colors: np.ndarray  # (N, 4) RGBA in [0, 1]
    sizes: np.ndarray  # (N,) diameter in µm
    cell_ids: list[str]
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cell_ids)


def flag_layer_data(
    records: Sequence[CellRecord],
    *,
    palette: ClassPalette | None = None,
    color_by: ColorBy = "class",
    base_size_um: float = 8.0,
    uncertainty_gain: float = 2.0,
    anomaly_range: tuple[float, float] = (0.0, 1.0),
) -> FlagLayerData:
    """Points for ``records`` (those without a stage position are skipped).

    Size is ``base_size_um * (1 + uncertainty_gain * uncertainty)``: the less sure the model, the
    bigger the marker; unclassified cells get the base size. ``color_by`` picks a colour per
    (effective) class or along the anomaly colormap over ``anomaly_range``.
    """
    if color_by not in ("class", "anomaly"):
        raise ValueError(f"color_by must be 'class' or 'anomaly', got {color_by!r}")
    palette = palette or ClassPalette()
    recs = [r for r in records if r.located]
    n = len(recs)
    points = np.array([[r.y_um, r.x_um] for r in recs], dtype=np.float64).reshape(n, 2)
    unc = np.array([r.uncertainty for r in recs], dtype=np.float64)
    anomaly = np.array([r.anomaly_score for r in recs], dtype=np.float64)
    sizes = base_size_um * (1.0 + uncertainty_gain * np.nan_to_num(np.clip(unc, 0.0, 1.0), nan=0.0))
    if color_by == "class":
        colours = np.array([palette.rgba(r.effective_label) for r in recs], dtype=np.float64).reshape(n, 4)
    else:
        colours = ClassPalette.anomaly_rgba(anomaly, *anomaly_range).reshape(n, 4)
    features = {
        "cell_id": np.array([r.cell_id for r in recs], dtype=object),
        "label": np.array([r.effective_label for r in recs], dtype=object),
        "score": np.array([r.score for r in recs], dtype=np.float64),
        "uncertainty": unc,
        "anomaly_score": anomaly,
        "reviewed": np.array([r.reviewed for r in recs], dtype=bool),
    }
    return FlagLayerData(points, colours, sizes.astype(np.float64), [r.cell_id for r in recs], features)


class FlaggedCellTable:
    """Flagged cells, highest score first, after a :class:`FlagFilter`.

    ``upsert`` adds or completes a record (the event first, the store row later); ``rows`` is the
    filtered, sorted view the table widget shows; ``row_of`` finds a cell's row for selection sync.
    """

    def __init__(self) -> None:
        self._records: dict[str, CellRecord] = {}
        self._filter = FlagFilter()
        self._rows: list[CellRecord] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def total(self) -> int:
        """Flagged cells known, before filtering."""
        return len(self._records)

    @property
    def filter(self) -> FlagFilter:
        return self._filter

    def set_filter(self, flt: FlagFilter) -> None:
        self._filter = flt
        self._rows = None

    def upsert(self, rec: CellRecord) -> None:
        if not rec.flagged:
            return
        old = self._records.get(rec.cell_id)
        self._records[rec.cell_id] = rec if old is None else old.merged(rec)
        self._rows = None

    def replace(self, rec: CellRecord) -> None:
        """Set a record as is (e.g. after a review changed its reviewer label)."""
        if rec.cell_id in self._records:
            self._records[rec.cell_id] = rec
            self._rows = None

    def remove(self, cell_id: str) -> None:
        """Drop a cell (a copy of one flagged from an overlapping tile); unknown ids are ignored."""
        if self._records.pop(cell_id, None) is not None:
            self._rows = None

    def get(self, cell_id: str) -> CellRecord | None:
        return self._records.get(cell_id)

    def all(self) -> list[CellRecord]:
        return list(self._records.values())

    @property
    def rows(self) -> list[CellRecord]:
        if self._rows is None:
            kept = [r for r in self._records.values() if self._filter.accepts(r)]
            kept.sort(key=lambda r: (-r.score if math.isfinite(r.score) else math.inf, r.cell_id))
            self._rows = kept
        return self._rows

    def row_of(self, cell_id: str) -> int:
        """Row of ``cell_id`` in :attr:`rows`, -1 if filtered out or unknown."""
        for i, r in enumerate(self.rows):
            if r.cell_id == cell_id:
                return i
        return -1
