"""Scan plans: useq-schema grids that cover a region of the slide with a given overlap.

A survey scan is a :class:`useq.GridFromEdges` over the scan region with an **explicit** field of
view (engines that look the field of view up themselves can collapse the grid step when a
sequence is iterated before it runs), centred on the region so that the overhang of the last row
and column is shared by both sides.

Coordinates are stage µm; a position is the stage position of the **centre** of the field (the
convention of :class:`scope_stream.vocabulary.Tile`).

>>> plan = ScanPlan.from_region((0, 0, 1000, 1000), fov_um=(256, 256), overlap=0.1)
>>> len(plan), plan.positions[0].x_um < plan.positions[1].x_um
(25, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import useq

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

__all__ = [
    "PlanError",
    "ScanPlan",
    "ScanPosition",
    "fov_for_objective",
    "grid_plan",
    "stage_limits",
]


class PlanError(ValueError):
    """A scan plan that cannot be made (region outside the stage limits, unknown objective...)."""


@dataclass(frozen=True)
class ScanPosition:
    """One field of a survey scan: the stage position of its centre and its place in the grid."""

    index: int
    x_um: float
    y_um: float
    row: int
    col: int

    @property
    def tile_id(self) -> str:
        """The id the tile of this field gets: ``s<index>`` zero-padded (``s000012``)."""
        return f"s{self.index:06d}"


_EPS = 1e-9  # relative


def _count(span: float, fov: float, step: float) -> int:
    return 1 if span <= fov else math.ceil((span - fov) / step - 1e-9) + 1


def grid_plan(
    region: tuple[float, float, float, float],
    fov_um: tuple[float, float],
    overlap: float,
    *,
    mode: str = "row_wise_snake",
    limits: tuple[float, float, float, float] | None = None,
) -> useq.GridFromEdges:
    """A useq grid covering ``region = (x0, y0, x1, y1)`` with fields of ``fov_um = (w, h)`` µm.

    ``overlap`` is a fraction of the field (0.1 = 10 %). The grid is centred on the region; with
    ``limits`` (stage limits of the field *centres*, ``(x0, y0, x1, y1)``) it is shifted inwards
    where it would reach past them, and a region whose grid cannot fit is a :class:`PlanError`.
    """
    x0, y0, x1, y1 = (float(v) for v in region)
    fw, fh = (float(v) for v in fov_um)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise PlanError(f"scan region must be finite (x0, y0, x1, y1) with x1 > x0, y1 > y0, got {region}")
    if not (fw > 0 and fh > 0 and math.isfinite(fw) and math.isfinite(fh)):
        raise PlanError(f"field of view must be positive, got {fov_um}")
    if not 0 <= overlap < 0.9:
        raise PlanError(f"overlap must be a fraction in [0, 0.9), got {overlap}")
    dx, dy = fw * (1 - overlap), fh * (1 - overlap)
    ncol, nrow = _count(x1 - x0, fw, dx), _count(y1 - y0, fh, dy)
    # grow the edges symmetrically so that ncol x nrow fields fit exactly (no one-sided overhang)
    width, height = fw + (ncol - 1) * dx, fh + (nrow - 1) * dy
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if limits is not None:
        cx = _shift_inside(cx, (width - fw) / 2, limits[0], limits[2], "x", region, limits)
        cy = _shift_inside(cy, (height - fh) / 2, limits[1], limits[3], "y", region, limits)
    # useq recounts the fields from the edges: pull them in by a hair so that float rounding in its
    # ceil((span - fov) / step) cannot add a row or column. ``top`` is the larger y (useq starts there).
    hw, hh = width / 2 - _EPS * width, height / 2 - _EPS * height
    return useq.GridFromEdges(
        left=cx - hw,
        right=cx + hw,
        top=cy + hh,
        bottom=cy - hh,
        overlap=(overlap * 100.0, overlap * 100.0),
        mode=mode,
        fov_width=fw,
        fov_height=fh,
    )


def _shift_inside(
    centre: float,
    half_span: float,
    lo: float,
    hi: float,
    axis: str,
    region: tuple[float, float, float, float],
    limits: tuple[float, float, float, float],
) -> float:
    """Move a grid's centre so its outermost field centres lie within [lo, hi]."""
    if 2 * half_span > hi - lo + 1e-9:
        raise PlanError(
            f"the scan region {tuple(region)} needs field centres {2 * half_span:.1f} µm apart in {axis}, "
            f"more than the stage limits {tuple(limits)} allow"
        )
    if centre - half_span < lo:
        centre = lo + half_span
    if centre + half_span > hi:
        centre = hi - half_span
    return centre


def stage_limits(cfg: ScopeStreamConfig) -> tuple[float, float, float, float]:
    """The stage limits (x0, y0, x1, y1) of field centres scope-stream moves to: ``scan.stage_limits_um``, else
    the microscope's stage travel (``microscope.stage_limits()``: the virtual slide grown by its margin)."""
    limits = cfg.scan.stage_limits_um if cfg.scan.stage_limits_um is not None else cfg.microscope.stage_limits()
    x0, y0, x1, y1 = (float(v) for v in limits)
    return (x0, y0, x1, y1)


