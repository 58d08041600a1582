"""Pixel size from the smear itself: red cells are about 7.5 µm across in every lab.

:func:`estimate_pixel_size` finds *isolated, round, whole* red-cell blobs without assuming any scale:
the field is converted to background-relative optical density (:mod:`.stain`), thresholded like the
red-cell foreground (half of Otsu's total-OD threshold, carrying eosin), pallor holes filled, and every
connected component measured (area, boundary length, second moments, stain colour). Components that are
round (circularity and moment-ellipse axis ratio), solid (their area fills the ellipse of equal moments),
eosin-coloured (not a nucleus or a platelet), away from the border and big enough to measure are single
red cells; touching cells and clumps fail the roundness tests. The estimate is the nominal red-cell
diameter over the robust centre (iteratively trimmed median) of their equivalent diameters in pixels.

The work is done on a block-averaged copy near 16-40 px per red cell: a first pass at a size chosen
from the image alone (short side about 200 px) gives a rough cell size, and a second pass at a better
factor runs only when the first one saw cells too small (or too large) to measure well. A 640x480 field
takes a few milliseconds on one core.

The confidence (0-1) grows with the number of cells used (full at 15) and falls with their spread
(relative robust standard deviation of the diameters: 0.05-0.08 on real smears; 0 at 0.25). Fields with
fewer than :data:`MIN_CELLS` usable cells give ``um_per_px=None``, confidence 0 and a ``reason``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from scope_stream.config.segment import SegmentConfig

from .morph import gaussian, label_perimeters, otsu
from .stain import as_rgb_float, block_downsample, check_pixels, estimate_background

__all__ = [
    "MIN_CELLS",
    "NOMINAL_RBC_DIAMETER_UM",
    "PixelSizeEstimate",
    "compare_pixel_size",
    "estimate_from_total",
    "estimate_pixel_size",
]

#: Normal red-cell diameter on a dried, stained smear (µm); the same in every lab.
NOMINAL_RBC_DIAMETER_UM = 7.5
#: Fewer usable red cells than this: no estimate.
MIN_CELLS = 3
#: Cells this many (or more) give full confidence (when their spread is small).
FULL_CONFIDENCE_CELLS = 15
#: The first pass block-averages the image to about this many pixels on its short side.
_FIRST_PASS_SIDE = 120
#: Red-cell radii (working pixels) measured well enough; outside, a second pass at a better factor.
_MIN_GOOD_RADIUS = 5.0
_MAX_GOOD_RADIUS = 24.0
#: ... whose factor aims at this radius.
_TARGET_RADIUS_WORK = 8.0
#: Isolated round red cells needed to measure their areas (fewer: distance peaks of the crowd).
_MIN_ISOLATED = 8
#: Distance peaks below this (working pixels) are noise, not cells.
_MIN_PEAK_RADIUS = 2.5

_CFG = SegmentConfig()


@dataclass(frozen=True)
class PixelSizeEstimate:
    """Pixel size (µm/px) estimated from a field's red cells.

    ``um_per_px`` is None when the field does not have :data:`MIN_CELLS` usable red cells (then
    ``confidence`` is 0 and ``reason`` says why). ``n_cells``: isolated round red cells used;
    ``spread``: relative robust standard deviation of their diameters (1.4826 MAD / median);
    ``diameter_px``: their median equivalent diameter in the image's pixels; ``factor``: the
    block-averaging factor the cells were measured at; ``method``: ``"isolated"`` (areas of
    isolated round cells) or ``"distance peaks"`` (inscribed radii in a crowded field).
    """

    um_per_px: float | None
    n_cells: int
    spread: float
    confidence: float
    diameter_px: float | None = None
    reason: str = ""
    factor: int = 1
    method: str = ""

    @property
    def ok(self) -> bool:
        return self.um_per_px is not None and self.confidence > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("um_per_px", "spread", "confidence", "diameter_px"):
            if isinstance(d[k], float):
                d[k] = round(d[k], 5)
        return d


def _none(reason: str, n: int = 0, factor: int = 1) -> PixelSizeEstimate:
    return PixelSizeEstimate(None, n, float("nan"), 0.0, None, reason, factor)


def estimate_pixel_size(pixels: np.ndarray, *, rbc_diameter_um: float = NOMINAL_RBC_DIAMETER_UM) -> PixelSizeEstimate:
    """Estimate µm per pixel of a smear field from the size of its red cells.

    Accepts the same arrays as segmentation (``(H, W)``, ``(H, W, 1|3|4)``; uint8, uint16, float).
    Never raises for an image without red cells (blank, black, noise, only white cells): the answer
    then has ``um_per_px=None``, confidence 0 and a reason. Arrays that are not images raise
    :class:`ValueError` as :func:`~.stain.check_pixels` does.
    """
    arr = check_pixels(pixels)
    h, w = arr.shape[:2]
    if min(h, w) < 16:
        return _none(f"image too small ({h}x{w} px)")
    raw = as_rgb_float(arr) if np.issubdtype(arr.dtype, np.floating) else arr
    f1 = max(1, round(min(h, w) / _FIRST_PASS_SIDE))
    est, r_work = _estimate_at(raw, f1, rbc_diameter_um)
    if est.reason.startswith(("blank", "black")):
        return est
    if r_work is None:
        if f1 == 1:
            return est
        want = 1  # the cells may have been too small to see at that factor
    else:
        want = max(1, round(r_work * f1 / _TARGET_RADIUS_WORK))
        want = min(want, max(1, min(h, w) // 48))
        if want == f1 or _MIN_GOOD_RADIUS <= r_work <= _MAX_GOOD_RADIUS:
            return est
    est2, r2 = _estimate_at(raw, want, rbc_diameter_um)
    return est2 if r2 is not None or r_work is None else est


def _estimate_at(raw: np.ndarray, f: int, rbc_diameter_um: float) -> tuple[PixelSizeEstimate, float | None]:
    """One pass at block-averaging factor ``f``: the estimate and the cells' radius in working pixels."""
    img = block_downsample(raw, f)
    bg = estimate_background(img)
    peak = float(bg.max())
    if not peak > 0:
        return _none("black image", factor=f), None
    od = np.log10(np.maximum(img, 1e-6), dtype=np.float32)
    np.subtract(np.log10(np.maximum(bg, 1e-6)).astype(np.float32), od, out=od)
    np.clip(od, 0.0, 2.5, out=od)
    total = od.sum(axis=2)
    lo = float(np.percentile(img.mean(axis=2)[:: max(1, img.shape[0] // 128)], 1.0))
    if (peak - lo) / peak < _CFG.min_contrast:
        return _none(f"blank image (contrast {(peak - lo) / peak:.3f})", factor=f), None
    noise = float(np.median(np.abs(np.diff(img[:: max(1, img.shape[0] // 128)].mean(axis=2), axis=1)))) / peak
    if noise > 0.05:
        return _none(f"blank image: noise ({noise:.2f} of the background)", factor=f), None
    return estimate_from_total(total, f, rbc_diameter_um=rbc_diameter_um)


def estimate_from_total(
    total: np.ndarray, factor: int = 1, *, rbc_diameter_um: float = NOMINAL_RBC_DIAMETER_UM
) -> tuple[PixelSizeEstimate, float | None]:
    """The estimate from a working-resolution total optical density image block-averaged by ``factor``.

    Also returns the red-cell radius in working pixels (None without cells), so a caller can tell
    whether the resolution suited the cells (a radius of about 5-24 px is best).
    """
    tot = gaussian(total, 0.7)
    sample = tot.reshape(-1)[:: max(1, tot.size // 50_000)]
    if float(np.percentile(sample, 99)) < _CFG.foreground_od_min:
        return _none("no stained objects", factor=factor), None
    t = float(np.clip(0.5 * otsu(sample), _CFG.foreground_od_min, _CFG.foreground_od_max))
    fg = _fill_holes(tot > t)  # central pallor (and glass enclosed by cells)
    fg = ndi.binary_opening(fg)  # one-pixel spurs and bridges
    if not fg.any():
        return _none("no stained objects", factor=factor), None
    iso = _isolated_diameters(total, tot, fg)
    if len(iso) >= _MIN_ISOLATED:
        return _summarise(iso / 2.0, factor, rbc_diameter_um, "isolated")
    r = _distance_peaks(fg)
    if len(r) < MIN_CELLS:
        return (
            _none(f"only {len(r)} red-cell candidate(s) found (need {MIN_CELLS})", n=len(r), factor=factor),
            None,
        )
    return _summarise(r, factor, rbc_diameter_um, "distance peaks")


def _isolated_diameters(total: np.ndarray, tot: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Equivalent diameters (working px) of the isolated, round, whole blobs of ``fg``.

    Each blob is re-measured at half its own peak density (the half-maximum contour of a blurred
    disk stays on its edge, whatever the blur and the pixel size), pallor filled.
    """
    lab, n = ndi.label(fg)
    if n == 0:
        return np.zeros(0)
    h, w = lab.shape
    flat = lab.ravel()
    where = np.flatnonzero(flat)
    lb = flat[where]
    area = np.bincount(lb, minlength=n + 1)[1:].astype(np.float64)
    big = area >= math.pi * 3.0**2  # at least 6 px across
    if not big.any():
        return np.zeros(0)
    rows, cols = np.divmod(where, w)
    a = np.maximum(area, 1.0)
    mr = np.bincount(lb, rows, minlength=n + 1)[1:] / a
    mc = np.bincount(lb, cols, minlength=n + 1)[1:] / a
    dr, dc = rows - mr[lb - 1], cols - mc[lb - 1]
    vrr = np.bincount(lb, dr * dr, minlength=n + 1)[1:] / a + 1 / 12
    vcc = np.bincount(lb, dc * dc, minlength=n + 1)[1:] / a + 1 / 12
    vrc = np.bincount(lb, dr * dc, minlength=n + 1)[1:] / a
    half_tr = 0.5 * (vrr + vcc)
    disc = np.sqrt(np.maximum(0.25 * (vrr - vcc) ** 2 + vrc * vrc, 0.0))
    l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 1e-9)
    fill = area / (4.0 * math.pi * np.sqrt(l1 * l2))  # 1 for a filled ellipse, < 1 for a clump
    circ = 4.0 * math.pi * area / np.maximum(label_perimeters(lab, n), 1.0) ** 2
    slices = ndi.find_objects(lab, max_label=n)
    border = np.array(
        [s is None or s[0].start == 0 or s[1].start == 0 or s[0].stop >= h or s[1].stop >= w for s in slices]
    )
    keep = big & ~border & (circ >= 0.8) & (np.sqrt(l2 / l1) >= 0.8) & (np.abs(fill - 1.0) <= 0.07)
    if keep.sum() < _MIN_ISOLATED:
        return np.zeros(0)
    peak = np.zeros(n + 1, np.float32)
    peak[1:] = np.asarray(ndi.maximum(tot, lab, np.arange(1, n + 1)), dtype=np.float32)
    core = _fill_holes((total > 0.5 * peak[lab]) & (lab > 0))
    area2 = np.bincount(lab[core], minlength=n + 1)[1:].astype(np.float64)
    return np.asarray(2.0 * np.sqrt(area2[keep] / math.pi))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not connected to the image border filled (fast)."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    hole = np.ones(n + 1, bool)
    hole[edge] = False
    hole[0] = False
    return np.asarray(mask | hole[lab])


def _distance_peaks(fg: np.ndarray) -> np.ndarray:
    """Inscribed-disk radii (working px) at the local maxima of the distance to the glass.

    For a union of overlapping disks of radius r the distance at each centre is r and dips between
    centres, so the peak values cluster at the red-cell radius in crowded fields too.
    """
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    mx = ndi.maximum_filter(dist, size=5, mode="constant")
    cand = (dist >= mx) & (dist >= _MIN_PEAK_RADIUS)
    cand[:2, :] = False
    cand[-2:, :] = False
    cand[:, :2] = False
    cand[:, -2:] = False
    if not cand.any():
        return np.zeros(0)
    lab, n = ndi.label(cand, structure=np.ones((3, 3), bool))
    vals = np.asarray(ndi.maximum(dist, lab, np.arange(1, n + 1)), dtype=np.float64)
    return vals - 0.5  # a digitised disk's centre lies about r + 0.5 px from the nearest glass pixel


def _summarise(
    r: np.ndarray, factor: int, rbc_diameter_um: float, method: str
) -> tuple[PixelSizeEstimate, float | None]:
    """Robust centre, spread and confidence of red-cell radii (working px)."""
    r = r[r > 0]
    if len(r) < MIN_CELLS:
        return _none(f"only {len(r)} red-cell candidate(s) found (need {MIN_CELLS})", n=len(r), factor=factor), None
    mode = _log_mode(r)
    kept = r[(r >= 0.8 * mode) & (r <= 1.25 * mode)]
    if len(kept) < MIN_CELLS:
        msg = f"only {len(kept)} red cell(s) of a common size (need {MIN_CELLS})"
        return _none(msg, n=len(kept), factor=factor), None
    med = float(np.median(kept))
    spread = float(1.4826 * np.median(np.abs(kept - med)) / med)
    n_used = len(kept)
    conf = min(1.0, n_used / FULL_CONFIDENCE_CELLS) * float(np.clip(1.0 - max(0.0, spread - 0.05) / 0.2, 0.0, 1.0))
    d_px = 2.0 * med * factor
    if conf <= 0:
        msg = f"red-cell sizes too spread out ({spread:.2f})"
        return PixelSizeEstimate(None, n_used, spread, 0.0, d_px, msg, factor, method), med
    return PixelSizeEstimate(rbc_diameter_um / d_px, n_used, spread, round(conf, 4), d_px, "", factor, method), med


def _log_mode(r: np.ndarray) -> float:
    """The most populated size: mode of a smoothed histogram of log radii (bins of 4%)."""
    lr = np.log(r)
    lo, hi = float(lr.min()), float(lr.max())
    nb = max(1, math.ceil((hi - lo) / 0.04) + 1)
    hist = np.bincount(((lr - lo) / 0.04).astype(int), minlength=nb).astype(np.float64)
    smooth = np.convolve(hist, np.ones(5) / 5.0, mode="same")  # a +-8% window
    k = int(np.argmax(smooth))
    return float(math.exp(lo + (k + 0.5) * 0.04))


def compare_pixel_size(
    configured_um_per_px: float, est: PixelSizeEstimate, tolerance: float = 0.15, min_confidence: float = 0.3
) -> str:
    """A warning (non-empty) when a confident estimate disagrees with the configured pixel size.

    Disagreement is ``|configured / estimated - 1| > tolerance``; estimates below ``min_confidence``
    are not trusted enough to warn.
    """
    if est.um_per_px is None or est.confidence < min_confidence or not configured_um_per_px > 0:
        return ""
    ratio = configured_um_per_px / est.um_per_px
    if abs(ratio - 1.0) <= tolerance:
        return ""
    return (
        f"configured pixel size {configured_um_per_px:.4g} µm/px disagrees with the red cells: they suggest "
        f"{est.um_per_px:.4g} µm/px ({ratio - 1.0:+.0%}; {est.n_cells} cells, spread {est.spread:.2f}, "
        f"confidence {est.confidence:.2f})"
    )
