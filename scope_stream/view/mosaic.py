"""The live mosaic: survey tiles pasted, downsampled, into one canvas placed in stage µm.

Why one canvas and not one napari layer per tile: a slide has thousands of tiles and napari
redraws, hit-tests and lists every layer, so a layer per tile slows the viewer down long before
the scan ends. One (optionally multiscale) canvas updated in place costs one texture upload per
refresh whatever the number of tiles; full-resolution images stay in the store and re-images,
which are few, get layers of their own.

Coordinates. napari data coordinates are ``(row, col) = (y_um, x_um)``: a layer with
``scale=(s, s)`` and ``translate=(ty, tx)`` puts the *centre* of its pixel ``(i, j)`` at stage
``(ty + i*s, tx + j*s)``. A tile's ``(x_um, y_um)`` is the stage position of the *centre* of the
frame (:class:`scope_stream.vocabulary.Tile`), so its top-left pixel corner sits at
``(y_um - H*p/2, x_um - W*p/2)`` for pixel size ``p``.

Everything here is plain numpy: no Qt, no napari.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MosaicCanvas",
    "MosaicError",
    "PasteResult",
    "block_mean",
    "downsample_to_scale",
    "resize_to",
    "tile_corner_um",
    "tile_translate_um",
    "to_display",
]


class MosaicError(ValueError):
    """A tile that cannot be placed on the mosaic (bad shape, scale or position)."""


def tile_corner_um(x_um: float, y_um: float, height: int, width: int, pixel_size_um: float) -> tuple[float, float]:
    """Stage ``(y, x)`` of the top-left *corner* of a frame centred on ``(x_um, y_um)``."""
    return y_um - height * pixel_size_um / 2.0, x_um - width * pixel_size_um / 2.0


def tile_translate_um(x_um: float, y_um: float, height: int, width: int, pixel_size_um: float) -> tuple[float, float]:
    """napari ``translate`` (y, x) of a full-resolution tile layer: the centre of its pixel (0, 0).

    Equals :meth:`Tile.px_to_stage(0, 0) <scope_stream.vocabulary.Tile.px_to_stage>` swapped to (y, x),
    and the NGFF ``translation`` the store writes for each tile.
    """
    y0, x0 = tile_corner_um(x_um, y_um, height, width, pixel_size_um)
    return y0 + pixel_size_um / 2.0, x0 + pixel_size_um / 2.0


def to_display(pixels: np.ndarray, channels: int) -> np.ndarray:
    """``pixels`` as ``(H, W)`` when ``channels == 1`` or ``(H, W, 3)`` when ``channels == 3``.

    Accepts ``(H, W)``, ``(H, W, 1|3|4)`` (alpha dropped) and channel-first ``(1|3|4, H, W)`` as the
    store keeps tiles (``(C, H, W)``): a first axis of at most 4 with larger spatial axes is read as C.
    """
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise MosaicError(f"cannot display pixels of shape {tuple(np.shape(pixels))}: need (H, W) or (H, W, 3)")
    if channels == 1 and a.ndim == 3:
        a = a.mean(axis=2).astype(a.dtype)
    elif channels == 3 and a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif channels not in (1, 3):
        raise MosaicError(f"channels must be 1 or 3, got {channels}")
    return a


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks of the first two axes (edges padded by replication)."""
    if factor <= 1:
        return a
    h, w = a.shape[:2]
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        pad = [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pad, mode="edge")
    hh, ww = a.shape[0] // factor, a.shape[1] // factor
    shaped = a.reshape(hh, factor, ww, factor, *a.shape[2:])
    out = shaped.mean(axis=(1, 3), dtype=np.float32)
    return _cast_like(out, a.dtype)


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _footprint(height: int, width: int, pixel_size_um: float, scale_um: float) -> tuple[int, int]:
    """Size in canvas pixels of a ``height x width`` tile of pixel size ``pixel_size_um``."""
    f = scale_um / pixel_size_um
    return max(1, round(height / f)), max(1, round(width / f))


