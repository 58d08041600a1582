"""Scoring a scan against ground truth, on hand-made examples."""

from __future__ import annotations

import math

import pytest

from scope_stream.demo.metrics import Point, differential_count, match_points, percentiles, score_scan


def test_match_is_one_to_one_and_nearest_first() -> None:
    truth = [Point("a", 0, 0), Point("b", 10, 0)]
    found = [Point("x", 1, 0), Point("y", 2, 0), Point("z", 9, 0)]
    pairs = match_points(truth, found, radius_um=3)
    assert sorted((t, f) for t, f, _ in pairs) == [(0, 0), (1, 2)]


def test_score_counts_found_missed_and_false() -> None:
    planted = [Point("n1", 0, 0), Point("ab1", 100, 0), Point("ab2", 200, 0), Point("n2", 300, 0)]
    detected = [Point("d1", 1, 0), Point("d2", 101, 0), Point("d3", 301, 0), Point("d4", 500, 0)]
    flagged = [Point("d2", 101, 0), Point("d2bis", 102, 0), Point("d4", 500, 0)]
    s = score_scan(planted, {"ab1", "ab2"}, detected, flagged, radius_um=5)
    assert s.planted_abnormal == 2 and s.found_abnormal == 1 and s.sensitivity == 0.5
    assert s.missed_abnormal_ids == ["ab2"]
    assert s.flags == 3 and s.false_flags == 2
    assert s.false_flags_per_100_wbc == pytest.approx(50.0)
    assert s.wbc_matched == 3 and s.wbc_recall == pytest.approx(0.75)


def test_score_with_nothing_planted_or_detected() -> None:
    s = score_scan([], [], [], [])
    assert math.isnan(s.sensitivity) and math.isnan(s.false_flags_per_100_wbc)
    assert s.as_dict()["sensitivity"] is None


def test_differential_count_and_percentiles() -> None:
    dc = differential_count(["a", "b", "a", "a"])
    assert dc == {"a": {"count": 3, "percent": 75.0}, "b": {"count": 1, "percent": 25.0}}
    assert percentiles([1, 2, 3, 4, 5]) == {"p50": 3.0, "p95": pytest.approx(4.8)}
    assert percentiles([]) == {"p50": None, "p95": None}


def test_classifier_on_slide_sweeps_the_anomaly_threshold() -> None:
    from scope_stream.acquire.slide import PlantedCell
    from scope_stream.demo.report import classifier_on_slide

    truth = [
        PlantedCell("n1", "neutrophil", "WBC", False, 0, 0, 10),
        PlantedCell("n2", "lymphocyte", "WBC", False, 100, 0, 10),
        PlantedCell("a1", "ig", "WBC", True, 200, 0, 10),
        PlantedCell("a2", "erythroblast", "WBC", True, 300, 0, 10),
    ]
    called = [  # found 1 µm off; n2 miscalled; anomaly scores 0.5, 0.9, 0.82, 0.97
        {"cell_id": f"c{i}", "x_um": t.x_um + 1, "y_um": 0.0, "label": lab, "anomaly_score": a}
        for i, (t, lab, a) in enumerate(
            zip(truth, ["neutrophil", "neutrophil", "neutrophil", "lymphocyte"], [0.5, 0.9, 0.82, 0.97], strict=True)
        )
    ]
    out = classifier_on_slide(truth, called, radius_um=6.0)
    assert out["matched"] == 4 and out["accuracy_normal"] == 0.5
    assert out["anomaly_auroc"] == 0.75  # pairs (abnormal > normal): 0.82>0.5, 0.97>0.5, 0.97>0.9; 0.82<0.9
    by = {row["anomaly_threshold"]: row for row in out["anomaly_threshold_sweep"]}
    assert by[0.8] == {"anomaly_threshold": 0.8, "sensitivity": 1.0, "false_flags_per_100": 25.0}
    assert by[0.85]["sensitivity"] == 0.5 and by[0.85]["false_flags_per_100"] == 25.0
    assert by[0.95]["sensitivity"] == 0.5 and by[0.95]["false_flags_per_100"] == 0.0
