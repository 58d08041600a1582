"""Operator review, built for speed: a keyboard-driven queue of cell crops with timing.

Review time, not compute, limits today's analysers (users of a commercial analyser spend about
1.8 s per cell verifying), so the session is designed to keep hands on the keyboard:

* cells are grouped by the model's predicted class (a reviewer checks a run of "ig" calls at a
  glance) and, within a group, the most anomalous / uncertain come first; groups are ordered by
  their most urgent cell;
* one key per action: accept the model's call, re-label with a key per label, skip, go back. A
  reviewer can give every class the model knows, the PBC abnormal classes the model may not (``ig``,
  ``erythroblast``), ``other`` (a white cell of no listed class) and ``artefact`` (not a cell):
  :func:`review_labels`, keyed by :meth:`KeyMap.for_model` (``1``-``8`` the PBC classes whatever the
  model, ``9`` other, ``0`` artefact, letters for the model's further classes);
* every decision is timed (the time the cell was on screen, summed over visits) and handed to a
  writer, normally ``SlideStore.set_review(cell_id, label, reviewer, seconds)``, which appends a
  review row beside the model's call and never overwrites it.

The session is plain Python with an injectable clock, so it is tested without Qt.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .cells import CellRecord
from .flags import PBC_CLASSES

__all__ = [
    "ARTEFACT",
    "OTHER",
    "PBC_ABNORMAL",
    "Decision",
    "KeyMap",
    "ReviewAction",
    "ReviewSession",
    "ReviewSummary",
    "review_labels",
    "review_summary",
]

#: the reviewer's label for a white cell of none of the listed classes (e.g. a blast a model cannot name)
OTHER = "other"
#: the reviewer's label for something that is not a cell (debris, stain, a smudge); always key ``0``
ARTEFACT = "artefact"
#: PBC classes that mark an abnormal smear: a reviewer can give them even when the model cannot name them
PBC_ABNORMAL: tuple[str, ...] = ("ig", "erythroblast")
#: keys for labels beyond ``1``-``8`` (free of the accept / skip / back letters A, N, P)
OVERFLOW_KEYS: tuple[str, ...] = tuple("QWERTYUIOSDFGHJKLZXCVBM")


def review_labels(model_classes: Iterable[str] = ()) -> list[str]:
    """Every label a reviewer can give, in key order: the PBC classes
    (:data:`~scope_stream.view.flags.PBC_CLASSES`, in that order, whether the model knows them or not: the PBC
    abnormal classes :data:`PBC_ABNORMAL` above all), then the model's other classes in its order, then
    :data:`OTHER` and :data:`ARTEFACT`. So a reviewer's keys for the PBC classes never move with the model."""
    extra = [c for c in dict.fromkeys(model_classes) if c and c not in PBC_CLASSES and c not in (OTHER, ARTEFACT)]
    return [*PBC_CLASSES, *extra, OTHER, ARTEFACT]


def _assign_keys(classes: Sequence[str], digits: int) -> dict[str, str]:
    """``1``..``digits`` for the first classes, then :data:`OVERFLOW_KEYS`."""
    keys = [str(i + 1) for i in range(digits)] + list(OVERFLOW_KEYS)
    if len(classes) > len(keys):
        raise ValueError(f"{len(classes)} classes are more than the {len(keys)} review keys")
    return dict(zip(keys, classes, strict=False))


def _key_order(key: str) -> tuple[int, int, str]:
    """Digits 1-9, then 0, then letters in :data:`OVERFLOW_KEYS` order."""
    if key.isdigit():
        return (0, int(key) if key != "0" else 10, key)
    return (1, OVERFLOW_KEYS.index(key) if key in OVERFLOW_KEYS else len(OVERFLOW_KEYS), key)


class ReviewAction(str, Enum):
    ACCEPT = "accept"
    RELABEL = "relabel"
    NEXT = "next"
    PREVIOUS = "previous"


