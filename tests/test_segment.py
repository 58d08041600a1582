"""Segmentation on synthetic smears with exact ground truth: kinds, scales, dtypes, borders, de-duplication,
crops and bad input. Real-data checks are in test_segment_data.py."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from pydantic import ValidationError

from scope_stream.config import SegmentConfig
from scope_stream.segment import (
    StageDeduplicator,
    cell_count,
    extract_crops,
    segment_image,
    segment_tile,
    segment_tile_debug,
)
from scope_stream.segment.evaluate import match_centroids, match_iou
from scope_stream.segment.stain import block_downsample, check_pixels
from scope_stream.segment.synthetic import SynthCell, random_scene, render_scene
from scope_stream.vocabulary import Cell, CellKind, Tile

SCENE = random_scene(120.0, 90.0, n_wbc=3, n_rbc=60, n_platelets=8, seed=1)
KEEP_BORDER = SegmentConfig(drop_border_cells=False)


def _tile(pixels: np.ndarray, ps: float, x: float = 60.0, y: float = 45.0, tile_id: str = "t0") -> Tile:
    return Tile(pixels, slide_id="s", tile_id=tile_id, seq=0, x_um=x, y_um=y, pixel_size_um=ps)


def _render(ps: float, scene: list[SynthCell] = SCENE, x: float = 60.0, y: float = 45.0, w_um: float = 120.0,
            h_um: float = 90.0) -> np.ndarray:  # fmt: skip
    return render_scene(scene, x, y, round(w_um / ps), round(h_um / ps), ps)


def _of(cells: list[Cell], kind: CellKind) -> list[Cell]:
    return [c for c in cells if c.kind == kind]


def _nearest(cells: list[Cell], x: float, y: float) -> float:
    return min((math.hypot(c.x_um - x, c.y_um - y) for c in cells), default=float("inf"))


@pytest.fixture(scope="module")
def field_02() -> tuple[Tile, list[Cell]]:
    tile = _tile(_render(0.2), 0.2)
    return tile, segment_tile(tile, KEEP_BORDER)


# ------------------------------------------------------------------------------------- detection
def test_finds_every_kind_at_the_right_place(field_02: tuple[Tile, list[Cell]]) -> None:
    _, cells = field_02
    truth_w = _of_truth(CellKind.WBC)
    found_w = _of(cells, CellKind.WBC)
    assert len(found_w) == len(truth_w) == 3
    for g in truth_w:
        assert _nearest(found_w, g.x_um, g.y_um) < 1.0
    assert abs(cell_count(cells, CellKind.RBC) - len(_of_truth(CellKind.RBC))) <= 1
    plts = _of(cells, CellKind.PLATELET)
    hits = sum(_nearest(plts, g.x_um, g.y_um) < 1.5 for g in _of_truth(CellKind.PLATELET))
    assert hits >= len(_of_truth(CellKind.PLATELET)) - 1


def _of_truth(kind: CellKind) -> list[SynthCell]:
    return [c for c in SCENE if c.kind == kind]


def test_cells_are_well_formed(field_02: tuple[Tile, list[Cell]]) -> None:
    tile, cells = field_02
    h, w = tile.shape[:2]
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    cfg = SegmentConfig()
    for c in cells:
        assert c.cell_id.startswith(f"{tile.tile_id}:{c.kind.value}:")
        r0, c0, r1, c1 = c.bbox
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
        assert r0 - 1 <= c.centroid_px[0] <= r1 and c0 - 1 <= c.centroid_px[1] <= c1
        x, y = tile.px_to_stage(*c.centroid_px)
        assert (x, y) == pytest.approx((c.x_um, c.y_um))
        assert 3 <= len(c.contour) <= cfg.max_contour_vertices
        assert c.features["area_um2"] > 0
        assert 0.0 <= c.features["circularity"] <= 1.0
    for c in _of(cells, CellKind.WBC):
        f = c.features
        assert 0.0 < f["nucleus_fraction"] < 1.0
        assert 60 < f["area_um2"] < 200  # radius 5.5-7 µm disks: 95-154 µm²
        assert f["nucleus_lobes"] >= 1
    for c in _of(cells, CellKind.RBC):
        assert 0.0 <= c.features["central_pallor"] <= 1.0
    pallor = np.median([c.features["central_pallor"] for c in _of(cells, CellKind.RBC)])
    assert pallor > 0.1  # the synthetic red cells are thinner in the middle


def test_ids_and_results_are_deterministic() -> None:
    tile = _tile(_render(0.3), 0.3)
    a = segment_tile(tile, KEEP_BORDER)
    b = segment_tile(tile, KEEP_BORDER)
    assert [c.to_wire() for c in a] == [c.to_wire() for c in b]


@pytest.mark.parametrize("ps", [0.075, 0.5])
def test_works_at_any_pixel_size(ps: float) -> None:
    cells = segment_tile(_tile(_render(ps), ps), KEEP_BORDER)
    found = _of(cells, CellKind.WBC)
    assert len(found) == 3
    for g in _of_truth(CellKind.WBC):
        assert _nearest(found, g.x_um, g.y_um) < 1.5
    areas = sorted(c.features["area_um2"] for c in found)
    truth = sorted(math.pi * g.radius_um**2 for g in _of_truth(CellKind.WBC))
    for a, t in zip(areas, truth, strict=True):
        assert a == pytest.approx(t, rel=0.3)
    assert abs(cell_count(cells, CellKind.RBC) - 60) <= 3


def test_dtypes_and_channel_layouts_agree() -> None:
    img = _render(0.3)
    ref = [(c.kind, round(c.x_um), round(c.y_um)) for c in segment_image(img, 0.3)]
    assert len(ref) > 20
    variants = {
        "uint16 16-bit": img.astype(np.uint16) * 257,
        "uint16 12-bit": img.astype(np.uint16) * 16,
        "float32 0..1": img.astype(np.float32) / 255.0,
        "float32 0..255": img.astype(np.float32),
        "rgba": np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]),
    }
    for name, arr in variants.items():
        got = [(c.kind, round(c.x_um), round(c.y_um)) for c in segment_image(arr, 0.3)]
        assert len(got) == len(ref), name
        assert sum(g in ref for g in got) >= 0.95 * len(ref), name


def test_grayscale_still_finds_white_cells() -> None:
    img = _render(0.3)
    grey = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    for arr in (grey, grey[:, :, None], np.repeat(grey[:, :, None], 3, axis=2)):
        found = _of(segment_tile(_tile(arr, 0.3), KEEP_BORDER), CellKind.WBC)
        assert len(found) == 3
        for g in _of_truth(CellKind.WBC):
            assert _nearest(found, g.x_um, g.y_um) < 2.0


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("name", "pixels"),
    [
        ("black", np.zeros((480, 640, 3), np.uint8)),
        ("saturated", np.full((480, 640, 3), 255, np.uint8)),
        ("saturated 16-bit", np.full((480, 640), 65535, np.uint16)),
        ("flat glass", np.full((480, 640, 3), 200, np.uint8)),
        ("dark noise", np.random.default_rng(0).poisson(2, (480, 640, 3)).astype(np.uint8)),
        ("all NaN", np.full((64, 64, 3), np.nan, np.float32)),
        ("one pixel", np.full((1, 1, 3), 128, np.uint8)),
        ("tiny", np.full((3, 5), 9, np.uint8)),
    ],
)
def test_blank_frames_give_nothing_quickly(name: str, pixels: np.ndarray) -> None:
    t0 = time.perf_counter()
    cells, dbg = segment_tile_debug(_tile(pixels, 0.1), SegmentConfig())
    assert cells == [], name
    assert dbg.blank, name
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((10, 10, 3, 1), np.uint8),
        np.zeros((10,), np.uint8),
        np.zeros((10, 10, 5), np.float32),
    ],
)
def test_wrong_shapes_raise_a_clear_error(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=re_shape(pixels.shape)):
        segment_image(pixels, 0.2)
    with pytest.raises(ValueError, match=re_shape(pixels.shape)):
        check_pixels(pixels)


def re_shape(shape: tuple[int, ...]) -> str:
    import re

    return re.escape(str(tuple(shape)))


def test_other_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        check_pixels(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype bool"):
        check_pixels(np.zeros((10, 10, 3), bool))
    with pytest.raises(ValueError, match="numpy array"):
        check_pixels([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="too coarse"):
        segment_image(_render(0.5), 3.0)
    # a tile whose pixels were swapped for garbage after construction
    tile = _tile(_render(0.5), 0.5)
    tile.pixels = np.zeros((4, 4, 7), np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 4, 7\)"):
        segment_tile(tile)


def test_partly_invalid_float_pixels_are_tolerated() -> None:
    img = _render(0.3).astype(np.float32)
    img[50:70, 50:70] = np.nan
    img[0:5, :] = -3.0
    img[10:12, 10:12] = np.inf
    found = _of(segment_image(img, 0.3), CellKind.WBC)
    assert len(found) >= 2


def test_block_downsample_is_an_exact_mean() -> None:
    rng = np.random.default_rng(0)
    for dtype, hi in ((np.uint8, 256), (np.uint16, 65536)):
        a = rng.integers(0, hi, (37, 53, 3)).astype(dtype)
        for f in (2, 3, 5):
            ref = a[: 37 // f * f, : 53 // f * f].astype(np.float64).reshape(37 // f, f, 53 // f, f, 3).mean((1, 3))
            assert np.allclose(block_downsample(a, f), ref, rtol=1e-6, atol=1e-3)


# --------------------------------------------------------------------------- borders and overlaps
def test_border_cells_are_dropped_unless_asked() -> None:
    wbc = SynthCell(CellKind.WBC, 3.0, 30.0, 6.0, ((0.0, 0.0, 3.5),))  # cut by the left edge
    inner = SynthCell(CellKind.WBC, 40.0, 30.0, 6.0, ((0.0, 0.0, 3.5),))
    img = render_scene([wbc, inner], 30.0, 30.0, 300, 300, 0.2)
    tile = _tile(img, 0.2, 30.0, 30.0)
    dropped = _of(segment_tile(tile), CellKind.WBC)
    kept = _of(segment_tile(tile, KEEP_BORDER), CellKind.WBC)
    assert [round(c.x_um) for c in dropped] == [40]
    assert len(kept) == 2
    edge = next(c for c in kept if c.x_um < 20)
    assert edge.features["touches_border"] == 1.0


def test_overlapping_tiles_report_each_cell_once() -> None:
    # cells in x 10..290, y 10..110 µm: none touches the outer edge of the scanned strip (0..120 µm tall)
    scene = random_scene(280.0, 100.0, n_wbc=10, n_rbc=120, n_platelets=20, seed=7, x0_um=10.0, y0_um=10.0)
    ps, w_px, h_px = 0.4, 400, 300  # 160 x 120 µm tiles
    step = 160.0 - 35.0  # 35 µm overlap > the largest white cell
    dedup = StageDeduplicator(radius_um=SegmentConfig().dedup_radius_um)
    admitted: list[Cell] = []
    x = 80.0
    k = 0
    while x - 80.0 < 300.0:
        img = render_scene(scene, x, 60.0, w_px, h_px, ps, seed=k)
        tile = _tile(img, ps, x, 60.0, tile_id=f"t{k}")
        admitted.extend(c for c in segment_tile(tile) if dedup.admit(c))
        x += step
        k += 1
    assert k >= 3 and dedup.rejected > 0
    found = _of(admitted, CellKind.WBC)
    truth = [g for g in scene if g.kind == CellKind.WBC]
    assert len(truth) == 10
    assert len(found) == len(truth)
    for g in truth:
        assert _nearest(found, g.x_um, g.y_um) < 1.5


def test_deduplicator_rules() -> None:
    def cell(tile: str, x: float, y: float, kind: CellKind = CellKind.WBC, slide: str = "s") -> Cell:
        return Cell(
            cell_id=f"{tile}:{kind.value}:{x}",
            tile_id=tile,
            slide_id=slide,
            kind=kind,
            bbox=(0, 0, 1, 1),
            centroid_px=(0.0, 0.0),
            x_um=x,
            y_um=y,
            area_px=1.0,
        )

    d = StageDeduplicator(radius_um=4.0)
    assert d.admit(cell("a", 100.0, 100.0))
    assert d.admit(cell("a", 102.0, 100.0))  # same tile: the segmenter already separated them
    assert not d.admit(cell("b", 103.0, 102.0))  # another tile, 3.6 µm away: the same cell
    assert d.admit(cell("b", 105.0, 100.0 + 4.5))  # beyond the radius of both
    assert d.admit(cell("b", 100.0, 100.0, kind=CellKind.RBC))  # another kind
    assert d.admit(cell("b", 100.0, 100.0, slide="other"))  # another slide
    assert d.admitted == 5 and d.rejected == 1
    assert d.is_duplicate(cell("c", 99.0, 99.0))
    assert len(d) == 5
    assert d.forget_before(200.0) == 5 and len(d) == 0
    assert d.admit(cell("c", 99.0, 99.0))  # forgotten rows no longer match
    with pytest.raises(ValueError, match="radius_um"):
        StageDeduplicator(radius_um=-1.0)
    # grid cells: a duplicate just across a grid line is still found
    g = StageDeduplicator(radius_um=4.0)
    assert g.admit(cell("a", 7.99, 0.0))
    assert not g.admit(cell("b", 8.01, 0.0))


# ---------------------------------------------------------------------------------------- crops
def test_crops_have_a_fixed_physical_size(field_02: tuple[Tile, list[Cell]]) -> None:
    tile, cells = field_02
    wbcs = _of(cells, CellKind.WBC)
    crops = extract_crops(tile, wbcs, crop_um=25.6, crop_px=32)
    assert crops.shape == (3, 32, 32, 3) and crops.dtype == np.uint8
    # the same cells imaged at 0.5 µm/px give nearly the same crops
    tile5 = _tile(_render(0.5), 0.5)
    w5 = _of(segment_tile(tile5, KEEP_BORDER), CellKind.WBC)
    w5 = [min(w5, key=lambda c, a=a: math.hypot(c.x_um - a.x_um, c.y_um - a.y_um)) for a in wbcs]
    crops5 = extract_crops(tile5, w5, crop_um=25.6, crop_px=32)
    diff = np.abs(crops.astype(float) - crops5.astype(float)).mean()
    assert diff < 12.0
    for crop in crops:
        # the nucleus (darkest, purple) is in the middle of the crop
        lum = crop.astype(float).mean(axis=2)
        r, c = np.unravel_index(np.argmin(ndimage_uniform(lum)), lum.shape)
        assert abs(r - 16) <= 5 and abs(c - 16) <= 5


def ndimage_uniform(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.asarray(ndimage.uniform_filter(a, 5))


def test_crops_at_the_border_are_padded_with_background() -> None:
    img = _render(0.2)
    tile = _tile(img, 0.2)
    corner = Cell(
        cell_id="t0:WBC:99", tile_id="t0", slide_id="s", kind=CellKind.WBC, bbox=(0, 0, 5, 5),
        centroid_px=(0.0, 0.0), x_um=0.0, y_um=0.0, area_px=25.0,
    )  # fmt: skip
    crop = extract_crops(tile, [corner], crop_um=25.6, crop_px=64)[0]
    top_left = crop[:16, :16].reshape(-1, 3).astype(float)
    glass = np.percentile(img.reshape(-1, 3), 95, axis=0)
    assert np.abs(top_left.mean(axis=0) - glass).max() < 15
    assert extract_crops(tile, [], 25.6, 32).shape == (0, 32, 32, 3)
    grey = Tile(img[:, :, 1].copy(), slide_id="s", tile_id="g", seq=0, x_um=60, y_um=45, pixel_size_um=0.2)
    g = extract_crops(grey, [corner], 25.6, 16)
    assert g.shape == (1, 16, 16, 3) and np.array_equal(g[..., 0], g[..., 2])
    deep = Tile(img.astype(np.uint16) * 16, slide_id="s", tile_id="d", seq=0, x_um=60, y_um=45, pixel_size_um=0.2)
    assert abs(extract_crops(deep, [corner], 25.6, 16).astype(float).mean() - g.mean()) < 40
    with pytest.raises(ValueError, match="crop_um"):
        extract_crops(tile, [corner], 0.0, 16)


# ------------------------------------------------------------------------------ config, metrics
def test_config_rejects_inconsistent_ranges() -> None:
    with pytest.raises(ValidationError, match="max_wbc_diameter_um"):
        SegmentConfig(min_wbc_diameter_um=20, max_wbc_diameter_um=10)
    with pytest.raises(ValidationError):
        SegmentConfig(nucleus_od_min=0.5, nucleus_od_max=0.2)
    with pytest.raises(ValidationError):
        SegmentConfig(unknown_key=1)  # type: ignore[call-arg]
    assert SegmentConfig().crop_um == pytest.approx(25.6)


def test_matching_helpers() -> None:
    from scope_stream.datasets import VocBox

    def c(bbox: tuple[int, int, int, int]) -> Cell:
        r0, c0, r1, c1 = bbox
        return Cell(
            cell_id=str(bbox), tile_id="t", slide_id="s", kind=CellKind.WBC, bbox=bbox,
            centroid_px=((r0 + r1) / 2, (c0 + c1) / 2), x_um=0, y_um=0, area_px=1.0,
        )  # fmt: skip

    gts = [VocBox("WBC", 0, 0, 100, 100), VocBox("WBC", 200, 200, 260, 260)]
    cells = [c((0, 0, 90, 100)), c((10, 10, 110, 110)), c((205, 205, 300, 300))]
    tp, best = match_iou(cells, gts)
    assert tp == 1 and best[0] == pytest.approx(0.9) and best[1] < 0.5
    assert match_centroids(cells, gts) == 2  # one per gt: the two first cells compete for the first box
