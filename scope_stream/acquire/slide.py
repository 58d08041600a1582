"""A virtual blood smear built from real cell images, rendered lazily per field of view.

The slide is many millimetres across but never exists as one array. Cells are laid out per *chunk*
(``cfg.chunk_um`` square) from a random stream seeded by ``(seed, chunk)``, so any field renders the
same way whatever was rendered before, and the same seed always gives the same slide.

Image model (brightfield, Beer-Lambert): every cell is an absorbing object with a transmittance map
``T`` cut from a real image (``T = image / local background``) and a soft mask ``alpha``. A field is

    pixel = background(x, y) * prod_cells (1 - alpha * (1 - T))

which is order-independent, has no hard edges (a cell's own crop background has ``T ~ 1``, so a loose
mask stays invisible) and needs no colour matching between sources beyond dividing by each source's
own background.

* white cells and platelets: PBC crops (Acevedo et al. 2020, CC BY 4.0), segmented from their crop
  (nucleus seed + watershed on the foreground), feathered edge; the PBC label is the ground truth.
  With a data folder only its ``val`` split is used (the classifier trains on ``train``).
* red cells: cut from PBC crops (isolated red cells, default) or from BCCD fields (MIT; boxes from the
  VOC annotations, optical density rescaled to the PBC stain), ``cfg.rbc_source``.
* background: ``cfg.background_rgb`` with a gentle low-frequency illumination drift.

Sprites are resampled once per pixel size (anti-aliased) and cached, so a scan objective and a
re-imaging objective see the same cells at different detail.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

from scope_stream.config.microscope import WBC_CLASSES, MicroscopeConfig
from scope_stream.datasets import BCCD_UM_PER_PX, PBC_UM_PER_PX_128, DatasetError, LabelledImage

__all__ = [
    "RBC_LABEL",
    "PlantedCell",
    "SlideError",
    "Sprite",
    "VirtualSlide",
    "extract_pbc_cell",
    "harvest_bccd_rbcs",
    "harvest_pbc_rbcs",
    "read_ground_truth",
    "write_ground_truth",
]

log = logging.getLogger(__name__)

RBC_LABEL = "RBC"
PLATELET_LABEL = "platelet"
CellKindName = Literal["WBC", "platelet", "RBC"]

#: Median optical density (-ln(I / background), R, G, B) of red-cell pixels in PBC crops, measured on
#: every 40th image of shared/data/pbc's val split. BCCD red cells are rescaled to it per channel.
PBC_RBC_OD: tuple[float, float, float] = (0.216, 0.305, 0.206)

_KIND_CODES: dict[str, int] = {"RBC": 0, "WBC": 1, "platelet": 2}
_KIND_NAMES: tuple[CellKindName, ...] = ("RBC", "WBC", "platelet")
_KIND_PREFIX = ("R", "W", "P")
#: nominal radii (µm) used to keep cells apart when laying them out
_R_RBC = 3.75
_R_WBC = 6.5
_R_PLT = 1.2
#: the largest distance (µm) from a cell centre at which its sprite can still draw
_MAX_SPRITE_RADIUS_UM = 16.0


class SlideError(ValueError):
    """The virtual slide cannot be built or asked for that (bad source folder, bad field...)."""


# ----------------------------------------------------------------------------------- truth
@dataclass(frozen=True)
class PlantedCell:
    """One cell placed on the virtual slide: the ground truth for detection and classification.

    ``label`` is the PBC class (``"neutrophil"`` ... ``"erythroblast"``, ``"platelet"``) or ``"RBC"``;
    ``kind`` is ``"WBC"`` (every nucleated cell, erythroblasts included), ``"platelet"`` or ``"RBC"``.
    ``x_um``/``y_um`` is the centroid of the cell's footprint in stage coordinates. ``source`` names
    the real image the cell was cut from.
    """

    cell_id: str
    label: str
    kind: CellKindName
    abnormal: bool
    x_um: float
    y_um: float
    diameter_um: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TRUTH_FIELDS = ("cell_id", "label", "kind", "abnormal", "x_um", "y_um", "diameter_um", "source")


def write_ground_truth(cells: Iterable[PlantedCell], path: Path | str) -> Path:
    """Write cells as ``.csv`` (one row per cell) or ``.json`` (a list of objects), by suffix."""
    p = Path(path)
    rows = [c.to_dict() for c in cells]
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".json":
        p.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif p.suffix.lower() == ".csv":
        with p.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(_TRUTH_FIELDS))
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise SlideError(f"ground truth file must end in .csv or .json, got {p.name!r}")
    return p


def read_ground_truth(path: Path | str) -> list[PlantedCell]:
    """Read a file written by :func:`write_ground_truth`."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        rows = json.loads(p.read_text(encoding="utf-8"))
    else:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        abnormal = r["abnormal"]
        out.append(
            PlantedCell(
                cell_id=str(r["cell_id"]),
                label=str(r["label"]),
                kind=r["kind"],
                abnormal=abnormal if isinstance(abnormal, bool) else str(abnormal).lower() == "true",
                x_um=float(r["x_um"]),
                y_um=float(r["y_um"]),
                diameter_um=float(r["diameter_um"]),
                source=str(r.get("source", "")),
            )
        )
    return out


# ------------------------------------------------------------------------------- sprites
@dataclass(frozen=True)
class Sprite:
    """A cell cut from a real image, at its source scale.

    ``absorb`` is ``alpha * (1 - T)`` per channel (0 = lets all light through), ``mask`` the soft
    footprint ``alpha``; ``center`` the (row, col) footprint centroid in these arrays.
    """

    label: str
    kind: CellKindName
    absorb: np.ndarray  # (h, w, 3) float32 in [0, 1]
    mask: np.ndarray  # (h, w) float32 in [0, 1]
    center: tuple[float, float]
    um_per_px: float
    diameter_um: float
    source: str


@dataclass(frozen=True)
class _Scaled:
    """A sprite resampled to one pixel size: square, odd-sized, centroid on the central pixel.

    ``keeps[o]`` / ``masks[o]`` are the 8 dihedral orientations (views of one array, no copies).
    """

    keep: np.ndarray  # (n, n, 3) float32: 1 - absorb, what multiplies the field
    mask: np.ndarray  # (n, n) float32
    half: int
    keeps: tuple[np.ndarray, ...] = ()
    masks: tuple[np.ndarray, ...] = ()

    @classmethod
    def build(cls, keep: np.ndarray, mask: np.ndarray, half: int) -> _Scaled:
        return cls(
            keep, mask, half, tuple(_orient(keep, o) for o in range(8)), tuple(_orient(mask, o) for o in range(8))
        )


