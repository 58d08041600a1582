"""One row counts per physical cell: copies of a cell in overlapping survey tiles are resolved at the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scope_stream.config import ScopeStreamConfig
from scope_stream.segment.dedup import StageDeduplicator
from scope_stream.store import SlideStore, TileRecord
from scope_stream.transport.sink import Sink, _tile_events
from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, FlagReason, Tile, TileResult

PX = 0.5  # µm per pixel
SIZE = 100  # tile pixels: 50 µm


def tile(tid: str, x_um: float, y_um: float = 0.0) -> Tile:
    return Tile(
        np.full((SIZE, SIZE, 3), 200, np.uint8), slide_id="s1", tile_id=tid, seq=0, x_um=x_um, y_um=y_um,
        pixel_size_um=PX,
    )  # fmt: skip


def cell_at(t: Tile, cid: str, x_um: float, y_um: float, kind: CellKind = CellKind.WBC) -> Cell:
    """A cell at stage (x_um, y_um), with its centroid in ``t``'s pixels."""
    col = (x_um - t.x_um) / PX + SIZE / 2 - 0.5
    row = (y_um - t.y_um) / PX + SIZE / 2 - 0.5
    r, c = round(row), round(col)
    return Cell(
        cell_id=cid, tile_id=t.tile_id, slide_id="s1", kind=kind, bbox=(r - 5, c - 5, r + 5, c + 5),
        centroid_px=(row, col), x_um=x_um, y_um=y_um, area_px=80.0,
    )  # fmt: skip


def result(t: Tile, cells: list[Cell], labels: list[str], flagged: tuple[str, ...] = ()) -> TileResult:
    calls = [
        CellCall(cell_id=c.cell_id, label=lab, probabilities={lab: 1.0}, uncertainty=0.0, margin=1.0,
                 anomaly_score=0.0, model_id="m")
        for c, lab in zip(cells, labels, strict=True)
    ]  # fmt: skip
    flags = [
        Flag(cell_id=c.cell_id, tile_id=t.tile_id, slide_id="s1", reasons=[FlagReason.ANOMALY], score=0.9,
             label=lab, x_um=c.x_um, y_um=c.y_um)
        for c, lab in zip(cells, labels, strict=True) if c.cell_id in flagged
    ]  # fmt: skip
    return TileResult(slide_id="s1", tile_id=t.tile_id, cells=cells, calls=calls, flags=flags)


def overlapping_pair() -> tuple[Tile, TileResult, Tile, TileResult]:
    """Tiles A (x 0..50 µm) and B (x 40..90 µm) overlap by 10 µm; one neutrophil at x = 46 is in both.

    In A it is 4 µm from the right edge; in B 6 µm from the left edge: B's copy is better centred.
    A second cell 5 µm away (x = 41, farther than the 4 µm radius) is a different cell.
    """
    a, b = tile("A", 25.0), tile("B", 65.0)
    ra = result(a, [cell_at(a, "A-0", 46.0, 0.0), cell_at(a, "A-1", 20.0, 0.0)], ["neutrophil", "lymphocyte"])
    rb = result(
        b,
        [cell_at(b, "B-0", 46.3, 0.2), cell_at(b, "B-1", 41.0 + 0.3, 0.2 + 3.0), cell_at(b, "B-2", 80.0, 0.0)],
        ["neutrophil", "monocyte", "eosinophil"],
        flagged=("B-0",),
    )
    return a, ra, b, rb


@pytest.mark.parametrize("order", ["AB", "BA", "one-commit"])
def test_the_better_centred_copy_counts_once(tmp_path: Path, order: str) -> None:
    a, ra, b, rb = overlapping_pair()
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)
    recs = {"A": TileRecord.from_tile(a, ra), "B": TileRecord.from_tile(b, rb)}
    if order == "one-commit":
        st.write_records([recs["A"], recs["B"]])
    else:
        for k in order:
            st.write_records([recs[k]])
    cells = st.cells()
    ids = sorted(c["cell_id"] for c in cells)
    assert ids == ["A-1", "B-0", "B-1", "B-2"]  # the shared neutrophil once: B's copy (farther from an edge)
    summary = st.compute_summary()
    assert summary["n_wbc"] == 4 and summary["n_cells"] == 4 and summary["n_duplicates"] == 1
    assert summary["differential"] == {"eosinophil": 1, "lymphocyte": 1, "monocyte": 1, "neutrophil": 1}
    assert summary["n_flagged"] == 1
    every = {c["cell_id"]: c for c in st.cells(duplicates=True)}
    assert len(every) == 5 and not every["A-0"]["counted"]  # the other copy is kept, marked, for review
    # a fresh reader (and a resumed writer) sees the same
    assert sorted(c["cell_id"] for c in SlideStore.open(st.path).cells()) == ids


