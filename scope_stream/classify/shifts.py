"""Controlled, seeded re-rendering of single-cell crops as if another lab's microscope had taken them.

Each shift maps one raw crop (``uint8``, ``(H, W, 3)``) and a :class:`numpy.random.Generator` to a new
``uint8`` RGB crop. Shifts are small frozen dataclasses (or functions) registered by name in
:data:`SHIFTS`; :func:`apply_shift` re-renders a batch with one generator per crop, derived from the
seed, the shift's name and the crop's index, so a run is reproducible and crops are independent.

The shifts and what they stand for:

* ``scale_0.6`` .. ``scale_1.6``: another magnification or camera pixel size; the cell appears that
  many times larger, the crop keeps its size (zoom in: crop the centre and upsample; zoom out:
  downsample and pad with the crop's own background, lightly noised, with a feathered seam).
* ``tight``: another detector's framing: a box tightly around the cell (+5% margin), resized to a
  random 100-300 px, so the output size varies.
* ``stain_hed``: stain-intensity variation, as in HED colour augmentation (Tellez et al. 2018):
  per-crop scale ``1 +- 0.3`` and shift ``+-0.05`` (OD units) of each haematoxylin/eosin/DAB channel.
* ``stain_bccd``: another lab's stain: optical densities decomposed on PBC's nuclear and red-cell
  stain vectors are re-composed on BCCD's (bluer, paler nuclei; orange-brown red cells) and shown on
  BCCD's grey background.
* ``illum_warm`` / ``illum_dim``: white balance (per-channel gains) and a darker exposure with gamma.
* ``blur``: defocus (Gaussian, sigma 1.5 px at 128 px, scaled with the crop size).
* ``jpeg``: JPEG quality 30 round trip.
* ``noise``: camera shot noise, Gaussian with sigma ``6 * sqrt(I / 255)`` grey levels.
* ``combo``: three of the above from different families (scale, stain, illumination, blur, noise,
  JPEG), applied in the physical order sample -> optics -> lamp -> sensor -> compression.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NONE",
    "SHIFTS",
    "Blur",
    "Combo",
    "HedJitter",
    "Illumination",
    "Jpeg",
    "Restain",
    "Scale",
    "ShiftFn",
    "ShotNoise",
    "Tight",
    "apply_shift",
    "background_colour",
    "cell_box",
]

#: A shift: (crop uint8 (H, W, 3), generator) -> new crop uint8 (H', W', 3).
ShiftFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]

#: The name :func:`apply_shift` accepts for "no shift" (copies of the crops).
NONE = "none"

# Unit optical-density stain vectors (R, G, B absorbance), measured on each data set (see segment/stain.py).
PBC_NUCLEUS = (0.50, 0.84, 0.22)
PBC_RBC = (0.49, 0.72, 0.50)
BCCD_NUCLEUS = (0.49, 0.87, 0.08)
BCCD_RBC = (0.35, 0.64, 0.69)
#: BCCD's background between cells (median of the brightest 15% of pixels of its fields)
BCCD_BACKGROUND = (206.0, 208.0, 205.0)


def _check(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"a crop must be a uint8 (H, W, 3) array, got shape {shape} dtype {dtype}")
    if img.shape[0] < 8 or img.shape[1] < 8:
        raise ValueError(f"crop of {img.shape[0]}x{img.shape[1]} px is too small to re-render")
    return img


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(np.rint(x), 0, 255), dtype=np.uint8)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == height and img.shape[1] == width:
        return img.copy()
    im = Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8).copy()


def background_colour(img: np.ndarray, border: int = 4) -> np.ndarray:
    """Background RGB (float, 3) of a crop: median of the brightest quarter of its border pixels."""
    arr = _check(img).astype(np.float64)
    b = max(1, min(border, arr.shape[0] // 4, arr.shape[1] // 4))
    ring = np.concatenate(
        [arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)]
    )
    lum = ring.mean(axis=1)
    bright = ring[lum >= np.quantile(lum, 0.75)]
    return np.asarray(np.median(bright, axis=0), dtype=np.float64)


def _optical_density(img: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``-log10(I / I0)`` per channel (float, (H, W, 3)), I clipped to >= 1 and I0 to >= 1."""
    return np.asarray(-np.log10(np.maximum(img.astype(np.float64), 1.0) / np.maximum(background, 1.0)))


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Scale:
    """The cell appears ``factor`` times larger; the crop keeps its size."""

    factor: float
    pad_noise: float = 1.5  # grey levels of noise on the padding (zoom out)
    feather: int = 3  # px over which the shrunken crop blends into the padding

    def __post_init__(self) -> None:
        if not (0.1 <= self.factor <= 10):
            raise ValueError(f"scale factor must lie in 0.1..10, got {self.factor}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arr = _check(img)
        h, w = arr.shape[:2]
        if self.factor >= 1.0:  # zoom in: the central 1/factor of the crop, upsampled
            ch, cw = max(4, round(h / self.factor)), max(4, round(w / self.factor))
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            return _resize(arr[y0 : y0 + ch, x0 : x0 + cw], h, w)
        sh, sw = max(4, round(h * self.factor)), max(4, round(w * self.factor))
        small = _resize(arr, sh, sw).astype(np.float64)
        bg = background_colour(arr)
        canvas = bg[None, None, :] + rng.normal(0.0, self.pad_noise, size=(h, w, 3))
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        if self.feather > 0:
            yy = np.minimum(np.arange(sh), np.arange(sh)[::-1])[:, None]
            xx = np.minimum(np.arange(sw), np.arange(sw)[::-1])[None, :]
            alpha = np.clip((np.minimum(yy, xx) + 1) / (self.feather + 1), 0.0, 1.0)[:, :, None]
        else:
            alpha = np.ones((sh, sw, 1))
        region = canvas[y0 : y0 + sh, x0 : x0 + sw]
        canvas[y0 : y0 + sh, x0 : x0 + sw] = alpha * small + (1 - alpha) * region
        return _to_uint8(canvas)


def cell_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """Rough box ``(y0, x0, y1, x1)`` (exclusive ends) of the cell at the centre of a crop.

    The most stained blob (summed optical density above the upper of two multi-Otsu thresholds) at or
    nearest the centre is the nucleus (or the platelet); the cell is the stained region (above the
    lower threshold) connected to it, kept within 1.6x the nucleus' extent of its centroid so that
    touching red cells are not taken along. Falls back to the central 60% when nothing stands out.
    """
    from scipy import ndimage
    from skimage.filters import threshold_multiotsu

    multiotsu: Callable[..., np.ndarray] = threshold_multiotsu  # skimage is untyped
    arr = _check(img)
    h, w = arr.shape[:2]
    fallback = (round(0.2 * h), round(0.2 * w), round(0.8 * h), round(0.8 * w))
    od = _optical_density(arr, background_colour(arr)).clip(0, None).sum(axis=2)
    if float(od.max() - od.min()) < 0.1:
        return fallback
    try:
        low, high = (float(t) for t in multiotsu(od, classes=3))
    except ValueError:
        return fallback
    # closing merges a segmented nucleus' lobes into one blob
    dark, n = ndimage.label(ndimage.binary_closing(ndimage.binary_opening(od > high), iterations=3))
    if n == 0:
        return fallback
    sizes = np.asarray(ndimage.sum(np.ones_like(od), dark, index=np.arange(1, n + 1)))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(od), dark, index=np.arange(1, n + 1)))
    dist = np.hypot(centroids[:, 0] - cy, centroids[:, 1] - cx)
    big = sizes >= max(6.0, 0.002 * h * w)
    at_centre = dark[int(cy), int(cx)]
    if at_centre > 0 and big[at_centre - 1]:
        k = int(at_centre)
    elif big.any():
        k = int(np.flatnonzero(big)[np.argmin(dist[big])]) + 1
    else:
        return fallback
    nucleus = dark == k
    ys, xs = np.nonzero(nucleus)
    ny, nx = ys.mean(), xs.mean()
    reach = 1.6 * max(np.hypot(ys - ny, xs - nx).max(), 2.0) + 3.0
    yy, xx = np.mgrid[0:h, 0:w]
    near = np.hypot(yy - ny, xx - nx) <= reach
    stained, _ = ndimage.label(ndimage.binary_closing((od > low) & near, iterations=1) | nucleus)
    cell = stained == stained[ys[0], xs[0]]
    ys, xs = np.nonzero(cell)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


