"""Scoring a scan against the virtual slide's ground truth: pure functions, no I/O.

A planted abnormal cell counts as *found* when a flagged cell lies within ``radius_um`` of it. A flag
counts as *false* when no planted abnormal cell lies within ``radius_um`` of it. Matching is one-to-one
and greedy by distance, so two flags on one planted cell count once as found and once as false.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Point", "ScanScore", "differential_count", "match_points", "percentiles", "score_scan"]


@dataclass(frozen=True)
class Point:
    """Something at a stage position: a planted cell or a detected/flagged one."""

    id: str
    x_um: float
    y_um: float
    label: str = ""


def match_points(truth: Sequence[Point], found: Sequence[Point], radius_um: float) -> list[tuple[int, int, float]]:
    """One-to-one matches (truth index, found index, distance) within ``radius_um``, nearest pairs first."""
    if not truth or not found:
        return []
    t = np.array([[p.x_um, p.y_um] for p in truth], dtype=float)
    f = np.array([[p.x_um, p.y_um] for p in found], dtype=float)
    d = np.sqrt(((t[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    ti, fi = np.nonzero(d <= radius_um)
    order = np.argsort(d[ti, fi], kind="stable")
    used_t: set[int] = set()
    used_f: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for k in order:
        a, b = int(ti[k]), int(fi[k])
        if a in used_t or b in used_f:
            continue
        used_t.add(a)
        used_f.add(b)
        pairs.append((a, b, float(d[a, b])))
    return pairs


@dataclass(frozen=True)
class ScanScore:
    """How a scan did against the planted truth."""

    planted_abnormal: int
    found_abnormal: int
    sensitivity: float  # found / planted (nan when nothing was planted)
    flags: int
    false_flags: int
    wbc_detected: int
    false_flags_per_100_wbc: float  # nan when no WBC was detected
    wbc_planted: int
    wbc_matched: int
    wbc_recall: float  # detected WBCs matched to planted WBCs / planted WBCs
    missed_abnormal_ids: list[str]

    def as_dict(self) -> dict[str, object]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def score_scan(
    planted_wbc: Sequence[Point],
    abnormal_ids: Iterable[str],
    detected_wbc: Sequence[Point],
    flagged: Sequence[Point],
    radius_um: float = 6.0,
) -> ScanScore:
    """Sensitivity for the planted abnormal cells and false flags per 100 detected white cells."""
    abnormal = set(abnormal_ids)
    planted_abn = [p for p in planted_wbc if p.id in abnormal]
    hits = match_points(planted_abn, flagged, radius_um)
    found = {planted_abn[a].id for a, _, _ in hits}
    false = len(flagged) - len(hits)
    wbc_hits = match_points(planted_wbc, detected_wbc, radius_um)
    n_abn = len(planted_abn)
    return ScanScore(
        planted_abnormal=n_abn,
        found_abnormal=len(found),
        sensitivity=len(found) / n_abn if n_abn else float("nan"),
        flags=len(flagged),
        false_flags=false,
        wbc_detected=len(detected_wbc),
        false_flags_per_100_wbc=100.0 * false / len(detected_wbc) if detected_wbc else float("nan"),
        wbc_planted=len(planted_wbc),
        wbc_matched=len(wbc_hits),
        wbc_recall=len(wbc_hits) / len(planted_wbc) if planted_wbc else float("nan"),
        missed_abnormal_ids=sorted(p.id for p in planted_abn if p.id not in found),
    )


def differential_count(labels: Iterable[str]) -> dict[str, dict[str, float]]:
    """Counts and percentages per class, largest first."""
    counts = Counter(labels)
    total = sum(counts.values())
    return {
        label: {"count": n, "percent": round(100.0 * n / total, 2) if total else 0.0}
        for label, n in counts.most_common()
    }


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ...}`` of ``values`` (None where there are none)."""
    if len(values) == 0:
        return {f"p{int(q)}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}
