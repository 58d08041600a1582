"""Measure :func:`segment_tile` on a Pascal-VOC folder of smear fields (BCCD: WBC, RBC, Platelets boxes).

Figures (each for all fields and for the two halves: even-indexed fields, used for tuning, and
odd-indexed fields, held out):

* white cells: precision, recall and F1 with boxes matched at IoU >= 0.5 (one-to-one, greedy by IoU),
  and with centroid matching (a detection whose centroid lies inside a ground-truth box, one-to-one,
  greedy by distance to the box centre);
* red cells: count error per field ``|found - annotated| / annotated`` (mean absolute, %), its signed
  mean (bias), the recall of annotated red cells by centroid matching, and the share of detected red
  cells that fall in an annotated box (BCCD leaves many red cells unannotated: see docs/segmentation.md);
* platelets: recall by centroid matching (and precision: matched / detected objects);
* speed: milliseconds per field (the VOC images) and per 2048x2048 tile, segmentation only (image
  decoding excluded), single process.

Border cells are kept here (``drop_border_cells=False``): the annotations include cells cut by the
field's edge, and a single field has no neighbour to see them whole.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scope_stream.config.segment import SegmentConfig
from scope_stream.datasets import BCCD_UM_PER_PX, DatasetError, VocBox, read_voc
from scope_stream.vocabulary import Cell, CellKind, Tile

from .detect import cell_count, segment_tile_debug
from .pixel_size import compare_pixel_size, estimate_pixel_size

__all__ = [
    "FieldResult",
    "VocField",
    "evaluate_fields",
    "evaluate_virtual",
    "list_voc_fields",
    "load_rgb",
    "match_centroids",
    "match_iou",
    "summarise",
    "time_large_tiles",
    "write_examples",
]

GT_NAMES = {"WBC": CellKind.WBC, "RBC": CellKind.RBC, "Platelets": CellKind.PLATELET, "Platelet": CellKind.PLATELET}


@dataclass(frozen=True)
class VocField:
    """One annotated field: its image file, ground-truth boxes and position in the sorted listing."""

    index: int
    name: str
    image: Path
    size: tuple[int, int]
    boxes: tuple[VocBox, ...]


@dataclass
class FieldResult:
    """Matches and counts of one field."""

    name: str
    index: int
    ms: float
    wbc_gt: int
    wbc_found: int
    wbc_tp_iou: int
    wbc_tp_centroid: int
    rbc_gt: int
    rbc_found: int
    rbc_tp_centroid: int
    plt_gt: int
    plt_found: int
    plt_tp_centroid: int
    plt_objects: int = 0
    rbc_objects: int = 0
    wbc_ious: list[float] = field(default_factory=list)
    #: best IoU of each annotated box (per kind: "WBC", "RBC", "platelet") and IoU>=0.5 matches
    ious: dict[str, list[float]] = field(default_factory=dict)
    tp_iou: dict[str, int] = field(default_factory=dict)
    found_n: dict[str, int] = field(default_factory=dict)
    #: the pixel size used, where it came from, the field's own estimate and a disagreement warning
    um_per_px: float = 0.0
    pixel_size_source: str = "configured"
    estimate: dict[str, Any] = field(default_factory=dict)
    estimate_ms: float = 0.0
    pixel_size_warning: str = ""
    #: boxes (x0, y0, x1, y1, kind) of annotated cells missed and of detections matching no annotation
    misses: list[tuple[float, float, float, float, str]] = field(default_factory=list)
    false_calls: list[tuple[float, float, float, float, str]] = field(default_factory=list)


def list_voc_fields(voc_dir: Path | str, limit: int | None = None) -> list[VocField]:
    """The annotated images of a VOC folder (``JPEGImages/`` + ``Annotations/``), sorted by name."""
    root = Path(voc_dir)
    images, annots = root / "JPEGImages", root / "Annotations"
    if not images.is_dir() or not annots.is_dir():
        raise DatasetError(f"{root} is not a Pascal-VOC folder: it needs JPEGImages/ and Annotations/")
    out: list[VocField] = []
    xmls = sorted(annots.glob("*.xml"))
    for i, xml in enumerate(xmls):
        img = next((p for ext in (".jpg", ".jpeg", ".png", ".JPG") if (p := images / (xml.stem + ext)).is_file()), None)
        if img is None:
            continue
        size, boxes = read_voc(xml)
        out.append(VocField(i, xml.stem, img, size, tuple(boxes)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DatasetError(f"{root}: no annotation in Annotations/ has a matching image in JPEGImages/")
    return out


def load_rgb(path: Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _cell_box(c: Cell) -> tuple[float, float, float, float]:
    r0, c0, r1, c1 = c.bbox
    return float(c0), float(r0), float(c1), float(r1)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_iou(cells: list[Cell], gts: list[VocBox], threshold: float = 0.5) -> tuple[int, list[float]]:
    """True positives of a one-to-one greedy matching at IoU >= threshold, and each gt's best IoU."""
    pairs = []
    best = [0.0] * len(gts)
    for i, c in enumerate(cells):
        cb = _cell_box(c)
        for j, g in enumerate(gts):
            v = _iou(cb, (g.x0, g.y0, g.x1, g.y1))
            best[j] = max(best[j], v)
            if v >= threshold:
                pairs.append((v, i, j))
    pairs.sort(reverse=True)
    used_c, used_g = set(), set()
    for _, i, j in pairs:
        if i not in used_c and j not in used_g:
            used_c.add(i)
            used_g.add(j)
    return len(used_g), best