def resize_to(pixels: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Resample an ``(H, W[, 3])`` image to ``target`` (rows, cols), keeping its dtype.

    An exact integer shrink uses a block mean (fast, exact area average); anything else uses
    scikit-image's resize, anti-aliased when shrinking.
    """
    h, w = pixels.shape[:2]
    if (h, w) == tuple(target):
        return pixels
    if h % target[0] == 0 and w % target[1] == 0 and h // target[0] == w // target[1]:
        return block_mean(pixels, h // target[0])
    from skimage.transform import resize

    out = resize(
        pixels,
        tuple(target) + tuple(pixels.shape[2:]),
        order=1,
        anti_aliasing=target[0] < h,
        preserve_range=True,
    )
    return _cast_like(np.asarray(out), pixels.dtype)


def downsample_to_scale(pixels: np.ndarray, pixel_size_um: float, scale_um: float) -> np.ndarray:
    """Resample an ``(H, W[, 3])`` image from ``pixel_size_um`` to ``scale_um`` µm per pixel.

    The result has the footprint :class:`MosaicCanvas` gives the tile: ``round(H * p / s)`` rows.
    """
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0 and math.isfinite(scale_um) and scale_um > 0):
        raise MosaicError(f"pixel sizes must be finite and > 0, got tile {pixel_size_um} and canvas {scale_um}")
    h, w = pixels.shape[:2]
    return resize_to(pixels, _footprint(h, w, pixel_size_um, scale_um))


@dataclass(frozen=True)
class PasteResult:
    """What changed on the canvas: the level-0 region written and whether the canvas was reallocated.

    When ``reallocated`` is true the arrays, ``translate_um`` and possibly ``scale_um`` changed and a
    view must take the new arrays; otherwise refreshing the existing ones is enough.
    """

    rows: slice
    cols: slice
    reallocated: bool


class MosaicCanvas:
    """A downsampled canvas of the survey scan in stage coordinates, grown and coarsened as needed.

    Parameters
    ----------
    scale_um:
        µm per canvas pixel (e.g. tile pixel size x 4).
    channels:
        1 (grayscale canvas, ``(Y, X)``) or 3 (RGB, ``(Y, X, 3)``).
    dtype:
        canvas dtype (``uint8`` for RGB smears).
    n_levels:
        pyramid levels kept up to date (level k is level 0 downsampled by ``2**k``); napari shows
        them as a multiscale layer so a huge slide stays light.
    bounds_um:
        ``(x0, y0, x1, y1)`` stage rectangle to allocate up front (e.g. the scan region widened by
        half a tile); the canvas grows beyond it when a tile falls outside.
    max_side_px:
        the largest level-0 side; a canvas that would be larger is coarsened by 2 (``scale_um``
        doubles) so memory stays bounded however far the stage travels.
    """

    def __init__(
        self,
        scale_um: float,
        *,
        channels: int = 3,
        dtype: np.dtype | str = "uint8",
        n_levels: int = 1,
        bounds_um: tuple[float, float, float, float] | None = None,
        max_side_px: int = 16384,
    ) -> None:
        if not (math.isfinite(scale_um) and scale_um > 0):
            raise MosaicError(f"scale_um must be finite and > 0, got {scale_um}")
        if channels not in (1, 3):
            raise MosaicError(f"channels must be 1 or 3, got {channels}")
        if n_levels < 1:
            raise MosaicError(f"n_levels must be >= 1, got {n_levels}")
        if max_side_px < 2 ** (n_levels - 1) * 4:
            raise MosaicError(f"max_side_px {max_side_px} is too small for {n_levels} levels")
        self.scale_um = float(scale_um)
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.n_levels = n_levels
        self.max_side_px = int(max_side_px)
        self.n_tiles = 0
        self._align = 2 ** (n_levels - 1)
        self.origin_um: tuple[float, float] = (0.0, 0.0)  # stage (y, x) of level-0 pixel (0, 0)'s corner
        self.levels: list[np.ndarray] = []
        if bounds_um is not None:
            x0, y0, x1, y1 = (float(v) for v in bounds_um)
            if not (x1 > x0 and y1 > y0):
                raise MosaicError(f"bounds_um must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bounds_um}")
            self._allocate(y0, x0, y1, x1)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, ...]:
        """Level-0 shape, ``(0, 0)`` before the first tile."""
        return self.levels[0].shape if self.levels else (0, 0)

    @property
    def empty(self) -> bool:
        return not self.levels

    @property
    def translate_um(self) -> tuple[float, float]:
        """napari ``translate`` of level 0: stage (y, x) of the centre of its pixel (0, 0)."""
        return self.origin_um[0] + self.scale_um / 2.0, self.origin_um[1] + self.scale_um / 2.0

    @property
    def extent_um(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: the stage rectangle the canvas covers (zeros when empty)."""
        if not self.levels:
            return 0.0, 0.0, 0.0, 0.0
        h, w = self.levels[0].shape[:2]
        y0, x0 = self.origin_um
        return x0, y0, x0 + w * self.scale_um, y0 + h * self.scale_um

    def stage_to_px(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Level-0 (row, col) (pixel-centre convention) of a stage point."""
        return (y_um - self.origin_um[0]) / self.scale_um - 0.5, (x_um - self.origin_um[1]) / self.scale_um - 0.5

    def level_scales(self) -> list[float]:
        return [self.scale_um * 2**k for k in range(len(self.levels))]

    # ------------------------------------------------------------------ pasting
    def prepare(self, pixels: np.ndarray, pixel_size_um: float) -> np.ndarray:
        """Convert and downsample a tile for this canvas: the costly part, to run off the GUI thread.

        Hand the result to :meth:`paste_prepared` with ``prepared_scale_um=canvas.scale_um`` as it was.
        """
        return downsample_to_scale(self._convert(pixels), pixel_size_um, self.scale_um)

    def paste(self, pixels: np.ndarray, x_um: float, y_um: float, pixel_size_um: float) -> PasteResult:
        """Paste a full-resolution tile centred on stage ``(x_um, y_um)``.

        Later tiles overwrite earlier ones where they overlap, as the stage saw them last.
        """
        img = self._convert(pixels)
        h, w = img.shape[:2]
        return self._paste(img, pixel_size_um, x_um, y_um, h, w, pixel_size_um)

    def paste_prepared(
        self,
        small: np.ndarray,
        prepared_scale_um: float,
        *,
        x_um: float,
        y_um: float,
        height: int,
        width: int,
        pixel_size_um: float,
    ) -> PasteResult:
        """Paste the output of :meth:`prepare` for a ``height x width`` tile centred on ``(x_um, y_um)``.

        If the canvas was coarsened since ``prepare`` ran, the image is resampled again here.
        """
        return self._paste(self._convert(small), prepared_scale_um, x_um, y_um, int(height), int(width), pixel_size_um)

    def _paste(
        self, img: np.ndarray, img_scale_um: float, x_um: float, y_um: float, h: int, w: int, p: float
    ) -> PasteResult:
        for name, v in (("x_um", x_um), ("y_um", y_um), ("pixel_size_um", p), ("prepared scale", img_scale_um)):
            if not math.isfinite(float(v)):
                raise MosaicError(f"{name} must be finite, got {v}")
        if p <= 0 or img_scale_um <= 0:
            raise MosaicError(f"pixel sizes must be > 0, got tile {p}, image {img_scale_um}")
        if h <= 0 or w <= 0:
            raise MosaicError(f"tile size must be > 0, got {h}x{w}")
        top, left = tile_corner_um(float(x_um), float(y_um), h, w, float(p))
        reallocated = self._ensure_covers(top, left, top + h * p, left + w * p)
        small = resize_to(img, _footprint(h, w, float(p), self.scale_um))
        r0 = round((top - self.origin_um[0]) / self.scale_um)
        c0 = round((left - self.origin_um[1]) / self.scale_um)
        h0, w0 = self.levels[0].shape[:2]
        # clip: rounding can push the last row/col one past the edge
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + small.shape[0], h0), min(c0 + small.shape[1], w0)
        if rr1 > rr0 and cc1 > cc0:
            self.levels[0][rr0:rr1, cc0:cc1] = small[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
            self._update_levels(rr0, cc0, rr1, cc1)
        self.n_tiles += 1
        return PasteResult(slice(rr0, rr1), slice(cc0, cc1), reallocated)

    # ------------------------------------------------------------------ internals
    def _convert(self, pixels: np.ndarray) -> np.ndarray:
        a = to_display(pixels, self.channels)
        if a.dtype != self.dtype:
            if a.dtype == np.uint16 and self.dtype == np.uint8:
                a = (a >> 8).astype(np.uint8)
            elif np.issubdtype(a.dtype, np.floating) and self.dtype == np.uint8:
                hi = float(np.nanmax(a)) if a.size else 1.0
                a = _cast_like(np.nan_to_num(a) * (255.0 if hi <= 1.0 else 1.0), np.dtype(np.uint8))
            else:
                a = _cast_like(a.astype(np.float32), self.dtype)
        return a

    def _level_shape(self, h0: int, w0: int, k: int) -> tuple[int, ...]:
        f = 2**k
        base = (-(-h0 // f), -(-w0 // f))
        return base + ((3,) if self.channels == 3 else ())

    def _allocate(self, y0: float, x0: float, y1: float, x1: float) -> None:
        """Allocate level arrays covering the stage rectangle (corners in µm), aligned to the pyramid."""
        a = self._align
        while True:
            s = self.scale_um
            r0 = math.floor(y0 / s / a) * a
            c0 = math.floor(x0 / s / a) * a
            r1 = math.ceil(y1 / s / a) * a
            c1 = math.ceil(x1 / s / a) * a
            h, w = max(r1 - r0, a), max(c1 - c0, a)
            if max(h, w) <= self.max_side_px:
                break
            self.scale_um = s * 2.0
        self.origin_um = (r0 * s, c0 * s)
        self.levels = [np.zeros(self._level_shape(h, w, k), dtype=self.dtype) for k in range(self.n_levels)]

    def _ensure_covers(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """Grow (and if needed coarsen) the canvas so it covers the rectangle; True if reallocated."""
        eps = 1e-6 * self.scale_um
        if self.levels:
            ex0, ey0, ex1, ey1 = self.extent_um
            if y0 >= ey0 - eps and x0 >= ex0 - eps and y1 <= ey1 + eps and x1 <= ex1 + eps:
                return False
            # grow by at least half the current size on the side that overflows (amortised reallocation)
            gh, gw = (ey1 - ey0) / 2.0, (ex1 - ex0) / 2.0
            ny0 = min(ey0, y0 - (gh if y0 < ey0 - eps else 0.0))
            nx0 = min(ex0, x0 - (gw if x0 < ex0 - eps else 0.0))
            ny1 = max(ey1, y1 + (gh if y1 > ey1 + eps else 0.0))
            nx1 = max(ex1, x1 + (gw if x1 > ex1 + eps else 0.0))
            old, old_origin, old_scale = self.levels[0], self.origin_um, self.scale_um
            self._allocate(ny0, nx0, ny1, nx1)
            self._blit(old, old_origin, old_scale)
        else:
            self._allocate(y0, x0, y1, x1)
        return True

    def _blit(self, old: np.ndarray, old_origin: tuple[float, float], old_scale: float) -> None:
        """Copy an older level-0 canvas into the new allocation (downsampling it if the scale grew)."""
        factor = round(self.scale_um / old_scale)
        src = block_mean(old, factor) if factor > 1 else old
        r0 = round((old_origin[0] - self.origin_um[0]) / self.scale_um)
        c0 = round((old_origin[1] - self.origin_um[1]) / self.scale_um)
        h0, w0 = self.levels[0].shape[:2]
        rr1, cc1 = min(r0 + src.shape[0], h0), min(c0 + src.shape[1], w0)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        self.levels[0][rr0:rr1, cc0:cc1] = src[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
        self._update_levels(0, 0, h0, w0)

    def _update_levels(self, r0: int, c0: int, r1: int, c1: int) -> None:
        """Recompute the pyramid over a level-0 region."""
        for k in range(1, len(self.levels)):
            f = 2**k
            ar0, ac0 = (r0 // f) * f, (c0 // f) * f
            ar1 = min(-(-r1 // f) * f, self.levels[0].shape[0])
            ac1 = min(-(-c1 // f) * f, self.levels[0].shape[1])
            src = self.levels[0][ar0:ar1, ac0:ac1]
            small = block_mean(src, f)
            self.levels[k][ar0 // f : ar0 // f + small.shape[0], ac0 // f : ac0 // f + small.shape[1]] = small