@dataclass(frozen=True)
class KeyMap:
    """Key names (as Qt spells them: ``"A"``, ``"Space"``, ``"Right"``, ``"1"``) to review actions.

    ``class_keys`` maps a key to a class label; by default (:meth:`for_model` without a model) ``1``..``8``
    are the PBC classes in :data:`~scope_stream.view.flags.PBC_CLASSES` order (neutrophil, lymphocyte,
    monocyte, eosinophil, basophil, ig, erythroblast, platelet), ``9`` is ``"other"`` and ``0`` is
    ``"artefact"`` (not a cell).
    """

    accept: tuple[str, ...] = ("A", "Space", "Return", "Enter")
    next: tuple[str, ...] = ("Right", "N", "Down")
    previous: tuple[str, ...] = ("Left", "P", "Up", "Backspace")
    class_keys: Mapping[str, str] = field(default_factory=lambda: dict(KeyMap.for_model(()).class_keys))

    @classmethod
    def for_model(cls, model_classes: Iterable[str] = ()) -> KeyMap:
        """The review keys for a model: every label of :func:`review_labels`; ``1``-``8`` the PBC classes, the
        model's further classes on letters (:data:`OVERFLOW_KEYS`), ``9`` other and ``0`` artefact, always."""
        labels = [c for c in review_labels(model_classes) if c not in (OTHER, ARTEFACT)]
        keys = _assign_keys(labels, 8)
        keys.update({"9": OTHER, "0": ARTEFACT})
        return cls(class_keys=dict(sorted(keys.items(), key=lambda kv: _key_order(kv[0]))))

    @classmethod
    def for_classes(cls, classes: Sequence[str], extra: Mapping[str, str] | None = None) -> KeyMap:
        """Keys ``1``..``9`` for the classes in order (letters beyond nine), plus ``extra`` (default ``0``:
        artefact)."""
        keys = _assign_keys(list(dict.fromkeys(classes)), 9)
        keys.update({"0": ARTEFACT} if extra is None else dict(extra))
        return cls(class_keys=keys)

    @property
    def labels(self) -> list[str]:
        """The labels a reviewer can give, in key order."""
        return [v for _k, v in sorted(self.class_keys.items(), key=lambda kv: _key_order(kv[0]))]

    def key_for(self, label: str) -> str | None:
        """The key that gives ``label`` (None if none does)."""
        return next((k for k, v in self.class_keys.items() if v == label), None)

    def action(self, key: str) -> tuple[ReviewAction, str] | None:
        """``(action, label)`` for a key name (label only for RELABEL), or None if unbound."""
        k = key.strip()
        up = k.upper() if len(k) == 1 else k
        if k in self.class_keys:
            return ReviewAction.RELABEL, self.class_keys[k]
        if up in self.class_keys:
            return ReviewAction.RELABEL, self.class_keys[up]
        if up in self.accept or k in self.accept:
            return ReviewAction.ACCEPT, ""
        if up in self.next or k in self.next:
            return ReviewAction.NEXT, ""
        if up in self.previous or k in self.previous:
            return ReviewAction.PREVIOUS, ""
        return None

    def legend(self) -> list[tuple[str, str]]:
        """``(key, what it does)`` pairs for the widget's help line."""
        rows = [("/".join(self.accept[:2]), "accept"), ("/".join(self.next[:1]), "skip")]
        rows.append(("/".join(self.previous[:1]), "back"))
        rows += sorted(self.class_keys.items(), key=lambda kv: _key_order(kv[0]))
        return rows

    def describe(self) -> str:
        """The key map in words, for the widget's tooltip and help line."""
        arrows = {"Right": "→", "Left": "←", "Up": "↑", "Down": "↓", "Return": "Enter"}
        nav = " · ".join(
            f"{' / '.join(arrows.get(k, k) for k in keys)} {what}"
            for keys, what in ((self.accept[:3], "accept"), (self.next[:1], "skip"), (self.previous[:1], "back"))
        )
        classes = " · ".join(f"{k} {v}" for k, v in self.legend()[3:])
        return f"Review keys: {nav}\nRe-label: {classes}"


@dataclass(frozen=True)
class Decision:
    """One review: the reviewer's label beside the model's, and the seconds it took."""

    cell_id: str
    model_label: str
    label: str
    seconds: float
    at: float  # unix s

    @property
    def changed(self) -> bool:
        return self.label != self.model_label


@dataclass(frozen=True)
class ReviewSummary:
    """Totals for a slide's review, for the report."""

    n_cells: int  # cells in the queue
    n_reviewed: int
    n_changed: int  # reviewer disagreed with the model
    seconds_total: float
    seconds_per_cell: float  # mean over reviewed cells, NaN if none
    seconds_median: float
    changes: dict[str, int]  # "model -> reviewer" -> count

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_cells": self.n_cells,
            "n_reviewed": self.n_reviewed,
            "n_changed": self.n_changed,
            "seconds_total": round(self.seconds_total, 3),
            "seconds_per_cell": None if math.isnan(self.seconds_per_cell) else round(self.seconds_per_cell, 3),
            "seconds_median": None if math.isnan(self.seconds_median) else round(self.seconds_median, 3),
            "changes": dict(self.changes),
        }


