"""Pixel normalisation and stain separation for Romanowsky-stained bright-field tiles.

Everything downstream works in *optical density* (OD) relative to the tile's own background:
``OD = -log10(I / I_background)`` per channel. That makes the analysis independent of the camera's
bit depth, gain, exposure and white balance (uint8, 12/16-bit and float tiles all give the same OD),
and it is the quantity in which stains add up (Beer-Lambert), so a fixed colour-deconvolution matrix
separates the purple nuclear stain from the pink-orange red-cell (eosin) stain.

Stain vectors differ between labs (PBC's CellaVision images have dark violet nuclei and mauve red
cells; BCCD's fields have pale blue-violet nuclei and orange-brown red cells). The nuclear direction
is similar everywhere; the red-cell direction is re-estimated per tile from its densest pixels, which
are red cells in any smear, before the deconvolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "NUCLEUS_OD",
    "RBC_OD",
    "StainImage",
    "as_rgb_float",
    "background_field",
    "block_downsample",
    "check_pixels",
    "estimate_background",
    "separate_stains",
    "working_factor",
]

#: Unit OD direction of the nuclear (azure/methylene-blue-eosinate) stain: absorbs green most, then red,
#: little blue. Measured on PBC crops (0.50, 0.84, 0.22) and BCCD nuclei (0.49, 0.87, 0.08); the mean here.
NUCLEUS_OD: np.ndarray = np.array([0.50, 0.85, 0.15], dtype=np.float32) / np.linalg.norm([0.50, 0.85, 0.15])
#: Default unit OD direction of red cells (eosin + haemoglobin): PBC (0.49, 0.72, 0.50), BCCD (0.35, 0.64, 0.69).
RBC_OD: np.ndarray = np.array([0.42, 0.68, 0.60], dtype=np.float32) / np.linalg.norm([0.42, 0.68, 0.60])

_OD_MAX = 2.5  # OD of a pixel at 1/300 of the background: anything darker is clipped


def check_pixels(pixels: object) -> np.ndarray:
    """Validate a tile's pixel array and return it as ``(H, W, C)`` with C in (1, 3).

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` (alpha dropped) arrays of
    uint8, uint16 or float32 (float64 and other integer types are accepted too). Raises
    :class:`ValueError` naming the shape or dtype otherwise.
    """
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"tile pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim == 2:
        arr = pixels[:, :, None]
    elif pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4):
        arr = pixels[:, :, :3] if pixels.shape[2] == 4 else pixels
    else:
        raise ValueError(
            f"tile pixels of shape {tuple(pixels.shape)} are not an image: expected (H, W) grayscale or "
            "(H, W, 1), (H, W, 3) RGB, (H, W, 4) RGBA"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"tile pixels of shape {tuple(pixels.shape)} are empty")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or arr.dtype == np.bool_:
        raise ValueError(f"tile pixels of dtype {arr.dtype} are not numbers (expected uint8, uint16 or float32)")
    return arr


def as_rgb_float(arr: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` numbers -> float32 with non-finite values replaced and negatives clipped to 0.

    The absolute scale does not matter (OD is relative to the background), so no rescaling is done.
    """
    out = arr.astype(np.float32, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(out)
        if not finite.all():
            fill = float(np.median(out[finite])) if finite.any() else 0.0
            out = np.where(finite, out, fill).astype(np.float32)
        if out.min() < 0:
            out = np.maximum(out, 0.0)
    return out


def working_factor(pixel_size_um: float, target_um_per_px: float) -> int:
    """Integer block-averaging factor that brings ``pixel_size_um`` closest to ``target_um_per_px``.

    Tiles coarser than the target are analysed at their own resolution (factor 1): nothing is upsampled.
    """
    if not (pixel_size_um > 0 and np.isfinite(pixel_size_um)):
        raise ValueError(f"pixel size must be a positive number of µm, got {pixel_size_um}")
    return max(1, round(target_um_per_px / pixel_size_um))


def block_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (edges that do not fill a block are dropped), as float32.

    Integer images are summed in integers (exact, and several times faster than a float reduction).
    """
    if factor <= 1:
        return img.astype(np.float32, copy=False)
    f = int(factor)
    h, w = img.shape[:2]
    hh, ww = h // f, w // f
    if hh == 0 or ww == 0:
        raise ValueError(f"tile of shape {img.shape[:2]} is smaller than one {f}x{f} analysis block")
    if img.dtype == np.uint8 and f * f <= 257:
        acc: type[np.generic] = np.uint16
    elif np.issubdtype(img.dtype, np.integer) and img.dtype.itemsize <= 2 and f <= 256:
        acc = np.uint32
    else:
        acc = np.float32
    x = img[: hh * f, : ww * f]
    rows = x[0::f].astype(acc)
    for k in range(1, f):
        rows += x[k::f]
    out = rows[:, 0::f].copy()
    for k in range(1, f):
        out += rows[:, k::f]
    return np.multiply(out, np.float32(1.0 / (f * f)), dtype=np.float32)


