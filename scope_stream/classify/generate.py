"""Sampling synthetic cells from the class-conditional model (DDIM), written as a grid PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import DiffusionClassifier

__all__ = ["sample_cells", "save_grid"]


def sample_cells(clf: DiffusionClassifier, label: str, n: int = 16, steps: int = 50, seed: int = 0) -> np.ndarray:
    """``n`` samples of class ``label`` as ``(n, S, S, 3)`` uint8, by DDIM with ``steps`` steps."""
    import torch
    from diffusers import DDIMScheduler

    if label not in clf.classes:
        raise ValueError(f"unknown label {label!r}; the model knows {clf.classes}")
    if n < 1 or steps < 1:
        raise ValueError("n and steps must be >= 1")
    spec = clf.spec
    sched: Any = DDIMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        clip_sample=not spec.latent_channels,
    )
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, spec.sample_channels, spec.sample_size, spec.sample_size, generator=gen).to(clf.device)
    y = torch.full((n,), clf.classes.index(label), dtype=torch.long, device=clf.device)
    with torch.inference_mode():
        for t in sched.timesteps:
            eps = clf.unet(x, t.to(clf.device).expand(n), class_labels=y).sample
            x = sched.step(eps, t, x).prev_sample
        if clf.vae is not None:
            x = clf.vae.decode(x / clf.ae_spec.scaling_factor).sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.asarray(img)


def save_grid(images: np.ndarray, path: Path, scale: int = 4) -> Path:
    """Tile ``(n, S, S, 3)`` images into a near-square grid PNG, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    n, s = images.shape[0], images.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (s + 1) + 1, cols * (s + 1) + 1, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (s + 1) : 1 + r * (s + 1) + s, 1 + c * (s + 1) : 1 + c * (s + 1) + s] = im
    out = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
