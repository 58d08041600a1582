"""Canonical cell crops: any crop of one white blood cell -> the classifier's standard view of it.

Crops arrive from different labs, cameras and magnifications: loose 128 px CellaVision crops with red
cells all around (PBC), boxes cut tightly around the cell (100-300 px, BCCD and most detection
datasets), live crops from the segmenter. Training, evaluation, calibration and the live pipeline
all pass them through :func:`canonicalize` so that the model always sees a cell the same way:

1. **Find the cell** (:func:`find_cell`): optical density relative to the crop's own background,
   stain separation (:mod:`scope_stream.segment.stain`), the nuclear stain thresholded as in
   :mod:`scope_stream.segment.wbc`; the nucleus nearest the crop centre (lobes grouped by a gap
   relative to the nucleus size), then the cytoplasm by rays cast from the nucleus over absorbing,
   not red-cell-coloured pixels (the segmenter's ``_grow_cells`` approach). Every length is a fraction
   of the crop or of the nucleus: nothing depends on the pixel size. Rays that leave the crop (a tight
   crop cuts the cell) are completed from a circle fitted to the free rays.
2. **Scale**: the cell's equivalent diameter becomes ``cell_fraction * size`` output pixels, centred
   on the cell (antialiased: block averaging and a Gaussian before bilinear sampling); whatever the
   output needs beyond the crop is filled with background, never stretched.
3. **Colour**: ``"white"`` divides by the crop's background (brightest non-cell pixels) and
   multiplies by :data:`CANONICAL_BACKGROUND`; ``"macenko"`` also maps this crop's nuclear and
   red-cell stain directions onto PBC's, keeping the stain concentrations (dark basophil granules and
   orange eosinophil granules survive); ``"none"`` keeps the input colours.
4. **Context**: ``"mask"`` fades everything beyond the cell outline (dilated by 8% of the diameter)
   into the canonical background over a few output pixels; ``"keep"`` keeps the surroundings.

Everything is deterministic. A 128x128 crop takes about 4.5 ms on one (busy) core; 200-300 px crops ~7 ms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np
from scipy import ndimage as ndi

from scope_stream.config.segment import SegmentConfig
from scope_stream.segment.morph import gaussian
from scope_stream.segment.stain import (
    NUCLEUS_OD,
    RBC_OD,
    as_rgb_float,
    block_downsample,
    check_pixels,
    estimate_background,
    separate_stains,
)
from scope_stream.segment.wbc import nucleus_threshold

__all__ = [
    "CANONICAL_BACKGROUND",
    "REFERENCE_NUCLEUS_OD",
    "REFERENCE_RBC_OD",
    "CanonicalBatch",
    "CanonicalCell",
    "CanonicalSpec",
    "CellGeometry",
    "CellInfo",
    "NoCellError",
    "canonical_batch",
    "canonicalize",
    "find_cell",
]

#: Background (glass) colour of the canonical view: PBC's. Measured with ``estimate_background`` on 200
#: random PBC crops: median (255, 229, 204), 5-95% range (254-255, 227-231, 202-207). Red is saturated
#: in CellaVision's images; keeping it so makes white-balanced crops of other labs look like PBC's.
CANONICAL_BACKGROUND: tuple[float, float, float] = (255.0, 229.0, 204.0)
#: Reference stain directions (unit OD) for ``stain="macenko"``: PBC's nuclei and red cells, as
#: measured for :mod:`scope_stream.segment.stain` (nucleus (0.50, 0.84, 0.22), red cells (0.49, 0.72, 0.50)).
REFERENCE_NUCLEUS_OD: np.ndarray = np.array([0.50, 0.84, 0.22]) / np.linalg.norm([0.50, 0.84, 0.22])
REFERENCE_RBC_OD: np.ndarray = np.array([0.49, 0.72, 0.50]) / np.linalg.norm([0.49, 0.72, 0.50])

Context = Literal["keep", "mask"]
Stain = Literal["none", "white", "macenko"]

_SEG = SegmentConfig()  # the segmenter's defaults: nuclear threshold range, cytoplasm OD and eosin share
_MIN_SIDE = 16
_WORK_SIDE = 64  # crops of 128 px and more are block-averaged to ~64-127 px for finding the cell
_N_RAYS = 64
_MIN_NUCLEUS_PX = 6.0  # working pixels: smaller purple specks are noise
_LOBE_GAP = 0.5  # nuclear pieces closer than this x sqrt(nucleus area) are one nucleus
_RIM = 1.6  # cytoplasm is searched up to this x the nucleus' equivalent radius beyond the nucleus
_CYTO_OVER_GLASS = 0.05  # cytoplasm absorbs at least this much more than the clearest glass
_DILATE = 0.08  # "mask" context: the cell outline dilated by this fraction of the diameter
_MAX_STAIN_ANGLE = math.radians(20.0)  # macenko: estimates further than this from the defaults are unreliable


@dataclass(frozen=True)
class CanonicalSpec:
    """How a cell crop becomes a model input (saved with a model: see :meth:`to_json`)."""

    size: int = 64
    #: the cell's equivalent diameter as a fraction of ``size``
    cell_fraction: float = 0.62
    #: ``"mask"``: beyond the (dilated, feathered) cell mask becomes the canonical background
    context: Context = "mask"
    #: ``"white"``: background white balance only; ``"macenko"``: also map the stain vectors to PBC's
    stain: Stain = "white"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or not 8 <= self.size <= 1024:
            raise ValueError(f"CanonicalSpec.size must be an integer from 8 to 1024, got {self.size!r}")
        frac = self.cell_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.05 <= float(frac) <= 1.0):
            raise ValueError(f"CanonicalSpec.cell_fraction must be a number in [0.05, 1], got {frac!r}")
        if self.context not in get_args(Context):
            raise ValueError(f"CanonicalSpec.context must be one of {get_args(Context)}, got {self.context!r}")
        if self.stain not in get_args(Stain):
            raise ValueError(f"CanonicalSpec.stain must be one of {get_args(Stain)}, got {self.stain!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "cell_fraction", float(frac))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CanonicalSpec:
        """The spec saved by :meth:`to_json`; missing keys take the defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"a canonical spec must be a JSON object, got {type(d).__name__}")
        known = {"size", "cell_fraction", "context", "stain"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown canonical spec key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


class NoCellError(ValueError):
    """A crop in which no white cell can be found: ``no white cell found in crop (HxW): <reason>``."""

    def __init__(self, reason: str, shape: tuple[int, ...] | None = None, index: int | None = None) -> None:
        self.reason = reason
        self.shape = shape
        self.index = index
        where = f"crop {index} " if index is not None else "crop "
        dims = f"({shape[0]}x{shape[1]})" if shape is not None and len(shape) >= 2 else "(?)"
        super().__init__(f"no white cell found in {where}{dims}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (NoCellError, (self.reason, self.shape, self.index))


@dataclass
class CellGeometry:
    """Where the white cell is in its crop (input pixels)."""

    centre: tuple[float, float]  # (row, col)
    #: equivalent diameter of the whole cell (nucleus + cytoplasm), completed where the crop cuts it
    diameter_px: float
    nucleus_diameter_px: float
    #: bool (H, W): the whole cell, within the crop
    mask: np.ndarray
    #: the cell mask reaches the crop edge (a tight crop)
    touches_border: bool
    #: (K, 2) (row, col) outline, completed beyond the crop where it cuts the cell
    outline: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


@dataclass
class CanonicalCell:
    """A canonical model input and how it was made."""

    image: np.ndarray  # uint8 (S, S, 3)
    geometry: CellGeometry
    scale: float  # output px per input px
    background: tuple[float, float, float]  # estimated background RGB of the input (input units)
    diameter_um: float | None  # when um_per_px was given


@dataclass(frozen=True)
class CellInfo:
    """The small per-cell record of :func:`canonical_batch` (no image, no mask)."""

    centre: tuple[float, float]
    diameter_px: float
    nucleus_diameter_px: float
    touches_border: bool
    scale: float
    background: tuple[float, float, float]
    diameter_um: float | None

    @classmethod
    def of(cls, cell: CanonicalCell) -> CellInfo:
        g = cell.geometry
        return cls(
            g.centre,
            g.diameter_px,
            g.nucleus_diameter_px,
            g.touches_border,
            cell.scale,
            cell.background,
            cell.diameter_um,
        )


@dataclass
class CanonicalBatch:
    """:func:`canonical_batch`'s answer: images of the crops that worked, in input order."""

    images: np.ndarray  # uint8 (N_ok, S, S, 3)
    kept: np.ndarray  # int64 (N_ok,): input index of each image
    cells: list[CellInfo]
    errors: dict[int, str]  # input index -> reason (on_error="skip")


# ---------------------------------------------------------------------------------------------- finding


@dataclass
class _Found:
    """find_cell's full answer: the geometry plus what canonicalize reuses."""

    geometry: CellGeometry
    pixels: np.ndarray  # the validated input (H, W, 3), any dtype
    background: np.ndarray  # (3,) input units
    tight: bool  # hardly any background in the crop: the background estimate is a guess
    origin: tuple[float, float]  # ray origin (row, col), input px
    radii: np.ndarray  # (_N_RAYS,) completed ray lengths, input px
    #: unit OD of this crop's nuclear and red-cell stains (estimated only when asked for)
    nucleus_dir: np.ndarray = field(default_factory=lambda: np.asarray(NUCLEUS_OD, np.float64))
    rbc_dir: np.ndarray = field(default_factory=lambda: np.asarray(RBC_OD, np.float64))


def find_cell(crop: np.ndarray) -> CellGeometry:
    """Locate the white cell of a crop: the one whose nucleus is nearest the centre.

    ``crop`` is ``(H, W, 3)`` uint8 (uint16 and float arrays are accepted as by
    :func:`scope_stream.segment.stain.check_pixels`). Raises :class:`NoCellError` for crops without one
    (blank, constant, black, only red cells, smaller than 16 px).
    """
    return _find(crop).geometry


def _dark_level(arr: np.ndarray) -> float:
    """Input level under which a crop's brightest pixels mean 'no light' (a black crop)."""
    if arr.dtype == np.uint8:
        return 8.0
    if np.issubdtype(arr.dtype, np.integer):
        return 8.0 / 255.0 * (4095.0 if float(arr.max(initial=0)) < 4096 else float(np.iinfo(arr.dtype).max))
    return 8.0 / 255.0 * (1.0 if float(np.nanmax(arr)) <= 1.0 + 1e-6 else 255.0)


def _find(crop: np.ndarray, stains: bool = False) -> _Found:
    arr = check_pixels(crop)
    shape = tuple(int(s) for s in arr.shape[:2])
    if arr.shape[2] != 3:
        raise ValueError(f"a cell crop must be RGB (H, W, 3), got shape {tuple(crop.shape)}")
    h, w = shape
    if min(h, w) < _MIN_SIDE:
        raise NoCellError(f"crop is smaller than {_MIN_SIDE} px", shape)
    f = max(1, min(h, w) // _WORK_SIDE)
    if f > 1 and np.issubdtype(arr.dtype, np.integer):
        work = block_downsample(arr, f)  # exact and fast in integers
    else:
        work = as_rgb_float(arr)
        work = block_downsample(work, f) if f > 1 else work
    bg = estimate_background(work)
    if float(bg.max()) <= _dark_level(arr):
        raise NoCellError("crop is black (no illuminated background)", shape)
    lum = work.mean(axis=2)
    if float(lum.max() - lum.min()) <= 0.02 * float(bg.max()):
        raise NoCellError("crop is blank (constant colour, no contrast)", shape)
    st = separate_stains(work, background=bg)
    wh, ww = st.total.shape
    sigma = max(0.5, min(wh, ww) / 150.0)
    nuc = gaussian(st.nucleus, sigma)
    t = nucleus_threshold(nuc, st, _SEG)
    stained = nuc > t
    lab, n = ndi.label(stained, structure=np.ones((3, 3), bool))
    if n == 0:
        raise NoCellError("no nuclear (purple) stain: background or red cells only", shape)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    ok = areas >= _MIN_NUCLEUS_PX
    if not ok.any():
        raise NoCellError("nuclear stain only in specks too small to be a nucleus", shape)

    # seed: the nearest sizeable stained component to the centre (small specks are penalised)
    cr, cc = (wh - 1) / 2.0, (ww - 1) / 2.0
    rr, cols = np.nonzero(lab)
    ids = lab[rr, cols]
    d = np.hypot(rr - cr, cols - cc)
    nearest = np.full(n + 1, np.inf)
    np.minimum.at(nearest, ids, d)
    half = min(wh, ww) / 2.0
    score = nearest[1:] / half + np.where(areas < 0.15 * areas.max(), 0.5, 0.0)
    score[~ok] = np.inf
    group = np.zeros(n + 1, bool)
    group[int(np.argmin(score)) + 1] = True
    # lobes: stained components within a gap proportional to the nucleus' size join it
    for _ in range(4):
        if not (ok & ~group[1:]).any():
            break
        g_area = float(areas[group[1:]].sum())
        gap = max(2.0, _LOBE_GAP * math.sqrt(g_area))
        in_g = group[ids]
        pad = math.ceil(gap) + 1
        y0, y1 = max(0, int(rr[in_g].min()) - pad), min(wh, int(rr[in_g].max()) + pad + 1)
        x0, x1 = max(0, int(cols[in_g].min()) - pad), min(ww, int(cols[in_g].max()) + pad + 1)
        dist = ndi.distance_transform_edt(~group[lab[y0:y1, x0:x1]])
        win = (rr >= y0) & (rr < y1) & (cols >= x0) & (cols < x1)
        near = np.full(n + 1, np.inf)
        np.minimum.at(near, ids[win], dist[rr[win] - y0, cols[win] - x0])
        add = (near <= gap) & ~group
        add[0] = False
        add[1:] &= ok
        if not add.any():
            break
        group |= add
    nucleus = group[lab]
    in_g = group[ids]
    nuc_box = nucleus[rr[in_g].min() : rr[in_g].max() + 1, cols[in_g].min() : cols[in_g].max() + 1]
    nuc_area = float(ndi.binary_fill_holes(nuc_box).sum())
    nuc_r = math.sqrt(nuc_area / math.pi)

    # whole cell: rays from the nucleus centre over cytoplasm-like pixels
    nr, ncol = np.nonzero(nucleus)
    oy, ox = float(nr.mean()), float(ncol.mean())
    tot = gaussian(st.total, sigma)
    nuc_rmax = float(np.hypot(nr - oy, ncol - ox).max()) + 1.0
    # red-cell colour from pixels beyond the reach of this cell's cytoplasm (separate_stains' per-tile
    # estimate takes the cytoplasm's colour when a tight crop holds no red cells)
    rbc_dir = _far_rbc_direction(st.od, tot, (oy, ox), nuc_rmax + _RIM * nuc_r)
    eos = gaussian(st.od @ _unmix(rbc_dir)[:, 1].astype(np.float32), sigma)
    t_cyto = _cytoplasm_od(tot)
    absorbing = tot > t_cyto
    reddish = eos >= _SEG.cytoplasm_max_eosin * tot
    # eosinophil granules are red-cell coloured but much denser than the crop's red cells
    red_px = tot[absorbing & reddish & ~stained]
    granules = absorbing & reddish & (tot > 1.6 * float(np.median(red_px))) if red_px.size >= 20 else None
    cyto = absorbing & (~reddish | (nuc > 0.5 * t))
    if granules is not None:
        cyto |= granules
    others = stained & ~nucleus
    cyto = (cyto | nucleus) & ~others
    theta = np.linspace(0.0, 2.0 * math.pi, _N_RAYS, endpoint=False)
    steps = np.arange(0.0, nuc_rmax + _RIM * nuc_r + 2.0, 0.5)
    ray_r = oy + np.sin(theta)[:, None] * steps[None, :]
    ray_c = ox + np.cos(theta)[:, None] * steps[None, :]
    inside = (ray_r >= -0.5) & (ray_r <= wh - 0.5) & (ray_c >= -0.5) & (ray_c <= ww - 0.5)
    ri = np.clip(np.rint(ray_r), 0, wh - 1).astype(np.intp)
    ci = np.clip(np.rint(ray_c), 0, ww - 1).astype(np.intp)
    on_nuc = nucleus[ri, ci] & inside
    on_cyto = cyto[ri, ci] & inside
    last_nuc = np.where(on_nuc.any(axis=1), steps.size - 1 - np.argmax(on_nuc[:, ::-1], axis=1), 0)
    after = np.arange(steps.size)[None, :] > last_nuc[:, None]
    gap_mask = ~on_cyto & after
    has_gap = gap_mask.any(axis=1)
    first_gap = np.where(has_gap, np.argmax(gap_mask, axis=1), steps.size - 1)
    k = np.arange(_N_RAYS)
    gi, gc = ri[k, first_gap], ci[k, first_gap]
    at_border = has_gap & ~inside[k, first_gap]
    on_glass = has_gap & ~at_border & ~absorbing[gi, gc]
    on_red = has_gap & ~at_border & ~on_glass & ~others[gi, gc]
    radius = steps[np.maximum(first_gap - 1, last_nuc)]
    nuc_radius = steps[last_nuc]
    # rays stopped by the crop edge or by red (touching red cells, or granules as pale as red cells)
    # reach the circle through the rays that ended on glass: white cells are round
    # (a crop cut tightly around the cell has few glass rays: its edges then stand for the cell's outline)
    if on_glass.sum() >= _N_RAYS // 4:
        radius = _complete(radius, on_glass, at_border | on_red, theta)
    else:
        radius = _complete(radius, on_glass | at_border, on_red, theta)
    med = float(np.median(radius))
    radius = np.minimum(radius, 1.25 * med + 1.0)
    radius = ndi.median_filter(radius, size=5, mode="wrap")
    radius = np.maximum(radius, nuc_radius)

    # back to input pixels (working pixel k is centred on input k*f + (f-1)/2)
    off = (f - 1) / 2.0
    oy_in, ox_in = oy * f + off, ox * f + off
    # the edge lies between a ray's last cytoplasm sample and its first gap, half a step (0.5 px) further
    radii = (radius + 0.25) * f
    poly_r = oy_in + np.sin(theta) * radii
    poly_c = ox_in + np.cos(theta) * radii
    area, cy, cx = _star_area_centroid(radii, theta, oy_in, ox_in)
    mask = _star_mask((h, w), (oy_in, ox_in), radii)
    touches = bool(at_border.any() or mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    geometry = CellGeometry(
        centre=(float(cy), float(cx)),
        diameter_px=float(2.0 * math.sqrt(area / math.pi)),
        nucleus_diameter_px=float(2.0 * nuc_r * f),
        mask=mask,
        touches_border=touches,
        outline=np.stack([poly_r, poly_c], axis=1),
    )

    # background: the brightest pixels around the cell; a crop that is nearly all cell keeps the
    # overall estimate but is marked tight (its fill colour becomes the canonical background)
    cell_w = _star_mask((wh, ww), (oy, ox), radius + 1.0)
    outside = work[~cell_w]
    tight = outside.shape[0] < max(20, 0.03 * wh * ww)
    if not tight:
        lum_o = outside.mean(axis=1)
        bright = outside[lum_o >= np.percentile(lum_o, 70.0)]
        bg = np.median(bright, axis=0).astype(np.float32)
    found = _Found(geometry, arr, bg, tight, (oy_in, ox_in), radii)
    if stains:
        found.nucleus_dir = _stain_dir(st.od, nucleus & (nuc > 1.5 * t), NUCLEUS_OD)
        found.rbc_dir = rbc_dir
    return found


def _unmix(rbc: np.ndarray) -> np.ndarray:
    """Inverse of the stain matrix (nucleus, red cell, residual): OD row-vector @ it = concentrations."""
    return np.linalg.inv(_stain_matrix(np.asarray(NUCLEUS_OD, np.float64), rbc))


def _far_rbc_direction(od: np.ndarray, tot: np.ndarray, origin: tuple[float, float], reach: float) -> np.ndarray:
    """Unit OD of the red cells: dense, not purple pixels beyond ``reach`` of the nucleus; default if few."""
    h, w = tot.shape
    dy = (np.arange(h, dtype=np.float32) - origin[0])[:, None]
    dx = (np.arange(w, dtype=np.float32) - origin[1])[None, :]
    sel = (dy * dy + dx * dx > reach * reach) & (tot > 0.15)
    default = np.asarray(RBC_OD, np.float64)
    if sel.sum() < 50:
        return default
    v = od[sel].astype(np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    u = u[(u @ default) >= (u @ NUCLEUS_OD)]
    if u.shape[0] < 50:
        return default
    d = u.mean(axis=0)
    d /= np.linalg.norm(d)
    return d if float(d @ default) >= 0.95 else default


def _cytoplasm_od(tot: np.ndarray) -> float:
    """Total OD above which a pixel absorbs (cytoplasm): the segmenter's level, raised over noisy glass."""
    glass = float(np.percentile(tot[:: max(1, tot.shape[0] // 64), :: max(1, tot.shape[1] // 64)], 5.0))
    return max(_SEG.cytoplasm_od, glass + _CYTO_OVER_GLASS)


def _fit_circle(y: np.ndarray, x: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic least-squares circle (yc, xc, r) through points, one outlier-trimming pass; None if degenerate."""
    keep = np.ones(y.size, bool)
    out: tuple[float, float, float] | None = None
    for _ in range(2):
        if keep.sum() < 6:
            return out
        design = np.stack([x[keep], y[keep], np.ones(int(keep.sum()))], axis=1)
        rhs = -(x[keep] ** 2 + y[keep] ** 2)
        (a, b, c), *_ = np.linalg.lstsq(design, rhs, rcond=None)
        xc, yc = -a / 2.0, -b / 2.0
        r2 = xc * xc + yc * yc - c
        if not (np.isfinite(r2) and r2 > 0):
            return out
        r = math.sqrt(r2)
        out = (float(yc), float(xc), r)
        keep = np.abs(np.hypot(y - yc, x - xc) - r) <= max(1.0, 0.15 * r)
    return out


def _complete(radius: np.ndarray, fit_on: np.ndarray, extend: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Extend the ``extend`` rays to the circle through the ends of the ``fit_on`` rays (origin-relative).

    With rays all around (a quarter of them or more) the circle is a least-squares fit; with fewer, or
    an implausible fit, it is centred on the origin with the median radius of those rays.
    """
    if not extend.any() or fit_on.sum() < 6:
        return radius
    med = float(np.median(radius[fit_on]))
    fit = None
    if fit_on.sum() >= _N_RAYS // 4:
        fit = _fit_circle(np.sin(theta[fit_on]) * radius[fit_on], np.cos(theta[fit_on]) * radius[fit_on])
    if fit is None or math.hypot(fit[0], fit[1]) >= 0.8 * fit[2] or not 0.6 * med <= fit[2] <= 1.5 * med + 1.0:
        fit = (0.0, 0.0, med)
    yc, xc, r = fit
    proj = np.cos(theta) * xc + np.sin(theta) * yc
    reach = proj + np.sqrt(np.maximum(proj * proj - (xc * xc + yc * yc - r * r), 0.0))
    out = radius.copy()
    out[extend] = np.maximum(radius[extend], reach[extend])
    return out


def _star_radius(dy: np.ndarray, dx: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from the origin and the outline's radius (interpolated between rays) at offsets (dy, dx)."""
    n = radii.size
    pos = np.mod(np.arctan2(dy, dx), 2.0 * math.pi) * (n / (2.0 * math.pi))
    i0 = pos.astype(np.intp) % n
    frac = pos - np.floor(pos)
    edge = (1.0 - frac) * radii[i0] + frac * radii[(i0 + 1) % n]
    return np.hypot(dy, dx), edge


def _star_mask(shape: tuple[int, int], origin: tuple[float, float], radii: np.ndarray) -> np.ndarray:
    """bool mask of the star-shaped outline ``radii`` (rays evenly spaced from angle 0) around ``origin``."""
    h, w = shape
    rmax = float(radii.max())
    y0, y1 = max(0, math.floor(origin[0] - rmax)), min(h, math.ceil(origin[0] + rmax) + 1)
    x0, x1 = max(0, math.floor(origin[1] - rmax)), min(w, math.ceil(origin[1] + rmax) + 1)
    mask = np.zeros(shape, bool)
    if y1 <= y0 or x1 <= x0:
        return mask
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - origin[0] + np.zeros((1, x1 - x0))
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - origin[1] + np.zeros((y1 - y0, 1))
    dist, edge = _star_radius(dy, dx, radii)
    mask[y0:y1, x0:x1] = dist <= edge
    return mask


def _star_area_centroid(r: np.ndarray, theta: np.ndarray, oy: float, ox: float) -> tuple[float, float, float]:
    """Area and centroid (row, col) of the star polygon with vertices at ``r`` along ``theta``."""
    y = oy + np.sin(theta) * r
    x = ox + np.cos(theta) * r
    y1, x1 = np.roll(y, -1), np.roll(x, -1)
    cross = x * y1 - x1 * y
    a = 0.5 * float(cross.sum())
    if abs(a) < 1e-9:
        return 0.0, oy, ox
    cx = float(((x + x1) * cross).sum()) / (6.0 * a)
    cy = float(((y + y1) * cross).sum()) / (6.0 * a)
    return abs(a), cy, cx


def _stain_dir(od: np.ndarray, sel: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Mean unit OD of the selected pixels; ``default`` when too few or too far from it."""
    v = od[sel]
    if v.shape[0] < 30:
        return np.asarray(default, np.float64)
    norm = np.linalg.norm(v, axis=1)
    v = v[norm > 0.05] / norm[norm > 0.05, None]
    if v.shape[0] < 30:
        return np.asarray(default, np.float64)
    dvec = np.asarray(v.mean(axis=0), np.float64)
    dvec = dvec / max(float(np.linalg.norm(dvec)), 1e-9)
    if math.acos(min(1.0, float(dvec @ default))) > _MAX_STAIN_ANGLE:
        return np.asarray(default, np.float64)
    return dvec


# ---------------------------------------------------------------------------------------- canonicalising


def _to_8bit(arr: np.ndarray) -> float:
    """Factor bringing the input's nominal range to 0-255 (for ``stain="none"``)."""
    if arr.dtype == np.uint8:
        return 1.0
    if np.issubdtype(arr.dtype, np.floating):
        return 255.0 if float(np.nanmax(arr)) <= 1.0 + 1e-6 else 1.0
    top = float(arr.max(initial=0))
    bits = next((b for b in (8, 10, 12, 14, 16) if top < 2.0**b), 16)
    return 255.0 / (2.0**bits - 1.0)


def canonicalize(crop: np.ndarray, spec: CanonicalSpec, *, um_per_px: float | None = None) -> CanonicalCell:
    """The canonical view of the white cell in ``crop`` (see the module docstring).

    ``um_per_px`` (the crop's pixel size) only adds the cell's diameter in µm. Raises
    :class:`NoCellError` when the crop has no white cell.
    """
    if um_per_px is not None and not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px}")
    found = _find(crop, stains=spec.stain == "macenko")
    geo = found.geometry
    s_out = spec.size
    scale = spec.cell_fraction * s_out / max(geo.diameter_px, 1e-6)
    bg = found.background.astype(np.float64)
    if spec.stain == "none":
        factor = _to_8bit(check_pixels(crop))
        fill = np.asarray(CANONICAL_BACKGROUND) if found.tight else bg * factor
    else:
        factor = 1.0
        fill = np.asarray(CANONICAL_BACKGROUND)

    # only the part of the crop the output shows (plus the filters' reach) is resampled
    h, w = found.pixels.shape[:2]
    inv = 1.0 / scale
    reach = (s_out / 2.0 + 2.0) * inv + 4.0
    r0 = max(0, min(h - 1, math.floor(geo.centre[0] - reach)))
    col0 = max(0, min(w - 1, math.floor(geo.centre[1] - reach)))
    r1 = max(r0 + 1, min(h, math.ceil(geo.centre[0] + reach) + 1))
    col1 = max(col0 + 1, min(w, math.ceil(geo.centre[1] + reach) + 1))
    raw = found.pixels[r0:r1, col0:col1]
    # antialias: integer block averaging, then a Gaussian for the remaining reduction
    f = int(inv) if inv >= 2.0 else 1
    if f > 1 and min(raw.shape[0], raw.shape[1]) >= f:
        src = block_downsample(raw if np.issubdtype(raw.dtype, np.integer) else as_rgb_float(raw), f)
    else:
        f = 1
        src = as_rgb_float(raw)
    rest = inv / f
    if rest > 1.05:
        src = np.stack([gaussian(src[:, :, k], (rest - 1.0) / 2.0) for k in range(3)], axis=2)

    # output pixel (i, j) -> input (row, col) -> source coordinates
    c0 = (s_out - 1) / 2.0
    o = (np.arange(s_out, dtype=np.float64) - c0) / scale
    in_r = geo.centre[0] + o[:, None] + np.zeros((1, s_out))
    in_c = geo.centre[1] + np.zeros((s_out, 1)) + o[None, :]
    off = (f - 1) / 2.0
    coords = np.stack([(in_r - r0 - off) / f, (in_c - col0 - off) / f])
    out = np.empty((s_out, s_out, 3), np.float64)
    for k in range(3):
        out[:, :, k] = ndi.map_coordinates(
            src[:, :, k], coords, order=1, mode="constant", cval=float(bg[k]), prefilter=False
        )

    bgc = np.maximum(bg, 1e-6)
    canon = np.asarray(CANONICAL_BACKGROUND)
    if spec.stain == "none":
        out *= factor
    elif spec.stain == "white":
        out *= canon / bgc
    else:
        od = -np.log10(np.maximum(out, 1e-6) / bgc)
        m_est = _stain_matrix(found.nucleus_dir, found.rbc_dir)
        m_ref = _stain_matrix(REFERENCE_NUCLEUS_OD, REFERENCE_RBC_OD)
        conc = od.reshape(-1, 3) @ np.linalg.inv(m_est)
        out = canon * np.power(10.0, -(conc @ m_ref)).reshape(out.shape)

    # beyond the crop: background, faded in over a couple of output pixels (no seam, no stretching)
    inner = np.minimum(np.minimum(in_r + 0.5, h - 0.5 - in_r), np.minimum(in_c + 0.5, w - 0.5 - in_c)) * scale
    alpha = np.clip(inner / 2.0, 0.0, 1.0)
    if spec.context == "mask":
        alpha = np.minimum(alpha, _cell_alpha(found, geo, scale, in_r, in_c, s_out))
    if float(alpha.min()) < 1.0:
        out = alpha[:, :, None] * out + (1.0 - alpha[:, :, None]) * fill
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    d_um = geo.diameter_px * um_per_px if um_per_px is not None else None
    bg_t = (float(bg[0]), float(bg[1]), float(bg[2]))
    return CanonicalCell(image, geo, float(scale), bg_t, d_um)


def _stain_matrix(nuc: np.ndarray, rbc: np.ndarray) -> np.ndarray:
    """Rows: nuclear, red-cell and residual unit OD directions."""
    third = np.cross(nuc, rbc)
    third = third / max(float(np.linalg.norm(third)), 1e-9)
    return np.stack([nuc, rbc, third]).astype(np.float64)


def _cell_alpha(
    found: _Found, geo: CellGeometry, scale: float, in_r: np.ndarray, in_c: np.ndarray, s_out: int
) -> np.ndarray:
    """Output-space weight of the cell: 1 inside the dilated outline, 0 beyond, a ramp of a few pixels."""
    dist, r_edge = _star_radius(in_r - found.origin[0], in_c - found.origin[1], found.radii)
    margin = r_edge + _DILATE * geo.diameter_px - dist  # input px; > 0 inside
    feather = max(1.5, 0.04 * s_out)
    return np.asarray(np.clip(margin * scale / feather + 0.5, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------ batches


def _one(args: tuple[np.ndarray, CanonicalSpec, float | None]) -> CanonicalCell | tuple[bool, str]:
    """One crop for a batch: the cell, or (is a NoCellError, reason) for a crop that failed."""
    crop, spec, um = args
    try:
        return canonicalize(crop, spec, um_per_px=um)
    except NoCellError as exc:
        return (True, exc.reason)
    except ValueError as exc:
        return (False, str(exc))


def canonical_batch(
    crops: Sequence[np.ndarray] | np.ndarray,
    spec: CanonicalSpec,
    *,
    um_per_px: float | Sequence[float] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = False,
    processes: int = 0,
) -> CanonicalBatch:
    """:func:`canonicalize` over many crops (a list of arrays of any sizes, or an ``(N, H, W, 3)`` array).

    ``on_error="raise"`` raises :class:`NoCellError` naming the first crop without a cell;
    ``"skip"`` leaves such crops out and records why in ``errors``. ``processes > 0`` spreads the work
    over that many spawned processes (safe on Windows and macOS; worth it for thousands of crops).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    n = len(crops)
    if um_per_px is None or isinstance(um_per_px, (int, float)):
        ums: list[float | None] = [None if um_per_px is None else float(um_per_px)] * n
    else:
        ums = [float(u) for u in um_per_px]
        if len(ums) != n:
            raise ValueError(f"um_per_px has {len(ums)} values for {n} crops")
    jobs = ((np.asarray(crops[i]), spec, ums[i]) for i in range(n))
    results: list[CanonicalCell | tuple[bool, str]] = []
    track = _progress(progress, n)
    if processes > 0 and n > 1:
        import multiprocessing as mp

        chunk = max(1, min(64, n // (4 * processes)))
        with mp.get_context("spawn").Pool(processes) as pool:
            for res in track(pool.imap(_one, jobs, chunksize=chunk)):
                results.append(res)
                if on_error == "raise" and isinstance(res, tuple):
                    break
    else:
        for job in track(jobs):
            results.append(_one(job))
            if on_error == "raise" and isinstance(results[-1], tuple):
                break
    images: list[np.ndarray] = []
    kept: list[int] = []
    cells: list[CellInfo] = []
    errors: dict[int, str] = {}
    for i, res in enumerate(results):
        if isinstance(res, tuple):
            no_cell, reason = res
            if on_error == "raise":
                if no_cell:
                    raise NoCellError(reason, tuple(int(v) for v in np.shape(crops[i])), i)
                raise ValueError(f"crop {i}: {reason}")
            errors[i] = reason
            continue
        images.append(res.image)
        kept.append(i)
        cells.append(CellInfo.of(res))
    arr = np.stack(images) if images else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    return CanonicalBatch(arr, np.asarray(kept, np.int64), cells, errors)


def _progress(show: bool, total: int) -> Any:
    """Wrap an iterable in a rich progress bar when ``show``."""
    if not show:
        return lambda it: it

    def wrap(it: Any) -> Any:
        from rich.progress import track

        return track(it, total=total, description="canonical crops")

    return cast(Any, wrap)
