"""The slide report a haematologist reads: report.html and report.pdf built from a small real store."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from view_helpers import CLASSES, make_result, make_tile

from scope_stream.acquire.slide import PlantedCell
from scope_stream.demo.report import (
    UNCLASSIFIED,
    build_report,
    fmt_seconds,
    write_html,
    write_pdf,
    write_report,
)
from scope_stream.vocabulary import Flag, FlagReason

MODEL_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "platelet", "blast")


def _store(path: Path) -> Any:
    """Four survey fields (two cells each, the first flagged; one flag 'unfamiliar') and a re-image of the
    first flagged cell at 50x whose one cell lies 1 µm off it."""
    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    store = SlideStore.open_or_create(
        path, slide_id="s1", config=StoreConfig(commit_every=1), scan_region_um=(100.0, 200.0, 160.0, 260.0)
    )
    labels = ["lymphocyte", "monocyte", "neutrophil", "lymphocyte"]
    for i, (x, y) in enumerate([(100.0, 200.0), (160.0, 200.0), (100.0, 260.0), (160.0, 260.0)]):
        tile = make_tile(i, x, y, size=128)
        res = make_result(tile, [(30.0, 40.0), (90.0, 70.0)], [labels[i], "neutrophil"], flagged={0})
        probs = {c: 1.0 / len(MODEL_CLASSES) for c in MODEL_CLASSES}  # the model's classes: these keys
        res.calls[:] = [  # the flagged first cell is anomalous (0.92), the second not (0.3)
            call.model_copy(update={"probabilities": probs, "anomaly_score": 0.92 if k == 0 else 0.3})
            for k, call in enumerate(res.calls)
        ]
        if i == 1:
            f = res.flags[0]
            res.flags[0] = Flag(
                cell_id=f.cell_id, tile_id=f.tile_id, slide_id=f.slide_id, reasons=[FlagReason.UNFAMILIAR],
                score=f.score, label=f.label, x_um=f.x_um, y_um=f.y_um,
            )  # fmt: skip
        store.write_result(res, tile=tile)
    first = store.cells(flagged=True)[0]
    assert first["cell_id"] == "t0000-c0"
    re_tile = make_tile(9, first["x_um"], first["y_um"], size=128, p=0.2, kind="reimage")
    # one cell 1 µm (5 px at 0.2 µm/px) right of the flagged cell's position, which is the field's centre
    res = make_result(re_tile, [(64.0, 69.0)], ["lymphocyte"])
    store.write_result(res, tile=re_tile)
    store.mark_done({})
    return SlideStore.open(path)


@pytest.fixture
def built(tmp_path: Path) -> tuple[dict[str, Any], Any, Path]:
    store = _store(tmp_path / "s1.zarr")
    cells = store.cells(kind="WBC")
    flagged = [c for c in cells if c["flagged"]]
    truth = [  # a planted abnormal cell under each of two flags, a normal one under an unflagged cell
        PlantedCell("p1", "ig", "WBC", True, flagged[0]["x_um"], flagged[0]["y_um"], 10.0),
        PlantedCell("p2", "erythroblast", "WBC", True, flagged[1]["x_um"], flagged[1]["y_um"], 10.0),
        PlantedCell("p3", "neutrophil", "WBC", False, cells[1]["x_um"], cells[1]["y_um"], 10.0),
    ]
    run = {
        "scope_stream": "0.0",
        "model": "models/x",
        "workers": 1,
        "flags": {"anomaly_threshold": None, "uncertainty_threshold": None},
        "scan": {"x0_um": 0, "objective": "20x"},
        "scan_seconds": 144.8352,
        "total_seconds": 150.0,
        "reimages": [{"number": 1, "tile_ids": ["r0009"], "flag": {"cell_id": "t0000-c0"}}],
        "scan_errors": [],
    }
    report = build_report(store, truth, run=run, latencies_ms=[144835.2, 1200.0, 350.0])
    out = tmp_path / "out"
    write_report(report, out)
    write_html(report, store, out)
    return report, store, out


def test_html_is_readable_and_consistent(built: tuple[dict[str, Any], Any, Path]) -> None:
    report, _store, out = built
    page = (out / "report.html").read_text(encoding="utf-8")
    # the slide overview: the store's mosaic with the flagged cells circled, a real PNG
    m = re.search(r'<img class="overview" src="data:image/png;base64,([^"]+)"', page)
    assert m is not None
    assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    # no raw JSON dump: the run settings are a small table
    assert "<pre>" not in page and '{"' not in page and "&quot;scope_stream&quot;" not in page
    assert "<h2>Run settings</h2>" in page and "<th>setting</th>" in page
    # latencies in seconds, never as thousands of milliseconds
    assert " ms" not in page and "144835" not in page
    assert "median 1.20 s" in page and "145 s (2 min 25 s)" in page
    # the differential names every class the model can, the zeros and the unfamiliar/unclassified row
    diff = page.split("<h2>Differential count")[1].split("<h2>")[0]
    for c in (*MODEL_CLASSES, UNCLASSIFIED):
        assert f"<td>{c}</td>" in diff.replace("&quot;", '"'), c
    rows = {r["class"]: r for r in report["differential_table"]["rows"]}
    assert rows["blast"]["count"] == 0 and rows[UNCLASSIFIED]["count"] == 1  # the unfamiliar flag
    assert sum(r["count"] for r in rows.values()) == report["cells"]["WBC"] == 8
    assert "Domain check" in page
    # the re-imaged cell: its 50x crop beside the 20x crop of the flagged cell it was for
    pair = report["reimaged"]["pairs"][0]
    assert pair["scan_cell_id"] == "t0000-c0" and pair["reimage_cell_id"] == "r0009-c0"
    assert pair["distance_um"] == pytest.approx(1.0, abs=0.2)
    re_html = page.split("<h2>Re-imaged cells")[1].split("<h2>")[0]
    assert re_html.count("data:image/png;base64,") == 2


def test_headline_and_sweep_are_counted_the_same_way(built: tuple[dict[str, Any], Any, Path]) -> None:
    report, _store, out = built
    gt = report["ground_truth"]
    sweep = gt["flag_threshold_sweep"]
    mine = [r for r in sweep if r["this_scan"]]
    assert mine, "a row of the sweep reproduces the scan's own flags"
    for r in mine:  # ... with exactly the headline's figures
        assert r["sensitivity"] == pytest.approx(gt["sensitivity"])
        assert r["false_flags_per_100_wbc"] == pytest.approx(gt["false_flags_per_100_wbc"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "← this scan" in page and "per 100 matched planted cells" in page


def test_pdf_next_to_the_html(built: tuple[dict[str, Any], Any, Path]) -> None:
    report, store, out = built
    pdf = out / "report.pdf"
    assert pdf.is_file() and pdf.read_bytes()[:5] == b"%PDF-"
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf.read_bytes()))
    assert 1 <= pages <= 3
    again = write_pdf({**report, "flagged": []}, store, out / "again")
    assert again.read_bytes()[:5] == b"%PDF-"


def test_report_without_truth_mosaic_or_flags(tmp_path: Path) -> None:
    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    store = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s", config=StoreConfig(commit_every=1))
    tile = make_tile(0, 0.0, 0.0, size=64)
    store.write_result(make_result(tile, [(20.0, 20.0)], [CLASSES[0]]), tile=tile)
    report = build_report(store, None, run={})
    write_html(report, store, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "no mosaic" in page and "No fields were re-imaged" in page
    assert (tmp_path / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_fmt_seconds() -> None:
    assert fmt_seconds(0.35) == "0.35 s"
    assert fmt_seconds(12.44) == "12.4 s"
    assert fmt_seconds(144.8) == "145 s (2 min 25 s)"
    assert fmt_seconds(None) == "n/a" and fmt_seconds(float("nan")) == "n/a"


def test_console_summary_in_seconds(built: tuple[dict[str, Any], Any, Path]) -> None:
    from rich.console import Console

    from scope_stream.demo.summary import summary_table

    report, _store, _out = built
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    text = console.export_text()
    assert "median 1.20 s" in text and " ms" not in text and "unclassified / unfamiliar 12%" in text
