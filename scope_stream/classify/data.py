"""Loading labelled cell crops into memory, resizing, splitting and smear-appropriate augmentation.

Training preloads a whole split, resized to the model's input size, into one uint8 array
``(N, S, S, 3)``: at 32x32 the 9,460 PBC training cells take 29 MB, and no worker processes are
needed (Windows-safe, fast on 2 cores).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scope_stream.datasets import DatasetError, LabelledImage, read_labels_csv

if TYPE_CHECKING:
    import torch

__all__ = [
    "CropSet",
    "augment",
    "gaussian_blur",
    "holdout_mask",
    "load_crops",
    "resize_crops",
    "to_model_input",
]


@dataclass
class CropSet:
    """Crops (uint8, ``(N, S, S, 3)``), their string labels, and the source paths."""

    images: np.ndarray
    labels: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray | Sequence[int]) -> CropSet:
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=int)
        return CropSet(self.images[idx], [self.labels[i] for i in idx], [self.paths[i] for i in idx])

    def label_indices(self, classes: list[str]) -> np.ndarray:
        """Index of each label in ``classes``; -1 for labels the list does not hold."""
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup.get(lab, -1) for lab in self.labels], dtype=np.int64)


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W, 3)`` uint8 crops to ``(N, size, size, 3)`` with antialiasing (PIL box/bicubic).

    Non-square crops are resized without padding (cells are centred in their crops).
    """
    from PIL import Image

    arr = check_crops(crops)
    if arr.shape[1] == size and arr.shape[2] == size:
        return arr
    out = np.empty((arr.shape[0], size, size, 3), dtype=np.uint8)
    for i in range(arr.shape[0]):
        out[i] = np.asarray(Image.fromarray(arr[i]).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0))
    return out