def match_centroids(cells: list[Cell], gts: list[VocBox]) -> int:
    """True positives of a one-to-one matching: the cell's centroid inside the gt box, nearest centre first."""
    pairs = []
    for i, c in enumerate(cells):
        r, col = c.centroid_px
        for j, g in enumerate(gts):
            if g.x0 <= col <= g.x1 and g.y0 <= r <= g.y1:
                d = math.hypot(col - (g.x0 + g.x1) / 2, r - (g.y0 + g.y1) / 2)
                pairs.append((d, i, j))
    pairs.sort()
    used_c, used_g = set(), set()
    for _, i, j in pairs:
        if i not in used_c and j not in used_g:
            used_c.add(i)
            used_g.add(j)
    return len(used_g)


def _unmatched(
    cells: list[Cell], gts: list[VocBox], threshold: float = 0.5
) -> tuple[list[tuple[float, float, float, float]], list[tuple[float, float, float, float]]]:
    """Boxes of ground truth with no detection at IoU >= threshold, and of detections with no ground truth."""
    cb = [_cell_box(c) for c in cells]
    gb = [(g.x0, g.y0, g.x1, g.y1) for g in gts]
    miss = [g for g in gb if not any(_iou(c, g) >= threshold for c in cb)]
    false = [c for c in cb if not any(_iou(c, g) >= threshold for g in gb)]
    return miss, false


