"""Qt-free view models: mosaic placement, flag layers, table, differential, review session, store follower."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from view_helpers import CLASSES, make_result, make_tile, write_scan

from scope_stream.view.cells import CellRecord, RecordError
from scope_stream.view.counts import DifferentialCount, SlideState, slide_state
from scope_stream.view.flags import ClassPalette, FlagFilter, FlaggedCellTable, flag_layer_data
from scope_stream.view.follow import ReviewWriter, StoreFollower, StoreReadError, is_slide_store
from scope_stream.view.mosaic import MosaicCanvas, MosaicError, block_mean, tile_translate_um
from scope_stream.view.review import KeyMap, ReviewSession, review_summary


# ----------------------------------------------------------------------------- mosaic
def _world_to_canvas(canvas: MosaicCanvas, y_um: float, x_um: float, level: int = 0) -> tuple[int, int]:
    """Pixel of a level holding a stage point, the way napari maps world -> data."""
    s = canvas.scale_um * 2**level
    ty, tx = canvas.translate_um
    ty += (2**level - 1) * canvas.scale_um / 2.0  # napari's multiscale levels share the level-0 corner
    tx += (2**level - 1) * canvas.scale_um / 2.0
    return round((y_um - ty) / s), round((x_um - tx) / s)


def test_tile_lands_at_its_stage_position() -> None:
    tile = make_tile(3, x_um=100.0, y_um=50.0)  # 128 px x 0.5 µm = 64 µm square centred on (100, 50)
    canvas = MosaicCanvas(2.0, channels=3, n_levels=1, bounds_um=(0.0, 0.0, 100.0, 100.0))
    res = canvas.paste(tile.pixels, tile.x_um, tile.y_um, tile.pixel_size_um)
    assert res.reallocated  # 132 > 100: grown to the right
    x0, y0, x1, y1 = canvas.extent_um
    assert x0 <= 68.0 and x1 >= 132.0 and y0 <= 18.0 and y1 >= 82.0
    # the footprint is 32 x 32 canvas pixels whose corner is the tile's corner (68, 18) µm
    assert (res.rows.stop - res.rows.start, res.cols.stop - res.cols.start) == (32, 32)
    assert math.isclose(canvas.origin_um[0] + res.rows.start * 2.0, 18.0)
    assert math.isclose(canvas.origin_um[1] + res.cols.start * 2.0, 68.0)
    # a stage point inside the tile maps to its colour; one outside stays empty
    r, c = _world_to_canvas(canvas, 50.0, 100.0)
    assert tuple(canvas.levels[0][r, c]) == tuple(tile.pixels[0, 0])
    r, c = _world_to_canvas(canvas, 16.5, 66.5)
    assert canvas.levels[0][r, c].sum() == 0


def test_translate_matches_vocabulary_convention() -> None:
    tile = make_tile(0, x_um=10.0, y_um=-20.0, size=64, p=0.25)
    x, y = tile.px_to_stage(0, 0)
    assert tile_translate_um(tile.x_um, tile.y_um, 64, 64, 0.25) == pytest.approx((y, x))


def test_growth_keeps_earlier_tiles_and_levels_follow() -> None:
    canvas = MosaicCanvas(2.0, channels=3, n_levels=3)
    a, b = make_tile(1, 0.0, 0.0), make_tile(9, 1000.0, 700.0)
    canvas.paste(a.pixels, a.x_um, a.y_um, 0.5)
    res = canvas.paste(b.pixels, b.x_um, b.y_um, 0.5)
    assert res.reallocated
    for t in (a, b):
        r, c = _world_to_canvas(canvas, t.y_um, t.x_um)
        assert tuple(canvas.levels[0][r, c]) == tuple(t.pixels[0, 0])
        r, c = _world_to_canvas(canvas, t.y_um, t.x_um, level=2)
        assert tuple(canvas.levels[2][r, c]) == tuple(t.pixels[0, 0])
    h, w = canvas.shape[:2]
    assert canvas.levels[1].shape[:2] == (-(-h // 2), -(-w // 2))


def test_canvas_coarsens_instead_of_exploding() -> None:
    canvas = MosaicCanvas(2.0, channels=1, n_levels=2, max_side_px=256)
    a, b = make_tile(1, 0.0, 0.0), make_tile(2, 5000.0, 0.0)
    canvas.paste(a.pixels, a.x_um, a.y_um, 0.5)
    canvas.paste(b.pixels, b.x_um, b.y_um, 0.5)
    assert max(canvas.shape) <= 256
    assert canvas.scale_um > 2.0
    r, c = _world_to_canvas(canvas, b.y_um, b.x_um)
    assert canvas.levels[0][r, c] == pytest.approx(np.mean(b.pixels[0, 0]), abs=1)


def test_prepared_paste_and_scale_change() -> None:
    canvas = MosaicCanvas(2.0, channels=3)
    tile = make_tile(5, 0.0, 0.0)
    small = canvas.prepare(tile.pixels, 0.5)
    assert small.shape == (32, 32, 3)
    canvas.paste_prepared(small, 2.0, x_um=0.0, y_um=0.0, height=128, width=128, pixel_size_um=0.5)
    # prepared at another scale (the canvas was coarsened meanwhile): resampled on paste
    canvas.paste_prepared(small, 1.0, x_um=200.0, y_um=0.0, height=64, width=64, pixel_size_um=0.5)
    r, c = _world_to_canvas(canvas, 0.0, 200.0)
    assert tuple(canvas.levels[0][r, c]) == tuple(tile.pixels[0, 0])


def test_bad_tiles_are_refused_clearly() -> None:
    canvas = MosaicCanvas(2.0)
    with pytest.raises(MosaicError, match="x_um"):
        canvas.paste(np.zeros((8, 8, 3), np.uint8), math.nan, 0.0, 0.5)
    with pytest.raises(MosaicError, match="shape"):
        canvas.paste(np.zeros((8, 8, 2), np.uint8), 0.0, 0.0, 0.5)
    with pytest.raises(MosaicError, match="pixel"):
        canvas.paste(np.zeros((8, 8, 3), np.uint8), 0.0, 0.0, 0.0)
    with pytest.raises(MosaicError):
        MosaicCanvas(0.0)


def test_uint16_and_channel_first_tiles() -> None:
    canvas = MosaicCanvas(1.0, channels=1, dtype="uint8")
    img = np.full((16, 16), 0x8000, np.uint16)
    canvas.paste(img, 0.0, 0.0, 0.5)
    assert canvas.levels[0].max() == 0x80
    rgb = MosaicCanvas(1.0, channels=3)
    rgb.paste(np.full((3, 16, 16), 7, np.uint8), 0.0, 0.0, 0.5)  # (C, H, W) as the store keeps tiles
    assert rgb.levels[0].max() == 7


def test_block_mean() -> None:
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert block_mean(a, 2).tolist() == [[2, 4], [10, 12]]


@settings(max_examples=25, deadline=None)
@given(
    x=st.floats(-5000, 5000, allow_nan=False),
    y=st.floats(-5000, 5000, allow_nan=False),
    p=st.sampled_from([0.2, 0.25, 0.5, 1.0]),
)
def test_any_tile_centre_lands_on_its_colour(x: float, y: float, p: float) -> None:
    canvas = MosaicCanvas(2.0, channels=3, n_levels=2, bounds_um=(0.0, 0.0, 100.0, 100.0), max_side_px=8192)
    tile = make_tile(11, x, y, size=96, p=p)
    canvas.paste(tile.pixels, x, y, p)
    r, c = _world_to_canvas(canvas, y, x)
    assert tuple(canvas.levels[0][r, c]) == tuple(tile.pixels[0, 0])


# ----------------------------------------------------------------------------- records
def _rec(i: int, label: str, score: float, unc: float = 0.2, **kw: object) -> CellRecord:
    return CellRecord(
        cell_id=f"c{i}",
        tile_id="t0",
        label=label,
        x_um=10.0 * i,
        y_um=5.0 * i,
        uncertainty=unc,
        anomaly_score=score,
        flagged=True,
        flag_score=score,
        **kw,  # type: ignore[arg-type]
    )


def test_record_from_event_then_store_row() -> None:
    payload = {
        "v": 1,
        "topic": "cell.flagged",
        "ts": 0.0,
        "slide_id": "s1",
        "tile_id": "t1",
        "cell_id": "c1",
        "reasons": ["anomaly"],
        "score": 0.9,
        "label": "ig",
        "x_um": 1.0,
        "y_um": 2.0,
        "probabilities": {"ig": 0.7, "neutrophil": 0.3},
        "uncertainty": 0.4,
        "margin": 0.4,
        "anomaly_score": 0.9,
        "model_id": "m",
        "kind": "scan",
    }
    ev = CellRecord.from_flag_event(payload)
    assert ev.flagged and ev.flag_reasons == ("anomaly",) and ev.crop_index == -1
    row = {"cell_id": "c1", "flagged": True, "crop_index": 7, "probabilities": json.dumps({"ig": 1.0}), "label": "ig"}
    merged = ev.merged(CellRecord.from_store_row(row))
    assert merged.crop_index == 7 and merged.flag_score == 0.9 and merged.probabilities == {"ig": 1.0}
    with pytest.raises(RecordError, match="cell_id"):
        CellRecord.from_flag_event({"score": 1})


# ----------------------------------------------------------------------------- flags + table
def test_flag_layer_positions_colours_sizes() -> None:
    recs = [_rec(1, "ig", 0.9, unc=0.0), _rec(2, "neutrophil", 0.3, unc=1.0), CellRecord(cell_id="nowhere")]
    data = flag_layer_data(recs, color_by="class", base_size_um=8.0, uncertainty_gain=2.0)
    assert len(data) == 2  # the record without a position is left out
    assert data.points.tolist() == [[5.0, 10.0], [10.0, 20.0]]  # (y, x)
    assert data.sizes.tolist() == [8.0, 24.0]
    pal = ClassPalette()
    assert tuple(data.face_colors[0]) == pal.rgba("ig")
    assert pal.rgba("ig") != pal.rgba("neutrophil")
    assert pal.hex("some-new-class") == ClassPalette().hex("some-new-class")  # stable across instances
    an = flag_layer_data(recs, color_by="anomaly")
    assert an.face_colors[0][1] < an.face_colors[1][1]  # high anomaly: less green (red/magenta)
    assert list(an.features["cell_id"]) == ["c1", "c2"]
    with pytest.raises(ValueError):
        flag_layer_data(recs, color_by="size")  # type: ignore[arg-type]


def test_table_sorted_filtered_and_merged() -> None:
    table = FlaggedCellTable()
    for i, (lab, s) in enumerate([("ig", 0.5), ("neutrophil", 0.9), ("ig", 0.7), ("blast", 0.95)]):
        table.upsert(_rec(i, lab, s))
    table.upsert(CellRecord(cell_id="unflagged", label="ig"))  # not flagged: ignored
    assert [r.cell_id for r in table.rows] == ["c3", "c1", "c2", "c0"]
    table.set_filter(FlagFilter(classes={"ig"}, min_score=0.6))
    assert [r.cell_id for r in table.rows] == ["c2"]
    assert table.row_of("c2") == 0 and table.row_of("c1") == -1
    table.upsert(CellRecord(cell_id="c2", flagged=True, crop_index=4))  # completes, keeps the score
    assert table.get("c2") is not None and table.get("c2").crop_index == 4  # type: ignore[union-attr]
    assert table.get("c2").flag_score == 0.7  # type: ignore[union-attr]
    table.replace(table.get("c2").with_review("neutrophil"))  # type: ignore[union-attr]
    assert table.rows == []  # its effective class is now neutrophil
    assert table.total == 4


# ----------------------------------------------------------------------------- counts
def test_differential_counts_and_review() -> None:
    dc = DifferentialCount(classes=["neutrophil", "lymphocyte", "ig"])
    dc.add_many([_rec(0, "neutrophil", 0.1), _rec(1, "neutrophil", 0.1), _rec(2, "ig", 0.9)])
    dc.add(CellRecord(cell_id="r1", kind="RBC"))
    dc.add(_rec(0, "neutrophil", 0.1))  # the same cell again: no double count
    rows = {r.label: r for r in dc.rows()}
    assert rows["neutrophil"].model == 2 and rows["lymphocyte"].model == 0
    assert rows["neutrophil"].percent == pytest.approx(200 / 3)
    assert dc.kinds == {"WBC": 3, "RBC": 1}
    dc.add(_rec(2, "ig", 0.9).with_review("lymphocyte"))
    rows = {r.label: r for r in dc.rows()}
    assert rows["ig"].model == 1 and rows["ig"].reviewed == 0 and rows["lymphocyte"].reviewed == 1
    assert dc.n_classified == 3
    assert dc.as_dict()["lymphocyte"]["percent"] == pytest.approx(33.33)


def test_slide_state() -> None:
    assert slide_state(n_tiles=0, done=False, n_flagged=0, n_flagged_reviewed=0) is SlideState.WAITING
    assert slide_state(n_tiles=3, done=False, n_flagged=0, n_flagged_reviewed=0) is SlideState.SCANNING
    assert slide_state(n_tiles=3, done=False, n_flagged=2, n_flagged_reviewed=1) is SlideState.NEEDS_REVIEW
    assert slide_state(n_tiles=3, done=True, n_flagged=2, n_flagged_reviewed=2) is SlideState.REVIEWED
    assert slide_state(n_tiles=3, done=True, n_flagged=0, n_flagged_reviewed=0) is SlideState.NORMAL


# ----------------------------------------------------------------------------- review
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_review_queue_order_keys_and_timing() -> None:
    clock = FakeClock()
    written: list[tuple[str, str, float]] = []
    recs = [
        _rec(0, "neutrophil", 0.55, unc=0.1),
        _rec(1, "ig", 0.95, unc=0.3),
        _rec(2, "ig", 0.60, unc=0.9),
        _rec(3, "neutrophil", 0.80, unc=0.5),
        CellRecord(cell_id="unclassified", flagged=True),
    ]
    session = ReviewSession(recs, writer=lambda d: written.append((d.cell_id, d.label, d.seconds)), clock=clock)
    # grouped by predicted class, groups by their most urgent cell, most anomalous first within a group
    assert [r.cell_id for r in session.queue] == ["c1", "c2", "c3", "c0"]
    assert session.current is not None and session.current.cell_id == "c1"
    clock.t += 1.5
    d = session.handle_key("a")  # accept
    assert d is not None and d.label == "ig" and d.seconds == pytest.approx(1.5) and not d.changed
    clock.t += 0.5
    session.handle_key("Right")  # skip c2 for now
    clock.t += 2.0
    d = session.handle_key("2")  # c3 is a lymphocyte (key 2)
    assert d is not None and d.cell_id == "c3" and d.label == "lymphocyte" and d.changed
    assert d.seconds == pytest.approx(2.0)
    assert session.current is not None and session.current.cell_id == "c0"
    session.handle_key("Left")
    session.handle_key("Left")
    assert session.current is not None and session.current.cell_id == "c2"
    clock.t += 1.0
    session.handle_key("Space")
    # c2 was on screen 0.5 s before the skip and 1.0 s now
    assert written[-1] == ("c2", "ig", pytest.approx(1.5))
    assert session.handle_key("F12") is None  # unbound: nothing happens
    session.handle_key("Return")
    assert session.done and session.current is None
    s = session.summary()
    assert (s.n_cells, s.n_reviewed, s.n_changed) == (4, 4, 1)
    assert s.seconds_total == pytest.approx(5.0)
    assert s.changes == {"neutrophil -> lymphocyte": 1}


def test_review_pause_extend_and_writer_failure() -> None:
    clock = FakeClock()
    session = ReviewSession([_rec(0, "ig", 0.5)], clock=clock)
    clock.t += 1.0
    session.pause()
    clock.t += 100.0  # away: not charged
    session.resume()
    clock.t += 1.0
    # new flags arrive while reviewing: the current cell stays current
    assert session.extend([_rec(1, "ig", 0.99), _rec(0, "ig", 0.5)]) == 1
    assert session.current is not None and session.current.cell_id == "c0"
    d = session.accept()
    assert d is not None and d.seconds == pytest.approx(2.0)
    assert session.current is not None and session.current.cell_id == "c1"
    # a record completed later (its crop arrived) replaces the queued one, keeping the decision
    assert session.update_record(_rec(0, "ig", 0.5, crop_index=3))
    assert session.queue[0].crop_index == 3 and session.queue[0].reviewer_label == "ig"
    assert not session.update_record(_rec(99, "ig", 0.5))
    assert session.goto("c0") and session.current is not None and session.current.cell_id == "c0"

    def broken(_d: object) -> None:
        raise OSError("disk full")

    failing = ReviewSession([_rec(5, "ig", 0.5)], writer=broken, clock=clock)
    with pytest.raises(OSError):
        failing.accept()
    assert failing.failed and failing.current is not None and failing.n_decided == 0


def test_keymap_for_classes_and_legend() -> None:
    km = KeyMap.for_classes(["blast", "normal"])
    assert km.action("1") == (km.action("1")[0], "blast")  # type: ignore[index]
    assert km.action("0") is not None and km.action("0")[1] == "artefact"  # type: ignore[index]
    assert ("1", "blast") in km.legend()


# ----------------------------------------------------------------------------- store follower
def test_follower_reads_only_new_commits(tmp_path: Path) -> None:
    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    path = tmp_path / "s1.zarr"
    store = SlideStore.open_or_create(path, slide_id="s1", config=StoreConfig())
    follower = StoreFollower(path)
    assert follower.poll().tiles == []
    tiles = [make_tile(i, 100.0 + 60 * i, 200.0) for i in range(3)]
    results = [make_result(t, [(30.0, 40.0), (90.0, 70.0)], ["ig", "neutrophil"], flagged={0}) for t in tiles]
    store.write_result(results[0], tile=tiles[0])
    d1 = follower.poll()
    assert [t.tile_id for t in d1.tiles] == ["t0000"] and len(d1.cells) == 2
    assert set(d1.crops) == {d1.cells[0].crop_index}  # crops of flagged cells only
    c0 = d1.cells[0]
    assert c0.flagged and c0.label == "ig" and c0.tile_kind == "scan"
    assert (c0.x_um, c0.y_um) == pytest.approx(tiles[0].px_to_stage(30.0, 40.0))
    assert c0.bbox_um is not None and c0.bbox_um[0] < c0.y_um < c0.bbox_um[2]
    assert np.array_equal(d1.crops[c0.crop_index], results[0].crops[0])
    store.write_result(results[1], tile=tiles[1])
    store.write_result(results[2], tile=tiles[2])
    d2 = follower.poll()
    assert [t.tile_id for t in d2.tiles] == ["t0001", "t0002"] and len(d2.cells) == 4
    assert np.array_equal(follower.read_pixels("t0002"), tiles[2].pixels)
    assert follower.poll().empty
    # a review lands beside the model's call
    ReviewWriter(path, reviewer="ana").write(c0.cell_id, "blast", 1.25)
    d3 = follower.poll()
    assert d3.reviews == {c0.cell_id: ("blast", "ana", 1.25)}
    reopened = SlideStore.open(path)
    row = next(r for r in reopened.cells() if r["cell_id"] == c0.cell_id)
    assert row["label"] == "ig" and row["reviewer_label"] == "blast"  # model's call kept
    store.mark_done({})
    d4 = follower.poll()
    assert d4.status_changed and d4.status == "done"


def test_follower_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreReadError, match="no slide store"):
        StoreFollower(tmp_path / "missing.zarr").poll()
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    assert not is_slide_store(tmp_path / "plain.zarr")
    with pytest.raises(StoreReadError, match="not a scope-stream"):
        StoreFollower(tmp_path / "plain.zarr").poll()


def test_review_summary_from_store(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    write_scan(path, 2)
    cells = StoreFollower(path).poll().cells
    w = ReviewWriter(path, reviewer="r")
    flagged = [c for c in cells if c.flagged]
    w.write(flagged[0].cell_id, flagged[0].label, 1.0)
    w.write(flagged[1].cell_id, "blast", 3.0)
    follower = StoreFollower(path)
    delta = follower.poll()
    recs = [c.with_review(*delta.reviews[c.cell_id]) if c.cell_id in delta.reviews else c for c in delta.cells]
    s = review_summary(recs)
    assert (s.n_cells, s.n_reviewed, s.n_changed) == (2, 2, 1)
    assert s.seconds_total == pytest.approx(4.0)


# ----------------------------------------------------------------------------- live feed
def test_live_feed_follows_events_and_store(tmp_path: Path) -> None:
    import zmq

    from scope_stream.view.live import CellsUpdate, FeedError, FlagSeen, LiveFeed, ScanTile, SlideUpdate

    path = tmp_path / "s1.zarr"
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    feed = LiveFeed(f"tcp://127.0.0.1:{port}", None, poll_interval_s=0.05).start()
    got: list[object] = []
    try:
        write_scan(path, 2, done=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(isinstance(u, ScanTile) for u in got):
            # PUB/SUB joins asynchronously: keep announcing until the feed has heard it
            pub.send_multipart([b"tile.done", json.dumps({"v": 1, "topic": "tile.done", "store": str(path)}).encode()])
            pub.send_multipart([b"tile.done", b"not json"])  # skipped by the subscriber
            pub.send_multipart([b"cell.flagged", json.dumps({"no": "cell id"}).encode()])
            time.sleep(0.05)
            got += feed.drain()
        flag = {"cell_id": "x1", "label": "ig", "score": 0.9, "x_um": 1.0, "y_um": 2.0, "reasons": ["anomaly"]}
        pub.send_multipart([b"cell.flagged", json.dumps(flag).encode()])
        while time.monotonic() < deadline and not any(isinstance(u, FlagSeen) for u in got):
            time.sleep(0.05)
            got += feed.drain()
    finally:
        feed.stop()
        pub.close(0)
    tiles = [u for u in got if isinstance(u, ScanTile)]
    assert sorted(t.row.tile_id for t in tiles) == ["t0000", "t0001"]
    assert tiles[0].image.shape == (32, 32, 3) and tiles[0].scale_um == pytest.approx(2.0)
    assert sum(len(u.cells) for u in got if isinstance(u, CellsUpdate)) == 4
    assert any(isinstance(u, SlideUpdate) and u.status == "scanning" for u in got)
    assert any(isinstance(u, FeedError) and "bad cell.flagged event" in u.message for u in got)
    assert any(isinstance(u, FlagSeen) and u.record.cell_id == "x1" for u in got)
    assert not feed.running


def test_live_feed_catches_up_from_store_mosaic(tmp_path: Path) -> None:
    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore
    from scope_stream.view.live import LiveFeed, MosaicSnapshot, ScanTile

    path = tmp_path / "s1.zarr"
    store = SlideStore.open_or_create(path, slide_id="s1", config=StoreConfig(), scan_region_um=(0, 0, 200, 100))
    for i in range(6):
        t = make_tile(i, 40.0 * (i % 3), 40.0 * (i // 3))
        store.write_result(make_result(t, [(30.0, 40.0)], [CLASSES[i]]), tile=t)
    store.mark_done({})
    feed = LiveFeed(None, path, snapshot_after=3).start()
    got: list[object] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(isinstance(u, MosaicSnapshot) for u in got):
        time.sleep(0.05)
        got += feed.drain()
    time.sleep(0.2)
    got += feed.drain()
    feed.stop()
    snaps = [u for u in got if isinstance(u, MosaicSnapshot)]
    assert len(snaps) == 1 and len(snaps[0].tile_ids) == 6
    assert not any(isinstance(u, ScanTile) for u in got)  # no per-tile reads on catch-up
    img = snaps[0].image
    assert img.ndim == 3 and img.shape[2] == 3
