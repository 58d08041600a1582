"""White cells: nuclei by the nuclear stain, lobes grouped into cells, cytoplasm grown around them.

1. The nuclear-stain concentration (see :mod:`.stain`) is smoothed and thresholded: Otsu's threshold of
   the stained pixels, clamped to a plausible OD range so that a tile without any white cell does not
   turn its noise into nuclei.
2. Stained pixels closer than ``lobe_gap_um`` are grouped (a segmented neutrophil's lobes are one cell);
   a group is a white cell when its stained area reaches ``min_nucleus_area_um2`` (platelets and platelet
   clumps are smaller) and its extent stays below ``max_wbc_diameter_um``.
3. The cytoplasm is grown from each nucleus, within a physical radius, over pixels that absorb light but
   are not red-cell coloured; a small opening cuts the necks to touching red cells, and the result is
   made convex (white cells are round in a smear). A cell whose cytoplasm cannot be told apart gets a
   disk scaled from its nucleus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.morphology import convex_hull_image

from scope_stream.config.segment import SegmentConfig

from .morph import dilate, gaussian, label_stats, otsu, remove_small
from .stain import StainImage

__all__ = ["WbcResult", "find_wbcs", "nucleus_threshold"]


@dataclass
class WbcResult:
    """White cells at the working resolution.

    ``cells`` and ``nuclei`` are int32 label images sharing ids ``1..n``; ``stained`` is every pixel
    over the nuclear threshold (white-cell nuclei, platelets, stain debris); ``features`` holds one dict
    per cell (index ``id - 1``).
    """

    cells: np.ndarray
    nuclei: np.ndarray
    stained: np.ndarray
    nucleus_smooth: np.ndarray
    threshold: float
    n: int
    features: list[dict[str, float]] = field(default_factory=list)
    #: each cell's outline, ``(K, 2)`` (row, col) at the working resolution
    outlines: list[np.ndarray] = field(default_factory=list)


def nucleus_threshold(nuc: np.ndarray, st: StainImage, cfg: SegmentConfig) -> float:
    """The nuclear-stain OD threshold of a tile: fixed, or Otsu of the stained pixels clamped to a range."""
    if cfg.nucleus_od is not None:
        return float(cfg.nucleus_od)
    lo, hi = cfg.nucleus_od_min, cfg.nucleus_od_max
    step = max(1, nuc.size // 200_000)
    sample = nuc.reshape(-1)[::step]
    if not st.colour:
        # grayscale: nuclei are the darkest objects. A first Otsu split separates glass from cells, a
        # second one the cells into red cells and the darker nuclei.
        cells = sample[sample > otsu(sample)]
        if cells.size < 20:
            return hi * 3
        return max(lo, otsu(cells))
    stained = sample[sample > lo * 0.5]
    if stained.size < 20:
        return hi
    return float(min(hi, max(lo, otsu(stained))))


def find_wbcs(st: StainImage, px_um: float, cfg: SegmentConfig) -> WbcResult:
    """Find white cells in a stain image whose pixels are ``px_um`` µm wide."""
    nuc = gaussian(st.nucleus, max(0.5, 0.25 / px_um))
    t = nucleus_threshold(nuc, st, cfg)
    stained = remove_small(nuc > t, 0.3 / (px_um * px_um))
    shape = nuc.shape
    empty = np.zeros(shape, np.int32)
    if not stained.any():
        return WbcResult(empty, empty.copy(), stained, nuc, t, 0)

    # group lobes: components of the stained mask dilated by half the lobe gap; then groups up to
    # ``lobe_merge_gap_um`` apart (an eosinophil's two lobes) when together they still span one nucleus
    glab, ng = _group(stained, cfg.lobe_gap_um / px_um)
    if cfg.lobe_merge_gap_um > cfg.lobe_gap_um and ng > 1:
        glab, ng = _merge_close_groups(
            stained, glab, ng, cfg.lobe_merge_gap_um / px_um, cfg.max_nucleus_span_um / px_um
        )
    areas, slices = label_stats(glab, ng)
    px2 = px_um * px_um
    min_area = cfg.min_nucleus_area_um2 / px2
    max_extent = cfg.max_wbc_diameter_um / px_um
    min_small = cfg.min_small_nucleus_area_um2 / px2
    keep: list[int] = []
    small: list[int] = []
    for i in range(ng):
        sl = slices[i]
        if sl is None or areas[i] < min(min_area, min_small):
            continue
        ext = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        if ext > max_extent:
            continue
        (keep if areas[i] >= min_area else small).append(i + 1)
    if small:
        keep.extend(_small_dense_nuclei(glab, small, keep, nuc, t, slices, px_um, cfg))
        keep.sort()
    if not keep:
        return WbcResult(empty, empty.copy(), stained, nuc, t, 0)

    relabel = np.zeros(ng + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    nuclei = relabel[glab]
    cells, feats, outlines = _grow_cells(st, nuc, t, nuclei, len(keep), px_um, cfg)
    return WbcResult(cells, nuclei, stained, nuc, t, len(keep), feats, outlines)


def _small_dense_nuclei(
    glab: np.ndarray,
    small: list[int],
    big: list[int],
    nuc: np.ndarray,
    t: float,
    slices: list[tuple[slice, slice] | None],
    px_um: float,
    cfg: SegmentConfig,
) -> list[int]:
    """The small stained groups that are white-cell nuclei after all: round and dense throughout.

    A late erythroblast (nucleated red cell) has a pyknotic nucleus of 12-20 µm², smaller than a large
    platelet clump; but it is round (solidity >= 0.9), most of it stains at more than twice the nuclear
    threshold and its darkest tenth at ``small_nucleus_min_peak_ratio`` times it, where a platelet's
    granules are paler and patchy. Groups lying within
    ``lobe_merge_gap_um`` of a larger nucleus are fragments of that cell and stay out.
    """
    out: list[int] = []
    near_big = np.zeros(glab.shape, bool)
    if big:
        near_big = dilate(np.isin(glab, big), cfg.lobe_merge_gap_um / px_um)
    for g in small:
        sl = slices[g - 1]
        if sl is None:
            continue
        own = glab[sl] == g
        if (near_big[sl] & own).any():
            continue
        vals = nuc[sl][own]
        if float((vals > 2.0 * t).mean()) < cfg.small_nucleus_min_dense_fraction:
            continue
        if float(np.percentile(vals, 90)) < cfg.small_nucleus_min_peak_ratio * t:
            continue
        hull = convex_hull_image(own)
        if own.sum() / max(1, hull.sum()) < 0.9:
            continue
        out.append(g)
    return out


def _group(stained: np.ndarray, gap_px: float) -> tuple[np.ndarray, int]:
    """Label stained pixels so that pieces closer than ``gap_px`` share a label."""
    grouped = dilate(stained, gap_px / 2.0) if gap_px >= 1.0 else stained
    glab, ng = ndi.label(grouped, structure=np.ones((3, 3), bool))
    return np.where(stained, glab, 0).astype(np.int32), int(ng)


def _merge_close_groups(
    stained: np.ndarray, glab: np.ndarray, ng: int, gap_px: float, max_span_px: float
) -> tuple[np.ndarray, int]:
    """Merge groups closer than ``gap_px`` whose union spans at most ``max_span_px``; relabel 1..n."""
    wide, nw = _group(stained, gap_px)
    if nw == ng:
        return glab, ng
    spans = ndi.find_objects(wide, max_label=nw)
    # one representative wide label per group
    rep = np.zeros(ng + 1, np.int64)
    rep[glab[stained]] = wide[stained]
    out = np.arange(ng + 1, dtype=np.int64)
    for g in range(1, ng + 1):
        sl = spans[rep[g] - 1]
        if sl is not None and max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= max_span_px:
            out[g] = ng + rep[g]  # merged: named after the wide component
    _, new = np.unique(out, return_inverse=True)
    new = new.astype(np.int32)  # 0 stays 0 (it is the smallest value)
    return new[glab], int(new.max())


def _grow_cells(
    st: StainImage,
    nuc: np.ndarray,
    t: float,
    nuclei: np.ndarray,
    n: int,
    px_um: float,
    cfg: SegmentConfig,
) -> tuple[np.ndarray, list[dict[str, float]], list[np.ndarray]]:
    """Whole-cell masks: a star-shaped outline cast from each nucleus over cytoplasm-like pixels.

    Rays leave the nucleus centre in ``_N_RAYS`` directions and run over the nucleus and then over
    cytoplasm-like pixels (absorbing, not red-cell coloured) until the first gap. Rays that leak into a
    touching red cell are the exceptions: each ray is clipped to 1.25x the median radius, and the radii
    are median-filtered around the circle. Computed in a window around each nucleus.
    """
    h, w = nuclei.shape
    cells = np.zeros((h, w), np.int32)
    feats: list[dict[str, float]] = []
    outlines: list[np.ndarray] = []
    slices = ndi.find_objects(nuclei, max_label=n)
    px2 = px_um * px_um
    rim_px = max(2.0, cfg.max_cytoplasm_um / px_um)
    sigma = max(0.5, 0.3 / px_um)
    theta = np.linspace(0.0, 2.0 * math.pi, _N_RAYS, endpoint=False)
    for i, sl in enumerate(slices, start=1):
        if sl is None:
            feats.append({})
            outlines.append(np.zeros((0, 2)))
            continue
        pad = math.ceil(rim_px) + 2
        r0, r1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        c0, c1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        win_lab = nuclei[r0:r1, c0:c1]
        own = win_lab == i
        others = (win_lab > 0) & ~own
        tot = gaussian(st.total[r0:r1, c0:c1], sigma)
        nucs = nuc[r0:r1, c0:c1]
        t_cyto = cfg.cytoplasm_od
        if st.colour:
            eos = gaussian(st.eosin[r0:r1, c0:c1], sigma)
            cyto = (tot > t_cyto) & ((eos < cfg.cytoplasm_max_eosin * tot) | (nucs > 0.5 * t))
        else:
            cyto = tot > t_cyto
        cyto = (cyto | own) & ~others
        rr, cc = np.nonzero(own)
        cy, cx = float(rr.mean()), float(cc.mean())
        dr, dc = rr - cy, cc - cx
        nuc_rmax = float(np.sqrt((dr * dr + dc * dc).max())) + 1.0
        steps = np.arange(0.0, nuc_rmax + rim_px + 1.0, 0.5)
        ray_r = cy + np.sin(theta)[:, None] * steps[None, :]
        ray_c = cx + np.cos(theta)[:, None] * steps[None, :]
        inside = (ray_r >= 0) & (ray_r <= own.shape[0] - 1) & (ray_c >= 0) & (ray_c <= own.shape[1] - 1)
        ri = np.clip(np.rint(ray_r), 0, own.shape[0] - 1).astype(np.intp)
        ci = np.clip(np.rint(ray_c), 0, own.shape[1] - 1).astype(np.intp)
        on_nuc = own[ri, ci] & inside
        on_cyto = cyto[ri, ci] & inside
        # nucleus extent along each ray, then cytoplasm until the first gap beyond it
        last_nuc = np.where(on_nuc.any(axis=1), steps.size - 1 - np.argmax(on_nuc[:, ::-1], axis=1), 0)
        after = np.arange(steps.size)[None, :] > last_nuc[:, None]
        gap = ~on_cyto & after
        first_gap = np.where(gap.any(axis=1), np.argmax(gap, axis=1), steps.size - 1)
        radius = steps[np.maximum(first_gap - 1, last_nuc)]
        nuc_radius = steps[last_nuc]
        med = float(np.median(radius))
        radius = np.minimum(radius, 1.25 * med + 1.0)
        radius = ndi.median_filter(radius, size=5, mode="wrap")
        radius = np.maximum(radius, nuc_radius)
        poly_r = cy + np.sin(theta) * (radius + 0.5)
        poly_c = cx + np.cos(theta) * (radius + 0.5)
        pr, pc = draw_polygon(poly_r, poly_c, shape=own.shape)
        outline = np.stack([poly_r + r0, poly_c + c0], axis=1)
        outline[:, 0] = np.clip(outline[:, 0], -0.5, h - 0.5)
        outline[:, 1] = np.clip(outline[:, 1], -0.5, w - 0.5)
        outlines.append(outline)
        hull = np.zeros(own.shape, bool)
        hull[pr, pc] = True
        hull = (hull & ~others) | own
        sub = cells[r0:r1, c0:c1]
        sub[hull & (sub == 0)] = i
        cell_area = float(hull.sum())
        nuc_area = float(own.sum())
        nuc_od = float(st.nucleus[r0:r1, c0:c1][own].mean())
        lobes = int(ndi.label(own & (nucs > t))[1])
        feats.append(
            {
                "area_um2": cell_area * px2,
                "nucleus_area_um2": nuc_area * px2,
                "nucleus_fraction": nuc_area / cell_area if cell_area else 1.0,
                "diameter_um": 2.0 * math.sqrt(cell_area / math.pi) * px_um,
                "nucleus_od": nuc_od,
                "nucleus_lobes": float(lobes),
                "cytoplasm_width_um": float(np.median(radius - nuc_radius)) * px_um,
            }
        )
    return cells, feats, outlines


_N_RAYS = 48
