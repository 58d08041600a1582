"""The slide report: what a scan found, scored against the virtual slide's ground truth when there is one.

``report.json`` holds the figures; ``report.html`` is a readable page with pictures of the flagged cells.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scope_stream.classify.domain import domain_check

from .metrics import Point, differential_count, match_points, percentiles, score_scan

if TYPE_CHECKING:
    from scope_stream.acquire.slide import PlantedCell
    from scope_stream.store import SlideStore

__all__ = ["build_report", "imaged_truth", "write_html", "write_report"]


def imaged_truth(truth: Sequence[PlantedCell], fields: Sequence[dict[str, Any]]) -> list[PlantedCell]:
    """Planted cells lying wholly inside at least one scanned field (cells cut by the scan's outer edge
    cannot be seen whole and are not counted)."""
    out = []
    for cell in truth:
        r = cell.diameter_um / 2.0
        for f in fields:
            hw, hh = f["width_um"] / 2.0, f["height_um"] / 2.0
            if abs(cell.x_um - f["x_um"]) <= hw - r and abs(cell.y_um - f["y_um"]) <= hh - r:
                out.append(cell)
                break
    return out


def _points(rows: Sequence[dict[str, Any]]) -> list[Point]:
    return [Point(str(r["cell_id"]), float(r["x_um"]), float(r["y_um"]), str(r.get("label", ""))) for r in rows]


def build_report(
    store: SlideStore,
    truth: Sequence[PlantedCell] | None,
    *,
    run: dict[str, Any],
    latencies_ms: Sequence[float] = (),
    match_radius_um: float = 6.0,
) -> dict[str, Any]:
    """Figures of one scanned slide. ``truth``: the planted cells (None for a real slide)."""
    scan_fields = store.tile_positions(kind="scan")
    reimage_fields = store.tile_positions(kind="reimage")
    all_cells = store.cells()
    scan_ids = {f["tile_id"] for f in scan_fields}
    scan_cells = [c for c in all_cells if c["tile_id"] in scan_ids]
    wbc = [c for c in scan_cells if c["kind"] == "WBC"]
    flagged = sorted((c for c in wbc if c["flagged"]), key=lambda c: -(c["flag_score"] or 0.0))
    reimage_cells = [c for c in all_cells if c["tile_id"] not in scan_ids]
    elapsed = float(run.get("scan_seconds") or 0.0)
    report: dict[str, Any] = {
        "slide_id": store.slide_id,
        "store": str(store.path),
        "tiles": {"scan": len(scan_fields), "reimage": len(reimage_fields)},
        "cells": {
            "total": len(scan_cells),
            "WBC": len(wbc),
            "RBC": sum(c["kind"] == "RBC" for c in scan_cells),
            "platelet": sum(c["kind"] == "platelet" for c in scan_cells),
        },
        "differential": differential_count(c["label"] for c in wbc if c["label"]),
        "domain_check": domain_check(c["flag_reasons"] for c in wbc if c["label"]),
        "flagged": [
            {
                "cell_id": c["cell_id"],
                "tile_id": c["tile_id"],
                "label": c["label"],
                "x_um": round(c["x_um"], 2),
                "y_um": round(c["y_um"], 2),
                "reasons": c["flag_reasons"],
                "score": c["flag_score"],
                "anomaly_score": c["anomaly_score"],
                "uncertainty": c["uncertainty"],
                "probabilities": {k: round(v, 4) for k, v in c["probabilities"].items()},
            }
            for c in flagged
        ],
        "reimaged": {
            "tiles": len(reimage_fields),
            "cells": len(reimage_cells),
            "flagged": sum(c["flagged"] for c in reimage_cells),
        },
        "needs_review": bool(flagged),
        "speed": {
            "scan_seconds": round(elapsed, 2),
            "tiles_per_s": round(len(scan_fields) / elapsed, 3) if elapsed > 0 else None,
            "latency_ms": {k: (round(v, 1) if v is not None else None) for k, v in percentiles(latencies_ms).items()},
        },
        "run": run,
    }
    if truth is not None:
        imaged = imaged_truth([t for t in truth if t.kind == "WBC"], scan_fields)
        score = score_scan(
            planted_wbc=[Point(t.cell_id, t.x_um, t.y_um, t.label) for t in imaged],
            abnormal_ids={t.cell_id for t in imaged if t.abnormal},
            detected_wbc=_points(wbc),
            flagged=_points(flagged),
            radius_um=match_radius_um,
        )
        by_id = {t.cell_id: t for t in imaged}
        report["classifier_on_slide"] = classifier_on_slide(imaged, wbc, match_radius_um)
        report["ground_truth"] = {
            **score.as_dict(),
            "match_radius_um": match_radius_um,
            "planted_abnormal_labels": differential_count(t.label for t in imaged if t.abnormal),
            "missed_abnormal": [
                {"cell_id": i, "label": by_id[i].label, "x_um": by_id[i].x_um, "y_um": by_id[i].y_um}
                for i in score.missed_abnormal_ids
            ],
        }
    return report


#: anomaly thresholds at which the report re-scores the matched planted cells (anomaly score alone)
SWEEP_THRESHOLDS = (0.7, 0.8, 0.85, 0.9, 0.95)


def classifier_on_slide(
    imaged: Sequence[PlantedCell], wbc: Sequence[dict[str, Any]], radius_um: float
) -> dict[str, Any]:
    """How the classifier did on the planted white cells it was shown (matched by position).

    ``accuracy_normal``: share of matched normal cells given their planted label; ``anomaly_auroc``: how well the
    anomaly score ranks the planted abnormal cells above the normal ones (None without both kinds);
    ``anomaly_threshold_sweep``: sensitivity and false flags per 100 matched cells had the anomaly score alone
    been thresholded at each of :data:`SWEEP_THRESHOLDS` (to choose an operating point);
    ``confusion``: planted label -> predicted label -> count.
    """
    from scope_stream.classify.metrics import auroc

    called = [c for c in wbc if c["label"]]
    pairs = match_points(
        [Point(t.cell_id, t.x_um, t.y_um) for t in imaged],
        [Point(c["cell_id"], c["x_um"], c["y_um"]) for c in called],
        radius_um,
    )
    confusion: dict[str, dict[str, int]] = {}
    normal_hits = normal = 0
    scores, abnormal = [], []
    for ti, ci, _ in pairs:
        t, c = imaged[ti], called[ci]
        row = confusion.setdefault(t.label, {})
        row[c["label"]] = row.get(c["label"], 0) + 1
        if not t.abnormal:
            normal += 1
            normal_hits += int(c["label"] == t.label)
        if c["anomaly_score"] is not None:
            scores.append(float(c["anomaly_score"]))
            abnormal.append(t.abnormal)
    auc = None
    sweep: list[dict[str, float]] = []
    if any(abnormal) and not all(abnormal):
        sc, ab = np.asarray(scores), np.asarray(abnormal)
        auc = round(auroc(sc, ab), 4)
        for th in SWEEP_THRESHOLDS:
            hit = sc >= th
            sweep.append(
                {
                    "anomaly_threshold": th,
                    "sensitivity": round(float(hit[ab].mean()), 4),
                    "false_flags_per_100": round(100.0 * float(hit[~ab].sum()) / len(sc), 2),
                }
            )
    return {
        "matched": len(pairs),
        "accuracy_normal": round(normal_hits / normal, 4) if normal else None,
        "anomaly_auroc": auc,
        "anomaly_threshold_sweep": sweep,
        "confusion": confusion,
    }


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def _png_b64(rgb: np.ndarray, scale: int = 3) -> str:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(report: dict[str, Any], store: SlideStore, out_dir: Path, max_cells: int = 60) -> Path:
    """A readable page: the headline figures, the differential count and a gallery of flagged cells."""
    esc = html.escape
    gt = report.get("ground_truth")
    rows = []
    if gt is not None:
        sens = gt.get("sensitivity")
        ff = gt.get("false_flags_per_100_wbc")
        rows.append(
            f"<tr><th>Sensitivity for planted abnormal cells</th><td>{gt['found_abnormal']} / "
            f"{gt['planted_abnormal']} = {'n/a' if sens is None else f'{sens:.2f}'}</td></tr>"
        )
        rows.append(
            f"<tr><th>False flags per 100 white cells</th><td>{'n/a' if ff is None else f'{ff:.1f}'}"
            f" ({gt['false_flags']} of {gt['flags']} flags)</td></tr>"
        )
        rows.append(f"<tr><th>White-cell detection recall</th><td>{gt['wbc_matched']} / {gt['wbc_planted']}</td></tr>")
        cs = report.get("classifier_on_slide") or {}
        if cs:
            rows.append(
                f"<tr><th>Classifier on the planted cells</th><td>accuracy on normal cells {cs['accuracy_normal']}, "
                f"anomaly AUROC {cs['anomaly_auroc']} ({cs['matched']} cells)</td></tr>"
            )
            sweep = "; ".join(
                f"{r['anomaly_threshold']}: {r['sensitivity']:.2f} / {r['false_flags_per_100']:.1f}"
                for r in cs.get("anomaly_threshold_sweep", [])
            )
            if sweep:
                rows.append(
                    "<tr><th>Anomaly threshold: sensitivity / false flags per 100 matched cells</th>"
                    f"<td>{esc(sweep)}</td></tr>"
                )
    sp = report["speed"]
    rows += [
        f"<tr><th>Tiles</th><td>{report['tiles']['scan']} scanned, {report['tiles']['reimage']} re-imaged</td></tr>",
        f"<tr><th>Cells</th><td>{report['cells']['WBC']} WBC, {report['cells']['RBC']} RBC, "
        f"{report['cells']['platelet']} platelets</td></tr>",
        f"<tr><th>Speed</th><td>{sp['tiles_per_s']} tiles/s; latency p50 {sp['latency_ms']['p50']} ms, "
        f"p95 {sp['latency_ms']['p95']} ms</td></tr>",
        f"<tr><th>Needs review</th><td>{'yes' if report['needs_review'] else 'no'}</td></tr>",
    ]
    dc = report.get("domain_check")
    if dc:
        colour = "#b00020" if dc.get("trusted") is False else "inherit"
        rows.insert(
            0,
            f"<tr><th>Domain check</th><td style='color:{colour}'>{esc(str(dc['message']))}</td></tr>",
        )
    diff = "".join(
        f"<tr><td>{esc(k)}</td><td>{v['count']}</td><td>{v['percent']}%</td></tr>"
        for k, v in report["differential"].items()
    )
    cards = []
    for f in report["flagged"][:max_cells]:
        try:
            crop = store.crop(f["cell_id"])
            img = f'<img src="data:image/png;base64,{_png_b64(crop)}" alt="{esc(f["cell_id"])}">'
        except Exception:  # a crop that is not there must not break the report
            img = "<div class='nocrop'>no crop</div>"
        cards.append(
            f"<figure>{img}<figcaption><b>{esc(f['label'])}</b><br>{esc(', '.join(f['reasons']))}"
            f"<br>score {f['score']:.2f}<br>({f['x_um']:.0f}, {f['y_um']:.0f}) µm</figcaption></figure>"
        )
    run = esc(json.dumps(report["run"], indent=2, default=str))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>scope-stream report: {esc(report["slide_id"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}} figure{{display:inline-block;margin:6px;
text-align:center;font-size:12px;width:120px}} img{{border:1px solid #999}} .nocrop{{width:96px;height:96px;
background:#eee}}</style></head><body>
<h1>Slide {esc(report["slide_id"])}</h1>
<p>Research software, not for diagnosis. Store: <code>{esc(report["store"])}</code></p>
<table>{"".join(rows)}</table>
<h2>Differential count (white cells, model's calls)</h2>
<table><tr><th>class</th><th>count</th><th>%</th></tr>{diff}</table>
<h2>Flagged cells ({len(report["flagged"])}), strongest first</h2>
{"".join(cards) or "<p>none</p>"}
<h2>Run</h2><pre>{run}</pre>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