def evaluate_fields(
    fields: Iterable[VocField],
    cfg: SegmentConfig | None = None,
    um_per_px: float | None = BCCD_UM_PER_PX,
    progress: Callable[[int], None] | None = None,
) -> list[FieldResult]:
    """Segment every field and match the detections to its boxes.

    Every field's pixel size is also estimated from its red cells (:func:`estimate_pixel_size`, timed
    apart from segmentation). With ``um_per_px=None`` (fields without a pixel size) that estimate is
    the one used, or :data:`BCCD_UM_PER_PX` where it fails (``pixel_size_source`` "default").
    """
    cfg = (cfg or SegmentConfig()).model_copy(update={"drop_border_cells": False})
    results: list[FieldResult] = []
    for fld in fields:
        pixels = load_rgb(fld.image)
        t0 = time.perf_counter()
        est = estimate_pixel_size(pixels, rbc_diameter_um=cfg.rbc_diameter_um)
        est_ms = (time.perf_counter() - t0) * 1e3
        if um_per_px is not None:
            ps, source = um_per_px, "configured"
        elif est.um_per_px is not None:
            ps, source = est.um_per_px, "estimated"
        else:
            ps, source = BCCD_UM_PER_PX, "default"
        tile = Tile(pixels, slide_id="voc", tile_id=fld.name, seq=0, x_um=0.0, y_um=0.0, pixel_size_um=ps)
        t0 = time.perf_counter()
        cells, dbg = segment_tile_debug(
            tile, cfg, pixel_size_estimate=est if source == "estimated" else None, check_pixel_size=False
        )
        ms = (time.perf_counter() - t0) * 1e3
        warning = compare_pixel_size(ps, est) if source == "configured" else ""
        gt = {k: [b for b in fld.boxes if GT_NAMES.get(b.name) == k] for k in CellKind}
        found = {k: [c for c in cells if c.kind == k] for k in CellKind}
        tp_iou, ious = match_iou(found[CellKind.WBC], gt[CellKind.WBC])
        all_ious: dict[str, list[float]] = {}
        all_tp: dict[str, int] = {}
        misses: list[tuple[float, float, float, float, str]] = []
        false_calls: list[tuple[float, float, float, float, str]] = []
        for k in CellKind:
            tp_k, best_k = match_iou(found[k], gt[k])
            all_ious[k.value], all_tp[k.value] = [round(v, 4) for v in best_k], tp_k
            miss, false = _unmatched(found[k], gt[k])
            misses.extend((*b, k.value) for b in miss)
            false_calls.extend((*b, k.value) for b in false)
        results.append(
            FieldResult(
                name=fld.name,
                index=fld.index,
                ms=ms,
                wbc_gt=len(gt[CellKind.WBC]),
                wbc_found=len(found[CellKind.WBC]),
                wbc_tp_iou=tp_iou,
                wbc_tp_centroid=match_centroids(found[CellKind.WBC], gt[CellKind.WBC]),
                rbc_gt=len(gt[CellKind.RBC]),
                rbc_found=cell_count(cells, CellKind.RBC),
                rbc_tp_centroid=match_centroids(found[CellKind.RBC], gt[CellKind.RBC]),
                plt_gt=len(gt[CellKind.PLATELET]),
                plt_found=cell_count(cells, CellKind.PLATELET),
                plt_tp_centroid=match_centroids(found[CellKind.PLATELET], gt[CellKind.PLATELET]),
                plt_objects=len(found[CellKind.PLATELET]),
                rbc_objects=len(found[CellKind.RBC]),
                wbc_ious=ious,
                ious=all_ious,
                tp_iou=all_tp,
                found_n={k.value: len(found[k]) for k in CellKind},
                um_per_px=ps,
                pixel_size_source=source,
                estimate=est.to_dict(),
                estimate_ms=est_ms,
                pixel_size_warning=warning,
                misses=misses,
                false_calls=false_calls,
            )
        )
        _ = dbg
        if progress is not None:
            progress(1)
    return results


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.percentile(values, [10, 25, 50, 75, 90])
    return {f"p{p}": round(float(v), 4) for p, v in zip((10, 25, 50, 75, 90), q, strict=True)}


def _pixel_size_summary(results: list[FieldResult]) -> dict[str, Any]:
    """The fields' own pixel-size estimates: median, quantiles and relative spread over fields."""
    est = [float(r.estimate["um_per_px"]) for r in results if r.estimate.get("um_per_px") is not None]
    out: dict[str, Any] = {
        "fields_estimated": len(est),
        "fields_without_estimate": len(results) - len(est),
        "fields_warned": sum(1 for r in results if r.pixel_size_warning),
        "sources": {
            s: sum(1 for r in results if r.pixel_size_source == s) for s in ("configured", "estimated", "default")
        },
        "estimate_ms_median": round(statistics.median(r.estimate_ms for r in results), 2),
        "estimate_ms_p95": round(float(np.percentile([r.estimate_ms for r in results], 95)), 2),
    }
    if est:
        med = statistics.median(est)
        out["median_um_per_px"] = round(med, 5)
        out["quantiles_um_per_px"] = _quantiles(est)
        out["spread_rel"] = round(float(1.4826 * np.median(np.abs(np.array(est) - med)) / med), 4)
        out["median_cells_per_field"] = statistics.median(int(r.estimate["n_cells"]) for r in results)
        out["median_confidence"] = round(statistics.median(float(r.estimate["confidence"]) for r in results), 3)
    return out


