"""The widget on a real pipeline scanning the virtual microscope (Qt under Xvfb, spawned pipeline processes).

Real parts only: a real MMCore with the virtual microscope's devices runs a pymmcore-plus MDA over a
grid, the scope-stream listener streams its frames to a LocalPipeline (broker, a worker with the
cheap ``threshold`` analyzer, the sink writing an OME-Zarr store), and the widget follows the
pipeline's events and store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = [pytest.mark.napari, pytest.mark.slow]

THRESHOLD = "scope_stream.transport.stages:threshold"
WAIT_MS = 90_000
FIELD_PX = 256
PIXEL_UM = 0.5


def _config(tmp_path: Path) -> Any:
    from scope_stream.config import ScopeStreamConfig

    cfg = ScopeStreamConfig()
    cfg.slide_id = "live-1"
    cfg.store.root = tmp_path / "scans"
    cfg.microscope.camera_width = FIELD_PX
    cfg.microscope.camera_height = FIELD_PX
    cfg.microscope.realtime = False
    p = cfg.pipeline
    p.device = "cpu"
    p.n_workers = 1
    p.heartbeat_ms = 200
    p.stats_interval_ms = 200
    return cfg


def _grid(slide: Any, n: int = 3) -> list[tuple[float, float]]:
    """Field centres of an n x n grid (10 % overlap) over the area of the slide richest in white cells."""
    fov = FIELD_PX * PIXEL_UM
    step = fov * 0.9
    span = fov + (n - 1) * step
    best, best_n = (800.0, 800.0), -1
    for x0 in np.arange(400.0, 2400.0, 200.0):
        for y0 in (600.0, 1200.0):
            k = len(slide.ground_truth((x0, y0, x0 + span, y0 + span), kinds=("WBC",)))
            if k > best_n:
                best, best_n = (float(x0), float(y0)), k
    x0, y0 = best
    return [(x0 + fov / 2 + i * step, y0 + fov / 2 + j * step) for j in range(n) for i in range(n)]


def test_live_scan_of_the_virtual_microscope(make_napari_viewer: Any, qtbot: Any, tmp_path: Path) -> None:
    import useq

    from scope_stream.acquire.listen.pymmcore_plus import PymmcorePlusListener
    from scope_stream.acquire.virtual import build_virtual_core, close_core
    from scope_stream.store import SlideStore
    from scope_stream.transport import LocalPipeline
    from scope_stream.view.mosaic import downsample_to_scale, tile_corner_um

    cfg = _config(tmp_path)
    core = build_virtual_core(cfg.microscope)
    positions = _grid(core.virtual_slide)
    xs, ys = [p[0] for p in positions], [p[1] for p in positions]
    region = [min(xs), min(ys), max(xs), max(ys)]
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("scope-stream", "Scope Stream")
    try:
        with LocalPipeline(cfg, analyzer_spec=THRESHOLD, log_level=logging.WARNING) as pipe:
            widget.connect(pipe.events_endpoint, None, None)  # the store is learnt from the events
            # SUB sockets join late: wait for the periodic stats event before scanning
            qtbot.waitUntil(lambda: widget.lbl_stats.text() != "", timeout=WAIT_MS)
            pipe.start_scan(cfg.slide_id, {"region_um": region, "objective": "20x"})
            with pipe.source() as src:
                listener = PymmcorePlusListener(src, slide_id=cfg.slide_id).connect(core)
                seq = useq.MDASequence(stage_positions=[(x, y, None) for x, y in positions])
                thread = core.run_mda(seq)  # acquisition on its own thread; the GUI keeps running
                qtbot.waitUntil(lambda: not thread.is_alive(), timeout=WAIT_MS)
                assert listener.flush(60.0)
                listener.close()
            qtbot.waitUntil(lambda: widget.n_tiles == len(positions), timeout=WAIT_MS)
            summary = pipe.finish(cfg.slide_id)
            qtbot.waitUntil(lambda: widget.status == "done", timeout=WAIT_MS)
            qtbot.waitUntil(lambda: not widget._dirty, timeout=WAIT_MS)  # throttled layers flushed
        assert widget.store_path is not None and widget.slide_id == cfg.slide_id
        store = SlideStore.open(widget.store_path)
        assert summary["n_tiles"] == len(positions)
        # ---- tiles sit at their stage coordinates on the live mosaic
        mosaic = viewer.layers["scope-stream mosaic"]
        canvas = widget.canvas
        assert canvas is not None
        for pos in store.tile_positions("scan"):
            tile = store.read_tile(pos["tile_id"])
            small = downsample_to_scale(tile.pixels, tile.pixel_size_um, canvas.scale_um)
            r, c = (round(v) for v in mosaic.world_to_data((tile.y_um, tile.x_um)))
            shown = np.asarray((mosaic.data[0] if mosaic.multiscale else mosaic.data)[r, c])
            hh, ww = small.shape[:2]
            candidates = [tuple(small[hh // 2 + dr, ww // 2 + dc]) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            assert tuple(shown) in candidates, (pos["tile_id"], shown)
            top, left = tile_corner_um(tile.x_um, tile.y_um, *tile.pixels.shape[:2], tile.pixel_size_um)
            assert tile.x_um == pytest.approx(pos["x_um"]) and top < tile.y_um and left < tile.x_um
        # ---- flags sit at the stage positions of the flagged cells
        flagged = store.cells(flagged=True)
        assert flagged, "the threshold analyzer flagged nothing on this region"
        flags = viewer.layers["scope-stream flags"]
        got = np.array(sorted(map(tuple, flags.data)))
        want = np.array(sorted((c["y_um"], c["x_um"]) for c in flagged))
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)
        assert widget.table.total == len(flagged)
        assert sum(r.model for r in widget.counts.rows()) == summary["n_wbc"]
        # ---- the reader opens the finished store: the sink's mosaic overview, the same flags
        layers = viewer.open(str(widget.store_path), plugin="scope-stream")
        read_mosaic, read_flags = layers[0], layers[1]
        assert read_mosaic.name.startswith("scope-stream mosaic") and read_mosaic.rgb
        got = np.array(sorted(map(tuple, read_flags.data)))
        assert np.allclose(got, want, atol=1e-6)
        (y0, x0), (y1, x1) = read_mosaic.extent.world[:, -2:]  # the overview covers every field centre
        assert x0 <= min(xs) and y0 <= min(ys) and x1 >= max(xs) and y1 >= max(ys)
    finally:
        widget.shutdown()
        close_core(core)


def test_demo_scan_then_reimage_moves_the_stage_and_adds_the_image(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path
) -> None:
    from scope_stream_napari._demo import DemoRunner

    from scope_stream.acquire.slide import VirtualSlide
    from scope_stream.store import SlideStore
    from scope_stream.view.mosaic import tile_translate_um
    from scope_stream.view.reimage import ReimageTarget

    cfg = _config(tmp_path)
    cfg.slide_id = "demo-1"
    (cx, cy), *_ = _grid(VirtualSlide(cfg.microscope), n=1)
    s = cfg.scan
    s.x0_um, s.y0_um, s.x1_um, s.y1_um = cx - 100.0, cy - 100.0, cx + 100.0, cy + 100.0  # a few 20x fields
    s.adaptive = False  # only the operator re-images here
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("scope-stream", "Scope Stream")
    runner = DemoRunner(cfg, analyzer_spec=THRESHOLD, hold_open_s=600, store_root=tmp_path / "scans")
    stopper = None
    try:
        widget.start_demo(runner)  # the "start demo" button, with a small configuration
        qtbot.waitUntil(lambda: runner.session is not None and bool(widget.control_endpoint), timeout=WAIT_MS)
        n_fields = len(runner.session.plan)
        qtbot.waitUntil(lambda: widget.n_tiles == n_fields, timeout=WAIT_MS)
        qtbot.waitUntil(lambda: bool(widget.control_status.get("stage_limits_um")), timeout=WAIT_MS)
        qtbot.waitUntil(lambda: widget.table.total > 0, timeout=WAIT_MS)
        # ---- re-image the top flag: the virtual stage moves there and the new image gets its own layer
        target = widget.table.rows[0]
        widget.focus_cell(target.cell_id)
        assert widget.reimage_selected()
        qtbot.waitUntil(lambda: "re-image r0001" in viewer.layers, timeout=WAIT_MS)
        core = runner.session.backend.core
        assert core.getXYPosition() == pytest.approx((target.x_um, target.y_um), abs=0.5)
        assert widget.reimage_replies[0]["tile_ids"] == ["r0001"]
        layer = viewer.layers["re-image r0001"]
        store = SlideStore.open(widget.store_path)
        tile = store.read_tile("r0001")
        assert tile.kind == "reimage" and tile.pixel_size_um == pytest.approx(0.2)  # the 50x objective
        assert tuple(layer.scale[-2:]) == pytest.approx((0.2, 0.2))
        assert tuple(layer.translate[-2:]) == pytest.approx(
            tile_translate_um(tile.x_um, tile.y_um, *tile.pixels.shape[:2], tile.pixel_size_um)
        )
        assert (tile.x_um, tile.y_um) == pytest.approx((target.x_um, target.y_um), abs=0.5)
        # its cells are classified and listed
        n_cells = next(p for p in store.tile_positions("reimage") if p["tile_id"] == "r0001")["n_cells"]
        qtbot.waitUntil(
            lambda: sum(1 for r in widget.reimage_cells.values() if r.tile_id == "r0001") == n_cells,
            timeout=WAIT_MS,
        )
        assert "re-image r0001" in widget.lbl_reimage.text()
        names = [lay.name for lay in viewer.layers]
        assert names.index("scope-stream flags") > names.index("re-image r0001")  # markers stay on top
        # ---- errors are shown, the viewer keeps going
        widget.request_reimage([ReimageTarget(1e7, 1e7)])  # bypasses the widget's own check: the microscope refuses
        qtbot.waitUntil(lambda: widget._reimage_worker is None, timeout=WAIT_MS)
        assert "outside the stage" in widget.lbl_reimage.text()
        regions = viewer.add_shapes(
            [np.array([[-1e6, -1e6], [-1e6 + 50, -1e6 + 50]])], shape_type="rectangle", name="re-image regions"
        )
        assert regions.nshapes == 1 and not widget.reimage_rectangle()  # refused before anything is sent
        assert "outside the stage range" in widget.lbl_reimage.text()
    finally:
        stopper = widget.stop_demo()
        widget.shutdown()
        if stopper is not None:
            stopper.join(120)
    assert runner.pipeline is None and runner.session is None