@dataclass(frozen=True)
class Tight:
    """A tight square box around the cell (``margin`` of its size on each side), resized to a random
    ``min_size``..``max_size`` px: the framing of another lab's detector; the output size varies."""

    margin: float = 0.05
    min_size: int = 100
    max_size: int = 300

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arr = _check(img)
        h, w = arr.shape[:2]
        y0, x0, y1, x1 = cell_box(arr)
        side = max(y1 - y0, x1 - x0)
        side = min(max(8, round(side * (1 + 2 * self.margin))), h, w)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        top = int(np.clip(round(cy - side / 2), 0, h - side))
        left = int(np.clip(round(cx - side / 2), 0, w - side))
        size = int(rng.integers(self.min_size, self.max_size + 1))
        return _resize(arr[top : top + side, left : left + side], size, size)


# ---------------------------------------------------------------------------------------------- stain
@dataclass(frozen=True)
class HedJitter:
    """HED stain augmentation (Tellez et al. 2018): the optical density is decomposed on skimage's
    haematoxylin/eosin/DAB vectors, each stain scaled by ``U(1 - scale, 1 + scale)`` and shifted by
    ``U(-shift, shift)``, drawn per crop from the generator, and re-composed.

    ``shift`` is in optical density (log10) units. skimage's ``rgb2hed`` units are 6x larger (it divides
    the natural-log OD by ln 1e6), and a shift of 0.05 there tints the white background by up to 50%
    (yellow, red or green crops); its ``rgb2hed`` also clips negative stains, which alone changes PBC
    crops by ~9 grey levels, so the decomposition is done here without clipping (identity when
    ``alpha = 1, beta = 0``).
    """

    scale: float = 0.3
    shift: float = 0.05

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from skimage.color import hed_from_rgb, rgb_from_hed

        arr = _check(img)
        alpha = rng.uniform(1 - self.scale, 1 + self.scale, 3)
        beta = rng.uniform(-self.shift, self.shift, 3)
        od = -np.log10(np.maximum(arr.astype(np.float64), 1.0) / 255.0)
        hed = od.reshape(-1, 3) @ np.asarray(hed_from_rgb)
        new_od = (hed * alpha + beta) @ np.asarray(rgb_from_hed)
        return _to_uint8(255.0 * np.power(10.0, -new_od).reshape(arr.shape))


