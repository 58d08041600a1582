"""Pixel size from the red cells (scope_stream.segment.pixel_size)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scope_stream.segment import estimate_pixel_size, segment_image_debug, segment_tile_debug
from scope_stream.segment.synthetic import random_scene, render_scene
from scope_stream.vocabulary import Tile


def _field(ps: float, side_px: int = 256, seed: int = 1) -> np.ndarray:
    w = side_px * ps
    scene = random_scene(w, w, n_wbc=1, n_rbc=max(12, int(w * w / 120)), n_platelets=4, seed=seed)
    return render_scene(scene, w / 2, w / 2, side_px, side_px, ps, seed=seed)


@pytest.mark.parametrize("ps", [0.1, 0.25, 0.5, 1.0])
def test_synthetic_discs_within_ten_percent(ps: float) -> None:
    side = 256 if ps >= 0.25 else 480  # enough red cells in the field
    est = estimate_pixel_size(_field(ps, side))
    assert est.um_per_px is not None and est.confidence > 0.5, est
    assert abs(est.um_per_px / ps - 1.0) < 0.10, est
    assert est.n_cells >= 8


@pytest.mark.parametrize(
    "pixels",
    [
        np.full((200, 200, 3), 210, np.uint8),  # empty glass
        np.zeros((200, 200, 3), np.uint8),  # black
        np.random.default_rng(0).integers(0, 255, (200, 200, 3)).astype(np.uint8),  # noise
        np.full((8, 8), 100, np.uint16),  # tiny
    ],
)
def test_no_red_cells_gives_no_estimate_with_a_reason(pixels: np.ndarray) -> None:
    est = estimate_pixel_size(pixels)
    assert est.um_per_px is None and est.confidence == 0.0
    assert est.reason


def test_unknown_pixel_size_is_estimated_and_recorded() -> None:
    cells, dbg = segment_image_debug(_field(0.3))
    assert dbg.pixel_size_source == "estimated" and dbg.pixel_size_estimate is not None
    assert abs(dbg.pixel_size_um / 0.3 - 1.0) < 0.10
    assert cells
    cells, dbg = segment_image_debug(np.full((100, 100, 3), 200, np.uint8))
    assert cells == [] and dbg.blank.startswith("no pixel size")


def test_disagreement_over_fifteen_percent_warns(caplog: pytest.LogCaptureFixture) -> None:
    px = _field(0.3)
    ok = Tile(px, slide_id="s-ok", tile_id="t", seq=0, x_um=0.0, y_um=0.0, pixel_size_um=0.3)
    _, dbg = segment_tile_debug(ok)
    assert dbg.pixel_size_warning == "" and dbg.pixel_size_estimate is not None
    bad = Tile(px, slide_id="s-bad", tile_id="t", seq=0, x_um=0.0, y_um=0.0, pixel_size_um=0.4)
    with caplog.at_level(logging.WARNING):
        _, dbg = segment_tile_debug(bad)
    assert "disagrees" in dbg.pixel_size_warning
    assert any("disagrees" in r.getMessage() for r in caplog.records)
