"""Tiny but real models for tests: synthetic two-or-more-class cells, a few training steps, calibrated.

``make_tiny_model`` writes a folder of synthetic crops with a ``labels.csv``, trains a tiny UNet on it
with the real training loop, calibrates it with the real calibration code and returns the model
directory, loadable with :meth:`DiffusionClassifier.load`. It takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from scope_stream.config.train import TrainConfig

__all__ = ["make_tiny_model", "tiny_train_config", "toy_crops", "write_toy_folder"]

_COLOURS = [(90, 40, 140), (220, 120, 160), (60, 120, 200), (200, 160, 60), (60, 160, 90), (150, 60, 60)]


def toy_crops(
    n: int, n_classes: int, size: int = 16, seed: int = 0, ambiguous: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic crops ``(n, size, size, 3)`` uint8 and their class indices.

    Class k is a disk of its own colour and radius on a pale background, with position jitter and
    pixel noise, so classes differ clearly but no two crops are the same. ``ambiguous``: that share of
    crops is painted half-way to the next class's colour and size (mixing weight U(0.3, 0.7)), so that a model
    calls some of them wrong, as real cells are (a temperature needs some errors to be fitted).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        cy, cx = size / 2 + rng.normal(0, size * 0.04, 2)
        r = size * (0.22 + 0.08 * (k % 3))
        colour = np.asarray(_COLOURS[k % len(_COLOURS)], dtype=np.float64)
        if ambiguous > 0 and rng.random() < ambiguous:
            mix = rng.uniform(0.3, 0.7)
            other = (k + 1) % n_classes
            colour = (1 - mix) * colour + mix * np.asarray(_COLOURS[other % len(_COLOURS)])
            r = (1 - mix) * r + mix * size * (0.22 + 0.08 * (other % 3))
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
        img = np.empty((size, size, 3))
        img[:] = (235, 225, 230)
        img[disk] = colour
        if k >= len(_COLOURS) // 2:  # ring: a pale core
            core = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (r * 0.5) ** 2
            img[core] = (235, 225, 230)
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out, labels


def write_toy_folder(
    folder: Path,
    classes: list[str],
    per_class: int = 40,
    size: int = 16,
    seed: int = 0,
    split: str = "train",
    ambiguous: float = 0.0,
) -> Path:
    """Write toy crops as PNGs plus ``labels.csv`` (path,label,split) into ``folder`` (see :func:`toy_crops`)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    imgs, labels = toy_crops(per_class * len(classes), len(classes), size, seed, ambiguous)
    rows: list[tuple[str, ...]] = []
    for i, (img, k) in enumerate(zip(imgs, labels, strict=True)):
        rel = Path("images") / classes[k] / f"{split}_{i:05d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / rel)
        rows.append((rel.as_posix(), classes[k], split))
    csv_path = folder / "labels.csv"
    existing: list[tuple[str, ...]] = []
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as fh:
            existing = [tuple(r) for r in list(csv.reader(fh))[1:]]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(existing + rows)
    return folder


def tiny_train_config(data: Path, out: Path, steps: int, **overrides: Any) -> TrainConfig:
    """A training config for a tiny UNet on CPU (16 px, two levels, no attention, no checkpoints or logs)."""
    from scope_stream.config.train import TrainConfig

    settings: dict[str, Any] = {
        "data": data,
        "out": out,
        "exclude_classes": [],
        "holdout_fraction": 0.2,
        "image_size": 16,
        "block_out_channels": [16, 32],
        "attention_levels": [],
        "norm_num_groups": 8,
        "batch_size": 16,
        "steps": steps,
        "lr": 2e-3,
        "warmup_steps": 2,
        "ema_decay": 0.9,
        "device": "cpu",
        "checkpoint_every": 10**6,
        "log_every": 10**6,
        "checkpoint_minutes": 10**6,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def make_tiny_model(
    out_dir: Path,
    classes: list[str] | None = None,
    steps: int = 150,
    image_size: int = 16,
    seed: int = 0,
    feature_bank: bool = True,
) -> Path:
    """Train and calibrate a tiny real model on toy cells; returns the model directory (``out_dir/model``).

    ``feature_bank``: calibrate as the shipped models are, with a feature bank (one probe level) and the
    gap + feature flagging score; else with CytoDiffusion's relative score alone.
    """
    import torch

    from .classifier import DiffusionClassifier
    from .evaluate import calibrate, holdout_set, training_set
    from .features import FeatureProbe
    from .train import train_diffusion

    classes = list(classes) if classes is not None else ["lymphocyte", "neutrophil"]
    out_dir = Path(out_dir)
    data = write_toy_folder(out_dir / "data", classes, per_class=40, size=image_size, seed=seed, ambiguous=0.25)
    cfg = tiny_train_config(
        data,
        out_dir / "run",
        steps,
        holdout_fraction=0.25,
        image_size=image_size,
        batch_size=32,
        warmup_steps=5,
        seed=seed,
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(threads, 2))
        train_diffusion(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    model_dir = out_dir / "run" / "raw"
    clf = DiffusionClassifier.load(model_dir, device="cpu")
    cells = holdout_set(out_dir / "run", image_size)
    bank = training_set(out_dir / "run", image_size, classes) if feature_bank else None
    calibrate(
        clf,
        cells,
        timesteps=(50, 150, 300, 500),
        noises_per_timestep=1,
        info={"fitted_on": "toy held-out cells"},
        bank_cells=bank,
        probe=FeatureProbe(layer="up0", timesteps=[300], noise_seeds=[1], k=3),
        combine=("gap", "feature") if feature_bank else (),
        temperature_share=0.5,
    )
    (model_dir / "MODEL_CARD.md").write_text(
        f"# tiny test model\n\nToy classes {classes}; {steps} steps; for tests only.\n", encoding="utf-8"
    )
    json.loads((model_dir / "calibration.json").read_text(encoding="utf-8"))
    return model_dir
