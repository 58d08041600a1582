"""The main job end to end: a small demo scan (tiny real model, small virtual slide) checked against truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scope_stream.config import ScopeStreamConfig
from scope_stream.demo.run import default_demo_config, run_demo


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scope_stream.classify.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), classes=["neutrophil", "lymphocyte"], steps=30)


def _small(model: Path, **flags: object) -> ScopeStreamConfig:
    return ScopeStreamConfig.model_validate(
        {
            "slide_id": "test-slide",
            "microscope": {
                "seed": 3,
                "wbc_per_mm2": 150,
                "abnormal_fraction": 0.3,
                "camera_width": 256,
                "camera_height": 256,
            },
            "scan": {"x0_um": 0, "y0_um": 0, "x1_um": 300, "y1_um": 300, "overlap": 0.15, "reimage_budget": 2},
            "pipeline": {"n_workers": 1},
            "classifier": {"model": str(model)},
            "flags": flags,
        }
    )


def test_default_demo_config_matches_configs_demo_yaml(repo_root: Path) -> None:
    from scope_stream.config import load_scope_config

    assert load_scope_config(repo_root / "configs" / "demo.yaml") == default_demo_config()


@pytest.mark.slow
def test_small_demo_scan_reports_against_ground_truth(tiny_model: Path, tmp_path: Path) -> None:
    # anomaly threshold 0: every classified white cell is flagged, so the report's sensitivity and
    # false-flag figures are fixed by detection alone and can be checked exactly against the truth
    cfg = _small(tiny_model, anomaly_threshold=0.0)
    report = run_demo(cfg, tmp_path, viewer=False)

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["slide_id"] == "test-slide" and (tmp_path / "report.html").is_file()
    from scope_stream.acquire.plan import ScanPlan

    planned = len(ScanPlan.from_config(cfg))
    assert planned >= 4 and report["tiles"]["scan"] == planned  # every field of the plan, once
    gt = report["ground_truth"]
    assert gt["wbc_planted"] >= 10 and gt["wbc_recall"] >= 0.9
    assert gt["planted_abnormal"] >= 2
    # everything detected is flagged: every detected planted abnormal cell is found ...
    assert gt["flags"] == report["cells"]["WBC"] == len(report["flagged"])
    assert gt["sensitivity"] >= 0.9
    # ... and every flag that is not on a planted abnormal cell is a false flag
    assert gt["false_flags"] == gt["flags"] - gt["found_abnormal"]
    assert gt["false_flags_per_100_wbc"] == pytest.approx(100 * gt["false_flags"] / gt["wbc_detected"])
    # adaptive re-imaging spent its budget on flagged cells
    assert report["tiles"]["reimage"] >= 1 and len(report["run"]["reimages"]) <= 2
    assert report["speed"]["latency_ms"]["p50"] is not None and report["speed"]["tiles_per_s"] > 0
    assert sum(v["count"] for v in report["differential"].values()) == report["cells"]["WBC"]
    # the classifier's own figures on the planted cells it was shown
    cs = report["classifier_on_slide"]
    assert cs["matched"] == sum(n for row in cs["confusion"].values() for n in row.values()) >= 10
    assert 0.0 <= cs["accuracy_normal"] <= 1.0 and (cs["anomaly_auroc"] is None or 0 <= cs["anomaly_auroc"] <= 1)


@pytest.mark.slow
def test_demo_with_nothing_flagged(tiny_model: Path, tmp_path: Path) -> None:
    # every flag reason off, the unfamiliar one too (the tiny toy model finds every real cell unfamiliar)
    cfg = _small(tiny_model, anomaly_threshold=1.0, uncertainty_threshold=1.0, unfamiliar_threshold=1.0)
    report = run_demo(cfg, tmp_path, viewer=False)
    gt = report["ground_truth"]
    assert report["flagged"] == [] and gt["found_abnormal"] == 0 and gt["sensitivity"] == 0.0
    assert report["needs_review"] is False and report["tiles"]["reimage"] == 0


@pytest.mark.slow
@pytest.mark.skipif(__import__("sys").platform == "win32", reason="sends SIGTERM")
def test_sigterm_stops_the_demo_and_leaves_no_process(tiny_model: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    cfg = _small(tiny_model)
    cfg.scan.x1_um = cfg.scan.y1_um = 900.0  # long enough to be mid-scan when killed
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scope_stream", "demo", "--no-viewer", "-c", str(path), "-o", str(tmp_path / "out")],
        stdout=(tmp_path / "demo.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and len(children) < 3:  # broker, worker, sink (+ resource tracker)
        children = me.children(recursive=True)
        time.sleep(0.2)
    assert len(children) >= 3, "the demo did not start its pipeline"
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    _gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
