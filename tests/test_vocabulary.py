"""The shared vocabulary: validation and lossless round trips to the wire form and zarr attributes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scope_stream.vocabulary import (
    Cell,
    CellCall,
    CellKind,
    Flag,
    FlagReason,
    Tile,
    TileResult,
    VocabularyError,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_:.", min_size=1, max_size=20)


@st.composite
def tiles(draw: st.DrawFn) -> Tile:
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    shape = draw(
        st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
            st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3, 4])),
        )
    )
    elements = st.floats(0, 1, width=32) if dtype == np.float32 else None
    pixels = draw(hnp.arrays(dtype, shape, elements=elements))
    return Tile(
        pixels,
        slide_id=draw(ident),
        tile_id=draw(ident),
        seq=draw(st.integers(0, 10**6)),
        x_um=draw(finite),
        y_um=draw(finite),
        z_um=draw(finite),
        pixel_size_um=draw(st.floats(1e-3, 10)),
        objective=draw(st.sampled_from(["20x", "50x", ""])),
        acquired_at=draw(st.floats(0, 2e9)),
        kind=draw(st.sampled_from(["scan", "reimage"])),
        metadata=draw(st.dictionaries(ident, st.one_of(st.integers(), st.text(max_size=5)), max_size=3)),
    )


@settings(max_examples=60, deadline=None)
@given(tiles())
def test_tile_wire_round_trip_is_lossless(tile: Tile) -> None:
    header, buf = tile.to_wire()
    # the header must survive JSON, as it does on the wire
    back = Tile.from_wire(json.loads(json.dumps(header)), bytes(buf))
    assert back.same_as(tile)
    assert back.pixels.dtype == tile.pixels.dtype


@settings(max_examples=30, deadline=None)
@given(tiles())
def test_tile_zarr_attrs_round_trip_is_lossless(tile: Tile) -> None:
    attrs = json.loads(json.dumps(tile.to_attrs()))
    assert Tile.from_attrs(attrs, tile.pixels.copy()).same_as(tile)


def test_tile_wire_buffer_is_zero_copy() -> None:
    pixels = np.zeros((4, 5, 3), np.uint8)
    tile = Tile(pixels, slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=1)
    _, buf = tile.to_wire()
    pixels[0, 0, 0] = 7
    assert buf[0] == 7


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (np.zeros((4, 4), np.int64), "dtype 'int64'"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (np.zeros((0, 4), np.uint8), "empty"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
    ],
)
def test_tile_rejects_bad_pixels(pixels: np.ndarray, match: str) -> None:
    with pytest.raises(VocabularyError, match=match):
        Tile(pixels, slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=1)


def test_tile_rejects_bad_metadata() -> None:
    px = np.zeros((2, 2), np.uint8)
    with pytest.raises(VocabularyError, match="pixel_size_um"):
        Tile(px, slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=0)
    with pytest.raises(VocabularyError, match="x_um"):
        Tile(px, slide_id="s", tile_id="t", seq=0, x_um=float("nan"), y_um=0, pixel_size_um=1)
    with pytest.raises(VocabularyError, match="slide_id"):
        Tile(px, slide_id="", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=1)


def test_tile_from_wire_rejects_lies() -> None:
    tile = Tile(np.ones((3, 3), np.uint8), slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=1)
    header, buf = tile.to_wire()
    with pytest.raises(VocabularyError, match="needs 9"):
        Tile.from_wire(header, bytes(buf)[:-1])
    with pytest.raises(VocabularyError, match="not one of"):
        Tile.from_wire({**header, "dtype": "object"}, bytes(buf))
    with pytest.raises(VocabularyError, match="unknown fields"):
        Tile.from_wire({**header, "evil": 1}, bytes(buf))
    missing = {k: v for k, v in header.items() if k != "pixel_size_um"}
    with pytest.raises(VocabularyError, match="lacks"):
        Tile.from_wire(missing, bytes(buf))


def test_pixel_stage_conversions_are_inverse() -> None:
    tile = Tile(
        np.zeros((100, 200, 3), np.uint8), slide_id="s", tile_id="t", seq=0, x_um=1000, y_um=500, pixel_size_um=0.5
    )
    # the centre of the frame is the stage position
    assert tile.px_to_stage(49.5, 99.5) == pytest.approx((1000.0, 500.0))
    x, y = tile.px_to_stage(10, 20)
    assert x < 1000 and y < 500
    assert tile.stage_to_px(x, y) == pytest.approx((10, 20))


def _cell(i: int = 0) -> Cell:
    return Cell(
        cell_id=f"t:{i}",
        tile_id="t",
        slide_id="s",
        kind=CellKind.WBC,
        bbox=(1, 2, 30, 40),
        centroid_px=(15.5, 21.0),
        x_um=10.25,
        y_um=-3.5,
        area_px=400.0,
        contour=[(1.0, 2.0), (30.0, 2.0), (30.0, 40.0)],
        features={"circularity": 0.9},
    )


def _call() -> CellCall:
    return CellCall(
        cell_id="t:0",
        label="neutrophil",
        probabilities={"neutrophil": 0.7, "lymphocyte": 0.3},
        uncertainty=0.88,
        margin=0.4,
        anomaly_score=-1.25,
        model_id="m",
        evaluations=36,
    )


def test_cell_call_flag_round_trips() -> None:
    cell, call = _cell(), _call()
    flag = Flag(
        cell_id="t:0",
        tile_id="t",
        slide_id="s",
        reasons=[FlagReason.ANOMALY],
        score=2.0,
        label="neutrophil",
        x_um=1.0,
        y_um=2.0,
    )
    for obj in (cell, call, flag):
        assert type(obj).from_wire(json.loads(json.dumps(obj.to_wire()))) == obj
        assert type(obj).from_attrs(json.loads(json.dumps(obj.to_attrs()))) == obj


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"label": "monocyte"}, "not among the classes"),
        ({"probabilities": {"neutrophil": 0.7, "lymphocyte": 0.7}}, "sum to"),
        ({"probabilities": {"neutrophil": float("nan"), "lymphocyte": 0.3}}, "finite"),
        ({"uncertainty": 1.5}, "less than or equal"),
        ({"anomaly_score": float("inf")}, "finite"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_cell_call_validation(change: dict, match: str) -> None:
    data = {**_call().to_wire(), **change}
    with pytest.raises(ValueError, match=match):
        CellCall.from_wire(data)


def test_cell_bbox_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="bbox"):
        Cell.from_wire({**_cell().to_wire(), "bbox": [5, 5, 5, 9]})


def test_flag_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reasons"):
        Flag(cell_id="c", tile_id="t", slide_id="s", reasons=[], score=1, label="x", x_um=0, y_um=0)


def test_tile_result_round_trip() -> None:
    crops = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    res = TileResult(
        slide_id="s",
        tile_id="t",
        cells=[_cell(0), _cell(1)],
        calls=[_call()],
        crops=crops,
        crop_cell_ids=["t:0", "t:1"],
        timings_ms={"segment": 1.5},
        worker="w1",
    )
    header, buf = res.to_wire()
    back = TileResult.from_wire(json.loads(json.dumps(header)), bytes(buf))
    assert back.cells == res.cells and back.calls == res.calls and back.crop_cell_ids == res.crop_cell_ids
    assert np.array_equal(back.crops, crops) and back.timings_ms == {"segment": 1.5} and back.worker == "w1"
    with pytest.raises(VocabularyError, match="crops buffer"):
        TileResult.from_wire(header, bytes(buf)[:-3])
    with pytest.raises(VocabularyError, match="2 crops for 1"):
        TileResult(slide_id="s", tile_id="t", crops=crops, crop_cell_ids=["a"])


def test_tile_result_without_crops_round_trips() -> None:
    res = TileResult(slide_id="s", tile_id="t", cells=[_cell(0)])
    header, buf = res.to_wire()
    assert buf.nbytes == 0
    back = TileResult.from_wire(json.loads(json.dumps(header)), bytes(buf))
    assert back.cells == res.cells and back.crops.shape[0] == 0
