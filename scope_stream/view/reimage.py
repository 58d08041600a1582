"""Re-image requests from the viewer: where to go, checked before anything is sent.

The operator selects a flag (a point) or draws a rectangle; :func:`plan_targets` turns that into
stage positions for the acquisition's control endpoint (``scope_stream.acquire.control``,
``ReimageClient.reimage``): the point itself, or the centres of the fewest high-magnification
fields that cover the rectangle (capped, so a slip of the mouse cannot queue a hundred moves).
:func:`explain_error` turns the endpoint's error codes into sentences for the widget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ReimagePlanError", "ReimageTarget", "explain_error", "plan_targets", "rect_from_corners"]


class ReimagePlanError(ValueError):
    """The selection cannot become a re-image request (message says why, for the widget)."""


@dataclass(frozen=True)
class ReimageTarget:
    """One stage position to image again (field centre, µm) and why."""

    x_um: float
    y_um: float
    reason: str = ""
    cell_id: str = ""


def rect_from_corners(points_yx: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> tuple[float, ...]:
    """``(x0, y0, x1, y1)`` of the bounding box of napari shape vertices given as ``(y, x)``."""
    if not points_yx:
        raise ReimagePlanError("the rectangle has no vertices")
    ys = [float(p[0]) for p in points_yx]
    xs = [float(p[1]) for p in points_yx]
    return min(xs), min(ys), max(xs), max(ys)


def plan_targets(
    *,
    point: tuple[float, float] | None = None,
    rect: tuple[float, float, float, float] | None = None,
    field_um: tuple[float, float] | None = None,
    stage_limits_um: tuple[float, float, float, float] | None = None,
    max_fields: int = 9,
    reason: str = "",
    cell_id: str = "",
) -> list[ReimageTarget]:
    """Stage positions for a point ``(x, y)`` or a rectangle ``(x0, y0, x1, y1)`` (µm).

    A rectangle larger than one field (``field_um`` = (width, height) of the re-image objective's
    field) is covered by a small grid of fields; without ``field_um`` only its centre is imaged.
    Positions outside ``stage_limits_um`` are refused here, before the microscope is asked.
    """
    if (point is None) == (rect is None):
        raise ReimagePlanError("select one flag or draw one rectangle to re-image")
    targets: list[ReimageTarget] = []
    if point is not None:
        x, y = (float(v) for v in point)
        targets.append(ReimageTarget(x, y, reason, cell_id))
    else:
        assert rect is not None
        x0, y0, x1, y1 = (float(v) for v in rect)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ReimagePlanError(f"the rectangle has non-finite corners {rect}")
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        if field_um is None or field_um[0] <= 0 or field_um[1] <= 0:
            nx = ny = 1
        else:
            nx = max(1, math.ceil((x1 - x0) / field_um[0] - 1e-9))
            ny = max(1, math.ceil((y1 - y0) / field_um[1] - 1e-9))
        if nx * ny > max_fields:
            raise ReimagePlanError(
                f"the rectangle needs {nx} x {ny} = {nx * ny} fields at the re-image objective; "
                f"at most {max_fields} are allowed: draw a smaller one"
            )
        for j in range(ny):
            for i in range(nx):
                cx = x0 + (i + 0.5) * (x1 - x0) / nx
                cy = y0 + (j + 0.5) * (y1 - y0) / ny
                targets.append(ReimageTarget(cx, cy, reason or "operator rectangle"))
    for t in targets:
        if not (math.isfinite(t.x_um) and math.isfinite(t.y_um)):
            raise ReimagePlanError(f"position ({t.x_um}, {t.y_um}) is not finite")
        if stage_limits_um is not None:
            lx0, ly0, lx1, ly1 = stage_limits_um
            if not (lx0 <= t.x_um <= lx1 and ly0 <= t.y_um <= ly1):
                raise ReimagePlanError(
                    f"({t.x_um:.1f}, {t.y_um:.1f}) µm is outside the stage range "
                    f"x {lx0:g}..{lx1:g}, y {ly0:g}..{ly1:g} µm"
                )
    return targets


_MESSAGES = {
    "out_of_limits": "outside the stage range",
    "busy": "the microscope is busy (too many re-images queued); try again in a moment",
    "closed": "the scan has finished: the microscope no longer takes requests",
    "timeout": "no answer from the microscope's control endpoint (is the scan running? is the address right?)",
    "unknown_objective": "that objective is not on the microscope",
    "slide_mismatch": "the microscope is scanning another slide",
    "malformed": "the request was refused as malformed",
    "version": "the microscope speaks another protocol version",
    "failed": "the acquisition failed",
}


def explain_error(code: str, detail: str = "") -> str:
    """A sentence for the widget from a control error ``code`` and its ``detail``."""
    msg = _MESSAGES.get(code, code or "error")
    return f"{msg}: {detail}" if detail and detail not in msg else msg
