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

    Unset thresholds (the default) are the model's own, from its ``calibration.json`` (``flags``):
    fitted on held-out cells when the model was calibrated, so the operating point travels with the
    model. The anomaly score is calibrated on normal held-out cells: a threshold ``q`` flags about
    ``1 - q`` of normal cells (0.85, the shipped model's, is a screening point: about 15% of normal cells
    go to review so that most abnormal ones do; 0.95 flags about 5% and misses more). The uncertainty
    threshold is on normalised entropy (0..1). Models calibrated before honest temperatures (whose
    calibration does not say what its temperature was fitted on) fall back to 0.85 and 0.6.
    Set a number here to override the model's value.
    """

    anomaly_threshold: float | None = Field(default=None, ge=0, le=1)
    uncertainty_threshold: float | None = Field(default=None, ge=0, le=1)
    abnormal_classes: list[str] = Field(default_factory=list)
    # "unfamiliar appearance": the cell's calibrated distance to the training cells in the model's own features
    # (about 1 - q of normal held-out cells reach q); a slide where many cells do is from unfamiliar ground
    unfamiliar_threshold: float = Field(default=0.95, ge=0, le=1)
    # the slide's domain check: the differential is not to be trusted when more than this share of its white
    # cells look unfamiliar (about 5% of cells from the training lab do at the default threshold)
    unfamiliar_slide_share: float = Field(default=0.25, gt=0, le=1)

    def resolved(self, model_flags: dict[str, float] | None) -> FlagConfig:
        """This config with unset thresholds taken from ``model_flags`` (the model's calibrated values;
        None: the fallback 0.85 / 0.6)."""
        fallback = {"anomaly_threshold": FALLBACK_ANOMALY_THRESHOLD, "uncertainty_threshold": 0.6}
        src = model_flags or fallback
        return self.model_copy(
            update={
                k: getattr(self, k) if getattr(self, k) is not None else float(src.get(k, fallback[k]))
                for k in fallback
            }
        )

    @property
    def anomaly(self) -> float:
        """The anomaly threshold in force (the fallback when unresolved)."""
        return self.anomaly_threshold if self.anomaly_threshold is not None else FALLBACK_ANOMALY_THRESHOLD

    @property
    def uncertainty(self) -> float:
        """The uncertainty threshold in force (the fallback when unresolved)."""
        return self.uncertainty_threshold if self.uncertainty_threshold is not None else 0.6


#: the screening operating point used where neither the config nor the model gives an anomaly threshold
FALLBACK_ANOMALY_THRESHOLD = 0.85
