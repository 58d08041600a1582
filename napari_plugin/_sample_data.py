"""npe2 sample data: a small survey scan of the virtual slide (real PBC/BCCD cells, deterministic).

A 3 x 3 grid of 20x fields (512 x 512 px at 0.5 µm/px, 10 % overlap) rendered by the virtual
microscope, pasted at full resolution by stage position, plus the planted white cells (ground
truth) as points coloured by class -- what a scan looks like before any analysis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["virtual_slide_scan"]


def virtual_slide_scan(
    *, n: int = 3, field_px: int = 512, pixel_size_um: float = 0.5, origin_um: tuple[float, float] = (600.0, 600.0)
) -> list[tuple[Any, dict[str, Any], str]]:
    """Layers: the scan mosaic (full resolution) and the planted white cells."""
    from scope_stream.acquire.plan import ScanPlan
    from scope_stream.acquire.slide import VirtualSlide
    from scope_stream.config import MicroscopeConfig
    from scope_stream.view.flags import ClassPalette
    from scope_stream.view.mosaic import MosaicCanvas

    slide = VirtualSlide(MicroscopeConfig())
    fov = field_px * pixel_size_um
    span = fov + (n - 1) * fov * 0.9
    x0, y0 = origin_um
    region = (x0, y0, x0 + span, y0 + span)
    plan = ScanPlan.from_region(region, fov_um=(fov, fov), overlap=0.1)
    canvas = MosaicCanvas(pixel_size_um, channels=3, n_levels=1, max_side_px=8192)
    for pos in plan.positions:
        img = slide.render(pos.x_um, pos.y_um, field_px, field_px, pixel_size_um)
        canvas.paste(img, pos.x_um, pos.y_um, pixel_size_um)
    ex0, ey0, ex1, ey1 = canvas.extent_um
    truth = slide.ground_truth((ex0, ey0, ex1, ey1), kinds=("WBC",))
    palette = ClassPalette()
    points = np.array([[c.y_um, c.x_um] for c in truth], dtype=float).reshape(-1, 2)
    colours = np.array([palette.rgba(c.label) for c in truth], dtype=float).reshape(-1, 4)
    meta = {"scope_stream": {"sample": "virtual slide", "seed": slide.cfg.seed, "region_um": list(region)}}
    return [
        (
            canvas.levels[0],
            {
                "name": "virtual slide scan (20x)",
                "rgb": True,
                "scale": (canvas.scale_um, canvas.scale_um),
                "translate": canvas.translate_um,
                "metadata": meta,
            },
            "image",
        ),
        (
            points,
            {
                "name": "planted white cells (truth)",
                "face_color": colours if len(truth) else "white",
                "size": np.array([c.diameter_um * 1.6 for c in truth], dtype=float) if truth else 10.0,
                "symbol": "ring",
                "features": {
                    "label": np.array([c.label for c in truth], dtype=object),
                    "abnormal": np.array([c.abnormal for c in truth], dtype=bool),
                },
                "metadata": meta,
            },
            "points",
        ),
    ]