def _background(img: np.ndarray) -> np.ndarray:
    """The crop's empty-glass colour: median of its brightest 10% of pixels."""
    lum = img.mean(axis=2)
    sel = lum >= np.percentile(lum, 90)
    return np.maximum(np.median(img[sel], axis=0), 1e-3).astype(np.float32)


def _optical_density(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """-ln(I / background) per channel, >= 0 (brighter-than-background pixels count as clear)."""
    t = np.clip(img / bg, 1e-3, 1.0)
    return (-np.log(t)).astype(np.float32)


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def _solidity(region: np.ndarray) -> float:
    from skimage.morphology import convex_hull_image

    area = float(region.sum())
    if area == 0:
        return 0.0
    return area / max(float(convex_hull_image(region).sum()), 1.0)


def _make_sprite(
    od: np.ndarray, region: np.ndarray, *, label: str, kind: CellKindName, um_per_px: float, source: str
) -> Sprite:
    """Feather ``region``, crop tightly and package the absorbance map."""
    alpha = ndi.gaussian_filter(region.astype(np.float32), 0.8)
    alpha[alpha < 0.01] = 0.0
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    alpha = alpha[r0:r1, c0:c1]
    trans = np.exp(-od[r0:r1, c0:c1])
    absorb = (alpha[..., None] * (1.0 - trans)).astype(np.float32)
    w = region[r0:r1, c0:c1].astype(np.float64)
    rr, cc = np.indices(w.shape)
    center = (float((rr * w).sum() / w.sum()), float((cc * w).sum() / w.sum()))
    diameter = 2.0 * math.sqrt(float(region.sum()) / math.pi) * um_per_px
    return Sprite(label, kind, absorb, alpha.astype(np.float32), center, um_per_px, diameter, source)


def extract_pbc_cell(img: np.ndarray, label: str, source: str = "") -> Sprite | None:
    """Cut the central cell (white cell or platelet) out of a PBC crop; ``None`` if it fails QC.

    ``img`` is (H, W, 3) float in [0, 1] at ``PBC_UM_PER_PX_128``. The cell is the watershed basin,
    over the foreground, of the dark-purple (nucleus / platelet granule) component nearest the centre;
    red cells touching it get their own basins and are cut away. Crops whose cell touches the border,
    is implausibly small or large, or is ragged (low solidity) are refused.
    """
    from skimage.segmentation import watershed

    is_plt = label == PLATELET_LABEL
    bg = _background(img)
    od = _optical_density(img, bg)
    fg = od.sum(axis=2) > 0.2
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=1))
    purple = _remove_small(od[..., 0] > (0.25 if is_plt else 0.35), 4)
    lab, n = ndi.label(purple)
    if n == 0:
        return None
    h, w = purple.shape
    yy, xx = np.indices((h, w))
    dist_c = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    mind = np.asarray(ndi.minimum(dist_c, lab, index=np.arange(1, n + 1)))
    k = int(np.argmin(mind)) + 1
    if mind[k - 1] > 20:
        return None
    seed = lab == k
    dseed = ndi.distance_transform_edt(~seed)
    near = np.asarray(ndi.minimum(dseed, lab, index=np.arange(1, n + 1)))
    for j in range(1, n + 1):
        if j != k and near[j - 1] < (3 if is_plt else 6):
            seed |= lab == j
    dseed = ndi.distance_transform_edt(~seed)
    fg |= seed
    dt = ndi.distance_transform_edt(fg)
    peaks = (dt == ndi.maximum_filter(dt, size=15)) & (dt > 6) & (dseed > 12)
    markers = np.zeros((h, w), np.int32)
    plab, _ = ndi.label(peaks)
    markers[plab > 0] = plab[plab > 0] + 1
    markers[seed] = 1
    basins = watershed(-dt, markers, mask=fg)
    region = ndi.binary_fill_holes(basins == 1)
    region &= dseed <= (6 if is_plt else 18)  # cytoplasm reaches a few µm past the nucleus, not further
    region = ndi.binary_opening(region, iterations=1) | seed
    lab2, n2 = ndi.label(region)
    if n2 > 1:  # keep the piece holding the seed
        counts = np.bincount(lab2[seed].ravel(), minlength=n2 + 1)
        counts[0] = 0
        region = lab2 == int(np.argmax(counts))
    area = int(region.sum())
    lo, hi = (15, 700) if is_plt else (700, 6000)
    if not (lo <= area <= hi):
        return None
    m = 2
    if region[:m].any() or region[-m:].any() or region[:, :m].any() or region[:, -m:].any():
        return None
    if _solidity(region) < (0.75 if is_plt else 0.85):
        return None
    kind: CellKindName = "platelet" if is_plt else "WBC"
    return _make_sprite(od, region, label=label, kind=kind, um_per_px=PBC_UM_PER_PX_128, source=source)


def harvest_pbc_rbcs(img: np.ndarray, source: str = "", max_cells: int = 8) -> list[Sprite]:
    """Cut isolated, whole, round red cells out of a PBC crop (far from the white cell)."""
    from skimage.measure import regionprops

    bg = _background(img)
    od = _optical_density(img, bg)
    fg = ndi.binary_fill_holes(ndi.binary_opening(od.sum(axis=2) > 0.2, iterations=1))
    purple = od[..., 0] > 0.3
    lab, _ = ndi.label(fg)
    bad = np.unique(lab[ndi.binary_dilation(purple, iterations=3)])
    out: list[Sprite] = []
    um = PBC_UM_PER_PX_128
    a_lo, a_hi = math.pi * (2.6 / um) ** 2, math.pi * (4.6 / um) ** 2
    h, w = fg.shape
    for rp in regionprops(lab):
        if rp.label in bad or not (a_lo <= rp.area <= a_hi):
            continue
        r0, c0, r1, c1 = rp.bbox
        if r0 < 2 or c0 < 2 or r1 > h - 2 or c1 > w - 2:
            continue
        if rp.solidity < 0.95 or rp.eccentricity > 0.6:
            continue
        region = lab == rp.label
        out.append(_make_sprite(od, region, label=RBC_LABEL, kind="RBC", um_per_px=um, source=source))
        if len(out) >= max_cells:
            break
    return out


