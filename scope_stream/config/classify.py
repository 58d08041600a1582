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


class FlagConfig(Section):
    """When a classified cell is flagged for review."""

    anomaly_threshold: float = 0.5
    uncertainty_threshold: float = Field(default=0.6, ge=0, le=1)
    abnormal_classes: list[str] = Field(default_factory=list)
