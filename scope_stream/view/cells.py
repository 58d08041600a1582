"""What the viewer knows about one cell, built from a store row or a ``cell.flagged`` event.

:class:`CellRecord` is the single row type of every view model (flag layers, the flagged-cell
table, the differential count, the review gallery). It is built from

* a row of the store's cell table (``SlideStore.cells()`` / ``tables/cells`` in docs/store.md), or
* the payload of a ``cell.flagged`` event (docs/protocol.md), which arrives before the store row
  is read and is completed by it later (:meth:`CellRecord.merged`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["CellRecord", "RecordError", "finite_or_nan"]


class RecordError(ValueError):
    """A store row or event payload that cannot be read as a cell (names the missing/bad field)."""


def finite_or_nan(value: Any) -> float:
    """``float(value)`` when it is a finite number, else NaN (``None``, ``""`` and junk included)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _reasons(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(r.strip() for r in value.split(",") if r.strip())
    return tuple(str(getattr(r, "value", r)) for r in value)


def _probabilities(value: Any) -> dict[str, float]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, float] = {}
    for k, v in value.items():
        f = finite_or_nan(v)
        if not math.isnan(f):
            out[str(k)] = f
    return out


@dataclass(frozen=True)
class CellRecord:
    """One cell as the viewer shows it. Floats are NaN where unknown (not classified, not flagged).

    ``label`` is the model's call and is never changed by a review; ``reviewer_label`` is the
    operator's, ``""`` until reviewed. ``bbox_um`` is ``(y0, x0, y1, x1)`` in stage µm when known.
    """

    cell_id: str
    tile_id: str = ""
    slide_id: str = ""
    kind: str = "WBC"
    label: str = ""
    x_um: float = math.nan
    y_um: float = math.nan
    uncertainty: float = math.nan
    margin: float = math.nan
    anomaly_score: float = math.nan
    model_id: str = ""
    flagged: bool = False
    flag_reasons: tuple[str, ...] = ()
    flag_score: float = math.nan
    probabilities: dict[str, float] = field(default_factory=dict)
    crop_index: int = -1
    tile_kind: str = "scan"
    bbox_um: tuple[float, float, float, float] | None = None
    reviewer_label: str = ""
    reviewer: str = ""
    review_seconds: float = math.nan

    # ------------------------------------------------------------------ derived
    @property
    def classified(self) -> bool:
        return bool(self.label)

    @property
    def reviewed(self) -> bool:
        return bool(self.reviewer_label)

    @property
    def effective_label(self) -> str:
        """The reviewer's label when there is one, else the model's."""
        return self.reviewer_label or self.label

    @property
    def score(self) -> float:
        """The sort key of the flag table: the flag score, else the anomaly score, else -inf."""
        if not math.isnan(self.flag_score):
            return self.flag_score
        if not math.isnan(self.anomaly_score):
            return self.anomaly_score
        return -math.inf

    @property
    def located(self) -> bool:
        return math.isfinite(self.x_um) and math.isfinite(self.y_um)

    def with_review(self, label: str, reviewer: str = "", seconds: float = math.nan) -> CellRecord:
        return replace(self, reviewer_label=label, reviewer=reviewer, review_seconds=finite_or_nan(seconds))

    def merged(self, newer: CellRecord) -> CellRecord:
        """This record completed by ``newer`` (a later source): known values of ``newer`` win."""
        updates: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            v = getattr(newer, name)
            if isinstance(v, float) and math.isnan(v):
                continue
            if v in ("", (), {}, None) or (name == "crop_index" and v == -1):
                continue
            if name == "flagged" and not v:
                continue
            updates[name] = v
        return replace(self, **updates)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_store_row(cls, row: Mapping[str, Any], *, tile_kind: str = "scan") -> CellRecord:
        """Build from one row of the store's cell table (docs/store.md, ``tables/cells``).

        Extra keys are ignored. ``bbox`` (tile pixels) becomes ``bbox_um`` only if the row carries
        the tile geometry (``tile_x_um``, ``tile_y_um``, ``tile_height``, ``tile_width``,
        ``pixel_size_um``), as :class:`~scope_stream.view.follow.StoreFollower` adds.
        """
        cell_id = str(row.get("cell_id", "") or "")
        if not cell_id:
            raise RecordError(f"cell row has no cell_id: keys {sorted(row)[:12]}")
        bbox_um = None
        bbox = row.get("bbox")
        if bbox is not None and "tile_x_um" in row:
            try:
                p = float(row["pixel_size_um"])
                h, w = int(row["tile_height"]), int(row["tile_width"])
                top = float(row["tile_y_um"]) - h * p / 2.0
                left = float(row["tile_x_um"]) - w * p / 2.0
                r0, c0, r1, c1 = (float(v) for v in bbox)
                bbox_um = (top + r0 * p, left + c0 * p, top + r1 * p, left + c1 * p)
            except (KeyError, TypeError, ValueError):
                bbox_um = None
        crop = row.get("crop_index", -1)
        try:
            crop_index = int(crop) if crop is not None else -1
        except (TypeError, ValueError):
            crop_index = -1
        return cls(
            cell_id=cell_id,
            tile_id=str(row.get("tile_id", "") or ""),
            slide_id=str(row.get("slide_id", "") or ""),
            kind=str(row.get("kind", "WBC") or "WBC"),
            label=str(row.get("label", "") or ""),
            x_um=finite_or_nan(row.get("x_um")),
            y_um=finite_or_nan(row.get("y_um")),
            uncertainty=finite_or_nan(row.get("uncertainty")),
            margin=finite_or_nan(row.get("margin")),
            anomaly_score=finite_or_nan(row.get("anomaly_score")),
            model_id=str(row.get("model_id", "") or ""),
            flagged=bool(row.get("flagged", False)),
            flag_reasons=_reasons(row.get("flag_reasons")),
            flag_score=finite_or_nan(row.get("flag_score")),
            probabilities=_probabilities(row.get("probabilities")),
            crop_index=crop_index,
            tile_kind=str(row.get("tile_kind", tile_kind) or tile_kind),
            bbox_um=bbox_um,
            reviewer_label=str(row.get("reviewer_label", "") or ""),
            reviewer=str(row.get("reviewer", "") or ""),
            review_seconds=finite_or_nan(row.get("review_seconds")),
        )

    @classmethod
    def from_flag_event(cls, payload: Mapping[str, Any]) -> CellRecord:
        """Build from a ``cell.flagged`` event payload (docs/protocol.md)."""
        cell_id = str(payload.get("cell_id", "") or "")
        if not cell_id:
            raise RecordError("cell.flagged payload has no cell_id")
        return cls(
            cell_id=cell_id,
            tile_id=str(payload.get("tile_id", "") or ""),
            slide_id=str(payload.get("slide_id", "") or ""),
            kind="WBC",
            label=str(payload.get("label", "") or ""),
            x_um=finite_or_nan(payload.get("x_um")),
            y_um=finite_or_nan(payload.get("y_um")),
            uncertainty=finite_or_nan(payload.get("uncertainty")),
            margin=finite_or_nan(payload.get("margin")),
            anomaly_score=finite_or_nan(payload.get("anomaly_score")),
            model_id=str(payload.get("model_id", "") or ""),
            flagged=True,
            flag_reasons=_reasons(payload.get("reasons")),
            flag_score=finite_or_nan(payload.get("score")),
            probabilities=_probabilities(payload.get("probabilities")),
            tile_kind=str(payload.get("kind", "scan") or "scan"),
        )
