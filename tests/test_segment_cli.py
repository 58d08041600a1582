"""``scope-stream evaluate detection`` on a small Pascal-VOC folder, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scope_stream.cli import app
from scope_stream.datasets import data_root

runner = CliRunner()


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.data
def test_evaluate_detection_writes_figures(tmp_path: Path) -> None:
    src = data_root() / "bccd"
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        shutil.copy(src / "JPEGImages" / f"{name}.jpg", voc / "JPEGImages")
        shutil.copy(src / "Annotations" / f"{name}.xml", voc / "Annotations")
    out = tmp_path / "figures" / "detection.json"
    res = runner.invoke(
        app,
        ["evaluate", "detection", "--voc", str(voc), "--json", str(out), "--tile-um-per-px", "", "--all-cores"],
    )
    assert res.exit_code == 0, res.output
    assert "WBC recall (IoU>=0.5)" in res.output
    report = json.loads(out.read_text())
    assert report["fields"] == 3
    everything = report["subsets"]["all"]
    assert everything["wbc_iou50"]["recall"] == 1.0
    assert everything["wbc_iou50"]["gt"] == 3
    for key in ("wbc_centroid", "rbc_count_error_pct", "platelet_recall", "ms_per_field_mean"):
        assert key in everything
    assert report["subsets"]["even (tuning)"]["fields"] == 2
    assert report["config"]["drop_border_cells"] is True  # the configuration given, as given
    assert report["large_tiles"] == []
    assert report["um_per_px"] == 0.075  # BCCD's, the scale detection was tuned at, unless asked otherwise
    est = runner.invoke(
        app, ["evaluate", "detection", "--voc", str(voc), "--json", str(out), "--tile-um-per-px", "",
              "--estimate-pixel-size"],
    )  # fmt: skip
    assert est.exit_code == 0, est.output
    assert json.loads(out.read_text())["um_per_px"] == "estimated per field"
    both = runner.invoke(
        app, ["evaluate", "detection", "--voc", str(voc), "--um-per-px", "0.1", "--estimate-pixel-size"]
    )
    assert both.exit_code != 0 and "exclude each other" in both.output


def test_evaluate_detection_refuses_a_folder_that_is_not_voc(tmp_path: Path) -> None:
    res = runner.invoke(app, ["evaluate", "detection", "--voc", str(tmp_path), "--tile-um-per-px", ""])
    assert res.exit_code == 2
    assert "Pascal-VOC" in _flat(res.output)


def test_evaluate_detection_rejects_bad_options(tmp_path: Path) -> None:
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    res = runner.invoke(app, ["evaluate", "detection", "--voc", str(tmp_path)])
    assert res.exit_code == 2 and "no annotation in Annotations/" in _flat(res.output)
    res = runner.invoke(app, ["evaluate", "detection", "--voc", str(tmp_path), "--tile-um-per-px", "a,b"])
    assert res.exit_code == 2
