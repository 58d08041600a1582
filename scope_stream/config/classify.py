"""Classification and flagging."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class ClassifierConfig(Section):
    """The generative (diffusion) classifier used by workers."""

    model: Path | None = None  # None: the shipped model in models/
    procedure: Literal["fast", "reference"] = "fast"
    device: str = "auto"
    seed: int = 0
    max_batch: int = Field(default=256, ge=1)  # UNet evaluations per forward pass


class FlagConfig(Section):
    """When a classified cell is flagged for review.

    The defaults match the shipped model's ``calibration.json`` (``flags``): the anomaly score is
    calibrated so that ``anomaly_threshold`` = 0.95 flags about 5% of normal held-out cells, and
    ``uncertainty_threshold`` is the 95th percentile of normalised entropy on the same cells.
    """

    anomaly_threshold: float = Field(default=0.95, ge=0, le=1)
    uncertainty_threshold: float = Field(default=0.6, ge=0, le=1)
    abnormal_classes: list[str] = Field(default_factory=list)