def _summarise(n_cells: int, decisions: Iterable[Decision]) -> ReviewSummary:
    latest: dict[str, Decision] = {}
    seconds: dict[str, float] = {}
    for d in decisions:
        latest[d.cell_id] = d
        if math.isfinite(d.seconds):
            seconds[d.cell_id] = seconds.get(d.cell_id, 0.0) + d.seconds
    changes: dict[str, int] = {}
    for d in latest.values():
        if d.changed:
            key = f"{d.model_label or '?'} -> {d.label}"
            changes[key] = changes.get(key, 0) + 1
    secs = list(seconds.values())
    return ReviewSummary(
        n_cells=n_cells,
        n_reviewed=len(latest),
        n_changed=sum(1 for d in latest.values() if d.changed),
        seconds_total=float(sum(secs)),
        seconds_per_cell=float(statistics.fmean(secs)) if secs else math.nan,
        seconds_median=float(statistics.median(secs)) if secs else math.nan,
        changes=changes,
    )


def review_summary(records: Iterable[CellRecord], *, flagged_only: bool = True) -> ReviewSummary:
    """Summary of reviews already in the store (records carry ``reviewer_label``/``review_seconds``).

    The store keeps the latest review per cell; ``review_seconds`` there is what that review took.
    """
    recs = [r for r in records if r.classified and (r.flagged or not flagged_only)]
    decisions = [Decision(r.cell_id, r.label, r.reviewer_label, r.review_seconds, math.nan) for r in recs if r.reviewed]
    return _summarise(len(recs), decisions)


Writer = Callable[[Decision], None]


