"""npe2 reader: open a scope-stream slide store (``<slide>.zarr``) as napari layers.

Layers (all in stage µm, so they overlay each other and anything else placed by stage position):

* the survey **mosaic** (the store's own overview when it has one, else built from the tiles),
* one image per **re-imaged** field at full resolution,
* **flags** (points coloured by class, sized by uncertainty; features carry score, reasons and
  the reviewer's label),
* every other classified **cell** (points, hidden by default),
* the **tile outlines** of the survey (shapes, hidden by default).

Plain OME-Zarr stores that are not scope-stream slides are left to other readers (``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scope_stream.view.cells import CellRecord
from scope_stream.view.flags import ClassPalette, flag_layer_data
from scope_stream.view.follow import StoreFollower, is_slide_store
from scope_stream.view.mosaic import MosaicCanvas, tile_translate_um

__all__ = ["get_reader", "read_slide_store"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]


def _store_root(path: str | Path) -> Path | None:
    """The store root for ``path`` (the store itself, or a path inside it such as ``.../tables``)."""
    p = Path(path)
    for cand in (p, *p.parents[:3]):
        if (cand.suffix == ".zarr" or (cand / "zarr.json").is_file()) and is_slide_store(cand):
            return cand
    return None


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 ``get_reader``: a reader function if ``path`` is a scope-stream slide store, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if _store_root(path) is None:
        return None
    return read_slide_store


def _mosaic_layer(f: StoreFollower, scan: list[Any], meta: dict[str, Any]) -> LayerData | None:
    m = None
    try:
        m = f.mosaic()
    except Exception as exc:
        log.warning("%s: mosaic unreadable (%s); rebuilding it from the tiles", f.path, exc)
    if m is not None:
        image, scale, translate = m
        data: Any = image
        multiscale = False
    else:
        tiles = [t for t in scan if t.path]
        if not tiles:
            return None
        p = min(t.pixel_size_um for t in tiles)
        canvas: MosaicCanvas | None = None
        for t in tiles:
            try:
                pixels = f.read_pixels(t)
            except Exception as exc:
                log.warning("tile %s unreadable: %s", t.tile_id, exc)
                continue
            if canvas is None:
                colour = pixels.ndim == 3 and pixels.shape[2] in (3, 4)
                canvas = MosaicCanvas(p * 4, channels=3 if colour else 1, n_levels=3, max_side_px=8192)
            canvas.paste(pixels, t.x_um, t.y_um, t.pixel_size_um)
        if canvas is None:
            return None
        data = canvas.levels
        multiscale = True
        scale, translate = canvas.scale_um, canvas.translate_um
    rgb = (data[0] if multiscale else data).ndim == 3
    kw = {
        "name": "scope-stream mosaic",
        "rgb": rgb,
        "multiscale": multiscale,
        "scale": (scale, scale),
        "translate": tuple(translate),
        "metadata": {**meta, "kind": "mosaic"},
    }
    return data, kw, "image"


def read_slide_store(path: str | list[str]) -> list[LayerData]:
    """Layers of a slide store (see the module docstring)."""
    if isinstance(path, list):
        path = path[0]
    root = _store_root(path)
    if root is None:
        raise ValueError(f"{path} is not a scope-stream slide store")
    f = StoreFollower(root, crops="none")
    delta = f.poll()
    cells: list[CellRecord] = []
    retracted = set(delta.retracted)  # copies of better-centred cells in overlapping tiles
    for c in delta.cells:
        if c.cell_id in retracted:
            continue
        if c.cell_id in delta.reviews:
            label, reviewer, secs = delta.reviews[c.cell_id]
            c = c.with_review(label, reviewer, secs)
        cells.append(c)
    meta = {"scope_stream": {"store": str(root), "slide_id": f.slide_id, "status": f.status}}
    layers: list[LayerData] = []
    scan = [t for t in delta.tiles if t.kind == "scan"]
    mosaic = _mosaic_layer(f, scan, meta)
    if mosaic is not None:
        layers.append(mosaic)
    for t in (t for t in delta.tiles if t.kind == "reimage" and t.path):
        try:
            pixels = f.read_pixels(t)
        except Exception as exc:
            log.warning("re-image tile %s unreadable: %s", t.tile_id, exc)
            continue
        layers.append(
            (
                pixels,
                {
                    "name": f"re-image {t.tile_id}",
                    "rgb": pixels.ndim == 3 and pixels.shape[2] in (3, 4),
                    "scale": (t.pixel_size_um, t.pixel_size_um),
                    "translate": tile_translate_um(t.x_um, t.y_um, t.height, t.width, t.pixel_size_um),
                    "metadata": {**meta, "kind": "reimage", "tile_id": t.tile_id, "z_um": t.z_um},
                },
                "image",
            )
        )
    palette = ClassPalette()
    flagged = [c for c in cells if c.flagged]
    others = [c for c in cells if c.classified and not c.flagged]
    for name, recs, visible in (("scope-stream flags", flagged, True), ("scope-stream cells", others, False)):
        data = flag_layer_data(recs, palette=palette, base_size_um=10.0, uncertainty_gain=1.0)
        features = dict(data.features)
        by_id = {r.cell_id: r for r in recs}
        features["model_label"] = np.array([by_id[i].label for i in data.cell_ids], dtype=object)
        features["reviewer_label"] = np.array([by_id[i].reviewer_label for i in data.cell_ids], dtype=object)
        features["reasons"] = np.array([",".join(by_id[i].flag_reasons) for i in data.cell_ids], dtype=object)
        layers.append(
            (
                data.points,
                {
                    "name": name,
                    "features": features,
                    "face_color": "transparent",  # circles around the cells, as in the widget
                    "border_color": data.face_colors if len(data) else "white",
                    "border_width": 0.15,
                    "border_width_is_relative": True,
                    "size": data.sizes if len(data) else 8.0,
                    "symbol": "disc",
                    "visible": visible,
                    "metadata": {**meta, "kind": "flags" if visible else "cells"},
                },
                "points",
            )
        )
    if scan:
        rects = [
            np.array(
                [
                    [t.y_um - t.height_um / 2, t.x_um - t.width_um / 2],
                    [t.y_um + t.height_um / 2, t.x_um + t.width_um / 2],
                ]
            )
            for t in scan
        ]
        layers.append(
            (
                rects,
                {
                    "name": "scope-stream tiles",
                    "shape_type": "rectangle",
                    "edge_color": "yellow",
                    "face_color": "transparent",
                    "edge_width": 1.0,
                    "visible": False,
                    "features": {"tile_id": np.array([t.tile_id for t in scan], dtype=object)},
                    "metadata": {**meta, "kind": "tiles"},
                },
                "shapes",
            )
        )
    return layers
