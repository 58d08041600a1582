"""Training configuration for the diffusion classifier (``configs/train-pbc.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class TrainConfig(Section):
    """Everything ``scope-stream train`` needs; a file with ``kind: train``."""

    kind: Literal["train"] = "train"
    data: Path = Path("../shared/data/pbc")
    out: Path = Path("runs/pbc")
    exclude_classes: list[str] = Field(default_factory=lambda: ["ig", "erythroblast"])
    image_size: int = Field(default=32, ge=8, le=512)
    batch_size: int = Field(default=64, ge=1)
    steps: int = Field(default=3000, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = Field(default=250, ge=1)
