"""The (virtual) microscope: slide, camera, stage and objectives."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from .base import Section


class ObjectiveConfig(Section):
    """One objective on the nosepiece and the pixel size it gives on the camera."""

    name: str
    magnification: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)


class MicroscopeConfig(Section):
    """The virtual microscope used by the demo and the integration tests."""

    seed: int = 0
    slide_width_um: float = Field(default=4000.0, gt=0)
    slide_height_um: float = Field(default=3000.0, gt=0)
    wbc_per_mm2: float = Field(default=60.0, ge=0)
    rbc_coverage: float = Field(default=0.35, ge=0, le=0.9)
    platelets_per_mm2: float = Field(default=400.0, ge=0)
    abnormal_fraction: float = Field(default=0.1, ge=0, le=1)
    abnormal_classes: list[str] = Field(default_factory=lambda: ["ig", "erythroblast"])
    camera_width: int = Field(default=512, ge=16, le=8192)
    camera_height: int = Field(default=512, ge=16, le=8192)
    exposure_ms: float = Field(default=10.0, gt=0)
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            ObjectiveConfig(name="20x", magnification=20, pixel_size_um=0.5),
            ObjectiveConfig(name="50x", magnification=50, pixel_size_um=0.2),
        ]
    )
    stage_speed_um_per_s: float = Field(default=20000.0, gt=0)
    data_dir: Path | None = None  # None: the packaged sample; else a folder like ../shared/data

    @model_validator(mode="after")
    def _objectives_unique(self) -> MicroscopeConfig:
        names = [o.name for o in self.objectives]
        if not names:
            raise ValueError("at least one objective is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        return self
