"""The slide report: what a scan found, scored against the virtual slide's ground truth when there is one.

``report.json`` holds the figures; ``report.html`` is a page a haematologist reads (the headline figures, a
slide overview with the flagged cells circled, the differential over every class the model can name, the
flagged cells, each re-imaged cell at 50x beside its 20x view, the run's settings) and ``report.pdf`` the same
headline, overview, differential and a few flagged cells on 1-3 pages.

One set of figures: the headline's sensitivity and false flags per 100 white cells, and the flag-threshold
sweep beside it, are counted the same way (:func:`flag_threshold_sweep`); the classifier's own figures on the
matched planted cells (:func:`classifier_on_slide`) count per matched cell and are labelled so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scope_stream.classify.domain import domain_check

from .metrics import Point, differential_count, match_points, percentiles, score_scan

if TYPE_CHECKING:
    from scope_stream.acquire.slide import PlantedCell
    from scope_stream.store import SlideStore

__all__ = [
    "build_report",
    "classifier_on_slide",
    "differential_table",
    "flag_threshold_sweep",
    "imaged_truth",
    "model_classes",
    "pdf_figures",
    "reimage_pairs",
    "write_html",
    "write_pdf",
    "write_report",
]

log = logging.getLogger(__name__)

#: the flag reason of a cell unlike the model's training cells (its call is not counted in the differential)
UNFAMILIAR = "unfamiliar"
#: the differential's row for white cells without a trusted call (no label, or flagged unfamiliar)
UNCLASSIFIED = "unclassified / unfamiliar"


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
    classes = model_classes(all_cells, run)
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
        "classes": classes,
        "differential": differential_count(c["label"] for c in wbc if c["label"]),
        "differential_table": differential_table(wbc, classes),
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
            "pairs": reimage_pairs(reimage_fields, reimage_cells, flagged, run.get("reimages") or []),
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
            "flag_threshold_sweep": flag_threshold_sweep(imaged, wbc, flagged, match_radius_um, run),
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


def _pbc_order() -> tuple[str, ...]:
    from scope_stream.view.flags import PBC_CLASSES

    return PBC_CLASSES


def model_classes(cells: Sequence[dict[str, Any]], run: dict[str, Any] | None = None) -> list[str]:
    """Every class the model can name: the keys of the cells' probabilities (else the model's ``config.json``
    ``classes``, when ``run["model"]`` is a folder), the PBC classes first in their usual order."""
    names: dict[str, None] = {}
    for c in cells:
        names.update(dict.fromkeys(c.get("probabilities") or {}))
    if not names and run is not None and run.get("model"):
        try:
            cfg = json.loads((Path(str(run["model"])) / "config.json").read_text(encoding="utf-8"))
            names.update(dict.fromkeys(str(k) for k in cfg.get("classes") or []))
        except (OSError, ValueError, AttributeError):
            pass
    pbc = _pbc_order()
    return [c for c in pbc if c in names] + sorted(c for c in names if c not in pbc)


def differential_table(wbc: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """The differential over every class the model can name (zeros included), plus one row for the white cells
    without a trusted call: no label, or flagged ``unfamiliar`` (unlike the model's training cells).

    ``rows``: ``{"class", "count", "percent", "called"}``; ``count`` leaves the unfamiliar cells out (they are
    in the last row), ``called`` is every call of that class (what ``report["differential"]`` counts);
    percentages are of all ``total`` white cells.
    """
    total = len(wbc)
    called: dict[str, int] = {}
    counted: dict[str, int] = {}
    untrusted = 0
    for c in wbc:
        label = str(c.get("label") or "")
        if label:
            called[label] = called.get(label, 0) + 1
        if not label or UNFAMILIAR in (c.get("flag_reasons") or []):
            untrusted += 1
        else:
            counted[label] = counted.get(label, 0) + 1
    names = list(classes) + sorted(k for k in called if k not in classes)

    def pct(n: int) -> float:
        return round(100.0 * n / total, 2) if total else 0.0

    rows = [
        {"class": k, "count": counted.get(k, 0), "percent": pct(counted.get(k, 0)), "called": called.get(k, 0)}
        for k in names
    ]
    rows.append({"class": UNCLASSIFIED, "count": untrusted, "percent": pct(untrusted), "called": None})
    return {"total": total, "rows": rows}


def flag_threshold_sweep(
    imaged: Sequence[PlantedCell],
    wbc: Sequence[dict[str, Any]],
    flagged: Sequence[dict[str, Any]],
    radius_um: float,
    run: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The headline figures had the anomaly threshold been each of :data:`SWEEP_THRESHOLDS` (and the run's own,
    when set), counted exactly as the headline: a cell is flagged when its anomaly score reaches the threshold
    or another reason (uncertain, unfamiliar, abnormal class) flagged it; sensitivity for the planted abnormal
    cells and false flags per 100 *detected* white cells. ``this_scan``: the row flags the very cells the scan
    flagged (its figures are the headline's)."""
    own = ((run or {}).get("flags") or {}).get("anomaly_threshold")
    thresholds = sorted(set(SWEEP_THRESHOLDS) | ({float(own)} if own is not None else set()))
    planted = [Point(t.cell_id, t.x_um, t.y_um, t.label) for t in imaged]
    abnormal = {t.cell_id for t in imaged if t.abnormal}
    detected = _points(wbc)
    actual = {c["cell_id"] for c in flagged}
    out = []
    for th in thresholds:
        sel = [
            c
            for c in wbc
            if (c.get("anomaly_score") is not None and float(c["anomaly_score"]) >= th)
            or any(r != "anomaly" for r in c.get("flag_reasons") or [])
        ]
        sc = score_scan(planted, abnormal, detected, _points(sel), radius_um)
        out.append(
            {
                "anomaly_threshold": th,
                "flags": sc.flags,
                "found_abnormal": sc.found_abnormal,
                "planted_abnormal": sc.planted_abnormal,
                "sensitivity": None if math.isnan(sc.sensitivity) else round(sc.sensitivity, 4),
                "false_flags": sc.false_flags,
                "false_flags_per_100_wbc": (
                    None if math.isnan(sc.false_flags_per_100_wbc) else round(sc.false_flags_per_100_wbc, 2)
                ),
                "this_scan": {c["cell_id"] for c in sel} == actual and (own is None or th == float(own)),
            }
        )
    return out


def reimage_pairs(
    reimage_fields: Sequence[dict[str, Any]],
    reimage_cells: Sequence[dict[str, Any]],
    flagged: Sequence[dict[str, Any]],
    reimages: Sequence[dict[str, Any]] = (),
    max_distance_um: float = 15.0,
) -> list[dict[str, Any]]:
    """Per re-imaged field: the flagged survey cell it was for and its own classified cell nearest to it.

    The target is the flag the re-image names (``run["reimages"][i]["flag"]``, by tile id), else the flagged
    survey cell nearest the field's centre (within half the field). ``reimage_cell_id`` is the field's
    classified cell nearest the target (within ``max_distance_um``; else the one nearest the centre, with
    ``distance_um`` None when there is no target). Either id may be None.
    """
    by_id = {c["cell_id"]: c for c in flagged}
    asked: dict[str, str] = {}
    for job in reimages:
        flag = job.get("flag") or {}
        if flag.get("cell_id"):
            for tid in job.get("tile_ids") or []:
                asked[str(tid)] = str(flag["cell_id"])
    out = []
    for f in reimage_fields:
        tid = f["tile_id"]
        target = by_id.get(asked.get(tid, ""))
        if target is None and flagged:
            half = min(f["width_um"], f["height_um"]) / 2.0
            near = min(flagged, key=lambda c: math.hypot(c["x_um"] - f["x_um"], c["y_um"] - f["y_um"]))
            if math.hypot(near["x_um"] - f["x_um"], near["y_um"] - f["y_um"]) <= half:
                target = near
        here = [c for c in reimage_cells if c["tile_id"] == tid and c["label"] and c.get("crop_index", 0) >= 0]
        tx, ty = (target["x_um"], target["y_um"]) if target is not None else (f["x_um"], f["y_um"])
        best = min(here, key=lambda c: math.hypot(c["x_um"] - tx, c["y_um"] - ty), default=None)
        dist = None if best is None else math.hypot(best["x_um"] - tx, best["y_um"] - ty)
        if best is not None and target is not None and dist is not None and dist > max_distance_um:
            best, dist = None, None
        out.append(
            {
                "reimage_tile_id": tid,
                "x_um": round(f["x_um"], 2),
                "y_um": round(f["y_um"], 2),
                "pixel_size_um": f["pixel_size_um"],
                "scan_cell_id": None if target is None else target["cell_id"],
                "scan_label": None if target is None else target["label"],
                "scan_reasons": [] if target is None else list(target["flag_reasons"]),
                "reimage_cell_id": None if best is None else best["cell_id"],
                "reimage_label": None if best is None else best["label"],
                "distance_um": None if dist is None or target is None else round(dist, 2),
            }
        )
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


# --------------------------------------------------------------------------------------------- formatting
def fmt_seconds(seconds: float | None) -> str:
    """A duration as people say it: ``"0.35 s"``, ``"12.4 s"``, ``"145 s (2 min 25 s)"``; ``"n/a"`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 100:
        return f"{seconds:.1f} s"
    m, sec = divmod(round(seconds), 60)
    return f"{round(seconds)} s ({m} min {sec} s)"


def _ms_to_s(ms: float | None) -> float | None:
    return None if ms is None else float(ms) / 1000.0


def _num(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """``(what, value)`` rows of the report's headline (the HTML, the PDF and the console summary show these)."""
    rows: list[tuple[str, str]] = []
    dc = report.get("domain_check")
    if dc:
        rows.append(("Domain check", str(dc["message"])))
    rows.append(("Needs review", "yes" if report["needs_review"] else "no"))
    gt = report.get("ground_truth")
    if gt is not None:
        rows.append(
            (
                "Sensitivity for planted abnormal cells",
                f"{gt['found_abnormal']} of {gt['planted_abnormal']} found = {_num(gt.get('sensitivity'))}",
            )
        )
        rows.append(
            (
                "False flags per 100 detected white cells",
                f"{_num(gt.get('false_flags_per_100_wbc'), '.1f')} ({gt['false_flags']} of {gt['flags']} flags, "
                f"{gt['wbc_detected']} white cells)",
            )
        )
        rows.append(("White-cell detection recall", f"{gt['wbc_matched']} of {gt['wbc_planted']} planted"))
    c = report["cells"]
    rows.append(("Cells", f"{c['WBC']} white, {c['RBC']} red, {c['platelet']} platelets"))
    rows.append(("Flagged white cells", str(len(report["flagged"]))))
    rows.append(("Fields", f"{report['tiles']['scan']} scanned, {report['tiles']['reimage']} re-imaged"))
    rows.append(("Speed", speed_text(report["speed"])))
    return rows


def speed_text(sp: dict[str, Any]) -> str:
    """The scan's speed in words people use: its length, fields per second and per-field latency in seconds."""
    lat = sp.get("latency_ms") or {}
    return (
        f"scan {fmt_seconds(sp.get('scan_seconds'))}, {_num(sp.get('tiles_per_s'))} fields/s; field sent → "
        f"stored: median {fmt_seconds(_ms_to_s(lat.get('p50')))}, p95 {fmt_seconds(_ms_to_s(lat.get('p95')))}"
    )


def _settings_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's settings as short ``(what, value)`` rows (the re-images are shown with their cells)."""

    def brief(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {brief(x)}" for k, x in v.items() if x not in (None, [], {}, "")) or "-"
        if isinstance(v, list | tuple):
            return ", ".join(brief(x) for x in v) if len(v) <= 6 else f"{len(v)} items"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    names = {
        "scope_stream": "scope-stream version",
        "model": "Model",
        "procedure": "Procedure",
        "workers": "Workers",
        "flags": "Flag thresholds",
        "microscope": "Virtual slide",
        "scan": "Scan",
        "pipeline": "Pipeline (fields)",
    }
    rows = [(label, brief(run[k])) for k, label in names.items() if k in run]
    if "total_seconds" in run:
        rows.append(("Total run time", fmt_seconds(float(run["total_seconds"]))))
    if "reimages" in run:
        rows.append(("Re-image requests", str(len(run["reimages"] or []))))
    if "scan_errors" in run:
        errs = run["scan_errors"] or []
        rows.append(("Scan errors", str(len(errs)) + (f": {brief(errs[:3])}" if errs else "")))
    known = set(names) | {"total_seconds", "reimages", "scan_errors", "scan_seconds"}
    rows += [(str(k), brief(v)) for k, v in run.items() if k not in known]
    return rows


# --------------------------------------------------------------------------------------------- pictures
def _png_b64(rgb: np.ndarray, scale: int = 3) -> str:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    """(Y, X, C) or (Y, X) of any dtype -> (Y, X, 3) uint8 (non-uint8 stretched over its 1-99.5th percentiles)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        f = a.astype(np.float32)
        lo, hi = np.percentile(f, [1.0, 99.5]) if f.size else (0.0, 1.0)
        f = np.clip((f - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
        a = (f * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def slide_overview(
    report: dict[str, Any], store: SlideStore, max_px: int = 1024
) -> tuple[np.ndarray, float, tuple[float, float]] | None:
    """The store's mosaic at the finest pyramid level no larger than ``max_px`` a side (resized when even the
    coarsest is larger), the flagged cells circled in their class colour; ``(rgb, µm per px, (y0, x0) µm)``, or
    None when the store has no mosaic."""
    from PIL import Image, ImageDraw

    from scope_stream.view.flags import ClassPalette

    n = store.mosaic_levels
    if n == 0:
        return None
    level = n - 1
    for k in range(n):
        m = store.mosaic(k)
        if m is not None and max(m[0].shape[1:]) <= max_px:
            level = k
            break
    got = store.mosaic(level)
    if got is None:
        return None
    arr, scale, (y0, x0) = got
    rgb = _to_rgb8(np.moveaxis(arr, 0, -1))
    img = Image.fromarray(rgb)
    if max(img.size) > max_px:
        f = max(img.size) / max_px
        img = img.resize((max(1, round(img.size[0] / f)), max(1, round(img.size[1] / f))), Image.Resampling.BOX)
        scale *= f
    elif max(img.size) < 512:  # a small slide: enlarge (pixels kept sharp) so the circles read
        k = math.ceil(512 / max(img.size))
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.Resampling.NEAREST)
        scale /= k
    draw = ImageDraw.Draw(img)
    palette = ClassPalette()
    r = max(5.0, 12.0 / scale)  # a white cell is ~12 µm across; never smaller than 5 px on the page
    for f in report["flagged"]:
        cx, cy = (f["x_um"] - x0) / scale, (f["y_um"] - y0) / scale
        colour = palette.hex(f["label"] or "")
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, round(r / 5)))
    return np.asarray(img), scale, (y0, x0)


def _crop_b64(store: SlideStore, cell_id: str | None, scale: int = 3) -> str | None:
    if not cell_id:
        return None
    try:
        return _png_b64(_to_rgb8(store.crop(cell_id)), scale)
    except Exception:  # a crop that is not there must not break the report
        return None


def _img(b64: str | None, alt: str, esc: Any) -> str:
    if b64 is None:
        return "<div class='nocrop'>no crop</div>"
    return f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}">'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], esc: Any, cls: str = "") -> str:
    h = "".join(f"<th>{esc(str(x))}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{h}</tr>{body}</table>"


# --------------------------------------------------------------------------------------------- HTML
def write_html(
    report: dict[str, Any], store: SlideStore, out_dir: Path, max_cells: int = 60, *, pdf: bool = True
) -> Path:
    """The readable page (``report.html``) and, with ``pdf``, :func:`write_pdf` beside it (``report.pdf``; a
    failure there is logged, never raised, so the page always gets written)."""
    esc = html.escape
    out_dir.mkdir(parents=True, exist_ok=True)
    head_rows = []
    for what, value in headline_rows(report):
        style = ""
        if what == "Domain check" and (report.get("domain_check") or {}).get("trusted") is False:
            style = " style='color:#b00020'"
        head_rows.append(f"<tr><th>{esc(what)}</th><td{style}>{esc(value)}</td></tr>")

    # slide overview
    overview = slide_overview(report, store)
    if overview is None:
        ov_html = "<p>No overview: the store has no mosaic.</p>"
    else:
        from scope_stream.view.flags import ClassPalette

        rgb, scale, _ = overview
        palette = ClassPalette()
        chips = " ".join(
            f"<span class='chip' style='border-color:{palette.hex(k)}'>{esc(k)}</span>"
            for k in sorted({f["label"] for f in report["flagged"] if f["label"]})
        )
        ov_html = (
            f'<img class="overview" src="data:image/png;base64,{_png_b64(rgb, 1)}" alt="slide overview">'
            f"<p class='note'>{rgb.shape[1]} x {rgb.shape[0]} px at {scale:.1f} µm/px; flagged cells circled in "
            f"their class colour: {chips or 'none flagged'}</p>"
        )

    # differential
    dt = report.get("differential_table") or {"total": report["cells"]["WBC"], "rows": []}
    diff_rows = [
        (r["class"], r["count"], f"{r['percent']:.1f}%", "" if r["called"] is None else r["called"]) for r in dt["rows"]
    ]
    diff_rows.append(("all white cells", dt["total"], "100%" if dt["total"] else "-", ""))
    diff_html = _table(["class", "count", "% of white cells", "model's calls (unfamiliar included)"], diff_rows, esc)

    # flagged cells
    cards = []
    for f in report["flagged"][:max_cells]:
        img = _img(_crop_b64(store, f["cell_id"]), f["cell_id"], esc)
        cards.append(
            f"<figure>{img}<figcaption><b>{esc(f['label'] or '?')}</b><br>{esc(', '.join(f['reasons']))}"
            f"<br>score {_num(f['score'])}<br>({f['x_um']:.0f}, {f['y_um']:.0f}) µm</figcaption></figure>"
        )
    more = len(report["flagged"]) - max_cells
    if more > 0:
        cards.append(f"<p>… and {more} more (report.json lists them all)</p>")

    # re-imaged cells
    pairs = (report.get("reimaged") or {}).get("pairs") or []
    re_rows = []
    for p in pairs:
        left = _img(_crop_b64(store, p["scan_cell_id"]), str(p["scan_cell_id"]), esc)
        right = _img(_crop_b64(store, p["reimage_cell_id"]), str(p["reimage_cell_id"]), esc)
        where = f"({p['x_um']:.0f}, {p['y_um']:.0f}) µm"
        dist = "" if p["distance_um"] is None else f"; {p['distance_um']:.1f} µm apart"
        re_rows.append(
            f"<tr><td>{left}</td><td>{right}</td><td><b>{esc(p['reimage_tile_id'])}</b> at {esc(where)}<br>"
            f"20x: {esc(str(p['scan_label'] or 'no flagged cell here'))}"
            f"{' (' + esc(', '.join(p['scan_reasons'])) + ')' if p['scan_reasons'] else ''}<br>"
            f"50x: {esc(str(p['reimage_label'] or 'no classified cell found'))}{esc(dist)}</td></tr>"
        )
    re_html = (
        "<table class='pairs'><tr><th>20x (survey)</th><th>50x (re-image)</th><th>cell</th></tr>"
        + "".join(re_rows)
        + "</table>"
        if re_rows
        else "<p>No fields were re-imaged.</p>"
    )

    # against the planted truth
    truth_html = ""
    gt = report.get("ground_truth")
    if gt is not None:
        sweep = gt.get("flag_threshold_sweep") or []
        sw_rows = [
            (
                f"{r['anomaly_threshold']:g}" + ("  ← this scan" if r["this_scan"] else ""),
                f"{r['found_abnormal']} of {r['planted_abnormal']} = {_num(r['sensitivity'])}",
                f"{_num(r['false_flags_per_100_wbc'], '.1f')} ({r['false_flags']} of {r['flags']} flags)",
            )
            for r in sweep
        ]
        truth_html += (
            "<h3>Other anomaly thresholds, counted as the headline</h3>"
            "<p class='note'>A cell is flagged when its anomaly score reaches the threshold or another reason "
            "(uncertain, unfamiliar, abnormal class) flagged it; false flags are per 100 detected white cells. "
            "The row marked <i>this scan</i> flags the very cells the scan flagged.</p>"
            + _table(
                ["anomaly threshold", "sensitivity (planted abnormal)", "false flags per 100 white cells"], sw_rows, esc
            )
        )
        cs = report.get("classifier_on_slide") or {}
        if cs:
            cs_rows = [
                (f"{r['anomaly_threshold']:g}", _num(r["sensitivity"]), _num(r["false_flags_per_100"], ".1f"))
                for r in cs.get("anomaly_threshold_sweep", [])
            ]
            truth_html += (
                "<h3>The classifier alone, on the planted cells it was shown</h3>"
                f"<p>{cs['matched']} planted white cells matched to a classified cell; accuracy on the normal ones "
                f"{_num(cs['accuracy_normal'])}; anomaly AUROC {_num(cs['anomaly_auroc'])}.</p>"
                "<p class='note'>Anomaly score alone, <b>per 100 matched planted cells</b> (not per detected white "
                "cell, and without the other flag reasons): these figures differ from the headline by design.</p>"
                + (
                    _table(["anomaly threshold", "sensitivity", "false flags per 100 matched cells"], cs_rows, esc)
                    if cs_rows
                    else ""
                )
            )
            conf = cs.get("confusion") or {}
            if conf:
                cols = sorted({k for row in conf.values() for k in row})
                truth_html += "<h4>Planted class (rows) → model's call (columns)</h4>" + _table(
                    ["planted", *cols], [(t, *(conf[t].get(k, 0) for k in cols)) for t in sorted(conf)], esc, "conf"
                )
        missed = gt.get("missed_abnormal") or []
        if missed:
            truth_html += f"<h3>Planted abnormal cells not flagged ({len(missed)})</h3>" + _table(
                ["planted cell", "class", "position (µm)"],
                [(m["cell_id"], m["label"], f"({m['x_um']:.0f}, {m['y_um']:.0f})") for m in missed[:30]],
                esc,
            )
        truth_html = "<h2>Against the planted truth</h2>" + truth_html

    settings_html = _table(["setting", "value"], _settings_rows(report.get("run") or {}), esc, "settings")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>scope-stream report: {esc(report["slide_id"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:6px 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} figure{{display:inline-block;
margin:6px;text-align:center;font-size:12px;width:120px}} img{{border:1px solid #999}} .nocrop{{width:96px;
height:96px;background:#eee}} .overview{{max-width:100%}} .note{{color:#555;font-size:13px}}
.chip{{border-left:12px solid;padding:0 6px;margin-right:6px}} .settings td{{font-size:13px}}</style></head><body>
<h1>Slide {esc(report["slide_id"])}</h1>
<p>Research software, not for diagnosis. Store: <code>{esc(report["store"])}</code></p>
<table>{"".join(head_rows)}</table>
<h2>Slide overview</h2>
{ov_html}
<h2>Differential count (white cells)</h2>
<p class='note'>Every class the model can name. Cells that look unlike the model's training cells (flagged
<i>unfamiliar</i>) or have no call are counted apart, under <i>{esc(UNCLASSIFIED)}</i>.</p>
{diff_html}
<h2>Flagged cells ({len(report["flagged"])}), strongest first</h2>
{"".join(cards) or "<p>none</p>"}
<h2>Re-imaged cells ({len(pairs)} field{"" if len(pairs) == 1 else "s"}, 50x beside the 20x survey)</h2>
{re_html}
{truth_html}
<h2>Run settings</h2>
{settings_html}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    if pdf:
        try:
            write_pdf(report, store, out_dir, overview=overview)
        except Exception:  # the PDF is a convenience: the page and the JSON stand without it
            log.exception("report.pdf not written")
    return path


# --------------------------------------------------------------------------------------------- PDF
def pdf_figures(
    report: dict[str, Any],
    store: SlideStore,
    *,
    max_cells: int = 12,
    overview: tuple[np.ndarray, float, tuple[float, float]] | None = None,
) -> list[Any]:
    """The pages of ``report.pdf`` as matplotlib figures (A4): the headline and the differential; the slide
    overview (when the store has a mosaic); up to ``max_cells`` flagged cells (when any)."""
    from matplotlib.figure import Figure

    a4 = (8.27, 11.69)
    line = 0.0145
    pages = []

    fig = Figure(figsize=a4)
    fig.text(0.06, 0.95, f"Slide {report['slide_id']}", fontsize=18, weight="bold")
    fig.text(0.06, 0.93, "scope-stream report. Research software, not for diagnosis.", fontsize=8, color="#555")
    y = 0.89
    for what, value in headline_rows(report):
        lines = _wrap(value, 72)
        red = what == "Domain check" and (report.get("domain_check") or {}).get("trusted") is False
        fig.text(0.06, y, what, fontsize=8.5, weight="bold", va="top")
        fig.text(0.40, y, "\n".join(lines), fontsize=8.5, va="top", color="#b00020" if red else "black")
        y -= line * len(lines) + 0.008
    y -= 0.02
    fig.text(0.06, y, "Differential count (white cells)", fontsize=12, weight="bold", va="top")
    y -= 0.03
    dt = report.get("differential_table") or {"total": 0, "rows": []}
    rows = [("class", "count", "% of white cells")]
    rows += [(r["class"], str(r["count"]), f"{r['percent']:.1f}%") for r in dt["rows"]]
    rows.append(("all white cells", str(dt["total"]), "100%" if dt["total"] else "-"))
    for i, (name, n, pct) in enumerate(rows):
        weight = "bold" if i in (0, len(rows) - 1) else "normal"
        fig.text(0.08, y, name, fontsize=9, weight=weight, va="top")
        fig.text(0.45, y, n, fontsize=9, weight=weight, va="top", ha="right")
        fig.text(0.62, y, pct, fontsize=9, weight=weight, va="top", ha="right")
        y -= line * 1.2
    fig.text(
        0.08,
        y - 0.01,
        f"Cells that look unlike the model's training cells, or have no call, are counted under '{UNCLASSIFIED}'.",
        fontsize=7.5,
        color="#555",
        va="top",
    )
    pages.append(fig)

    if overview is not None:
        rgb, scale, _ = overview
        fig = Figure(figsize=a4)
        fig.text(0.06, 0.95, "Slide overview", fontsize=14, weight="bold")
        fig.text(0.06, 0.93, f"{scale:.1f} µm/px; flagged cells circled in their class colour", fontsize=9)
        ax = fig.add_axes((0.04, 0.08, 0.92, 0.83))
        ax.imshow(rgb, interpolation="nearest")
        ax.axis("off")
        pages.append(fig)

    flagged = report["flagged"][:max_cells]
    if flagged:
        fig = Figure(figsize=a4)
        fig.text(
            0.06, 0.95, f"Flagged cells: the {len(flagged)} strongest of {len(report['flagged'])}", fontsize=14,
            weight="bold",
        )  # fmt: skip
        ncol = 4
        for i, f in enumerate(flagged):
            ax = fig.add_axes((0.05 + (i % ncol) * 0.23, 0.72 - (i // ncol) * 0.22, 0.19, 0.17))
            try:
                ax.imshow(_to_rgb8(store.crop(f["cell_id"])), interpolation="nearest")
            except Exception:  # a crop that is not there must not break the report
                ax.text(0.5, 0.5, "no crop", ha="center", va="center")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{f['label'] or '?'}\n{', '.join(f['reasons'])}; score {_num(f['score'])}", fontsize=7)
        pages.append(fig)
    return pages


def write_pdf(
    report: dict[str, Any],
    store: SlideStore,
    out_dir: Path,
    *,
    max_cells: int = 12,
    overview: tuple[np.ndarray, float, tuple[float, float]] | None = None,
) -> Path:
    """``report.pdf`` (1-3 pages, :func:`pdf_figures`), written with matplotlib's ``PdfPages``."""
    from matplotlib.backends.backend_pdf import PdfPages

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.pdf"
    if overview is None:
        overview = slide_overview(report, store)
    figures = pdf_figures(report, store, max_cells=max_cells, overview=overview)
    with PdfPages(path, metadata={"Title": f"scope-stream report: {report['slide_id']}"}) as pdf:
        for fig in figures:
            pdf.savefig(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
