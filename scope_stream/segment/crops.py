"""Crops of a fixed physical size around cells, resampled to the classifier's input size.

The classifier learns from PBC crops: 128 x 128 px at about 0.2 µm/px, so 25.6 µm across with the
white cell in the middle. :func:`extract_crops` cuts the same physical field of view around each cell
of any tile (any pixel size), low-pass filters it (no aliasing when shrinking) and resamples it
bilinearly to ``crop_px`` x ``crop_px``. Outside the tile the crop is filled with the tile's background
(glass) colour, so a cell near the border still sits in the middle of its crop.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from scope_stream.vocabulary import Cell, Tile

from .stain import as_rgb_float, block_downsample, check_pixels, estimate_background

__all__ = ["DEFAULT_CROP_UM", "extract_crops", "to_display_scale"]

#: 128 px x 0.2 µm/px: the field of view of a PBC training crop.
DEFAULT_CROP_UM = 25.6


def to_display_scale(arr: np.ndarray) -> float:
    """The factor that maps a tile's values to 0..255.

    uint8: 1. uint16: 255 / (2^bits - 1) for the smallest bit depth holding the data (a 12-bit camera's
    4095 maps to 255). float: 255 for data within [0, 1], else 255 / max.
    """
    if arr.dtype == np.uint8:
        return 1.0
    peak = float(np.max(arr)) if arr.size else 0.0
    if np.issubdtype(arr.dtype, np.integer):
        bits = max(8, int(np.ceil(np.log2(peak + 1.0)))) if peak > 0 else 8
        return 255.0 / (2.0**bits - 1.0)
    if not np.isfinite(peak) or peak <= 0:
        return 255.0
    return 255.0 if peak <= 1.0 else 255.0 / peak


def extract_crops(tile: Tile, cells: list[Cell], crop_um: float = DEFAULT_CROP_UM, crop_px: int = 32) -> np.ndarray:
    """``(N, crop_px, crop_px, 3)`` uint8 crops of ``crop_um`` µm centred on each cell's centroid.

    Grayscale tiles are repeated into three channels; RGBA loses its alpha. Raises ``ValueError`` for
    a non-positive size or pixels that are not an image.
    """
    if not (crop_um > 0 and np.isfinite(crop_um)):
        raise ValueError(f"crop_um must be a positive number of µm, got {crop_um}")
    if int(crop_px) < 1:
        raise ValueError(f"crop_px must be >= 1, got {crop_px}")
    crop_px = int(crop_px)
    out = np.zeros((len(cells), crop_px, crop_px, 3), np.uint8)
    if not cells:
        return out
    raw = check_pixels(tile.pixels)
    scale_to_255 = to_display_scale(raw)
    h, w = raw.shape[:2]
    side_px = crop_um / tile.pixel_size_um  # crop side in tile pixels
    step = side_px / crop_px  # tile pixels per output pixel
    k = max(1, int(step // 2))  # integer block-averaging first: cheap and exact
    rest = step / k
    sigma = max(0.0, (rest - 1.0) / 2.0)  # the residual anti-aliasing blur (as skimage.transform.resize)
    small = block_downsample(as_rgb_float(raw), k) if k > 1 else as_rgb_float(raw)
    bg = estimate_background(small)
    nch = small.shape[2]
    margin = int(np.ceil(3 * sigma)) + 2
    half = side_px / 2.0
    offsets = (np.arange(crop_px) + 0.5) * step - half  # tile px relative to the centre
    for n, cell in enumerate(cells):
        cr, cc = cell.centroid_px
        # window in tile px, then in block-averaged px
        r0 = int(np.floor((cr - half) / k)) - margin
        c0 = int(np.floor((cc - half) / k)) - margin
        r1 = int(np.ceil((cr + half) / k)) + margin + 1
        c1 = int(np.ceil((cc + half) / k)) + margin + 1
        hs, ws = small.shape[:2]
        win = np.empty((r1 - r0, c1 - c0, nch), np.float32)
        win[...] = bg
        sr0, sr1, sc0, sc1 = max(0, r0), min(hs, r1), max(0, c0), min(ws, c1)
        if sr1 > sr0 and sc1 > sc0:
            win[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = small[sr0:sr1, sc0:sc1]
        # sample positions in window coordinates (block-averaged pixel centres sit at k*i + (k-1)/2)
        rows = (cr + offsets - (k - 1) / 2.0) / k - r0
        cols = (cc + offsets - (k - 1) / 2.0) / k - c0
        grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
        for ch in range(3):
            src = win[:, :, min(ch, nch - 1)]
            if sigma > 0.3:
                src = ndi.gaussian_filter(src, sigma, mode="nearest")
            vals = ndi.map_coordinates(src, [grid_r, grid_c], order=1, mode="nearest")
            out[n, :, :, ch] = np.clip(np.rint(vals * scale_to_255), 0, 255).astype(np.uint8)
            if nch == 1:
                out[n, :, :, 1] = out[n, :, :, 0]
                out[n, :, :, 2] = out[n, :, :, 0]
                break
    _ = (h, w)
    return out
