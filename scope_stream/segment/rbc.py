"""Red cells: a foreground mask split by a distance-transform watershed, counted and measured.

The foreground is every pixel absorbing more than the glass (total OD over an Otsu threshold clamped to
a plausible range), without the white cells. Holes smaller than a red cell (central pallor) are filled,
a small opening cuts thin bridges, and the distance transform's peaks seed a watershed that splits
touching cells. A piece much larger than a typical red cell (an overlapping pile the watershed could not
split) counts as ``round(area / typical area)`` cells: its ``count`` feature says how many.

Features are computed for all cells at once (no per-cell Python loop over pixels): area, equivalent
diameter, circularity ``4 pi A / P^2`` (perimeter from boundary-edge counts, corrected for the
digitisation bias), and the central pallor ``1 - OD(centre) / OD(rim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from scope_stream.config.segment import SegmentConfig

from .morph import disk, fill_small_holes, gaussian, label_perimeters, local_peaks, otsu
from .stain import StainImage

__all__ = ["RbcResult", "central_pallor", "find_rbcs", "foreground_threshold"]


@dataclass
class RbcResult:
    """Red cells at the working resolution: an int32 label image (ids ``1..n``) and per-cell arrays."""

    labels: np.ndarray
    n: int
    area_px: np.ndarray
    count: np.ndarray
    circularity: np.ndarray
    pallor: np.ndarray
    foreground: np.ndarray
    threshold: float


def foreground_threshold(total: np.ndarray, cfg: SegmentConfig) -> float:
    """Total-OD threshold between glass and cells: fixed, or Otsu's clamped to a plausible range."""
    if cfg.foreground_od is not None:
        return float(cfg.foreground_od)
    step = max(1, total.size // 200_000)
    sample = total.reshape(-1)[::step]
    if float(np.percentile(sample, 99)) < cfg.foreground_od_min:
        return cfg.foreground_od_min
    t = cfg.foreground_otsu_fraction * otsu(sample)
    return float(min(cfg.foreground_od_max, max(cfg.foreground_od_min, t)))


def find_rbcs(st: StainImage, px_um: float, cfg: SegmentConfig, exclude: np.ndarray | None = None) -> RbcResult:
    """Find red cells in a stain image; ``exclude`` (bool) marks pixels that belong to other cells."""
    tot = gaussian(st.total, max(0.5, 0.3 / px_um))
    t = foreground_threshold(tot, cfg)
    fg = tot > t
    if st.colour:
        # red cells carry the eosin stain; glass edges and purple-only matter are not red cells
        fg &= gaussian(st.eosin, max(0.5, 0.3 / px_um)) > 0.25 * t
    r_rbc = 0.5 * cfg.rbc_diameter_um / px_um
    typical = math.pi * r_rbc * r_rbc
    fg = fill_small_holes(fg, 0.6 * typical)
    if exclude is not None:
        fg &= ~exclude
    fg = ndi.binary_opening(fg, structure=disk(max(1.0, 0.12 * r_rbc)))
    min_area = cfg.min_rbc_area_fraction * typical
    if not fg.any():
        return _empty(fg, t)
    # each red cell is a disk: the scale-normalised Laplacian of Gaussian of the (pallor-filled) mask
    # peaks at its centre, also when two cells overlap (their centres stay a radius or so apart)
    sigma = cfg.rbc_log_sigma * r_rbc / math.sqrt(2.0)
    blob = -(sigma * sigma) * ndi.gaussian_laplace(fg.astype(np.float32), sigma, mode="constant", truncate=3.0)
    peaks = local_peaks(blob, max(1, round(cfg.rbc_min_separation * r_rbc)), cfg.rbc_min_response, fg)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-blob, markers, mask=fg) if len(peaks) else np.zeros(fg.shape, np.int32)
    n = len(peaks)
    if n == 0:
        return _empty(fg, t)
    idx = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    # drop fragments, renumber
    keep = area >= min_area
    if not keep.all():
        remap = np.zeros(n + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels = remap[labels]
        area = area[keep]
        n = int(keep.sum())
        idx = np.arange(1, n + 1)
    if n == 0:
        return _empty(fg, t)
    perim = label_perimeters(labels, n)
    circ = np.clip(4.0 * math.pi * area / np.maximum(perim, 1.0) ** 2, 0.0, 1.0)
    # this tile's single red cell: the median area of round, cell-sized pieces (when there are enough)
    single = (circ >= 0.8) & (area >= 0.5 * typical) & (area <= 1.5 * typical)
    unit = float(np.median(area[single])) if single.sum() >= 10 else typical
    count = np.where(area > 1.6 * unit, np.round(area / unit), 1.0)
    centres = _centres(labels, n, idx)
    pallor = central_pallor(st.total, centres, r_rbc)
    return RbcResult(labels.astype(np.int32), n, area, count, circ, pallor, fg, t)


def _empty(fg: np.ndarray, t: float) -> RbcResult:
    z = np.zeros(0)
    return RbcResult(np.zeros(fg.shape, np.int32), 0, z, z, z, z, fg, t)


def _centres(labels: np.ndarray, n: int, idx: np.ndarray) -> np.ndarray:
    """``(n, 2)`` integer (row, col) centroids of labels ``1..n``."""
    c = np.asarray(ndi.center_of_mass(np.ones(labels.shape, np.float32), labels, idx), dtype=np.float64)
    return np.rint(c.reshape(-1, 2)).astype(np.intp)


def central_pallor(total: np.ndarray, centres: np.ndarray, r_px: float) -> np.ndarray:
    """Central pallor of disks of radius ``r_px`` at ``centres``: 1 - OD(centre) / OD(rim), in [0, 1].

    The centre is the disk within 0.35 r, the rim the ring 0.55 r - 0.95 r of the nominal radius
    (sampled at the given centres, so touching cells do not disturb each other's figure).
    """
    if len(centres) == 0:
        return np.zeros(0)
    R = math.ceil(0.95 * r_px)
    yy, xx = np.mgrid[-R : R + 1, -R : R + 1]
    d = np.hypot(yy, xx) / max(r_px, 1e-6)
    inner = d <= 0.35
    ring = (d >= 0.55) & (d <= 0.95)
    if not inner.any() or not ring.any():
        return np.zeros(len(centres))
    h, w = total.shape
    rr = np.clip(centres[:, 0:1] + yy.ravel()[None, :], 0, h - 1)
    cc = np.clip(centres[:, 1:2] + xx.ravel()[None, :], 0, w - 1)
    vals = total[rr, cc]
    od_c = vals[:, inner.ravel()].mean(axis=1)
    od_r = vals[:, ring.ravel()].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 1.0 - od_c / od_r
    return np.asarray(np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0))