def _basis(first: Sequence[float], second: Sequence[float]) -> np.ndarray:
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    c = np.cross(a, b)
    return np.stack([a, b, c / np.linalg.norm(c)])


@dataclass(frozen=True)
class Restain:
    """Re-stain in optical density: concentrations on the ``source`` stain vectors (nucleus, red cell,
    residual) re-composed on the ``target`` vectors, the nuclear one times ``nucleus_gain``, shown on the
    ``background`` colour. ``jitter``: per-crop relative spread of the two concentrations' gains."""

    source_nucleus: tuple[float, float, float] = PBC_NUCLEUS
    source_rbc: tuple[float, float, float] = PBC_RBC
    target_nucleus: tuple[float, float, float] = BCCD_NUCLEUS
    target_rbc: tuple[float, float, float] = BCCD_RBC
    nucleus_gain: float = 0.55
    rbc_gain: float = 1.0
    background: tuple[float, float, float] = BCCD_BACKGROUND
    jitter: float = 0.05

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arr = _check(img)
        od = _optical_density(arr, background_colour(arr))
        src = _basis(self.source_nucleus, self.source_rbc)
        dst = _basis(self.target_nucleus, self.target_rbc)
        conc = od.reshape(-1, 3) @ np.linalg.inv(src)
        gains = np.array([self.nucleus_gain, self.rbc_gain, 1.0]) * rng.uniform(1 - self.jitter, 1 + self.jitter, 3)
        new_od = (conc * gains) @ dst
        out = np.asarray(self.background, dtype=np.float64) * np.power(10.0, -new_od)
        return _to_uint8(out.reshape(arr.shape))