def fov_for_objective(cfg: ScopeStreamConfig, objective: str) -> tuple[float, float]:
    """Field of view (width, height) in µm of the configured camera through ``objective``."""
    for obj in cfg.microscope.objectives:
        if obj.name == objective:
            return (cfg.microscope.camera_width * obj.pixel_size_um, cfg.microscope.camera_height * obj.pixel_size_um)
    names = [o.name for o in cfg.microscope.objectives]
    raise PlanError(f"objective {objective!r} is not configured (microscope.objectives: {names})")


@dataclass(frozen=True)
class ScanPlan:
    """A survey scan: the useq grid, its positions in acquisition order, the objective and focus."""

    grid: useq.GridFromEdges
    objective: str = ""
    z_um: float | None = None
    positions: tuple[ScanPosition, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.positions:
            # useq gives the order (snake, spiral...) and each field's row/column. Positions are recomputed
            # exactly from the grid's centre and step (useq's are off by float noise), and rows are counted
            # from the smallest y -- the top of the image, as stage y grows with image row (useq starts its
            # rows at the largest y: the same fields, mirrored numbering).
            g = self.grid
            raw = list(g.iter_grid_positions())
            ncol = max(int(p.col or 0) for p in raw) + 1
            nrow = max(int(p.row or 0) for p in raw) + 1
            ox, oy = g.overlap if isinstance(g.overlap, tuple) else (g.overlap, g.overlap)
            dx = float(g.fov_width or 0.0) * (1 - float(ox) / 100.0)
            dy = float(g.fov_height or 0.0) * (1 - float(oy) / 100.0)
            cx = (float(g.left) + float(g.right)) / 2
            cy = (float(g.top) + float(g.bottom)) / 2
            pos = tuple(
                ScanPosition(
                    index=i,
                    x_um=cx + (int(p.col or 0) - (ncol - 1) / 2) * dx,
                    y_um=cy + (int(p.row or 0) - (nrow - 1) / 2) * dy,
                    row=int(p.row or 0),
                    col=int(p.col or 0),
                )
                for i, p in enumerate(raw)
            )
            object.__setattr__(self, "positions", pos)

    # ---- construction
    @classmethod
    def from_region(
        cls,
        region: tuple[float, float, float, float],
        fov_um: tuple[float, float],
        overlap: float,
        *,
        mode: str = "row_wise_snake",
        limits: tuple[float, float, float, float] | None = None,
        objective: str = "",
        z_um: float | None = None,
    ) -> ScanPlan:
        """A plan covering ``region`` (see :func:`grid_plan`)."""
        return cls(grid_plan(region, fov_um, overlap, mode=mode, limits=limits), objective=objective, z_um=z_um)

    @classmethod
    def from_config(cls, cfg: ScopeStreamConfig, fov_um: tuple[float, float] | None = None) -> ScanPlan:
        """The survey scan of a configuration (``fov_um`` defaults to the camera through the scan objective)."""
        s = cfg.scan
        fov = fov_um if fov_um is not None else fov_for_objective(cfg, s.objective)
        return cls.from_region(
            (s.x0_um, s.y0_um, s.x1_um, s.y1_um),
            fov,
            s.overlap,
            mode=s.grid_mode,
            limits=stage_limits(cfg),
            objective=s.objective,
            z_um=s.z_um,
        )

    # ---- views
    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[ScanPosition]:
        return iter(self.positions)

    @property
    def fov_um(self) -> tuple[float, float]:
        return (float(self.grid.fov_width or 0.0), float(self.grid.fov_height or 0.0))

    @property
    def bounds_um(self) -> tuple[float, float, float, float]:
        """The area the fields cover, (x0, y0, x1, y1)."""
        return (
            float(min(self.grid.left, self.grid.right)),
            float(min(self.grid.top, self.grid.bottom)),
            float(max(self.grid.left, self.grid.right)),
            float(max(self.grid.top, self.grid.bottom)),
        )

    def to_sequence(self, **kwargs: Any) -> useq.MDASequence:
        """The plan as a ``useq.MDASequence`` (explicit stage positions, so no engine can re-space them).

        Extra keyword arguments (e.g. ``channels``) go to :class:`useq.MDASequence`.
        """
        z = self.z_um
        positions = [useq.AbsolutePosition(x=p.x_um, y=p.y_um, z=z, name=p.tile_id) for p in self.positions]
        return useq.MDASequence(stage_positions=positions, **kwargs)

    def to_pycromanager_events(self) -> list[dict[str, Any]]:
        """The plan as pycromanager acquisition events (``axes: {"position": i}``, ``x``, ``y`` [, ``z``])."""
        events: list[dict[str, Any]] = []
        for p in self.positions:
            ev: dict[str, Any] = {"axes": {"position": p.index}, "x": p.x_um, "y": p.y_um}
            if self.z_um is not None:
                ev["z"] = self.z_um
            events.append(ev)
        return events