def _prf(tp: int, n_found: int, n_gt: int) -> dict[str, float]:
    p = tp / n_found if n_found else 1.0
    r = tp / n_gt if n_gt else 1.0
    f1 = 2 * p * r / (p + r) if (p + r) else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "tp": tp, "found": n_found, "gt": n_gt}


def summarise(results: list[FieldResult]) -> dict[str, Any]:
    """The figures of a list of field results (see the module docstring)."""
    if not results:
        return {"fields": 0}
    wf = sum(r.wbc_found for r in results)
    wg = sum(r.wbc_gt for r in results)
    rel = [(r.rbc_found - r.rbc_gt) / r.rbc_gt * 100.0 for r in results if r.rbc_gt > 0]
    ms = [r.ms for r in results]
    return {
        "fields": len(results),
        "wbc_iou50": _prf(sum(r.wbc_tp_iou for r in results), wf, wg),
        "wbc_centroid": _prf(sum(r.wbc_tp_centroid for r in results), wf, wg),
        "rbc_count_error_pct": round(statistics.fmean(abs(x) for x in rel), 2) if rel else None,
        "rbc_count_error_median_pct": round(statistics.median(abs(x) for x in rel), 2) if rel else None,
        "rbc_count_bias_pct": round(statistics.fmean(rel), 2) if rel else None,
        "rbc_found": sum(r.rbc_found for r in results),
        "rbc_annotated": sum(r.rbc_gt for r in results),
        "rbc_recall_centroid": round(
            sum(r.rbc_tp_centroid for r in results) / max(1, sum(r.rbc_gt for r in results)), 4
        ),
        # share of detected red cells inside an annotated box: low where annotations are incomplete
        "rbc_in_annotated_box": round(
            sum(r.rbc_tp_centroid for r in results) / max(1, sum(r.rbc_objects for r in results)), 4
        ),
        "platelet_recall": round(sum(r.plt_tp_centroid for r in results) / max(1, sum(r.plt_gt for r in results)), 4),
        "platelet_precision": round(
            sum(r.plt_tp_centroid for r in results) / max(1, sum(r.plt_objects for r in results)), 4
        ),
        "ms_per_field_mean": round(statistics.fmean(ms), 2),
        "ms_per_field_median": round(statistics.median(ms), 2),
        "ms_per_field_p95": round(float(np.percentile(ms, 95)), 2),
        "iou50": {
            k.value: _prf(
                sum(r.tp_iou.get(k.value, 0) for r in results),
                sum(r.found_n.get(k.value, 0) for r in results),
                sum(len(r.ious.get(k.value, [])) for r in results),
            )
            for k in CellKind
        },
        "iou_quantiles": {k.value: _quantiles([v for r in results for v in r.ious.get(k.value, [])]) for k in CellKind},
        "pixel_size": _pixel_size_summary(results),
    }


def time_large_tiles(
    fields: list[VocField],
    um_per_px: float,
    tile_um_per_px: float,
    size: int = 2048,
    repeats: int = 3,
    cfg: SegmentConfig | None = None,
) -> dict[str, float]:
    """Milliseconds to segment a ``size`` x ``size`` tile at ``tile_um_per_px``, mosaicked from the fields.

    The fields are resampled from ``um_per_px`` to the tile's pixel size and laid side by side, so the
    tile has a realistic density of cells (the seams between fields do not matter for timing).
    """
    from PIL import Image

    scale = um_per_px / tile_um_per_px
    canvas = np.zeros((size, size, 3), np.uint8)
    k = 0
    r = 0
    row_h = 0
    c = 0
    while r < size:
        fld = fields[k % len(fields)]
        k += 1
        with Image.open(fld.image) as im:
            w, h = im.size
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            arr = np.asarray(im.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR))
        hh, ww = min(nh, size - r), min(nw, size - c)
        canvas[r : r + hh, c : c + ww] = arr[:hh, :ww]
        row_h = max(row_h, nh)
        c += nw
        if c >= size:
            c = 0
            r += row_h
            row_h = 0
    tile = Tile(canvas, slide_id="bench", tile_id="mosaic", seq=0, x_um=0.0, y_um=0.0, pixel_size_um=tile_um_per_px)
    cfg = cfg or SegmentConfig()
    times = []
    n_cells = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        cells, _ = segment_tile_debug(tile, cfg)
        times.append((time.perf_counter() - t0) * 1e3)
        n_cells = len(cells)
    return {
        "size_px": float(size),
        "um_per_px": tile_um_per_px,
        "ms_median": round(statistics.median(times), 1),
        "ms_min": round(min(times), 1),
        "cells": float(n_cells),
    }