def harvest_bccd_rbcs(img: np.ndarray, boxes: Sequence[Any], source: str = "") -> list[Sprite]:
    """Cut red cells out of a BCCD field using its VOC boxes; optical density rescaled to the PBC stain.

    Only boxes that are whole, roundish, of red-cell size and barely overlap another box are used;
    the mask is the inscribed ellipse with a soft edge.
    """
    h, w = img.shape[:2]
    bg = _background(img)
    od = _optical_density(img, bg)
    arr = np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes], dtype=np.float64).reshape(-1, 4)
    picks: list[tuple[np.ndarray, np.ndarray]] = []
    for i, b in enumerate(boxes):
        if b.name != "RBC":
            continue
        bw, bh = b.x1 - b.x0, b.y1 - b.y0
        if not (70 <= bw <= 135 and 70 <= bh <= 135 and 0.75 < bw / bh < 1.33):
            continue
        if b.x0 < 8 or b.y0 < 8 or b.x1 > w - 8 or b.y1 > h - 8:
            continue
        ix = np.clip(np.minimum(arr[:, 2], b.x1) - np.maximum(arr[:, 0], b.x0), 0, None)
        iy = np.clip(np.minimum(arr[:, 3], b.y1) - np.maximum(arr[:, 1], b.y0), 0, None)
        inter = ix * iy
        inter[i] = 0
        if inter.max(initial=0.0) > 0.15 * bw * bh:
            continue
        m = 6
        y0, y1, x0, x1 = int(b.y0) - m, int(b.y1) + m, int(b.x0) - m, int(b.x1) + m
        crop = od[y0:y1, x0:x1]
        yy, xx = np.indices(crop.shape[:2])
        cy, cx = (b.y0 + b.y1) / 2 - y0, (b.x0 + b.x1) / 2 - x0
        rr = np.sqrt(((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2)
        picks.append((crop, rr))
    if not picks:
        return []
    med = np.median(np.stack([np.median(c[r < 0.8], axis=0) for c, r in picks]), axis=0)
    scale = np.asarray(PBC_RBC_OD, dtype=np.float32) / np.maximum(med, 1e-3)
    out = []
    for crop, rr in picks:
        od_s = crop * scale
        region = rr <= 1.0
        sprite = _make_sprite(od_s, region, label=RBC_LABEL, kind="RBC", um_per_px=BCCD_UM_PER_PX, source=source)
        out.append(sprite)
    return out


def _sharpness(sp: Sprite) -> float:
    """90th percentile of the absorbance gradient over the cell: low for cells out of focus in their crop."""
    a = sp.absorb.sum(axis=2)
    g = np.hypot(ndi.sobel(a, 0), ndi.sobel(a, 1))
    return float(np.percentile(g[sp.mask > 0.05], 90))


def _scale_sprite(sp: Sprite, pixel_size_um: float) -> _Scaled:
    """Resample ``sp`` to ``pixel_size_um`` on an odd square grid centred on its centroid."""
    f = pixel_size_um / sp.um_per_px  # source pixels per output pixel
    h, w = sp.mask.shape
    cy, cx = sp.center
    extent = max(cy, h - 1 - cy, cx, w - 1 - cx) + 1.0
    half = max(1, math.ceil(extent / f))
    n = 2 * half + 1
    absorb = sp.absorb
    mask = sp.mask
    if f > 1.0:  # anti-alias before decimating: the optics of the lower objective
        s = 0.45 * f
        absorb = ndi.gaussian_filter(absorb, (s, s, 0), mode="constant")
        mask = ndi.gaussian_filter(mask, s, mode="constant")
    # output pixel i samples source coordinate center + (i - half) * f
    coords = (np.arange(n, dtype=np.float64) - half) * f
    rows = cy + coords
    cols = cx + coords
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    out_a = np.stack(
        [ndi.map_coordinates(absorb[..., c], [grid_r, grid_c], order=1, mode="constant") for c in range(3)],
        axis=-1,
    )
    out_m = ndi.map_coordinates(mask, [grid_r, grid_c], order=1, mode="constant")
    keep = np.clip(1.0 - out_a, 0.0, 1.0).astype(np.float32)
    return _Scaled.build(keep, np.clip(out_m, 0.0, 1.0).astype(np.float32), half)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise SlideError(f"cannot read image {path}: {exc}") from exc


# -------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Sources:
    """Where the slide's cells come from."""

    root: Path  # the folder holding pbc/ (and bccd/)
    pbc: dict[str, list[LabelledImage]]  # label -> crops
    bccd_fields: list[tuple[Path, Path]]  # (jpg, xml)
    packaged: bool


def _resolve_sources(cfg: MicroscopeConfig) -> _Sources:
    from scope_stream.datasets import read_labels_csv

    if cfg.data_dir is None:
        from .sample import sample_root

        root = sample_root()
        packaged = True
        rows = read_labels_csv(root / "pbc")
    else:
        root = Path(cfg.data_dir).expanduser()
        packaged = False
        if not (root / "pbc" / "labels.csv").is_file():
            raise SlideError(
                f"microscope.data_dir {root} has no pbc/labels.csv: point it at a folder like ../shared/data "
                "(holding pbc/ and bccd/), or leave it unset to use the packaged sample"
            )
        try:
            rows = read_labels_csv(root / "pbc", split="val")
        except DatasetError as exc:
            raise SlideError(str(exc)) from exc
        if not rows:
            raise SlideError(
                f"{root / 'pbc' / 'labels.csv'} has no rows of split 'val': the virtual slide only uses held-out "
                "(val) crops so that the classifier never sees its training cells on the slide"
            )
    pbc: dict[str, list[LabelledImage]] = {}
    for r in rows:
        pbc.setdefault(r.label, []).append(r)
    for lst in pbc.values():
        lst.sort(key=lambda r: str(r.path))
    fields: list[tuple[Path, Path]] = []
    bdir = root / "bccd"
    if (bdir / "Annotations").is_dir():
        for xml in sorted((bdir / "Annotations").glob("*.xml")):
            jpg = bdir / "JPEGImages" / (xml.stem + ".jpg")
            if jpg.is_file():
                fields.append((jpg, xml))
    return _Sources(root=root, pbc=pbc, bccd_fields=fields, packaged=packaged)


# ------------------------------------------------------------------------------ sprite bank
class _SpriteBank:
    """Pools of real cell sprites per label, cut lazily and cached per pixel size."""

    def __init__(self, cfg: MicroscopeConfig, sources: _Sources) -> None:
        self.cfg = cfg
        self.sources = sources
        self._lock = threading.RLock()
        self._wbc: dict[tuple[str, int], Sprite] = {}  # (label, pool index) -> sprite (after QC fallback)
        self._scaled: OrderedDict[tuple[str, int, int], _Scaled] = OrderedDict()
        self._rbc_scaled: dict[int, list[_Scaled]] = {}
        self.rbcs: list[Sprite] = self._harvest_rbcs()
        if not self.rbcs and cfg.rbc_coverage > 0:
            raise SlideError(f"no usable red cells found in {sources.root} (rbc_source={cfg.rbc_source!r})")

    # ---- pools
    def pool(self, label: str) -> list[LabelledImage]:
        return self.sources.pbc.get(label, [])

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.sources.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _harvest_rbcs(self) -> list[Sprite]:
        cfg = self.cfg
        if cfg.rbc_coverage == 0:
            return []
        rng = np.random.default_rng([cfg.seed, 7])
        out: list[Sprite] = []
        if cfg.rbc_source == "bccd":
            from scope_stream.datasets import read_voc

            fields = list(self.sources.bccd_fields)
            if not fields:
                raise SlideError(f"rbc_source='bccd' but {self.sources.root / 'bccd'} has no annotated fields")
            order = rng.permutation(len(fields))[: cfg.rbc_source_images]
            for i in sorted(order):
                jpg, xml = fields[int(i)]
                _, boxes = read_voc(xml)
                out.extend(harvest_bccd_rbcs(_read_rgb(jpg), boxes, source=self.rel(jpg)))
            return out
        crops = [r for lst in self.sources.pbc.values() for r in lst]
        if not crops:
            raise SlideError(f"no PBC crops found under {self.sources.root / 'pbc'}")
        order = rng.permutation(len(crops))[: cfg.rbc_source_images]
        for i in sorted(order):
            r = crops[int(i)]
            out.extend(harvest_pbc_rbcs(_read_rgb(r.path), source=self.rel(r.path)))
        # drop ghosts: cells that were pale or out of focus in their crop (weak absorbance or soft rim)
        if out:
            strength = np.array([float(sp.absorb.sum(axis=2)[sp.mask > 0.5].mean()) for sp in out])
            sharp = np.array([_sharpness(sp) for sp in out])
            keep = (strength >= 0.5 * float(np.median(strength))) & (sharp >= 0.6 * float(np.median(sharp)))
            out = [sp for sp, k in zip(out, keep, strict=True) if k]
        return out

    def wbc(self, label: str, index: int) -> Sprite:
        """The sprite of pool entry ``index`` of ``label``; entries failing QC fall back to the next one."""
        key = (label, index)
        with self._lock:
            sp = self._wbc.get(key)
            if sp is not None:
                return sp
            pool = self.pool(label)
            if not pool:
                raise SlideError(f"no {label!r} images in {self.sources.root / 'pbc'}")
            for step in range(len(pool)):
                item = pool[(index + step) % len(pool)]
                cand = extract_pbc_cell(_read_rgb(item.path), label, source=self.rel(item.path))
                if cand is not None:
                    self._wbc[key] = cand
                    return cand
            raise SlideError(f"none of the {len(pool)} {label!r} images yields a clean cell cut-out")

    def rbc_scaled(self, pixel_size_um: float) -> list[_Scaled]:
        """Every red-cell sprite at ``pixel_size_um`` (kept for the life of the slide: the pool is small)."""
        ps_key = round(pixel_size_um * 1e6)
        with self._lock:
            hit = self._rbc_scaled.get(ps_key)
            if hit is None:
                hit = self._rbc_scaled[ps_key] = [_scale_sprite(sp, pixel_size_um) for sp in self.rbcs]
                while len(self._rbc_scaled) > 8:  # a handful of pixel sizes (objectives) in practice
                    self._rbc_scaled.pop(next(iter(self._rbc_scaled)))
            return hit

    def scaled(self, kind: int, label: str, index: int, pixel_size_um: float) -> _Scaled:
        """The sprite resampled to ``pixel_size_um`` (LRU-cached)."""
        ps_key = round(pixel_size_um * 1e6)
        key = (label, index, ps_key) if kind != 0 else (RBC_LABEL, index, ps_key)
        with self._lock:
            hit = self._scaled.get(key)
            if hit is not None:
                self._scaled.move_to_end(key)
                return hit
            sp = self.rbcs[index] if kind == 0 else self.wbc(label, index)
            sc = _scale_sprite(sp, pixel_size_um)
            self._scaled[key] = sc
            while len(self._scaled) > self.cfg.sprite_cache_size:
                self._scaled.popitem(last=False)
            return sc


# ------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Chunk:
    """The cells of one chunk: parallel arrays, RBCs first."""

    x: np.ndarray  # float64 µm
    y: np.ndarray
    kind: np.ndarray  # uint8: 0 RBC, 1 WBC, 2 platelet
    label: np.ndarray  # int16 index into VirtualSlide.labels
    sprite: np.ndarray  # int64 pool index
    orient: np.ndarray  # uint8 0..7 (dihedral)
    abnormal: np.ndarray  # bool
    local: np.ndarray  # int64: the cell's number within its chunk and kind (part of its id)
    ci: int
    cj: int

    def __len__(self) -> int:
        return int(self.x.size)

    def cell_id(self, k: int) -> str:
        return f"{_KIND_PREFIX[int(self.kind[k])]}{self.ci}.{self.cj}.{int(self.local[k])}"

    def find(self, cell_id: str) -> int | None:
        """Index of ``cell_id`` in this chunk, or None."""
        try:
            prefix, rest = cell_id[0], cell_id[1:]
            ci, cj, local = (int(v) for v in rest.split("."))
        except ValueError:
            return None
        if (ci, cj) != (self.ci, self.cj) or prefix not in _KIND_PREFIX:
            return None
        hit = np.flatnonzero((self.kind == _KIND_PREFIX.index(prefix)) & (self.local == local))
        return int(hit[0]) if hit.size else None


def _hash_unit(seed: int, salt: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Deterministic uniform values in [-1, 1) for integer lattice nodes (i, j) (splitmix64 mix)."""
    m = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(salt) * np.uint64(0xBF58476D1CE4E5B9)
            + i.astype(np.int64).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            + j.astype(np.int64).astype(np.uint64) * np.uint64(0x2545F4914F6CDD1D)
        ) & m
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0


def _interp_weights(coords: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """(len(coords), n_nodes) smoothstep interpolation weights onto lattice nodes, and the first node."""
    u = coords / spacing
    i0 = int(np.floor(u.min()))
    i1 = int(np.floor(u.max())) + 1
    n = i1 - i0 + 1
    k = np.floor(u).astype(np.int64) - i0
    t = u - np.floor(u)
    t = t * t * (3.0 - 2.0 * t)
    wts = np.zeros((coords.size, n), dtype=np.float64)
    idx = np.arange(coords.size)
    wts[idx, k] = 1.0 - t
    wts[idx, np.minimum(k + 1, n - 1)] += t
    return wts, i0


def lattice_field(seed: int, salt: int, xs: np.ndarray, ys: np.ndarray, spacing_um: float) -> np.ndarray:
    """A smooth random field in [-1, 1] on the grid ``ys x xs`` (µm): value noise, seamless everywhere."""
    wx, ix0 = _interp_weights(np.asarray(xs, dtype=np.float64), spacing_um)
    wy, iy0 = _interp_weights(np.asarray(ys, dtype=np.float64), spacing_um)
    jj, ii = np.meshgrid(np.arange(wy.shape[1]) + iy0, np.arange(wx.shape[1]) + ix0, indexing="ij")
    nodes = _hash_unit(seed, salt, ii, jj)  # (ny, nx)
    return np.asarray(wy @ nodes @ wx.T)


# ------------------------------------------------------------------------------- the slide
class VirtualSlide:
    """A deterministic virtual blood smear: ``render`` any field, ``ground_truth`` every planted cell.

    Stage coordinates: x grows with image column, y with image row; a field is given by the stage
    position of its centre. The slide covers ``bounds_um = (0, 0, slide_width_um, slide_height_um)``;
    outside it there is empty glass.
    """

    def __init__(self, cfg: MicroscopeConfig | None = None) -> None:
        self.cfg = cfg = cfg if cfg is not None else MicroscopeConfig()
        self._lock = threading.RLock()
        self.sources = _resolve_sources(cfg)
        self.bank = _SpriteBank(cfg, self.sources)
        # white-cell classes actually available
        missing_abn = [c for c in cfg.abnormal_classes if not self.bank.pool(c)]
        if missing_abn and cfg.abnormal_fraction > 0:
            raise SlideError(f"abnormal classes {missing_abn} have no images under {self.sources.root / 'pbc'}")
        normal = {
            k: w
            for k, w in cfg.wbc_class_weights.items()
            if w > 0 and k not in cfg.abnormal_classes and self.bank.pool(k)
        }
        dropped = sorted(set(cfg.wbc_class_weights) - set(normal) - set(cfg.abnormal_classes))
        if dropped:
            log.warning("virtual slide: no images for white-cell classes %s; they are left out", dropped)
        if not normal and cfg.abnormal_fraction < 1 and cfg.wbc_per_mm2 > 0:
            raise SlideError(f"no normal white-cell class has images under {self.sources.root / 'pbc'}")
        if cfg.platelets_per_mm2 > 0 and not self.bank.pool(PLATELET_LABEL):
            raise SlideError(f"platelets_per_mm2 > 0 but there are no platelet images under {self.sources.root}")
        self.labels: tuple[str, ...] = (RBC_LABEL, PLATELET_LABEL, *WBC_CLASSES)
        self._label_idx = {lab: i for i, lab in enumerate(self.labels)}
        self._normal_labels = np.array([self._label_idx[k] for k in normal], dtype=np.int16)
        wsum = sum(normal.values()) or 1.0
        self._normal_p = np.array([normal[k] / wsum for k in normal], dtype=np.float64)
        self._abn_labels = np.array([self._label_idx[k] for k in cfg.abnormal_classes], dtype=np.int16)
        self._raw: OrderedDict[tuple[int, int], _Chunk] = OrderedDict()
        self._kept: OrderedDict[tuple[int, int], _Chunk] = OrderedDict()
        self._full: OrderedDict[tuple[int, int], _Chunk] = OrderedDict()
        self._bg = np.asarray(cfg.background_rgb, dtype=np.float32)
        # red cells sit on a lattice spaced by their real (median) size
        ds = [sp.diameter_um for sp in self.bank.rbcs]
        self._r_rbc = float(np.median(ds)) / 2.0 if ds else _R_RBC

    # ------------------------------------------------------------------ geometry
    @property
    def bounds_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the smear in stage µm."""
        return (0.0, 0.0, float(self.cfg.slide_width_um), float(self.cfg.slide_height_um))

    @property
    def n_chunks(self) -> tuple[int, int]:
        c = self.cfg.chunk_um
        return math.ceil(self.cfg.slide_width_um / c), math.ceil(self.cfg.slide_height_um / c)

    def _in_slide(self, ci: int, cj: int) -> bool:
        nx, ny = self.n_chunks
        return 0 <= ci < nx and 0 <= cj < ny

    # ------------------------------------------------------------------ layout
    def _cache_put(self, cache: OrderedDict[tuple[int, int], _Chunk], key: tuple[int, int], val: _Chunk) -> None:
        cache[key] = val
        while len(cache) > 8192:
            cache.popitem(last=False)

    def _raw_candidates(self, ci: int, cj: int) -> _Chunk:
        """White cells and platelets of a chunk before collisions are resolved (independent per chunk)."""
        hit = self._raw.get((ci, cj))
        if hit is not None:
            return hit
        cfg = self.cfg
        c = cfg.chunk_um
        rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 1, ci, cj])
        area_mm2 = (c / 1000.0) ** 2
        nw = int(rng.poisson(cfg.wbc_per_mm2 * area_mm2))
        npl = int(rng.poisson(cfg.platelets_per_mm2 * area_mm2))
        n = nw + npl
        x = ci * c + rng.random(n) * c
        y = cj * c + rng.random(n) * c
        kind = np.concatenate([np.full(nw, 1, np.uint8), np.full(npl, 2, np.uint8)])
        abnormal = np.zeros(n, dtype=bool)
        abnormal[:nw] = rng.random(nw) < cfg.abnormal_fraction
        label = np.full(n, self._label_idx[PLATELET_LABEL], dtype=np.int16)
        pick_n = rng.random(nw)
        pick_a = rng.integers(0, 1 << 30, nw)
        for k in range(nw):
            if abnormal[k] and self._abn_labels.size:
                label[k] = self._abn_labels[pick_a[k] % self._abn_labels.size]
            elif self._normal_labels.size:
                label[k] = self._normal_labels[
                    min(int(np.searchsorted(np.cumsum(self._normal_p), pick_n[k])), self._normal_labels.size - 1)
                ]
            else:  # only abnormal classes available
                label[k] = self._abn_labels[pick_a[k] % self._abn_labels.size]
                abnormal[k] = True
        sprite = rng.integers(0, 1 << 40, n)
        orient = rng.integers(0, 8, n).astype(np.uint8)
        ch = _Chunk(x, y, kind, label, sprite, orient, abnormal, np.arange(n), ci, cj)
        self._cache_put(self._raw, (ci, cj), ch)
        return ch

    def _kept_cells(self, ci: int, cj: int) -> _Chunk:
        """White cells and platelets of a chunk that do not collide with an earlier candidate."""
        hit = self._kept.get((ci, cj))
        if hit is not None:
            return hit
        own = self._raw_candidates(ci, cj)
        x0, y0, x1, y1 = self.bounds_um
        keep = (own.x >= x0) & (own.x < x1) & (own.y >= y0) & (own.y < y1)
        rad = np.where(own.kind == 1, _R_WBC, _R_PLT)
        # earlier = neighbour chunks ordered before this one, plus lower indices in this chunk
        others: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for dj in (-1, 0, 1):
            for di in (-1, 0, 1):
                if (cj + dj, ci + di) < (cj, ci) and self._in_slide(ci + di, cj + dj):
                    nb = self._raw_candidates(ci + di, cj + dj)
                    others.append((nb.x, nb.y, np.where(nb.kind == 1, _R_WBC, _R_PLT)))
        ox = np.concatenate([o[0] for o in others]) if others else np.zeros(0)
        oy = np.concatenate([o[1] for o in others]) if others else np.zeros(0)
        orad = np.concatenate([o[2] for o in others]) if others else np.zeros(0)
        for k in range(len(own)):
            if not keep[k]:
                continue
            gap = 1.0
            if ox.size and np.any(np.hypot(ox - own.x[k], oy - own.y[k]) < orad + rad[k] + gap):
                keep[k] = False
                continue
            if k and np.any(np.hypot(own.x[:k] - own.x[k], own.y[:k] - own.y[k]) < rad[:k] + rad[k] + gap):
                keep[k] = False
        idx = np.flatnonzero(keep)
        ch = _Chunk(
            own.x[idx], own.y[idx], own.kind[idx], own.label[idx], own.sprite[idx], own.orient[idx],
            own.abnormal[idx], own.local[idx], ci, cj,
        )  # fmt: skip
        self._cache_put(self._kept, (ci, cj), ch)
        return ch

    def _chunk(self, ci: int, cj: int) -> _Chunk:
        """Every cell of a chunk: red cells on a jittered hexagonal lattice around the kept white cells."""
        hit = self._full.get((ci, cj))
        if hit is not None:
            return hit
        cfg = self.cfg
        c = cfg.chunk_um
        wb = self._kept_cells(ci, cj)
        n_rbc_pool = len(self.bank.rbcs)
        if cfg.rbc_coverage > 0 and n_rbc_pool:
            rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 2, ci, cj])
            s = 2.0 * self._r_rbc * 1.02
            dy = s * math.sqrt(3.0) / 2.0
            r_lo, r_hi = math.ceil(cj * c / dy - 0.5), math.ceil((cj + 1) * c / dy - 0.5)
            rows = np.arange(r_lo, r_hi)
            ly = (rows + 0.5) * dy
            q_lo, q_hi = math.floor(ci * c / s) - 1, math.ceil((ci + 1) * c / s) + 1
            qs = np.arange(q_lo, q_hi)
            gx = (qs[None, :] + 0.5 + 0.5 * (rows[:, None] % 2)) * s
            gy = np.broadcast_to(ly[:, None], gx.shape)
            gx, gy = gx.ravel(), gy.ravel()
            inside = (gx >= ci * c) & (gx < (ci + 1) * c) & (gy >= cj * c) & (gy < (cj + 1) * c)
            gx, gy = gx[inside], gy[inside]
            n = gx.size
            jit = rng.uniform(-0.22, 0.22, (2, n)) * s
            rx, ry = gx + jit[0], gy + jit[1]
            dens = cfg.rbc_coverage * (1.0 + 0.35 * self._density_field(rx, ry))
            keep = rng.random(n) < np.clip(dens, 0.0, 0.9) / 0.9069
            spr = rng.integers(0, 1 << 40, n)
            ori = rng.integers(0, 8, n).astype(np.uint8)
            x0, y0, x1, y1 = self.bounds_um
            keep &= (rx >= x0) & (rx < x1) & (ry >= y0) & (ry < y1)
            # keep red cells off white cells and platelets (also those of neighbouring chunks)
            nbs = [
                self._kept_cells(ci + di, cj + dj)
                for dj in (-1, 0, 1)
                for di in (-1, 0, 1)
                if self._in_slide(ci + di, cj + dj)
            ]
            ox = np.concatenate([nb.x for nb in nbs])
            if ox.size:
                oy = np.concatenate([nb.y for nb in nbs])
                lim = self._r_rbc + np.where(np.concatenate([nb.kind for nb in nbs]) == 1, _R_WBC, _R_PLT) + 0.3
                d = np.hypot(rx[:, None] - ox[None, :], ry[:, None] - oy[None, :])
                keep &= np.all(d >= lim[None, :], axis=1)
            idx = np.flatnonzero(keep)
            nr = idx.size
            ch = _Chunk(
                np.concatenate([rx[idx], wb.x]),
                np.concatenate([ry[idx], wb.y]),
                np.concatenate([np.zeros(nr, np.uint8), wb.kind]),
                np.concatenate([np.full(nr, self._label_idx[RBC_LABEL], np.int16), wb.label]),
                np.concatenate([spr[idx] % n_rbc_pool, wb.sprite]),
                np.concatenate([ori[idx], wb.orient]),
                np.concatenate([np.zeros(nr, bool), wb.abnormal]),
                np.concatenate([idx, wb.local]),
                ci,
                cj,
            )
        else:
            ch = wb
        self._cache_put(self._full, (ci, cj), ch)
        return ch

    def _density_field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Thicker and thinner areas of the smear: smooth noise sampled at scattered points."""
        sp = 400.0
        ix, iy = np.floor(x / sp), np.floor(y / sp)
        tx, ty = x / sp - ix, y / sp - iy
        tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
        seed = self.cfg.seed

        def v(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return _hash_unit(seed, 3, a, b)

        top = v(ix, iy) * (1 - tx) + v(ix + 1, iy) * tx
        bot = v(ix, iy + 1) * (1 - tx) + v(ix + 1, iy + 1) * tx
        return np.asarray(top * (1 - ty) + bot * ty)

    def _chunks_over(self, x0: float, y0: float, x1: float, y1: float) -> Iterable[_Chunk]:
        c = self.cfg.chunk_um
        nx, ny = self.n_chunks
        i0, i1 = max(0, math.floor(x0 / c)), min(nx - 1, math.floor(x1 / c))
        j0, j1 = max(0, math.floor(y0 / c)), min(ny - 1, math.floor(y1 / c))
        for cj in range(j0, j1 + 1):
            for ci in range(i0, i1 + 1):
                yield self._chunk(ci, cj)

    # ------------------------------------------------------------------ truth
    def _planted(self, ch: _Chunk, k: int) -> PlantedCell:
        kind = int(ch.kind[k])
        label = self.labels[int(ch.label[k])]
        if kind == 0:
            sp = self.bank.rbcs[int(ch.sprite[k])]
        else:
            sp = self.bank.wbc(label, int(ch.sprite[k] % len(self.bank.pool(label))))
        return PlantedCell(
            cell_id=ch.cell_id(k),
            label=label,
            kind=_KIND_NAMES[kind],
            abnormal=bool(ch.abnormal[k]),
            x_um=float(ch.x[k]),
            y_um=float(ch.y[k]),
            diameter_um=round(sp.diameter_um, 3),
            source=sp.source,
        )

    def ground_truth(
        self,
        region: tuple[float, float, float, float] | None = None,
        kinds: Iterable[str] | None = None,
    ) -> list[PlantedCell]:
        """Every planted cell (centre inside ``region`` = (x0, y0, x1, y1) µm, default the whole slide).

        ``kinds`` limits the answer, e.g. ``("WBC",)``; asking only for white cells and platelets is
        much faster than asking for the ~10^5 red cells of a whole slide.
        """
        names = list(kinds) if kinds is not None else list(_KIND_CODES)
        unknown = set(names) - set(_KIND_CODES)
        if unknown:
            raise SlideError(f"unknown cell kinds {sorted(unknown)}; use {sorted(_KIND_CODES)}")
        want = {_KIND_CODES[k] for k in names}
        x0, y0, x1, y1 = region if region is not None else self.bounds_um
        out: list[PlantedCell] = []
        with self._lock:
            c = self.cfg.chunk_um
            nx, ny = self.n_chunks
            for cj in range(max(0, math.floor(y0 / c)), min(ny - 1, math.floor(y1 / c)) + 1):
                for ci in range(max(0, math.floor(x0 / c)), min(nx - 1, math.floor(x1 / c)) + 1):
                    ch = self._chunk(ci, cj) if 0 in want else self._kept_cells(ci, cj)
                    sel = (ch.x >= x0) & (ch.x < x1) & (ch.y >= y0) & (ch.y < y1) & np.isin(ch.kind, list(want))
                    out.extend(self._planted(ch, int(k)) for k in np.flatnonzero(sel))
        return out

    # ------------------------------------------------------------------ rendering
    def _field_cells(
        self, x_left: float, y_top: float, w: int, h: int, ps: float
    ) -> list[tuple[_Chunk, np.ndarray, np.ndarray, np.ndarray]]:
        """(chunk, indices, centre rows, centre cols) of the cells that can draw into the field."""
        m = _MAX_SPRITE_RADIUS_UM
        x_right, y_bottom = x_left + w * ps, y_top + h * ps
        found = []
        for ch in self._chunks_over(x_left - m, y_top - m, x_right + m, y_bottom + m):
            sel = np.flatnonzero(
                (ch.x > x_left - m) & (ch.x < x_right + m) & (ch.y > y_top - m) & (ch.y < y_bottom + m)
            )
            if sel.size:
                # the pixel whose centre is nearest the cell centre
                cols = np.floor((ch.x[sel] - x_left) / ps).astype(np.int64)
                rows = np.floor((ch.y[sel] - y_top) / ps).astype(np.int64)
                found.append((ch, sel, rows, cols))
        return found

    def _sprite_for(self, ch: _Chunk, k: int, ps: float) -> _Scaled:
        kind = int(ch.kind[k])
        if kind == 0:
            return self.bank.scaled(0, RBC_LABEL, int(ch.sprite[k]), ps)
        label = self.labels[int(ch.label[k])]
        return self.bank.scaled(kind, label, int(ch.sprite[k] % len(self.bank.pool(label))), ps)

    def _transmission(
        self, x_left: float, y_top: float, w: int, h: int, ps: float, field: np.ndarray | None = None
    ) -> np.ndarray:
        """Multiply every cell's transmission into ``field`` (default ones: the fraction of light let through)."""
        if field is None:
            field = np.ones((h, w, 3), dtype=np.float32)
        rbc = self.bank.rbc_scaled(ps)  # red cells are most cells: index their sprites directly
        for ch, sel, rows, cols in self._field_cells(x_left, y_top, w, h, ps):
            kinds, sprites, orients = ch.kind[sel].tolist(), ch.sprite[sel].tolist(), ch.orient[sel].tolist()
            for i, (k, r, c) in enumerate(zip(sel.tolist(), rows.tolist(), cols.tolist(), strict=True)):
                sc = rbc[sprites[i]] if kinds[i] == 0 else self._sprite_for(ch, k, ps)
                keep = sc.keeps[orients[i]]
                r0, c0 = r - sc.half, c - sc.half
                n = keep.shape[0]
                if r0 >= 0 and c0 >= 0 and r0 + n <= h and c0 + n <= w:
                    field[r0 : r0 + n, c0 : c0 + n] *= keep
                else:
                    _multiply_into(field, keep, r0, c0)
        return field

    def _check_field(self, width_px: int, height_px: int, pixel_size_um: float, *xs: float) -> None:
        if int(width_px) < 1 or int(height_px) < 1:
            raise SlideError(f"field size must be at least 1x1 px, got {width_px}x{height_px}")
        if int(width_px) * int(height_px) > 8192 * 8192:
            raise SlideError(f"field of {width_px}x{height_px} px is too large to render at once")
        if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise SlideError(f"pixel_size_um must be > 0, got {pixel_size_um}")
        if not all(math.isfinite(v) for v in xs):
            raise SlideError(f"field position and focus offset must be finite, got {xs}")

    def _field_geometry(
        self, x_um: float, y_um: float, width_px: int, height_px: int, pixel_size_um: float, *more: float
    ) -> tuple[int, int, float, float, float]:
        """Check a field centred at (x_um, y_um) (and ``more`` values that must be finite).

        Returns ``(w, h, ps, x_left, y_top)``: its size in pixels, the pixel size and its top-left corner in µm.
        """
        self._check_field(width_px, height_px, pixel_size_um, x_um, y_um, *more)
        w, h, ps = int(width_px), int(height_px), float(pixel_size_um)
        return w, h, ps, x_um - (w / 2.0) * ps, y_um - (h / 2.0) * ps

    def blur_sigma_um(self, z_offset_um: float, numerical_aperture: float = 0.5) -> float:
        """Defocus blur (Gaussian sigma, µm) at ``z_offset_um`` from best focus."""
        return self.cfg.defocus_blur_um_per_um * abs(z_offset_um) * (numerical_aperture / 0.5)

    def render_float(
        self,
        x_um: float,
        y_um: float,
        width_px: int,
        height_px: int,
        pixel_size_um: float,
        z_offset_um: float = 0.0,
        numerical_aperture: float = 0.5,
    ) -> np.ndarray:
        """The noise-free field centred at (x_um, y_um) as float32 (H, W, 3) in camera DN at ``exposure_ms``."""
        w, h, ps, x_left, y_top = self._field_geometry(x_um, y_um, width_px, height_px, pixel_size_um, z_offset_um)
        sigma_px = self.blur_sigma_um(z_offset_um, numerical_aperture) / ps
        m = math.ceil(3.0 * sigma_px) + 1 if sigma_px > 0.2 else 0
        xs = x_left + (np.arange(w) + 0.5) * ps
        ys = y_top + (np.arange(h) + 0.5) * ps
        illum = (1.0 + 0.02 * lattice_field(self.cfg.seed, 11, xs, ys, 300.0)).astype(np.float32)
        # the empty-glass image; as (H, 3W) rows so numpy's inner loops run long (3x faster than broadcasting)
        light = (np.repeat(illum, 3, axis=1) * np.tile(self._bg, w)).reshape(h, w, 3)
        with self._lock:
            if not m:  # multiply the cells straight into the glass image
                return self._transmission(x_left, y_top, w, h, ps, light)
            field = self._transmission(x_left - m * ps, y_top - m * ps, w + 2 * m, h + 2 * m, ps)
        field = ndi.gaussian_filter(field, (sigma_px, sigma_px, 0), mode="nearest", truncate=3.0)[m : m + h, m : m + w]
        field *= light
        return field

    def render(
        self,
        x_um: float,
        y_um: float,
        width_px: int,
        height_px: int,
        pixel_size_um: float,
        z_offset_um: float = 0.0,
        numerical_aperture: float = 0.5,
    ) -> np.ndarray:
        """The noise-free field CENTRED at (x_um, y_um): (H, W, 3) uint8; stage x -> columns, y -> rows.

        ``z_offset_um`` is the distance from best focus (blurs the field); ``numerical_aperture``
        scales that blur (a higher-NA objective has a shallower depth of field).
        """
        f = self.render_float(x_um, y_um, width_px, height_px, pixel_size_um, z_offset_um, numerical_aperture)
        return to_uint8(f)

    def render_labels(
        self, x_um: float, y_um: float, width_px: int, height_px: int, pixel_size_um: float
    ) -> tuple[np.ndarray, list[PlantedCell]]:
        """Ground-truth masks of a field: (H, W) int32 where value ``i + 1`` is ``cells[i]`` (0 = glass).

        A pixel belongs to a cell where its soft mask exceeds 0.5; white cells and platelets win over
        red cells where they overlap.
        """
        w, h, ps, x_left, y_top = self._field_geometry(x_um, y_um, width_px, height_px, pixel_size_um)
        labels = np.zeros((h, w), dtype=np.int32)
        cells: list[PlantedCell] = []
        with self._lock:
            found = self._field_cells(x_left, y_top, w, h, ps)
            for want_rbc in (True, False):
                for ch, sel, rows, cols in found:
                    for k, r, c in zip(sel.tolist(), rows.tolist(), cols.tolist(), strict=True):
                        if (int(ch.kind[k]) == 0) != want_rbc:
                            continue
                        sc = self._sprite_for(ch, k, ps)
                        mask = sc.masks[ch.orient[k]] > 0.5
                        r0, c0 = r - sc.half, c - sc.half
                        rs, cs = max(0, -r0), max(0, -c0)
                        re, ce = min(mask.shape[0], h - r0), min(mask.shape[1], w - c0)
                        if re <= rs or ce <= cs:
                            continue
                        sub = mask[rs:re, cs:ce]
                        if not sub.any():
                            continue
                        cells.append(self._planted(ch, k))
                        view = labels[r0 + rs : r0 + re, c0 + cs : c0 + ce]
                        view[sub] = len(cells)
        return labels, cells

    def cell_template(self, cell: PlantedCell | str, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """(transmission (n, n, 3), mask (n, n)) of one planted cell as it is drawn at ``pixel_size_um``.

        The cell centre is the central pixel. Useful to find a planted cell again in an acquired tile.
        """
        cid = cell.cell_id if isinstance(cell, PlantedCell) else str(cell)
        try:
            prefix, rest = cid[0], cid[1:]
            ci, cj, _ = (int(v) for v in rest.split("."))
        except ValueError as exc:
            raise SlideError(f"not a cell id of this slide: {cid!r}") from exc
        with self._lock:
            ch = self._chunk(ci, cj) if self._in_slide(ci, cj) else None
            idx = ch.find(cid) if ch is not None and prefix in _KIND_PREFIX else None
            if ch is None or idx is None:
                raise SlideError(f"no cell {cid!r} on this slide")
            sc = self._sprite_for(ch, idx, float(pixel_size_um))
            o = int(ch.orient[idx])
            return np.ascontiguousarray(sc.keeps[o]), np.ascontiguousarray(sc.masks[o])

    def describe(self) -> dict[str, Any]:
        """A short JSON-able summary: source, sizes and the numbers of sprites available."""
        return {
            "source": "packaged sample" if self.sources.packaged else str(self.sources.root),
            "bounds_um": list(self.bounds_um),
            "seed": self.cfg.seed,
            "rbc_sprites": len(self.bank.rbcs),
            "rbc_median_diameter_um": round(2.0 * self._r_rbc, 2),
            "pbc_images": {k: len(v) for k, v in sorted(self.sources.pbc.items())},
        }


def to_uint8(field: np.ndarray) -> np.ndarray:
    """Round a non-negative float field to uint8, saturating at 255 (modifies ``field``)."""
    field += 0.5
    np.minimum(field, 255.0, out=field)
    return field.astype(np.uint8)


def _orient(a: np.ndarray, o: int) -> np.ndarray:
    """One of the 8 dihedral orientations of a square sprite (a view, no copy)."""
    v = np.rot90(a, o % 4)
    return v[:, ::-1] if o >= 4 else v


def _multiply_into(dst: np.ndarray, src: np.ndarray, r0: int, c0: int) -> None:
    """dst[r0:, c0:] *= src, clipped to dst."""
    h, w = dst.shape[:2]
    sh, sw = src.shape[:2]
    rs, cs = max(0, -r0), max(0, -c0)
    re, ce = min(sh, h - r0), min(sw, w - c0)
    if re <= rs or ce <= cs:
        return
    dst[r0 + rs : r0 + re, c0 + cs : c0 + ce] *= src[rs:re, cs:ce]