# ---------------------------------------------------------------------------------------------- illumination
@dataclass(frozen=True)
class Illumination:
    """``255 * gains * (I / 255) ** gamma``: white balance (per-channel gains) and exposure/gamma."""

    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arr = _check(img).astype(np.float64) / 255.0
        out = 255.0 * np.asarray(self.gains, dtype=np.float64) * np.power(arr, self.gamma)
        return _to_uint8(out)


# ---------------------------------------------------------------------------------------------- optics, sensor
@dataclass(frozen=True)
class Blur:
    """Gaussian defocus of ``sigma`` px at a ``reference``-px crop (scaled with the crop's size)."""

    sigma: float = 1.5
    reference: int = 128

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        arr = _check(img)
        s = self.sigma * min(arr.shape[:2]) / self.reference
        return _to_uint8(gaussian_filter(arr.astype(np.float64), sigma=(s, s, 0), mode="reflect"))


@dataclass(frozen=True)
class Jpeg:
    """A JPEG round trip at ``quality`` (PIL, 4:2:0 chroma subsampling)."""

    quality: int = 30

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(_check(img)).save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class ShotNoise:
    """Camera noise: Gaussian with sigma ``at_white * sqrt(I / 255)`` grey levels (shot noise) plus ``read``."""

    at_white: float = 6.0
    read: float = 0.5

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arr = _check(img).astype(np.float64)
        sigma = np.sqrt(self.at_white**2 * arr / 255.0 + self.read**2)
        return _to_uint8(arr + rng.normal(0.0, 1.0, arr.shape) * sigma)


# ---------------------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, dict[str, ShiftFn]] = {
    "stain": {"stain_hed": HedJitter(), "stain_bccd": Restain()},
    "scale": {f"scale_{f}": Scale(f) for f in (0.6, 0.8, 1.25, 1.6)},
    "blur": {"blur": Blur()},
    "illum": {
        "illum_warm": Illumination(gains=(1.0, 0.93, 0.78)),
        "illum_dim": Illumination(gains=(0.7, 0.7, 0.7), gamma=1.15),
    },
    "noise": {"noise": ShotNoise()},
    "jpeg": {"jpeg": Jpeg()},
}


@dataclass(frozen=True)
class Combo:
    """``k`` shifts from ``k`` different families (one random member each), in the families' physical
    order (stain, scale, blur, illumination, noise, JPEG); drawn per crop."""

    k: int = 3

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        order = list(_FAMILIES)
        picked = sorted(rng.choice(len(order), size=self.k, replace=False).tolist())
        out = _check(img)
        for i in picked:
            members = list(_FAMILIES[order[i]].values())
            out = members[int(rng.integers(len(members)))](out, rng)
        return out


SHIFTS: dict[str, ShiftFn] = {
    **{name: fn for fam in ("scale", "stain", "illum") for name, fn in _FAMILIES[fam].items()},
    "tight": Tight(),
    "blur": Blur(),
    "jpeg": Jpeg(),
    "noise": ShotNoise(),
    "combo": Combo(),
}


def apply_shift(name: str, crops: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Re-render every crop with shift ``name`` (or copy them for :data:`NONE`).

    Crop ``i`` gets its own generator seeded by ``(seed, crc32(name), i)``: the result depends only on
    the seed, the shift and the crop, not on the batch. Outputs may differ in size (``tight``).
    """
    if name == NONE:
        return [_check(c).copy() for c in crops]
    if name not in SHIFTS:
        raise KeyError(f"unknown shift {name!r}; known: {', '.join([NONE, *SHIFTS])}")
    fn = SHIFTS[name]
    tag = zlib.crc32(name.encode("utf-8"))
    return [fn(_check(c), np.random.default_rng([seed, tag, i])) for i, c in enumerate(crops)]
