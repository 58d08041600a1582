"""The live differential count and the slide's review state.

The differential counts classified white cells per class, as the model called them and as they
stand after review (the reviewer's label where there is one). Red cells and platelets found by
segmentation are counted by kind. The slide's state tells the operator what is left to do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from .cells import CellRecord

__all__ = ["CountRow", "DifferentialCount", "SlideState", "slide_state"]


class SlideState(str, Enum):
    """What the slide needs from a person."""

    WAITING = "waiting"  # no tile yet
    SCANNING = "scanning"  # tiles arriving, nothing flagged yet
    NEEDS_REVIEW = "needs review"  # flagged cells not yet reviewed
    REVIEWED = "reviewed"  # every flagged cell has a reviewer label
    NORMAL = "no flags"  # scan done, nothing flagged


def slide_state(*, n_tiles: int, done: bool, n_flagged: int, n_flagged_reviewed: int) -> SlideState:
    """The state shown in the widget's header."""
    if n_flagged > n_flagged_reviewed:
        return SlideState.NEEDS_REVIEW
    if n_flagged > 0:
        return SlideState.REVIEWED
    if done:
        return SlideState.NORMAL
    return SlideState.SCANNING if n_tiles > 0 else SlideState.WAITING


@dataclass(frozen=True)
class CountRow:
    """One class of the differential: model count, count after review, and the latter in %."""

    label: str
    model: int
    reviewed: int
    percent: float


class DifferentialCount:
    """Counts per class, updated incrementally as cells arrive and reviews land.

    Each classified cell is counted once (by id): adding it again replaces its earlier version, so
    a re-delivered, completed or reviewed record never double counts. Unclassified cells (red cells,
    platelets: about 10^5 per slide) are only counted by kind, not kept; add each of them once (the
    store follower reads every committed row exactly once).
    """

    def __init__(self, classes: Sequence[str] = ()) -> None:
        self._classes = list(classes)
        self._cells: dict[str, CellRecord] = {}
        self._model: Counter[str] = Counter()
        self._effective: Counter[str] = Counter()
        self._kinds: Counter[str] = Counter()

    def add(self, rec: CellRecord) -> None:
        old = self._cells.get(rec.cell_id)
        if old is not None:
            self._remove(old)
        elif not rec.classified:
            self._kinds[rec.kind] += 1
            return
        self._cells[rec.cell_id] = rec
        self._kinds[rec.kind] += 1
        if rec.classified:
            self._model[rec.label] += 1
            self._effective[rec.effective_label] += 1

    def add_many(self, recs: Iterable[CellRecord]) -> None:
        for r in recs:
            self.add(r)

    def remove(self, cell_id: str) -> None:
        """Forget a cell (a copy of one counted from an overlapping tile); unknown ids are ignored."""
        rec = self._cells.pop(cell_id, None)
        if rec is not None:
            self._remove(rec)

    def _remove(self, rec: CellRecord) -> None:
        self._kinds[rec.kind] -= 1
        if rec.classified:
            self._model[rec.label] -= 1
            self._effective[rec.effective_label] -= 1

    @property
    def n_classified(self) -> int:
        return sum(self._model.values())

    @property
    def kinds(self) -> dict[str, int]:
        """Cells per kind (``WBC``, ``RBC``, ``platelet``), as segmentation found them."""
        return {k: v for k, v in self._kinds.items() if v > 0}

    def rows(self) -> list[CountRow]:
        """One row per class: the configured classes first (even at 0), then any others seen."""
        labels = list(self._classes) + sorted(
            (set(self._model) | set(self._effective)) - set(self._classes),
        )
        total = sum(self._effective.values())
        out = []
        for lab in labels:
            m, e = self._model.get(lab, 0), self._effective.get(lab, 0)
            if lab not in self._classes and m == 0 and e == 0:
                continue
            out.append(CountRow(lab, m, e, 100.0 * e / total if total else 0.0))
        return out

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{label: {"model": n, "reviewed": n, "percent": p}}`` for reports."""
        rows = self.rows()
        return {r.label: {"model": r.model, "reviewed": r.reviewed, "percent": round(r.percent, 2)} for r in rows}
