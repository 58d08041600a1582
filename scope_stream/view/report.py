"""The review part of a slide report: what the operator decided, beside the model, and the time it took.

:func:`review_report` reads a slide store (finished or not) and returns a JSON-able dict;
:func:`export_review` writes it as ``<slide_id>.review.json`` plus one CSV row per flagged or
reviewed cell (``<slide_id>.review.csv``) next to the store. The demo's slide report calls these;
the napari widget's *Export* button too.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .cells import CellRecord
from .counts import DifferentialCount, slide_state
from .follow import StoreFollower

__all__ = ["export_review", "review_report", "review_rows"]


def _load(path: Path | str) -> tuple[StoreFollower, list[CellRecord]]:
    f = StoreFollower(path, crops="none")
    delta = f.poll()
    recs = []
    for c in delta.cells:
        if c.cell_id in delta.reviews:
            label, reviewer, _ = delta.reviews[c.cell_id]
            c = c.with_review(label, reviewer, f.review_seconds.get(c.cell_id, math.nan))
        recs.append(c)
    return f, recs


def review_rows(records: list[CellRecord]) -> list[dict[str, Any]]:
    """One row per flagged or reviewed cell, highest score first."""
    rows = []
    for r in sorted(
        (r for r in records if r.flagged or r.reviewed), key=lambda r: -r.score if math.isfinite(r.score) else math.inf
    ):
        rows.append(
            {
                "cell_id": r.cell_id,
                "tile_id": r.tile_id,
                "x_um": round(r.x_um, 2),
                "y_um": round(r.y_um, 2),
                "model_label": r.label,
                "reviewer_label": r.reviewer_label,
                "agrees": (r.reviewer_label == r.label) if r.reviewed else "",
                "reviewer": r.reviewer,
                "review_seconds": "" if math.isnan(r.review_seconds) else round(r.review_seconds, 3),
                "flag_reasons": ",".join(r.flag_reasons),
                "flag_score": "" if math.isnan(r.flag_score) else round(r.flag_score, 4),
                "uncertainty": "" if math.isnan(r.uncertainty) else round(r.uncertainty, 4),
                "anomaly_score": "" if math.isnan(r.anomaly_score) else round(r.anomaly_score, 4),
            }
        )
    return rows


def review_report(path: Path | str) -> dict[str, Any]:
    """The review summary of a slide store: counts, differential before/after review, time spent."""
    f, recs = _load(path)
    flagged = [r for r in recs if r.flagged]
    reviewed = [r for r in recs if r.reviewed]
    dc = DifferentialCount()
    dc.add_many(recs)
    seconds = [f.review_seconds[c] for c in f.review_seconds]
    total = float(sum(seconds))
    return {
        "slide_id": f.slide_id,
        "store": str(Path(path)),
        "status": f.status,
        "state": slide_state(
            n_tiles=f.n_tiles,
            done=f.status == "done",
            n_flagged=len(flagged),
            n_flagged_reviewed=sum(1 for r in flagged if r.reviewed),
        ).value,
        "n_tiles": f.n_tiles,
        "n_cells": len(recs),
        "n_classified": dc.n_classified,
        "n_flagged": len(flagged),
        "n_reviewed": len(reviewed),
        "n_flagged_reviewed": sum(1 for r in flagged if r.reviewed),
        "n_changed": sum(1 for r in reviewed if r.reviewer_label != r.label),
        "review_seconds_total": round(total, 3),
        "review_seconds_per_cell": round(total / len(reviewed), 3) if reviewed else None,
        "reviewers": sorted({r.reviewer for r in reviewed if r.reviewer}),
        "differential": dc.as_dict(),
        "kinds": dc.kinds,
    }


def export_review(path: Path | str, out_dir: Path | str | None = None) -> tuple[Path, Path]:
    """Write ``<slide_id>.review.json`` and ``<slide_id>.review.csv`` (default: next to the store)."""
    store = Path(path)
    report = review_report(store)
    _, recs = _load(store)
    rows = review_rows(recs)
    out = Path(out_dir) if out_dir is not None else store.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = report["slide_id"] or store.stem
    json_path = out / f"{stem}.review.json"
    csv_path = out / f"{stem}.review.csv"
    json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    fields = list(rows[0]) if rows else ["cell_id", "model_label", "reviewer_label", "review_seconds"]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return json_path, csv_path
