"""What to scan and how: region, overlap, backend and adaptive re-imaging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class ScanConfig(Section):
    """A survey scan of a rectangle of the slide, in stage µm."""

    backend: Literal["virtual", "pymmcore-plus", "pycromanager", "pycromanager-java", "replay"] = "virtual"
    x0_um: float = 0.0
    y0_um: float = 0.0
    x1_um: float = 1000.0
    y1_um: float = 1000.0
    overlap: float = Field(default=0.1, ge=0.0, lt=0.9)
    objective: str = "20x"
    adaptive: bool = True
    reimage_objective: str = "50x"
    reimage_budget: int = Field(default=10, ge=0)
    focus_stack: list[float] = Field(default_factory=lambda: [0.0])  # z offsets in µm
    rate_limit_tiles_per_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _region(self) -> ScanConfig:
        if self.x1_um <= self.x0_um or self.y1_um <= self.y0_um:
            raise ValueError(
                f"scan region must have x1_um > x0_um and y1_um > y0_um, got "
                f"({self.x0_um}, {self.y0_um}) - ({self.x1_um}, {self.y1_um})"
            )
        return self
