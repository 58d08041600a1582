"""Analyzers for the acquisition tests (imported by spawned workers as ``scan_helpers:<factory>``).

``flag_listed`` is a real (tiny) analysis: in survey tiles whose id is listed in
``pipeline.stage_options["flag_tile_ids"]`` it finds the darkest spot (smoothed) and reports it as one
flagged white cell at its stage position; every other tile gets an empty result. It lets the tests
decide which tile yields a flag, and check that the re-image lands on that spot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, FlagReason, Tile, TileResult


def darkest_spot(pixels: np.ndarray) -> tuple[float, float]:
    """(row, col) of the darkest 9x9 neighbourhood of a tile (grayscale mean of the channels)."""
    from scipy import ndimage

    gray = pixels.astype(np.float32)
    if gray.ndim == 3:
        gray = gray[..., :3].mean(axis=2)
    smooth = ndimage.uniform_filter(gray, size=9, mode="nearest")
    r, c = np.unravel_index(int(np.argmin(smooth)), smooth.shape)
    return float(r), float(c)


class _Result(TileResult):
    """A TileResult whose wire form survives zero crops.

    ``TileResult.to_wire`` casts the crops buffer with ``memoryview.cast("B")``, which numpy refuses for an
    array with a zero in its shape ("cannot cast view with zeros in shape or strides"), so a result with
    no crops could not be sent (reported to the vocabulary owner). Same header, an empty buffer instead.
    """

    __slots__ = ()

    def to_wire(self) -> tuple[dict[str, Any], Any]:
        if self.crops.shape[0] == 0:
            return self.header(), memoryview(b"")
        return super().to_wire()


class FlagListed:
    def __init__(self, options: dict[str, Any]) -> None:
        self.targets = {str(t) for t in options.get("flag_tile_ids", [])}

    def analyze(self, tiles: list[Tile]) -> list[TileResult]:
        return [self._one(t) for t in tiles]

    def _one(self, tile: Tile) -> TileResult:
        if tile.kind != "scan" or tile.tile_id not in self.targets:
            return _Result(slide_id=tile.slide_id, tile_id=tile.tile_id, worker="flag_listed")
        r, c = darkest_spot(tile.pixels)
        x, y = tile.px_to_stage(r, c)
        cid = f"{tile.tile_id}:0"
        h, w = tile.pixels.shape[:2]
        bbox = (max(0, int(r) - 4), max(0, int(c) - 4), min(h, int(r) + 5), min(w, int(c) + 5))
        cell = Cell(
            cell_id=cid,
            tile_id=tile.tile_id,
            slide_id=tile.slide_id,
            kind=CellKind.WBC,
            bbox=bbox,
            centroid_px=(r, c),
            x_um=x,
            y_um=y,
            area_px=81.0,
        )
        call = CellCall(
            cell_id=cid,
            label="blast?",
            probabilities={"blast?": 0.6, "lymphocyte": 0.4},
            uncertainty=0.97,
            margin=0.2,
            anomaly_score=3.0,
            model_id="flag_listed",
            evaluations=1,
        )
        flag = Flag(
            cell_id=cid,
            tile_id=tile.tile_id,
            slide_id=tile.slide_id,
            reasons=[FlagReason.UNCERTAIN],
            score=0.97,
            label="blast?",
            x_um=x,
            y_um=y,
        )
        return _Result(
            slide_id=tile.slide_id, tile_id=tile.tile_id, cells=[cell], calls=[call], flags=[flag], worker="flag_listed"
        )

    def close(self) -> None:
        pass


def flag_listed(config: Any, device: str) -> FlagListed:
    return FlagListed(config.pipeline.stage_options)
