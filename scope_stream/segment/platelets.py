"""Platelets: small purple blobs outside the white cells.

Platelets take the azure stain like nuclei but are 1.5-4 µm across, often pale, and sit on glass or on
red cells. Candidates are the peaks of the scale-normalised Laplacian of Gaussian of the nuclear-stain
image at a platelet's scale (blobs, not the thin purple fringes that chromatic aberration leaves on
red-cell rims). A candidate is a platelet when

* its blob response reaches ``platelet_min_response``,
* its stain is purple rather than red-cell coloured: eosin below ``platelet_max_eosin_ratio`` times the
  nuclear stain at the peak (red-cell rims and overlaps carry eosin), or, for a strong blob (response
  at least ``platelet_strong_response``: dark platelets like CellaVision's), below
  ``platelet_strong_max_eosin_ratio`` times it,
* it is not part of a white cell.

Each platelet's region is the stained area around its peak (above half the peak's value, shared
between nearby peaks by distance) within ``max_platelet_diameter_um / 2``; a region larger than a
single platelet counts as ``round(area / single area)`` (a clump).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from scope_stream.config.segment import SegmentConfig

from .morph import dilate, gaussian, label_perimeters, local_peaks
from .stain import StainImage

__all__ = ["PlateletResult", "find_platelets"]


@dataclass
class PlateletResult:
    """Platelets at the working resolution: an int32 label image (ids ``1..n``) and per-object arrays."""

    labels: np.ndarray
    n: int
    area_px: np.ndarray
    count: np.ndarray
    od: np.ndarray
    circularity: np.ndarray


def find_platelets(
    st: StainImage,
    px_um: float,
    cfg: SegmentConfig,
    exclude: np.ndarray | None = None,
) -> PlateletResult:
    """Find platelets in a stain image whose pixels are ``px_um`` µm; ``exclude`` marks white-cell pixels."""
    r_px = 0.5 * cfg.platelet_blob_um / px_um
    sigma = max(0.5, r_px / math.sqrt(2.0))
    nuc = st.nucleus
    response = -(sigma * sigma) * ndi.gaussian_laplace(nuc, sigma, mode="nearest", truncate=3.0)
    peaks = local_peaks(response, max(1, round(r_px)), cfg.platelet_min_response)
    if len(peaks) == 0:
        return _empty(nuc.shape)
    nuc_s = gaussian(nuc, sigma)
    pr, pc = peaks[:, 0], peaks[:, 1]
    ok = np.ones(len(peaks), bool)
    if st.colour:
        eos_s = gaussian(st.eosin, sigma)
        eos_p, nuc_p, resp = eos_s[pr, pc], nuc_s[pr, pc], response[pr, pc]
        clearly_purple = eos_p <= cfg.platelet_max_eosin_ratio * nuc_p
        strong = (resp >= cfg.platelet_strong_response) & (eos_p <= cfg.platelet_strong_max_eosin_ratio * nuc_p)
        ok &= clearly_purple | strong
    ok &= nuc_s[pr, pc] > 0
    if exclude is not None:
        near_wbc = dilate(exclude, max(1.0, r_px))
        ok &= ~near_wbc[pr, pc]
    peaks = peaks[ok]
    if len(peaks) == 0:
        return _empty(nuc.shape)
    pr, pc = peaks[:, 0], peaks[:, 1]
    n = len(peaks)
    markers = np.zeros(nuc.shape, np.int32)
    markers[pr, pc] = np.arange(1, n + 1, dtype=np.int32)
    # region: above half the peak's stain, within the largest platelet's radius of a peak
    r_max = 0.5 * cfg.max_platelet_diameter_um / px_um
    pad = math.ceil(r_max) + 1
    near = np.zeros(nuc.shape, bool)
    half = np.zeros(nuc.shape, np.float32)
    for r, c, v in zip(pr, pc, nuc_s[pr, pc], strict=True):
        r0, r1, c0, c1 = (
            max(0, r - pad),
            min(nuc.shape[0], r + pad + 1),
            max(0, c - pad),
            min(nuc.shape[1], c + pad + 1),
        )
        yy, xx = np.ogrid[r0 - r : r1 - r, c0 - c : c1 - c]
        disk = yy * yy + xx * xx <= r_max * r_max
        near[r0:r1, c0:c1] |= disk
        half[r0:r1, c0:c1] = np.where(disk, np.maximum(half[r0:r1, c0:c1], 0.5 * v), half[r0:r1, c0:c1])
    mask = near & (nuc_s > half)
    mask[pr, pc] = True
    if exclude is not None:
        mask &= ~exclude
        mask[pr, pc] = True
    labels = _split_by_markers(mask, markers)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    min_area = math.pi * (0.5 * cfg.min_platelet_diameter_um / px_um) ** 2
    keep = area >= min_area
    single = math.pi * (0.5 * cfg.platelet_diameter_um / px_um) ** 2
    count = np.where(area > 1.8 * single, np.maximum(1.0, np.round(area / single)), 1.0)
    od = nuc_s[pr, pc].astype(np.float64)
    circ = np.clip(4.0 * math.pi * area / np.maximum(label_perimeters(labels, n), 1.0) ** 2, 0.0, 1.0)
    remap = np.zeros(n + 1, np.int32)
    remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return PlateletResult(remap[labels], int(keep.sum()), area[keep], count[keep], od[keep], circ[keep])


def _split_by_markers(mask: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Label ``mask`` by ``markers``: a component with one marker takes its id, one with several is
    split between them by distance; components without a marker are dropped."""
    comp, nc = ndi.label(mask, structure=np.ones((3, 3), bool))
    out = np.zeros(mask.shape, np.int32)
    if nc == 0:
        return out
    mpos = np.flatnonzero(markers.ravel())
    mcomp = comp.ravel()[mpos]
    per_comp = np.bincount(mcomp, minlength=nc + 1)
    # single-marker components: map component id -> marker id
    lut = np.zeros(nc + 1, np.int32)
    single = per_comp[mcomp] == 1
    lut[mcomp[single]] = markers.ravel()[mpos[single]]
    out = lut[comp]
    multi = np.flatnonzero(per_comp[1:] > 1) + 1
    if multi.size:
        # a few markers share a small blob: each pixel goes to its nearest marker
        slices = ndi.find_objects(comp)
        for cid in multi:
            sl = slices[cid - 1]
            if sl is None:
                continue
            m = comp[sl] == cid
            mk = np.where(m, markers[sl], 0)
            mr, mc = np.nonzero(mk)
            ids = mk[mr, mc]
            pr, pc = np.nonzero(m)
            d2 = (pr[:, None] - mr[None, :]) ** 2 + (pc[:, None] - mc[None, :]) ** 2
            sub = out[sl]
            sub[pr, pc] = ids[np.argmin(d2, axis=1)]
    return out


def _empty(shape: tuple[int, ...]) -> PlateletResult:
    z = np.zeros(0)
    return PlateletResult(np.zeros(shape, np.int32), 0, z, z, z, z)
