"""Small, fast morphology helpers shared by the detectors (scipy.ndimage underneath)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "dilate",
    "disk",
    "fill_small_holes",
    "gaussian",
    "label_perimeters",
    "label_stats",
    "local_peaks",
    "otsu",
    "remove_small",
]


def disk(radius: float) -> np.ndarray:
    """A boolean disk footprint of the given radius in pixels (at least one pixel)."""
    r = max(0, math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius + 1e-9)


def gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing in float32; a no-op for tiny sigmas."""
    if sigma_px < 0.3:
        return img
    return np.asarray(ndi.gaussian_filter(img, sigma_px, mode="nearest", truncate=3.0), dtype=np.float32)


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (histogram based, fast); the midpoint for a constant sample."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (mt - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][int(np.argmax(between))])


def label_stats(labels: np.ndarray, n: int) -> tuple[np.ndarray, list[tuple[slice, slice] | None]]:
    """Pixel count of each label 1..n (index 0 = label 1) and their bounding slices."""
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1 : n + 1]
    return areas, list(ndi.find_objects(labels, max_label=n))


def remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components of ``mask`` with fewer than ``min_px`` pixels."""
    if min_px <= 1:
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    keep = areas >= min_px
    keep[0] = False
    return np.asarray(keep[lab])


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes of ``mask`` (background not connected to the border) with at most ``max_px`` pixels."""
    filled = ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    small = areas <= max_px
    small[0] = False
    return mask | small[lab]


def local_peaks(img: np.ndarray, min_distance: int, threshold: float, mask: np.ndarray | None = None) -> np.ndarray:
    """``(N, 2)`` (row, col) of local maxima of ``img`` at least ``threshold`` (a fast peak_local_max).

    A pixel is a peak when it equals the maximum over a ``(2 * min_distance + 1)`` square around it;
    a plateau of equal maxima gives one peak (its first pixel in row-major order). Peaks outside
    ``mask`` are dropped. Sorted row-major, so the result is deterministic.
    """
    size = 2 * max(1, int(min_distance)) + 1
    mx = ndi.maximum_filter(img, size=size, mode="nearest")
    cand = (img >= mx) & (img >= threshold)
    if mask is not None:
        cand &= mask
    if not cand.any():
        return np.zeros((0, 2), np.intp)
    lab, _ = ndi.label(cand, structure=np.ones((3, 3), bool))
    rr, cc = np.nonzero(lab)
    first = np.unique(lab[rr, cc], return_index=True)[1]
    return np.stack([rr[first], cc[first]], axis=1).astype(np.intp)


def label_perimeters(labels: np.ndarray, n: int) -> np.ndarray:
    """Perimeter (px) of labels ``1..n`` from their 4-connected boundary edges, times pi/4.

    Counting pixel edges overestimates a smooth outline by 4/pi on average over orientations; the
    correction makes ``4 pi A / P^2`` close to 1 for a digitised disk. The image border counts as boundary.
    """
    edges = np.zeros(n + 1, np.float64)
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :])):
        diff = a != b
        edges += np.bincount(a[diff].ravel(), minlength=n + 1)[: n + 1]
        edges += np.bincount(b[diff].ravel(), minlength=n + 1)[: n + 1]
    for line in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        edges += np.bincount(line.ravel(), minlength=n + 1)[: n + 1]
    return np.asarray(edges[1:] * (math.pi / 4.0))


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` px, computed only around the mask's components.

    Smear masks (nuclei, white cells) are sparse: dilating each component's bounding box (plus the
    radius) is much cheaper than filtering the whole tile, and gives the same result.
    """
    if radius < 0.5 or not mask.any():
        return mask.copy()
    fp = disk(radius)
    pad = fp.shape[0] // 2
    lab, _ = ndi.label(mask)
    out = np.zeros(mask.shape, bool)
    h, w = mask.shape
    for sl in ndi.find_objects(lab):
        if sl is None:
            continue
        r0, r1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        c0, c1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        out[r0:r1, c0:c1] |= ndi.binary_dilation(mask[r0:r1, c0:c1], structure=fp)
    return out