class ReviewSession:
    """A keyboard-driven review queue.

    Parameters
    ----------
    records:
        cells to review (typically the flagged ones); unclassified cells are skipped.
    writer:
        called with each :class:`Decision` (e.g. to ``SlideStore.set_review``); if it raises, the
        decision is kept in :attr:`failed` and the error re-raised so the UI can show it.
    keymap:
        key bindings.
    clock:
        seconds, monotonic (injectable for tests).
    skip_reviewed:
        leave cells that already carry a reviewer label out of the queue.
    """

    def __init__(
        self,
        records: Iterable[CellRecord] = (),
        *,
        writer: Writer | None = None,
        keymap: KeyMap | None = None,
        clock: Callable[[], float] = time.monotonic,
        skip_reviewed: bool = False,
    ) -> None:
        self.keymap = keymap or KeyMap()
        self._writer = writer
        self._clock = clock
        self._skip_reviewed = skip_reviewed
        self._queue: list[CellRecord] = []
        self._pos: dict[str, int] = {}  # cell id -> index in the queue
        self._ids: set[str] = set()
        self._index = 0
        self._shown_at: float | None = None
        self._viewed: dict[str, float] = {}  # seconds on screen, not yet attributed to a decision
        self.decisions: list[Decision] = []
        self.failed: list[Decision] = []
        self._decided: dict[str, Decision] = {}
        self.extend(records)

    # ------------------------------------------------------------------ queue
    @staticmethod
    def _priority(rec: CellRecord) -> float:
        """Higher first: the flag score, else the larger of anomaly score and uncertainty."""
        if math.isfinite(rec.flag_score):
            return rec.flag_score
        vals = [v for v in (rec.anomaly_score, rec.uncertainty) if math.isfinite(v)]
        return max(vals) if vals else -math.inf

    def _order(self, recs: list[CellRecord]) -> list[CellRecord]:
        groups: dict[str, list[CellRecord]] = {}
        for r in recs:
            groups.setdefault(r.label, []).append(r)
        for g in groups.values():
            g.sort(key=lambda r: (-self._priority(r), -_nan_to(r.uncertainty), r.cell_id))
        ordered = sorted(groups.values(), key=lambda g: (-self._priority(g[0]), g[0].label))
        return [r for g in ordered for r in g]

    def extend(self, records: Iterable[CellRecord]) -> int:
        """Add cells (e.g. flags that arrived while reviewing); returns how many were new.

        Cells already decided or before the current position keep their place; the rest of the
        queue is re-ordered with the newcomers, so the current cell never jumps away.
        """
        new = [
            r
            for r in records
            if r.classified and r.cell_id not in self._ids and not (self._skip_reviewed and r.reviewed)
        ]
        if not new:
            return 0
        for r in new:
            self._ids.add(r.cell_id)
        head = self._queue[: self._index + 1] if self._queue else []
        tail = self._queue[self._index + 1 :] if self._queue else []
        self._queue = head + self._order(tail + new)
        self._pos = {r.cell_id: i for i, r in enumerate(self._queue)}
        if self._shown_at is None and self.current is not None:
            self._shown_at = self._clock()
        return len(new)

    def update_record(self, rec: CellRecord) -> bool:
        """Refresh a queued cell's record (e.g. its crop index arrived from the store); False if not queued.

        A decision taken in this session stays on the record.
        """
        i = self._pos.get(rec.cell_id)
        if i is None:
            return False
        d = self._decided.get(rec.cell_id)
        self._queue[i] = rec if d is None else rec.with_review(d.label, seconds=d.seconds)
        return True

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def index(self) -> int:
        return self._index

    @property
    def current(self) -> CellRecord | None:
        return self._queue[self._index] if 0 <= self._index < len(self._queue) else None

    @property
    def queue(self) -> list[CellRecord]:
        return list(self._queue)

    def upcoming(self, n: int) -> list[CellRecord]:
        """The next ``n`` cells after the current one (for the gallery strip)."""
        return self._queue[self._index + 1 : self._index + 1 + n]

    @property
    def n_decided(self) -> int:
        return len(self._decided)

    @property
    def done(self) -> bool:
        return bool(self._queue) and len(self._decided) >= len(self._queue)

    def decision_for(self, cell_id: str) -> Decision | None:
        return self._decided.get(cell_id)

    # ------------------------------------------------------------------ timing
    def _leave_current(self) -> None:
        cur = self.current
        if cur is not None and self._shown_at is not None:
            self._viewed[cur.cell_id] = self._viewed.get(cur.cell_id, 0.0) + max(0.0, self._clock() - self._shown_at)
        self._shown_at = None

    def _show(self, index: int) -> None:
        self._index = max(0, min(index, len(self._queue)))
        self._shown_at = self._clock() if self.current is not None else None

    def pause(self) -> None:
        """Stop the clock (widget hidden / focus lost): time away is not charged to the cell."""
        self._leave_current()

    def resume(self) -> None:
        if self._shown_at is None and self.current is not None:
            self._shown_at = self._clock()

    # ------------------------------------------------------------------ actions
    def handle_key(self, key: str) -> Decision | None:
        """Apply the action bound to ``key``; returns the decision made, if any. Unbound keys do nothing."""
        act = self.keymap.action(key)
        if act is None:
            return None
        action, label = act
        if action is ReviewAction.ACCEPT:
            return self.accept()
        if action is ReviewAction.RELABEL:
            return self.relabel(label)
        if action is ReviewAction.NEXT:
            self.next()
        else:
            self.previous()
        return None

    def accept(self) -> Decision | None:
        """The model's call is right."""
        cur = self.current
        return None if cur is None else self._decide(cur, cur.label)

    def relabel(self, label: str) -> Decision | None:
        """The cell is ``label`` (may equal the model's call: then it is an accept)."""
        cur = self.current
        if cur is None:
            return None
        if not label:
            raise ValueError("a review label must be non-empty")
        return self._decide(cur, label)

    def next(self) -> None:
        """Skip to the next cell without deciding (its viewing time stays with it)."""
        if self.current is None:
            return
        self._leave_current()
        self._show(min(self._index + 1, len(self._queue)))

    def previous(self) -> None:
        if self._index == 0 and self.current is not None:
            return
        self._leave_current()
        self._show(max(self._index - 1, 0))

    def goto(self, cell_id: str) -> bool:
        """Show ``cell_id`` now (False if it is not in the queue)."""
        i = self._pos.get(cell_id)
        if i is None:
            return False
        self._leave_current()
        self._show(i)
        return True

    def _decide(self, cur: CellRecord, label: str) -> Decision:
        self._leave_current()
        seconds = self._viewed.pop(cur.cell_id, 0.0)
        d = Decision(cur.cell_id, cur.label, label, seconds, time.time())
        if self._writer is not None:
            try:
                self._writer(d)
            except Exception:
                self.failed.append(d)
                self._show(self._index)  # stay on the cell; the clock restarts
                raise
        self.decisions.append(d)
        self._decided[cur.cell_id] = d
        self._queue[self._index] = cur.with_review(label, seconds=seconds)
        self._show(self._next_undecided(self._index + 1))
        return d

    def _next_undecided(self, start: int) -> int:
        for i in range(start, len(self._queue)):
            if self._queue[i].cell_id not in self._decided:
                return i
        for i in range(0, start):
            if self._queue[i].cell_id not in self._decided:
                return i
        return len(self._queue)  # everything decided: past the end

    def summary(self) -> ReviewSummary:
        return _summarise(len(self._queue), self.decisions)


def _nan_to(v: float, fill: float = -math.inf) -> float:
    return v if math.isfinite(v) else fill