def evaluate_virtual(
    n_tiles: int = 20,
    pixel_size_um: float = 0.5,
    size_px: int = 512,
    seed: int = 0,
    data_dir: Path | None = None,
    cfg: SegmentConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Detection figures on tiles of the virtual slide (:mod:`scope_stream.acquire.slide`), whose ground
    truth is complete: every planted white cell, red cell and platelet is known.

    Tiles of ``size_px`` at ``pixel_size_um`` are rendered at random positions (noise-free) and segmented
    with border cells kept. White cells: recall of planted white cells whose centre lies at least 10 µm
    inside the tile (matched within max(4 µm, their radius)); precision of detections at least 10 µm
    inside. Red cells: count per tile against planted red cells whose centre lies in the tile (mean
    absolute %). Platelets: recall of planted platelets at least 3 µm inside (matched within 3 µm).
    """
    from scope_stream.acquire.slide import VirtualSlide
    from scope_stream.config.microscope import MicroscopeConfig
    from scope_stream.datasets import data_root

    root = data_dir if data_dir is not None else (data_root() if (data_root() / "pbc").is_dir() else None)
    slide = VirtualSlide(MicroscopeConfig(seed=seed, data_dir=root))
    cfg = (cfg or SegmentConfig()).model_copy(update={"drop_border_cells": False})
    x0, y0, x1, y1 = slide.bounds_um
    half = size_px * pixel_size_um / 2.0
    rng = np.random.default_rng(seed)
    wbc_must = wbc_found = wbc_det = wbc_det_ok = 0
    plt_must = plt_found = 0
    rbc_err: list[float] = []
    ms: list[float] = []
    missed: list[str] = []
    for k in range(n_tiles):
        x = float(rng.uniform(x0 + half, x1 - half))
        y = float(rng.uniform(y0 + half, y1 - half))
        pixels = slide.render(x, y, size_px, size_px, pixel_size_um)
        tile = Tile(pixels, slide_id="virtual", tile_id=f"v{k}", seq=k, x_um=x, y_um=y, pixel_size_um=pixel_size_um)
        t0 = time.perf_counter()
        cells, _ = segment_tile_debug(tile, cfg)
        ms.append((time.perf_counter() - t0) * 1e3)
        truth = slide.ground_truth((x - half - 20, y - half - 20, x + half + 20, y + half + 20))

        def inside(px: float, py: float, margin: float, cx: float = x, cy: float = y) -> bool:
            return abs(px - cx) <= half - margin and abs(py - cy) <= half - margin

        gw = [g for g in truth if g.kind == "WBC"]
        dw = [c for c in cells if c.kind == CellKind.WBC]
        used: set[int] = set()
        for g in gw:
            if not inside(g.x_um, g.y_um, 10.0):
                continue
            wbc_must += 1
            best, best_d = -1, float("inf")
            for j, c in enumerate(dw):
                d = math.hypot(c.x_um - g.x_um, c.y_um - g.y_um)
                if j not in used and d <= max(4.0, g.diameter_um / 2.0) and d < best_d:
                    best, best_d = j, d
            if best >= 0:
                used.add(best)
                wbc_found += 1
            else:
                missed.append(f"{tile.tile_id}:{g.label}@({g.x_um:.0f},{g.y_um:.0f})")
        for c in dw:
            if not inside(c.x_um, c.y_um, 10.0):
                continue
            wbc_det += 1
            if any(math.hypot(c.x_um - g.x_um, c.y_um - g.y_um) <= max(4.0, g.diameter_um / 2.0) for g in gw):
                wbc_det_ok += 1
        gp = [g for g in truth if g.kind == "platelet" and inside(g.x_um, g.y_um, 3.0)]
        dp = [c for c in cells if c.kind == CellKind.PLATELET]
        used_p: set[int] = set()
        for g in gp:
            plt_must += 1
            for j, c in enumerate(dp):
                if j not in used_p and math.hypot(c.x_um - g.x_um, c.y_um - g.y_um) <= 3.0:
                    used_p.add(j)
                    plt_found += 1
                    break
        n_rbc = sum(1 for g in truth if g.kind == "RBC" and inside(g.x_um, g.y_um, 0.0))
        if n_rbc:
            rbc_err.append((cell_count(cells, CellKind.RBC) - n_rbc) / n_rbc * 100.0)
        if progress is not None:
            progress(1)
    return {
        "tiles": n_tiles,
        "size_px": size_px,
        "um_per_px": pixel_size_um,
        "seed": seed,
        "wbc_recall": round(wbc_found / wbc_must, 4) if wbc_must else None,
        "wbc_precision": round(wbc_det_ok / wbc_det, 4) if wbc_det else None,
        "wbc_planted": wbc_must,
        "wbc_detected": wbc_det,
        "rbc_count_error_pct": round(statistics.fmean(abs(e) for e in rbc_err), 2) if rbc_err else None,
        "rbc_count_bias_pct": round(statistics.fmean(rbc_err), 2) if rbc_err else None,
        "platelet_recall": round(plt_found / plt_must, 4) if plt_must else None,
        "ms_per_tile_median": round(statistics.median(ms), 1) if ms else None,
        "wbc_missed": missed[:50],
    }


_COLOURS = {"WBC": (40, 90, 255), "RBC": (230, 40, 40), "platelet": (150, 0, 200)}


def write_examples(results: list[FieldResult], fields: list[VocField], out_dir: Path | str, n: int = 8) -> list[Path]:
    """PNG overlays of the ``n`` fields with the most white-cell, then platelet, then red-cell errors.

    Annotated boxes missed (no detection at IoU >= 0.5) are drawn solid and thick in the kind's colour
    (WBC blue, RBC red, platelet purple) with an "M"; detections matching no annotation thin
    with an "F" (BCCD leaves many red cells unannotated, so red "F" boxes are often real cells).
    """
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {f.name: f for f in fields}

    def errors(r: FieldResult) -> tuple[int, int, int]:
        def k(kind: str) -> int:
            return sum(1 for b in r.misses if b[4] == kind) + sum(1 for b in r.false_calls if b[4] == kind)

        return (k("WBC"), k("platelet"), k("RBC"))

    ranked = sorted((r for r in results if r.misses or r.false_calls), key=errors, reverse=True)[:n]
    paths: list[Path] = []
    for r in ranked:
        fld = by_name.get(r.name)
        if fld is None:
            continue
        img = Image.fromarray(load_rgb(fld.image))
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1, kind in r.misses:
            draw.rectangle((x0, y0, x1, y1), outline=_COLOURS.get(kind, (0, 0, 0)), width=3)
            draw.text((x0 + 3, y0 + 2), f"M {kind}", fill=_COLOURS.get(kind, (0, 0, 0)))
        for x0, y0, x1, y1, kind in r.false_calls:
            draw.rectangle((x0, y0, x1, y1), outline=_COLOURS.get(kind, (0, 0, 0)), width=1)
            draw.text((x0 + 2, y1 - 12), f"F {kind}", fill=_COLOURS.get(kind, (0, 0, 0)))
        wbc, plt, rbc = errors(r)
        draw.text(
            (4, 4), f"{r.name}: errors WBC {wbc} platelet {plt} RBC {rbc}; {r.um_per_px:.4f} um/px", fill=(0, 0, 0)
        )
        p = out / f"{r.name}.png"
        img.save(p)
        paths.append(p)
    return paths
