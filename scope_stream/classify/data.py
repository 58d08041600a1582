"""Loading labelled cell crops into memory, resizing, splitting and smear-appropriate augmentation.

Training preloads a whole split, resized to the model's input size, into one uint8 array
``(N, S, S, 3)``: at 32x32 the 9,460 PBC training cells take 29 MB, and no worker processes are
needed (Windows-safe, fast on 2 cores).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scope_stream.datasets import DatasetError, LabelledImage, read_labels_csv

if TYPE_CHECKING:
    import torch

    from .canonical import CanonicalSpec

__all__ = [
    "CropSet",
    "augment",
    "gaussian_blur",
    "hed_perturb",
    "holdout_mask",
    "load_crops",
    "model_crops",
    "resize_crops",
    "rotate_zoom",
    "to_model_input",
]


@dataclass
class CropSet:
    """Crops (uint8, ``(N, S, S, 3)``), their string labels, and the source paths."""

    images: np.ndarray
    labels: list[str]
    paths: list[Path]
    #: crops left out because no cell was found in them (canonical crops only): path -> reason
    refused: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray | Sequence[int]) -> CropSet:
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=int)
        labels, paths = [self.labels[i] for i in idx], [self.paths[i] for i in idx]
        return CropSet(self.images[idx], labels, paths, dict(self.refused))

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


def model_crops(
    crops: np.ndarray | Sequence[np.ndarray],
    size: int,
    canonical: CanonicalSpec | None,
    um_per_px: float | None = None,
) -> np.ndarray:
    """Raw cell crops (an ``(N, H, W, 3)`` array or a list of crops of any size) as ``(N, size, size, 3)``
    uint8 model input: canonical crops with ``canonical`` (a crop without a cell raises
    :class:`~.canonical.NoCellError` naming its index), else each crop resized whole."""
    if canonical is not None:
        from .canonical import canonical_batch

        if canonical.size != size:
            raise ValueError(f"canonical crops of {canonical.size} px do not fit a {size} px model")
        return canonical_batch(crops, canonical, um_per_px=um_per_px, on_error="raise").images
    if isinstance(crops, np.ndarray):
        return resize_crops(check_crops(crops), size)
    if len(crops) == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate([resize_crops(check_crops(np.asarray(c)[None]), size) for c in crops])


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


def _load_one(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if size is not None and rgb.size != (size, size):
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
    canonical: CanonicalSpec | None = None,
) -> CropSet:
    """Read ``folder/labels.csv`` and load its images resized to ``size`` x ``size`` into memory.

    With ``canonical`` every image is read at its own size and made a canonical cell crop of
    ``canonical.size`` (found, centred, scaled, colour-normalised); crops in which no cell is found
    are left out and listed in the result's ``refused``.

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
    if canonical is not None:
        return _load_canonical(Path(folder), rows, canonical, progress)
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    if progress:
        from rich.progress import track

        it = track(range(len(rows)), description=f"loading {len(rows)} crops")
    else:
        it = range(len(rows))
    for i in it:
        images[i] = _load_one(rows[i].path, size)
    return CropSet(images, [r.label for r in rows], [r.path for r in rows])


#: environment variable naming a folder where canonical crops are cached (one file per spec; see CropCache)
CROP_CACHE_ENV = "SCOPE_STREAM_CROP_CACHE"


class CropCache:
    """Canonical crops of one data folder and spec, by image path relative to the folder.

    Making 14,000 crops canonical takes a minute or two; training, calibration and evaluation read the
    same cells again and again. With a ``cache_dir`` (``$SCOPE_STREAM_CROP_CACHE``) the crops persist in
    one ``.npz`` there, keyed by the spec and the folder's name; without one the cache lives in memory
    for one load. Refused crops are remembered with their reason. A machine without the images can read
    the cells from a cache file made elsewhere.
    """

    def __init__(self, cache_dir: Path | None, folder: Path, spec: CanonicalSpec) -> None:
        import json

        key = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(folder).resolve()
        self.path = Path(cache_dir) / f"crops-{self.folder.name}-{key}.npz" if cache_dir is not None else None
        self.images: dict[str, np.ndarray] = {}
        self.refused: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                self.images = dict(zip([str(p) for p in z["paths"]], z["images"], strict=True))
                self.refused = dict(
                    zip([str(p) for p in z["refused_paths"]], [str(r) for r in z["reasons"]], strict=True)
                )

    def key(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.folder).as_posix()
        except ValueError:
            return Path(path).resolve().as_posix()

    def save(self) -> None:
        """Write the cache file (nothing without a cache folder)."""
        if self.path is None:
            return
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp.npz")  # one per process: runs may share a cache
        paths = sorted(self.images)
        size = next(iter(self.images.values())).shape if self.images else (0, 0, 3)
        np.savez(
            tmp,
            paths=np.array(paths, dtype=str),
            images=np.stack([self.images[p] for p in paths]) if paths else np.zeros((0, *size), np.uint8),
            refused_paths=np.array(sorted(self.refused), dtype=str),
            reasons=np.array([self.refused[p] for p in sorted(self.refused)], dtype=str),
        )
        tmp.replace(self.path)


