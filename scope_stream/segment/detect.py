"""``segment_tile``: every white cell, red cell and platelet of one tile, as :class:`Cell` objects.

The tile is block-averaged to a working resolution near ``cfg.work_um_per_px`` (whatever the camera's
pixel size; never upsampled), converted to background-relative optical density and separated into
nuclear and red-cell stains (:mod:`.stain`). White cells, then red cells, then platelets are found at
that resolution (:mod:`.wbc`, :mod:`.rbc`, :mod:`.platelets`) and reported in tile pixels and stage µm.

Tiles overlap during a scan. A cell whose mask touches the tile border is dropped by default
(``drop_border_cells``): the neighbour tile sees it whole *provided the overlap is at least the largest
white-cell diameter* (``max_wbc_diameter_um``, 30 µm by default). A cell seen whole in both tiles is
then reported twice; :class:`~.dedup.StageDeduplicator` removes the second copy in stage coordinates.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from scope_stream.config.segment import SegmentConfig
from scope_stream.vocabulary import Cell, CellKind, Tile

from .morph import dilate
from .pixel_size import PixelSizeEstimate, compare_pixel_size, estimate_from_total, estimate_pixel_size
from .platelets import find_platelets
from .rbc import find_rbcs
from .stain import as_rgb_float, block_downsample, check_pixels, estimate_background, separate_stains, working_factor
from .wbc import find_wbcs

__all__ = ["SegmentDebug", "cell_count", "segment_image", "segment_image_debug", "segment_tile", "segment_tile_debug"]

log = logging.getLogger(__name__)
_warned: set[tuple[str, float]] = set()


@dataclass
class SegmentDebug:
    """What :func:`segment_tile_debug` saw: working resolution, thresholds, label images, timings."""

    factor: int = 1
    work_um_per_px: float = 0.0
    blank: str = ""
    nucleus_threshold: float = float("nan")
    foreground_threshold: float = float("nan")
    wbc_labels: np.ndarray | None = None
    rbc_labels: np.ndarray | None = None
    platelet_labels: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: the pixel size used (µm/px), and whether it was "configured" (the tile's) or "estimated"
    pixel_size_um: float = 0.0
    pixel_size_source: str = "configured"
    #: the pixel size the tile's red cells suggest (:func:`.pixel_size.estimate_pixel_size`)
    pixel_size_estimate: PixelSizeEstimate | None = None
    #: non-empty when a confident estimate disagrees with the configured pixel size by more than 15%
    pixel_size_warning: str = ""


def segment_tile(tile: Tile, cfg: SegmentConfig | None = None) -> list[Cell]:
    """All white cells, red cells and platelets of ``tile`` (in that order).

    Cells carry their bounding box, centroid and contour in tile pixels, their stage position (µm) via
    :meth:`Tile.px_to_stage`, and physical features (``area_um2``, ``circularity``, ``diameter_um``;
    white cells also ``nucleus_area_um2``, ``nucleus_fraction``, ``nucleus_lobes``; red cells
    ``central_pallor``; red cells and platelets ``count``, above 1 for an unsplit clump). Ids are
    ``f"{tile.tile_id}:{kind}:{index}"``, deterministic for given pixels and configuration.

    Blank, black or saturated tiles give ``[]``; pixels that are not an image, or a pixel size coarser
    than ``cfg.max_um_per_px``, raise :class:`ValueError` naming the problem.
    """
    return segment_tile_debug(tile, cfg)[0]


def segment_image(
    pixels: np.ndarray,
    pixel_size_um: float | None = None,
    cfg: SegmentConfig | None = None,
    *,
    tile_id: str = "image",
    slide_id: str = "image",
) -> list[Cell]:
    """:func:`segment_tile` for a bare array (stage position: the image centre at (0, 0)).

    Without ``pixel_size_um`` it is estimated from the red cells (:func:`estimate_pixel_size`); a field
    where that fails gives ``[]`` and a logged warning (:func:`segment_image_debug` says why).
    """
    return segment_image_debug(pixels, pixel_size_um, cfg, tile_id=tile_id, slide_id=slide_id)[0]


def segment_image_debug(
    pixels: np.ndarray,
    pixel_size_um: float | None = None,
    cfg: SegmentConfig | None = None,
    *,
    tile_id: str = "image",
    slide_id: str = "image",
) -> tuple[list[Cell], SegmentDebug]:
    """:func:`segment_image` plus :class:`SegmentDebug` (with the pixel size used and its source)."""
    pixels = check_pixels(pixels)
    if pixels.dtype.name not in ("uint8", "uint16", "float32"):
        pixels = pixels.astype(np.float32)
    est: PixelSizeEstimate | None = None
    if pixel_size_um is None:
        est = estimate_pixel_size(pixels, rbc_diameter_um=(cfg or SegmentConfig()).rbc_diameter_um)
        if est.um_per_px is None:
            log.warning("%s: no pixel size given and none could be estimated: %s", tile_id, est.reason)
            dbg = SegmentDebug(blank=f"no pixel size: {est.reason}", pixel_size_source="none", pixel_size_estimate=est)
            return [], dbg
        pixel_size_um = est.um_per_px
    tile = Tile(pixels, slide_id=slide_id, tile_id=tile_id, seq=0, x_um=0.0, y_um=0.0, pixel_size_um=pixel_size_um)
    cells, dbg = segment_tile_debug(tile, cfg, pixel_size_estimate=est)
    return cells, dbg


def cell_count(cells: list[Cell], kind: CellKind) -> int:
    """How many cells of ``kind`` the list stands for (clumps count as their ``count`` feature)."""
    return round(sum(c.features.get("count", 1.0) for c in cells if c.kind == kind))


def segment_tile_debug(
    tile: Tile,
    cfg: SegmentConfig | None = None,
    *,
    pixel_size_estimate: PixelSizeEstimate | None = None,
    check_pixel_size: bool = True,
) -> tuple[list[Cell], SegmentDebug]:
    """:func:`segment_tile` plus the intermediate results (for evaluation, tuning and the viewer).

    ``pixel_size_estimate``: the tile's pixel size was estimated (``segment_image`` without one), so
    it is recorded as such. Otherwise, with ``check_pixel_size``, the red cells' own pixel size is
    estimated from the stain image already computed (a few ms) and a warning logged (once per slide
    and pixel size) and recorded when it disagrees with the tile's by more than 15%.
    """
    cfg = cfg or SegmentConfig()
    dbg = SegmentDebug(pixel_size_um=tile.pixel_size_um)
    if pixel_size_estimate is not None:
        dbg.pixel_size_source, dbg.pixel_size_estimate = "estimated", pixel_size_estimate
    t0 = time.perf_counter()
    arr = check_pixels(tile.pixels)
    if not (math.isfinite(tile.pixel_size_um) and 0 < tile.pixel_size_um <= cfg.max_um_per_px):
        raise ValueError(
            f"tile {tile.tile_id!r}: pixel size {tile.pixel_size_um} µm/px is too coarse to segment cells "
            f"(at most segment.max_um_per_px = {cfg.max_um_per_px} µm/px)"
        )
    h, w = arr.shape[:2]
    f = working_factor(tile.pixel_size_um, cfg.work_um_per_px)
    f = max(1, min(f, h // 8, w // 8)) if min(h, w) >= 8 else 1
    px_um = tile.pixel_size_um * f
    dbg.factor, dbg.work_um_per_px = f, px_um
    raw = as_rgb_float(arr) if np.issubdtype(arr.dtype, np.floating) else arr
    img = block_downsample(raw, f)
    if img.shape[2] == 3 and np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2]):
        img = img[:, :, :1]  # a grey image stored as RGB
    bg = estimate_background(img)
    dbg.blank = _blank_reason(img, bg, cfg)
    if dbg.blank or min(img.shape[:2]) < 4:
        dbg.blank = dbg.blank or "too small"
        return [], dbg
    st = separate_stains(img, px_um, background=bg)
    if st.dynamic_range < cfg.min_contrast:
        dbg.blank = f"contrast {st.dynamic_range:.3f} < {cfg.min_contrast}"
        return [], dbg
    if pixel_size_estimate is None and check_pixel_size:
        _check_pixel_size(tile, st.total, f, cfg, dbg)
    t1 = time.perf_counter()
    wbc = find_wbcs(st, px_um, cfg)
    dbg.nucleus_threshold = wbc.threshold
    dbg.wbc_labels = wbc.cells
    t2 = time.perf_counter()
    builder = _CellBuilder(tile, f, img.shape[:2], cfg)
    cells: list[Cell] = []
    wbc_any = wbc.cells > 0
    wbc_slices = ndi.find_objects(wbc.cells, max_label=wbc.n) if wbc.n else []
    for i, sl in enumerate(wbc_slices, start=1):
        if sl is None or wbc.features[i - 1].get("diameter_um", 0.0) < cfg.min_wbc_diameter_um:
            continue
        cell = builder.wbc(wbc.cells, sl, i, wbc.features[i - 1], wbc.outlines[i - 1])
        if cell is not None:
            cells.append(cell)
    t3 = time.perf_counter()
    if cfg.detect_rbc:
        grown = dilate(wbc_any, 1.0) if wbc.n else None
        rbc = find_rbcs(st, px_um, cfg, exclude=grown)
        dbg.foreground_threshold = rbc.threshold
        dbg.rbc_labels = rbc.labels
        cells.extend(
            builder.many(
                CellKind.RBC,
                rbc.labels,
                rbc.n,
                {"count": rbc.count, "circularity": rbc.circularity, "central_pallor": rbc.pallor},
            )
        )
    t4 = time.perf_counter()
    if cfg.detect_platelets:
        plt = find_platelets(st, px_um, cfg, exclude=wbc_any)
        dbg.platelet_labels = plt.labels
        cells.extend(
            builder.many(
                CellKind.PLATELET,
                plt.labels,
                plt.n,
                {"count": plt.count, "circularity": plt.circularity, "stain_od": plt.od},
            )
        )
    t5 = time.perf_counter()
    dbg.timings_ms = {
        "prepare": (t1 - t0) * 1e3,
        "wbc": (t3 - t1) * 1e3,
        "rbc": (t4 - t3) * 1e3,
        "platelets": (t5 - t4) * 1e3,
        "total": (t5 - t0) * 1e3,
    }
    _ = t2
    return cells, dbg


def _check_pixel_size(tile: Tile, total: np.ndarray, f: int, cfg: SegmentConfig, dbg: SegmentDebug) -> None:
    """Estimate the pixel size from the working image's red cells; record (and log) a disagreement."""
    est, _ = estimate_from_total(total, f, rbc_diameter_um=cfg.rbc_diameter_um)
    dbg.pixel_size_estimate = est
    dbg.pixel_size_warning = compare_pixel_size(tile.pixel_size_um, est)
    if dbg.pixel_size_warning:
        key = (tile.slide_id, round(tile.pixel_size_um, 6))
        if key not in _warned:
            if len(_warned) > 1000:
                _warned.clear()
            _warned.add(key)
            log.warning("slide %s, tile %s: %s", tile.slide_id, tile.tile_id, dbg.pixel_size_warning)


