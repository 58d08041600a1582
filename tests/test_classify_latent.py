"""The latent variant: a tiny AutoencoderKL, a diffusion UNet on its latents, classification end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scope_stream.classify.testing import toy_crops, write_toy_folder  # noqa: E402
from scope_stream.config.train import TrainConfig  # noqa: E402


def test_latent_variant_trains_classifies_and_generates(tmp_path: Path) -> None:
    from scope_stream.classify.autoencoder import train_autoencoder
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.generate import sample_cells
    from scope_stream.classify.train import train_diffusion

    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=16)
    common: dict[str, Any] = dict(
        data=data,
        exclude_classes=[],
        holdout_fraction=0.2,
        image_size=16,
        norm_num_groups=8,
        batch_size=16,
        device="cpu",
        log_every=1000,
        checkpoint_every=1000,
        checkpoint_minutes=1000,
    )
    ae_cfg = TrainConfig(
        model_type="autoencoder",
        out=tmp_path / "ae",
        block_out_channels=[8, 16],
        latent_channels=4,
        steps=30,
        lr=2e-3,
        **common,
    )
    ae_dir = train_autoencoder(ae_cfg, progress=False)
    spec = json.loads((ae_dir / "config.json").read_text())
    assert spec["latent_channels"] == 4 and spec["scaling_factor"] > 0
    cfg = TrainConfig(
        out=tmp_path / "run",
        block_out_channels=[16, 32],
        attention_levels=[],
        steps=20,
        lr=2e-3,
        warmup_steps=2,
        ema_decay=0.9,
        autoencoder=ae_dir,
        **common,
    )
    res = train_diffusion(cfg, progress=False)
    assert np.mean(res["losses"][-5:]) < np.mean(res["losses"][:3])
    clf = DiffusionClassifier.load(tmp_path / "run" / "raw", device="cpu")
    assert clf.spec.latent_channels == 4 and clf.spec.sample_size == 8
    x, _ = toy_crops(4, 2, 16, seed=2)
    calls = clf.classify(x, ["1", "2", "3", "4"], procedure="fast")
    assert len(calls) == 4 and all(c.label in ("a", "b") for c in calls)
    imgs = sample_cells(clf, "a", n=2, steps=3)
    assert imgs.shape == (2, 16, 16, 3)