def test_two_nearby_distinct_cells_both_count(tmp_path: Path) -> None:
    a, b = tile("A", 25.0), tile("B", 65.0)
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)
    st.write_result(result(a, [cell_at(a, "A-0", 45.0, 0.0)], ["neutrophil"]), tile=a)
    st.write_result(result(b, [cell_at(b, "B-0", 45.0 + 4.5, 0.0)], ["neutrophil"]), tile=b)  # 4.5 µm apart
    assert sorted(c["cell_id"] for c in st.cells()) == ["A-0", "B-0"]
    assert st.compute_summary()["n_duplicates"] == 0


def test_same_tile_and_other_kinds_are_never_merged(tmp_path: Path) -> None:
    a, b = tile("A", 25.0), tile("B", 65.0)
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)
    st.write_result(result(a, [cell_at(a, "A-0", 45.0, 0.0), cell_at(a, "A-1", 46.0, 0.0)], ["x", "y"]), tile=a)
    st.write_result(result(b, [cell_at(b, "B-0", 45.0, 0.0, CellKind.RBC)], [""]), tile=b)
    assert len(st.cells()) == 3


def test_resumed_writer_remembers_committed_cells(tmp_path: Path) -> None:
    a, ra, b, rb = overlapping_pair()
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)
    st.write_result(ra, tile=a)
    again = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)  # a restarted sink
    again.write_result(rb, tile=b)
    assert again.last_replaced == {"B-0": "A-0"}
    assert sorted(c["cell_id"] for c in SlideStore.open(st.path).cells()) == ["A-1", "B-0", "B-1", "B-2"]


def test_without_a_radius_nothing_is_merged(tmp_path: Path) -> None:
    a, ra, b, rb = overlapping_pair()
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1")
    st.write_records([TileRecord.from_tile(a, ra), TileRecord.from_tile(b, rb)])
    assert len(st.cells()) == 5


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, frames: list[Any]) -> None:
        import json

        self.sent.append(json.loads(bytes(frames[0])))


def test_sink_dedups_and_announces_each_flagged_cell_once(tmp_path: Path) -> None:
    cfg = ScopeStreamConfig.model_validate({"store": {"root": str(tmp_path)}})
    sink = Sink(cfg)
    st = sink.store("s1")
    assert st.dedup_radius_um == cfg.segment.dedup_radius_um
    a, ra, b, rb = overlapping_pair()
    # the duplicate comes second and is worse centred: no cell.flagged for it
    ra_flagged = result(a, ra.cells, ["neutrophil", "lymphocyte"], flagged=("A-0",))
    link = FakeLink()
    for t, r in ((b, rb), (a, ra_flagged)):
        rec = TileRecord.from_tile(t, r)
        st.write_records([rec])
        _tile_events(link, st, rec, {"latency_ms": 1.0, "attempts": 1}, st.last_duplicates, st.last_replaced)
    topics = [(m["topic"], m["payload"].get("cell_id")) for m in link.sent]
    assert ("cell.flagged", "B-0") in topics and ("cell.flagged", "A-0") not in topics
    done = [m["payload"] for m in link.sent if m["topic"] == "tile.done"]
    assert [d["n_duplicates"] for d in done] == [0, 1]
    assert st.compute_summary()["n_wbc"] == 4


def test_resolve_rules() -> None:
    d = StageDeduplicator(radius_um=4.0)
    assert d.resolve("s", "WBC", 0.0, 0.0, "A", "a0", 3.0).outcome == "new"
    got = d.resolve("s", "WBC", 1.0, 0.0, "B", "b0", 5.0)
    assert (got.outcome, got.other) == ("replaces", "a0")
    got = d.resolve("s", "WBC", 0.5, 0.0, "C", "c0", 5.0)  # a tie: the earlier copy stays
    assert (got.outcome, got.other) == ("duplicate", "b0")
    assert d.resolve("s", "WBC", 0.5, 0.0, "B", "b1", 9.0).outcome == "new"  # same tile as b0: never merged
    assert d.resolve("s", "WBC", float("nan"), 0.0, "D", "d0", 1.0).outcome == "new"


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_the_live_follower_shows_each_cell_once(tmp_path: Path, order: str) -> None:
    """The napari follower skips a later losing copy and retracts an earlier one a better copy replaced."""
    from scope_stream.view.follow import StoreFollower

    a, ra, b, rb = overlapping_pair()
    st = SlideStore.open_or_create(tmp_path / "s.zarr", slide_id="s1", dedup_radius_um=4.0)
    recs = {"A": TileRecord.from_tile(a, ra), "B": TileRecord.from_tile(b, rb)}
    follower = StoreFollower(st.path, crops="none")
    shown: set[str] = set()
    for k in order:
        st.write_records([recs[k]])
        delta = follower.poll()
        shown |= {c.cell_id for c in delta.cells}
        shown -= set(delta.retracted)
    assert shown == {c["cell_id"] for c in st.cells()} == {"A-1", "B-0", "B-1", "B-2"}