def _blank_reason(img: np.ndarray, bg: np.ndarray, cfg: SegmentConfig) -> str:
    """Why a working image holds nothing ("" when it may hold cells): black, flat/saturated, or noise."""
    peak = float(bg.max())
    if not peak > 0:
        return "black"
    step = max(1, img.shape[0] // 128)
    rows = img[::step].mean(axis=2)
    lo = float(np.percentile(rows, 1.0))
    if (peak - lo) / peak < cfg.min_contrast:
        return f"flat (contrast {(peak - lo) / peak:.3f})"
    noise = float(np.median(np.abs(np.diff(rows, axis=1)))) / peak
    if noise > 0.05:
        return f"noise ({noise:.2f} of the background)"
    return ""


class _CellBuilder:
    """Turns working-resolution label images into :class:`Cell` objects in tile coordinates."""

    def __init__(self, tile: Tile, factor: int, work_shape: tuple[int, int], cfg: SegmentConfig) -> None:
        self.tile = tile
        self.f = factor
        self.hw, self.ww = work_shape
        self.h, self.w = tile.pixels.shape[:2]
        self.cfg = cfg
        self.px_um = tile.pixel_size_um * factor
        self.counters = {k: 0 for k in CellKind}

    def _to_tile(self, r: float, c: float) -> tuple[float, float]:
        f = self.f
        return (r + 0.5) * f - 0.5, (c + 0.5) * f - 0.5

    def _bbox(self, sl: tuple[slice, slice]) -> tuple[int, int, int, int]:
        f = self.f
        r0, r1, c0, c1 = sl[0].start * f, sl[0].stop * f, sl[1].start * f, sl[1].stop * f
        return int(r0), int(c0), int(min(self.h, max(r1, r0 + 1))), int(min(self.w, max(c1, c0 + 1)))

    def _touches(self, sl: tuple[slice, slice]) -> bool:
        return sl[0].start == 0 or sl[1].start == 0 or sl[0].stop >= self.hw or sl[1].stop >= self.ww

    def _next_id(self, kind: CellKind) -> str:
        i = self.counters[kind]
        self.counters[kind] = i + 1
        return f"{self.tile.tile_id}:{kind.value}:{i}"

    def wbc(
        self, cells: np.ndarray, sl: tuple[slice, slice], i: int, feats: dict[str, float], outline: np.ndarray
    ) -> Cell | None:
        """White cell ``i`` (bounding slice ``sl``); None when it touches the border and those are dropped."""
        touches = self._touches(sl)
        if touches and self.cfg.drop_border_cells:
            return None
        mask = cells[sl] == i
        rr, cc = np.nonzero(mask)
        cr, cc_ = self._to_tile(float(rr.mean()) + sl[0].start, float(cc.mean()) + sl[1].start)
        contour = self._polygon(outline)
        area = float(mask.sum())
        perim = _perimeter_of_polygon(contour) / self.f if len(contour) >= 3 else 0.0
        feats = dict(feats)
        feats["circularity"] = float(min(1.0, 4 * math.pi * area / perim**2)) if perim > 0 else 0.0
        feats["touches_border"] = float(touches)
        x, y = self.tile.px_to_stage(cr, cc_)
        return Cell(
            cell_id=self._next_id(CellKind.WBC),
            tile_id=self.tile.tile_id,
            slide_id=self.tile.slide_id,
            kind=CellKind.WBC,
            bbox=self._bbox(sl),
            centroid_px=(cr, cc_),
            x_um=x,
            y_um=y,
            area_px=area * self.f * self.f,
            contour=contour,
            features={k: float(v) for k, v in feats.items()},
        )

    def _polygon(self, outline: np.ndarray) -> list[tuple[float, float]]:
        """A working-resolution outline in tile pixels, at most ``max_contour_vertices`` vertices."""
        nmax = self.cfg.max_contour_vertices
        if len(outline) > nmax:
            outline = outline[np.linspace(0, len(outline), nmax, endpoint=False).astype(int)]
        f = self.f
        return [(round(float((r + 0.5) * f - 0.5), 2), round(float((c + 0.5) * f - 0.5), 2)) for r, c in outline]

    def many(self, kind: CellKind, labels: np.ndarray, n: int, extra: dict[str, np.ndarray]) -> list[Cell]:
        """Cells for labels ``1..n`` at once, with ellipse contours from their second moments."""
        if n == 0:
            return []
        slices = ndi.find_objects(labels, max_label=n)
        flat = labels.ravel()
        where = np.flatnonzero(flat)
        lab = flat[where]
        rows, cols = np.divmod(where, labels.shape[1])
        rows_f, cols_f = rows.astype(np.float64), cols.astype(np.float64)
        area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
        a = np.maximum(area, 1.0)
        mr = np.bincount(lab, rows_f, minlength=n + 1)[1:] / a
        mc = np.bincount(lab, cols_f, minlength=n + 1)[1:] / a
        dr, dc = rows_f - mr[lab - 1], cols_f - mc[lab - 1]
        vrr = np.bincount(lab, dr * dr, minlength=n + 1)[1:] / a + 1 / 12
        vcc = np.bincount(lab, dc * dc, minlength=n + 1)[1:] / a + 1 / 12
        vrc = np.bincount(lab, dr * dc, minlength=n + 1)[1:] / a
        # ellipse of the same second moments (2 standard deviations = the radius of a uniform disk)
        half_tr = 0.5 * (vrr + vcc)
        disc = np.sqrt(np.maximum(0.25 * (vrr - vcc) ** 2 + vrc * vrc, 0.0))
        l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 1e-6)
        ang = 0.5 * np.arctan2(2.0 * vrc, vrr - vcc)  # direction of the major axis from the row axis
        nv = min(16, self.cfg.max_contour_vertices)
        theta = np.linspace(0, 2 * math.pi, nv, endpoint=False)
        px2 = self.px_um**2
        f = self.f
        # every ellipse outline at once, in tile pixels, rounded: (n, nv) rows and cols
        ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
        u = 2.0 * np.sqrt(l1)[:, None] * np.cos(theta)[None, :]
        v = 2.0 * np.sqrt(l2)[:, None] * np.sin(theta)[None, :]
        prs = np.clip(mr[:, None] + u * ca - v * sa, -0.5, self.hw - 0.5)
        pcs = np.clip(mc[:, None] + u * sa + v * ca, -0.5, self.ww - 0.5)
        outlines = np.round(np.stack([(prs + 0.5) * f - 0.5, (pcs + 0.5) * f - 0.5], axis=2), 2).tolist()
        out: list[Cell] = []
        for k in range(n):
            sl = slices[k]
            if sl is None or area[k] == 0:
                continue
            touches = self._touches(sl)
            if touches and self.cfg.drop_border_cells:
                continue
            contour = [(p[0], p[1]) for p in outlines[k]]
            cr, cc_ = self._to_tile(float(mr[k]), float(mc[k]))
            x, y = self.tile.px_to_stage(cr, cc_)
            feats = {
                "area_um2": float(area[k] * px2),
                "diameter_um": float(2.0 * math.sqrt(area[k] / math.pi) * self.px_um),
                "touches_border": float(touches),
            }
            for name, values in extra.items():
                feats[name] = float(values[k])
            out.append(
                Cell(
                    cell_id=self._next_id(kind),
                    tile_id=self.tile.tile_id,
                    slide_id=self.tile.slide_id,
                    kind=kind,
                    bbox=self._bbox(sl),
                    centroid_px=(cr, cc_),
                    x_um=x,
                    y_um=y,
                    area_px=float(area[k] * self.f * self.f),
                    contour=contour,
                    features=feats,
                )
            )
        return out


def _perimeter_of_polygon(contour: list[tuple[float, float]]) -> float:
    pts = np.asarray(contour, dtype=np.float64)
    d = np.diff(np.vstack([pts, pts[:1]]), axis=0)
    return float(np.hypot(d[:, 0], d[:, 1]).sum())
