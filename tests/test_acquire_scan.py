"""End to end: the virtual microscope scanned through pymmcore-plus and pycromanager's Python backend into a real
pipeline (spawned broker, worker and sink, real ZeroMQ sockets, a real zarr store): tiles flow, a flag triggers an
adaptive re-image, a client's re-image request moves the stage and gets the new tile ids, bad requests get clear
errors and change nothing; then the store of a scan is replayed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scan_helpers import darkest_spot

from scope_stream.acquire.control import ControlError, ReimageClient
from scope_stream.acquire.scan import (
    PycromanagerBackend,
    PymmcorePlusBackend,
    ReplayBackend,
    ScanSession,
)
from scope_stream.acquire.virtual import build_virtual_core, close_core
from scope_stream.callbacks import EventHub
from scope_stream.config import ScopeStreamConfig
from scope_stream.store import SlideStore

pytestmark = pytest.mark.slow

CAM = 96  # 48 µm fields at 20x (0.5 µm/px), 19.2 µm at 50x (0.2 µm/px)
REGION = {"x0_um": 1000, "y0_um": 1000, "x1_um": 1130, "y1_um": 1130}  # 3 x 3 fields at 10 % overlap
FLAG_TILE = "s000004"  # the centre field: the test analyzer flags its darkest spot


def make_cfg(slide_id: str, root: Path, **scan: Any) -> ScopeStreamConfig:
    return ScopeStreamConfig.model_validate(
        {
            "slide_id": slide_id,
            "microscope": {"camera_width": CAM, "camera_height": CAM, "seed": 7, "realtime": False},
            "scan": {"overlap": 0.1, "reimage_budget": 3, "results_timeout_s": 60, **REGION, **scan},
            "pipeline": {
                "n_workers": 1,
                "analyzer": "scan_helpers:flag_listed",
                "stage_options": {"flag_tile_ids": [FLAG_TILE]},
            },
            "store": {"root": str(root)},
        }
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from scope_stream.transport import LocalPipeline

    root = tmp_path_factory.mktemp("scans")
    with LocalPipeline(make_cfg("unused", root), store_path=None) as pipe:
        pipe.root = root
        yield pipe


def store_of(pipe: Any, slide_id: str) -> SlideStore:
    return SlideStore.open(Path(pipe.root) / f"{slide_id}.zarr")


class Events:
    """Everything the pipeline publishes for one slide."""

    def __init__(self, endpoint: str, slide_id: str) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.hub = EventHub(endpoint)
        self.hub.on("*", self._take)
        self.slide_id = slide_id
        self.hub.start()

    def _take(self, ev: dict[str, Any]) -> None:
        if ev.get("slide_id") == self.slide_id:
            with self.lock:
                self.items.append(ev)

    def of(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.items if e["topic"] == topic]

    def wait(self, topic: str, n: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of(topic)) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.of(topic)


def bad_requests(client: ReimageClient, slide_id: str) -> None:
    """Out of limits, malformed, wrong objective, wrong slide: each a clear error, nothing queued."""
    for kwargs, code, words in [
        ({"x_um": 99_999.0, "y_um": 1000.0}, "out_of_limits", "outside the stage limits"),
        ({"x_um": 1050.0, "y_um": -9000.0}, "out_of_limits", "outside the stage limits"),
        ({"x_um": 1050.0, "y_um": 1050.0, "objective": "100x"}, "unknown_objective", "100x"),
        ({"x_um": 1050.0, "y_um": 1050.0, "slide_id": "someone-else"}, "slide_mismatch", "someone-else"),
    ]:
        with pytest.raises(ControlError) as err:
            client.reimage(**kwargs, timeout_s=10)
        assert err.value.code == code and words in err.value.detail, err.value
    for raw, code in [
        (b"not json at all", "malformed"),
        (json.dumps({"v": 1, "type": "reimage", "x_um": "here", "y_um": 1}).encode(), "malformed"),
        (json.dumps({"v": 1, "type": "reimage", "x_um": 1050, "y_um": 1050, "zoom": 3}).encode(), "malformed"),
    ]:
        reply = client.request(raw, timeout_s=10)
        assert reply["type"] == "error" and reply["code"] == code, reply


def check_scan(pipe: Any, slide_id: str, report: Any, events: Events, control_reply: dict[str, Any], core: Any) -> None:
    store = store_of(pipe, slide_id)
    rows = {r["tile_id"]: r for r in store.tile_positions(kind=None)}
    scan_ids = sorted(t for t, r in rows.items() if r["kind"] == "scan")
    assert scan_ids == [f"s{i:06d}" for i in range(9)], scan_ids  # tiles flowed, each once
    assert report.n_scan_tiles == 9 and report.errors == 0 and report.error is None
    # --- the flag on the centre field triggered exactly one adaptive re-image, on the flagged cell
    (flag,) = events.of("cell.flagged")
    adaptive = [r for r in report.reimages if r["origin"] == "adaptive"]
    assert len(adaptive) == 1 and adaptive[0]["state"] == "done"
    (rid,) = adaptive[0]["tile_ids"]
    assert rows[rid]["kind"] == "reimage" and rows[rid]["pixel_size_um"] == pytest.approx(0.2)
    assert (rows[rid]["x_um"], rows[rid]["y_um"]) == pytest.approx((flag["x_um"], flag["y_um"]))
    tile = store.read_tile(rid)
    assert tile.objective == "50x" and tile.metadata["flag_cell_id"] == flag["cell_id"]
    r, c = darkest_spot(tile.pixels)  # the dark object flagged at 20x is in the middle of the 50x field
    x, y = tile.px_to_stage(r, c)
    assert np.hypot(x - flag["x_um"], y - flag["y_um"]) < 5.0
    # --- the client's request: a focus stack of new tiles at the requested place, ids returned
    assert control_reply["tile_ids"] == [t for r in report.reimages if r["origin"] == "control" for t in r["tile_ids"]]
    z_ids = control_reply["tile_ids"]
    assert len(z_ids) == 2 and control_reply["objective"] == "50x"
    zs = []
    for tid in z_ids:
        row = rows[tid]
        assert (row["x_um"], row["y_um"]) == pytest.approx((1090.0, 1040.0))
        assert row["pixel_size_um"] == pytest.approx(0.2)
        zs.append(row["z_um"])
    assert zs[1] - zs[0] == pytest.approx(3.0) and control_reply["z_um"] == pytest.approx(zs)
    # the stage really went there: the in-focus frame is the slide at (1090, 1040) through the 50x objective
    expected = core.virtual_slide.render(1090.0, 1040.0, CAM, CAM, 0.2).astype(np.float32).mean(axis=2)
    got = store.read_tile(z_ids[0]).pixels.astype(np.float32).mean(axis=2)
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9
    # --- bad requests changed nothing: exactly the tiles above
    assert len(rows) == 9 + 1 + 2
    # --- events and the slide summary
    assert len(events.wait("tile.done", 9)) == 9 and len(events.wait("reimage.done", 3)) == 3
    (done,) = events.wait("slide.done")
    assert done["summary"]["n_tiles"] == 12 and done["summary"]["scan"]["reimage_budget_used"] == 1
    review = done["summary"]["review"]  # the needs-review decision scanners get with slide.done
    assert review["needs_review"] is True and review["n_flagged_cells"] == 1
    assert review["flagged_cells"][0]["cell_id"] == flag["cell_id"] and review["flagged_labels"] == {"blast?": 1}
    assert report.summary["n_flagged"] == 1 and store.status == "done"


def run_session(pipe: Any, cfg: ScopeStreamConfig, backend: Any) -> tuple[Any, Events, dict[str, Any]]:
    events = Events(pipe.events_endpoint, cfg.slide_id)
    session = ScanSession(cfg, backend, pipe.endpoints.frontend, events_endpoint=pipe.events_endpoint)
    session.start()
    try:
        assert session.control_endpoint is not None
        with ReimageClient(session.control_endpoint, timeout_s=60) as client:
            status = client.status()
            assert status["slide_id"] == cfg.slide_id and "50x" in status["objectives"]
            bad_requests(client, cfg.slide_id)
            reply = client.reimage(1090.0, 1040.0, z_offsets_um=[0.0, 3.0], reason="look closer")
        report = session.wait(180)
    finally:
        events.hub.close()
    return report, events, reply


def test_pymmcore_plus_scan_adaptive_and_control(pipeline: Any) -> None:
    cfg = make_cfg("pmp-e2e", pipeline.root, hold_open_s=1.0)
    core = build_virtual_core(cfg.microscope)
    try:
        report, events, reply = run_session(pipeline, cfg, PymmcorePlusBackend(core))
        check_scan(pipeline, cfg.slide_id, report, events, reply, core)
        assert report.backend == "pymmcore-plus"
    finally:
        close_core(core)


def test_pycromanager_python_backend_scan_adaptive_and_control(pipeline: Any) -> None:
    cfg = make_cfg("pm-e2e", pipeline.root, hold_open_s=1.0)
    core = build_virtual_core(cfg.microscope)
    try:
        report, events, reply = run_session(pipeline, cfg, PycromanagerBackend(core, name=cfg.slide_id))
        check_scan(pipeline, cfg.slide_id, report, events, reply, core)
        assert report.backend == "pycromanager"
    finally:
        close_core(core)


def test_budget_limits_adaptive_reimages_and_late_requests_are_refused(pipeline: Any) -> None:
    cfg = make_cfg("budget-0", pipeline.root, reimage_budget=0, hold_open_s=0.0)
    core = build_virtual_core(cfg.microscope)
    try:
        session = ScanSession(
            cfg, PymmcorePlusBackend(core), pipeline.endpoints.frontend, events_endpoint=pipeline.events_endpoint
        )
        assert session.adaptive is False  # budget 0: no adaptive re-imaging at all
        report = session.run()
        assert report.n_reimage_tiles == 0 and report.reimages == []
        assert report.summary["review"]["needs_review"] is True  # the flag is still reported, just not re-imaged
        endpoint = report.control_endpoint
        assert endpoint is not None
        with ReimageClient(endpoint, timeout_s=0.5) as client:  # the scan is over: nobody answers
            assert client.request({"type": "ping"})["code"] == "timeout"
    finally:
        close_core(core)
    assert len(store_of(pipeline, "budget-0").tile_ids()) == 9


def test_replay_an_earlier_scan_store(pipeline: Any, tmp_path: Path) -> None:
    # the store of a scan (made here, so that this test stands alone) replayed as a new slide
    cfg = make_cfg("replay-src", pipeline.root, adaptive=False)
    core = build_virtual_core(cfg.microscope)
    try:
        ScanSession(cfg, PymmcorePlusBackend(core), pipeline.endpoints.frontend, control=False).run()
    finally:
        close_core(core)
    src = Path(pipeline.root) / "replay-src.zarr"
    rcfg = make_cfg("replayed", pipeline.root, backend="replay", replay_path=str(src), rate_limit_tiles_per_s=30.0)
    session = ScanSession(
        rcfg,
        ReplayBackend(src, rate_tiles_per_s=30.0),
        pipeline.endpoints.frontend,
        events_endpoint=pipeline.events_endpoint,
    )
    t0 = time.monotonic()
    report = session.run()
    assert time.monotonic() - t0 >= 8 / 30.0
    assert report.n_scan_tiles == 9 and report.backend == "replay" and report.summary["n_tiles"] == 9
    a, b = store_of(pipeline, "replay-src"), store_of(pipeline, "replayed")
    for tid in a.tile_ids():
        ta, tb = a.read_tile(tid), b.read_tile(tid)
        assert np.array_equal(ta.pixels, tb.pixels) and (ta.x_um, ta.y_um) == (tb.x_um, tb.y_um)
        assert tb.slide_id == "replayed" and tb.metadata["replayed_from"]["slide_id"] == "replay-src"


def test_requests_are_validated_queued_and_closed_without_a_run(tmp_path: Path) -> None:
    from scope_stream.acquire.control import ReimageRequest

    cfg = make_cfg("queue-only", tmp_path, control_max_pending=1, stage_limits_um=(0, 0, 2000, 2000))
    core = build_virtual_core(cfg.microscope)
    sent: list[Any] = []
    try:
        session = ScanSession(cfg, PymmcorePlusBackend(core), sent.append, control=False)
        first = session.submit_reimage(ReimageRequest(x_um=10, y_um=20))
        assert session.scheduler.queued == 1 and not first.done()
        with pytest.raises(ControlError) as err:
            session.submit_reimage(ReimageRequest(x_um=30, y_um=20))
        assert err.value.code == "busy"
        with pytest.raises(ControlError) as err:
            session.submit_reimage(ReimageRequest(x_um=2000.5, y_um=20))
        assert err.value.code == "out_of_limits" and "x 0..2000" in err.value.detail
        session.cancel()  # queued requests are answered, never left hanging
        with pytest.raises(ControlError) as err:
            first.result(5)
        assert err.value.code == "closed"
        with pytest.raises(ControlError) as err:
            session.submit_reimage(ReimageRequest(x_um=10, y_um=20))
        assert err.value.code == "closed"
    finally:
        close_core(core)
    assert sent == []
    src = write_replay_source(tmp_path)
    replay = ScanSession(make_cfg("r", tmp_path), ReplayBackend(src), sent.append, control=False)
    with pytest.raises(ControlError) as err:
        replay.submit_reimage(ReimageRequest(x_um=10, y_um=20))
    assert err.value.code == "closed" and "replay" in err.value.detail


def write_replay_source(tmp_path: Path) -> Path:
    from scope_stream.acquire.listen import write_replay_folder
    from scope_stream.vocabulary import Tile

    tile = Tile(np.zeros((8, 8, 3), np.uint8), slide_id="x", tile_id="a", seq=0, x_um=1, y_um=2, pixel_size_um=0.5)
    return write_replay_folder([tile], tmp_path / "replay")
