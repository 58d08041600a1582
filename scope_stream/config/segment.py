"""Cell detection and segmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class SegmentConfig(Section):
    """Classic (scikit-image) segmentation of Romanowsky-stained bright-field tiles."""

    method: Literal["classic"] = "classic"
    crop_um: float = Field(default=20.0, gt=0)  # physical side of a white-cell crop
    crop_px: int = Field(default=32, ge=8, le=512)  # resampled to the classifier's input size
    min_wbc_diameter_um: float = Field(default=6.0, gt=0)
    max_wbc_diameter_um: float = Field(default=30.0, gt=0)
    dedup_radius_um: float = Field(default=4.0, ge=0)