def check_crops(crops: np.ndarray) -> np.ndarray:
    """Validate a crop batch: ``(N, H, W, 3)`` uint8 (float in [0, 1] or [0, 255] is converted)."""
    if not isinstance(crops, np.ndarray):
        raise ValueError(f"crops must be a numpy array (N, H, W, 3), got {type(crops).__name__}")
    if crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"crops must have shape (N, H, W, 3), got {crops.shape}")
    if crops.shape[1] < 4 or crops.shape[2] < 4:
        raise ValueError(f"crops of {crops.shape[1]}x{crops.shape[2]} px are too small to classify")
    if crops.dtype == np.uint8:
        return crops
    if np.issubdtype(crops.dtype, np.floating):
        if not np.isfinite(crops).all():
            raise ValueError("crops contain NaN or infinite values")
        scale = 255.0 if float(crops.max(initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.rint(crops * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(crops.dtype, np.integer):
        if crops.min(initial=0) < 0 or crops.max(initial=0) > 255:
            raise ValueError(f"integer crops must lie in 0..255, got {crops.min()}..{crops.max()}")
        return crops.astype(np.uint8)
    raise ValueError(f"crops dtype {crops.dtype} is not supported (use uint8)")


def _load_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def load_crops(
    folder: Path | str,
    size: int,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    exclude_paths: Collection[str] = (),
    limit_per_class: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> CropSet:
    """Read ``folder/labels.csv`` and load its images resized to ``size`` x ``size`` into memory.

    ``split`` keeps one split; ``classes`` keeps only those labels; ``exclude`` drops labels;
    ``exclude_paths`` drops images (``str`` of their paths, e.g. a run's held-out cells);
    ``limit_per_class`` then takes a deterministic random sample of at most that many cells per label.
    """
    rows: list[LabelledImage] = read_labels_csv(folder, split=split)
    if split is not None and not rows:
        raise DatasetError(f"{folder}/labels.csv has no rows of split {split!r}")
    keep = set(classes) if classes is not None else None
    labels_out, paths_out = set(exclude), set(exclude_paths)
    rows = [
        r
        for r in rows
        if r.label not in labels_out and (keep is None or r.label in keep) and str(r.path) not in paths_out
    ]
    if limit_per_class is not None:
        rng = np.random.default_rng(seed)
        by: dict[str, list[LabelledImage]] = {}
        for r in rows:
            by.setdefault(r.label, []).append(r)
        rows = []
        for lab in sorted(by):
            items = by[lab]
            pick = rng.permutation(len(items))[:limit_per_class]
            rows.extend(items[i] for i in sorted(pick))
    if not rows:
        raise DatasetError(f"no images left in {folder} after filtering (split={split}, classes={classes})")
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    if progress:
        from rich.progress import track

        it = track(range(len(rows)), description=f"loading {len(rows)} crops")
    else:
        it = range(len(rows))
    for i in it:
        images[i] = _load_one(rows[i].path, size)
    return CropSet(images, [r.label for r in rows], [r.path for r in rows])


def holdout_mask(paths: Sequence[Path], labels: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic stratified hold-out: True for about ``fraction`` of each label's cells.

    Selection hashes each file name with the seed, so it is stable whatever the row order.
    """
    mask = np.zeros(len(paths), dtype=bool)
    if fraction <= 0:
        return mask
    by: dict[str, list[tuple[str, int]]] = {}
    for i, (p, lab) in enumerate(zip(paths, labels, strict=True)):
        key = hashlib.sha256(f"{seed}:{Path(p).name}".encode()).hexdigest()
        by.setdefault(lab, []).append((key, i))
    for items in by.values():
        items.sort()
        n = max(1, round(fraction * len(items)))
        for _, i in items[:n]:
            mask[i] = True
    return mask


def to_model_input(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` -> float ``(N, 3, S, S)`` in [-1, 1] on ``device``."""
    import torch

    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {t.dtype}")
    return t.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    jitter: float = 0.05,
    *,
    blur_sigma_max: float = 0.0,
    blur_probability: float = 0.5,
    gain_jitter: float = 0.0,
) -> torch.Tensor:
    """Smear-appropriate augmentation of a ``(B, 3, S, S)`` batch in [-1, 1].

    Random horizontal/vertical flips and 90-degree rotations (a cell has no canonical orientation)
    and mild per-image brightness/contrast/saturation jitter of relative size ``jitter`` (stain and
    illumination vary between slides).

    Optics, both off by default (and then no random numbers are drawn for them, so older runs replay
    exactly): with probability ``blur_probability`` an image is blurred by a Gaussian of sigma drawn
    uniformly from ``[0, blur_sigma_max]`` pixels (focus, objective and resampling soften a cell seen
    through a microscope rather than in a dataset crop), and ``gain_jitter`` scales the transmitted
    light of each image by a factor in ``[1 - gain_jitter, 1 + gain_jitter]`` (lamp and exposure).
    """
    import torch

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"augment expects a (B, 3, S, S) batch, got shape {tuple(x.shape)}")
    if blur_sigma_max < 0 or gain_jitter < 0 or not 0 <= blur_probability <= 1:
        raise ValueError(
            f"augment: blur_sigma_max ({blur_sigma_max}) and gain_jitter ({gain_jitter}) must be >= 0 "
            f"and blur_probability ({blur_probability}) within [0, 1]"
        )
    b = x.shape[0]
    dev = x.device

    def rnd(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    flip_h = rnd(b) < 0.5
    flip_v = rnd(b) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    rot = rnd(b) < 0.5  # with both flips this covers the 8 symmetries of the square
    x = torch.where(rot[:, None, None, None], x.transpose(2, 3), x)
    if jitter > 0:
        bright = (rnd(b, 1, 1, 1) * 2 - 1) * jitter
        contrast = 1 + (rnd(b, 1, 1, 1) * 2 - 1) * jitter
        sat = 1 + (rnd(b, 1, 1, 1) * 2 - 1) * jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean + bright
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * sat + gray
        x = x.clamp(-1, 1)
    if gain_jitter > 0:
        gain = 1 + (rnd(b, 1, 1, 1) * 2 - 1) * gain_jitter
        x = (((x + 1) * gain) - 1).clamp(-1, 1)  # transmitted light scales; black stays black
    if blur_sigma_max > 0:
        sigma = rnd(b) * blur_sigma_max * (rnd(b) < blur_probability).float()
        x = gaussian_blur(x, sigma)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of a ``(B, C, H, W)`` batch by its own Gaussian ``sigma[b]`` (pixels; 0 = unchanged).

    Separable, reflect-padded, computed in one grouped convolution per axis.
    """
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    if sigma.shape != (b,):
        raise ValueError(f"gaussian_blur: one sigma per image expected, got {tuple(sigma.shape)} for {b} images")
    smax = float(sigma.max()) if b else 0.0
    if smax <= 0:
        return x
    r = max(1, min(math.ceil(3 * smax), (min(h, w) - 1) // 2))
    offs = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (offs[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # sigma ~ 0 gives a unit impulse
    k = k.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)