def _load_canonical(folder: Path, rows: list[LabelledImage], spec: CanonicalSpec, progress: bool) -> CropSet:
    import os

    from .canonical import canonical_batch

    cache_dir = os.environ.get(CROP_CACHE_ENV)
    cache = CropCache(Path(cache_dir) if cache_dir else None, folder, spec)
    keys = [cache.key(r.path) for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in cache.images and k not in cache.refused]
    if todo:
        raw = [_load_one(rows[i].path, None) for i in todo]
        cpus = os.cpu_count() or 1
        procs = min(16, cpus) if len(raw) >= 2000 and cpus > 2 else 0
        batch = canonical_batch(raw, spec, on_error="skip", progress=progress, processes=procs)
        for j, img in zip(batch.kept, batch.images, strict=True):
            cache.images[keys[todo[int(j)]]] = img
        for j, reason in batch.errors.items():
            cache.refused[keys[todo[j]]] = reason
        cache.save()
    kept = [i for i, k in enumerate(keys) if k in cache.images]
    refused = {str(rows[i].path): cache.refused[k] for i, k in enumerate(keys) if k in cache.refused}
    if not kept:
        raise DatasetError(f"no cell was found in any of the {len(rows)} crops ({next(iter(refused.values()))})")
    images = np.stack([cache.images[keys[i]] for i in kept])
    return CropSet(images, [rows[i].label for i in kept], [rows[i].path for i in kept], refused)


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
    rotate: bool = False,
    scale_jitter: float = 0.0,
    hed_jitter: float = 0.0,
    noise_std: float = 0.0,
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

    Robustness to other microscopes (all off by default, drawing nothing when off; order: geometry,
    stain, colour jitter, gain, blur, noise):

    * ``rotate``: a rotation by an angle uniform in [0, 360) degrees (CytoDiffusion rotates fully);
      ``scale_jitter``: a zoom by ``exp(U(-s, s))`` about the centre (the canonical crop's diameter
      estimate is off by a few percent). Both in one bilinear resampling; pixels from outside the crop
      repeat its border, which on a canonical crop is the flat canonical background.
    * ``hed_jitter``: stain perturbation in haematoxylin-eosin-DAB optical density (the published HED
      augmentation): each stain's concentration scaled by ``1 + U(-j, j)`` and shifted by
      ``U(-j, j) / 5`` per image.
    * ``noise_std``: camera noise, Gaussian with a standard deviation of ``noise_std`` (in [-1, 1]
      units) at white, growing as the square root of the light (shot noise).
    """
    import torch

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"augment expects a (B, 3, S, S) batch, got shape {tuple(x.shape)}")
    if min(scale_jitter, hed_jitter, noise_std) < 0:
        raise ValueError(
            f"augment: scale_jitter ({scale_jitter}), hed_jitter ({hed_jitter}) and noise_std ({noise_std}) "
            "must be >= 0"
        )
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
    if rotate or scale_jitter > 0:
        angle = rnd(b) * (2 * math.pi) if rotate else torch.zeros(b, device=dev)
        zoom = torch.exp((rnd(b) * 2 - 1) * scale_jitter) if scale_jitter > 0 else torch.ones(b, device=dev)
        x = rotate_zoom(x, angle, zoom)
    if hed_jitter > 0:
        x = hed_perturb(x, 1 + (rnd(b, 3) * 2 - 1) * hed_jitter, (rnd(b, 3) * 2 - 1) * hed_jitter / 5)
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
    if noise_std > 0:
        light = ((x + 1) / 2).clamp_min(0)
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(dev)
        x = (x + noise * noise_std * light.sqrt()).clamp(-1, 1)
    return x


def rotate_zoom(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``(B, C, H, W)`` by ``angle[b]`` radians and magnify it by ``zoom[b]`` about the
    centre (bilinear; outside the source, its border pixels repeat)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    if angle.shape != (b,) or zoom.shape != (b,):
        raise ValueError(f"rotate_zoom: one angle and one zoom per image expected for {b} images")
    if bool((zoom <= 0).any()):
        raise ValueError("rotate_zoom: zoom factors must be > 0")
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


#: RGB -> haematoxylin, eosin, DAB optical-density stain matrix (Ruifrok & Johnston; scikit-image's hed_from_rgb)
_RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)


def hed_perturb(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Scale and shift each image's haematoxylin, eosin and DAB concentrations (``scale``/``shift``:
    ``(B, 3)``) in optical density, as stain differences between labs do; a batch in [-1, 1]."""
    import torch

    b = x.shape[0]
    if scale.shape != (b, 3) or shift.shape != (b, 3):
        raise ValueError(f"hed_perturb: scale and shift must be ({b}, 3)")
    rgb_from_hed = torch.tensor(_RGB_FROM_HED, dtype=torch.float32, device=x.device)
    rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    light = ((x.float() + 1) / 2).clamp(1 / 255, 1)  # (B, 3, H, W) transmitted light
    od = -torch.log(light)
    conc = torch.einsum("bchw,cs->bshw", od, hed_from_rgb)
    conc = conc * scale.to(x.device)[:, :, None, None] + shift.to(x.device)[:, :, None, None]
    od2 = torch.einsum("bshw,sc->bchw", conc, rgb_from_hed).clamp_min(0)
    return (torch.exp(-od2) * 2 - 1).clamp(-1, 1).to(x.dtype)


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
