"""What to scan and how: region, overlap, backend, adaptive re-imaging and the control endpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section

Backend = Literal["virtual", "pymmcore-plus", "pycromanager", "pycromanager-java", "replay"]
GridMode = Literal["row_wise_snake", "row_wise", "column_wise_snake", "column_wise", "spiral"]


class ScanConfig(Section):
    """A survey scan of a rectangle of the slide, in stage µm, plus adaptive re-imaging of flagged cells.

    The region ``(x0_um, y0_um) - (x1_um, y1_um)`` is covered by a grid of fields of view of the scan
    ``objective`` overlapping by ``overlap`` (a fraction of the field), centred on the region.
    """

    backend: Backend = Field(default="virtual", description="what acquires the tiles (docs/acquisition.md)")
    x0_um: float = Field(default=0.0, description="left edge of the scan region (stage x)")
    y0_um: float = Field(default=0.0, description="top edge of the scan region (stage y)")
    x1_um: float = Field(default=1000.0, description="right edge of the scan region; must be > x0_um")
    y1_um: float = Field(default=1000.0, description="bottom edge of the scan region; must be > y0_um")
    overlap: float = Field(
        default=0.1, ge=0.0, lt=0.9, description="overlap of neighbouring fields, a fraction of a field"
    )
    grid_mode: GridMode = Field(default="row_wise_snake", description="the order the fields are imaged in")
    objective: str = Field(default="20x", description="survey objective: a name in microscope.objectives")
    z_um: float | None = None  # focus for the survey; None: leave the focus where it is

    # ---- adaptive re-imaging
    adaptive: bool = Field(default=True, description="re-image flagged cells with reimage_objective")
    reimage_objective: str = Field(default="50x", description="re-image objective: a name in microscope.objectives")
    reimage_budget: int = Field(default=10, ge=0)  # re-image *positions* per slide (each may be a focus stack)
    focus_stack: list[float] = Field(default_factory=lambda: [0.0], min_length=1)  # z offsets in µm
    reimage_min_score: float | None = None  # only flags scoring at least this trigger a re-image
    reimage_min_separation_um: float | None = None  # None: half the re-image field; closer flags share one
    # wait this long for the last results (flags) after the scan; a CPU classifier can take minutes to catch up
    results_timeout_s: float = Field(default=600.0, gt=0)

    # ---- stage limits (for every move scope-stream makes: plan, adaptive, control requests)
    # None: the microscope's stage travel (microscope.stage_limits(): the slide grown by stage_margin_um)
    stage_limits_um: tuple[float, float, float, float] | None = None

    # ---- control endpoint (re-image requests from napari or scanners; ZeroMQ ROUTER)
    control: bool = Field(default=True, description="serve re-image requests on a control endpoint")
    control_host: str = Field(default="127.0.0.1", description="where the control endpoint binds")
    control_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    control_keys_dir: Path | None = None  # CurveZMQ keys; required off loopback (default: pipeline.curve_keys_dir)
    control_max_pending: int = Field(default=16, ge=1)
    hold_open_s: float = Field(default=0.0, ge=0)  # keep serving control requests this long after the scan

    # ---- backends
    rate_limit_tiles_per_s: float | None = Field(default=None, gt=0)  # also the replay rate
    replay_path: Path | None = None  # a folder with tiles.csv, or a <slide>.zarr store of an earlier scan
    pycromanager_port: int = Field(default=4827, ge=1, le=65535)  # the Micro-Manager GUI's ZMQ server
    pycromanager_directory: Path | None = None  # pycromanager's own saving (None: RAM / no saving)
    java_transfer: Literal["process", "saved"] = "process"  # image_process_fn, or read image_saved_fn's dataset
    follow_poll_ms: int = Field(default=50, ge=1, le=10_000)  # GUI datastore follower poll interval

    @model_validator(mode="after")
    def _region(self) -> ScanConfig:
        # "field: message" names the field in ConfigError (loader._describe), not the whole section
        reversed_axes = [
            (hi, f"the region needs {hi} > {lo}, got {lo}={getattr(self, lo)}, {hi}={getattr(self, hi)}")
            for lo, hi in (("x0_um", "x1_um"), ("y0_um", "y1_um"))
            if getattr(self, hi) <= getattr(self, lo)
        ]
        if reversed_axes:
            raise ValueError(
                f"{reversed_axes[0][0]}: " + "; ".join(text for _, text in reversed_axes) + " (is it reversed?)"
            )
        if self.stage_limits_um is not None:
            lx0, ly0, lx1, ly1 = self.stage_limits_um
            if not all(math.isfinite(v) for v in self.stage_limits_um) or lx1 <= lx0 or ly1 <= ly0:
                raise ValueError(
                    f"stage_limits_um: must be finite (x0, y0, x1, y1) with x1 > x0, y1 > y0, "
                    f"got {self.stage_limits_um}"
                )
        if any(not math.isfinite(z) for z in self.focus_stack):
            raise ValueError(f"focus_stack: offsets must be finite, got {self.focus_stack}")
        return self
