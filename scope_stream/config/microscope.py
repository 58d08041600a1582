"""The (virtual) microscope: slide, camera, stage and objectives.

These settings drive :class:`scope_stream.acquire.slide.VirtualSlide` and
:func:`scope_stream.acquire.virtual.build_virtual_core`. Every default gives a working demo microscope.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section

#: PBC classes that are white cells (nucleated cells) and may be planted on the slide.
WBC_CLASSES: tuple[str, ...] = (
    "neutrophil",
    "eosinophil",
    "basophil",
    "lymphocyte",
    "monocyte",
    "ig",
    "erythroblast",
)


class ObjectiveConfig(Section):
    """One objective on the nosepiece and the pixel size it gives on the camera."""

    name: str = Field(min_length=1)
    magnification: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)
    numerical_aperture: float = Field(default=0.5, gt=0, le=1.6)


class MicroscopeConfig(Section):
    """The virtual microscope used by the demo and the integration tests."""

    # ---- the slide
    seed: int = Field(default=0, description="the virtual slide's random seed (same seed, same slide)")
    slide_width_um: float = Field(default=4000.0, gt=0)
    slide_height_um: float = Field(default=3000.0, gt=0)
    chunk_um: float = Field(default=100.0, ge=20.0, le=2000.0)  # cells are laid out per chunk, lazily
    wbc_per_mm2: float = Field(default=60.0, ge=0)
    rbc_coverage: float = Field(default=0.35, ge=0, le=0.9)  # area share covered by red cells
    platelets_per_mm2: float = Field(default=400.0, ge=0)
    abnormal_fraction: float = Field(default=0.1, ge=0, le=1)  # share of white cells drawn from abnormal_classes
    abnormal_classes: list[str] = Field(default_factory=lambda: ["ig", "erythroblast"])
    # relative frequencies of the normal white cells (a normal adult differential count)
    wbc_class_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "neutrophil": 0.60,
            "lymphocyte": 0.30,
            "monocyte": 0.06,
            "eosinophil": 0.03,
            "basophil": 0.01,
        }
    )
    rbc_source: Literal["pbc", "bccd"] = "pbc"  # where red-cell sprites are cut from
    rbc_source_images: int = Field(default=48, ge=1, le=2000)  # how many source images red cells are cut from
    background_rgb: tuple[float, float, float] = (240.0, 218.0, 194.0)  # empty-glass colour at exposure_ms
    data_dir: Path | None = None  # None: the packaged sample; else a folder like ../shared/data
    sprite_cache_size: int = Field(default=2048, ge=16)

    # ---- the camera
    camera_width: int = Field(default=512, ge=16, le=8192, description="camera pixels across")
    camera_height: int = Field(default=512, ge=16, le=8192, description="camera pixels down")
    exposure_ms: float = Field(default=10.0, gt=0)  # the exposure at which background_rgb is reached
    camera_noise: bool = Field(default=True, description="shot and read noise on the virtual camera")
    camera_full_well_e: float = Field(default=10000.0, gt=0)  # electrons at 255 DN: sets the shot noise
    camera_read_noise_dn: float = Field(default=1.0, ge=0)
    camera_offset_dn: float = Field(default=2.0, ge=0, le=50)

    # ---- objectives and focus
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            ObjectiveConfig(name="20x", magnification=20, pixel_size_um=0.5, numerical_aperture=0.5),
            ObjectiveConfig(name="50x", magnification=50, pixel_size_um=0.2, numerical_aperture=0.75),
        ]
    )
    objective_switch_ms: float = Field(default=300.0, ge=0, description="time an objective change takes")
    focus_z_um: float = 0.0  # focus-drive position at which the slide is sharp (at the slide origin)
    focus_tilt_um_per_mm: tuple[float, float] = (0.0, 0.0)  # slide tilt: in-focus z change per mm of x, y
    defocus_blur_um_per_um: float = Field(default=0.35, ge=0)  # blur sigma (µm) per µm of defocus at NA 0.5
    z_limits_um: tuple[float, float] = (-500.0, 500.0)
    focus_speed_um_per_s: float = Field(default=2000.0, gt=0)
    focus_settle_ms: float = Field(default=5.0, ge=0)

    # ---- the XY stage
    stage_speed_um_per_s: float = Field(default=20000.0, gt=0)
    stage_accel_um_per_s2: float = Field(default=200000.0, gt=0)  # 200 mm/s^2: a field-sized move takes ~0.1 s
    stage_settle_ms: float = Field(default=15.0, ge=0)
    stage_limits_um: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1); None: slide +- margin
    stage_margin_um: float = Field(default=500.0, ge=0, description="stage travel beyond the slide edges")
    realtime: bool = True  # moves, objective switches and exposures take their real time

    @model_validator(mode="after")
    def _check(self) -> MicroscopeConfig:
        names = [o.name for o in self.objectives]
        if not names:
            raise ValueError("at least one objective is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        bad = [c for c in self.abnormal_classes if c not in WBC_CLASSES]
        if bad:
            raise ValueError(f"abnormal_classes {bad} are not white-cell classes of PBC {list(WBC_CLASSES)}")
        if self.abnormal_fraction > 0 and not self.abnormal_classes:
            raise ValueError("abnormal_fraction > 0 needs at least one class in abnormal_classes")
        bad = [c for c in self.wbc_class_weights if c not in WBC_CLASSES]
        if bad:
            raise ValueError(f"wbc_class_weights names {bad}, which are not white-cell classes {list(WBC_CLASSES)}")
        if any(w < 0 for w in self.wbc_class_weights.values()):
            raise ValueError("wbc_class_weights must be >= 0")
        normal = {k: w for k, w in self.wbc_class_weights.items() if k not in self.abnormal_classes and w > 0}
        if self.abnormal_fraction < 1 and self.wbc_per_mm2 > 0 and not normal:
            raise ValueError("wbc_class_weights gives no normal class a weight > 0")
        if any(not (0 <= c <= 255) for c in self.background_rgb):
            raise ValueError(f"background_rgb must be within 0..255, got {self.background_rgb}")
        if self.z_limits_um[1] <= self.z_limits_um[0]:
            raise ValueError(f"z_limits_um must be (low, high) with high > low, got {self.z_limits_um}")
        if self.stage_limits_um is not None:
            x0, y0, x1, y1 = self.stage_limits_um
            if x1 <= x0 or y1 <= y0:
                raise ValueError(
                    f"stage_limits_um must be (x0, y0, x1, y1) with x1 > x0, y1 > y0, got {(x0, y0, x1, y1)}"
                )
        return self

    # ---- helpers
    def objective(self, name: str) -> ObjectiveConfig:
        """The objective called ``name``; a clear error lists the known ones."""
        for o in self.objectives:
            if o.name == name:
                return o
        raise KeyError(f"unknown objective {name!r}; configured objectives: {[o.name for o in self.objectives]}")

    def stage_limits(self) -> tuple[float, float, float, float]:
        """XY stage travel (x0, y0, x1, y1) in µm: explicit, or the slide grown by ``stage_margin_um``."""
        if self.stage_limits_um is not None:
            return self.stage_limits_um
        m = self.stage_margin_um
        return (-m, -m, self.slide_width_um + m, self.slide_height_um + m)
