"""The OME-Zarr slide store: round trips, idempotence, resume, reviews, NGFF metadata, plain-zarr reading."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from scope_stream.config import ScopeStreamConfig, StoreConfig
from scope_stream.store import SlideStore, StoreError, TileRecord, tile_key
from scope_stream.transport.stages import ThresholdAnalyzer
from scope_stream.vocabulary import Tile, TileResult


def make_tile(i: int, *, kind: str = "scan", shape: tuple[int, ...] = (64, 64, 3), dtype: str = "uint8") -> Tile:
    rng = np.random.default_rng(i)
    if dtype == "uint8":
        px = rng.integers(150, 255, shape, dtype=np.uint8)
        px[10:22, 12:26] = 20  # a dark blob -> a cell for the threshold stage
        px[40:46, 40:47] = 30
    else:
        px = rng.integers(1000, 60000, shape).astype(dtype)
    return Tile(
        px,
        slide_id="s1",
        tile_id=f"{kind}-{i}",
        seq=i,
        x_um=100.0 + 30.0 * (i % 5),
        y_um=100.0 + 30.0 * (i // 5),
        pixel_size_um=0.5 if kind == "scan" else 0.2,
        kind=kind,  # type: ignore[arg-type]
        metadata={"i": i},
    )


@pytest.fixture
def analyzer() -> ThresholdAnalyzer:
    return ThresholdAnalyzer(ScopeStreamConfig(), "cpu")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlideStore]:
    st = SlideStore.open_or_create(tmp_path / "s1.zarr", slide_id="s1", scan_region_um=(100, 100, 220, 160))
    yield st
    # whatever the test wrote must be valid OME-Zarr 0.5 (tests/test_store_ngff.py)
    if (st.path / "zarr.json").is_file():
        try:
            from test_store_ngff import validate_store
        except pytest.skip.Exception:  # ome-zarr-models not installed
            return
        validate_store(st.path)


def test_round_trip_tiles_cells_crops(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    tiles = [make_tile(i) for i in range(6)]
    results = analyzer.analyze(tiles)
    assert all(r.cells for r in results)
    for t, r in zip(tiles, results, strict=True):
        assert store.write_result(r, tile=t, latency_ms=12.5) is True
    assert store.tile_ids() == [t.tile_id for t in tiles]
    for t in tiles:
        assert store.has_tile(t.tile_id)
        assert store.read_tile(t.tile_id).same_as(t)
    pos = store.tile_positions()
    assert [p["tile_id"] for p in pos] == [t.tile_id for t in tiles]
    assert pos[1]["x_um"] == tiles[1].x_um and pos[1]["width_um"] == pytest.approx(32.0)
    cells = store.cells()
    n_expected = sum(len(r.cells) for r in results)
    assert len(cells) == n_expected == store.n_cells
    row = cells[0]
    call = results[0].calls[0]
    assert row["cell_id"] == row["id"] == results[0].cells[0].cell_id
    assert row["tile_id"] == tiles[0].tile_id
    assert row["bbox"] == results[0].cells[0].bbox
    assert row["label"] == call.label
    assert row["probabilities"] == pytest.approx(call.probabilities)
    assert row["uncertainty"] == pytest.approx(call.uncertainty, abs=1e-6)
    assert row["anomaly_score"] == pytest.approx(call.anomaly_score, abs=1e-6)
    assert row["flagged"] == any(f.cell_id == row["cell_id"] for f in results[0].flags)
    assert row["reviewer_label"] is None
    np.testing.assert_array_equal(store.crop(row["cell_id"]), results[0].crops[0])
    assert store.crops().shape == (n_expected, 32, 32, 3)
    rows = store.tile_rows()
    assert rows["latency_ms"][0] == pytest.approx(12.5)
    assert rows["cell_stop"][-1] == n_expected


def test_write_is_idempotent_and_resume_reads_what_is_there(
    tmp_path: Path, store: SlideStore, analyzer: ThresholdAnalyzer
) -> None:
    tiles = [make_tile(i) for i in range(4)]
    results = analyzer.analyze(tiles)
    recs = [TileRecord.from_tile(t, r) for t, r in zip(tiles, results, strict=True)]
    assert store.write_records(recs[:2]) == [True, True]
    n_cells = store.n_cells
    # a re-delivered tile, and one twice in the same group, are written once
    assert store.write_records([recs[1], recs[2], recs[2]]) == [False, True, False]
    assert store.tile_ids() == [t.tile_id for t in tiles[:3]]
    assert store.n_cells == n_cells + len(results[2].cells)
    # reopen (a restarted sink): the same content, duplicates still refused
    again = SlideStore.open_or_create(store.path, slide_id="s1")
    assert again.tile_ids() == store.tile_ids()
    assert again.write_result(results[0], tile=tiles[0]) is False
    assert again.write_result(results[3], tile=tiles[3]) is True
    assert len(again.cells()) == sum(len(r.cells) for r in results)
    with pytest.raises(StoreError, match="holds slide"):
        SlideStore.open_or_create(store.path, slide_id="other")


def test_interrupted_write_leaves_no_trace(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    tiles = [make_tile(i) for i in range(3)]
    results = analyzer.analyze(tiles)
    store.write_result(results[0], tile=tiles[0])
    committed = store.n_cells
    # a sink killed after writing rows but before the commit: rows past the counts, pixels, no count update
    rows = {c: [] for c in store._cell_table.columns}
    garbage = results[1].cells[0]
    for c in rows:
        rows[c] = [garbage.cell_id if c in ("cell_id",) else store._cell_table.read(1, [c])[c][0]]
    store._cell_table.write(committed, rows)  # type: ignore[arg-type]
    store.write_tile(tiles[1])
    reopened = SlideStore.open(store.path, mode="r+")
    assert reopened.n_cells == committed and not reopened.has_tile(tiles[1].tile_id)
    assert reopened.write_result(results[1], tile=tiles[1]) is True
    ids = [c["cell_id"] for c in reopened.cells()]
    assert ids.count(garbage.cell_id) == 1
    assert len(ids) == committed + len(results[1].cells)


def test_failed_tile_is_stored_with_its_error(store: SlideStore) -> None:
    t = make_tile(0)
    assert store.write_result(None, tile=t, error="analyzer exploded")
    pos = store.tile_positions()[0]
    assert pos["status"] == "failed" and pos["n_cells"] == 0
    assert store.tile_rows()["error"][0] == "analyzer exploded"
    assert store.compute_summary()["n_failed_tiles"] == 1


def test_reimage_tiles_are_separate(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    scan, re = make_tile(0), make_tile(0, kind="reimage")
    for t in (scan, re):
        store.write_result(analyzer.analyze([t])[0], tile=t)
    assert store.tile_ids(kind="scan") == ["scan-0"] and store.tile_ids(kind="reimage") == ["reimage-0"]
    paths = {p["tile_id"]: p["path"] for p in store.tile_positions(kind=None)}
    assert paths == {"scan-0": "tiles/scan/scan-0", "reimage-0": "tiles/reimage/reimage-0"}
    assert store.read_tile("reimage-0").pixel_size_um == 0.2
    assert store.compute_summary()["n_reimage_tiles"] == 1


def test_reviews_never_overwrite_the_call(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    t = make_tile(0)
    r = analyzer.analyze([t])[0]
    store.write_result(r, tile=t)
    cid = r.cells[0].cell_id
    store.set_review(cid, "blast", reviewer="ana", seconds=4.5)
    store.set_review(cid, "lymphocyte", reviewer="bo", seconds=2.0)
    row = next(c for c in store.cells() if c["cell_id"] == cid)
    assert row["label"] == r.calls[0].label  # the model's call is kept
    assert (row["reviewer_label"], row["reviewer"], row["review_seconds"]) == ("lymphocyte", "bo", 2.0)
    with pytest.raises(StoreError, match="not in the store"):
        store.set_review("nope", "x")
    ro = SlideStore.open(store.path)
    assert next(c for c in ro.cells() if c["cell_id"] == cid)["reviewer_label"] == "lymphocyte"
    with pytest.raises(StoreError, match="read-only"):
        ro.set_review(cid, "x")


def test_metadata_done_summary(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    store.set_metadata(objective="20x", operator="ana")
    for t in (make_tile(0), make_tile(1)):
        store.write_result(analyzer.analyze([t])[0], tile=t)
    assert store.status == "scanning"
    summary = store.mark_done({"note": "end"})
    assert store.status == "done" and store.metadata == {"objective": "20x", "operator": "ana"}
    assert summary["n_tiles"] == 2 and summary["note"] == "end"
    assert sum(summary["differential"].values()) == summary["n_wbc"] == store.n_cells
    assert SlideStore.open(store.path).summary == summary
    with pytest.raises(TypeError):
        store.set_metadata(bad=object())


def test_grayscale_uint16_and_unsafe_ids(store: SlideStore) -> None:
    t = make_tile(3, shape=(40, 50), dtype="uint16")
    t2 = Tile(t.pixels, slide_id="s1", tile_id="row 3/col 4", seq=9, x_um=0, y_um=0, pixel_size_um=1.0)
    for x in (t, t2):
        store.write_result(TileResult(slide_id="s1", tile_id=x.tile_id), tile=x)
    assert store.read_tile(t.tile_id).same_as(t)
    assert store.read_tile("row 3/col 4").same_as(t2)
    assert "/" not in tile_key("row 3/col 4") and tile_key("a/b") != tile_key("a_b")


def test_plain_zarr_and_ngff_metadata(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    tiles = [make_tile(i) for i in range(5)]
    for t in tiles:
        store.write_result(analyzer.analyze([t])[0], tile=t)
    root = zarr.open_group(str(store.path), mode="r")
    info = root.attrs["scope_stream"]
    assert info["format"] == "scope-stream-slide" and info["slide_id"] == "s1"
    n = root["tables"].attrs["scope_stream"]["n_cells"]
    ids = np.asarray(root["tables/cells/cell_id"][:n])
    assert list(ids) == [c["cell_id"] for c in store.cells()]
    tile_grp = root["tiles/scan/scan-2"]
    ms = tile_grp.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    tr = ms["datasets"][0]["coordinateTransformations"]
    x0, y0 = tiles[2].px_to_stage(0, 0)
    assert tr[0]["scale"] == [1.0, 0.5, 0.5] and tr[1]["translation"] == pytest.approx([0.0, y0, x0])
    assert tile_grp["0"].shape == (3, 64, 64) and tile_grp["0"].chunks == (3, 64, 64)
    # the root is the mosaic image
    assert root.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "mosaic/0"
    mosaic, scale, (oy, ox) = store.mosaic()  # type: ignore[misc]
    assert scale == 2.0 and mosaic.shape[0] == 3
    # tile 0's dark blob (rows 10..22, cols 12..26 at 0.5 µm) shows in the mosaic, downsampled 4x
    ty, tx = tiles[0].px_to_stage(16, 19)
    r, c = int((ty - oy) / scale), int((tx - ox) / scale)
    assert mosaic[:, r, c].mean() < 100 < mosaic[:, r, c + 6].mean()


def test_napari_ome_zarr_reads_the_store(store: SlideStore, analyzer: ThresholdAnalyzer) -> None:
    reader_mod = pytest.importorskip("napari_ome_zarr._reader")
    for t in (make_tile(0), make_tile(1)):
        store.write_result(analyzer.analyze([t])[0], tile=t)
    reader = reader_mod.napari_get_reader(str(store.path))
    assert reader is not None
    layers = reader(str(store.path))
    assert layers and layers[0][1]["channel_axis"] == 0
    assert layers[0][0][0].shape[0] == 3
    tile_layers = reader_mod.napari_get_reader(str(store.path / "tiles/scan/scan-1"))(None)
    data, meta, kind = tile_layers[0]
    assert kind == "image" and data[0].shape == (3, 64, 64)
    assert meta["scale"] == pytest.approx([0.5, 0.5])


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no slide store"):
        SlideStore.open(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="not a scope-stream slide store"):
        SlideStore.open(tmp_path / "other.zarr")
    st = SlideStore.open_or_create(tmp_path / "x.zarr", slide_id="x", config=StoreConfig(save_tiles=False))
    t = make_tile(0)
    st.write_result(TileResult(slide_id="s1", tile_id=t.tile_id), tile=t)
    with pytest.raises(StoreError, match="without its pixels"):
        st.read_tile(t.tile_id)
    with pytest.raises(StoreError, match="not in the store"):
        st.read_tile("nope")
    assert math.isnan(st.tile_rows()["latency_ms"][0])
    json.dumps(st.tile_positions())  # plain JSON-able rows