@dataclass
class StainImage:
    """A tile in optical density, at the working resolution.

    ``od`` is ``(h, w, C)``; ``total`` the summed OD (all absorbing matter), ``nucleus`` the
    concentration of the nuclear stain (purple) and ``eosin`` that of the red-cell stain; for
    grayscale tiles ``nucleus`` and ``eosin`` are both the single channel's OD. ``background`` is the
    per-channel background intensity in input units.
    """

    od: np.ndarray
    total: np.ndarray
    nucleus: np.ndarray
    eosin: np.ndarray
    background: np.ndarray
    colour: bool
    dynamic_range: float


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Per-channel background (the bright, unstained glass): median colour of the brightest 10% pixels."""
    # a strided subsample (~50k pixels) is plenty for a percentile and keeps large tiles cheap
    step = max(1, img.shape[0] * img.shape[1] // 50_000)
    flat = img.reshape(-1, img.shape[2])[::step]
    lum = flat.mean(axis=1)
    cut = np.percentile(lum, 90.0)
    bright = flat[lum >= cut]
    return np.asarray(np.median(bright, axis=0), dtype=np.float32)


def background_field(
    img: np.ndarray, px_um: float, block_um: float = 12.0, flat: np.ndarray | None = None
) -> np.ndarray:
    """Per-pixel background (glass) intensity as ``log10``: a smooth quadratic surface per channel.

    Bright-field illumination is rarely flat (vignetting, a tilted lamp: BCCD's fields are ~15% darker
    at the top). The image is cut into blocks of about ``block_um``; each block's glass estimate is its
    85th percentile per channel; a quadratic in log intensity is fitted to those estimates, discarding
    blocks that fall clearly below the surface (blocks covered by cells only darken). Small images, or
    too few clean blocks, give the flat :func:`estimate_background`. The surface is kept within a
    factor of two of the flat estimate. Returns ``(H, W, C)`` float32 (or a broadcast view when flat).
    """
    h, w, c = img.shape
    flat = estimate_background(img) if flat is None else flat
    log_flat = np.log10(np.maximum(flat, 1e-6)).astype(np.float32)
    b = max(4, round(block_um / px_um), max(h, w) // 24)  # at most ~24 blocks a side
    nby, nbx = h // b, w // b
    if nby * nbx < 12 or nby < 3 or nbx < 3:
        return np.broadcast_to(log_flat, img.shape)
    s = max(1, b // 20)  # a few hundred pixels per block are plenty for a percentile
    bs = b // s
    sub = img[: nby * b : s, : nbx * b : s][: nby * bs, : nbx * bs]
    blocks = sub.reshape(nby, bs, nbx, bs, c).transpose(0, 2, 1, 3, 4).reshape(nby * nbx, bs * bs, c)
    vals = np.percentile(blocks, 85.0, axis=1).astype(np.float64)
    yy, xx = np.mgrid[0:nby, 0:nbx]
    yc = ((yy + 0.5) * b / h - 0.5).ravel()
    xc = ((xx + 0.5) * b / w - 0.5).ravel()
    design = np.stack([np.ones_like(yc), yc, xc, yc * yc, xc * xc, yc * xc], axis=1)
    logv = np.log10(np.maximum(vals, 1e-6))
    keep = logv.mean(axis=1) > float(log_flat.mean()) - 0.2  # blocks with no glass at all
    coef = np.zeros((6, c))
    for _ in range(4):
        if keep.sum() < 8:
            return np.broadcast_to(log_flat, img.shape)
        coef, *_ = np.linalg.lstsq(design[keep], logv[keep], rcond=None)
        resid = (logv - design @ coef).mean(axis=1)
        new_keep = keep & (resid > -0.018)  # ~4% darker than the surface: a block with cells in it
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    ys = ((np.arange(h) + 0.5) / h - 0.5).astype(np.float32)[:, None]
    xs = ((np.arange(w) + 0.5) / w - 0.5).astype(np.float32)[None, :]
    out = np.empty(img.shape, np.float32)
    lim = float(np.log10(2.0))
    for ch in range(c):
        a = coef[:, ch].astype(np.float32)
        col = a[0] + a[1] * ys + a[3] * ys * ys
        row = a[2] * xs + a[4] * xs * xs
        surf = col + row + (a[5] * ys) * xs
        np.clip(surf, log_flat[ch] - lim, log_flat[ch] + lim, out=out[:, :, ch])
    return out


def separate_stains(img: np.ndarray, px_um: float | None = None, background: np.ndarray | None = None) -> StainImage:
    """Background-normalised OD and nucleus / eosin concentrations of a working-resolution image.

    With ``px_um`` the background is a fitted illumination field (:func:`background_field`), without
    it a single colour. ``background`` is :func:`estimate_background`'s answer when already known.
    """
    bg = estimate_background(img) if background is None else np.asarray(background, np.float32)
    if px_um is not None:
        log_bg = background_field(img, px_um, flat=bg)
    else:
        log_bg = np.broadcast_to(np.log10(np.maximum(bg, 1e-6)).astype(np.float32), img.shape)
    peak = float(bg.max())
    floor = float(np.percentile(img.reshape(-1, img.shape[2])[:: max(1, img.size // 150_000)].mean(axis=1), 1.0))
    dynamic_range = (peak - floor) / peak if peak > 0 else 0.0
    od = np.log10(np.maximum(img, 1e-6), dtype=np.float32)
    np.subtract(log_bg, od, out=od)
    np.clip(od, 0.0, _OD_MAX, out=od)
    total = od.sum(axis=2)
    if img.shape[2] == 1:
        ch = od[:, :, 0]
        return StainImage(od, total, ch, ch, bg, False, dynamic_range)
    rbc = _tile_rbc_direction(od, total)
    m = np.stack([NUCLEUS_OD, rbc, np.cross(NUCLEUS_OD, rbc)])
    m[2] /= max(float(np.linalg.norm(m[2])), 1e-6)
    conc = od.reshape(-1, 3) @ np.linalg.inv(m).astype(np.float32)
    conc = conc.reshape(od.shape)
    return StainImage(od, total, conc[:, :, 0], conc[:, :, 1], bg, True, dynamic_range)


def _tile_rbc_direction(od: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The red-cell OD direction of this tile: mean unit OD of its moderately dense pixels.

    Red cells cover much of any smear; nuclei are a small fraction and are down-weighted by excluding
    the most nucleus-like pixels. Falls back to :data:`RBC_OD` when the tile has too little stain or
    the estimate strays far from any plausible red-cell colour.
    """
    step = max(1, total.size // 100_000)
    t = total.reshape(-1)[::step]
    v = od.reshape(-1, 3)[::step]
    dense = t > max(0.12, float(np.percentile(t, 60)))
    if dense.sum() < 50:
        return RBC_OD
    v = v[dense]
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    # drop purple pixels: those closer to the nucleus direction than to the default red-cell direction
    keep = (u @ RBC_OD) >= (u @ NUCLEUS_OD)
    if keep.sum() < 50:
        return RBC_OD
    d = u[keep].mean(axis=0)
    d = d / np.linalg.norm(d)
    if float(d @ RBC_OD) < 0.95:  # implausible (a very odd stain): keep the default
        return RBC_OD
    return d.astype(np.float32)
