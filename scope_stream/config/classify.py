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
    # UNet arithmetic. auto: bf16 autocast on CUDA (faster), float32 on CPU. The shipped model's calibration
    # was fitted in float32; fp32 reproduces its figures on a GPU, bf16's effect on them was not measured.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    max_batch: int = Field(default=256, ge=1)  # UNet evaluations per forward pass


class FlagConfig(Section):
    """When a classified cell is flagged for review.

    The anomaly score is calibrated on normal held-out cells: a threshold ``q`` flags about
    ``1 - q`` of normal cells. The default 0.85 is a screening operating point (about 15% of normal
    cells go to review, so that most abnormal ones do); 0.95 flags about 5% and misses more. The
    measured trade-off on PBC and on the virtual slide is in the model card. ``uncertainty_threshold``
    is on normalised entropy (0..1); ``calibration.json`` (``flags``) holds the 5% values.
    """

    anomaly_threshold: float = Field(default=0.85, ge=0, le=1)
    uncertainty_threshold: float = Field(default=0.6, ge=0, le=1)
    abnormal_classes: list[str] = Field(default_factory=list)
